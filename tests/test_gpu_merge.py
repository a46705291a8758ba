"""Merging on the GPU: a QLoRA adapter merged both ways (16-bit base, dequantized NF4) with both
gaps to the 4-bit model measured, and the time and peak memory of an 8B merge in bf16.

Run on the device machine (see ../shared/gpu/GUIDE.md):
    python3 -m pytest -m gpu -q -s tests/test_gpu_merge.py
Each test prints one line starting with QLORA-MERGE or MERGE-8B: a JSON record of the numbers."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_run
from peftcli import models
from peftcli.adapters import find_adapter, load_tokenizer
from peftcli.bench import PROJECTIONS
from peftcli.merge import TOLERANCES, logits, merge_adapter, write_merged

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def random_lora_run(root, base: str, *, r: int = 16, b_std: float = 0.01, seed: int = 0, **model_section):
    """A run directory holding a LoRA on all 7 projections of `base`, with random weights of a
    trained adapter's size (A as peft initialises it, B small instead of zero). Built from the
    meta-device skeleton: no weight of the base is loaded to make it."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    skeleton = get_peft_model(models.build_empty(models.load_config(base)), config)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, meta in get_peft_model_state_dict(skeleton).items():
        if "lora_A" in key:
            bound = 1 / math.sqrt(meta.shape[1])
            weights[key] = (torch.rand(meta.shape, generator=generator) * 2 - 1) * bound
        else:
            weights[key] = torch.randn(meta.shape, generator=generator) * b_std
    run = write_run(root, base=base, **model_section)
    config.base_model_name_or_path = base
    config.save_pretrained(run / "adapter")
    save_file(weights, run / "adapter" / "adapter_model.safetensors")
    models.load_tokenizer(base).save_pretrained(run / "adapter")
    return run


def summary(record: dict) -> dict:
    check = record["verification"]
    return {"dtype": record["dtype"], "qlora": record["qlora"], "time_s": record["time_s"],
            "peak_gib": record["memory"]["peak_gib"], "tolerance": check["tolerance"],
            "merged_vs_adapter": check["merged_vs_adapter"], "adapter_vs_base": check["adapter_vs_base"],
            "merged_vs_4bit_adapter": check["merged_vs_4bit_adapter"], "passed": check["passed"]}


def test_a_qlora_adapter_merges_both_ways_and_both_gaps_are_measured(tmp_path):
    run = random_lora_run(tmp_path / "run", "builtin:llama-1b-random", load_in_4bit=True)
    source = find_adapter(run)
    records = {}
    for way, dequantize in (("16-bit base", False), ("dequantized NF4", True)):
        merged = merge_adapter(source, device="cuda", dequantize=dequantize)
        records[way] = summary(merged.record)
        if dequantize:  # the folder written holds exactly the model verified
            write_merged(merged, tmp_path / "merged")
            expected = logits(merged.model, [load_tokenizer(source)("a test", return_tensors="pt").input_ids])
        del merged
        torch.cuda.empty_cache()
    print("QLORA-MERGE", json.dumps(records))
    gaps = {way: r["merged_vs_4bit_adapter"]["max_abs_logit_diff"] for way, r in records.items()}
    for way, record in records.items():
        assert record["dtype"] == "bfloat16" and math.isfinite(gaps[way]), way
        check = record["merged_vs_adapter"]
        assert check["max_abs_logit_diff"] <= record["tolerance"]["max_abs_logit_diff"], way
    assert gaps["dequantized NF4"] < gaps["16-bit base"]  # the weights training saw are the closer start
    reloaded = models.load_model(str(tmp_path / "merged"), dtype=torch.bfloat16, device_map={"": "cuda"})
    got = logits(reloaded, [load_tokenizer(source)("a test", return_tensors="pt").input_ids])
    # Saved in bf16: the fp32 norms of the merged model round once, so bf16's own resolution at these
    # logits (about 2) is the tolerance, not an exact match.
    assert torch.allclose(got[0], expected[0], atol=5e-2)


def test_an_8b_merge_in_bf16_time_and_peak_memory(tmp_path):
    base = "builtin:llama-8b-random"
    models.locate(base)  # built (on the GPU) and saved before the clock starts
    run = random_lora_run(tmp_path / "run", base)
    merged = merge_adapter(find_adapter(run), device="cuda")
    write_merged(merged, tmp_path / "merged")
    record = merged.record
    print("MERGE-8B", json.dumps(summary(record)))
    assert record["dtype"] == "bfloat16"
    assert record["memory"]["peak_gib"] < 20  # 8.03B bf16 weights are 14.96 GiB: one model, not two
    check = record["verification"]
    assert check["merged_vs_adapter"]["max_abs_logit_diff"] <= check["tolerance"]["max_abs_logit_diff"]
    assert check["tolerance"]["greedy_agreement"] == TOLERANCES["bfloat16"].min_agreement
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) >= 3  # 5 GB shards
    shutil.rmtree(tmp_path / "merged")
