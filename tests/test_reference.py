"""The schema is the reference: every field documented, the README generated from it."""

import yaml

from conftest import ROOT
from peftcli.recipe import Recipe, method_classes, validate_recipe
from peftcli.reference import BEGIN, END, markdown_reference, starter_recipe


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
