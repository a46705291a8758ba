"""The schema is the reference: every field documented, the README generated from it."""

import pytest
import yaml

from conftest import ROOT
from peftcli.recipe import Recipe, method_classes, validate_recipe
from peftcli.reference import BEGIN, END, METHODS_BEGIN, METHODS_END, markdown_reference, methods_table, starter_recipe


def sections():
    yield Recipe
    for field in Recipe.model_fields.values():
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            yield field.annotation
    yield from method_classes().values()


def test_every_field_has_a_description_and_a_default():
    for section in sections():
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name} has no description"
            assert not field.is_required(), f"{section.__name__}.{name} has no default"


def test_the_readme_reference_is_generated_from_the_schema():
    readme = (ROOT / "README.md").read_text()
    block = readme.split(BEGIN)[1].split(END)[0]
    assert block.strip() == markdown_reference().strip(), "run: python -m peftcli.reference README.md"


def test_starter_recipes_validate_for_every_method(tmp_path):
    for name in method_classes():
        recipe = validate_recipe(yaml.safe_load(starter_recipe(method=name)), base_dir=tmp_path)
        assert recipe == Recipe(method=method_classes()[name]())


@pytest.mark.slow
def test_the_readme_methods_table_is_counted_by_peft():
    """Trainable parameters of every method on the Llama-3.1-8B shape (meta device), as in the README."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split(METHODS_BEGIN)[1].split(METHODS_END)[0]
    assert block.strip() == methods_table().strip(), "run: python -m peftcli.reference README.md"
    assert "| `lora` |" in block and "| 20,971,520 (0.26%) | yes |" in block  # 32 layers × 8 × Σ(in + out) of 7 projections
