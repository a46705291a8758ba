"""Training data: rows loaded with `datasets`, rendered by format, tokenized with label masks.

Formats (`data.format`, or `auto` to pick one from the columns):
- alpaca:     instruction, output (input optional), rendered with the Alpaca prompt
- chat:       messages = [{role, content}, ...], rendered with the tokenizer's chat template
              (FALLBACK_CHAT_TEMPLATE, ChatML, when the tokenizer has none)
- completion: prompt, completion, concatenated as they are
- text:       text, all of it trained on
For alpaca, chat and completion the loss is on the response only (prompt labels are -100)
unless `data.train_on_prompt` is set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from peftcli.errors import UserError

BUILTIN_DATA = Path(__file__).parent / "assets" / "datasets"
IGNORE = -100  # the label that CrossEntropyLoss and transformers skip

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

    def as_dict(self) -> dict:
        return asdict(self)


def load_rows(spec: str, *, field: str = "data.train"):
    """The rows of a data file, a built-in dataset (builtin:NAME) or a hub dataset."""
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
            rows = _load_file(path, field)
        else:
            rows = datasets.load_dataset(spec, split="train")
    except UserError:
        raise
    except Exception as err:  # datasets raises many types; all mean "could not read these rows"
        if "corresponds to no data" in str(err):  # datasets' words for a file with a header and no row
            raise UserError(f"no rows in '{spec}'", where=field) from err
        raise UserError(f"cannot load data '{spec}': {_first_line(err)}", where=field,
                        hint=None if path.exists() else "offline, use a local file or builtin:NAME") from err
    if len(rows) == 0:
        raise UserError(f"no rows in '{spec}'", where=field)
    return rows


def _load_file(path: Path, field: str):
    import datasets

    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise UserError(f"cannot read '{path.suffix}' files", where=f"{field} ({path})",
                        hint=f"use one of: {', '.join(LOADERS)}")
    if path.stat().st_size == 0:
        raise UserError("the file is empty", where=f"{field} ({path})")
    _check_utf8(path, field)
    if path.suffix.lower() == ".jsonl":
        _check_jsonl(path, field)
    return datasets.load_dataset(loader, data_files=str(path), split="train", keep_in_memory=True)


def _check_utf8(path: Path, field: str) -> None:
    if path.suffix.lower() == ".parquet":
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"not UTF-8 text (byte {err.start} of the line)",
                                where=f"{path}:{number}", hint="save the file as UTF-8") from err


def _check_jsonl(path: Path, field: str) -> None:
    """datasets' own JSON errors name no line; find the line a person must fix."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"not valid JSON: {err.msg} (column {err.colno})", where=f"{path}:{number}") from err
            if not isinstance(row, dict):
                raise UserError(f"each line must be a JSON object, got {type(row).__name__}", where=f"{path}:{number}")


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


def tokenize(rows, tokenizer, *, fmt: str, max_length: int, train_on_prompt: bool, where: str):
    """Rows → input_ids / attention_mask / labels; examples with no target token left are dropped."""
    stats = DataStats(rows=len(rows))
    if fmt == "chat" and tokenizer.chat_template is None:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE

    def encode(row: dict, index: int) -> dict:
        segments = render(row, fmt, tokenizer, where=f"{where} row {index + 1}")
        ids, labels = [], []
        for i, (text, trained) in enumerate(segments):
            piece = tokenizer(text, add_special_tokens=(i == 0 and fmt != "chat"))["input_ids"]
            ids += piece
            labels += piece if (trained or train_on_prompt) else [IGNORE] * len(piece)
        if fmt != "chat" and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        truncated = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "truncated": truncated,
                "targets": sum(label != IGNORE for label in labels)}

    encoded = rows.map(encode, with_indices=True, remove_columns=rows.column_names, keep_in_memory=True)
    stats.truncated = sum(encoded["truncated"])
    encoded = encoded.filter(lambda targets: targets > 0, input_columns="targets", keep_in_memory=True)
    stats.examples = len(encoded)
    stats.dropped_no_target = stats.rows - stats.examples
    stats.tokens = sum(len(ids) for ids in encoded["input_ids"])
    stats.target_tokens = sum(encoded["targets"])
    if stats.examples == 0:
        raise UserError(f"no example has a token to train on after tokenizing to max_length={max_length}",
                        where=where, hint="raise data.max_length or check that responses are not empty")
    return encoded.remove_columns(["truncated", "targets"]), stats


def render(row: dict, fmt: str, tokenizer, *, where: str) -> list[tuple[str, bool]]:
    """The example as (text, trained) segments in order."""
    if fmt == "alpaca":
        instruction, output = _text(row, "instruction", where), _text(row, "output", where)
        extra = row.get("input") or ""
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
    if not isinstance(value, str):
        raise UserError(f"column '{column}' must be text, got {_show(value)}", where=where)
    return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
