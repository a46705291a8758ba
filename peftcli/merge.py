"""Merging: fold a trained adapter into its base's weights (W + ΔW), so that inference costs exactly
what the base costs, and check every time that the merged model is still the adapter model.

The pipeline, in the order memory allows (never two full models at once):
1. load the base and attach the adapter; compute its logits on fixed prompts (and the base's,
   with the adapter disabled, to know how far the adapter moves them);
2. merge in place with peft's `merge_and_unload` (layer by layer: one weight's ΔW at a time);
3. compute the merged model's logits and compare: max |Δlogit| and greedy-token agreement,
   against a tolerance for the dtype (TOLERANCES);
4. only if they agree, save a stock transformers model folder: staged beside the output and
   renamed into place, so a failure never leaves half a model or costs an earlier one.

QLoRA (a LoRA trained on a 4-bit base): the logits of the 4-bit adapter model, which is what
training saw, are computed first; then the adapter is merged either into the base reloaded in
16-bit (default) or into the dequantized NF4 weights (`dequantize`), and both the exactness of
the merge and the gap to the 4-bit model are reported.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftcli import adapters, models, report
from peftcli.adapters import AdapterSource
from peftcli.data import ALPACA_PROMPT
from peftcli.errors import RunFailure, UserError

# peft tuners whose update folds into the weights it adapts (LoRA covers DoRA and rsLoRA).
MERGEABLE = {"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "VERA"}
MAX_SHARD_SIZE = "5GB"  # the hub's usual shard size: an 8B model in bf16 is 4 files
VERIFY_PROMPTS = (
    "The quick brown fox jumps over the lazy dog. Then it",
    ALPACA_PROMPT.format(instruction="List three primary colours."),
    "Maria Lopez, 34, moved from Lyon to Porto last spring. As JSON:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
)


@dataclass(frozen=True)
class Tolerance:
    """How close the merged model must stay to the adapter model in one dtype.

    The logit bound is relative to the largest |logit| (at least 1): rounding errors scale
    with the values rounded. bf16 keeps 8 significant bits, fp16 11, fp32 24; through a deep
    model the merged and the unmerged computations round differently, by about as much as the
    16-bit adapter model differs from itself in fp32."""

    relative_logit_diff: float
    min_agreement: float

    def max_logit_diff(self, scale: float) -> float:
        return self.relative_logit_diff * max(1.0, scale)


TOLERANCES = {
    "float32": Tolerance(1e-4, 0.99),
    "float16": Tolerance(2e-2, 0.95),
    "bfloat16": Tolerance(1e-1, 0.90),
}


@dataclass(frozen=True)
class Comparison:
    """Two models' logits on the same prompts: the largest difference and how often their greedy
    (most likely) next token is the same."""

    max_abs_logit_diff: float
    greedy_agreement: float

    def as_dict(self) -> dict:
        return {"max_abs_logit_diff": self.max_abs_logit_diff, "greedy_agreement": self.greedy_agreement}


@dataclass
class Merged:
    """A merged model in memory, its tokenizer, and what merge.json records about it."""

    model: Any  # a plain transformers model: peft's layers are gone
    tokenizer: Any
    record: dict

    @property
    def verified(self) -> bool:
        verification = self.record["verification"]
        return verification is None or verification["passed"]


def check_mergeable(source: AdapterSource) -> None:
    """Refuse, with the reason and the alternative, adapters whose update is not a weight delta."""
    kind = source.peft_type
    if kind in MERGEABLE:
        return
    if kind == "MIXED":  # mergeable when every part is
        for part in source.parts:
            check_mergeable(replace(source, adapter_dir=Path(part["dir"]), config=part["config"]))
        return
    use_instead = ("load the adapter with peft at inference (`peft generate` does), "
                   "e.g. PeftModel.from_pretrained(base, ADAPTER_DIR)")
    if kind in adapters.PROMPT_LEARNING:
        raise UserError(f"a {kind.lower()} adapter cannot be merged: it adds learned virtual tokens (or "
                        "per-layer key/value prefixes) to the input, and no change to the model's weights does that",
                        where=str(source.adapter_dir), hint=use_instead)
    if "ADAPTER" in kind or "BOTTLENECK" in kind:
        raise UserError(f"a bottleneck adapter ({kind.lower()}) cannot be merged: its small network with a "
                        "non-linearity sits in sequence with the layer, which no linear weight can reproduce",
                        where=str(source.adapter_dir), hint=use_instead)
    raise UserError(f"peftcli does not merge {kind.lower() or 'unknown'} adapters (it merges LoRA, DoRA, rsLoRA, "
                    "AdaLoRA, IA3, LoHa, LoKr and VeRA)", where=str(source.adapter_dir), hint=use_instead)


def default_output(source: AdapterSource) -> Path:
    """<run>/merged for a run; <adapter>-merged beside a bare adapter directory."""
    if source.run_dir is not None:
        return source.run_dir / "merged"
    return source.adapter_dir.parent / f"{source.adapter_dir.name}-merged"


def check_output(output: Path, source: AdapterSource, *, overwrite: bool) -> None:
    """Refuse, before any loading, an output that would cost the user something."""
    target = output.resolve()
    protected = [source.adapter_dir.resolve()] + ([source.run_dir.resolve()] if source.run_dir else [])
    if Path(source.base).exists():
        protected.append(Path(source.base).resolve())
    for kept in protected:
        if target == kept or target in kept.parents:
            raise UserError("the output would replace the adapter, its run or its base model", where=str(output),
                            hint="choose another --output")
    if output.exists() and not output.is_dir():
        raise UserError("the output path is a file, not a directory", where=str(output))
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise UserError("the output directory already holds files", where=str(output),
                            hint="pass --overwrite to replace the merged model there, or choose another --output")
        if not (output / "config.json").is_file():
            raise UserError("the output directory holds files that are not a model; --overwrite only replaces a "
                            "model folder", where=str(output), hint="choose another --output")


def run_merge(path: Path, *, output: Path | None = None, base: str | None = None, dtype: str = "auto",
              device: str = "auto", verify: bool = True, dequantize: bool = False, overwrite: bool = False,
              console=None) -> tuple[Merged, Path]:
    """`peft merge`: find, check, merge, verify, write. Returns the merged model and where it went."""
    source = adapters.find_adapter(path, base)
    check_mergeable(source)
    if dequantize and not source.load_in_4bit:
        if source.run_dir is not None:
            raise UserError("--dequantize is for QLoRA runs, and this run's base was not loaded in 4-bit",
                            where=str(source.run_dir / adapters.RUN_RECIPE), hint="merge without --dequantize")
        source = replace(source, load_in_4bit=True)  # a bare adapter: the user says it was trained on 4-bit
    output = Path(output) if output is not None else default_output(source)
    check_output(output, source, overwrite=overwrite)
    import torch

    device = models.resolve_device(device)
    try:
        merged = merge_adapter(source, dtype=dtype, device=device, verify=verify, dequantize=dequantize,
                               console=console)
    except torch.OutOfMemoryError as err:
        raise RunFailure("out of GPU memory while merging",
                         hint="merge on the CPU with --device cpu (it needs RAM for one copy of the model)") from err
    if not merged.verified:
        raise RunFailure(verification_failure(merged.record["verification"]),
                         hint="nothing was written; merge in float32 (--dtype float32) for the closest match, "
                              "or pass --no-verify to write it anyway")
    write_merged(merged, output)
    return merged, output


def merge_adapter(source: AdapterSource, *, dtype: str = "auto", device: str = "cpu", verify: bool = True,
                  dequantize: bool = False, console=None) -> Merged:
    """The merged model in memory, with its verification (None when `verify` is off)."""
    import torch

    status = console.status if console is not None else (lambda _message: nullcontext())
    clock, times = time.perf_counter(), {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokenizer = adapters.load_tokenizer(source)
    prompts = [tokenizer(text, return_tensors="pt").input_ids for text in VERIFY_PROMPTS] if verify else []
    trained_logits = None
    with status("loading the base model and the adapter"):
        if source.load_in_4bit and verify:
            trained_logits = _four_bit_adapter_logits(source, device, prompts)
        if dequantize:
            base = _dequantized_base(source, _merge_dtype(dtype, source, device), device)
        else:
            base = adapters.load_base(source, dtype=_merge_dtype(dtype, source, device), device=device)
        model = adapters.attach(base, source)
        times["load_s"] = time.perf_counter() - clock
    if verify:
        with status("running the adapter model on the verification prompts"):
            adapter_logits = logits(model, prompts)
            with model.disable_adapter():
                base_logits = logits(model, prompts)
    with status("merging"):
        started = time.perf_counter()
        merged = model.merge_and_unload()  # in place, one layer at a time
        times["merge_s"] = time.perf_counter() - started
    verification = None
    if verify:
        with status("running the merged model on the verification prompts"):
            verification = verify_merge(adapter_logits, logits(merged, prompts), base_logits, trained_logits,
                                        dtype_name(merged))
    times["total_s"] = time.perf_counter() - clock
    record = merge_record(source, merged, device, dequantize, verification, times)
    return Merged(merged, tokenizer, record)


def _four_bit_adapter_logits(source: AdapterSource, device: str, prompts: list) -> list:
    """The logits of the model training saw: the adapter on the 4-bit base. The model is freed
    before the function returns, so the merge never holds it beside the 16-bit one."""
    four_bit = adapters.attach(adapters.load_base(source, dtype=_compute_dtype(device), device=device,
                                                  four_bit=True), source)
    found = logits(four_bit, prompts)
    del four_bit
    _release_memory()
    return found


def _dequantized_base(source: AdapterSource, dtype, device: str):
    """The base as training saw it (4-bit), its weights dequantized into `dtype`. Loaded afresh: on
    the CPU, bitsandbytes repacks 4-bit weights at their first forward pass, which dequantizing
    does not undo."""
    base = adapters.load_base(source, dtype=_compute_dtype(device), device=device, four_bit=True).dequantize(dtype=dtype)
    for param in base.parameters():  # the layers that were never quantized, too; not the buffers: RoPE's
        param.data = param.data.to(dtype)  # inv_freq stays fp32, as it is in the model folder reloaded later
    return base


def _merge_dtype(option: str, source: AdapterSource, device: str):
    """The dtype to merge in: the option; else the dtype the base is stored in ("auto" lets
    transformers read it), or for QLoRA the 16-bit compute dtype training used."""
    import torch

    if option != "auto":
        return getattr(torch, option)
    return _compute_dtype(device) if source.load_in_4bit else "auto"


def _compute_dtype(device: str):
    """QLoRA's compute dtype: bf16, or fp16 on a GPU without bf16."""
    import torch

    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def logits(model, prompts: list) -> list:
    """The model's logits at every position of each prompt, as float32 on the CPU."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return [model(input_ids=ids.to(device)).logits[0].float().cpu() for ids in prompts]


def compare(expected: list, got: list) -> Comparison:
    import torch

    a, b = torch.cat(expected), torch.cat(got)
    return Comparison(max_abs_logit_diff=(a - b).abs().max().item(),
                      greedy_agreement=(a.argmax(-1) == b.argmax(-1)).float().mean().item())


def verify_merge(adapter_logits: list, merged_logits: list, base_logits: list, trained_logits: list | None,
                 dtype: str) -> dict:
    """The verification record: the merged model against the adapter model, within the dtype's tolerance."""
    import torch

    tolerance = TOLERANCES.get(dtype, TOLERANCES["float32"])
    scale = torch.cat(adapter_logits).abs().max().item()
    allowed = tolerance.max_logit_diff(scale)
    check = compare(adapter_logits, merged_logits)
    effect = compare(adapter_logits, base_logits)
    passed = (math.isfinite(check.max_abs_logit_diff) and check.max_abs_logit_diff <= allowed
              and check.greedy_agreement >= tolerance.min_agreement)
    return {
        "prompts": list(VERIFY_PROMPTS),
        "positions": sum(len(x) for x in adapter_logits),
        "dtype": dtype,
        "logit_scale": scale,
        "tolerance": {"max_abs_logit_diff": allowed, "greedy_agreement": tolerance.min_agreement},
        "merged_vs_adapter": check.as_dict(),
        "adapter_vs_base": effect.as_dict(),
        "merged_vs_4bit_adapter": compare(trained_logits, merged_logits).as_dict() if trained_logits else None,
        # When the adapter moves the logits less than the tolerance, passing says nothing.
        "conclusive": effect.max_abs_logit_diff > allowed,
        "passed": passed,
    }


