"""How results look in the terminal: one rich console and a renderer per kind of result."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from peftcli.report import method_label

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)


def key_values(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key.replace("_", " "), _format(value))
    return table


def plan_table(plan: dict) -> Table:
    return key_values("Plan", plan)


def report_table(report: dict, where: str) -> Table:
    training, ev = report["training"], report["eval"]
    rows = {"steps": training["steps"], "final train loss": training["final_loss"],
            "eval loss (base → trained)": f"{_format(ev['base_loss'])} → {_format(ev['loss'])}"
            if ev["loss"] is not None else "no eval data",
            "tokens/s": training["tokens_per_s"], "peak memory GiB": report["memory"]["peak_gib"],
            "wall time s": report["wall_time_s"], "report": where}
    return key_values("Done", rows)


def bench_table(result: dict) -> Table:
    rows = {"workload": result["workload"] + (f" {result['size']}" if result["size"] else "")
            + (" QLoRA" if result["qlora"] else ""),
            "real tokens/s": result["real_tokens_per_s"], "peak memory GiB": result["peak_gib"],
            "loss": result["loss"], "steps (timed)": f"{result['steps']} ({result['timed_steps']})",
            **result["settings"]}
    return key_values("Benchmark", rows)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def merge_table(record: dict, where: str) -> Table:
    """`peft merge`'s result: what was merged, and how close the merged model is to the adapter model."""
    rows = {"output": where, "base": record["base"], "adapter": record["adapter"], "method": record["method"],
            "dtype": record["dtype"], "device": record["device"], "merge time s": record["time_s"]["merge_s"],
            "peak memory GiB": record["memory"]["peak_gib"]}
    if record["qlora"]:
        rows["QLoRA merged into"] = record["qlora"]["merged_into"]
    verification = record["verification"]
    if verification is None:
        rows["verification"] = "skipped (--no-verify)"
        return key_values("Merged", rows)
    tolerance = verification["tolerance"]
    rows["merged vs adapter"] = (_comparison(verification["merged_vs_adapter"])
                                 + f" (tolerance ≤ {tolerance['max_abs_logit_diff']:.3g}, "
                                   f"≥ {tolerance['greedy_agreement']:.0%})")
    rows["adapter vs base"] = _comparison(verification["adapter_vs_base"])
    if verification["merged_vs_4bit_adapter"]:
        rows["merged vs 4-bit adapter"] = _comparison(verification["merged_vs_4bit_adapter"]) + " (what training saw)"
    rows["verification"] = "passed" if verification["passed"] else "FAILED"
    if not verification["conclusive"]:
        rows["note"] = (f"the adapter moves the logits by less than the {verification['dtype']} tolerance, so this "
                        "check cannot tell the merged model from the base; --dtype float32 checks it closely")
    return key_values("Merged", rows)


def _comparison(comparison: dict) -> str:
    return (f"max |Δlogit| {comparison['max_abs_logit_diff']:.3g}, "
            f"greedy agreement {comparison['greedy_agreement']:.1%}")


def adapters_table(entries: list, root: str) -> Table:
    """`peft adapters`: one row per adapter found; problems in place of the figures."""
    table = Table(title=f"Adapters in {root}", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    for column in ("name", "base model", "method", "rank", "params", "size", "eval loss", "date"):
        numeric = column in ("rank", "params", "size", "eval loss")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold",
                         min_width=10 if column in ("name", "base model") else None)
    for e in entries:
        if e.problem:
            table.add_row(e.name, f"[red]{e.problem}[/]", *[""] * 6)
            continue
        table.add_row(e.name, e.base, e.method, _or_dash(e.rank), _or_dash(e.trainable_params),
                      byte_size(e.weights_bytes), _or_dash(e.eval_loss), (e.date or "")[:10])
    return table


def _or_dash(value) -> str:
    return "—" if value is None else _format(value)


def byte_size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def combine_table(record: dict, where: str) -> Table:
    """`peft combine`'s result: the inputs and their weights, and with --verify how close the result is to each."""
    rows = {"output": where, "base": record["base"], "combination": record["how"], "rank": record["rank"]}
    if record["density"] is not None:
        rows["density"] = record["density"]
    check = record["verification"]
    for i, item in enumerate(record["inputs"], 1):
        line = f"{item['adapter']} (weight {item['weight']:g})"
        if check:
            line += "; combined vs it: " + _comparison(check["combined_vs_inputs"][i - 1])
        rows[f"input {i}"] = line
    if check:
        rows["combined vs base"] = _comparison(check["combined_vs_base"])
    return key_values("Combined", rows)


def params_tables(accounting) -> list[Table]:
    """peft count-params: the counts, the table of module kinds, and the memory estimate."""
    return [_counts_table(accounting), _modules_table(accounting.counts), _speed_table(accounting.memory),
            _memory_table(accounting.memory)]


