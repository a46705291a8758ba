"""Combining adapters: one LoRA adapter built from several trained on the same base, through peft's
weighted-adapter machinery (`LoraModel.add_weighted_adapter`), saved so that stock peft loads it.

How the combined update ΔW relates to the inputs' ΔW_i = s_i·B_i·A_i (s_i = alpha_i / r_i), with
weights w_i (peft's definitions):
- `linear`: A = Σ √(w_i·s_i)·A_i, B = Σ √(w_i·s_i)·B_i. Exact for one non-zero weight; with several,
  the cross terms B_i·A_j make it an approximation. All ranks equal; the rank stays.
- `cat`: A and B stacked, so ΔW = Σ w_i·ΔW_i exactly; the rank is the sum of the ranks.
- `svd`: Σ w_i·ΔW_i, truncated to the rank `svd_rank` (default: the largest input rank) by SVD.
- `ties`, `dare_linear`, `dare_ties`: A and B each merged with TIES (trim to the `density` share
  of largest entries, elect a sign, average the agreeing ones) or DARE (drop at random, rescale);
  all ranks equal.

Refused, with the reason: anything that is not a plain LoRA (other methods have no weighted
combination in peft; DoRA's magnitudes and trained biases or whole modules would be dropped),
adapters of different bases, and ranks the chosen combination cannot take.

The combined adapter is saved beside the output and renamed into place; it is reloaded through
peft's own `load_adapter` before that, and with `verify` its logits on merge's fixed prompts are
compared with each input adapter's and with the base's.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from peftcli import adapters, merge, models, report
from peftcli.adapters import AdapterSource
from peftcli.errors import RunFailure, UserError

HOWS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties")  # peft adds A and B entry by entry
PRUNING = ("ties", "dare_linear", "dare_ties")  # these keep a `density` share of the entries
DEFAULT_DENSITY = 0.5
COMBINED, RELOADED = "combined", "reloaded"


def parse_weights(positional: list[str], options: list[str]) -> tuple[list[str], list[float] | None]:
    """The adapters and the weights from `A B --weights 0.5 0.5` (a command line cannot give an option
    a variable number of values: the second weight arrives as a positional argument), or
    `--weights 0.5,0.5`. A positional argument that is a number and no existing folder is a weight."""
    paths, trailing = [], []
    for value in positional:
        (trailing if _is_number(value) and not Path(value).exists() else paths).append(value)
    values = [part for option in options for part in option.split(",") if part.strip()] + trailing
    if trailing and not options:
        raise UserError(f"{', '.join(trailing)}: not an adapter directory", hint="weights go after --weights")
    try:
        return paths, [float(v) for v in values] if values else None
    except ValueError as err:
        raise UserError(f"--weights takes numbers ({err})", where="--weights", hint="e.g. --weights 0.5 0.5") from err


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def run_combine(paths: list[str | Path], *, output: Path, weights: list[float] | None = None, how: str = "linear",
                density: float | None = None, svd_rank: int | None = None, base: str | None = None,
                verify: bool = False, device: str = "auto", console=None) -> tuple[dict, Path]:
    """`peft combine`: check, combine, reload, verify, write. Returns combine.json's record and the output."""
    sources = [adapters.find_adapter(path, base) for path in paths]
    weights = check_weights(weights, len(sources))
    density = check_settings(how, density, svd_rank)
    check_combinable(sources, how)
    output = Path(output)
    check_output(output)
    status = console.status if console is not None else (lambda _message: nullcontext())
    device = models.resolve_device(device)
    names = [f"input{i}" for i in range(1, len(sources) + 1)]
    with status("loading the base model and the adapters"):
        model = adapters.load_base(sources[0], dtype="auto", device=device)
        for name, source in zip(names, sources):
            model = adapters.attach(model, source, adapter_name=name)
        tokenizer = adapters.load_tokenizer(sources[0])
    prompts = [tokenizer(text, return_tensors="pt").input_ids for text in merge.VERIFY_PROMPTS] if verify else []
    inputs_logits, base_logits = [], None
    if verify:
        with status("running each adapter on the verification prompts"):
            for name in names:
                model.set_adapter(name)
                inputs_logits.append(merge.logits(model, prompts))
            with model.disable_adapter():
                base_logits = merge.logits(model, prompts)
    with status(f"combining ({how})"):
        combine(model, names, weights, how=how, density=density, svd_rank=svd_rank)
    record = combine_record(sources, weights, how, density, svd_rank, model.peft_config[COMBINED].r)
    staging = merge.make_staging(output)
    try:
        written = save(model, tokenizer, staging, record)
        with status("reloading the combined adapter with peft"):
            reloaded = replace_source(sources[0], written)
            model = adapters.attach(model, reloaded, adapter_name=RELOADED)
            if verify:
                model.set_adapter(RELOADED)
                record["verification"] = verification(merge.logits(model, prompts), inputs_logits, base_logits,
                                                      sources, weights)
        (written / "combine.json").write_text(json.dumps(record, indent=2) + "\n")
        (written / "README.md").write_text(model_card(record))
        merge.replace_directory(written, output)
    except OSError as err:
        raise RunFailure(f"could not write the combined adapter: {err}", where=str(output)) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record, output


