"""Finding a trained adapter and its base: run directories, adapter directories, --base."""

import json
import shutil

import pytest
import yaml
from peft import LoraConfig

from conftest import save_adapter, write_run
from peftcli.adapters import find_adapter, is_adapter_path
from peftcli.errors import UserError
from peftcli.models import locate


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("a") / "adapter", "builtin:tiny-gpt2",
                        LoraConfig(r=4, target_modules=["c_attn"]))


def test_a_run_directory_finds_its_adapter_and_the_recipes_base(trained_run):
    _, _, run = trained_run
    for given in (run.root, run.adapter):  # the run, or the adapter inside it
        source = find_adapter(given)
        assert source.run_dir == run.root and source.adapter_dir == run.adapter
        assert source.base == "builtin:tiny-gpt2" and source.base_origin.endswith("recipe.yaml: model.base")
        assert source.method == "lora" and source.peft_type == "LORA" and not source.load_in_4bit
        assert "name: t" in source.recipe_text
    assert is_adapter_path(run.root) and is_adapter_path(run.adapter) and not is_adapter_path(run.checkpoints)


def test_a_run_whose_data_moved_still_finds_its_base(tmp_path, lora_adapter):
    run = write_run(tmp_path / "run", shutil.copytree(lora_adapter, tmp_path / "copy"), base="builtin:tiny-gpt2")
    raw = yaml.safe_load((run / "recipe.yaml").read_text())
    raw["data"] = {"train": "/no/longer/here.jsonl"}
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert find_adapter(run).base == "builtin:tiny-gpt2"


def test_an_adapter_directory_names_its_base_and_base_overrides_it(lora_adapter, tmp_path):
    source = find_adapter(lora_adapter)
    assert source.run_dir is None and source.base == locate("builtin:tiny-gpt2").path
    assert "base_model_name_or_path" in source.base_origin
    assert find_adapter(lora_adapter, base="builtin:tiny-llama").base == "builtin:tiny-llama"
    (tmp_path / "folder").mkdir()
    assert find_adapter(lora_adapter, base=str(tmp_path / "folder")).base == str((tmp_path / "folder").resolve())


@pytest.mark.parametrize("model,method,is_4bit", [
    ({"load_in_4bit": True}, {"name": "lora"}, True),
    ({}, {"name": "qlora", "quant_type": "fp4"}, True),
    ({}, {"name": "lora"}, False),
])
def test_a_qlora_run_is_recognised_from_its_recipe(tmp_path, lora_adapter, model, method, is_4bit):
    run = write_run(tmp_path / "run", shutil.copytree(lora_adapter, tmp_path / "copy"), base="builtin:tiny-gpt2")
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"base": "builtin:tiny-gpt2", **model}, "method": method}))
    source = find_adapter(run)
    assert source.load_in_4bit is is_4bit
    assert source.method == ("qlora" if is_4bit else "lora")
    assert source.quant_type == method.get("quant_type", "nf4")


def test_lora_variants_are_named_by_their_flags(tmp_path, lora_adapter):
    for flag, name in (("use_dora", "dora"), ("use_rslora", "rslora")):
        copy = shutil.copytree(lora_adapter, tmp_path / name)
        config = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**config, flag: True}))
        assert find_adapter(copy).method == name


def test_what_is_not_an_adapter_is_a_clear_error(tmp_path, lora_adapter):
    with pytest.raises(UserError, match="no such directory"):
        find_adapter(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run directory or an adapter directory"):
        find_adapter(tmp_path / "empty")
    copy = shutil.copytree(lora_adapter, tmp_path / "nobase")
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(UserError, match="does not name its base model") as err:
        find_adapter(copy)
    assert "--base" in str(err.value)
    assert find_adapter(copy, base="builtin:tiny-gpt2").base == "builtin:tiny-gpt2"
    run = write_run(tmp_path / "run", shutil.copytree(lora_adapter, tmp_path / "copy2"), base="builtin:tiny-gpt2")
    (run / "recipe.yaml").write_text("model: [unclosed")
    with pytest.raises(UserError, match="not readable YAML"):
        find_adapter(run)
