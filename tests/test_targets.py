"""Target modules: presets per architecture, shorthands, names, regexes, and errors that list what exists."""

import pytest
from pydantic import TypeAdapter
from transformers import OPTConfig, Phi3Config, Qwen2Config

from conftest import no_traceback, tiny_recipe
from peftcli import methods
from peftcli.errors import UserError
from peftcli.models import build_empty, load_config
from peftcli.recipe import Method
from peftcli.methods.targets import wrapped_modules

LLAMA_ALL = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)


def skeleton(config):
    return build_empty(load_config(config) if isinstance(config, str) else config)


@pytest.fixture(scope="module")
def llama():
    return skeleton("builtin:tiny-llama")


@pytest.fixture(scope="module")
def gpt2():
    return skeleton("builtin:tiny-gpt2")


def wrapped(method: dict, model) -> list[str]:
    """What the adapter of this method section wraps in `model`, one name per block position."""
    config = methods.peft_config(TypeAdapter(Method).validate_python(method), model, steps=100)
    return wrapped_modules(config, model)


@pytest.mark.parametrize("method, expected", [
    ({"name": "lora"}, LLAMA_ALL),
    ({"name": "vera", "target_modules": "attention"}, LLAMA_ALL[:4]),
    ({"name": "loha", "target_modules": "mlp"}, LLAMA_ALL[4:]),
    ({"name": "lora", "target_modules": "all-linear"}, LLAMA_ALL),  # the output layer is left out
    ({"name": "ia3"}, ["self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"]),
    ({"name": "adapter"}, ["self_attn.o_proj", "mlp.down_proj"]),  # houlsby: after attention and feed-forward
    ({"name": "adapter", "variant": "parallel"}, ["mlp"]),  # beside the feed-forward block
    ({"name": "lora", "target_modules": ["q_proj", "v_proj"]}, ["self_attn.q_proj", "self_attn.v_proj"]),
    ({"name": "lora", "target_modules": r".*\.(q|v)_proj"}, ["self_attn.q_proj", "self_attn.v_proj"]),
    ({"name": "lora", "target_modules": r".*layers\.1\.mlp\.up_proj"}, ["mlp.up_proj"]),
])
def test_llama_presets_shorthands_names_and_regexes(llama, method, expected):
    assert wrapped(method, llama) == expected


def test_a_regex_matches_full_names_so_it_can_pick_one_layer():
    from peft import get_peft_model

    llama = skeleton("builtin:tiny-llama")  # its own: get_peft_model changes the model it wraps
    config = methods.peft_config(TypeAdapter(Method).validate_python(
        {"name": "lora", "target_modules": r".*layers\.1\.mlp\.up_proj"}), llama)
    model = get_peft_model(llama, config)
    adapted = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert adapted == ["base_model.model.model.layers.1.mlp.up_proj.lora_A"]


@pytest.mark.parametrize("method, expected", [
    ({"name": "lora"}, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    ({"name": "lora", "target_modules": "attention"}, ["attn.c_attn", "attn.c_proj"]),  # not the mlp's c_proj
    ({"name": "lora", "target_modules": ["c_proj"]}, ["attn.c_proj", "mlp.c_proj"]),  # a name matches every c_proj
    ({"name": "ia3"}, ["attn.c_attn", "mlp.c_proj"]),
    ({"name": "adapter"}, ["attn.c_proj", "mlp.c_proj"]),
])
def test_gpt2_presets_tell_its_two_c_proj_apart(gpt2, method, expected):
    assert wrapped(method, gpt2) == expected


def test_ia3_scales_the_input_of_the_feed_forward_output_layer(llama, gpt2):
    method = TypeAdapter(Method).validate_python({"name": "ia3"})
    assert methods.peft_config(method, llama).feedforward_modules == {"down_proj"}
    assert methods.peft_config(method, gpt2).feedforward_modules == {"mlp.c_proj"}
    bad = TypeAdapter(Method).validate_python({"name": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]})
    with pytest.raises(UserError, match=r"feedforward_modules \['down_proj'\] are not among the target modules"):
        methods.peft_config(bad, llama)


