"""Training data: rows loaded with `datasets`, rendered by format, tokenized with label masks.

Formats (`data.format`, or `auto` to pick one from the columns):
- alpaca:     instruction, output (input optional), rendered with the Alpaca prompt
- chat:       messages = [{role, content}, ...], rendered with the tokenizer's chat template
              (FALLBACK_CHAT_TEMPLATE, ChatML, when the tokenizer has none)
- completion: prompt, completion, concatenated as they are
- text:       text, all of it trained on
For alpaca, chat and completion the loss is on the response only (prompt labels are -100)
unless `data.train_on_prompt` is set.

Bad input names where it is: a file's line (.jsonl, .txt) or row, and the field. With
`data.on_error: skip` bad rows are left out and listed instead; `data.on_long` says what
happens to examples longer than `data.max_length`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftcli.errors import UserError

BUILTIN_DATA = Path(__file__).parent / "assets" / "datasets"
IGNORE = -100  # the label that CrossEntropyLoss and transformers skip
ROW = "__row__"  # a row's line or row number in its file, carried through the eval split into messages
LISTED_SKIPS = 100  # skipped rows listed one by one in the report; all are counted

FORMAT_COLUMNS = {  # checked in this order by `auto`
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n")
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class DataStats:
    """What tokenization did to one split; goes into the report."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    dropped_long: int = 0
    skipped: int = 0
    skipped_rows: list[str] = field(default_factory=list)  # "line 3: why", the first LISTED_SKIPS

    def as_dict(self) -> dict:
        return asdict(self)

    def note_skipped(self, entries: list[str]) -> None:
        self.skipped += len(entries)
        self.skipped_rows = (self.skipped_rows + entries)[:LISTED_SKIPS]


@dataclass
class Rows:
    """The rows read from one source, where each came from, and those left out (data.on_error: skip)."""

    rows: Any  # a datasets.Dataset
    lines: list[int] | None = None  # each row's line number, for line-based files (.jsonl, .txt)
    skipped: list[str] = field(default_factory=list)  # "line 3: why" for each line left out

    @property
    def unit(self) -> str:
        return "row" if self.lines is None else "line"

    def numbered(self):
        """The rows with a ROW column: each row's line (or row) number in its file."""
        numbers = self.lines if self.lines is not None else range(1, len(self.rows) + 1)
        return self.rows.add_column(ROW, list(numbers))


def load_rows(spec: str, *, field: str = "data.train", on_error: str = "raise"):
    """The rows of a data file, a built-in dataset (builtin:NAME) or a hub dataset."""
    return read_rows(spec, field=field, on_error=on_error).rows


def read_rows(spec: str, *, field: str = "data.train", on_error: str = "raise") -> Rows:
    """load_rows, with where each row came from and the lines skipped (on_error: skip)."""
    import datasets

    datasets.disable_progress_bars()
    if spec.startswith("builtin:"):
        path = BUILTIN_DATA / f"{spec.removeprefix('builtin:')}.jsonl"
        if not path.exists():
            names = ", ".join(f"builtin:{p.stem}" for p in sorted(BUILTIN_DATA.glob("*.jsonl")))
            raise UserError(f"unknown built-in dataset '{spec}'", where=field, hint=f"built-in datasets: {names}")
        spec = str(path)
    path = Path(spec)
    try:
        if path.is_file():
            found = _load_file(path, field, on_error)
        else:
            found = Rows(datasets.load_dataset(spec, split="train"))
    except UserError:
        raise
    except Exception as err:  # datasets raises many types; all mean "could not read these rows"
        if "corresponds to no data" in str(err):  # datasets' words for a file with a header and no row
            raise UserError(f"no rows in '{spec}'", where=field) from err
        if path.exists():  # a reader's error inside datasets' wrapper names the line at fault
            raise UserError(f"cannot load data '{spec}': {_first_line(_root_cause(err))}", where=field) from err
        raise UserError(f"cannot load data '{spec}': {_first_line(err)}", where=field,
                        hint="offline, use a local file or builtin:NAME") from err
    if len(found.rows) == 0:
        raise UserError(f"no rows in '{spec}'" + (" (every line was skipped)" if found.skipped else ""), where=field)
    return found


