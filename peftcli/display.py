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
