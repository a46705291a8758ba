"""`peft bench`: the standard workload reproduced, measured through peft train's code path."""

import json
import statistics

import pytest

from conftest import ROOT, no_traceback
from peftcli import bench

KEYS = {"tool", "workload", "size", "qlora", "profile", "real_tokens_per_s", "peak_gib", "loss", "steps",
        "timed_steps", "timed_tokens", "settings"}


def test_the_standard_rows_follow_the_workload():
    rows = bench.standard_rows(128256)
    lengths = [len(r) for r in rows]
    assert len(rows) == 2000 and min(lengths) >= 16 and max(lengths) <= 2048
    assert statistics.median(lengths) == pytest.approx(350, rel=0.08)
    assert max(lengths) == 2048  # the clamped long tail reaches the row length
    assert all(0 <= t < 128256 for t in rows[0]) and rows == bench.standard_rows(128256)


def test_the_standard_recipe_is_the_workloads_adapter_and_batch():
    recipe = bench.standard_recipe("8b", qlora=True, steps=25, overrides=["train.profile=lean"])
    assert recipe.model.base == "builtin:llama-8b-random" and recipe.model.load_in_4bit
    assert (recipe.method.r, recipe.method.alpha, recipe.method.dropout) == (16, 32.0, 0.0)
    assert recipe.method.target_modules == bench.PROJECTIONS
    assert recipe.train.max_tokens_per_batch == 4 * 2048 and recipe.train.max_steps == 25
    assert recipe.train.profile == "lean"


@pytest.fixture(scope="module")
def tiny_bench():
    from typer.testing import CliRunner

    from peftcli.cli import app

    return CliRunner().invoke(app, ["bench", "--size", "tiny", "--steps", "7", "--json"])


def test_bench_tiny_runs_on_a_cpu_and_prints_one_json_line(tiny_bench):
    assert tiny_bench.exit_code == 0, tiny_bench.output
    line = [l for l in tiny_bench.output.splitlines() if l.startswith("{")]
    assert len(line) == 1
    result = json.loads(line[0])
    assert KEYS <= set(result)
    assert result["tool"] == "peftcli" and result["workload"] == "standard" and result["size"] == "tiny"
    assert result["steps"] == 7 and result["timed_steps"] == 2
    # two timed batches of 4 rows of at most 2048 tokens (a CPU pads: packing needs varlen attention to pay)
    assert 2 * 4 * 16 <= result["timed_tokens"] <= 2 * 4 * 2048 and result["real_tokens_per_s"] > 0
    assert result["settings"]["packing"] == "off"
    assert result["settings"]["fused_lora"] == "14 layers" and result["settings"]["device"] == "cpu"
    assert 6 < result["loss"] < 8  # ln(1024) ≈ 6.93 for random tokens over the tiny vocabulary


def test_bench_a_recipe_runs_its_own_model_and_data(peft):
    result = peft("bench", ROOT / "recipes" / "tiny-gpt2-lora.yaml", "--steps", "6", "--json")
    assert result.code == 0, result
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["workload"] == "tiny-gpt2-lora" and data["settings"]["model"] == "builtin:tiny-gpt2"
    assert data["steps"] == 6


def test_a_recipe_lends_its_train_settings_to_the_standard_workload(write_recipe):
    path = write_recipe({"train": {"profile": "lean", "lr": 1e-3}})
    work = bench.workload(path, standard=True, size="tiny", qlora=False, steps=8, overrides=[])
    assert work.recipe.train.profile == "lean" and work.recipe.train.lr == 1e-3
    assert work.recipe.train.max_tokens_per_batch == 8192  # the workload's own, not the recipe's default


@pytest.mark.parametrize("args, where", [
    (["--steps", "5"], "--steps"),
    (["--size", "8b"], "--size"),
    (["--size", "tiny", "--qlora"], "--qlora"),
    (["--size", "3b"], "--size"),
    (["--workload", "huge"], "--workload"),
])
def test_bench_refuses_what_it_cannot_run(peft, args, where):
    result = peft("bench", *args)
    assert result.code == 2 and where in result.output and no_traceback(result.output)
