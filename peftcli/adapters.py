"""Trained adapters for inference: find one and its base, load them together.

What a user can point at:
- a run directory (`peft train`'s output): the adapter is `<run>/adapter`, the base is the
  saved recipe's `model.base` (and whether it was loaded in 4-bit, i.e. QLoRA);
- an adapter directory (`adapter_config.json` + `adapter_model.safetensors`, as peft saves
  it): the base is its config's `base_model_name_or_path`; `<run>/adapter` counts as its run;
  a mixed adapter (several methods, `method:` as a list) is a folder of such directories with a
  `mixed.json` manifest (peftcli.methods.mixed), loaded as one adapter;
- a run trained with method full holds no adapter but the whole model (`<run>/model`), which
  `generate` loads as a model and `merge` has nothing to do with;
- anything else is a model (`builtin:NAME`, a folder, a `.gguf` file, a hub id), for `generate`.
`--base` overrides the base found. `merge` and `generate` load through here.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from peftcli import models
from peftcli.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MIXED_MANIFEST = "mixed.json"  # peftcli.methods.mixed.MANIFEST
RUN_RECIPE = "recipe.yaml"
RUN_ADAPTER = "adapter"
# peft tuners that change how the input is read (virtual tokens, prefixes) rather than a weight.
PROMPT_LEARNING = {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT"}


@dataclass(frozen=True)
class AdapterSource:
    """A trained adapter on disk, the base it belongs to and how training loaded that base."""

    adapter_dir: Path
    config: dict[str, Any]  # adapter_config.json as saved
    base: str  # a model.base value: builtin:NAME, folder, .gguf, hub id
    base_origin: str  # where `base` came from, for messages
    run_dir: Path | None = None
    recipe_text: str | None = None
    load_in_4bit: bool = False  # QLoRA: training saw the base in 4-bit
    quant_type: str = "nf4"
    trust_remote_code: bool = False
    trained_on: str | None = None  # the base the adapter names itself (its run's recipe or its config), if any

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()

    @property
    def parts(self) -> list[dict]:
        """A mixed adapter's parts (name, folder, config); a single adapter is its only part."""
        return self.config.get("parts") or [{"name": None, "dir": self.adapter_dir, "config": self.config}]

    @property
    def weight_files(self) -> list[Path]:
        return [Path(part["dir"]) / ADAPTER_WEIGHTS for part in self.parts]

    @property
    def method(self) -> str:
        """The method's name as a recipe writes it (LoRA's variants by their flags; mixed ones joined by +)."""
        if self.peft_type == "MIXED":
            return "+".join(replace(self, config=part["config"]).method for part in self.parts)
        if self.peft_type == "LORA":
            name = "dora" if self.config.get("use_dora") else "rslora" if self.config.get("use_rslora") else "lora"
            return "qlora" if self.load_in_4bit and name == "lora" else name
        return self.peft_type.lower()


def full_run_model(path: str | Path) -> Path | None:
    """The model folder of a run trained with method full (no adapter: the whole model), if `path` is one."""
    path = Path(path)
    model = path / "model"
    return model if (path / RUN_RECIPE).is_file() and (model / "config.json").is_file() else None


def is_adapter_path(path: str | Path) -> bool:
    """Whether `path` is a run directory or an adapter directory (else it names a model)."""
    path = Path(path)
    return is_adapter_dir(path) or is_adapter_dir(path / RUN_ADAPTER)


def is_adapter_dir(path: Path) -> bool:
    """A folder peft saved an adapter into, or peftcli a mixed one."""
    return (path / ADAPTER_CONFIG).is_file() or (path / MIXED_MANIFEST).is_file()


