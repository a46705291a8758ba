"""peft adapters: every run and adapter directory in a folder, with its figures; broken ones named."""

import json
import shutil

from peft import LoHaConfig

from conftest import no_traceback, save_adapter
from peftcli.catalog import scan, tensor_elements


def test_runs_and_adapter_directories_are_listed_with_their_figures(peft, task_runs, tmp_path):
    runs = task_runs["contacts"].parent
    folder = tmp_path / "many"
    shutil.copytree(runs, folder / "runs")
    save_adapter(folder / "loose" / "loha", "builtin:tiny-llama", LoHaConfig(r=2, alpha=4, target_modules=["q_proj"]))
    # A checkpoint holds an adapter too, and is part of its run: not listed.
    shutil.copytree(folder / "runs" / "count" / "adapter", folder / "runs" / "count" / "checkpoints" / "checkpoint-3")
    broken = shutil.copytree(folder / "loose" / "loha", folder / "loose" / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")

    entries = {e.name: e for e in scan(folder)}
    assert list(entries) == ["loose/broken", "loose/loha", "runs/contacts", "runs/count"]
    contacts, count, loha = entries["runs/contacts"], entries["runs/count"], entries["loose/loha"]
    report = json.loads((task_runs["contacts"] / "report.json").read_text())
    assert (contacts.base, contacts.method, contacts.rank) == ("builtin:tiny-gpt2", "lora", 4)
    assert contacts.trainable_params == report["params"]["trainable"]
    assert contacts.eval_loss == report["eval"]["loss"] and contacts.date == report["started_at"]
    assert count.eval_loss is None and count.trainable_params > contacts.trainable_params  # c_fc as well
    assert contacts.weights_bytes == (task_runs["contacts"] / "adapter" / "adapter_model.safetensors").stat().st_size
    assert (loha.base, loha.method, loha.rank, loha.eval_loss) == ("builtin:tiny-llama", "loha", 2, None)
    assert loha.trainable_params == tensor_elements(folder / "loose" / "loha" / "adapter_model.safetensors") > 0
    assert "corrupt or truncated" in entries["loose/broken"].problem

    table = peft("adapters", folder)
    assert table.code == 0, table
    for name in entries:
        assert name in table.output
    assert f"{contacts.eval_loss:.4f}" in table.output and "corrupt or truncated" in table.output
    listed = peft("adapters", folder, "--json")
    assert listed.code == 0 and json.loads(listed.output) == [e.as_dict() for e in entries.values()]


def test_an_empty_or_missing_folder(peft, tmp_path):
    empty = peft("adapters", tmp_path)
    assert empty.code == 0 and "no run or adapter directory" in empty.output
    assert peft("adapters", tmp_path, "--json").output.strip() == "[]"
    missing = peft("adapters", tmp_path / "nothing")
    assert missing.code == 2 and "no such folder" in missing.output and no_traceback(missing.output)
