"""Several processes: a 2-process gloo run on CPU equals one process with the same global batch."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from peftcli.distributed import trainer_options, without_gpus_option
from peftcli.recipe import DistributedSection, load_recipe

RECIPE = ROOT / "recipes" / "tiny-gpt2-lora.yaml"
# Two processes of batch 4 see the same 8 examples per step as one process of batch 8, and
# the Trainer averages the loss over the tokens of all processes; what differs is only the
# order of float additions in the gradient all-reduce.
ATOL = 1e-5


def run(tmp_path, name, launcher, batch):
    out = tmp_path / name
    command = [*launcher, "-m", "peftcli", "train", str(RECIPE), "-o", str(out),
               "--set", f"train.batch_size={batch}", "--set", "method.dropout=0", "--set", "train.epochs=1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_adapter_as_one(tmp_path):
    single, _ = run(tmp_path, "single", [sys.executable], 8)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    double, printed = run(tmp_path, "double", torchrun, 4)
    one, two = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (single, double))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=ATOL), key
    losses = [[p["loss"] for p in json.loads((p / "report.json").read_text())["training"]["loss_history"]]
              for p in (single, double)]
    assert losses[0] == pytest.approx(losses[1], abs=ATOL)
    report = json.loads((double / "report.json").read_text())
    assert report["distributed"] == {"processes": 2, "strategy": "ddp"}
    assert printed.count("Plan") == 1 and printed.count("Done") == 1  # rank 0 alone speaks


def test_gpus_beyond_the_machine_is_a_usage_error(peft):
    if torch.cuda.device_count() >= 64:
        pytest.skip("this machine has the GPUs")
    result = peft("train", RECIPE, "--gpus", "64", "--dry-run")
    assert result.code == 2
    assert "--gpus 64 asks for more GPUs than this machine has" in result.output


def test_the_launched_processes_do_not_relaunch():
    assert without_gpus_option(["train", "r.yaml", "--gpus", "2", "-o", "x"]) == ["train", "r.yaml", "-o", "x"]
    assert without_gpus_option(["train", "--gpus=4", "r.yaml"]) == ["train", "r.yaml"]


def test_fsdp_wraps_decoder_layers():
    from peftcli.models import build_empty, load_config

    model = build_empty(load_config("builtin:tiny-llama"))
    options = trainer_options(DistributedSection(strategy="fsdp", cpu_offload=True), model)
    assert options == {"fsdp": True, "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                                     "cpu_offload": True}}


def test_deepspeed_without_the_package_is_refused(write_recipe, peft):
    import importlib.util

    if importlib.util.find_spec("deepspeed"):
        pytest.skip("deepspeed is installed")
    recipe = write_recipe({"distributed": {"strategy": "deepspeed_zero3"},
                           "data": {"train": str(ROOT / "recipes" / "data" / "tiny.jsonl")}})
    result = peft("train", recipe, "--dry-run")
    assert result.code == 2 and "needs the deepspeed package" in result.output


def test_an_unknown_strategy_lists_the_choices(write_recipe):
    from peftcli.errors import UserError

    with pytest.raises(UserError, match="'ddp', 'fsdp' or 'deepspeed_zero3'"):
        load_recipe(write_recipe("distributed:\n  strategy: horovod\n"))
