"""`peft bench`: a short training through the same Trainer, collator and speed settings as
`peft train`, measured the way the project's baselines measure (../shared/bench/WORKLOAD.md):
label tokens (label != -100) per wall second from step 5 to the last step, after a CUDA
synchronize; peak memory = torch.cuda.max_memory_allocated() over the training.

The standard workload is reproduced exactly: a random-init Llama of the Llama-3.2-1B or
Llama-3.1-8B shape (seed 0, bfloat16, built on the GPU from its config; for QLoRA loaded in
NF4 with double quantization and bfloat16 compute from the cached safetensors folder), 2000
sequences of uniform random token ids with lengths exp(N(ln 350, 0.8)) clamped to [16, 2048]
(torch.Generator seed 1), loss on every token, LoRA r=16 alpha=32 dropout 0 on the 7
projections, and batches of 4 × 2048 tokens as the TRL baseline packs them.
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from peftcli import methods, models, report
from peftcli import speed as speed_mod
from peftcli.data import IGNORE, DataStats
from peftcli.errors import UserError
from peftcli.recipe import Recipe, apply_override, validate_recipe

WARMUP = 5  # steps before the clock starts, as in the baselines
SEQUENCES, MEDIAN_LENGTH, MAX_LENGTH = 2000, 350, 2048
SIZES = {"tiny": "tiny-llama", "1b": "llama-1b-random", "8b": "llama-8b-random"}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Workload:
    """What to train: the recipe, and for the standard workload its model size and quantization."""

    name: str
    recipe: Recipe
    size: str | None = None
    qlora: bool = False


def standard_recipe(size: str, qlora: bool, steps: int, overrides=(), settings: dict | None = None):
    """The standard workload as a recipe: the same fields `peft train` reads. `settings` are the model and train
    fields a user recipe sets explicitly, laid over the workload's."""
    settings = settings or {}
    raw = {
        "name": f"bench-{size}{'-qlora' if qlora else ''}",
        "model": {"base": f"builtin:{SIZES[size]}", "load_in_4bit": qlora, **settings.get("model", {})},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": PROJECTIONS},
        "data": {"max_length": MAX_LENGTH},
        # The baselines' Trainer defaults: linear schedule, no warm-up; 4 rows of 2048 tokens per batch.
        "train": {"batch_size": 4, "max_tokens_per_batch": 4 * MAX_LENGTH, "lr": 2e-4, "lr_scheduler": "linear",
                  "warmup_ratio": 0.0, "logging_steps": 1000, **settings.get("train", {}), "max_steps": steps},
    }
    for override in overrides:
        apply_override(raw, override)
    return validate_recipe(raw, base_dir=Path.cwd(), source="the standard workload", overrides=overrides)


def standard_rows(vocab_size: int) -> list[list[int]]:
    """The workload's sequences, generated exactly as naive_baseline.workload generates them."""
    import torch

    g = torch.Generator().manual_seed(1)
    lengths = torch.exp(torch.randn(SEQUENCES, generator=g) * 0.8 + math.log(MEDIAN_LENGTH)).clamp(16, MAX_LENGTH).long()
    return [torch.randint(0, vocab_size, (int(n),), generator=g).tolist() for n in lengths]


def workload(recipe_path: Path | None, standard: bool, size: str, qlora: bool, steps: int, overrides) -> Workload:
    """The standard workload (its train settings taken from RECIPE when one is given), or RECIPE's own run."""
    from peftcli.recipe import load_recipe

    if steps <= WARMUP:
        raise UserError(f"--steps must be more than the {WARMUP} warm-up steps", where="--steps")
    if not standard:
        if qlora:
            raise UserError("--qlora is for the standard workload", where="--qlora",
                            hint="set model.load_in_4bit: true in the recipe, or add --workload standard")
        recipe = load_recipe(recipe_path, [*overrides, "train.epochs=null", f"train.max_steps={steps}"])
        return Workload(recipe.name, recipe)
    settings = {}
    if recipe_path is not None:  # the recipe's speed settings on the workload's model, data and adapter
        user = load_recipe(recipe_path)
        settings = {"model": user.model.model_dump(mode="json", include={"attn_implementation"}, exclude_unset=True),
                    "train": user.train.model_dump(mode="json", exclude={"epochs", "max_steps"}, exclude_unset=True)}
    recipe = standard_recipe(size, qlora, steps, overrides, settings)
    return Workload("standard", recipe, size, qlora)