def verification_failure(verification: dict) -> str:
    check, tolerance = verification["merged_vs_adapter"], verification["tolerance"]
    return (f"verification failed: the merged model differs from the adapter model beyond the "
            f"{verification['dtype']} tolerance: max |Δlogit| {check['max_abs_logit_diff']:.3g} "
            f"(allowed {tolerance['max_abs_logit_diff']:.3g}), greedy agreement "
            f"{check['greedy_agreement']:.1%} (needs {tolerance['greedy_agreement']:.0%})")


def dtype_name(model) -> str:
    return str(model.dtype).removeprefix("torch.")


def merge_record(source: AdapterSource, model, device: str, dequantize: bool, verification: dict | None,
                 times: dict) -> dict:
    """What merge.json says: where the model came from, how it was merged and how close it is."""
    qlora = None
    if source.load_in_4bit:
        qlora = {"quant_type": source.quant_type,
                 "merged_into": "the dequantized 4-bit weights" if dequantize else "the base reloaded in 16-bit"}
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": source.base,
        "adapter": str(source.adapter_dir.resolve()),
        "run": str(source.run_dir.resolve()) if source.run_dir else None,
        "method": source.method,
        "peft_type": source.peft_type,
        "adapter_settings": adapter_settings(source.config),
        "architecture": type(model).__name__,
        "dtype": dtype_name(model),
        "device": device,
        "qlora": qlora,
        "verification": verification,
        "time_s": {k: round(v, 3) for k, v in times.items()},
        "memory": report.peak_memory(device),
        "versions": report.versions(),
    }


