"""Data: formats, label masks, truncation, and errors that name the file and row."""

import pytest

from conftest import write_jsonl
from peftcli.data import IGNORE, ROW, detect_format, load_rows, read_rows, tokenize
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


def read_and_encode(path, tokenizer, fmt="alpaca", **options):
    """Rows of `path` through read_rows and tokenize, as prepare_data does, with their line numbers."""
    source = read_rows(str(path), on_error=options.get("on_error", "raise"))
    data, stats = tokenize(source.numbered(), tokenizer, fmt=fmt, max_length=options.pop("max_length", 512),
                           train_on_prompt=False, where=f"data.train ({path.name})", unit=source.unit, **options)
    stats.note_skipped(source.skipped)
    return data, stats


BAD_ROWS = [
    '{"instruction": "a", "output": "ok"}\n',
    '{"instruction": "b", "output": "cut off\n',
    '\n',
    '{"instruction": "c", "output": 5}\n',
    '{"instruction": "d"}\n',
    '{"instruction": "e", "input": ["x"], "output": "y"}\n',
    '{"instruction": "f", "output": "fine"}\n',
]


def test_bad_rows_stop_with_the_line_that_holds_them(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(BAD_ROWS))
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid JSON: Unterminated string starting at \(column 32\)"):
        read_and_encode(path, tokenizer)
    path.write_text("".join(BAD_ROWS[:1] + BAD_ROWS[2:]))  # the blank line keeps later rows off their row number
    with pytest.raises(UserError, match=r"data.train \(d.jsonl\) line 3: column 'output' must be text, got 5"):
        read_and_encode(path, tokenizer)


def test_on_error_skip_leaves_bad_rows_out_and_lists_them(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(BAD_ROWS))
    data, stats = read_and_encode(path, tokenizer, on_error="skip")
    assert stats.examples == len(data) == 2
    assert stats.skipped == 4
    assert sorted(stats.skipped_rows) == sorted([
        "line 2: not valid JSON: Unterminated string starting at (column 32)",
        "line 4: column 'output' must be text, got 5",
        "line 5: column 'output' is missing",
        "line 6: column 'input' must be text, got ['x']",
    ])
    assert [tokenizer.decode(ids).split("### Instruction:\n")[1][0] for ids in data["input_ids"]] == ["a", "f"]


def test_every_line_bad_is_no_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("nope\n[1]\n")
    with pytest.raises(UserError, match=r"no rows in .* \(every line was skipped\)"):
        read_rows(str(path), on_error="skip")


def test_an_example_with_no_tokens_is_a_bad_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": ""}])
    with pytest.raises(UserError, match=r"line 2: the example tokenizes to no tokens"):
        read_and_encode(path, tokenizer, fmt="text")
    _, stats = read_and_encode(path, tokenizer, fmt="text", on_error="skip")
    assert (stats.examples, stats.skipped_rows) == (1, ["line 2: the example tokenizes to no tokens (is its text empty?)"])


@pytest.mark.parametrize("on_long, examples, truncated, dropped", [("truncate", 2, 1, 0), ("drop", 1, 0, 1)])
def test_on_long_truncates_or_drops_and_counts(tmp_path, tokenizer, on_long, examples, truncated, dropped):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "word " * 100}, {"text": "short"}])
    data, stats = read_and_encode(path, tokenizer, fmt="text", max_length=16, on_long=on_long)
    assert (stats.examples, stats.truncated, stats.dropped_long) == (examples, truncated, dropped)
    assert max(len(ids) for ids in data["input_ids"]) <= 16


def test_on_long_error_names_the_line_and_its_length(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"}, {"text": "word " * 100}])
    with pytest.raises(UserError) as err:
        read_and_encode(path, tokenizer, fmt="text", max_length=16, on_long="error")
    assert "data.train (d.jsonl) line 2: 302 tokens, more than data.max_length (16)" in str(err.value)
    assert "data.on_long: truncate or drop" in str(err.value)


def test_txt_rows_are_the_non_blank_lines_named_by_line(tmp_path, tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("first\n\n  \nsecond\r\n")
    source = read_rows(str(path))
    assert source.rows["text"] == ["first", "second"]
    assert source.numbered()[ROW] == [1, 4]


def test_a_malformed_csv_names_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nhi,there\na,b,c\n")
    with pytest.raises(UserError, match="cannot load data .*d.csv': .*Expected 2 fields in line 3, saw 3"):
        load_rows(str(path))


def test_prepare_data_names_the_file_line_even_after_the_eval_split(tmp_path):
    from conftest import ROOT, tiny_recipe
    from peftcli.recipe import validate_recipe
    from peftcli.train import prepare_data

    lines = (ROOT / "recipes" / "data" / "tiny.jsonl").read_text().splitlines(keepends=True)
    lines[40] = '{"instruction": "x", "output": null}\n'
    path = tmp_path / "d.jsonl"
    path.write_text("".join(lines))
    recipe = validate_recipe(tiny_recipe(data={"train": str(path), "eval_fraction": 0.5}), base_dir=tmp_path)
    with pytest.raises(UserError, match=r"d.jsonl\) line 41: column 'output' is missing"):
        prepare_data(recipe, load_tokenizer("builtin:tiny-gpt2"))
    recipe.data.on_error = "skip"
    _, train, train_stats, evaluation, eval_stats = prepare_data(recipe, load_tokenizer("builtin:tiny-gpt2"))
    assert train_stats.skipped + eval_stats.skipped == 1
    assert (train_stats.skipped_rows + eval_stats.skipped_rows) == ["line 41: column 'output' is missing"]
    assert len(train) + len(evaluation) == 63
