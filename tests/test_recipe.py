"""The recipe schema: defaults, overrides, path resolution and errors that name the field."""

from pathlib import Path

import pytest
import yaml

from conftest import ROOT, no_traceback, tiny_recipe
from peftcli.errors import UserError
from peftcli.recipe import Recipe, apply_override, load_recipe


def test_an_empty_recipe_is_all_defaults(write_recipe):
    recipe = load_recipe(write_recipe(""))
    assert recipe == Recipe()
    assert recipe.output_dir == "runs/run"
    assert recipe.method.name == "lora" and recipe.method.r == 8


def test_the_bundled_tiny_recipe_resolves_its_data_against_its_folder():
    recipe = load_recipe(ROOT / "recipes" / "tiny-gpt2-lora.yaml")
    assert recipe.data.train == str(ROOT / "recipes" / "data" / "tiny.jsonl")
    assert recipe.output_dir == "runs/tiny-gpt2-lora"


def test_yaml_floats_without_a_dot_are_numbers(write_recipe):
    recipe = load_recipe(write_recipe("train:\n  lr: 1e-4\n"))
    assert recipe.train.lr == pytest.approx(1e-4)


def test_set_overrides_parse_with_the_field_type(write_recipe):
    recipe = load_recipe(write_recipe(tiny_recipe()), ["train.lr=5e-5", "method.r=16",
                                                       "method.target_modules=[c_attn, c_proj]", "name=other"])
    assert recipe.train.lr == pytest.approx(5e-5)
    assert recipe.method.r == 16
    assert recipe.method.target_modules == ["c_attn", "c_proj"]
    assert recipe.output_dir == "runs/other"


def test_set_max_steps_replaces_the_files_epochs(write_recipe):
    recipe = load_recipe(write_recipe("train:\n  epochs: 3\n"), ["train.max_steps=5"])
    assert (recipe.train.max_steps, recipe.train.epochs) == (5, None)
    recipe = load_recipe(write_recipe("train:\n  max_steps: 3\n"), ["train.epochs=2"])
    assert (recipe.train.max_steps, recipe.train.epochs) == (None, 2)


def test_set_creates_missing_sections():
    raw = {}
    apply_override(raw, "train.seed=7")
    assert raw == {"train": {"seed": 7}}


@pytest.mark.parametrize("override, fragment", [
    ("method.r=0", "--set method.r=0: method.r: input should be greater than 0"),
    ("train.lrr=1", "unknown key 'lrr'; did you mean 'lr'?"),
    ("method.r", "--set takes KEY=VALUE"),
    ("name.x=1", "'name' is a value, not a section"),
    ("train.eval_steps=5", "--set train.eval_steps=5: train.eval_steps: evaluating every N steps needs evaluation data"),
])
def test_bad_overrides_name_the_override(write_recipe, override, fragment):
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(tiny_recipe()), [override])
    assert fragment in str(err.value)


@pytest.mark.parametrize("text, fragments", [
    ("method:\n  name: lora\n  rr: 8\n", ["recipe.yaml:3", "method.rr", "unknown key 'rr'; did you mean 'r'?"]),
    ("data:\n  trian: x\n", ["recipe.yaml:2", "data.trian", "did you mean 'train'?"]),
    ("modle:\n  base: x\n", ["recipe.yaml:1", "unknown key 'modle'; did you mean 'model'?"]),
    ("method:\n  r: 0\n", ["recipe.yaml:2", "method.r", "greater than 0"]),
    ("method:\n  r: -3\n", ["method.r", "greater than 0"]),
    ("method:\n  r: '8'\n", ["method.r", "valid integer", "'8'"]),
    ("method:\n  alpha: sixteen\n", ["method.alpha", "valid number", "'sixteen'"]),
    ("method:\n  alpha: true\n", ["method.alpha", "expected a number, got true"]),
    ("method:\n  dropout: 1.0\n", ["method.dropout", "less than 1"]),
    ("method:\n  dropout: -0.1\n", ["method.dropout", "greater than or equal to 0"]),
    ("method:\n  name: lorax\n", ["recipe.yaml:2", "method.name", "unknown method 'lorax'; choose one of: lora"]),
    ("train:\n  epochs: 1\n  max_steps: 10\n", ["train", "either epochs or max_steps"]),
    ("train:\n  batch_size: 0\n", ["train.batch_size", "greater than 0"]),
    ("model:\n  dtype: float8\n", ["model.dtype", "'auto', 'float32', 'bfloat16' or 'float16'"]),
    ("model: builtin:tiny-gpt2\n", ["model", "expected a section"]),
    ("model:\n  load_in_4bit: yes please\n", ["model.load_in_4bit", "valid boolean"]),
    ("data:\n  train: missing.jsonl\n", ["data.train", "no data file at 'missing.jsonl'"]),
    ("data:\n  eval: e.jsonl\n  eval_fraction: 0.1\n", ["data.eval", "no data file"]),
    ("model:\n  base: ./nowhere\n", ["model.base", "no model file or folder at './nowhere'"]),
    ("name: 'has space'\n", ["name", "should match pattern"]),
    ("output_dir: runs/${nope}\n", ["output_dir", "${nope} names no recipe value"]),
    ("train:\n  lr: .inf\n", ["recipe.yaml:2", "train.lr", "finite number"]),
    ("train:\n  on_nan: ignore\n", ["train.on_nan", "'stop' or 'skip_step'"]),
    ("data:\n  on_long: cut\n", ["recipe.yaml:2", "data.on_long", "'truncate', 'drop' or 'error'"]),
    ("data:\n  on_error: ignore\n", ["data.on_error", "'raise' or 'skip'"]),
    ("train:\n  seed: 1\n  eval_steps: 5\n", ["recipe.yaml:3", "train.eval_steps", "needs evaluation data"]),
])
def test_recipe_mistakes_name_file_line_and_field(write_recipe, text, fragments):
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(text))
    assert err.value.exit_code == 2
    for fragment in fragments:
        assert fragment in str(err.value)


