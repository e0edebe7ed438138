"""GPU-only checks of the compiled path (skipped without CUDA; results go in the closing note)."""
import pytest
import torch

from chai_models import ChaiConfig, generate
from chai_models.llama import Llama, LlamaConfig

pytestmark = pytest.mark.gpu


class Bytes:
    eos_ids, bos_id, chat_template = [], None, None

    def encode(self, text, bos=None):
        return list(text.encode())

    def decode(self, ids, skip_special=False):
        return bytes(ids).decode("utf-8", errors="replace")


def cuda_model(n_kv_heads=4, dtype=torch.float32):
    import torch._dynamo as dynamo

    from chai_models import generation

    generation.TUNE_DECODE = False  # equality, not speed: skip the slow kernel tuning
    dynamo.reset()  # each test compiles its own model from scratch
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, n_layers=4, n_heads=8,
                      n_kv_heads=n_kv_heads, head_dim=32, max_seq_len=512)
    m = Llama(cfg).to("cuda", dtype).eval()  # fp32: compiled and eager round alike, so greedy ties can't flip
    with torch.no_grad():
        m.output.weight.mul_(16)  # peaked logits: greedy choices are far from ties
    return m


PROMPTS = ["The quick brown fox", "Hi there, friend", "A somewhat longer prompt for the batch"]


@pytest.mark.parametrize("chai", [None, "2:3"], ids=["dense", "chai"])
@pytest.mark.parametrize("kv", [8, 4], ids=["mha", "gqa"])
def test_compiled_decode_tokens_equal_eager(chai, kv):
    model = cuda_model(kv)
    if chai:
        model.set_chai(ChaiConfig.from_spec(chai, 4, 8))
    for prompts in (PROMPTS, PROMPTS[:1]):
        eager = generate(model, Bytes(), prompts, max_new_tokens=24)
        compiled = generate(model, Bytes(), prompts, max_new_tokens=24, compile=True)
        assert compiled.tokens == eager.tokens


def test_no_recompilation_across_requests():
    import torch._dynamo as dynamo

    model = cuda_model(4)
    model.set_chai(ChaiConfig.from_spec("1:2", 4, 8))
    model.setup_caches(2, 256)
    generate(model, Bytes(), PROMPTS[:2], max_new_tokens=8, compile=True)
    frames = dynamo.utils.counters["stats"]["unique_graphs"]
    for prompts in (["x" * 7, "different length prompt"], ["abc" * 11, "zz"], PROMPTS[1:]):
        generate(model, Bytes(), prompts, max_new_tokens=8, compile=True)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == frames  # other lengths and memberships: same graph


def test_triton_clustering_matches_torch():
    from chai_models import chai, kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    for H in (4, 9, 32, 52, 72):
        for k in (1, 2, H // 3 + 1, H - 1, H):
            feats = torch.rand(16, H, 25, device="cuda", generator=gen) ** 3
            dist = chai.cosine_distance(feats)
            fast = kernels.agglomerative_average(dist, k)
            ref = chai.agglomerative_average(dist, k)
            assert torch.equal(fast, ref), (H, k)
