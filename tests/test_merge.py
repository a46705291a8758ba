"""peft merge: every mergeable method folds into the weights exactly, the output is a stock
transformers model, verification is reported and enforced, and nothing is lost by surprise."""

import gc
import json
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from peft import (AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, PrefixTuningConfig,
                  PromptEncoderConfig, PromptTuningConfig, VeraConfig, get_peft_model)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import no_traceback, save_adapter, write_run
from peftcli import merge as merge_mod
from peftcli.adapters import find_adapter
from peftcli.merge import Tolerance, merge_adapter, run_merge, write_merged
from peftcli.models import four_bit_config, load_model, locate

TARGETS = {"builtin:tiny-gpt2": (["c_attn", "c_proj", "c_fc"], ["c_fc"]),
           "builtin:tiny-llama": (["q_proj", "v_proj", "o_proj", "down_proj"], ["down_proj"])}
CONFIGS = {
    "lora": lambda t, ff: LoraConfig(r=4, lora_alpha=8, target_modules=t),
    "dora": lambda t, ff: LoraConfig(r=4, lora_alpha=8, target_modules=t, use_dora=True),
    "rslora": lambda t, ff: LoraConfig(r=4, lora_alpha=8, target_modules=t, use_rslora=True),
    "ia3": lambda t, ff: IA3Config(target_modules=t, feedforward_modules=ff),
    "loha": lambda t, ff: LoHaConfig(r=4, alpha=8, target_modules=t),
    "lokr": lambda t, ff: LoKrConfig(r=4, alpha=8, target_modules=t),
    "adalora": lambda t, ff: AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=t),
    "vera": lambda t, ff: VeraConfig(r=8, target_modules=t),
}
# peft's LoHa and LoKr adapt Linear and Conv layers only, and GPT-2 uses transformers' Conv1D.
CASES = [("builtin:tiny-gpt2", m) for m in CONFIGS if m not in ("loha", "lokr")] + \
        [("builtin:tiny-llama", m) for m in CONFIGS]
IDS = torch.tensor([[5, 17, 300, 42, 7, 999, 64, 128, 3, 250, 11, 600]])


@pytest.fixture(scope="module")
def merged_case(tmp_path_factory):
    """(base, method) → (adapter dir, merged dir, merge record); each case built once, on demand."""
    root, done = tmp_path_factory.mktemp("methods"), {}

    def build(base, method):
        if (base, method) not in done:
            name = f"{base.removeprefix('builtin:')}-{method}"
            adapter = save_adapter(root / name, base, CONFIGS[method](*TARGETS[base]))
            merged, output = run_merge(adapter, output=root / f"{name}-merged")
            done[base, method] = adapter, output, merged.record
        return done[base, method]

    return build


def adapter_logits(base, adapter):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(locate(base).path), adapter).eval()
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(input_ids=IDS).logits
        return model(input_ids=IDS).logits, plain


@pytest.mark.parametrize("base,method", CASES, ids=[f"{b.removeprefix('builtin:')}-{m}" for b, m in CASES])
def test_each_method_merges_to_the_adapter_models_logits(merged_case, base, method):
    adapter, output, record = merged_case(base, method)
    expected, plain = adapter_logits(base, adapter)
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    with torch.no_grad():
        got = merged(input_ids=IDS).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter does change the model
    assert not any("lora" in name or "ia3" in name for name, _ in merged.named_parameters())
    check = record["verification"]
    assert check["passed"] and check["conclusive"]
    assert check["merged_vs_adapter"]["max_abs_logit_diff"] < 1e-4
    assert check["merged_vs_adapter"]["greedy_agreement"] == 1.0
    assert record["method"] == method and record["dtype"] == "float32"


LOAD_WITHOUT_PEFT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from safetensors.torch import save_file
dirs, ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
found = {}
for i, d in enumerate(dirs):
    AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        found[str(i)] = model(input_ids=ids).logits.contiguous()
