"""`peft validate` on anything at all: a valid recipe passes, anything else is exit 2 with a
message, never a traceback (property-based, with hypothesis)."""

import json

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import no_traceback, tiny_recipe
from peftcli.recipe import Recipe

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**40, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["builtin:tiny-gpt2", "builtin:nope", "all-linear", "lora", "lorax", "auto", "1e-4", "${name}",
                     "c_attn", "chat", "./x.jsonl", "/nowhere", "-1", "0", ""]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def _fields(model, prefix=""):
    """Every dotted field path of the schema, sections included."""
    for name, field in model.model_fields.items():
        yield prefix + name
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            yield from _fields(field.annotation, f"{prefix}{name}.")


FIELDS = sorted(set(_fields(Recipe)) | {"method.r", "method.alpha", "method.dropout", "method.target_modules",
                                        "method.bias", "method.rr", "train.lrr", "nonsense", "data.x.y"})
DELETE = object()


def check_outcome(result):
    assert result.code in (0, 2), result
    assert no_traceback(result.output), result
    if result.code == 2:
        assert "error:" in result.output and len(result.output.strip()) > len("error:"), result


def _yaml_text(value) -> str:
    try:
        return yaml.safe_dump(value, allow_unicode=True)
    except yaml.YAMLError:  # e.g. a float YAML cannot write back; any text will do
        return repr(value)


@SETTINGS
@given(document=st.one_of(values.map(_yaml_text), st.text(max_size=200)))
def test_any_yaml_document_is_a_recipe_or_a_clear_error(peft, tmp_path, document):
    path = tmp_path / "random.yaml"
    path.write_text(document, encoding="utf-8")
    check_outcome(peft("validate", path))


@SETTINGS
@given(mutations=st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(st.just(DELETE), values)), min_size=1,
                          max_size=3))
def test_any_mutation_of_a_valid_recipe_is_valid_or_a_clear_error(peft, tmp_path, mutations):
    recipe = tiny_recipe()
    for dotted, value in mutations:
        *parents, key = dotted.split(".")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if value is DELETE:
            node.pop(key, None)
        else:
            node[key] = value
    path = tmp_path / "mutated.yaml"
    path.write_text(_yaml_text(recipe), encoding="utf-8")
    check_outcome(peft("validate", path))



REMOTE_CONFIG = '''from transformers import GPT2Config


class TinyRemoteConfig(GPT2Config):
    model_type = "tiny-remote"
'''
REMOTE_MODEL = '''from transformers import GPT2LMHeadModel

from .configuration_tiny import TinyRemoteConfig


class TinyRemoteForCausalLM(GPT2LMHeadModel):
    config_class = TinyRemoteConfig
'''


def test_a_model_with_its_own_code_validates_only_when_the_recipe_trusts_it(peft, write_recipe, tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny.py").write_text(REMOTE_MODEL)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=1000, n_positions=128).to_dict()
    config.update(model_type="tiny-remote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))

    def validate(trust: bool):
        return peft("validate", write_recipe(tiny_recipe(model={"base": str(folder), "trust_remote_code": trust})))

    trusted = validate(True)
    assert trusted.code == 0 and "TinyRemoteForCausalLM" in trusted.output, trusted
    untrusted = validate(False)
    assert untrusted.code == 2 and "model.trust_remote_code: true" in untrusted.output and no_traceback(untrusted.output)