def _counts_table(accounting) -> Table:
    c = accounting.counts
    f = c.adapter_file
    rows = {"model": f"{accounting.recipe.model.base} ({accounting.architecture})",
            "method": method_label(accounting.recipe.method.model_dump()),
            "total params": c.total,
            "trainable params": f"{c.trainable:,} ({c.trainable_percent:.4f}%)",
            "model file" if accounting.recipe.method.name == "full" else "adapter file":
                f"{_bytes(f['bytes'])} ({f['tensors']} tensors, {f['dtype']})"}
    if c.four_bit:
        rows["4-bit layers"] = "counted as peft counts them: 2 parameters per stored byte (the unquantized count)"
    return key_values("Parameters (as peft's get_nb_trainable_parameters() reports them)", rows)


def _modules_table(counts) -> Table:
    table = Table(title="Modules (--json gives their full paths)", title_justify="left", box=None, padding=(0, 1))
    table.add_column("module", overflow="fold")
    for column in ("count", "base each", "adapter each", "params"):
        table.add_column(column, justify="right", no_wrap=True)
    names = _short_names([g.name for g in counts.groups])
    for g in counts.groups:
        table.add_row(names[g.name], f"{g.modules:,}", _each(g.base_params_each, g.base_params, g.modules),
                      _each(g.adapter_params_each, g.adapter_params, g.modules), f"{g.params:,}")
    return table


def _short_names(names: list[str]) -> dict[str, str]:
    """Each module path by its shortest tail that no other path shares (q_proj, attn.c_proj, mlp.c_proj)."""
    short = {}
    for name in names:
        parts = name.split(".")
        for start in range(len(parts) - 1, -1, -1):
            tail = ".".join(parts[start:])
            if not any(other != name and (other == tail or other.endswith("." + tail)) for other in names):
                short[name] = tail
                break
    return short


def _each(value: int | None, total: int, modules: int) -> str:
    return f"{value:,}" if value is not None else f"{total / modules:,.0f} (mean)"


def _speed_table(memory) -> Table:
    """The speed settings the estimate assumes: peft train's, resolved as on a CUDA GPU."""
    path, step = memory.path, memory.step
    tokens = f"{step.tokens:,} tokens per step"
    rows = {"profile": path.profile,
            "packing": f"on: {tokens} in one row (the token budget of a micro-batch)" if path.packing else f"off: {tokens}, "
                       f"{step.rows} rows of {step.length:,}",
            "attention": path.attention, "liger kernels": _on(path.liger_kernels), "fused LoRA": _on(path.fused_lora),
            "gradient checkpointing": f"{memory.checkpointed} of {memory.layers} layers",
            "activation offload": _on(path.offload_activations),
            "embedding table in CPU memory": _on(path.offload_embeddings)}
    return key_values("Speed settings assumed (peft train's, resolved as on a CUDA GPU)", rows)


def _on(flag: bool) -> str:
    return "on" if flag else "off"


MEMORY_ROWS = [("weights (frozen)", "weights"), ("trainable parameters", "trainable"), ("gradients", "gradients"),
               ("optimizer states", "optimizer"), ("activations", "activations"),
               ("activations, checkpointed", "activations_checkpointed"), ("logits and loss", "logits"),
               ("framework overhead", "overhead")]


def _memory_table(memory) -> Table:
    title = (f"Training memory estimate: batch {memory.batch_size} × {memory.seq_len} tokens, CUDA, bf16 autocast, "
             f"{memory.optimizer}")
    table = Table(title=title, title_justify="left", box=None, padding=(0, 1))
    table.add_column("", no_wrap=True)
    for name, setup in memory.setups.items():
        mark = " ◀" if name == memory.selected else ""
        table.add_column(setup.label + mark, justify="right")
    setups = [s.as_dict(memory.checkpointed) for s in memory.setups.values()]
    for label, key in MEMORY_ROWS:
        table.add_row(label, *(_bytes(s[key]) for s in setups))
    totals = [("total", "total"), ("total, checkpointed", "total_checkpointed")]
    if 0 < memory.checkpointed < memory.layers:
        totals.append((f"total, {memory.checkpointed} of {memory.layers} layers checkpointed", "total_planned"))
    for label, key in totals:
        table.add_row(f"[bold]{label}[/]", *(f"[bold]{_bytes(s[key])}[/]" for s in setups))
    trained = "adapter" if "adapter" in memory.setups else memory.selected  # method full has one setup
    variants = memory.setups[trained].as_dict(memory.checkpointed)["optimizer_variants"]
    table.caption = (f"◀ what the recipe runs: {_bytes(memory.bytes)} with {memory.checkpointed} of {memory.layers} "
                     f"layers checkpointed. {trained.capitalize()} optimizer states: "
                     + ", ".join(f"{k} {_bytes(v)}" for k, v in variants.items())
                     + " (paged ones live in CUDA managed memory, outside torch's allocator). "
                     "Not counted: the CUDA context (~0.5 GiB)." + "".join(f" {note}." for note in memory.notes))
    table.caption_justify = "left"
    return table


def _bytes(value: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value} B"
