"""peftcli: fine-tune causal language models with parameter-efficient methods, from YAML recipes."""

__version__ = "0.1.0"