def find_adapter(path: str | Path, base: str | None = None) -> AdapterSource:
    """The adapter in a run or adapter directory, with its base (`base` overrides it)."""
    path = Path(path)
    if not path.exists():
        raise UserError("no such directory", where=str(path), hint="give a run directory or an adapter directory")
    run_dir = path if is_adapter_dir(path / RUN_ADAPTER) else None
    if run_dir is None and path.name == RUN_ADAPTER and (path.parent / RUN_RECIPE).is_file():
        run_dir = path.parent
    adapter_dir = run_dir / RUN_ADAPTER if run_dir else path
    config = read_adapter_config(adapter_dir)
    check_weights(adapter_dir)
    training = run_model_section(run_dir) if run_dir else {}
    trained_on = training["base"] if run_dir else config.get("base_model_name_or_path")
    if base is not None:
        found, origin = _resolve_base_option(base), "--base"
    else:
        found, origin = _base_of(adapter_dir, config, training, run_dir)
    return AdapterSource(
        adapter_dir=adapter_dir, config=config, base=found, base_origin=origin, run_dir=run_dir,
        recipe_text=(run_dir / RUN_RECIPE).read_text() if run_dir else None,
        load_in_4bit=bool(training.get("load_in_4bit")), quant_type=training.get("quant_type", "nf4"),
        trust_remote_code=bool(training.get("trust_remote_code")), trained_on=trained_on or None)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json; for a mixed adapter, its manifest with each part's config (`parts`)."""
    if (adapter_dir / MIXED_MANIFEST).is_file():
        return _read_mixed(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"no {ADAPTER_CONFIG} here: this is not a run directory or an adapter directory",
                        where=str(adapter_dir),
                        hint="give the folder `peft train` wrote (runs/NAME) or one that peft's save_pretrained wrote")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"not valid JSON: {err}", where=str(path), hint="the adapter was not saved completely; save it again") from err
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError("not a peft adapter config (no peft_type)", where=str(path))
    return config


def _read_mixed(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / MIXED_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"not valid JSON: {err}", where=str(path), hint="train or save the adapter again") from err
    names = manifest.get("adapters") if isinstance(manifest, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError("a mixed adapter's manifest lists no adapters", where=str(path))
    parts = [{"name": name, "dir": adapter_dir / name, "config": read_adapter_config(adapter_dir / name)}
             for name in names]
    return {**manifest, "peft_type": "MIXED", "parts": parts,
            "base_model_name_or_path": parts[0]["config"].get("base_model_name_or_path")}


def check_weights(adapter_dir: Path) -> None:
    """The adapter's weights exist and are a readable safetensors file, before any model is loaded."""
    from safetensors import SafetensorError, safe_open

    if (adapter_dir / MIXED_MANIFEST).is_file():
        for name in _read_mixed(adapter_dir)["adapters"]:
            check_weights(adapter_dir / name)
        return
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        raise UserError(f"the adapter's weights are missing: no {ADAPTER_WEIGHTS}", where=str(adapter_dir),
                        hint="peftcli reads safetensors only; re-save the adapter with save_pretrained(safe_serialization=True)"
                        if pickled else "the adapter was not saved completely; train or save it again")
    try:
        with safe_open(str(path), framework="pt") as weights:
            if not list(weights.keys()):
                raise UserError("the adapter's weights file holds no tensors", where=str(path))
    except SafetensorError as err:
        raise UserError(f"the adapter's weights file is corrupt or truncated ({err})", where=str(path),
                        hint="train or save the adapter again") from err


def run_model_section(run_dir: Path) -> dict[str, Any]:
    """The saved recipe's model section (and QLoRA settings), read without validating the data paths:
    a run's data may have moved since it was trained, and merging does not need it."""
    import yaml

    path = run_dir / RUN_RECIPE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"the run's recipe is not readable YAML: {err}", where=str(path)) from err
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("base"), str):
        raise UserError("the run's recipe has no model.base", where=str(path), hint="pass the base with --base MODEL")
    method = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    # The `qlora` method (a LoRA on a 4-bit base) and model.load_in_4bit both mean a 4-bit base.
    return {**model, "load_in_4bit": bool(model.get("load_in_4bit")) or method.get("name") == "qlora",
            "quant_type": method.get("quant_type", "nf4")}


def _base_of(adapter_dir: Path, config: dict, training: dict, run_dir: Path | None) -> tuple[str, str]:
    if run_dir is not None:
        return training["base"], f"{run_dir / RUN_RECIPE}: model.base"
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{ADAPTER_CONFIG} does not name its base model (base_model_name_or_path)",
                        where=str(adapter_dir), hint="pass the base with --base MODEL")
    return base, f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path"


