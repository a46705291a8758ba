"""The run report: report.json for programs, report.md and loss.png for people."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("peftcli", "torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes")


def versions() -> dict[str, str | None]:
    import torch

    found = {"python": platform.python_version()}
    for name in PACKAGES:
        if name == "torch":  # its own version names its build (+cu130, +cpu), which some images' metadata leaves out
            found[name] = torch.__version__
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory(device: str | None = None) -> dict:
    """Peak GPU memory allocated by torch on CUDA (the device used, else any); else the process's
    peak resident memory."""
    import torch

    if device == "cuda" or (device is None and torch.cuda.is_available()):
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    else:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "cpu_max_rss"
    return {"peak_bytes": peak, "peak_gib": round(peak / 2**30, 3), "measure": kind}


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 50 else float("inf")


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write(report: dict, json_path: Path, md_path: Path, plot_path: Path) -> None:
    write_atomic(json_path, json.dumps(report, indent=2) + "\n")
    has_plot = plot_loss(report, plot_path)
    write_atomic(md_path, to_markdown(report, plot_path.name if has_plot else None))


def write_atomic(path: Path, text: str) -> None:
    """Write beside `path` and rename over it: a reader (or a crash) never sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def plot_loss(report: dict, path: Path) -> bool:
    losses = report["training"]["loss_history"]
    if not losses:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([p["step"] for p in losses], [p["loss"] for p in losses], label="train loss")
    evals = report["eval"]["history"]
    if evals:
        ax.plot([p["step"] for p in evals], [p["loss"] for p in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(report["name"])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, format="png")
    plt.close(fig)
    os.replace(partial, path)
    return True


def to_markdown(report: dict, plot_name: str | None) -> str:
    params, training, ev, mem = report["params"], report["training"], report["eval"], report["memory"]
    rows = [
        ("status", report["status"] + (f" ({report['stop_reason']})" if report.get("stop_reason") else "")),
        ("base model", report["model"]["base"]),
        ("method", method_label(report["method"])),
        ("trainable parameters", f"{params['trainable']:,} of {params['total']:,} ({params['trainable_percent']:.4f}%)"),
        ("steps", f"{training['steps']} ({training['epochs']:.2f} epochs)"),
        ("tokens trained", f"{training['tokens']:,}"),
        ("tokens/s", f"{training['tokens_per_s']:,.1f}"),
        ("final train loss", _fmt(training["final_loss"])),
        ("eval loss: base → trained", f"{_fmt(ev['base_loss'])} → {_fmt(ev['loss'])}"),
        ("eval perplexity: base → trained", f"{_fmt(ev['base_perplexity'])} → {_fmt(ev['perplexity'])}"),
        ("wall time", f"{report['wall_time_s']:.1f} s"),
        (f"peak memory ({mem['measure']})", f"{mem['peak_gib']:.3f} GiB"),
        ("speed settings", ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report["speed"].items())),
        _saved_size(report["artifacts"]),
        ("hardware", report["hardware"]["gpu"] or report["hardware"]["cpu"]),
        ("versions", ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)),
    ]
    if training.get("skipped_steps"):
        rows.append(("steps skipped (NaN/Inf)", ", ".join(map(str, training["skipped_steps"]))))
    if report["model"].get("trust_remote_code"):
        rows.append(("trust_remote_code", "on: model code shipped with the model was run"))
    if report["status"] != "completed" and report.get("checkpoint"):
        rows.append(("resume from", f"{report['checkpoint']} (`peft train RECIPE --resume`)"))
    data = report["data"]["train"]
    lines = [f"# Run report: {report['name']}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Data", "",
              f"{data['examples']:,} training examples from {data['rows']:,} rows "
              f"({data['truncated']} truncated at max_length, {data['dropped_no_target']} dropped with no target "
              f"token), {data['target_tokens']:,} target tokens per epoch."]
    lines += _left_out(report["data"])
    if plot_name:
        lines += ["", "## Loss", "", f"![loss]({plot_name})"]
    if "model_dir" in report["artifacts"]:
        lines += ["", "The fine-tuned model is in `model/`; load it with "
                  "`transformers.AutoModelForCausalLM.from_pretrained(\"model\")`.", ""]
    else:
        lines += ["", "The adapter is in `adapter/`; load it with "
                  "`peft.PeftModel.from_pretrained(base_model, \"adapter\")`.", ""]
    return "\n".join(lines)


