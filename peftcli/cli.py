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
from typing import Annotated, Optional

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
            errors.print(f"[bold red]error:[/] {err}", markup=True, highlight=False)
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
          debug: DebugOption = False):
    """Train an adapter from a recipe; writes the adapter, the report and checkpoints to a run directory."""
    from peftcli.recipe import load_recipe
    from peftcli.rundir import check_output_dir, clear_previous_run
    from peftcli.train import build_plan, describe, run_training

    resolved = load_recipe(recipe, set_ or [])
    if output_dir is not None:
        resolved.output_dir = str(output_dir)
    run = check_output_dir(Path(resolved.output_dir), overwrite=overwrite, resume=resume)
    with console.status("loading model and data"):
        plan = build_plan(resolved)
    console.print(display.plan_table(describe(plan)))
    if dry_run:
        return
    if overwrite:
        clear_previous_run(run)
    report = run_training(plan, run, resume=resume, console=console)
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
    app(prog_name="peft")


if __name__ == "__main__":
    sys.exit(main())
