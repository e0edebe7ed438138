"""chai_models: pure-PyTorch LLaMA and OPT with CHAI (Clustered Head Attention) built in."""
from .chai import ChaiConfig
from .checkpoint import CheckpointError, load, save_model
from .generation import Generation, generate
from .llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig", "OPT", "OPTConfig", "load", "save_model", "load_tokenizer", "generate",
           "ChaiConfig", "CheckpointError", "Generation"]


def __getattr__(name):  # lazy: these modules are written by separate issues and pull in more imports
    if name in ("OPT", "OPTConfig"):
        from . import opt

        return getattr(opt, name)
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'chai_models' has no attribute {name!r}")
