"""The `peft` command: one thin function per verb. Each parses its options, calls a builder
pipeline and renders the result; user mistakes exit 2 and failures exit 1, never with a
traceback unless --debug asks for one."""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from peftcli import display
from peftcli.display import console, errors
from peftcli.errors import UserError

app = typer.Typer(help="Fine-tune causal language models with parameter-efficient methods, driven by YAML recipes.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})

RecipeArg = Annotated[Path, typer.Argument(help="the recipe YAML file", show_default=False)]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="override a recipe field by its dotted path, e.g. --set train.lr=1e-4 (repeatable)")]
DebugOption = Annotated[bool, typer.Option("--debug", help="show the full traceback of any error")]


def quiet_libraries() -> None:
    """Library chatter (tokenizer forks, bitsandbytes on CPU, transformers' advice) hides our output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion uses tqdm directly
    for name in ("bitsandbytes", "transformers", "datasets", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def reports_errors(command):
    """Render UserError/RunFailure as one message with its exit code; other errors as exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return command(*args, **kwargs)
        except UserError as err:
            if debug:
                traceback.print_exc()
            errors.print(f"[bold red]{err.label}:[/] {err}", markup=True, highlight=False)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            errors.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as err:  # a failure we did not foresee: one line, the traceback on request
            if debug:
                traceback.print_exc()
            errors.print(f"[bold red]error:[/] {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                         + ("" if debug else "\n  (run with --debug for the traceback)"), markup=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@reports_errors
def train(recipe: RecipeArg, set_: SetOption = None,
          output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="run directory (overrides output_dir)")] = None,
          overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the run already in the output directory")] = False,
          resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint in the output directory")] = False,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="build model, adapter and data, print the plan, do not train")] = False,
          gpus: Annotated[int, typer.Option("--gpus", min=1, help="train on N GPUs of this machine (torchrun; see distributed.strategy)")] = 1,
          debug: DebugOption = False):
    """Train an adapter from a recipe; writes the adapter, the report and checkpoints to a run directory."""
    from peftcli import distributed
    from peftcli.recipe import load_recipe
    from peftcli.rundir import clear_previous_run, open_run
    from peftcli.train import build_plan, describe, run_training

    resolved = load_recipe(recipe, set_ or [])
    if output_dir is not None:
        resolved.output_dir = str(output_dir)
    launching = gpus > 1 and distributed.world_size() == 1
    main = distributed.is_main_process()
    # The launcher only checks the run directory: its rank 0 holds it; a dry run writes nothing.
    with open_run(Path(resolved.output_dir), recipe=resolved, overwrite=overwrite, resume=resume,
                  lock=not (dry_run or launching)) as run:
        if launching:
            return distributed.launch(gpus, distributed.without_gpus_option(sys.argv[1:]))
        with console.status("loading model and data"):
            plan = build_plan(resolved)
        if main:
            console.print(display.plan_table(describe(plan)))
        if dry_run:
            return
        if overwrite and main:
            clear_previous_run(run)
        report = run_training(plan, run, resume=resume, console=console)
    if main:
        console.print(display.report_table(report, str(run.report_md)))


@app.command()
@reports_errors
def validate(recipe: RecipeArg, set_: SetOption = None, debug: DebugOption = False):
    """Check a recipe (schema, files, target modules, this machine) and print it resolved."""
    from peftcli import validate as checks
    from peftcli.recipe import load_recipe

    resolved = load_recipe(recipe, set_ or [])
    found = checks.check(resolved)
    console.print(resolved.to_yaml(), end="", markup=False)
    console.print(display.key_values("Resolved", found))
    console.print(f"[green]✓[/] {recipe} is valid")


@app.command()
@reports_errors
def init(path: Annotated[Path, typer.Argument(help="where to write the recipe")] = Path("recipe.yaml"),
         model: Annotated[Optional[str], typer.Option("--model", help="model.base to start from")] = None,
         method: Annotated[str, typer.Option("--method", help="the PEFT method")] = "lora",
         force: Annotated[bool, typer.Option("--force", help="replace an existing file")] = False,
         debug: DebugOption = False):
    """Write a commented starter recipe with every field at its default."""
    import yaml

    from peftcli.recipe import method_names, validate_recipe
    from peftcli.reference import starter_recipe

    if method not in method_names():
        raise UserError(f"unknown method '{method}'", where="--method", hint=f"choose one of: {', '.join(method_names())}")
    if path.exists() and not force:
        raise UserError("the file already exists", where=str(path), hint="pass --force to replace it")
    text = starter_recipe(model, method)
    validate_recipe(yaml.safe_load(text), base_dir=Path.cwd(), source="the starter recipe")
    path.write_text(text)
    console.print(f"wrote {path}; check it with [bold]peft validate {path}[/], train with [bold]peft train {path}[/]")


