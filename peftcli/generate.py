"""Trying a model: stream a completion from a base model, a trained adapter (a run or an adapter
directory) or a merged model, so that the adapter's effect can be seen and compared.

Several adapters can share one base (`load_with_adapters`): the base is loaded once, each adapter
is attached under its name, and `use` switches between them (or to the base alone) in place."""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

from transformers import TextStreamer

from peftcli import adapters, models
from peftcli.data import FALLBACK_CHAT_TEMPLATE
from peftcli.errors import UserError


BASE = "base"  # the name that selects the base model alone, adapters switched off
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # peft keeps adapters in module dicts: no dots


@dataclass
class Loaded:
    """A model ready to generate, its tokenizer, and a line saying what it is; with adapters, the
    ones it holds by name, each one's tokenizer (its chat template) and the one in use."""

    model: Any
    tokenizer: Any
    description: str
    adapters: dict[str, adapters.AdapterSource] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    active: str | None = None  # an adapter's name, BASE, or None for a model without adapters

    def use(self, name: str) -> None:
        """Switch to the adapter `name`, or to the base model alone with BASE."""
        if not self.adapters:
            raise UserError("this model holds no adapters to switch between",
                            hint="load adapters with --adapter NAME=DIR")
        if name != BASE and name not in self.adapters:
            raise UserError(f"no adapter named '{name}'", hint=f"choose one of: {', '.join([*self.adapters, BASE])}")
        if name != BASE:
            source = self.adapters[name]  # a mixed adapter is its parts, all active
            self.model.set_adapter([p["name"] for p in source.parts] if source.peft_type == "MIXED" else name)
        self.active, self.tokenizer = name, self.tokenizers[name]

    def switched(self):
        """The context to generate in: adapters off for the base, else as they are."""
        return self.model.disable_adapter() if self.active == BASE else nullcontext()


def load(target: str, *, adapter_options: list[str] | None = None, use: str | None = None, base: str | None = None,
         dtype: str = "auto", device: str = "cpu") -> Loaded:
    """What `peft generate` and `peft chat` load: `target` alone (a model, a run, an adapter
    directory), or with `--adapter NAME=DIR` options the base `target` and those adapters."""
    if adapter_options:
        if base is not None:
            raise UserError("--base goes with a single run or adapter; with --adapter, the first argument is the base",
                            where="--base", hint="drop --base")
        return load_with_adapters(target, parse_adapter_options(adapter_options), use=use, dtype=dtype, device=device)
    loaded = load_for_inference(target, base=base, dtype=dtype, device=device)
    if use is not None:
        loaded.use(use)
    return loaded


def parse_adapter_options(values: list[str]) -> dict[str, str]:
    """`--adapter NAME=DIR` options as name → directory, in the order given."""
    named: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter takes NAME=DIR (got '{value}')", where="--adapter",
                            hint="e.g. --adapter contacts=runs/contacts")
        if name in named:
            raise UserError(f"two adapters are named '{name}'", where="--adapter", hint="give each a different name")
        named[name] = path
    return named


def load_for_inference(target: str, *, base: str | None = None, dtype: str = "auto", device: str = "cpu") -> Loaded:
    """A run or adapter directory (base + adapter, through peft), or a model (base or merged).

    `dtype` "auto" keeps the dtype the weights are stored in; a QLoRA adapter on a GPU gets its
    base in 4-bit, as in training."""
    import torch

    dtype_arg = "auto" if dtype == "auto" else getattr(torch, dtype)
    if adapters.is_adapter_path(target):
        source = adapters.find_adapter(target, base)
        four_bit = source.load_in_4bit and device == "cuda"
        if four_bit and dtype == "auto":
            dtype_arg = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        model = adapters.attach(adapters.load_base(source, dtype=dtype_arg, device=device, four_bit=four_bit), source)
        description = f"{source.base} + {source.method} adapter {source.adapter_dir}" + (" (4-bit base)" if four_bit else "")
        tokenizer = adapters.load_tokenizer(source)
        return Loaded(model, tokenizer, description, {"default": source},
                      {"default": tokenizer, BASE: tokenizer}, "default")
    if base is not None:
        raise UserError("--base goes with an adapter, and this is a model", where=target,
                        hint="drop --base, or give a run directory or an adapter directory")
    full_model = adapters.full_run_model(target)
    model, tokenizer = _load_model(str(full_model or target), dtype_arg, device)
    return Loaded(model, tokenizer, f"{full_model} (fully fine-tuned)" if full_model else target)