def run(work: Workload, console) -> dict:
    """Train the workload for its steps and measure it; returns the result as the JSON line holds it."""
    import torch

    from peftcli import train as train_mod

    device = train_mod.current_device()
    plan = _standard_plan(work, device) if work.size else train_mod.build_plan(work.recipe)
    with tempfile.TemporaryDirectory(prefix="peft-bench-") as folder:
        from peftcli.rundir import RunDir

        trainer = train_mod.build_trainer(plan, RunDir(Path(folder)), console)
        train_mod.watch(trainer, plan.recipe.train.on_nan)  # what peft train runs beside the Trainer
        counter = LabelCounter(trainer.data_collator)
        trainer.data_collator = counter
        clock = Clock(device)
        trainer.add_callback(clock)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train()
        seconds = clock.stop()
    steps = trainer.state.global_step
    accumulation = plan.accumulation
    tokens = sum(counter.counts[WARMUP * accumulation: steps * accumulation])
    return {
        "tool": "peftcli", "workload": work.name, "size": work.size, "qlora": work.qlora,
        "profile": plan.recipe.train.profile, "real_tokens_per_s": round(tokens / seconds) if seconds else 0,
        "peak_gib": report.peak_memory()["peak_gib"], "loss": round(result.training_loss, 4), "steps": steps,
        "timed_steps": steps - WARMUP, "timed_tokens": tokens,
        "settings": {"model": plan.recipe.model.base, "device": device, "gpu": report.hardware().get("gpu"),
                     "dtype": str(plan.dtype).removeprefix("torch."), "optim": trainer.args.optim.value,
                     **plan.speed.describe()},
    }


def _standard_plan(work: Workload, device: str):
    """The Plan `peft train` would build, with the workload's model and token rows instead of a data file."""
    import torch
    from datasets import Dataset
    from transformers import set_seed

    from peftcli.train import Plan

    recipe = work.recipe
    if work.size != "tiny" and device != "cuda":
        raise UserError(f"the {work.size} model needs a CUDA GPU", where="--size", hint="use --size tiny on a CPU")
    if work.qlora and device != "cuda":
        raise UserError("--qlora needs a CUDA GPU", where="--qlora")
    model, dtype = _standard_model(work, device)
    rows = standard_rows(model.config.vocab_size)
    train = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows})
    tokens = sum(map(len, rows))
    stats = DataStats(rows=len(rows), examples=len(rows), tokens=tokens, target_tokens=tokens)
    set_seed(recipe.train.seed)  # the adapter's initial weights depend on it
    model = methods.attach(model, recipe.method)
    speed = speed_mod.plan(recipe, model, train, device)
    if device == "cuda":  # what building the model left behind (a float32 copy, a model written to the cache)
        gc.collect()
        torch.cuda.empty_cache()
    return Plan(recipe, device, dtype, model, _placeholder_tokenizer(), "tokens", train, None, stats, None, speed)


def _standard_model(work: Workload, device: str):
    """Seed 0 random init, as naive_baseline.build_model: bfloat16 from the config (initialised in float32,
    then cast), or NF4 from the cached bfloat16 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name = SIZES[work.size]
    if work.size == "tiny":
        return models.load_model(f"builtin:{name}", dtype=torch.float32), torch.float32
    if work.qlora:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        model = models.load_model(f"builtin:{name}", dtype=torch.bfloat16, quantization_config=quantization,
                                  device_map={"": 0})
        return model, torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(models.random_config(name)).to(torch.bfloat16)
    return model, torch.bfloat16


def _placeholder_tokenizer():
    """The rows are token ids already; the Trainer only needs pad and eos tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


class LabelCounter:
    """Wraps the collator; records each batch's label tokens (label != -100) in the order batches are made,
    which is the order the Trainer consumes them."""

    def __init__(self, collator):
        self.collator = collator
        self.counts: list[int] = []

    def __call__(self, features):
        batch = self.collator(features)
        self.counts.append(int((batch["labels"] != IGNORE).sum()))
        return batch


class Clock(TrainerCallback):
    """Starts at the beginning of step WARMUP, after the GPU has finished the earlier steps."""

    def __init__(self, device: str):
        self.device = device
        self.started: float | None = None

    def _synchronize(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == WARMUP and self.started is None:
            self._synchronize()
            self.started = time.perf_counter()

    def stop(self) -> float:
        self._synchronize()
        return time.perf_counter() - self.started if self.started is not None else 0.0