def check_weights(weights: list[float] | None, count: int) -> list[float]:
    if count < 2:
        raise UserError(f"combining needs at least two adapters (got {count})",
                        hint="name two or more run or adapter directories")
    if weights is None:
        return [1.0 / count] * count  # the average
    if len(weights) != count:
        raise UserError(f"{len(weights)} weights for {count} adapters", where="--weights",
                        hint="give one weight per adapter, in the same order")
    return weights


def check_settings(how: str, density: float | None, svd_rank: int | None) -> float | None:
    """The combination's own settings; returns the density to use (None where it means nothing)."""
    if how not in HOWS:
        raise UserError(f"unknown combination '{how}'", where="--how", hint=f"choose one of: {', '.join(HOWS)}")
    if density is not None and how not in PRUNING:
        raise UserError(f"--density is for {', '.join(PRUNING)}, not {how}", where="--density")
    if density is not None and not 0 < density <= 1:
        raise UserError(f"--density is the share of entries kept, in (0, 1] (got {density})", where="--density")
    if svd_rank is not None and how != "svd":
        raise UserError(f"--svd-rank is for svd, not {how}", where="--svd-rank")
    return (DEFAULT_DENSITY if density is None else density) if how in PRUNING else None


def check_combinable(sources: list[AdapterSource], how: str) -> None:
    """Refuse, with the reason, what peft's weighted combination cannot combine faithfully."""
    for source in sources:
        _check_plain_lora(source)
    first = sources[0]
    for source in sources[1:]:
        if not same_model(source.base, first.base):
            raise UserError(f"the adapters belong to different base models: {first.base} ({first.adapter_dir}) and "
                            f"{source.base} ({source.adapter_dir}); an adapter's update only means something on "
                            "the weights it was trained on", hint="combine adapters of one base (--base MODEL sets "
                            "it for all, when they are of one model under different names)")
        if source.config.get("layers_to_transform") != first.config.get("layers_to_transform"):
            raise UserError("the adapters adapt different layers (layers_to_transform), and the combined adapter "
                            "takes its layers from the first", where=str(source.adapter_dir))
        if isinstance(source.config.get("target_modules"), str) != isinstance(first.config.get("target_modules"), str):
            raise UserError("one adapter names its target modules by a regular expression and another by a list; "
                            "peft cannot join the two", where=str(source.adapter_dir))
    ranks = {str(s.adapter_dir): _ranks(s.config) for s in sources}
    if how in SAME_RANK and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{path}: r={'/'.join(map(str, sorted(r)))}" for path, r in ranks.items())
        raise UserError(f"'{how}' adds the adapters' A and B matrices entry by entry, so it needs one rank for all, "
                        f"and these differ ({listed})",
                        hint="use --how cat (the rank becomes the sum) or --how svd (the rank you choose)")


def _check_plain_lora(source: AdapterSource) -> None:
    where, config = str(source.adapter_dir), source.config
    if source.peft_type in adapters.PROMPT_LEARNING:
        raise UserError(f"a {source.method} adapter adds learned virtual tokens to the input: it has no weight "
                        "update to combine", where=where, hint="combine LoRA adapters")
    if source.peft_type != "LORA":
        raise UserError(f"a {source.method} adapter cannot be combined: peft's weighted combination "
                        "(add_weighted_adapter) is defined for LoRA adapters", where=where,
                        hint="combine LoRA adapters; use this one alone, or merge it into its base (peft merge)")
    if config.get("use_dora"):
        raise UserError("a DoRA adapter cannot be combined: peft's weighted combination keeps only the low-rank "
                        "B·A and would drop DoRA's per-layer magnitudes", where=where,
                        hint="combine plain LoRA (or rsLoRA) adapters")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise UserError("this adapter trained biases, which are no part of the low-rank update and which peft's "
                        "weighted combination drops", where=where, hint="combine adapters trained with bias: none")
    for field in ("modules_to_save", "trainable_token_indices", "target_parameters"):
        if config.get(field):
            raise UserError(f"this adapter trains more than low-rank updates ({field}: {config[field]}), and peft's "
                            "weighted combination cannot weight those", where=where,
                            hint="combine adapters made of LoRA layers only")


def _ranks(config: dict) -> frozenset:
    """Every rank the adapter uses (rank_pattern gives some modules their own)."""
    return frozenset([config.get("r"), *(config.get("rank_pattern") or {}).values()])


def same_model(a: str, b: str) -> bool:
    """Whether two model.base values name one model (a built-in and its cache folder, paths by location)."""
    return _identity(a) == _identity(b)


def _identity(base: str) -> str:
    source = models.locate(base)
    folder = Path(source.path)
    if not folder.exists():
        return base  # a hub id
    return str(folder.resolve() / source.gguf_file) if source.gguf_file else str(folder.resolve())