def load_with_adapters(base: str, named: dict[str, str], *, use: str | None = None, dtype: str = "auto",
                       device: str = "cpu") -> Loaded:
    """The base model loaded once, with each adapter (name → run or adapter directory) attached under
    its name; `use` (default: the first adapter) is switched on. Adapters of one method share a
    PeftModel; of different methods, a PeftMixedModel (LoRA, LoHa, LoKr, AdaLoRA, OFT, SHiRA)."""
    import torch

    if adapters.is_adapter_path(base):
        raise UserError("with --adapter, the first argument is the base model, and this is an adapter", where=base,
                        hint=f"give the base model first and this one as --adapter NAME={base}")
    for name in named:
        check_adapter_name(name)
    sources = {name: adapters.find_adapter(path, base) for name, path in named.items()}
    mixed = _needs_mixed_model(sources)
    model, base_tokenizer = _load_model(base, "auto" if dtype == "auto" else getattr(torch, dtype), device)
    tokenizers = {BASE: base_tokenizer}
    for name, source in sources.items():
        model = adapters.attach(model, source, adapter_name=name, mixed=mixed)
        tokenizers[name] = adapters.load_tokenizer(source)
    listed = ", ".join(f"{name} ({source.method})" for name, source in sources.items())
    loaded = Loaded(model, base_tokenizer, f"{base} + adapters {listed}", sources, tokenizers, BASE)
    loaded.use(use or next(iter(sources)))
    return loaded


def check_adapter_name(name: str) -> None:
    if name == BASE:
        raise UserError(f"'{BASE}' is reserved: it selects the base model alone", where=f"--adapter {name}=...",
                        hint="give the adapter another name")
    if not ADAPTER_NAME.match(name):
        raise UserError(f"an adapter's name is letters, digits, _ and - (got '{name}')", where="--adapter",
                        hint="write --adapter NAME=DIR, e.g. --adapter contacts=runs/contacts")


def _needs_mixed_model(sources: dict[str, adapters.AdapterSource]) -> bool:
    """Whether the adapters are of several methods (peft's mixed model holds them); refuse those it cannot."""
    from peft.tuners.mixed.model import COMPATIBLE_TUNER_TYPES

    for name, source in sources.items():
        if source.peft_type == "MIXED" and len(sources) > 1:
            raise UserError(f"adapter '{name}' mixes methods ({source.method}) in one peft mixed model, which is "
                            "used alone", where=str(source.adapter_dir), hint=f"peft generate {source.adapter_dir}")
    kinds = {source.peft_type for source in sources.values()}
    if len(kinds) < 2:
        return False
    mixable = {str(kind.value) for kind in COMPATIBLE_TUNER_TYPES}
    for name, source in sources.items():
        if source.peft_type not in mixable:
            raise UserError(f"adapter '{name}' is {source.method}, and adapters of different methods share one base "
                            f"only through peft's mixed model, which takes {', '.join(sorted(mixable)).lower()}",
                            where=str(source.adapter_dir), hint="load it on its own, or with adapters of its method only")
    return True


def _load_model(target: str, dtype, device: str):
    try:
        model = models.load_model(target, dtype=dtype, device_map={"": device})
        tokenizer = models.load_tokenizer(target)
    except UserError as err:
        raise UserError(err.message, where=target, hint=err.hint) from err
    return model.eval(), tokenizer


