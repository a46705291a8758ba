"""Training: recipe → model with adapter + tokenized data (a Plan) → HF Trainer → run directory."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from peftcli import data as data_mod
from peftcli import distributed, methods, models, params, report
from peftcli import speed as speed_mod
from peftcli.errors import Interrupted, RunFailure, UserError
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
        return optimizer_steps(self.train_stats.examples, self.recipe, distributed.world_size(),
                               batches=len(packed) if packed else None, accumulation=self.accumulation)

    @property
    def accumulation(self) -> int:
        """Batches whose gradients make one optimizer step: grad_accum, each split into micro-batches."""
        return self.recipe.train.grad_accum * self.speed.micro_batches

    def trainable_params(self) -> tuple[int, int]:
        return methods.trainable_parameters(self.model)


def current_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_runtime(recipe: Recipe, device: str) -> None:
    """Settings this machine cannot run, caught before anything heavy is loaded."""
    if recipe.model.load_in_4bit and device != "cuda":
        if recipe.method.name == "qlora":
            raise UserError("qlora loads the base in 4-bit with bitsandbytes, which needs a CUDA GPU, and none is visible",
                            where="method.name", hint="use method lora (the same adapter in 16/32-bit), or run on a GPU machine")
        raise UserError("4-bit loading (QLoRA) needs a CUDA GPU, and none is visible", where="model.load_in_4bit",
                        hint="set model.load_in_4bit: false to train in 16/32-bit, or run on a GPU machine")


def optimizer_steps(examples: int, recipe: Recipe, processes: int = 1, batches: int | None = None,
                    accumulation: int | None = None) -> int:
    """Optimizer steps the Trainer will run, counted as it counts them: `batches` per epoch (packed
    micro-batches, or batch_size examples each) dealt round-robin to the processes, `accumulation`
    of them per step (Plan.accumulation; grad_accum before micro-batches are planned)."""
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    batches = math.ceil((batches or math.ceil(examples / t.batch_size)) / processes)
    per_epoch = max(math.ceil(batches / (accumulation or t.grad_accum)), 1)
    return math.ceil((t.epochs or 1) * per_epoch)


def prepare_data(recipe: Recipe, tokenizer):
    """Tokenized train and eval splits with their statistics, and the format used."""
    d = recipe.data
    source = data_mod.read_rows(d.train, field="data.train", on_error=d.on_error)
    fmt = data_mod.detect_format(source.rows.column_names, d.format, where=f"data.train ({d.train})")
    rows = source.numbered()  # row numbers survive the eval split, for messages and the report
    eval_source = data_mod.read_rows(d.eval, field="data.eval", on_error=d.on_error) if d.eval else None
    eval_rows = eval_source.numbered() if eval_source else None
    if d.eval_fraction:
        if len(rows) < 2:
            raise UserError("eval_fraction needs at least 2 rows of training data", where="data.eval_fraction")
        split = rows.train_test_split(test_size=d.eval_fraction, seed=recipe.train.seed)
        rows, eval_rows = split["train"], split["test"]
    options = dict(fmt=fmt, max_length=d.max_length, train_on_prompt=d.train_on_prompt, on_long=d.on_long,
                   on_error=d.on_error)
    train, train_stats = data_mod.tokenize(rows, tokenizer, where=f"data.train ({d.train})", unit=source.unit,
                                           **options)
    train_stats.note_skipped(source.skipped)
    if eval_rows is None:
        return fmt, train, train_stats, None, None
    if eval_source:
        data_mod.detect_format(eval_source.rows.column_names, fmt, where=f"data.eval ({d.eval})")
    where, origin = (f"data.eval ({d.eval})", eval_source) if eval_source else (f"data.train ({d.train})", source)
    evaluation, eval_stats = data_mod.tokenize(eval_rows, tokenizer, where=where, unit=origin.unit, **options)
    if eval_source:
        eval_stats.note_skipped(eval_source.skipped)
    return fmt, train, train_stats, evaluation, eval_stats


def build_plan(recipe: Recipe) -> Plan:
    """Load data, model and adapter; the same for --dry-run and for training."""
    from transformers import set_seed

    device = current_device()
    check_runtime(recipe, device)
    distributed.check_strategy(recipe.distributed)
    m = recipe.model
    tokenizer = models.load_tokenizer(m.base, m.trust_remote_code)
    fmt, train, train_stats, evaluation, eval_stats = prepare_data(recipe, tokenizer)
    dtype = models.resolve_dtype(m.dtype, device)
    model = models.load_model(m.base, dtype=dtype, trust_remote_code=m.trust_remote_code,
                              **methods.loading_options(recipe, dtype))
    set_seed(recipe.train.seed)  # the adapter's initial weights depend on it
    # AdaLoRA schedules over the run's steps; packing keeps about batch_size examples a step, so the
    # unpacked count serves. The speed plan then decides checkpointing layer by layer for every method.
    model = methods.attach(model, recipe.method, steps=optimizer_steps(train_stats.examples, recipe))
    speed = speed_mod.plan(recipe, model, train, device)
    return Plan(recipe, device, dtype, model, tokenizer, fmt, train, evaluation, train_stats, eval_stats, speed)


def describe(plan: Plan) -> dict:
    """The plan in numbers, for --dry-run and the start of a run."""
    trainable, total = plan.trainable_params()
    r = plan.recipe
    return {
        "model": r.model.base, "device": plan.device, "dtype": str(plan.dtype).removeprefix("torch."),
        "method": report.method_label(r.method.model_dump()), "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100 * trainable / total, "format": plan.data_format,
        "train_examples": plan.train_stats.examples, "train_truncated": plan.train_stats.truncated,
        "eval_examples": plan.eval_stats.examples if plan.eval_stats else 0,
        "batch_size": r.train.batch_size * r.train.grad_accum * distributed.world_size(), "steps": plan.steps,
        "processes": distributed.world_size(), "output_dir": r.output_dir,
        **plan.speed.describe(),
    }


def training_arguments(plan: Plan, run: RunDir):
    import torch
    from transformers import TrainingArguments

    from peftcli import checkpoints

    t = plan.recipe.train
    cuda = plan.device == "cuda"
    periodic_eval = plan.eval_data is not None and t.eval_steps is not None
    return TrainingArguments(
        # The Trainer writes checkpoints into a staging folder; PublishCheckpoints renames each
        # into run.checkpoints once complete and keeps the newest save_total_limit (so not here).
        output_dir=str(checkpoints.staging(run.checkpoints)),
        per_device_train_batch_size=1 if plan.speed.packing else t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=plan.accumulation,
        learning_rate=t.lr, num_train_epochs=t.epochs or 1, max_steps=t.max_steps or -1,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=params.optimizer_for(t, cuda=cuda), seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps" if periodic_eval else "no", eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500, save_total_limit=None,
        bf16=cuda and plan.dtype == torch.bfloat16, fp16=cuda and plan.dtype == torch.float16,
        # With use_liger_kernel the Trainer leaves out the logits in evaluation, and patches the model again
        # (speed.prepare did) with the same options. speed.prepare applies checkpointing itself.
        use_liger_kernel=plan.speed.liger, liger_kernel_config=plan.speed.liger_options,
        # The Trainer's NaN filter and token count make the host wait for the GPU after every micro-batch,
        # and the GPU then idles while the next step is prepared: faults.NonFiniteGuard and
        # progress.TokensSeen do both without waiting. Batches go to the GPU from page-locked memory
        # without a wait either.
        logging_nan_inf_filter=False, include_num_input_tokens_seen="no", use_cpu=not cuda,
        dataloader_pin_memory=cuda, accelerator_config={"non_blocking": cuda},
        remove_unused_columns=False, label_names=["labels"], report_to=[], disable_tqdm=True,
        log_level="error", log_level_replica="error",
        **distributed.trainer_options(plan.recipe.distributed, plan.model),
    )


def build_trainer(plan: Plan, run: RunDir, console):
    from transformers import DataCollatorForSeq2Seq, Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from peftcli.checkpoints import PublishCheckpoints
    from peftcli.progress import RichProgress

    padding = DataCollatorForSeq2Seq(plan.tokenizer, padding=True, label_pad_token_id=data_mod.IGNORE,
                                     pad_to_multiple_of=8 if plan.device == "cuda" else None)
    train_data, collator = speed_mod.prepare(plan.speed, plan.model, plan.train_data, padding)
    trainer = Trainer(model=plan.model, args=training_arguments(plan, run), train_dataset=train_data,
                      eval_dataset=plan.eval_data, data_collator=collator, processing_class=plan.tokenizer)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    trainer.add_callback(RichProgress(console))
    for callback in methods.callbacks(plan.model, plan.recipe.method):
        trainer.add_callback(callback)
    trainer.add_callback(PublishCheckpoints(run.checkpoints, plan.recipe.train.save_total_limit))
    return trainer


@dataclass
class Watch:
    """The callbacks `peft train` (and `peft bench`) add to the Trainer's."""

    guard: Any  # faults.NonFiniteGuard
    tokens: Any  # progress.TokensSeen


