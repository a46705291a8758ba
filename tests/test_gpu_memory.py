"""The memory estimate against a GPU, on `peft train`'s default (speed) path. Run on the device machine:

    python3 -m pytest -m gpu -s -q tests/test_gpu_memory.py -k "layer or 1b"    # about 3 minutes
    python3 -m pytest -m gpu -s -q tests/test_gpu_memory.py -k 8b               # about 3-4 minutes

Two checks, each ending with a printed table (estimate, measured, error):
- per decoder layer, the bytes autograd keeps on CUDA against the activation model, for what the CPU
  tests cannot run: varlen attention, liger kernels, CUDA's dropout, and offloaded checkpointing (small
  Llama shapes, prepared by speed.plan and speed.prepare exactly as peft train prepares a model);
- whole `peft train` runs of the Llama-3.2-1B and Llama-3.1-8B shapes with the defaults users get
  (packing, varlen attention, liger kernels, fused LoRA where dropout is 0, checkpointing as the
  profile and train.max_memory_gib decide), whose estimate in report.json must be within ±15% of
  torch.cuda.max_memory_allocated(); the estimate's parts are printed for each run.
"""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import ROOT, kept_for_backward, one_and_two_layer_llamas, write_jsonl
from peftcli import methods, models, params, speed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOLERANCE = 0.15  # whole runs
LAYER_TOLERANCE = 0.03  # per decoder layer


def free_gpu():
    gc.collect()
    torch.cuda.empty_cache()


def print_table(title: str, rows: list[dict]) -> None:
    """The rows as a Markdown table (the README's format), under `title`."""
    if not rows:
        return
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    print(f"\n\n{title}\n" + "\n".join(lines))


def error_of(estimate: float, measured: float) -> float:
    return (estimate - measured) / measured if measured else float("inf")


# ---------------------------------------------------------------------------------------
# Per decoder layer: a 2-layer model's kept bytes minus a 1-layer model's


LAYER_CASES = {  # recipe sections of the small model's run
    "fast: varlen, liger, fused LoRA": {"method": {"dropout": 0.0}},
    "fast: varlen, liger, peft LoRA with dropout": {"method": {"dropout": 0.05}},
    "fast: 4-bit base, varlen, liger": {"method": {"dropout": 0.0}, "model": {"load_in_4bit": True}},
    "lean: every layer checkpointed, inputs offloaded": {"method": {"dropout": 0.0}, "train": {"profile": "lean"}},
}
SMALL = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2, vocab_size=4096)
ROW_LENGTHS = [300, 140, 512, 60]  # one packed batch of 1,012 tokens


@pytest.fixture(scope="module")
def small_folders(tmp_path_factory):
    return one_and_two_layer_llamas(tmp_path_factory.mktemp("small"), **SMALL)


@pytest.fixture(scope="module")
def layer_table():
    rows = []
    yield rows
    print_table("Per decoder layer: bytes autograd keeps on CUDA vs the activation model", rows)


def kept_by_a_small_run(folder: Path, sections: dict) -> tuple[int, params.Estimate]:
    """Bytes autograd keeps for one forward of the small model on one packed batch, prepared as peft train
    prepares it, and the run's estimate. (The bf16 adapter copies peft's forward keeps are per layer; the
    estimate counts them with the head, so the difference of two models has them on both sides.)"""
    from datasets import Dataset

    from peftcli.recipe import validate_recipe

    recipe = validate_recipe({
        "model": {"base": str(folder), **sections.get("model", {})},
        "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear", **sections["method"]},
        "train": {"batch_size": 4, "max_tokens_per_batch": sum(ROW_LENGTHS), **sections.get("train", {})},
    }, base_dir=ROOT)
    model = models.load_model(str(folder), dtype=torch.bfloat16, **methods.loading_options(recipe, torch.bfloat16))
    model = methods.attach(model if params.is_4bit(recipe) else model.cuda(), recipe.method).train()
    rng = random.Random(0)
    rows = [[rng.randrange(SMALL["vocab_size"]) for _ in range(n)] for n in ROW_LENGTHS]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    plan = speed.plan(recipe, model, data, "cuda")
    _, collator = speed.prepare(plan, model, data, pad_collator=None)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collator([{"pack": plan.batches[0]}]).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        kept, _ = kept_for_backward(lambda: model(**batch).loss, exclude=list(model.parameters()))
    del model
    free_gpu()
    return kept, plan.memory


@pytest.mark.parametrize("case", LAYER_CASES)
def test_a_decoder_layer_keeps_what_the_estimate_says(case, small_folders, layer_table):
    (kept_one, one), (kept_two, two) = (kept_by_a_small_run(small_folders[n], LAYER_CASES[case]) for n in (1, 2))
    assert two.step.tokens == sum(ROW_LENGTHS) and two.path.attention == "varlen"
    model_one, model_two = (m.setups[m.selected].memory for m in (one, two))
    measured = kept_two - kept_one
    expected = model_two.kept(two.checkpointed) - model_one.kept(one.checkpointed)
    layer = model_two.per_layer  # errors as a share of one layer's activations (a checkpointed one keeps ~0)
    error = (expected - measured) / layer
    layer_table.append({"case": case, "checkpointed": f"{two.checkpointed}/2", "estimate B": f"{expected:,}",
                        "measured B": f"{measured:,}", "error (of a layer's activations)": f"{error:+.2%}"})
    assert abs(error) <= LAYER_TOLERANCE, layer_table[-1]


