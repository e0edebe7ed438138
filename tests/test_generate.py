"""The generation loop and sampling, on a tiny random model with a byte-level stand-in tokenizer."""
import pytest
import torch
from conftest import ByteTokenizer, tiny_byte_llama

from chai_models import ChaiConfig, generate, set_chai
from chai_models.sampling import filter_logits, sample


@pytest.fixture(scope="module")
def model():
    return tiny_byte_llama()


TOK = ByteTokenizer()
PROMPTS = ["Hello there", "Hi", "A much longer prompt than the others"]


def test_batch_gives_each_prompt_its_alone_tokens(model):
    batch = generate(model, TOK, PROMPTS, max_new_tokens=12, eos_ids=[])
    for i, p in enumerate(PROMPTS):
        alone = generate(model, TOK, [p], max_new_tokens=12, eos_ids=[])
        assert batch.tokens[i] == alone.tokens[0]
    assert [len(t) for t in batch.tokens] == [12, 12, 12]


def test_batch_alone_with_chai(model):
    set_chai(model, ChaiConfig(clusters=[4, 2]))
    try:
        batch = generate(model, TOK, PROMPTS, max_new_tokens=10, eos_ids=[])
        for i, p in enumerate(PROMPTS):
            assert batch.tokens[i] == generate(model, TOK, [p], max_new_tokens=10, eos_ids=[]).tokens[0]
    finally:
        set_chai(model, None)


def test_greedy_matches_argmax_of_full_forward(model):
    out = generate(model, TOK, ["abc"], max_new_tokens=8, eos_ids=[])
    seq = TOK.encode("abc")
    with torch.no_grad():
        for _ in range(8):
            seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    assert out.tokens[0] == seq[3:]


def test_seed_reproducible_and_top_k1_is_greedy(model):
    kw = dict(max_new_tokens=16, eos_ids=[], temperature=1.0)
    a = generate(model, TOK, PROMPTS, seed=1234, **kw)
    b = generate(model, TOK, PROMPTS, seed=1234, **kw)
    assert a.tokens == b.tokens
    c = generate(model, TOK, PROMPTS, seed=99, **kw)
    assert a.tokens != c.tokens
    greedy = generate(model, TOK, PROMPTS, max_new_tokens=16, eos_ids=[])
    assert generate(model, TOK, PROMPTS, seed=5, top_k=1, **kw).tokens == greedy.tokens


def test_stops_at_eos(model):
    greedy = generate(model, TOK, ["xyz"], max_new_tokens=10, eos_ids=[])
    eos = greedy.tokens[0][4]
    first = greedy.tokens[0].index(eos)
    out = generate(model, TOK, ["xyz"], max_new_tokens=10, eos_ids=[eos])
    assert out.tokens[0] == greedy.tokens[0][:first] and out.finish_reasons == ["eos"]


def test_stop_string_and_streaming(model):
    greedy = generate(model, TOK, ["hello"], max_new_tokens=20, eos_ids=[])
    text = greedy.texts[0]
    stop = text[5:7]
    pieces = []
    out = generate(model, TOK, ["hello"], max_new_tokens=20, eos_ids=[], stop=[stop],
                   callback=lambda row, s: pieces.append(s))
    assert out.texts[0] == text[: text.find(stop)] and out.finish_reasons == ["stop"]
    assert "".join(pieces) == out.texts[0]


def test_top_p_keeps_smallest_set_with_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    kept = torch.isfinite(filter_logits(logits, top_p=0.5))
    assert kept.tolist() == [[True, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=3))
    assert kept.tolist() == [[True, True, True, False]]
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}


def test_bad_input(model):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, TOK, [""], max_new_tokens=4)
    with pytest.raises(ValueError, match="context is 96"):
        generate(model, TOK, ["x" * 90], max_new_tokens=10)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, TOK, ["x"], max_new_tokens=2, temperature=-1)


@pytest.mark.parametrize("chai", [None, "1:2"], ids=["dense", "chai"])
def test_compiled_decode_on_cpu(chai):
    """generate(compile=True) through torch.compile on CPU (CUDA graphs and PDL do not apply): the same greedy
    tokens as eager, and the decode compile's inductor options stay scoped to its own graph."""
    import torch._dynamo as dynamo
    import torch._inductor.config as inductor

    m = tiny_byte_llama(seed=1)
    if chai:
        set_chai(m, ChaiConfig.from_spec(chai, 2, 4))
    before = inductor.coordinate_descent_tuning
    dynamo.reset()
    eager = generate(m, TOK, PROMPTS, max_new_tokens=10, eos_ids=[])
    compiled = generate(m, TOK, PROMPTS, max_new_tokens=10, eos_ids=[], compile=True)
    assert compiled.tokens == eager.tokens
    assert compiled.stats["compile_s"] > 0
    assert inductor.coordinate_descent_tuning == before