def watch(trainer, on_nan: str, stop=None) -> Watch:
    """Add, in this order: `stop` (a signal asks for a save), the NaN guard (a faulty step is not saved,
    even when asked) and the token count (published into the state that a save writes)."""
    from peftcli.faults import NonFiniteGuard
    from peftcli.progress import TokensSeen

    watched = Watch(NonFiniteGuard(on_nan), TokensSeen())
    for callback in (stop, watched.guard, watched.tokens):
        if callback is not None:
            trainer.add_callback(callback)
    return watched


@dataclass
class Outcome:
    """How training ended: completed, interrupted by a signal, or failed on a NaN/Inf (train.on_nan: stop)."""

    status: str
    reason: str | None = None  # what stopped it, for the report
    signal_number: int | None = None
    fault_step: int | None = None


def run_training(plan: Plan, run: RunDir, *, resume: bool, console) -> dict:
    """Train, save the adapter and write the report; returns the report.

    A run stopped by SIGINT/SIGTERM or by a NaN/Inf still writes its report (status
    `interrupted` or `failed`), then raises Interrupted (exit 130/143) or RunFailure (exit 1);
    `--resume` continues from its newest complete checkpoint."""
    import torch

    from peftcli import checkpoints
    from peftcli.interrupt import StopOnSignal

    trainer = build_trainer(plan, run, console)
    main = trainer.is_world_process_zero()
    if main:
        run.root.mkdir(parents=True, exist_ok=True)
        checkpoints.clear_leftovers(run.checkpoints)
        report.write_atomic(run.recipe, plan.recipe.to_yaml())
    stop = StopOnSignal(console if main else None)
    watched = watch(trainer, plan.recipe.train.on_nan, stop)
    started_at, clock = datetime.now(timezone.utc), time.perf_counter()
    measure_base = plan.eval_data is not None
    base_eval = _evaluate_base(trainer, plan) if measure_base and methods.measures_base_first(plan.model) else None
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    checkpoint = run.latest_checkpoint() if resume else None
    try:
        with stop.installed():
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError as err:
        raise RunFailure("out of GPU memory during training",
                         hint="lower train.batch_size or data.max_length, or set train.gradient_checkpointing: true"
                         ) from err
    outcome = _outcome(trainer.state, stop, watched.guard)
    final_eval = None
    if outcome.status == "completed":
        final_eval = trainer.evaluate()["eval_loss"] if plan.eval_data is not None else None
        if measure_base and base_eval is None:
            base_eval = _evaluate_base(trainer, plan)
        save_adapter(plan, run, trainer)
    if not main:
        return {}
    result_report = build_report(plan, run, trainer, result, base_eval, final_eval, started_at,
                                 time.perf_counter() - clock, outcome, watched.tokens.this_run)
    report.write(result_report, run.report_json, run.report_md, run.loss_plot)
    if outcome.status == "completed":
        (saved_dir(plan, run) / "README.md").write_text(report.model_card(result_report))
        return result_report
    raise _stopped(outcome, run)