assert "peft" not in sys.modules, "loading a merged model imported peft"
save_file(found, out)
"""


def test_merged_folders_load_with_stock_transformers_without_peft(merged_case, tmp_path):
    cases = [("builtin:tiny-gpt2", "lora"), ("builtin:tiny-gpt2", "ia3"), ("builtin:tiny-llama", "dora"),
             ("builtin:tiny-llama", "lokr")]
    folders = [(base, *merged_case(base, method)[:2]) for base, method in cases]
    base, adapter, _ = folders[0]
    sharded = tmp_path / "sharded"
    write_merged(merge_adapter(find_adapter(adapter), verify=False), sharded,
                 max_shard_size="300KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    folders.append((base, adapter, sharded))
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PEFT, json.dumps([str(f[2]) for f in folders]),
                           json.dumps(IDS.tolist()), str(tmp_path / "logits.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = load_file(tmp_path / "logits.safetensors")
    for i, (base, adapter, output) in enumerate(folders):
        assert torch.allclose(found[str(i)], adapter_logits(base, adapter)[0], atol=1e-4), output


def test_merging_a_run_writes_a_model_folder_with_card_and_report(peft, trained_run, tmp_path):
    _, _, run = trained_run
    out = tmp_path / "m"
    result = peft("merge", run.root, "--output", out)
    assert result.code == 0, result
    assert "merged vs adapter" in result.output and "passed" in result.output
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "merge.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(tmp_path.glob(".m.*")), "no pickles, no staging left"
    card = (out / "README.md").read_text()
    for named in ("builtin:tiny-gpt2", str(run.adapter), "lora", str(run.recipe), "target_modules:", "passed"):
        assert named in card, named
    record = json.loads((out / "merge.json").read_text())
    assert record["base"] == "builtin:tiny-gpt2" and record["run"] == str(run.root.resolve())
    assert record["method"] == "lora" and record["adapter_settings"]["r"] == 4
    check = record["verification"]
    assert check["positions"] > 50 and check["tolerance"]["max_abs_logit_diff"] >= 1e-4
    assert check["merged_vs_adapter"]["max_abs_logit_diff"] <= check["tolerance"]["max_abs_logit_diff"]
    assert check["adapter_vs_base"]["max_abs_logit_diff"] > 1e-3 and check["merged_vs_4bit_adapter"] is None
    assert record["time_s"]["merge_s"] >= 0 and record["memory"]["peak_bytes"] > 0


def test_default_outputs_sit_beside_the_adapter(peft, trained_run, tmp_path):
    run = shutil.copytree(trained_run[2].root, tmp_path / "run")
    assert peft("merge", run, "--no-verify").code == 0
    assert (run / "merged" / "config.json").is_file()
    assert json.loads((run / "merged" / "merge.json").read_text())["verification"] is None
    bare = shutil.copytree(run / "adapter", tmp_path / "my-adapter")
    result = peft("merge", bare, "--no-verify", "--base", "builtin:tiny-gpt2")
    assert result.code == 0, result
    assert (tmp_path / "my-adapter-merged" / "model.safetensors").is_file()


def test_an_existing_output_is_kept_unless_overwrite(peft, trained_run, tmp_path):
    run, out = trained_run[2].root, tmp_path / "m"
    assert peft("merge", run, "-o", out, "--no-verify").code == 0
    (out / "note.txt").write_text("mine")
    before = (out / "merge.json").read_text()
    refused = peft("merge", run, "-o", out)
    assert refused.code == 2 and "already holds files" in refused.output and "--overwrite" in refused.output
    assert (out / "merge.json").read_text() == before and (out / "note.txt").exists()
    replaced = peft("merge", run, "-o", out, "--overwrite")
    assert replaced.code == 0, replaced
    assert json.loads((out / "merge.json").read_text())["verification"]["passed"]
    assert not (out / "note.txt").exists() and not list(tmp_path.glob(".m.*"))


def test_overwrite_never_replaces_something_that_is_not_a_merged_model(peft, trained_run, tmp_path):
    run = trained_run[2].root
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("years of work")
    result = peft("merge", run, "-o", tmp_path / "docs", "--overwrite")
    assert result.code == 2 and "not a model" in result.output
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "years of work"
    for protected in (run, run / "adapter"):
        result = peft("merge", run, "-o", protected, "--overwrite")
        assert result.code == 2 and "would replace the adapter" in result.output
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_failed_verification_exits_1_and_writes_nothing(peft, trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(merge_mod.TOLERANCES, "float32", Tolerance(relative_logit_diff=0.0, min_agreement=1.0))
    result = peft("merge", trained_run[2].root, "-o", tmp_path / "m")
    assert result.code == 1
    assert "verification failed" in result.output and "max |Δlogit|" in result.output
    assert "nothing was written" in result.output and no_traceback(result.output)
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


def test_merging_in_bfloat16_uses_its_tolerance(tmp_path):
    adapter = save_adapter(tmp_path / "a", "builtin:tiny-llama", CONFIGS["lora"](*TARGETS["builtin:tiny-llama"]))
    merged, out = run_merge(adapter, output=tmp_path / "m", dtype="bfloat16")
    check = merged.record["verification"]
    assert merged.record["dtype"] == "bfloat16" and check["dtype"] == "bfloat16" and check["passed"]
    assert check["tolerance"]["max_abs_logit_diff"] == pytest.approx(0.1 * max(1.0, check["logit_scale"]))
    assert check["tolerance"]["greedy_agreement"] == 0.9
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_an_adapter_that_changes_nothing_is_flagged_inconclusive(peft, tmp_path):
    adapter = save_adapter(tmp_path / "fresh", "builtin:tiny-gpt2", LoraConfig(r=4, target_modules=["c_attn"]), noise=0)
    result = peft("merge", adapter)
    assert result.code == 0, result
    assert "cannot tell the merged model from the base" in result.output
    assert json.loads((tmp_path / "fresh-merged" / "merge.json").read_text())["verification"]["conclusive"] is False


@pytest.mark.parametrize("config,kind", [
    (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prompt_tuning"),
    (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prefix_tuning"),
    (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16), "p_tuning"),
])
def test_prompt_learning_adapters_are_refused_with_the_alternative(peft, tmp_path, config, kind):
    adapter = save_adapter(tmp_path / kind, "builtin:tiny-gpt2", config)
    result = peft("merge", adapter)
    assert result.code == 2, result
    assert f"a {kind} adapter cannot be merged" in result.output and "virtual tokens" in result.output
    assert "PeftModel.from_pretrained" in result.output and "peft generate" in result.output
    assert no_traceback(result.output) and not (tmp_path / f"{kind}-merged").exists()


def test_bottleneck_adapters_are_refused(peft, tmp_path):
    adapter = tmp_path / "bottleneck"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "ADAPTER", "base_model_name_or_path": "x"}))
    save_file({"down.weight": torch.zeros(2, 2)}, adapter / "adapter_model.safetensors")
    result = peft("merge", adapter)
    assert result.code == 2 and "bottleneck adapter" in result.output and "non-linearity" in result.output


def test_missing_or_corrupt_adapter_files_are_clear_errors(peft, trained_run, tmp_path):
    run = shutil.copytree(trained_run[2].root, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    truncated = peft("merge", run)
    assert truncated.code == 2 and "corrupt or truncated" in truncated.output and str(weights) in truncated.output
    weights.unlink()
    missing = peft("merge", run)
    assert missing.code == 2 and "weights are missing" in missing.output
    (run / "adapter" / "adapter_config.json").write_text("{not json")
    broken = peft("merge", run)
    assert broken.code == 2 and "not valid JSON" in broken.output
    for result in (truncated, missing, broken):
        assert no_traceback(result.output)
    assert not (run / "merged").exists()


def test_the_base_comes_from_the_adapter_config_or_base(peft, tmp_path):
    adapter = save_adapter(tmp_path / "a", "builtin:tiny-gpt2", LoraConfig(r=4, target_modules=["c_attn"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == locate("builtin:tiny-gpt2").path  # peft wrote the folder loaded
    assert peft("merge", adapter, "-o", tmp_path / "m1").code == 0
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    gone = peft("merge", adapter, "-o", tmp_path / "m2")
    assert gone.code == 2 and "cannot load the adapter's base model" in gone.output
    assert "base_model_name_or_path" in gone.output and "--base" in gone.output
    wrong = peft("merge", adapter, "-o", tmp_path / "m2", "--base", "builtin:tiny-llama")
    assert wrong.code == 2 and "does not fit the base model builtin:tiny-llama" in wrong.output
    assert no_traceback(gone.output + wrong.output)
    assert peft("merge", adapter, "-o", tmp_path / "m2", "--base", "builtin:tiny-gpt2").code == 0


def test_dequantize_needs_a_4bit_run(peft, trained_run):
    result = peft("merge", trained_run[2].root, "--dequantize")
    assert result.code == 2 and "not loaded in 4-bit" in result.output


def _bitsandbytes_4bit_on_cpu() -> bool:
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16), quant_type="nf4")
        return True
    except Exception:  # noqa: BLE001 - any failure means this build cannot do it
        return False


@pytest.mark.skipif(not _bitsandbytes_4bit_on_cpu(), reason="this bitsandbytes build has no 4-bit CPU kernels")
def test_a_qlora_run_merges_both_ways_and_reports_the_gap_to_the_4bit_model(tmp_path):
    base = "builtin:tiny-llama"
    torch.manual_seed(0)
    four_bit = load_model(base, dtype=torch.bfloat16, quantization_config=four_bit_config(torch.bfloat16),
                          device_map={"": "cpu"})
    model = get_peft_model(four_bit, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    run = write_run(tmp_path / "run", base=base, load_in_4bit=True)
    model.save_pretrained(run / "adapter")
    reloaded, _ = run_merge(run, output=tmp_path / "16bit")
    dequantized, _ = run_merge(run, output=tmp_path / "nf4", dequantize=True)
    gaps = {}
    for merged, into in ((reloaded, "the base reloaded in 16-bit"), (dequantized, "the dequantized 4-bit weights")):
        record = merged.record
        assert record["method"] == "qlora" and record["qlora"]["merged_into"] == into
        assert record["dtype"] == "bfloat16" and record["verification"]["passed"]
        gaps[into] = record["verification"]["merged_vs_4bit_adapter"]["max_abs_logit_diff"]
        assert 0 < gaps[into] < 1
    # Merging into the weights training actually saw stays closer to the 4-bit model.
    assert gaps["the dequantized 4-bit weights"] < gaps["the base reloaded in 16-bit"] / 3
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert "quantization_config" not in config


def _rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_merging_holds_one_model_not_two(tmp_path):
    """The pipeline (load, verify, merge, write) peaks near one model's size: it merges in place and
    computes the adapter model's logits before merging rather than keeping a second copy."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    shutil.copy(locate("builtin:tiny-llama").path + "/tokenizer.json", tmp_path / "base")
    shutil.copy(locate("builtin:tiny-llama").path + "/tokenizer_config.json", tmp_path / "base")
    model_mib = (tmp_path / "base" / "model.safetensors").stat().st_size / 2**20
    adapter = save_adapter(tmp_path / "adapter", str(tmp_path / "base"), LoraConfig(r=8, target_modules="all-linear"))
    gc.collect()
    peak, start, running = [0.0], _rss_mib(), [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        merged, _ = run_merge(adapter, output=tmp_path / "merged")
    finally:
        running[0] = False
        sampler.join()
    assert merged.record["verification"]["passed"]
    extra = peak[0] - start
    assert extra < 1.5 * model_mib, f"the merge peaked at {extra:.0f} MiB over start for a {model_mib:.0f} MiB model"
