"""Shared fixtures: the CLI run in-process, a tiny recipe in a temporary folder, one trained run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub
os.environ.setdefault("COLUMNS", "200")  # rich wraps at the terminal width; keep messages on one line

from typer.testing import CliRunner  # noqa: E402

from peftcli.cli import app, quiet_libraries  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
quiet_libraries()


class Result:
    def __init__(self, result):
        self.code = result.exit_code
        self.output = result.output  # stdout and stderr, interleaved

    def __repr__(self):
        return f"<exit {self.code}>\n{self.output}"


@pytest.fixture(autouse=True)
def unpatched_transformers(request):
    """liger patches transformers' modeling modules for every model built later in the process (their RMSNorm,
    MLP and RoPE functions, the causal LM's forward): a GPU test that trains with liger would hand its
    Triton kernels to a CPU model of a later test. Restores those modules after each GPU test."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    import importlib
    import sys

    from peftcli import speed

    for family in speed.VARLEN_FAMILIES:  # the ones liger may patch here, imported before it does
        importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("transformers.models.") and ".modeling_" in name]
    saved = [(m, dict(vars(m))) for m in modules]
    methods = [(cls, dict(vars(cls))) for m in modules for cls in vars(m).values()
               if isinstance(cls, type) and cls.__module__ == m.__name__]
    yield
    for module, names in saved:
        vars(module).update(names)
    for cls, attributes in methods:
        for name, value in attributes.items():
            if vars(cls).get(name) is not value:
                setattr(cls, name, value)


@pytest.fixture
def peft():
    """Run `peft ARGS...` in this process; returns exit code and everything it printed."""
    runner = CliRunner()

    def invoke(*args):
        return Result(runner.invoke(app, [str(a) for a in args]))

    return invoke


def tiny_recipe(**sections) -> dict:
    """The smallest useful recipe: tiny GPT-2, LoRA on its attention, a few steps."""
    recipe = {
        "name": "t",
        "model": {"base": "builtin:tiny-gpt2"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["c_attn"]},
        "data": {"train": str(ROOT / "recipes" / "data" / "tiny.jsonl"), "format": "alpaca", "max_length": 256},
        "train": {"max_steps": 3, "batch_size": 4, "logging_steps": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    return recipe


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe (dict or text) into tmp_path and return its path."""

    def write(recipe: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One real training run of the tiny recipe, shared by the tests that read its outputs."""
    from peftcli.recipe import validate_recipe
    from peftcli.rundir import RunDir
    from peftcli.train import build_plan, run_training
    from rich.console import Console

    root = tmp_path_factory.mktemp("run")
    recipe = validate_recipe(tiny_recipe(data={"eval_fraction": 0.25}, train={"max_steps": 8, "lr": 1e-2}),
                             base_dir=ROOT)
    recipe.output_dir = str(root / "out")
    plan = build_plan(recipe)
    report = run_training(plan, RunDir(Path(recipe.output_dir)), resume=False, console=Console(quiet=True))
    return plan, report, RunDir(Path(recipe.output_dir))


def no_traceback(output: str) -> bool:
    return "Traceback" not in output


def save_adapter(path: Path, base: str, config, *, noise: float = 0.05, seed: int = 0) -> Path:
    """An adapter made with peft's own API on `base` (any PeftConfig) and saved like a trained one:
    its trainable weights moved off their initial values (LoRA's B starts at zero), tokenizer beside."""
    import torch
    from peft import get_peft_model

    from peftcli.models import load_model, load_tokenizer

    torch.manual_seed(seed)
    model = get_peft_model(load_model(base, dtype=torch.float32), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * noise)
    model.save_pretrained(path)
    load_tokenizer(base).save_pretrained(path)
    return path


def write_run(root: Path, adapter: Path | None = None, **model) -> Path:
    """A run directory as `peft train` leaves it: recipe.yaml naming the base, and adapter/."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump({"name": root.name, "model": model, "method": {"name": "lora"}}))
    if adapter is not None:
        adapter.rename(root / "adapter")
    return root


def _train(recipe_dict: dict, output_dir: Path):
    from peftcli.recipe import validate_recipe
    from peftcli.rundir import RunDir
    from peftcli.train import build_plan, run_training
    from rich.console import Console

    recipe = validate_recipe(recipe_dict, base_dir=ROOT)
    recipe.output_dir = str(output_dir)
    run_training(build_plan(recipe), RunDir(output_dir), resume=False, console=Console(quiet=True))
    return output_dir


@pytest.fixture(scope="session")
def task_runs(tmp_path_factory):
    """Two LoRA runs on tiny GPT-2 that learnt different tasks (contact extraction; counting), with a
    high learning rate so that they really differ: name → run directory, in a folder of runs."""
    root = tmp_path_factory.mktemp("tasks")
    numbers = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    counting = write_jsonl(root / "count.jsonl", [
        {"prompt": f"Count from {numbers[i]}:", "completion": " " + " ".join(numbers[i:i + 4])} for i in range(6)])
    runs = root / "runs"
    return {
        "contacts": _train(tiny_recipe(name="contacts", data={"eval_fraction": 0.25},
                                       train={"max_steps": 6, "lr": 2e-2}), runs / "contacts"),
        "count": _train(tiny_recipe(name="count", method={"target_modules": ["c_attn", "c_fc"]},
                                    data={"train": str(counting), "format": "completion"},
                                    train={"max_steps": 6, "lr": 2e-2, "batch_size": 3}), runs / "count"),
    }


def kept_for_backward(forward, exclude=()) -> tuple[int, object]:
    """Run `forward()`; return the bytes autograd keeps for its backward, and what it returned.

    Each tensor autograd saves during the forward is recorded through saved-tensor hooks, each storage
    once, the `exclude` tensors (parameters) left out. A checkpointed layer's own hooks take the tensors
    saved inside it (they are recomputed, not kept), and the layer's input is saved outside them, so
    this counts what checkpointing keeps too."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept = {}

    def record(tensor):
        storage = tensor.untyped_storage()
        if tensor.numel() and storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        result = forward()
    return sum(kept.values()), result


def one_and_two_layer_llamas(root: Path, **shape) -> dict[int, Path]:
    """1- and 2-layer random Llamas of one shape saved in bf16 (a 4-bit load needs weights): a decoder
    layer's bytes are the 2-layer model's minus the 1-layer model's."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    for layers in (1, 2):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=layers, **shape)).to(
            torch.bfloat16).save_pretrained(root / str(layers))
    return {layers: root / str(layers) for layers in (1, 2)}


def gpu_estimate(base: str, *, batch_size=4, seq_len=2048, targets=None, load_in_4bit=False, **train):
    """count-params' estimate of LoRA r=16 (dropout 0, on the 7 projections unless `targets`): the recipe as
    peft train would run it on a CUDA GPU."""
    from peftcli import params, speed
    from peftcli.bench import PROJECTIONS
    from peftcli.recipe import validate_recipe

    recipe = validate_recipe({"model": {"base": base, "load_in_4bit": load_in_4bit},
                              "method": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": targets or PROJECTIONS},
                              "train": train}, base_dir=ROOT)
    return speed.estimate_on_a_gpu(recipe, params.build_skeleton(recipe), batch_size=batch_size, seq_len=seq_len)