Dtype = Literal["auto", "bfloat16", "float16", "float32"]
DeviceOption = Annotated[Literal["auto", "cpu", "cuda"], typer.Option(
    "--device", help="where to run; auto = the GPU when there is one")]
BaseOption = Annotated[Optional[str], typer.Option(
    "--base", help="the base model, instead of the one the run's recipe or adapter_config.json names")]


@app.command()
@reports_errors
def merge(source: Annotated[Path, typer.Argument(help="a run directory or an adapter directory", show_default=False)],
          output: Annotated[Optional[Path], typer.Option("--output", "-o", help="where to write the merged model (default: RUN/merged, or ADAPTER-merged)")] = None,
          dtype: Annotated[Dtype, typer.Option("--dtype", help="dtype to merge in and save; auto keeps the base's stored dtype (16-bit for a QLoRA base)")] = "auto",
          base: BaseOption = None, device: DeviceOption = "auto",
          verify: Annotated[bool, typer.Option("--verify/--no-verify", help="compare the merged model with the adapter model on fixed prompts")] = True,
          dequantize: Annotated[bool, typer.Option("--dequantize", help="QLoRA: merge into the dequantized 4-bit weights instead of the base reloaded in 16-bit")] = False,
          overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the merged model already in the output directory")] = False,
          debug: DebugOption = False):
    """Fold an adapter into its base: a plain transformers model, verified against the adapter model."""
    from peftcli.adapters import full_run_model
    from peftcli.merge import run_merge

    if (full_model := full_run_model(source)) is not None:
        console.print(f"nothing to merge: {source} fine-tuned the whole model (method full), so there is no adapter; "
                      f"{full_model} is already a plain transformers model")
        return

    merged, where = run_merge(source, output=output, base=base, dtype=dtype, device=device, verify=verify,
                              dequantize=dequantize, overwrite=overwrite, console=console)
    console.print(display.merge_table(merged.record, str(where)))


AdapterOption = Annotated[Optional[list[str]], typer.Option(
    "--adapter", help="NAME=DIR: load this run or adapter directory on the base MODEL under NAME (repeatable)")]
UseOption = Annotated[Optional[str], typer.Option(
    "--use", help="the adapter to use, by its --adapter NAME (default: the first); 'base' = the base alone")]
MaxNewTokensOption = Annotated[int, typer.Option("--max-new-tokens", min=1, help="tokens to generate at most")]
TemperatureOption = Annotated[float, typer.Option("--temperature", min=0.0, help="sampling temperature; 0 = greedy")]
InferenceDtypeOption = Annotated[Dtype, typer.Option(
    "--dtype", help="weights dtype; auto keeps the stored dtype (a QLoRA run's base loads in 4-bit on a GPU)")]
TargetArg = Annotated[str, typer.Argument(
    help="a model (builtin:NAME, folder, .gguf, hub id), a merged model, a run or an adapter directory; "
         "with --adapter, the base model", show_default=False)]


@app.command()
@reports_errors
def generate(model: TargetArg,
             prompt: Annotated[str, typer.Option("--prompt", "-p", help="the text to continue (the user's message with --chat)", show_default=False)],
             adapter: AdapterOption = None, use: UseOption = None,
             max_new_tokens: MaxNewTokensOption = 128, temperature: TemperatureOption = 0.7,
             chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the tokenizer's chat template")] = False,
             base: BaseOption = None, dtype: InferenceDtypeOption = "auto", device: DeviceOption = "auto",
             debug: DebugOption = False):
    """Stream a completion from a base model, a trained adapter or a merged model (or one of several adapters on a base)."""
    from peftcli.generate import generate as complete, load
    from peftcli.models import resolve_device

    with console.status("loading"):
        loaded = load(model, adapter_options=adapter, use=use, base=base, dtype=dtype, device=resolve_device(device))
    errors.print(f"[dim]{loaded.description}{_in_use(loaded)}[/]", markup=True, highlight=False)
    complete(loaded, prompt, max_new_tokens=max_new_tokens, temperature=temperature, chat=chat,
             on_text=lambda text: console.out(text, end=""))
    console.out("")