def _load_file(path: Path, field: str, on_error: str) -> Rows:
    import datasets

    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise UserError(f"cannot read '{path.suffix}' files", where=f"{field} ({path})",
                        hint=f"use one of: {', '.join(LOADERS)}")
    if path.stat().st_size == 0:
        raise UserError("the file is empty", where=f"{field} ({path})")
    if path.suffix.lower() in (".jsonl", ".txt"):
        return _load_lines(path, on_error)
    _check_utf8(path, field)
    return Rows(datasets.load_dataset(loader, data_files=str(path), split="train", keep_in_memory=True))


def _load_lines(path: Path, on_error: str) -> Rows:
    """A .jsonl or .txt file, one row a line, each line checked so that an error names it.

    Blank lines hold no row. A .jsonl line that is not a JSON object stops the load, or is
    left out and listed with data.on_error: skip."""
    import datasets

    json_lines = path.suffix.lower() == ".jsonl"
    lines, texts, skipped, number = [], [], [], 0
    with path.open("rb") as f:  # lines end at b"\n" only, as for the JSON reader
        for number, raw in enumerate(f, 1):
            text = _decode(raw, path, number).rstrip("\r\n")
            if not text.strip():
                continue
            problem = _json_object_problem(text) if json_lines else None
            if problem and on_error == "raise":
                raise UserError(problem, where=f"{path}:{number}")
            if problem:
                skipped.append(f"line {number}: {problem}")
                continue
            lines.append(number)
            texts.append(text)
    if not json_lines:
        return Rows(datasets.Dataset.from_dict({"text": texts}), lines)
    if not lines:
        return Rows(datasets.Dataset.from_dict({}), lines, skipped)
    rows = _read_json_lines(path, keep=None if len(lines) == number else set(lines))
    return Rows(rows, lines if len(rows) == len(lines) else None, skipped)


def _read_json_lines(path: Path, *, keep: set[int] | None):
    """The JSON reader's rows of `path`, from the lines numbered in `keep` (all when None).

    Blank and skipped lines are left out of a copy: the reader's fallback for a column of
    mixed types fails on a blank line."""
    import datasets

    if keep is None:
        return datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    with tempfile.TemporaryDirectory() as folder:
        kept = Path(folder) / path.name
        with path.open("rb") as source, kept.open("wb") as target:
            target.writelines(line for number, line in enumerate(source, 1) if number in keep)
        return datasets.load_dataset("json", data_files=str(kept), split="train", keep_in_memory=True)


def _decode(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"not UTF-8 text (byte {err.start} of the line)", where=f"{path}:{number}",
                        hint="save the file as UTF-8") from err