def _resolve_base_option(base: str) -> str:
    """--base as the recipe reads model.base: a local path becomes absolute."""
    if base.startswith("builtin:") or not Path(base).expanduser().exists():
        return base
    return str(Path(base).expanduser().resolve())


def load_base(source: AdapterSource, *, dtype, device: str, four_bit: bool = False):
    """The base model on `device`, in `dtype` (in 4-bit with `dtype` as compute dtype if `four_bit`)."""
    quantization = models.four_bit_config(dtype, source.quant_type) if four_bit else None
    try:
        return models.load_model(source.base, dtype=dtype, trust_remote_code=source.trust_remote_code,
                                 quantization_config=quantization, device_map={"": device})
    except UserError as err:
        raise UserError(f"cannot load the adapter's base model: {err.message}", where=source.base_origin,
                        hint="pass the base model with --base MODEL") from err


def attach(model, source: AdapterSource, adapter_name: str = "default", mixed: bool = False):
    """`model` with the trained adapter loaded for inference under `adapter_name`, beside those a peft
    model already holds (`mixed`: in a PeftMixedModel, which holds adapters of different methods);
    an adapter that does not fit is an error."""
    from peft import PeftMixedModel, PeftModel

    from peftcli import methods

    check_fits(model, source)
    methods.bottleneck.register()  # peftcli's own tuner, so that peft can read its config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if isinstance(model, (PeftModel, PeftMixedModel)):
                model.load_adapter(str(source.adapter_dir), adapter_name=adapter_name, is_trainable=False)
            elif source.peft_type == "MIXED":  # its parts under their own names, all active
                model = methods.load_adapter(model, source.adapter_dir, is_trainable=False)
            else:
                model = (PeftMixedModel if mixed else PeftModel).from_pretrained(
                    model, str(source.adapter_dir), adapter_name=adapter_name, is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"the adapter does not fit the base model {source.base}: {_first_line(err)}",
                            where=str(source.adapter_dir),
                            hint=f"the base came from {source.base_origin}; pass the right one with --base MODEL") from err
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    if missing:
        raise UserError(f"the adapter's weights do not match its config: {missing[0][:300]}",
                        where=str(source.adapter_dir / ADAPTER_WEIGHTS), hint="train or save the adapter again")
    return model.eval()


def check_fits(model, source: AdapterSource) -> None:
    """Before attaching: the base the adapter was trained on and the loaded one must share the
    architecture, widths, depth and vocabulary. Unchecked when the adapter names no base, names
    the loaded one, or names one whose config cannot be read here (peft's own checks remain)."""
    if source.trained_on is None or source.trained_on == source.base:
        return
    try:
        trained = base_shape(models.load_config(source.trained_on, source.trust_remote_code))
    except UserError:
        return
    from peftcli.methods import base_model

    loaded = base_shape(base_model(model).config)
    differ = [key for key in trained if trained[key] != loaded[key]]
    if differ:
        raise UserError(f"the adapter was trained on {source.trained_on} ({describe_shape(trained)}), and the base "
                        f"model {source.base} is not like it ({describe_shape(loaded)}): the "
                        f"{' and '.join(d.replace('_', ' ') for d in differ)} {'differ' if len(differ) > 1 else 'differs'}",
                        where=str(source.adapter_dir),
                        hint=f"load it on {source.trained_on} or a model of the same shape")


def base_shape(config) -> dict:
    """What an adapter's weights depend on in a base model's config."""
    return {"architecture": config.model_type, "hidden_size": getattr(config, "hidden_size", None),
            "layers": getattr(config, "num_hidden_layers", None), "vocabulary": getattr(config, "vocab_size", None)}


def describe_shape(shape: dict) -> str:
    return (f"{shape['architecture']}, hidden size {shape['hidden_size']}, {shape['layers']} layers, "
            f"vocabulary {shape['vocabulary']}")


def load_tokenizer(source: AdapterSource):
    """The tokenizer saved with the adapter (it carries any chat template training set), else the base's."""
    if (source.adapter_dir / "tokenizer_config.json").is_file():
        return models.load_tokenizer(str(source.adapter_dir), source.trust_remote_code)
    return models.load_tokenizer(source.base, source.trust_remote_code)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