def test_phi3_presets_use_its_fused_projections():
    phi3 = skeleton(Phi3Config(**SMALL, num_key_value_heads=4, pad_token_id=0))
    assert wrapped({"name": "lora"}, phi3) == ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    assert wrapped({"name": "ia3"}, phi3) == ["self_attn.qkv_proj", "mlp.down_proj"]


def test_other_llama_like_architectures_share_the_preset():
    qwen2 = skeleton(Qwen2Config(**SMALL, num_key_value_heads=2))
    assert wrapped({"name": "dora", "target_modules": "attention"}, qwen2) == LLAMA_ALL[:4]


def test_an_architecture_without_a_preset(tmp_path):
    opt = skeleton(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=64, vocab_size=128))
    # auto falls back to every linear layer but the output layer
    assert wrapped({"name": "lora"}, opt) == ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                              "self_attn.out_proj", "fc1", "fc2"]
    for method in ({"name": "lora", "target_modules": "attention"}, {"name": "ia3"}):
        with pytest.raises(UserError) as err:
            wrapped(method, opt)
        assert "preset for model type 'opt'" in str(err.value) and "fc1, fc2" in str(err.value)


@pytest.mark.parametrize("targets, fragments", [
    (["q_proj", "nope"], ["target module(s) ['nope'] not in the model",
                          "linear modules of this model: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"]),
    (r"x\..*", ["the regex 'x\\..*' matches no module", "e.g. model.layers.0.self_attn.q_proj"]),
])
def test_unknown_targets_list_the_linear_modules_that_exist(llama, targets, fragments):
    with pytest.raises(UserError) as err:
        wrapped({"name": "lora", "target_modules": targets}, llama)
    assert err.value.where == "method.target_modules"
    for fragment in fragments:
        assert fragment in str(err.value)


def test_lycoris_methods_refuse_gpt2_conv1d_layers(gpt2):
    with pytest.raises(UserError) as err:
        wrapped({"name": "lokr", "target_modules": ["c_attn"]}, gpt2)
    assert "lokr cannot wrap c_attn, c_fc, c_proj (not nn.Linear)" in str(err.value)


def test_validate_prints_the_preset_resolved(peft, write_recipe):
    recipe = tiny_recipe(model={"base": "builtin:tiny-llama"})
    recipe["method"] = {"name": "ia3"}
    result = peft("validate", write_recipe(recipe))
    assert result.code == 0, result
    assert "self_attn.k_proj, self_attn.v_proj, mlp.down_proj" in result.output
    result = peft("validate", write_recipe(tiny_recipe(method={"target_modules": "mlp", "r": 4})), "--set",
                  "model.base=builtin:tiny-llama")
    assert "mlp.gate_proj, mlp.up_proj, mlp.down_proj" in result.output


def test_a_misspelt_shorthand_is_caught_by_the_schema(peft, write_recipe):
    result = peft("validate", write_recipe(tiny_recipe(method={"target_modules": "all_linear"})))
    assert result.code == 2 and no_traceback(result.output)
    assert "method.target_modules: 'all_linear' is not a shorthand" in result.output and "did you mean 'all-linear'?" in result.output
    result = peft("validate", write_recipe(tiny_recipe(method={"target_modules": "(q_proj"})))
    assert result.code == 2 and "'(q_proj' is not a valid regex" in result.output


def test_bottleneck_adapters_wrap_linear_layers_or_the_feed_forward_block(llama):
    assert wrapped({"name": "adapter", "target_modules": ["mlp"]}, llama) == ["mlp"]  # houlsby after the whole block
    with pytest.raises(UserError) as err:
        wrapped({"name": "adapter", "target_modules": ["self_attn"]}, llama)  # returns a tuple: not a place for one
    assert "target module(s) ['self_attn'] not in the model" in str(err.value)
    assert str(err.value).endswith("modules of this model: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head, mlp")