def adapter_settings(config: dict) -> dict:
    """The adapter's main settings, for the model card and merge.json."""
    keys = ("r", "lora_alpha", "use_dora", "use_rslora", "target_modules", "feedforward_modules", "alpha",
            "rank_dropout", "init_r", "target_r", "decompose_both")
    return {k: sorted(v) if isinstance(v, (list, set)) else v for k, v in config.items() if k in keys and v is not None}


def write_merged(merged: Merged, output: Path, *, max_shard_size: str = MAX_SHARD_SIZE) -> None:
    """Save the model folder (safetensors, sharded when large; config, generation config, tokenizer,
    model card, merge.json) beside `output`, then rename it into place."""
    staging = make_staging(output)
    try:
        started = time.perf_counter()
        merged.model.save_pretrained(staging, max_shard_size=max_shard_size)
        merged.tokenizer.save_pretrained(staging)
        merged.record["time_s"]["write_s"] = round(time.perf_counter() - started, 3)
        merged.record["memory"] = report.peak_memory(merged.record["device"])
        (staging / "merge.json").write_text(json.dumps(merged.record, indent=2) + "\n")
        (staging / "README.md").write_text(model_card(merged.record, source_recipe(merged.record)))
        replace_directory(staging, output)
    except OSError as err:
        raise RunFailure(f"could not write the merged model: {err}", where=str(output)) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_staging(output: Path) -> Path:
    """An empty folder beside `output`, to write into and then rename into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
    return staging


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_directory(staging: Path, output: Path) -> None:
    """Put `staging` at `output`; an old output is moved aside first and removed only after."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def source_recipe(record: dict) -> str | None:
    run = record.get("run")
    recipe = Path(run) / adapters.RUN_RECIPE if run else None
    return recipe.read_text() if recipe and recipe.is_file() else None


