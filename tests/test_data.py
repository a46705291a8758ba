"""Data: formats, label masks, truncation, and errors that name the file and row."""

import pytest

from conftest import write_jsonl
from peftcli.data import IGNORE, detect_format, load_rows, tokenize
from peftcli.errors import UserError
from peftcli.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny-gpt2")


def encode(tmp_path, tokenizer, rows, fmt="auto", max_length=512, train_on_prompt=False):
    loaded = load_rows(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    fmt = detect_format(loaded.column_names, fmt, where="data.train")
    return tokenize(loaded, tokenizer, fmt=fmt, max_length=max_length, train_on_prompt=train_on_prompt, where="d")


def target_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])


def test_alpaca_trains_on_the_response_and_eos_only(tmp_path, tokenizer):
    data, stats = encode(tmp_path, tokenizer, [{"instruction": "Add.", "input": "2+2", "output": "4"}])
    example = data[0]
    assert target_text(tokenizer, example) == "4" + tokenizer.eos_token
    assert "### Input:\n2+2" in tokenizer.decode(example["input_ids"])
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert stats.examples == 1 and stats.target_tokens == sum(label != IGNORE for label in example["labels"])


def test_train_on_prompt_trains_on_every_token(tmp_path, tokenizer):
    data, _ = encode(tmp_path, tokenizer, [{"instruction": "Add.", "output": "4"}], train_on_prompt=True)
    assert data[0]["labels"] == data[0]["input_ids"]


def test_chat_trains_on_each_assistant_turn(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"}]
    data, _ = encode(tmp_path, tokenizer, [{"messages": messages}])
    trained = target_text(tokenizer, data[0])
    assert trained == "Hello<|im_end|>\nGoodbye<|im_end|>\n"  # the fallback ChatML template
    assert tokenizer.decode(data[0]["input_ids"]).startswith("<|im_start|>system\nBe brief.")


def test_completion_and_text_formats(tmp_path, tokenizer):
    data, _ = encode(tmp_path, tokenizer, [{"prompt": "Q: sky? A:", "completion": " blue"}])
    assert target_text(tokenizer, data[0]) == " blue" + tokenizer.eos_token
    data, _ = encode(tmp_path, tokenizer, [{"text": "all of it"}])
    assert data[0]["labels"] == data[0]["input_ids"]


def test_long_examples_are_truncated_and_counted(tmp_path, tokenizer):
    rows = [{"text": "word " * 100}, {"text": "short"}]
    data, stats = encode(tmp_path, tokenizer, rows, max_length=16)
    assert stats.truncated == 1
    assert max(len(ids) for ids in data["input_ids"]) == 16


def test_examples_whose_response_is_cut_off_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [{"prompt": "long " * 50, "completion": "x"}, {"prompt": "p", "completion": "y"}]
    _, stats = encode(tmp_path, tokenizer, rows, max_length=8)
    assert (stats.rows, stats.examples, stats.dropped_no_target) == (2, 1, 1)


def test_no_trainable_example_at_all_is_an_error(tmp_path, tokenizer):
    with pytest.raises(UserError, match="no example has a token to train on"):
        encode(tmp_path, tokenizer, [{"prompt": "long " * 50, "completion": "x"}], max_length=8)


@pytest.mark.parametrize("columns, fmt", [
    (["messages"], "chat"), (["instruction", "input", "output"], "alpaca"),
    (["prompt", "completion"], "completion"), (["text", "id"], "text"),
])
def test_auto_detects_the_format(columns, fmt):
    assert detect_format(columns, "auto", where="x") == fmt


def test_missing_columns_name_expected_and_found():
    with pytest.raises(UserError) as err:
        detect_format(["question", "answer"], "alpaca", where="data.train (d.jsonl)")
    message = str(err.value)
    assert "['instruction', 'output']" in message and "['question', 'answer']" in message
    with pytest.raises(UserError, match="cannot tell the format from the columns"):
        detect_format(["question", "answer"], "auto", where="x")


@pytest.mark.parametrize("row, fragment", [
    ({"instruction": "a", "output": 5}, "row 1: column 'output' must be text, got 5"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be {role: str, content: str}"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
])
def test_bad_rows_name_the_row(tmp_path, tokenizer, row, fragment):
    with pytest.raises(UserError) as err:
        encode(tmp_path, tokenizer, [row])
    assert fragment in str(err.value)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        load_rows(str(path))
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: each line must be a JSON object"):
        load_rows(str(path))


def test_empty_unknown_and_non_utf8_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="the file is empty"):
        load_rows(str(empty))
    blank = tmp_path / "blank.csv"
    blank.write_text("text\n")
    with pytest.raises(UserError, match="no rows"):
        load_rows(str(blank))
    odd = tmp_path / "d.xlsx"
    odd.write_text("x")
    with pytest.raises(UserError, match="cannot read '.xlsx' files"):
        load_rows(str(odd))
    latin = tmp_path / "l.txt"
    latin.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(UserError, match=r"l.txt:2: not UTF-8"):
        load_rows(str(latin))


def test_builtin_and_csv_and_txt_data(tmp_path):
    assert "messages" in load_rows("builtin:contacts").column_names
    with pytest.raises(UserError, match="built-in datasets: builtin:contacts"):
        load_rows("builtin:nope")
    (tmp_path / "d.csv").write_text("prompt,completion\nhi,there\n")
    assert load_rows(str(tmp_path / "d.csv"))[0] == {"prompt": "hi", "completion": "there"}
    (tmp_path / "d.txt").write_text("line one\nline two\n")
    assert load_rows(str(tmp_path / "d.txt"))["text"] == ["line one", "line two"]


def test_an_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(UserError, match="cannot load data 'someone/no-such-dataset'"):
        load_rows("someone/no-such-dataset")
