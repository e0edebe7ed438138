"""chai_models: pure-PyTorch LLaMA and OPT with CHAI (Clustered Head Attention) built in.

    models/   one plain file per family (llama.py, opt.py) and what they share (shared.py: the KV cache)
    chai/     the method in plain torch (attention.py starts with the math), attached by a module swap
    fast/     what exists only for speed (Triton kernels, fused forwards, the compiled step), behind `backend`
"""
from .chai import ChaiConfig
from .checkpoint import CheckpointError, load, save_model
from .generation import Generation, generate
from .models import OPT, Llama, LlamaConfig, OPTConfig

__all__ = ["Llama", "LlamaConfig", "OPT", "OPTConfig", "load", "save_model", "load_tokenizer", "generate",
           "ChaiConfig", "CheckpointError", "Generation", "set_chai", "set_backend"]


def set_chai(model, chai, cluster_dense_layers: bool = False) -> None:
    """Turns CHAI on (a ChaiConfig, or anything `load`'s chai argument takes) or off (None) on a loaded model, and
    keeps its backend. Caches are re-allocated if the model has them."""
    from .chai import install, resolve
    from .fast import apply

    cfg = resolve(chai, model, getattr(model, "checkpoint_path", None))
    sizes = model.max_batch_size, model.max_seq_len
    model.clear_caches()  # allocated once below, for the final classes, not once per swap
    install(model, cfg, cluster_dense_layers)
    apply(model, getattr(model, "backend", "torch"))
    if sizes[0]:
        model.setup_caches(*sizes)


def set_backend(model, backend: str) -> str:
    """Puts a model on "torch" (the plain modules), "triton" (chai_models.fast) or "auto"; returns the one chosen."""
    from .fast import apply

    return apply(model, backend)


def load_tokenizer(path):
    from .tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)