@app.command()
@reports_errors
def chat(model: TargetArg, adapter: AdapterOption = None, use: UseOption = None,
         max_new_tokens: MaxNewTokensOption = 256, temperature: TemperatureOption = 0.7,
         base: BaseOption = None, dtype: InferenceDtypeOption = "auto", device: DeviceOption = "auto",
         debug: DebugOption = False):
    """Talk to a model, a trained adapter or several adapters on one base; /use NAME switches, /adapters lists, /exit quits."""
    import contextlib

    from peftcli.generate import CHAT_HELP, ChatSession, load, run_chat
    from peftcli.models import resolve_device

    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    with console.status("loading"):
        loaded = load(model, adapter_options=adapter, use=use, base=base, dtype=dtype, device=resolve_device(device))
    errors.print(f"[dim]{loaded.description}{_in_use(loaded)}\n{CHAT_HELP}[/]", markup=True, highlight=False)
    session = ChatSession(loaded, max_new_tokens=max_new_tokens, temperature=temperature)
    run_chat(session, read=lambda prompt: console.input(prompt, markup=False),
             show=lambda text: console.print(text, markup=False), stream=lambda text: console.out(text, end=""))


@app.command()
@reports_errors
def combine(adapters: Annotated[list[str], typer.Argument(help="two or more run or adapter directories (LoRA, one base)", show_default=False)],
            output: Annotated[Path, typer.Option("--output", "-o", help="a new folder for the combined adapter", show_default=False)],
            weights: Annotated[Optional[list[str]], typer.Option("--weights", "-w", help="one weight per adapter: --weights 0.5 0.5 (or 0.5,0.5; default: equal weights summing to 1)")] = None,
            how: Annotated[str, typer.Option("--how", help="linear | cat | svd | ties | dare_linear | dare_ties")] = "linear",
            density: Annotated[Optional[float], typer.Option("--density", help="ties / dare: the share of entries kept (default 0.5)")] = None,
            svd_rank: Annotated[Optional[int], typer.Option("--svd-rank", min=1, help="svd: the combined rank (default: the largest input rank)")] = None,
            verify: Annotated[bool, typer.Option("--verify", help="compare the combined adapter's logits with each input's on fixed prompts")] = False,
            base: BaseOption = None, device: DeviceOption = "auto", debug: DebugOption = False):
    """Build one LoRA adapter from several of the same base (peft's add_weighted_adapter)."""
    from peftcli.combine import parse_weights, run_combine

    paths, parsed = parse_weights(adapters, weights or [])
    record, where = run_combine(paths, output=output, weights=parsed, how=how, density=density, svd_rank=svd_rank,
                                base=base, verify=verify, device=device, console=console)
    console.print(display.combine_table(record, str(where)))


@app.command(name="adapters")
@reports_errors
def list_adapters(folder: Annotated[Path, typer.Argument(help="a folder of runs and adapter directories")] = Path("runs"),
                  as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
                  debug: DebugOption = False):
    """List the trained adapters in a folder: base, method, rank, size, eval loss, date."""
    import json

    from peftcli.catalog import scan

    entries = scan(folder)
    if as_json:
        console.out(json.dumps([e.as_dict() for e in entries], indent=2))
    elif entries:
        console.print(display.adapters_table(entries, str(folder)))
    else:
        console.print(f"no run or adapter directory in {folder}")


def _in_use(loaded) -> str:
    """Which adapter is on, unless the model is one run's adapter model ("default") or has no adapters."""
    return f"; using {loaded.active}" if loaded.active not in (None, "default") else ""