def _outcome(state, stop, guard) -> Outcome:
    if guard.fault_step is not None:
        return Outcome("failed", f"NaN/Inf loss or gradient at step {guard.fault_step}", fault_step=guard.fault_step)
    if stop.received is not None and state.global_step < state.max_steps:  # a signal after the last step stops nothing
        return Outcome("interrupted", f"{stop.signal_name} at step {state.global_step} of {state.max_steps}",
                       signal_number=stop.received)
    return Outcome("completed")


def _stopped(outcome: Outcome, run: RunDir) -> UserError:
    """The error that ends a run stopped early, saying where its newest complete checkpoint is."""
    checkpoint = run.latest_checkpoint()
    if outcome.status == "interrupted":
        return Interrupted(f"stopped by {outcome.reason}; checkpoint saved in {checkpoint}; report in {run.report_md}",
                           signal_number=outcome.signal_number,
                           hint="continue it with `peft train RECIPE --resume` (the same recipe and output directory)")
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved before it"
    return RunFailure(f"the loss or a gradient became NaN/Inf at step {outcome.fault_step}; training stopped before "
                      f"applying it ({kept})", where="train.on_nan: stop",
                      hint="lower train.lr or check the data, then --resume; or set train.on_nan: skip_step")


def _evaluate_base(trainer, plan: Plan) -> float:
    """Eval loss of the base model alone: the number the adapter has to beat.

    Measured after training, with the adapter switched off: an evaluation before training would
    move the data loaders' random state (accelerate synchronises it across processes) and change
    what a multi-process run trains on. PiSSA and OLoRA rewrite the base weights, so for them the
    untrained adapter on the rewritten base (which equals the base) is measured before training;
    full fine-tuning rewrites the base itself, which is measured before training too."""
    if methods.measures_base_first(plan.model):
        return trainer.evaluate(metric_key_prefix="base")["base_loss"]
    with plan.model.disable_adapter():
        return trainer.evaluate(metric_key_prefix="base")["base_loss"]