# ---------------------------------------------------------------------------------------
# Whole training runs: the estimate in report.json against the measured peak


BATCH, SEQ, STEPS = 4, 1024, 3
RUN_CASES = {  # case: model, method section, model section, train section, every row at full length
    "1b-lora": ("llama-1b-random", {}, {}, {}, False),  # the defaults: dropout 0.05, so peft's LoRA layers
    "1b-lora-fused": ("llama-1b-random", {"dropout": 0.0}, {}, {}, False),
    "1b-qlora": ("llama-1b-random", {"name": "qlora", "dropout": 0.0}, {}, {}, False),
    "1b-lora-lean": ("llama-1b-random", {"dropout": 0.0}, {}, {"profile": "lean"}, True),
    "1b-lora-sdpa-padded": ("llama-1b-random", {"dropout": 0.0}, {"attn_implementation": "sdpa"},
                            {"packing": False}, False),
    "8b-lora-fused": ("llama-8b-random", {"dropout": 0.0}, {}, {}, False),
    "8b-lora-budget": ("llama-8b-random", {"dropout": 0.0}, {}, {"max_memory_gib": "midway"}, True),
    "8b-qlora": ("llama-8b-random", {"name": "qlora", "dropout": 0.0}, {}, {}, False),
}


def text_rows(path: Path, full_length: bool) -> Path:
    """Text rows of varied length (a few truncated at SEQ tokens), or all truncated at SEQ."""
    words = (ROOT / "peftcli" / "assets" / "corpus.txt").read_text().split()
    rng = random.Random(0)
    counts = [2 * SEQ if full_length else rng.randint(SEQ // 16, SEQ // 2) for _ in range(4 * BATCH * STEPS)]
    return write_jsonl(path, [{"text": " ".join(rng.choices(words, k=n))} for n in counts])


@pytest.fixture(scope="module")
def run_table():
    rows = []
    yield rows
    print_table("peft train's estimate (report.json) vs torch.cuda.max_memory_allocated()", rows)


def run_recipe(case: str, tmp_path: Path):
    from peftcli.recipe import validate_recipe

    model, method, model_section, train, full_length = RUN_CASES[case]
    train = dict(train)
    if train.get("max_memory_gib") == "midway":
        train["max_memory_gib"] = midway_budget(model, method)
    return validate_recipe({
        "name": "memory", "model": {"base": f"builtin:{model}", **model_section},
        "method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear", **method},
        "data": {"train": str(text_rows(tmp_path / "rows.jsonl", full_length)), "format": "text", "max_length": SEQ},
        "train": {"max_steps": STEPS, "batch_size": BATCH, "logging_steps": 1, **train},
        "output_dir": str(tmp_path / "run"),
    }, base_dir=ROOT)


def midway_budget(model: str, method: dict) -> float:
    """A memory budget halfway between count-params' estimates with no layer and every layer checkpointed,
    at BATCH full rows of SEQ tokens: the fast profile must then checkpoint some layers and not all."""
    from peftcli.recipe import validate_recipe

    recipe = validate_recipe({"model": {"base": f"builtin:{model}"}, "method": {
        "name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear", **method}}, base_dir=ROOT)
    memory = speed.estimate_on_a_gpu(recipe, params.build_skeleton(recipe), batch_size=BATCH, seq_len=SEQ)
    return round((memory.peak(0) + memory.peak(memory.layers)) / 2 / 2**30, 2)


@pytest.mark.parametrize("case", RUN_CASES)
def test_the_estimate_is_within_15_percent_of_the_measured_peak(case, tmp_path, run_table):
    from rich.console import Console

    from peftcli.rundir import RunDir
    from peftcli.train import build_plan, run_training

    free_gpu()
    recipe = run_recipe(case, tmp_path)
    plan = build_plan(recipe)
    layers = plan.speed.layers
    report = run_training(plan, RunDir(Path(recipe.output_dir)), resume=False, console=Console(quiet=True))
    del plan
    free_gpu()
    estimate, measured = report["memory"]["estimate"], report["memory"]["peak_bytes"]
    error = error_of(estimate["bytes"], measured)
    s = estimate["speed"]
    run_table.append({
        "case": case, "tokens/step": f"{estimate['tokens']:,}" + (" packed" if s["packing"] else f" ({estimate['rows']} rows)"),
        "attention": s["attention"], "liger": s["liger_kernels"], "fused LoRA": s["fused_lora"],
        "checkpointed": f"{estimate['checkpointed_layers']}/{layers}" + (" offloaded" if s["offload_activations"] else ""),
        "estimate GiB": round(estimate["bytes"] / 2**30, 2), "measured GiB": round(measured / 2**30, 2),
        "error": f"{error:+.1%}"})
    print(f"\n{case}: " + json.dumps({"estimate": estimate, "measured_bytes": measured}))
    if case == "8b-lora-budget":
        assert 0 < estimate["checkpointed_layers"] < layers, estimate
    assert abs(error) <= TOLERANCE, run_table[-1]
