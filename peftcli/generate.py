"""Trying a model: stream a completion from a base model, a trained adapter (a run or an adapter
directory) or a merged model, so that the adapter's effect can be seen and compared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from transformers import TextStreamer

from peftcli import adapters, models
from peftcli.data import FALLBACK_CHAT_TEMPLATE
from peftcli.errors import UserError


@dataclass
class Loaded:
    """A model ready to generate, its tokenizer, and a line saying what it is."""

    model: Any
    tokenizer: Any
    description: str


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
        return Loaded(model, adapters.load_tokenizer(source), description)
    if base is not None:
        raise UserError("--base goes with an adapter, and this is a model", where=target,
                        hint="drop --base, or give a run directory or an adapter directory")
    try:
        model = models.load_model(target, dtype=dtype_arg, device_map={"": device})
        tokenizer = models.load_tokenizer(target)
    except UserError as err:
        raise UserError(err.message, where=target, hint=err.hint) from err
    return Loaded(model.eval(), tokenizer, target)


def generate(loaded: Loaded, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.7,
             chat: bool = False, on_text: Callable[[str], None] = print) -> str:
    """Generate a completion of `prompt`, handing each piece of text to `on_text` as it is decoded;
    returns the whole completion. Temperature 0 is greedy decoding."""
    import torch

    tokenizer = loaded.tokenizer
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    device = next(loaded.model.parameters()).device
    # A chat template writes its own special tokens; plain text gets the tokenizer's usual ones.
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                       streamer=_Streamer(tokenizer, on_text), **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as a user turn in the tokenizer's chat template (ChatML when it has none, as in training)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
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