def test_all_problems_are_reported_at_once(write_recipe):
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe("method:\n  r: 0\ntrain:\n  lr: -1\n"))
    assert "method.r" in str(err.value) and "train.lr" in str(err.value)


def test_eval_file_and_fraction_together_are_refused(tmp_path, write_recipe):
    (tmp_path / "e.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match="either eval .* or eval_fraction"):
        load_recipe(write_recipe("data:\n  eval: e.jsonl\n  eval_fraction: 0.1\n"))


@pytest.mark.parametrize("text, fragment", [
    ("method:\n  r: [1\n", "recipe.yaml:3:1: invalid YAML"),
    ("a: b: c\n", "recipe.yaml:1:5: invalid YAML"),
    ("- a\n- b\n", "a recipe is a mapping of sections"),
    ("just text\n", "not a str"),
])
def test_yaml_that_is_not_a_recipe(write_recipe, text, fragment):
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(text))
    assert fragment in str(err.value)


def test_missing_unreadable_and_non_utf8_recipes(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="expected a recipe file, found a folder"):
        load_recipe(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_recipe(bad)


def test_cli_errors_exit_2_without_traceback(peft, write_recipe):
    result = peft("validate", write_recipe("method:\n  rr: 8\n"))
    assert result.code == 2
    assert "did you mean 'r'?" in result.output
    assert no_traceback(result.output)


def test_debug_shows_the_traceback(peft, write_recipe):
    result = peft("validate", write_recipe("method:\n  rr: 8\n"), "--debug")
    assert result.code == 2
    assert "Traceback" in result.output


def test_resolved_recipe_round_trips(write_recipe):
    recipe = load_recipe(write_recipe(tiny_recipe()))
    again = Recipe.model_validate(yaml.safe_load(recipe.to_yaml()), context={"base_dir": Path("/")})
    assert again == recipe


@pytest.mark.parametrize("text, fragments", [
    ("method:\n  name: lora\n  quant_type: nf4\n",
     ["recipe.yaml:3", "method.quant_type", "'quant_type' belongs to method qlora, not to lora; set method.name: qlora"]),
    ("method:\n  name: ia3\n  r: 4\n", ["method.r", "'r' belongs to methods lora, qlora, dora, rslora, loha, lokr, adalora, vera, not to ia3"]),
    ("method:\n  name: prompt\n  prefix_projection: true\n", ["'prefix_projection' belongs to method prefix, not to prompt"]),
    ("method:\n  name: adapter\n  feedforward_modules: [mlp]\n", ["'feedforward_modules' belongs to method ia3"]),
    ("method:\n  name: dora\n  use_dora: true\n", ["method.use_dora", "method dora always sets use_dora; drop the key"]),
    ("method:\n  name: loha\n  alpah: 4\n", ["unknown key 'alpah'; did you mean 'alpha'?"]),  # a typo is still a typo
])
def test_a_key_of_another_method_names_the_method_it_belongs_to(write_recipe, text, fragments):
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(text))
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("text, fragment", [
    ("method:\n  name: qlora\nmodel:\n  load_in_4bit: false\n", "qlora loads the base in 4-bit; drop model.load_in_4bit: false"),
    ("method:\n  name: loha\nmodel:\n  load_in_4bit: true\n", "loha cannot train on a 4-bit base"),
    ("method:\n  name: vera\nmodel:\n  load_in_4bit: true\n", "vera cannot train on a 4-bit base"),
    ("method:\n  init: loftq\n", "init: loftq fits the adapter to the 4-bit quantization error; use method qlora"),
    ("method:\n  name: qlora\n  init: pissa\n", "init: pissa rewrites the base weights, which a 4-bit base cannot take"),
    ("method:\n  name: prompt\n  init: text\n", "init: text needs init_text"),
    ("method:\n  name: prompt\n  init_text: Hello\n", "init_text is only used with init: text"),
    ("method:\n  name: prefix\n  encoder_hidden_size: 32\n", "set prefix_projection: true"),
    ("method:\n  name: adapter\n  bottleneck_size: 8\n  reduction_factor: 4\n", "either bottleneck_size or reduction_factor"),
    ("method:\n  name: adalora\n  r: 16\n", "r (16) is the budget pruned down from init_r (12)"),
    ("method:\n  name: adalora\n  warmup_fraction: 0.5\n  final_fraction: 0.5\n", "must leave steps for pruning"),
    ("method:\n  target_modules: []\n", "name at least one module"),
])
def test_contradictory_settings_are_errors(write_recipe, text, fragment):
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(text))
    assert fragment in str(err.value)


def test_qlora_is_lora_on_a_4bit_base_and_says_so_when_resolved(write_recipe):
    recipe = load_recipe(write_recipe("method:\n  name: qlora\n  r: 16\n"))
    assert recipe.model.load_in_4bit is True
    assert (recipe.method.quant_type, recipe.method.double_quant) == ("nf4", True)
    assert Recipe.model_validate(yaml.safe_load(recipe.to_yaml())) == recipe  # the resolved recipe round-trips


def test_every_method_has_its_own_defaults(write_recipe):
    names = {"lora", "qlora", "dora", "rslora", "ia3", "prefix", "prompt", "p_tuning", "loha", "lokr", "adalora",
             "vera", "adapter"}
    for name in names:
        recipe = load_recipe(write_recipe(f"method:\n  name: {name}\n"))
        assert recipe.method.name == name
        assert Recipe.model_validate(yaml.safe_load(recipe.to_yaml())) == recipe
