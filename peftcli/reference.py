"""The recipe schema rendered for people: `peft init`'s commented starter recipe and the
README's recipe reference. Both come from the field definitions in `peftcli.recipe`.

    python -m peftcli.reference README.md    # rewrite the README's reference block
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from peftcli.recipe import Recipe, method_classes

BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"
METHODS_BEGIN, METHODS_END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"
TABLE_MODEL = "builtin:llama-8b-random"  # the Llama-3.1-8B shape, counted on the meta device


def starter_recipe(model: str | None = None, method: str = "lora") -> str:
    """A recipe with every field at its default, each with its description as a comment."""
    classes = method_classes()
    sections = {"method": classes[method]}
    defaults = Recipe(method=classes[method]())  # a method can set another section's default (qlora: 4-bit)
    overrides = {("model", "base"): model} if model else {}
    lines = ["# peftcli recipe: every field with its default. Delete what you do not change.",
             "# Check it with `peft validate FILE`; train with `peft train FILE`.", ""]
    for name, field in Recipe.model_fields.items():
        section = sections.get(name) or _section(field.annotation)
        if section is None:
            lines.append(f"{name}: {_yaml_value(field.get_default(call_default_factory=True))}  # {field.description}")
            continue
        lines += ["", f"# {field.description}", f"{name}:"]
        for key, sub in section.model_fields.items():
            value = overrides.get((name, key), getattr(getattr(defaults, name), key))
            lines.append(f"  {key}: {_yaml_value(value)}  # {sub.description}")
    return "\n".join(lines) + "\n"


def markdown_reference() -> str:
    """One table per section: key, type, default, description."""
    out = []
    for name, field in Recipe.model_fields.items():
        section = _section(field.annotation)
        if section is None and name != "method":  # the methods get a table each, below
            out += [f"`{name}` ({_type_name(field.annotation)}, default `{_yaml_value(field.default)}`): "
                    f"{field.description}.", ""]
    for name, field in Recipe.model_fields.items():
        if name == "method":
            for method_name, cls in method_classes().items():
                out += _table(f"method (name: {method_name})", cls, cls.__doc__)
        elif (section := _section(field.annotation)) is not None:
            out += _table(name, section, field.description)
    return "\n".join(out).rstrip() + "\n"


def methods_table() -> str:
    """Every method: what it trains, its trainable parameters on the Llama-3.1-8B shape at the
    recipe's defaults (counted by peft on a meta-device model: no memory, no weights), mergeable or not."""
    from peftcli import merge, methods, models

    config = models.load_config(TABLE_MODEL)
    rows = ["| method | what is trained | trainable params, Llama-3.1-8B shape | mergeable |", "|---|---|---|---|"]
    for name, cls in method_classes().items():
        # AdaLoRA schedules its budget over the run's steps; the count does not depend on them.
        model = methods.attach(models.build_empty(config), cls(), steps=1000)
        trainable, total = methods.trainable_parameters(model)
        # peft's own types are PeftType members, a registered custom tuner's (bottleneck) a plain string
        kinds = {getattr(c.peft_type, "value", c.peft_type) for c in getattr(model, "peft_config", {}).values()}
        mergeable = "no adapter" if not kinds else "yes" if kinds <= merge.MERGEABLE else "no"
        share = "100" if trainable == total else f"{100 * trainable / total:.2g}"
        rows.append(f"| `{name}` | {' '.join(cls.__doc__.split())} | {trainable:,} ({share}%) "
                    f"| {mergeable} |")
    return "\n".join(rows) + "\n"


def _table(title: str, section: type[BaseModel], about: str | None) -> list[str]:
    rows = [f"### `{title}`", "", (about or "").strip(), "", "| key | type | default | description |",
            "|---|---|---|---|"]
    for key, field in section.model_fields.items():
        default = field.get_default(call_default_factory=True)
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | `{_yaml_value(default)}` | {field.description} |")
    return rows + [""]


def _section(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _type_name(annotation) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(str(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType) and all(isinstance(a, type) and issubclass(a, BaseModel)
                                                  for a in get_args(annotation)):
        return "method section"  # the mixed method's components
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(annotation))
    if origin is list:
        return f"list of {_type_name(get_args(annotation)[0])}"
    if hasattr(annotation, "__metadata__"):  # Annotated[...]
        return _type_name(get_args(annotation)[0])
    return {int: "int", float: "number", bool: "bool", str: "text"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _yaml_value(value) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):  # method sections: what they set
        value = [{"name": v.name, **v.model_dump(mode="json", exclude_defaults=True)} for v in value]
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def update_readme(path: Path) -> bool:
    """Rewrite the blocks between the markers; True when one changed."""
    text = path.read_text()
    new = _replace_block(text, BEGIN, END, markdown_reference())
    new = _replace_block(new, METHODS_BEGIN, METHODS_END, methods_table())
    path.write_text(new)
    return new != text


def _replace_block(text: str, begin: str, end: str, content: str) -> str:
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    return f"{head}{begin}\n{content}{end}{tail}"


if __name__ == "__main__":
    update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
