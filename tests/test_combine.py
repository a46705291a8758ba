"""peft combine: LoRA adapters of one base into one adapter that stock peft loads; linear (1, 0) is
the first adapter, cat (1, 1) is both at once; what cannot be combined is refused with the reason."""

import json

import pytest
import torch
from peft import LoHaConfig, LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from conftest import no_traceback, save_adapter
from peftcli.combine import parse_weights, run_combine
from peftcli.errors import UserError
from peftcli.models import locate

IDS = torch.tensor([[5, 17, 300, 42, 7, 999, 64, 128, 3, 250, 11, 600]])


def stock_logits(adapter_dirs: dict, active) -> torch.Tensor:
    """Logits of tiny GPT-2 with adapters loaded by stock peft; `active` a name or a list of names."""
    base = AutoModelForCausalLM.from_pretrained(locate("builtin:tiny-gpt2").path)
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    model.base_model.set_adapter(active)
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def adapter_of(run):
    return run / "adapter"


def test_linear_with_weights_one_and_zero_is_the_first_adapter(peft, task_runs, tmp_path):
    runs = [task_runs["contacts"], task_runs["count"]]
    result = peft("combine", *runs, "--weights", "1", "0", "--how", "linear", "-o", tmp_path / "c", "--verify")
    assert result.code == 0, result
    inputs = {"contacts": adapter_of(runs[0]), "count": adapter_of(runs[1])}
    combined = stock_logits({**inputs, "combined": tmp_path / "c"}, "combined")
    assert torch.allclose(combined, stock_logits(inputs, "contacts"), atol=1e-5)
    assert not torch.allclose(combined, stock_logits(inputs, "count"), atol=1e-2)
    record = json.loads((tmp_path / "c" / "combine.json").read_text())
    first, second = record["verification"]["combined_vs_inputs"]
    assert first["max_abs_logit_diff"] < 1e-5 and first["greedy_agreement"] == 1.0
    assert second["max_abs_logit_diff"] > 0.1 and record["rank"] == 4
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"c_attn", "c_fc"}  # the union of the inputs'
    assert "combined vs it: max |Δlogit|" in result.output and "(weight 1)" in result.output
    assert (tmp_path / "c" / "README.md").is_file() and (tmp_path / "c" / "tokenizer_config.json").is_file()


def test_cat_is_both_adapters_at_once(task_runs, tmp_path):
    inputs = {"contacts": adapter_of(task_runs["contacts"]), "count": adapter_of(task_runs["count"])}
    record, output = run_combine(list(inputs.values()), output=tmp_path / "cat", weights=[1.0, 1.0], how="cat")
    assert record["rank"] == 8 and record["verification"] is None
    combined = stock_logits({**inputs, "combined": output}, "combined")
    assert torch.allclose(combined, stock_logits(inputs, ["contacts", "count"]), atol=1e-5)


@pytest.mark.parametrize("how,extra,rank", [("svd", {"svd_rank": 2}, 2), ("ties", {"density": 0.3}, 4),
                                            ("dare_linear", {}, 4), ("dare_ties", {}, 4)])
def test_the_other_combinations_load_with_stock_peft(task_runs, tmp_path, how, extra, rank):
    inputs = {"contacts": adapter_of(task_runs["contacts"]), "count": adapter_of(task_runs["count"])}
    record, output = run_combine(list(inputs.values()), output=tmp_path / how, weights=[0.7, 0.3], how=how,
                                 verify=True, **extra)
    assert record["rank"] == rank and record["how"] == how
    assert record["density"] == (extra.get("density", 0.5) if how != "svd" else None)
    combined = stock_logits({**inputs, "combined": output}, "combined")
    base = stock_logits(inputs, "contacts")
    assert torch.isfinite(combined).all() and not torch.allclose(combined, base, atol=1e-3)
    assert record["verification"]["combined_vs_base"]["max_abs_logit_diff"] > 0


