"""How results look in the terminal: one rich console and a renderer per kind of result."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

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
