"""The input embedding table in CPU memory: the same rows, wherever the rest of the model goes."""

import pytest
import torch

from conftest import ROOT, gpu_estimate
from peftcli import cpu_embedding, methods, models
from peftcli.bench import PROJECTIONS
from peftcli.errors import UserError
from peftcli.recipe import validate_recipe


def lora_model(base: str, targets=PROJECTIONS):
    recipe = validate_recipe({"model": {"base": base}, "method": {"r": 4, "dropout": 0.0, "target_modules": targets}},
                             base_dir=ROOT)
    return methods.attach(models.load_model(base, dtype=torch.float32), recipe.method)


def test_an_offloaded_table_gives_the_same_logits_and_stays_on_the_cpu():
    model = lora_model("builtin:tiny-llama")
    ids = torch.tensor([[5, 17, 300, 2, 9]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    base = methods.base_model(model)
    table = base.get_input_embeddings().weight
    cpu_embedding.offload(base)
    moved = base.get_input_embeddings()
    assert isinstance(moved, cpu_embedding.CpuEmbedding) and torch.equal(moved.weight, table)
    assert not moved.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    base.to("meta")  # what the Trainer's model.to(device) does to every other weight
    assert moved.weight.device.type == "cpu" and base.lm_head.weight.device.type == "meta"


def test_only_a_frozen_untied_plain_table_is_offloadable():
    assert cpu_embedding.offloadable(methods.base_model(lora_model("builtin:tiny-llama"))) is not None
    assert cpu_embedding.offloadable(methods.base_model(lora_model("builtin:tiny-gpt2", ["c_attn"]))) is None  # tied
    training = methods.base_model(lora_model("builtin:tiny-llama"))
    training.get_input_embeddings().weight.requires_grad_(True)  # as full fine-tuning trains it
    assert cpu_embedding.offloadable(training) is None


def test_lean_on_a_gpu_counts_the_table_out_of_the_gpu_weights():
    lean = gpu_estimate("builtin:llama-8b-random", profile="lean")
    kept = gpu_estimate("builtin:llama-8b-random", profile="lean", offload_embeddings=False)
    assert lean.path.offload_embeddings and not kept.path.offload_embeddings
    assert kept.setups["adapter"].weights - lean.setups["adapter"].weights == 128256 * 4096 * 2  # bf16 table
    assert kept.setups["adapter_4bit"].weights - lean.setups["adapter_4bit"].weights == 128256 * 4096 * 2
    assert not gpu_estimate("builtin:llama-8b-random").path.offload_embeddings  # fast keeps it on the GPU
    tied = gpu_estimate("builtin:llama-1b-random", batch_size=1, seq_len=64, profile="lean")
    assert not tied.path.offload_embeddings


def test_asking_for_it_where_it_cannot_be_is_refused():
    from peftcli.train import build_plan

    recipe = validate_recipe({"model": {"base": "builtin:tiny-llama"}, "data": {"train": "builtin:contacts"},
                              "train": {"offload_embeddings": True, "max_steps": 1}}, base_dir=ROOT)
    with pytest.raises(UserError) as err:
        build_plan(recipe)  # a CPU run
    assert err.value.where == "train.offload_embeddings"