def test_rslora_adapters_combine_at_the_right_scale(tmp_path):
    """peft copies use_rslora from the first input but computes A and B for a scale of 1."""
    adapters = [save_adapter(tmp_path / f"rs{i}", "builtin:tiny-gpt2", LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                             target_modules=["c_attn"]), seed=i) for i in range(2)]
    record, output = run_combine(adapters, output=tmp_path / "c", weights=[1.0, 0.0], verify=True)
    assert record["verification"]["combined_vs_inputs"][0]["max_abs_logit_diff"] < 1e-5
    combined = stock_logits({"a": adapters[0], "b": adapters[1], "combined": output}, "combined")
    assert torch.allclose(combined, stock_logits({"a": adapters[0]}, "a"), atol=1e-5)


@pytest.fixture(scope="module")
def odd_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    return {
        "r8": save_adapter(root / "r8", "builtin:tiny-gpt2", LoraConfig(r=8, target_modules=["c_attn"])),
        "loha": save_adapter(root / "loha", "builtin:tiny-llama", LoHaConfig(r=4, target_modules=["q_proj"])),
        "llama": save_adapter(root / "llama", "builtin:tiny-llama", LoraConfig(r=4, target_modules=["q_proj"])),
        "dora": save_adapter(root / "dora", "builtin:tiny-gpt2", LoraConfig(r=4, target_modules=["c_attn"],
                                                                            use_dora=True)),
        "saved": save_adapter(root / "saved", "builtin:tiny-gpt2", LoraConfig(r=4, target_modules=["c_attn"],
                                                                              modules_to_save=["lm_head"])),
    }


@pytest.mark.parametrize("inputs,args,message", [
    (["contacts", "r8"], [], "'linear' adds the adapters' A and B matrices entry by entry, so it needs one rank"),
    (["contacts", "r8"], ["--how", "dare_ties"], "use --how cat (the rank becomes the sum) or --how svd"),
    (["llama", "loha"], [], "a loha adapter cannot be combined: peft's weighted combination"),
    (["contacts", "llama"], [], "the adapters belong to different base models"),
    (["contacts", "dora"], [], "would drop DoRA's per-layer magnitudes"),
    (["contacts", "saved"], [], "modules_to_save"),
    (["contacts"], [], "at least two adapters"),
    (["contacts", "count"], ["--weights", "1", "2", "3"], "3 weights for 2 adapters"),
    (["contacts", "count"], ["--density", "0.5"], "--density is for ties, dare_linear, dare_ties, not linear"),
    (["contacts", "count"], ["--how", "ties", "--density", "1.5"], "in (0, 1]"),
    (["contacts", "count"], ["--how", "mean"], "unknown combination 'mean'"),
    (["contacts", "count"], ["--svd-rank", "2"], "--svd-rank is for svd"),
])
def test_what_cannot_be_combined_is_refused_with_the_reason(peft, task_runs, odd_adapters, tmp_path, inputs,
                                                            args, message):
    paths = [task_runs.get(name) or odd_adapters[name] for name in inputs]
    result = peft("combine", *paths, *args, "-o", tmp_path / "out")
    assert result.code == 2 and message in result.output and no_traceback(result.output), result
    assert not (tmp_path / "out").exists()


def test_cat_and_svd_take_different_ranks(task_runs, odd_adapters, tmp_path):
    paths = [task_runs["contacts"], odd_adapters["r8"]]
    assert run_combine(paths, output=tmp_path / "cat", how="cat")[0]["rank"] == 12
    assert run_combine(paths, output=tmp_path / "svd", how="svd")[0]["rank"] == 8


def test_an_existing_output_is_never_replaced(peft, task_runs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = peft("combine", task_runs["contacts"], task_runs["count"], "-o", tmp_path / "out")
    assert result.code == 2 and "combine never replaces anything" in result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_weights_after_the_option_or_comma_separated():
    assert parse_weights(["a", "b", "0.5"], ["0.5"]) == (["a", "b"], [0.5, 0.5])
    assert parse_weights(["a", "b"], ["1,-0.5"]) == (["a", "b"], [1.0, -0.5])
    assert parse_weights(["a", "b"], []) == (["a", "b"], None)
    with pytest.raises(UserError, match="weights go after --weights"):
        parse_weights(["a", "b", "0.5"], [])
    with pytest.raises(UserError, match="--weights takes numbers"):
        parse_weights(["a", "b"], ["x,y"])