def _json_object_problem(text: str) -> str | None:
    """Why a .jsonl line is not a row, or None."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not valid JSON: {err.msg} (column {err.colno})"
    return None if isinstance(row, dict) else f"each line must be a JSON object, got {type(row).__name__}"


def _check_utf8(path: Path, field: str) -> None:
    if path.suffix.lower() == ".parquet":
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            _decode(line, path, number)


def detect_format(columns: list[str], fmt: str, *, where: str) -> str:
    """The format to use: `fmt` if its columns are present, or the one `auto` recognises."""
    if fmt != "auto":
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in columns]
        if missing:
            raise UserError(f"format '{fmt}' needs columns {list(FORMAT_COLUMNS[fmt])}; missing {missing}, "
                            f"found {columns}", where=where, hint="rename the columns or set data.format")
        return fmt
    for name, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return name
    expected = "; ".join(f"{k}: {list(v)}" for k, v in FORMAT_COLUMNS.items())
    raise UserError(f"cannot tell the format from the columns {columns}", where=where,
                    hint=f"each format expects ({expected})")


def tokenize(rows, tokenizer, *, fmt: str, max_length: int, train_on_prompt: bool, where: str,
             on_long: str = "truncate", on_error: str = "raise", unit: str = "row"):
    """Rows → input_ids / attention_mask / labels.

    Examples longer than max_length are truncated, dropped or refused (`on_long`); a bad row
    raises or is skipped (`on_error`); examples with no target token left are dropped. A row
    is named by its ROW column (its line or row number in the file, `unit`) when it has one."""
    stats = DataStats(rows=len(rows))
    if fmt == "chat" and tokenizer.chat_template is None:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE

    def encode(row: dict, index: int) -> dict:
        name = f"{unit} {row.get(ROW) or index + 1}"
        try:
            ids, labels = _token_ids(row, fmt, tokenizer, train_on_prompt, where=f"{where} {name}")
        except UserError as err:
            if on_error == "raise":
                raise
            return {"input_ids": [], "attention_mask": [], "labels": [], "long": False, "targets": 0,
                    "problem": f"{name}: {err.message}"}
        long = len(ids) > max_length
        if long and on_long == "error":
            raise UserError(f"{len(ids):,} tokens, more than data.max_length ({max_length})", where=f"{where} {name}",
                            hint="raise data.max_length, or set data.on_long: truncate or drop")
        ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "long": long,
                "targets": sum(label != IGNORE for label in labels), "problem": None}

    encoded = rows.map(encode, with_indices=True, remove_columns=rows.column_names, keep_in_memory=True)
    problems = [p for p in encoded["problem"] if p is not None]
    stats.note_skipped(problems)
    long_rows = sum(encoded["long"])
    stats.truncated, stats.dropped_long = (long_rows, 0) if on_long == "truncate" else (0, long_rows)
    drop_long = on_long == "drop"

    def kept(targets: int, long: bool, problem: str | None) -> bool:
        return problem is None and targets > 0 and not (long and drop_long)

    encoded = encoded.filter(kept, input_columns=["targets", "long", "problem"], keep_in_memory=True)
    stats.examples = len(encoded)
    stats.dropped_no_target = stats.rows - stats.examples - stats.skipped - stats.dropped_long
    stats.tokens = sum(len(ids) for ids in encoded["input_ids"])
    stats.target_tokens = sum(encoded["targets"])
    if stats.examples == 0:
        raise UserError(f"no example has a token to train on after tokenizing to max_length={max_length} "
                        f"({stats.skipped} bad rows skipped, {stats.dropped_long} too long dropped, "
                        f"{stats.dropped_no_target} with no target token)", where=where,
                        hint="raise data.max_length or check that responses are not empty")
    return encoded.remove_columns(["long", "targets", "problem"]), stats


def _token_ids(row: dict, fmt: str, tokenizer, train_on_prompt: bool, *, where: str) -> tuple[list, list]:
    """The example's token ids and labels (IGNORE where no loss is taken), before truncation."""
    ids, labels = [], []
    for i, (text, trained) in enumerate(render(row, fmt, tokenizer, where=where)):
        piece = tokenizer(text, add_special_tokens=(i == 0 and fmt != "chat"))["input_ids"]
        ids += piece
        labels += piece if (trained or train_on_prompt) else [IGNORE] * len(piece)
    if not ids:
        raise UserError("the example tokenizes to no tokens (is its text empty?)", where=where)
    if fmt != "chat" and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def render(row: dict, fmt: str, tokenizer, *, where: str) -> list[tuple[str, bool]]:
    """The example as (text, trained) segments in order."""
    if fmt == "alpaca":
        instruction, output = _text(row, "instruction", where), _text(row, "output", where)
        extra = _text(row, "input", where) if row.get("input") is not None else ""
        template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT
        return [(template.format(instruction=instruction, input=extra), False), (output, True)]
    if fmt == "completion":
        return [(_text(row, "prompt", where), False), (_text(row, "completion", where), True)]
    if fmt == "text":
        return [(_text(row, "text", where), True)]
    return _chat_segments(row.get("messages"), tokenizer, where)


def _chat_segments(messages, tokenizer, where: str) -> list[tuple[str, bool]]:
    """Render growing prefixes of the conversation: each assistant turn's added text is trained on.

    Chat templates render a conversation's prefix as a prefix of the whole; where one does not,
    the response cannot be separated from the prompt and the error says so."""
    _check_messages(messages, where)

    def rendered(upto: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = rendered(i, True), rendered(i + 1, False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError("the chat template does not render the conversation's turns as prefixes of it, so "
                            "the response cannot be told from the prompt", where=where,
                            hint="set data.train_on_prompt: true, or use the completion format")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = rendered(len(messages), False)[len(done):]
    return segments + ([(rest, False)] if rest else [])


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"'messages' must be a non-empty list of {{role, content}}, got {_show(messages)}", where=where)
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise UserError(f"messages[{i}] must be {{role: str, content: str}}, got {_show(message)}", where=where)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("the conversation has no assistant message to learn from", where=where)
    if messages[0]["role"] == "assistant":
        raise UserError("the conversation starts with an assistant message; it needs a prompt first", where=where)


def _text(row: dict, column: str, where: str) -> str:
    value = row.get(column)
    if value is None:
        raise UserError(f"column '{column}' is missing", where=where)
    if not isinstance(value, str):
        raise UserError(f"column '{column}' must be text, got {_show(value)}", where=where)
    return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
