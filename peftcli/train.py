"""Training: recipe → model with adapter + tokenized data (a Plan) → HF Trainer → run directory."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from peftcli import data as data_mod
from peftcli import methods, models, report
from peftcli import speed as speed_mod
from peftcli.errors import RunFailure, UserError
from peftcli.recipe import Recipe
from peftcli.rundir import RunDir


@dataclass
class Plan:
    """Everything a run needs, built and checked before any step is taken."""

    recipe: Recipe
    device: str
    dtype: Any
    model: Any  # a peft.PeftModel
    tokenizer: Any
    data_format: str
    train_data: Any
    eval_data: Any | None
    train_stats: data_mod.DataStats
    eval_stats: data_mod.DataStats | None
    speed: speed_mod.SpeedPlan

    @property
    def steps(self) -> int:
        packed = self.speed.batches
        return optimizer_steps(self.train_stats.examples, self.recipe, batches=len(packed) if packed else None)

    def trainable_params(self) -> tuple[int, int]:
        return self.model.get_nb_trainable_parameters()


def current_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_runtime(recipe: Recipe, device: str) -> None:
    """Settings this machine cannot run, caught before anything heavy is loaded."""
    if recipe.model.load_in_4bit and device != "cuda":
        raise UserError("4-bit loading (QLoRA) needs a CUDA GPU, and none is visible", where="model.load_in_4bit",
                        hint="set model.load_in_4bit: false to train in 16/32-bit, or run on a GPU machine")


def optimizer_steps(examples: int, recipe: Recipe, batches: int | None = None) -> int:
    """Optimizer steps the Trainer will run, counted as it counts them; `batches` per epoch when packed."""
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    batches = batches or math.ceil(examples / t.batch_size)
    per_epoch = max(math.ceil(batches / t.grad_accum), 1)
    return math.ceil((t.epochs or 1) * per_epoch)


def prepare_data(recipe: Recipe, tokenizer):
    """Tokenized train and eval splits with their statistics, and the format used."""
    d = recipe.data
    rows = data_mod.load_rows(d.train, field="data.train")
    fmt = data_mod.detect_format(rows.column_names, d.format, where=f"data.train ({d.train})")
    eval_rows = data_mod.load_rows(d.eval, field="data.eval") if d.eval else None
    if d.eval_fraction:
        if len(rows) < 2:
            raise UserError("eval_fraction needs at least 2 rows of training data", where="data.eval_fraction")
        split = rows.train_test_split(test_size=d.eval_fraction, seed=recipe.train.seed)
        rows, eval_rows = split["train"], split["test"]
    options = dict(fmt=fmt, max_length=d.max_length, train_on_prompt=d.train_on_prompt)
    train, train_stats = data_mod.tokenize(rows, tokenizer, where=f"data.train ({d.train})", **options)
    if eval_rows is None:
        return fmt, train, train_stats, None, None
    if d.eval:
        data_mod.detect_format(eval_rows.column_names, fmt, where=f"data.eval ({d.eval})")
    evaluation, eval_stats = data_mod.tokenize(eval_rows, tokenizer, where=f"data.eval ({d.eval or d.train})",
                                               **options)
    return fmt, train, train_stats, evaluation, eval_stats


def build_plan(recipe: Recipe) -> Plan:
    """Load data, model and adapter; the same for --dry-run and for training."""
    from transformers import set_seed

    device = current_device()
    check_runtime(recipe, device)
    m = recipe.model
    tokenizer = models.load_tokenizer(m.base, m.trust_remote_code)
    fmt, train, train_stats, evaluation, eval_stats = prepare_data(recipe, tokenizer)
    dtype = models.resolve_dtype(m.dtype, device)
    model = models.load_model(m.base, dtype=dtype, trust_remote_code=m.trust_remote_code)
    set_seed(recipe.train.seed)  # the adapter's initial weights depend on it
    model = methods.attach(model, recipe.method)
    speed = speed_mod.plan(recipe, model, train, device)
    return Plan(recipe, device, dtype, model, tokenizer, fmt, train, evaluation, train_stats, eval_stats, speed)


def describe(plan: Plan) -> dict:
    """The plan in numbers, for --dry-run and the start of a run."""
    trainable, total = plan.trainable_params()
    r = plan.recipe
    return {
        "model": r.model.base, "device": plan.device, "dtype": str(plan.dtype).removeprefix("torch."),
        "method": r.method.name, "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100 * trainable / total, "format": plan.data_format,
        "train_examples": plan.train_stats.examples, "train_truncated": plan.train_stats.truncated,
        "eval_examples": plan.eval_stats.examples if plan.eval_stats else 0,
        "batch_size": r.train.batch_size * r.train.grad_accum, "steps": plan.steps, "output_dir": r.output_dir,
        **plan.speed.describe(),
    }


def training_arguments(plan: Plan, run: RunDir):
    import torch
    from transformers import TrainingArguments

    t = plan.recipe.train
    cuda = plan.device == "cuda"
    periodic_eval = plan.eval_data is not None and t.eval_steps is not None
    return TrainingArguments(
        output_dir=str(run.checkpoints), per_device_train_batch_size=1 if plan.speed.packing else t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, num_train_epochs=t.epochs or 1, max_steps=t.max_steps or -1,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=_optimizer(t.optim, cuda), seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps" if periodic_eval else "no", eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        bf16=cuda and plan.dtype == torch.bfloat16, fp16=cuda and plan.dtype == torch.float16,
        use_liger_kernel=plan.speed.liger,  # speed.prepare applies checkpointing itself, layer by layer
        include_num_input_tokens_seen="non_padding", use_cpu=not cuda, dataloader_pin_memory=cuda,
        remove_unused_columns=False, label_names=["labels"], report_to=[], disable_tqdm=True,
    )


def _optimizer(name: str, cuda: bool) -> str:
    if name == "auto":
        return "adamw_torch_fused" if cuda else "adamw_torch"
    return name


def build_trainer(plan: Plan, run: RunDir, console):
    from transformers import DataCollatorForSeq2Seq, Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from peftcli.progress import RichProgress

    padding = DataCollatorForSeq2Seq(plan.tokenizer, padding=True, label_pad_token_id=data_mod.IGNORE,
                                     pad_to_multiple_of=8 if plan.device == "cuda" else None)
    train_data, collator = speed_mod.prepare(plan.speed, plan.model, plan.train_data, padding)
    trainer = Trainer(model=plan.model, args=training_arguments(plan, run), train_dataset=train_data,
                      eval_dataset=plan.eval_data, data_collator=collator, processing_class=plan.tokenizer)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    trainer.add_callback(RichProgress(console))
    return trainer


def run_training(plan: Plan, run: RunDir, *, resume: bool, console) -> dict:
    """Train, save the adapter and write the report; returns the report."""
    import torch

    run.root.mkdir(parents=True, exist_ok=True)
    run.recipe.write_text(plan.recipe.to_yaml())
    trainer = build_trainer(plan, run, console)
    started_at, clock = datetime.now(timezone.utc), time.perf_counter()
    base_eval = _evaluate_base(trainer, plan) if plan.eval_data is not None else None
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    checkpoint = run.latest_checkpoint() if resume else None
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError as err:
        raise RunFailure("out of GPU memory during training",
                         hint="lower train.batch_size or data.max_length, or set train.gradient_checkpointing: true"
                         ) from err
    final_eval = trainer.evaluate()["eval_loss"] if plan.eval_data is not None else None
    save_adapter(plan, run)
    result_report = build_report(plan, run, trainer, result, base_eval, final_eval, started_at,
                                 time.perf_counter() - clock)
    report.write(result_report, run.report_json, run.report_md, run.loss_plot)
    (run.adapter / "README.md").write_text(report.model_card(result_report))
    return result_report


def _evaluate_base(trainer, plan: Plan) -> float:
    """Eval loss of the base model alone: the number the adapter has to beat."""
    with plan.model.disable_adapter():
        return trainer.evaluate(metric_key_prefix="base")["base_loss"]


def save_adapter(plan: Plan, run: RunDir) -> None:
    """Write the adapter beside its final place and rename it in, so a crash never leaves half of one."""
    staging = run.root / ".adapter.partial"
    shutil.rmtree(staging, ignore_errors=True)
    plan.model.save_pretrained(staging)
    plan.tokenizer.save_pretrained(staging)
    if run.adapter.exists():
        shutil.rmtree(run.adapter)
    staging.rename(run.adapter)


def build_report(plan: Plan, run: RunDir, trainer, result, base_eval, final_eval, started_at, wall) -> dict:
    state = trainer.state
    trainable, total = plan.trainable_params()
    logs = state.log_history
    train_runtime = result.metrics.get("train_runtime") or wall
    tokens = state.num_input_tokens_seen
    return {
        "name": plan.recipe.name,
        "status": "completed",
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_time_s": round(wall, 2),
        "model": {"base": plan.recipe.model.base, "dtype": str(plan.dtype).removeprefix("torch."),
                  "architecture": type(plan.model.get_base_model()).__name__, "device": plan.device},
        "method": plan.recipe.method.model_dump(mode="json"),
        "speed": plan.speed.describe(),
        "params": {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total},
        "data": {"format": plan.data_format, "train": plan.train_stats.as_dict(),
                 "eval": plan.eval_stats.as_dict() if plan.eval_stats else None},
        "training": {
            "steps": state.global_step, "epochs": state.epoch or 0.0, "tokens": tokens,
            "train_runtime_s": round(train_runtime, 2), "tokens_per_s": tokens / train_runtime if train_runtime else 0.0,
            "final_loss": next((e["loss"] for e in reversed(logs) if "loss" in e), None),
            "loss_history": [{"step": e["step"], "loss": e["loss"], "lr": e.get("learning_rate")}
                             for e in logs if "loss" in e],
        },
        "eval": {"base_loss": base_eval, "base_perplexity": report.perplexity(base_eval),
                 "loss": final_eval, "perplexity": report.perplexity(final_eval),
                 "history": [{"step": e["step"], "loss": e["eval_loss"]} for e in logs if "eval_loss" in e]},
        "memory": report.peak_memory(),
        "artifacts": {"adapter_dir": str(run.adapter), "adapter_bytes": report.directory_bytes(run.adapter),
                      "adapter_weights_bytes": (run.adapter / "adapter_model.safetensors").stat().st_size},
        "versions": report.versions(),
        "hardware": report.hardware(),
    }