def saved_dir(plan: Plan, run: RunDir):
    """Where the run's result goes: the adapter, or with full fine-tuning the whole model."""
    return run.adapter if methods.has_adapter(plan.model) else run.model


def save_adapter(plan: Plan, run: RunDir, trainer) -> None:
    """Write the adapter (the model, with full fine-tuning) beside its final place and rename it in,
    so a crash never leaves half of one.

    Rank 0 writes; under FSDP every rank takes part in gathering the sharded adapter weights."""
    main = trainer.is_world_process_zero()
    final = saved_dir(plan, run)
    staging = run.root / f".{final.name}.partial"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    if trainer.is_fsdp_enabled:
        trainer.save_model(str(staging))
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle of the arguments; recipe.yaml says it all
    elif main:
        methods.save_adapter(plan.model, staging)
        plan.tokenizer.save_pretrained(staging)
    if main:
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    trainer.accelerator.wait_for_everyone()


def memory_estimate(plan: Plan) -> dict:
    """peft count-params' estimate for this run: its largest step through its speed settings, with the
    layers the plan checkpoints (speed.plan made it)."""
    return params.report_estimate(plan.speed.memory)


def build_report(plan: Plan, run: RunDir, trainer, result, base_eval, final_eval, started_at, wall,
                 outcome: Outcome, tokens_this_run: int) -> dict:
    from peftcli.faults import FAULT_KEY

    state = trainer.state
    trainable, total = plan.trainable_params()
    logs = state.log_history
    faulty = {e["step"]: e[FAULT_KEY] for e in logs if FAULT_KEY in e}  # their logged loss is the Trainer's stand-in
    losses = [e for e in logs if "loss" in e and e["step"] not in faulty]
    checkpoint = run.latest_checkpoint()
    train_runtime = result.metrics.get("train_runtime") or wall
    tokens = state.num_input_tokens_seen
    return {
        "name": plan.recipe.name,
        "status": outcome.status,
        "stop_reason": outcome.reason,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_time_s": round(wall, 2),
        "model": {"base": plan.recipe.model.base, "dtype": str(plan.dtype).removeprefix("torch."),
                  "architecture": type(methods.base_model(plan.model)).__name__, "device": plan.device,
                  "trust_remote_code": plan.recipe.model.trust_remote_code},
        "method": plan.recipe.method.model_dump(mode="json"),
        "speed": plan.speed.describe(),
        "params": {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total},
        "data": {"format": plan.data_format, "train": plan.train_stats.as_dict(),
                 "eval": plan.eval_stats.as_dict() if plan.eval_stats else None},
        "training": {
            "steps": state.global_step, "epochs": state.epoch or 0.0, "tokens": tokens,
            "train_runtime_s": round(train_runtime, 2),
            "tokens_per_s": tokens_this_run / train_runtime if train_runtime else 0.0,  # a resumed run: its own
            "final_loss": losses[-1]["loss"] if losses else None,
            "loss_history": [{"step": e["step"], "loss": e["loss"], "lr": e.get("learning_rate")} for e in losses],
            "skipped_steps": [step for step, what in faulty.items() if what == "skipped"],
        },
        "eval": {"base_loss": base_eval, "base_perplexity": report.perplexity(base_eval),
                 "loss": final_eval, "perplexity": report.perplexity(final_eval),
                 "history": [{"step": e["step"], "loss": e["eval_loss"]} for e in logs if "eval_loss" in e]},
        "memory": {**report.peak_memory(), "estimate": memory_estimate(plan)},
        "distributed": {"processes": trainer.args.world_size, "strategy": plan.recipe.distributed.strategy},
        "artifacts": _artifacts(plan, run, saved=outcome.status == "completed"),
        "versions": report.versions(),
        "hardware": report.hardware(),
    }


def _artifacts(plan: Plan, run: RunDir, *, saved: bool) -> dict:
    """What a completed run saved and its size: the adapter, or with full fine-tuning the model; a run
    stopped early wrote none (its checkpoint holds it)."""
    if not methods.has_adapter(plan.model):
        if not saved:
            return {"model_dir": None, "model_bytes": None, "model_weights_bytes": None}
        return {"model_dir": str(run.model), "model_bytes": report.directory_bytes(run.model),
                "model_weights_bytes": sum(p.stat().st_size for p in run.model.glob("*.safetensors"))}
    if not saved:
        return {"adapter_dir": None, "adapter_bytes": None, "adapter_weights_bytes": None}
    return {"adapter_dir": str(run.adapter), "adapter_bytes": report.directory_bytes(run.adapter),
            "adapter_weights_bytes": sum(p.stat().st_size for p in run.adapter.rglob("adapter_model.safetensors"))}