def generate(loaded: Loaded, prompt: str | list[dict], *, max_new_tokens: int = 128, temperature: float = 0.7,
             chat: bool = False, on_text: Callable[[str], None] = print) -> str:
    """Generate a completion of `prompt` (with `chat`, a message or a conversation: a list of
    {role, content}), handing each piece of text to `on_text` as it is decoded; returns the whole
    completion. Temperature 0 is greedy decoding."""
    import torch

    tokenizer = loaded.tokenizer
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    device = next(loaded.model.parameters()).device
    # A chat template writes its own special tokens; plain text gets the tokenizer's usual ones.
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode(), loaded.switched():
        output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                       streamer=_Streamer(tokenizer, on_text), **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def chat_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """`prompt` as a user turn (or a conversation, ending with the user's turn) in the tokenizer's chat
    template (ChatML when it has none, as in training), ready for the assistant's answer."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=True,
                                         chat_template=tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE)


class _Streamer(TextStreamer):
    """transformers' TextStreamer (it decodes whole words as they complete), writing to `on_text`."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


CHAT_HELP = ("/use NAME switches to an adapter (/use base: the base alone), /adapters lists them, "
             "/reset forgets the conversation, /exit (or end of input) quits")


@dataclass
class ChatSession:
    """One conversation: its history (kept across adapter switches, so that adapters can be compared
    on the same conversation) and the commands that steer it."""

    loaded: Loaded
    max_new_tokens: int = 128
    temperature: float = 0.7
    history: list[dict] = field(default_factory=list)

    def command(self, line: str) -> str:
        """Run a /command; returns what to show. Raises UserError for a command it does not know."""
        word, _, argument = line.partition(" ")
        if word == "/use" and argument.strip():
            self.loaded.use(argument.strip())
            return f"using {self.loaded.active}"
        if word == "/adapters":
            return self.adapter_list()
        if word == "/reset":
            self.history.clear()
            return "conversation forgotten"
        if word == "/help":
            return CHAT_HELP
        raise UserError(f"unknown command '{line}'", hint=CHAT_HELP)

    def adapter_list(self) -> str:
        if not self.loaded.adapters:
            return f"no adapters: {self.loaded.description}"
        rows = [f"{'*' if name == self.loaded.active else ' '} {name}  {source.method}  {source.adapter_dir}"
                for name, source in self.loaded.adapters.items()]
        return "\n".join(rows + [f"{'*' if self.loaded.active == BASE else ' '} {BASE}  (no adapter)"])

    def reply(self, message: str, on_text: Callable[[str], None]) -> str:
        """The model's answer to `message` after the conversation so far, streamed to `on_text`."""
        self.history.append({"role": "user", "content": message})
        answer = generate(self.loaded, self.fitted_history(), max_new_tokens=self.max_new_tokens,
                          temperature=self.temperature, chat=True, on_text=on_text)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def fitted_history(self) -> list[dict]:
        """The latest turns that fit the model's context with room for the answer: the oldest
        exchanges are dropped first, the newest message is always kept."""
        limit = getattr(self.loaded.model.config, "max_position_embeddings", None)
        turns = list(self.history)
        while limit and len(turns) > 1 and self._length(turns) + self.max_new_tokens > limit:
            turns = turns[2:] if len(turns) > 2 else turns[1:]
        return turns

    def _length(self, turns: list[dict]) -> int:
        return len(self.loaded.tokenizer(chat_prompt(self.loaded.tokenizer, turns), add_special_tokens=False).input_ids)


def run_chat(session: ChatSession, *, read: Callable[[str], str], show: Callable[[str], None],
             stream: Callable[[str], None]) -> None:
    """The interactive loop: read a line, answer it (streamed) or run its /command; until /exit or
    the end of input. A mistaken command is reported and the conversation goes on."""
    while True:
        try:
            line = read(f"{session.loaded.active or 'you'}> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if not line:
            continue
        if line.startswith("/"):
            try:
                show(session.command(line))
            except UserError as err:
                show(f"error: {err}")
            continue
        session.reply(line, stream)
        stream("\n")