def model_card(record: dict, recipe_text: str | None) -> str:
    """The merged model's README.md: what it is made of, how close it is, how to load it."""
    settings = ", ".join(f"{k}={v}" for k, v in record["adapter_settings"].items())
    lines = ["---", "library_name: transformers", f"base_model: {json.dumps(record['base'])}",
             f"tags: [peftcli, merged, {record['method']}]", "---", "",
             f"# {Path(record['run'] or record['adapter']).name} (merged)", "",
             f"The {record['method']} adapter below merged into its base model by peftcli: a plain transformers "
             "model that needs no peft and runs exactly as fast as the base.", "",
             f"- base model: `{record['base']}`",
             f"- adapter: `{record['adapter']}`",
             f"- method: {record['method']} ({settings})" if settings else f"- method: {record['method']}",
             f"- recipe: `{Path(record['run']) / adapters.RUN_RECIPE}` (below)" if recipe_text
             else "- recipe: none (merged from an adapter directory)",
             f"- weights: {record['dtype']}, {record['architecture']}"]
    if record["qlora"]:
        lines.append(f"- QLoRA ({record['qlora']['quant_type']} base): merged into {record['qlora']['merged_into']}")
    lines += ["", "## Verification", ""] + verification_lines(record["verification"])
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
              'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")', "```", ""]
    if recipe_text:
        lines += ["## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def verification_lines(verification: dict | None) -> list[str]:
    if verification is None:
        return ["Not verified (merged with --no-verify)."]
    tolerance = verification["tolerance"]
    rows = [("merged vs adapter model", verification["merged_vs_adapter"]),
            ("adapter vs base (the adapter's effect)", verification["adapter_vs_base"])]
    if verification["merged_vs_4bit_adapter"]:
        rows.append(("merged vs 4-bit adapter model (what training saw)", verification["merged_vs_4bit_adapter"]))
    lines = [f"On {len(verification['prompts'])} fixed prompts ({verification['positions']} positions), "
             f"in {verification['dtype']}:", "", "| | max abs logit difference | greedy-token agreement |",
             "|---|---|---|"]
    lines += [f"| {name} | {c['max_abs_logit_diff']:.3g} | {c['greedy_agreement']:.1%} |" for name, c in rows]
    lines += ["", f"Tolerance: max abs logit difference ≤ {tolerance['max_abs_logit_diff']:.3g}, "
                  f"agreement ≥ {tolerance['greedy_agreement']:.0%}: "
                  f"{'passed' if verification['passed'] else 'FAILED'}."]
    return lines


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