def check_output(output: Path) -> None:
    """The combined adapter goes into a new folder: nothing is ever replaced."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError("the output already exists; combine never replaces anything", where=str(output),
                        hint="choose a new --output folder")


def combine(model, names: list[str], weights: list[float], *, how: str, density: float | None,
            svd_rank: int | None) -> None:
    """Add the combined adapter to `model` (a PeftModel holding `names`) as COMBINED, with scale 1."""
    from peft.tuners.lora import LoraLayer

    try:
        model.add_weighted_adapter(names, weights, COMBINED, combination_type=how, svd_rank=svd_rank,
                                   density=density)
    except (ValueError, TypeError, RuntimeError) as err:
        raise UserError(f"peft cannot combine these adapters with '{how}': {str(err).strip()}") from err
    config = model.peft_config[COMBINED]
    # peft computes the new A and B for a scale of alpha/r = 1, but copies the first adapter's other
    # settings: an rsLoRA first input would scale it by alpha/√r instead, in memory and once saved.
    if config.use_rslora:
        config.use_rslora = False
        for module in model.modules():
            if isinstance(module, LoraLayer) and COMBINED in module.scaling:
                module.scaling[COMBINED] = 1.0


def save(model, tokenizer, staging: Path, record: dict) -> Path:
    """The combined adapter alone, as stock peft saves it, with the tokenizer; returns its folder."""
    model.save_pretrained(staging, selected_adapters=[COMBINED])  # peft writes a named adapter to a subfolder
    written = staging / COMBINED
    tokenizer.save_pretrained(written)
    # peft copied the first input's base_model_name_or_path; name the base the inputs were combined on,
    # as a folder stock tools load (a built-in as the folder it is built in).
    config_path = written / adapters.ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    base = record["base"]
    config["base_model_name_or_path"] = models.locate(base).path if base.startswith("builtin:") else base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return written


def replace_source(first: AdapterSource, adapter_dir: Path) -> AdapterSource:
    """The written adapter as a source on the inputs' base, for reloading."""
    return replace(first, adapter_dir=adapter_dir, config=adapters.read_adapter_config(adapter_dir), run_dir=None,
                   recipe_text=None, trained_on=first.base)


def verification(combined: list, inputs: list[list], base: list, sources: list[AdapterSource],
                 weights: list[float]) -> dict:
    """How far the combined adapter's logits are from each input adapter's, and from the base's."""
    return {
        "prompts": list(merge.VERIFY_PROMPTS),
        "positions": sum(len(x) for x in combined),
        "combined_vs_inputs": [{"adapter": str(s.adapter_dir), "weight": w, **merge.compare(logits, combined).as_dict()}
                               for s, w, logits in zip(sources, weights, inputs)],
        "combined_vs_base": merge.compare(base, combined).as_dict(),
    }


def combine_record(sources: list[AdapterSource], weights: list[float], how: str, density: float | None,
                   svd_rank: int | None, rank: int) -> dict:
    """What combine.json says: the inputs and their weights, how they were combined, how close it is."""
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": sources[0].base,
        "how": how,
        "density": density,
        "svd_rank": svd_rank,
        "rank": rank,
        "inputs": [{"adapter": str(s.adapter_dir.resolve()), "method": s.method, "r": s.config.get("r"),
                    "lora_alpha": s.config.get("lora_alpha"), "weight": w} for s, w in zip(sources, weights)],
        "verification": None,
        "versions": report.versions(),
    }


def model_card(record: dict) -> str:
    """The combined adapter's README.md."""
    lines = ["---", "library_name: peft", f"base_model: {json.dumps(record['base'])}",
             "tags: [peftcli, lora, combined]", "---", "", "# Combined LoRA adapter", "",
             f"Built by peftcli from {len(record['inputs'])} LoRA adapters of `{record['base']}` with peft's "
             f"`add_weighted_adapter` (combination `{record['how']}`"
             + (f", density {record['density']}" if record["density"] is not None else "") + f"); rank {record['rank']}.",
             "", "| input adapter | weight |", "|---|---|"]
    lines += [f"| `{i['adapter']}` | {i['weight']} |" for i in record["inputs"]]
    check = record["verification"]
    if check:
        lines += ["", f"Logits on {len(check['prompts'])} fixed prompts ({check['positions']} positions):", "",
                  "| combined vs | max abs logit difference | greedy-token agreement |", "|---|---|---|"]
        lines += [f"| `{c['adapter']}` (weight {c['weight']}) | {c['max_abs_logit_diff']:.3g} | "
                  f"{c['greedy_agreement']:.1%} |" for c in check["combined_vs_inputs"]]
        base = check["combined_vs_base"]
        lines.append(f"| the base alone | {base['max_abs_logit_diff']:.3g} | {base['greedy_agreement']:.1%} |")
    lines += ["", "```python", "from transformers import AutoModelForCausalLM", "from peft import PeftModel",
              "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), \"THIS_FOLDER\")",
              "```", ""]
    return "\n".join(lines)
