"""Prompt learning: virtual tokens in front of the input, the base model untouched.

- prefix (Li & Liang, 2021): learned keys and values for every attention layer, optionally
  produced by a 2-layer MLP while training (prefix_projection);
- prompt (Lester et al., 2021): learned input embeddings, random or from a text's embeddings;
- p_tuning (Liu et al., 2021): input embeddings produced by a small MLP or LSTM encoder.
"""

from __future__ import annotations

from peftcli.errors import UserError


def peft_config(method, model):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    hidden = model.config.hidden_size
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens)
    if method.name == "prefix":
        return PrefixTuningConfig(**common, prefix_projection=method.prefix_projection,
                                  encoder_hidden_size=method.encoder_hidden_size or hidden)
    if method.name == "p_tuning":
        return PromptEncoderConfig(**common, encoder_reparameterization_type=method.encoder.upper(),
                                   encoder_hidden_size=method.encoder_hidden_size or hidden,
                                   encoder_dropout=method.encoder_dropout)
    if method.init == "random":
        return PromptTuningConfig(**common, prompt_tuning_init="RANDOM")
    # peft embeds init_text with the base's tokenizer, read from the folder the model was loaded from.
    tokenizer = getattr(model, "name_or_path", "")
    if not tokenizer:
        raise UserError("init: text reads the base model's tokenizer, and this built-in model is not built yet",
                        where="method.init", hint="peft train builds it on first use; or use init: random")
    return PromptTuningConfig(**common, prompt_tuning_init="TEXT", prompt_tuning_init_text=method.init_text,
                              tokenizer_name_or_path=tokenizer)
