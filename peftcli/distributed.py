"""Several processes, one recipe: launching them (torchrun) and the Trainer settings per strategy.

peftcli invents no distributed engine: `--gpus N` re-runs the same command under
`torch.distributed.run`, and the HF Trainer (through accelerate) does DDP or FSDP. Every rank
builds the same plan; rank 0 alone prints and writes the run directory."""

from __future__ import annotations

import importlib.util
import os
import sys

from peftcli.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def launch(gpus: int, argv: list[str]) -> None:
    """Replace this process with torchrun running `peft argv` on `gpus` local GPUs."""
    import torch

    available = torch.cuda.device_count()
    if available < gpus:
        raise UserError(f"--gpus {gpus} asks for more GPUs than this machine has ({available})", where="--gpus",
                        hint="to try the distributed path on CPU: torchrun --nproc-per-node 2 -m peftcli train RECIPE")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               "-m", "peftcli", *argv]
    os.execv(sys.executable, command)


def without_gpus_option(argv: list[str]) -> list[str]:
    """The command line minus `--gpus N` / `--gpus=N`, for the launched processes."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def check_strategy(section) -> None:
    if section.strategy == "deepspeed_zero3" and importlib.util.find_spec("deepspeed") is None:
        raise UserError("strategy deepspeed_zero3 needs the deepspeed package", where="distributed.strategy",
                        hint="pip install deepspeed, or use ddp or fsdp")


def trainer_options(section, model) -> dict:
    """TrainingArguments settings for the recipe's strategy (they only act under several processes).

    Activation checkpointing is not among them: the speed plan applies it layer by layer itself."""
    if section.strategy == "ddp":
        # Every adapter weight takes part in every step: skipping the unused-parameter search is safe and faster.
        return {"ddp_find_unused_parameters": False}
    if section.strategy == "fsdp":
        # transformers wraps the LoRA layers apart and keeps 4-bit storage in the compute dtype.
        return {"fsdp": True, "fsdp_config": {
            "transformer_layer_cls_to_wrap": list(getattr(model, "_no_split_modules", None) or []),  # peft forwards it
            "cpu_offload": section.cpu_offload}}
    return {"deepspeed": zero3_config(section)}


def zero3_config(section) -> dict:
    """A ZeRO-3 config whose sizes the Trainer fills in from the recipe ("auto")."""
    offload = {"device": "cpu", "pin_memory": True} if section.cpu_offload else {"device": "none"}
    return {"zero_optimization": {"stage": 3, "offload_param": offload, "offload_optimizer": offload,
                                  "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "train_batch_size": "auto"}


def agreed_max(value: int, device) -> int:
    """The largest `value` any process holds, known to every process; `value` itself in one process.

    For decisions that must be the same everywhere (stop now, skip this step): a process that
    decided alone would wait forever in the next collective."""
    return _all_reduce(value, device, "MAX")


def total(value: int, device) -> int:
    """The sum of `value` over the processes, known to every process; `value` itself in one process."""
    return _all_reduce(value, device, "SUM")


def _all_reduce(value: int, device, op: str) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    import torch

    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return int(tensor.item())