@app.command("count-params")
@reports_errors
def count_params(
        recipe: Annotated[Optional[Path], typer.Argument(help="the recipe YAML file; or describe one with --model", show_default=False)] = None,
        set_: SetOption = None,
        model: Annotated[Optional[str], typer.Option("--model", help="model.base: builtin:NAME, a folder with config.json, a .gguf file or a hub id")] = None,
        method: Annotated[Optional[str], typer.Option("--method", help="method.name")] = None,
        r: Annotated[Optional[int], typer.Option("--r", help="method.r, the LoRA rank")] = None,
        target_modules: Annotated[Optional[str], typer.Option("--target-modules", help="method.target_modules: names separated by commas, or all-linear")] = None,
        load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="model.load_in_4bit: count and estimate a 4-bit base (QLoRA)")] = False,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="rows per step for the memory estimate (train.batch_size)")] = None,
        seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="tokens per row for the memory estimate (data.max_length)")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")] = False,
        debug: DebugOption = False):
    """Count parameters and estimate training memory, building the model on the meta device (no weights)."""
    import json

    from peftcli.params import account
    from peftcli.recipe import load_recipe, recipe_from_overrides

    if recipe is None and model is None:
        raise UserError("give a recipe file or --model", hint="e.g. peft count-params --model builtin:llama-8b-random")
    if target_modules is not None and target_modules != "all-linear":
        target_modules = "[" + target_modules + "]"  # a YAML list, validated like the recipe's
    flags = {"model.base": model, "method.name": method, "method.r": r, "method.target_modules": target_modules,
             "model.load_in_4bit": "true" if load_in_4bit else None, "train.batch_size": batch_size,
             "data.max_length": seq_len}
    overrides = [*(set_ or []), *(f"{key}={value}" for key, value in flags.items() if value is not None)]
    resolved = load_recipe(recipe, overrides) if recipe else recipe_from_overrides(overrides, base_dir=Path.cwd())
    with console.status("building the model on the meta device"):
        result = account(resolved)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    for table in display.params_tables(result):
        console.print(table)
        console.print()


@app.command()
@reports_errors
def bench(recipe: Annotated[Optional[Path], typer.Argument(help="a recipe: benchmark its run, or with --workload "
                                                          "standard its train settings", show_default=False)] = None,
          workload: Annotated[Optional[str], typer.Option("--workload", help="standard: the project's speed workload "
                                                          "(the default without a recipe)")] = None,
          size: Annotated[str, typer.Option("--size", help="standard workload model: 1b, 8b (Llama shapes, GPU) "
                                                            "or tiny (CPU)")] = "1b",
          qlora: Annotated[bool, typer.Option("--qlora", help="standard workload in 4-bit NF4 (GPU)")] = False,
          steps: Annotated[int, typer.Option("--steps", help="optimizer steps; the first 5 are not timed")] = 25,
          set_: SetOption = None,
          as_json: Annotated[bool, typer.Option("--json", help="print one JSON line instead of the table")] = False,
          debug: DebugOption = False):
    """Measure training speed (label tokens/s, steps 5 on) and peak memory through peft train's own code path."""
    import json

    from peftcli import bench as bench_mod
    from rich.console import Console

    if workload not in (None, "standard"):
        raise UserError(f"unknown workload '{workload}'", where="--workload", hint="the one workload is: standard")
    if size not in bench_mod.SIZES:
        raise UserError(f"unknown size '{size}'", where="--size", hint=f"choose one of: {', '.join(bench_mod.SIZES)}")
    if recipe is None and workload is None:
        workload = "standard"
    work = bench_mod.workload(recipe, workload == "standard", size, qlora, steps, set_ or [])
    result = bench_mod.run(work, Console(quiet=True) if as_json else console)
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        console.print(display.bench_table(result))


def main() -> None:
    quiet_libraries()
    # Batches of varying length fragment the CUDA caching allocator; growable segments avoid that.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    counting = sys.argv[1:2] == ["count-params"]
    if counting:
        # count-params counts a 4-bit base arithmetically on the meta device and runs no bitsandbytes
        # kernel, while importing it (which peft does when it can) compiles kernels for 0.8 s: hidden,
        # peft takes it as missing, which changes no count of an unquantized meta model.
        sys.modules.setdefault("bitsandbytes", None)
    try:
        app(prog_name="peft")
    except SystemExit as done:
        if counting:  # it wrote nothing: end without the interpreter's teardown of torch (about 1 s)
            exit_now(done.code)
        raise


def exit_now(code) -> None:
    """End the process with `code` as sys.exit would, without running the interpreter's teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    sys.exit(main())
