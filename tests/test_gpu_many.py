"""Many adapters, mixed methods and full fine-tuning on the GPU (run on the device machine:
`python3 -m pytest -m gpu -q -s tests/test_gpu_many.py`).

- full fine-tuning of the Llama-3.2-1B shape in bf16: it trains every parameter, and the
  memory estimate (count-params' full setup) is within 15% of the measured peak (FULL-1B line);
- a mixed recipe (LoRA + LoHa + DoRA) trains in bf16 and its saved parts reload to its logits;
- adapters swapped on one base on the GPU give each adapter's own logits;
- combining on the GPU: linear (1, 0) is the first adapter, svd runs there (cuSOLVER)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, save_adapter, write_jsonl
from test_gpu_memory import BATCH, SEQ, STEPS, TOLERANCE, text_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

IDS = torch.tensor([[5, 17, 300, 42, 7, 999, 64, 128, 3, 250, 11, 600]])


def free_gpu():
    gc.collect()
    torch.cuda.empty_cache()


def train(recipe: dict):
    from rich.console import Console

    from peftcli.recipe import validate_recipe
    from peftcli.rundir import RunDir
    from peftcli.train import build_plan, run_training

    resolved = validate_recipe(recipe, base_dir=ROOT)
    plan = build_plan(resolved)
    report = run_training(plan, RunDir(Path(resolved.output_dir)), resume=False, console=Console(quiet=True))
    return plan, report


def test_full_fine_tuning_of_the_1b_shape_and_its_memory_estimate(tmp_path):
    free_gpu()
    plan, report = train({
        "name": "full-1b", "model": {"base": "builtin:llama-1b-random"}, "method": {"name": "full"},
        "data": {"train": str(text_rows(tmp_path / "rows.jsonl", full_length=True)), "format": "text",
                 "max_length": SEQ},
        "train": {"max_steps": STEPS, "batch_size": BATCH, "logging_steps": 1, "gradient_checkpointing": False},
        "output_dir": str(tmp_path / "run")})
    del plan
    free_gpu()
    memory, params = report["memory"], report["params"]
    estimate, measured = memory["estimate"]["bytes"], memory["peak_bytes"]
    error = (estimate - measured) / measured
    row = {"model": "llama-1b-random", "setup": "full", "batch": BATCH, "seq": SEQ,
           "trainable": params["trainable"], "tokens_per_s": round(report["training"]["tokens_per_s"]),
           "estimate_gib": round(estimate / 2**30, 2), "measured_gib": round(measured / 2**30, 2),
           "error": f"{error:+.1%}", "parts": memory["estimate"]["parts"], "speed": report.get("speed")}
    print("\nFULL-1B " + json.dumps(row))
    assert params["trainable"] == params["total"] and report["model"]["dtype"] == "bfloat16"
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert memory["estimate"]["setup"] == "full"
    assert abs(error) <= TOLERANCE, row


def test_a_mixed_recipe_trains_in_bf16_and_reloads(tmp_path):
    from peftcli import methods
    from peftcli.models import load_model

    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"Item {i}: the answer is {i * 7 % 11}."} for i in range(32)])
    plan, report = train({
        "name": "mixed", "model": {"base": "builtin:tiny-llama"},
        "method": [{"name": "lora", "r": 4, "target_modules": "attention"},
                   {"name": "loha", "r": 4, "alpha": 8, "target_modules": "mlp"},
                   {"name": "dora", "r": 2, "target_modules": ["q_proj"]}],
        "data": {"train": str(rows), "format": "text", "max_length": 64},
        "train": {"max_steps": 12, "batch_size": 8, "lr": 1e-2, "logging_steps": 1},
        "output_dir": str(tmp_path / "run")})
    losses = [e["loss"] for e in report["training"]["loss_history"]]
    assert losses[-1] < losses[0], losses
    plan.model.eval()
    ids = IDS.cuda()
    with torch.no_grad():
        trained = plan.model(input_ids=ids).logits.float()
    reloaded = methods.load_adapter(load_model("builtin:tiny-llama", dtype=torch.bfloat16, device_map={"": 0}),
                                    tmp_path / "run" / "adapter", is_trainable=False)
    with torch.no_grad():
        again = reloaded.eval()(input_ids=ids).logits.float()
    print(f"\nMIXED-BF16 max |Δlogit| reloaded vs trained {(again - trained).abs().max().item():.3g}, "
          f"loss {losses[0]:.3f} → {losses[-1]:.3f}")
    assert torch.allclose(again, trained, atol=0.05, rtol=0.02)


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("two")
    return {name: save_adapter(root / name, "builtin:tiny-llama",
                               LoraConfig(r=4, lora_alpha=8, target_modules=targets), noise=0.05, seed=seed)
            for seed, (name, targets) in enumerate([("a", ["q_proj", "v_proj"]), ("b", ["q_proj", "down_proj"])])}


def test_swapping_adapters_on_the_gpu_gives_each_ones_logits(two_adapters):
    from peftcli.generate import load_for_inference, load_with_adapters
    from peftcli.merge import logits

    both = load_with_adapters("builtin:tiny-llama", {n: str(p) for n, p in two_adapters.items()}, dtype="float32",
                              device="cuda")
    assert next(both.model.parameters()).is_cuda
    for name, path in two_adapters.items():
        both.use(name)
        alone = load_for_inference(str(path), dtype="float32", device="cuda")
        assert torch.allclose(logits(both.model, [IDS])[0], logits(alone.model, [IDS])[0], atol=1e-4), name


def test_combining_on_the_gpu(two_adapters, tmp_path):
    from peft import PeftModel

    from peftcli.combine import run_combine
    from peftcli.models import load_model

    record, output = run_combine(list(two_adapters.values()), output=tmp_path / "first", weights=[1.0, 0.0],
                                 device="cuda", verify=True)
    assert record["verification"]["combined_vs_inputs"][0]["max_abs_logit_diff"] < 1e-4
    record, output = run_combine(list(two_adapters.values()), output=tmp_path / "svd", weights=[0.5, 0.5],
                                 how="svd", svd_rank=4, device="cuda", verify=True)
    model = PeftModel.from_pretrained(load_model("builtin:tiny-llama", dtype=torch.float32), str(output))
    assert torch.isfinite(model(input_ids=IDS).logits).all() and record["rank"] == 4
