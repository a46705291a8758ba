"""QLoRA on a CUDA GPU: a Llama-3.2-1B-shaped model trains in 4-bit (default and LoftQ init), its
adapter reloads onto a 4-bit base with the same logits, its peak memory is below bf16 LoRA's on the
same model and batch, and the other methods allowed on a 4-bit base train there.

    python3 -m pytest -m gpu -q -s tests/test_gpu_qlora.py                      # 1B shape
    PEFTCLI_GPU_8B=1 python3 -m pytest -m gpu -q -s tests/test_gpu_qlora.py     # also the 8B shape (16 GB built once)

Each peak is printed as a `PEAK ...` line and, when $OUT is set, appended to $OUT/qlora-peaks.jsonl.
"""

import gc
import json
import math
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import write_jsonl
from peftcli import methods, models, speed
from peftcli.recipe import validate_recipe
from peftcli.rundir import RunDir
from peftcli.train import build_plan, run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROWS = ["Maria is 34 and lives in Lisbon.", "Tom, 51, moved to Oslo last spring.",
        "Aiko lives in Kyoto; she turned 27 in May.", "Pedro is 45 years old and works in Porto."]


def train(root: Path, base: str, method: dict, *, steps: int, rows=ROWS, batch_size: int = 4, max_length: int = 64,
          load_in_4bit: bool = False, **settings):
    """One run through the real pipeline; returns (plan, report, run directory)."""
    data = write_jsonl(root / "rows.jsonl", [{"text": row} for row in rows])
    recipe = validate_recipe({
        "model": {"base": base, **({"load_in_4bit": True} if load_in_4bit else {})}, "method": method, "data": {"train": str(data), "format": "text", "max_length": max_length},
        "train": {"max_steps": steps, "batch_size": batch_size, "logging_steps": 1, "warmup_ratio": 0, **settings},
        "output_dir": str(root / "run")}, base_dir=root)
    plan = build_plan(recipe)
    report = run_training(plan, RunDir(Path(recipe.output_dir)), resume=False, console=Console(quiet=True))
    return plan, report, RunDir(Path(recipe.output_dir))


SHAPES = {"1b": "builtin:llama-1b-random", "8b": "builtin:llama-8b-random"}


@pytest.mark.parametrize("size", list(SHAPES))
def test_qlora_peak_memory_is_below_bf16_lora(size, tmp_path):
    if size == "8b" and os.environ.get("PEFTCLI_GPU_8B") != "1":
        pytest.skip("set PEFTCLI_GPU_8B=1 to build (16 GB, once) and measure the 8B shape")
    peaks = {name: peak_training_memory(tmp_path / name, SHAPES[size], name) for name in ("lora", "qlora")}
    gib = {name: round(peak / 2**30, 2) for name, peak in peaks.items()}
    line = {"model": SHAPES[size], "batch_size": 4, "tokens_per_example": 128, "r": 16, "peak_gib": gib,
            "gpu": torch.cuda.get_device_name()}
    print(f"\nPEAK {json.dumps(line)}")
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "qlora-peaks.jsonl", "a") as out:
            out.write(json.dumps(line) + "\n")
    assert peaks["qlora"] < peaks["lora"], gib


def peak_training_memory(root: Path, base: str, method: str) -> int:
    """Peak CUDA memory of 3 training steps (weights, adapter, optimizer state and activations)."""
    root.mkdir()
    release_memory()  # nothing of an earlier test may count
    long_rows = [" ".join(ROWS[i:] + ROWS[:i]) * 4 for i in range(len(ROWS))]  # each fills max_length
    plan, report, _ = train(root, base, {"name": method, "r": 16, "alpha": 32}, steps=3, rows=long_rows,
                            max_length=128, lr=1e-4)
    assert report["memory"]["measure"] == "cuda_max_memory_allocated"
    del plan
    release_memory()
    return report["memory"]["peak_bytes"]


@pytest.fixture(scope="module", params=["default", "loftq"])
def qlora_run(request, tmp_path_factory):
    method = {"name": "qlora", "r": 16, "alpha": 32, "init": request.param}
    plan, report, run = train(tmp_path_factory.mktemp(f"qlora-{request.param}"), "builtin:llama-1b-random", method,
                              steps=20, lr=1e-3, lr_scheduler="constant", optim="paged_adamw_8bit")
    yield plan, report, run
    del plan
    release_memory()


def test_qlora_trains_a_4bit_llama_and_the_loss_falls(qlora_run):
    plan, report, _ = qlora_run
    linear = plan.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(linear).__name__ == "Linear4bit" and linear.weight.quant_type == "nf4"
    losses = [entry["loss"] for entry in report["training"]["loss_history"]]
    assert len(losses) == 20 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_the_qlora_adapter_reloads_onto_a_4bit_base_with_the_same_logits(qlora_run):
    plan, _, run = qlora_run
    ids = torch.tensor([plan.train_data[0]["input_ids"]], device="cuda")
    recipe = plan.recipe
    base = models.load_model(recipe.model.base, dtype=plan.dtype, **methods.loading_options(recipe, plan.dtype))
    # Compare like with like: training prepared the 4-bit base (methods.prepare_4bit_base), ran the speed
    # plan's kernels, and the Trainer's mixed precision may have left an autocast on the forward.
    base = methods.prepare_4bit_base(base)
    reloaded = methods.load_adapter(base, run.adapter).eval()
    speed.prepare(plan.speed, reloaded, plan.train_data, None)  # the kernels training ran: fused LoRA, liger, varlen
    plan.model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=plan.dtype):
        trained = plan.model(input_ids=ids).logits.float()
        logits = reloaded(input_ids=ids).logits.float()
        with reloaded.disable_adapter():
            untouched = reloaded(input_ids=ids).logits.float()
    diff = (logits - trained).abs().max().item()
    print(f"\nRELOAD {plan.recipe.method.init}: max |reloaded - trained| = {diff:.2e}, "
          f"adapter effect {(trained - untouched).abs().max().item():.2e}")
    assert diff <= 1e-3  # the same 4-bit weights, adapter and kernels: identical up to float noise
    assert not torch.allclose(logits, untouched, atol=1e-2)  # the adapter is in there
    del reloaded, base
    release_memory()


def release_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


@pytest.mark.parametrize("method", [{"name": "ia3"}, {"name": "adalora"}, {"name": "prompt"}, {"name": "adapter"},
                                    {"name": "adapter", "variant": "parallel"}],
                         ids=lambda method: "-".join(method.values()))
def test_other_methods_train_on_a_4bit_base(method, tmp_path):
    """The methods the schema lets onto a 4-bit base besides LoRA's family train there too."""
    plan, report, _ = train(tmp_path, "builtin:llama-1b-random", method, steps=5, load_in_4bit=True, lr=1e-3)
    assert plan.model.get_base_model().is_loaded_in_4bit
    losses = [entry["loss"] for entry in report["training"]["loss_history"]]
    assert len(losses) == 5 and all(math.isfinite(loss) for loss in losses)
    del plan
    release_memory()