def _saved_size(artifacts: dict) -> tuple[str, str]:
    if "model_dir" in artifacts:
        return "model size", _fmt_bytes(artifacts["model_bytes"])
    return "adapter size", _fmt_bytes(artifacts["adapter_bytes"])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _fmt_bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,} bytes"


def _left_out(data: dict) -> list[str]:
    """Markdown for examples dropped as too long and bad rows skipped (data.on_long, data.on_error)."""
    lines = []
    for split in ("train", "eval"):
        stats = data.get(split)
        if not stats:
            continue
        if stats.get("dropped_long"):
            lines += ["", f"{stats['dropped_long']} {split} examples longer than max_length were dropped."]
        if stats.get("skipped"):
            listed = stats["skipped_rows"]
            more = f" (the first {len(listed)} listed)" if len(listed) < stats["skipped"] else ""
            lines += ["", f"{stats['skipped']} bad {split} rows were skipped{more}:", ""]
            lines += [f"- {entry}" for entry in listed]
    return lines


def model_card(report: dict) -> str:
    """The adapter's README.md: what it is, how it was trained and how to load it."""
    method, params, ev = report["method"], report["params"], report["eval"]
    settings = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name")
    if method["name"] == "full":
        return _full_model_card(report, settings)
    if method["name"] == "mixed":
        settings = "; ".join(f"{c['name']}: " + ", ".join(f"{k}={v}" for k, v in c.items() if k != "name")
                             for c in method["components"])
    return "\n".join([
        "---", "library_name: peft", "tags: [peftcli, " + method["name"] + "]", "---", "",
        f"# {report['name']}", "",
        f"A {method_label(method)} adapter for `{report['model']['base']}`, trained with peftcli.", "",
        f"- method: {method_label(method)} ({settings})",
        f"- trainable parameters: {params['trainable']:,} of {params['total']:,} ({params['trainable_percent']:.4f}%)",
        f"- steps: {report['training']['steps']}, tokens: {report['training']['tokens']:,}",
        f"- eval loss: base {_fmt(ev['base_loss'])} → adapter {_fmt(ev['loss'])}", "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        *_loading_code(method["name"]),
        "```", ""])


def method_label(method: dict) -> str:
    """The method as people name it; several mixed ones joined: lora + loha."""
    if method["name"] == "mixed":
        return " + ".join(component["name"] for component in method["components"])
    return method["name"]


def _loading_code(method: str) -> list[str]:
    """Stock peft loads every method but the bottleneck adapter, which peftcli registers with peft first,
    and mixed methods, one adapter per part (see mixed.json) in a PeftMixedModel."""
    if method == "mixed":
        return ["from peftcli.methods import load_adapter  # PeftMixedModel.from_pretrained(base, \"adapter/1-...\"),",
                "base = AutoModelForCausalLM.from_pretrained(BASE)  # then load_adapter for each part, set_adapter(all)",
                "model = load_adapter(base, \"adapter\")"]
    if method == "adapter":
        return ["from peftcli.methods import load_adapter",
                "base = AutoModelForCausalLM.from_pretrained(BASE)  # the base model above",
                "model = load_adapter(base, \"adapter\")"]
    return ["from peft import PeftModel",
            "base = AutoModelForCausalLM.from_pretrained(BASE)  # the base model above",
            "model = PeftModel.from_pretrained(base, \"adapter\")"]


def _full_model_card(report: dict, settings: str) -> str:
    """A fully fine-tuned model's README.md: a plain transformers model, no adapter."""
    params, ev = report["params"], report["eval"]
    return "\n".join([
        "---", "library_name: transformers", f"base_model: {json.dumps(report['model']['base'])}",
        "tags: [peftcli, full-fine-tuning]", "---", "", f"# {report['name']}", "",
        f"`{report['model']['base']}` fully fine-tuned with peftcli (no adapter: the model's own weights trained).", "",
        f"- method: full ({settings})",
        f"- trainable parameters: {params['trainable']:,} of {params['total']:,} ({params['trainable_percent']:.4f}%)",
        f"- steps: {report['training']['steps']}, tokens: {report['training']['tokens']:,}",
        f"- eval loss: base {_fmt(ev['base_loss'])} → fine-tuned {_fmt(ev['loss'])}", "",
        "```python", "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("model")', "```", ""])
