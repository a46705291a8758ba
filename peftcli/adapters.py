"""Trained adapters for inference: find one and its base, load them together.

What a user can point at:
- a run directory (`peft train`'s output): the adapter is `<run>/adapter`, the base is the
  saved recipe's `model.base` (and whether it was loaded in 4-bit, i.e. QLoRA);
- an adapter directory (`adapter_config.json` + `adapter_model.safetensors`, as peft saves
  it): the base is its config's `base_model_name_or_path`; `<run>/adapter` counts as its run;
- anything else is a model (`builtin:NAME`, a folder, a `.gguf` file, a hub id), for `generate`.
`--base` overrides the base found. `merge` and `generate` load through here.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli import models
from peftcli.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
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

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()

    @property
    def method(self) -> str:
        """The method's name as a recipe writes it (LoRA's variants by their flags)."""
        if self.peft_type == "LORA":
            name = "dora" if self.config.get("use_dora") else "rslora" if self.config.get("use_rslora") else "lora"
            return "qlora" if self.load_in_4bit and name == "lora" else name
        return self.peft_type.lower()


def is_adapter_path(path: str | Path) -> bool:
    """Whether `path` is a run directory or an adapter directory (else it names a model)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() or (path / RUN_ADAPTER / ADAPTER_CONFIG).is_file()


def find_adapter(path: str | Path, base: str | None = None) -> AdapterSource:
    """The adapter in a run or adapter directory, with its base (`base` overrides it)."""
    path = Path(path)
    if not path.exists():
        raise UserError("no such directory", where=str(path), hint="give a run directory or an adapter directory")
    run_dir = path if (path / RUN_ADAPTER / ADAPTER_CONFIG).is_file() else None
    if run_dir is None and path.name == RUN_ADAPTER and (path.parent / RUN_RECIPE).is_file():
        run_dir = path.parent
    adapter_dir = run_dir / RUN_ADAPTER if run_dir else path
    config = read_adapter_config(adapter_dir)
    check_weights(adapter_dir)
    training = _run_model_section(run_dir) if run_dir else {}
    if base is not None:
        found, origin = _resolve_base_option(base), "--base"
    else:
        found, origin = _base_of(adapter_dir, config, training, run_dir)
    return AdapterSource(
        adapter_dir=adapter_dir, config=config, base=found, base_origin=origin, run_dir=run_dir,
        recipe_text=(run_dir / RUN_RECIPE).read_text() if run_dir else None,
        load_in_4bit=bool(training.get("load_in_4bit")), quant_type=training.get("quant_type", "nf4"),
        trust_remote_code=bool(training.get("trust_remote_code")))


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
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


def check_weights(adapter_dir: Path) -> None:
    """The adapter's weights exist and are a readable safetensors file, before any model is loaded."""
    from safetensors import SafetensorError, safe_open

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


def _run_model_section(run_dir: Path) -> dict[str, Any]:
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


def attach(model, source: AdapterSource):
    """`model` with the trained adapter loaded for inference; an adapter that does not fit is an error."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(model, str(source.adapter_dir), is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"the adapter does not fit the base model {source.base}: {_first_line(err)}",
                            where=str(source.adapter_dir),
                            hint=f"the base came from {source.base_origin}; pass the right one with --base MODEL") from err
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    if missing:
        raise UserError(f"the adapter's weights do not match its config: {missing[0][:300]}",
                        where=str(source.adapter_dir / ADAPTER_WEIGHTS), hint="train or save the adapter again")
    return model.eval()


def load_tokenizer(source: AdapterSource):
    """The tokenizer saved with the adapter (it carries any chat template training set), else the base's."""
    if (source.adapter_dir / "tokenizer_config.json").is_file():
        return models.load_tokenizer(str(source.adapter_dir), source.trust_remote_code)
    return models.load_tokenizer(source.base, source.trust_remote_code)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
