"""GGUF conversion: the real SmolLM2 GGUF against transformers' own GGUF loading, and tiny synthetic GGUFs
(written here with gguf.GGUFWriter) for every supported quantization type and the error paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from chai_models import load  # noqa: E402
from chai_models.checkpoint import CheckpointError, iter_tensors  # noqa: E402
from chai_models.convert.gguf import convert_gguf, supported_types  # noqa: E402

Q = gguf.GGMLQuantizationType

# ----------------------------------------------------------------------------------------------------
# the real model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived 3 old fishermen who",
]




@pytest.fixture(scope="module")
def smol(smol_dir):
    return load(smol_dir)




@pytest.mark.slow
def test_default_model_config(smol_dir):
    from chai_models.checkpoint import read_config

    cfg = read_config(smol_dir)
    assert (cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"], cfg["n_layers"]) == (9, 3, 64, 30)
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 49152
    assert cfg["norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0


@pytest.mark.slow
def test_logits_match_transformers(smol_dir, smol, hf_smol):
    from chai_models import load_tokenizer

    tok = load_tokenizer(smol_dir)
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])  # [1, S]
        with torch.no_grad():
            ours, ref = smol(ids), hf_smol(ids).logits  # [1, S, vocab]
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert rel < 1e-4, f"{prompt!r}: relative error {rel:.2e}"


@pytest.mark.slow
def test_greedy_chat_names_paris(smol_dir, smol):
    from chai_models import load_tokenizer

    tok = load_tokenizer(smol_dir)
    ids = tok.encode_chat("What is the capital of France?")
    out = []
    smol.setup_caches(1, len(ids) + 24)
    try:
        with torch.no_grad():
            logits = smol(torch.tensor([ids]), input_pos=torch.arange(len(ids)))  # prefill: [1, S, vocab]
            for step in range(24):
                nxt = int(logits[0, -1].argmax())
                if nxt in tok.eos_ids:
                    break
                out.append(nxt)
                logits = smol(torch.tensor([[nxt]]), input_pos=torch.tensor([len(ids) + step]))  # [1, 1, vocab]
    finally:
        smol.clear_caches()
    answer = tok.decode(out)
    print(answer)
    assert "Paris" in answer, answer


# ----------------------------------------------------------------------------------------------------
# tiny synthetic GGUFs

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 256, 256, 4, 2, 32  # 256: the K-quant block length
HEAD_DIM = HIDDEN // HEADS


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved rows (what its converter does to attn_q / attn_k)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_weights(tied: bool, seed: int = 0, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    """Random weights of a 1-layer llama, keyed by GGUF name, in HF row order, row-major [out, in]."""
    g = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,),
              "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.ffn_norm.weight": (HIDDEN,),
              "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN), "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
              "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
              "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
              "blk.0.ffn_down.weight": (HIDDEN, FFN)}
    if not tied:
        shapes["output.weight"] = (vocab, HIDDEN)
    return {k: g.standard_normal(s).astype(np.float32) * 0.1 for k, s in shapes.items()}


def random_blocks(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random quantized bytes [rows, bytes_per_row]: every bit pattern of every field, except that a block whose
    scales come out inf/nan (an all-ones fp16 exponent) is drawn again, as no quantizer writes one."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    g = np.random.default_rng(seed)
    data = g.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)  # [blocks, bytes]
    while True:
        with np.errstate(invalid="ignore", over="ignore"):
            bad = ~np.isfinite(gguf.quants.dequantize(data, qtype)).all(axis=-1)
        if not bad.any():
            return data.reshape(rows, -1)
        data[bad] = g.integers(0, 256, size=(int(bad.sum()), nbytes), dtype=np.uint8)


def quantizable(qtype) -> bool:
    """Whether the gguf package can quantize to qtype (else the test writes random blocks)."""
    try:
        gguf.quants.quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][0]), np.float32), qtype)
        return True
    except NotImplementedError:
        return False


def encode(w: np.ndarray, qtype, seed: int):
    """(bytes to store, the float32 the GGUF really holds) for one matrix."""
    if qtype == Q.F32:
        raw = w
    elif quantizable(qtype):
        raw = gguf.quants.quantize(w, qtype)
    else:
        raw = random_blocks(qtype, *w.shape, seed=seed)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(w.shape)


def write_gguf(path, weights: dict[str, np.ndarray], qtype=Q.F32, arch="llama") -> dict[str, np.ndarray]:
    """Writes a tiny GGUF (matrices in qtype, norms F32); returns what it really holds, in HF row order."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    held = {}
    for i, (name, x) in enumerate(weights.items()):
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            x = llamacpp_permute(x, HEADS if "attn_q" in name else KV_HEADS)
        if x.ndim == 1:
            w.add_tensor(name, x)
            held[name] = x
            continue
        raw, deq = encode(x, qtype, seed=i)
        w.add_tensor(name, raw, raw_dtype=None if raw.dtype in (np.float32, np.float16) else qtype)
        held[name] = deq
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):  # back to HF row order
        held[name] = unpermute_reference(held[name], HEADS if "attn_q" in name else KV_HEADS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def unpermute_reference(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llamacpp_permute by brute force: find where each HF row went (independent of our code)."""
    rows = w.shape[0]
    idx = np.arange(rows, dtype=np.float32)[:, None].repeat(2, 1)
    where = llamacpp_permute(idx, n_heads)[:, 0].astype(int)  # GGUF row r holds HF row where[r]
    out = np.empty_like(w)
    out[where] = w
    return out


OURS = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
        "output.weight": "output.weight", "blk.0.attn_norm.weight": "layers.0.attention_norm.weight",
        "blk.0.ffn_norm.weight": "layers.0.ffn_norm.weight", "blk.0.attn_q.weight": "layers.0.attention.wq.weight",
        "blk.0.attn_k.weight": "layers.0.attention.wk.weight", "blk.0.attn_v.weight": "layers.0.attention.wv.weight",
        "blk.0.attn_output.weight": "layers.0.attention.wo.weight",
        "blk.0.ffn_gate.weight": "layers.0.feed_forward.w1.weight",
        "blk.0.ffn_up.weight": "layers.0.feed_forward.w3.weight",
        "blk.0.ffn_down.weight": "layers.0.feed_forward.w2.weight"}


def test_every_dequantizable_type_is_supported():
    # the types this gguf package dequantizes; llama.cpp's common file types must be among them
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
            "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS"} <= set(supported_types())
    assert "Q8_K" not in supported_types()  # llama.cpp's internal dot-product type has no dequantizer


@pytest.mark.parametrize("qtype", supported_types())
def test_dequantize_matches_gguf_reference(tmp_path, qtype):
    held = write_gguf(tmp_path / "m.gguf", hf_weights(tied=False), Q[qtype])
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    got = dict(iter_tensors(tmp_path / "out"))
    assert sorted(got) == sorted(OURS[k] for k in held)
    for name, ref in held.items():
        t = got[OURS[name]]
        assert t.dtype == torch.float32 and tuple(t.shape) == ref.shape, name
        assert np.isfinite(ref).all() and np.abs(ref).max() > 0, name  # the blocks hold real values
        np.testing.assert_array_equal(t.numpy(), ref, err_msg=f"{qtype} {name}")


def test_f32_roundtrip_recovers_hf_weights_and_dtype(tmp_path):
    weights = hf_weights(tied=False)
    write_gguf(tmp_path / "m.gguf", weights)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype=torch.bfloat16)
    got = dict(iter_tensors(tmp_path / "out"))
    for name, w in weights.items():
        assert got[OURS[name]].dtype == torch.bfloat16
        torch.testing.assert_close(got[OURS[name]], torch.from_numpy(w).bfloat16(), rtol=0, atol=0)


def test_missing_output_ties_embeddings(tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_weights(tied=True))
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    model = load(tmp_path / "out")
    assert model.config.tie_word_embeddings and model.output is None
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, VOCAB)


def test_unsupported_quant_type_is_a_clear_error(tmp_path):
    # Q8_K: a type the writer can store but the gguf package cannot dequantize
    weights = hf_weights(tied=True)
    raw = np.random.default_rng(0).integers(0, 256, size=(VOCAB, HIDDEN // 256 * 292), dtype=np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for key, value in [("block_count", 1), ("context_length", 128), ("embedding_length", HIDDEN),
                       ("feed_forward_length", FFN), ("head_count", HEADS), ("head_count_kv", KV_HEADS)]:
        getattr(w, f"add_{key}")(value)
    for name, x in weights.items():
        if name == "token_embd.weight":
            w.add_tensor(name, raw, raw_dtype=Q.Q8_K)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"token_embd.weight.*Q8_K.*cannot dequantize.*Q5_0"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written is left behind


def test_non_llama_architecture_is_a_clear_error(tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_weights(tied=True), arch="qwen2")
    with pytest.raises(CheckpointError, match="qwen2"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


def test_unknown_tensor_is_a_clear_error(tmp_path):
    weights = hf_weights(tied=True)
    weights["blk.0.attn_sinks.weight"] = np.zeros(HEADS, np.float32)
    write_gguf(tmp_path / "m.gguf", weights)
    with pytest.raises(CheckpointError, match="attn_sinks"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


def write_header(w, context: int = 128) -> None:
    """The hyperparameters of the tiny 1-layer llama into a GGUFWriter."""
    for key, value in [("block_count", 1), ("context_length", context), ("embedding_length", HIDDEN),
                       ("feed_forward_length", FFN), ("head_count", HEADS), ("head_count_kv", KV_HEADS)]:
        getattr(w, f"add_{key}")(value)


def write_with_tokenizer(path, model: str, pre: str):
    """A tiny F32 GGUF carrying a byte-level-style tokenizer header (tokens are just placeholders)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("block_count", 1), ("context_length", 128), ("embedding_length", HIDDEN),
                       ("feed_forward_length", FFN), ("head_count", HEADS), ("head_count_kv", KV_HEADS)]:
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    for name, x in hf_weights(tied=True).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("model, pre, match", [("gpt2", "qwen2", "tokenizer.ggml.pre is 'qwen2'"),
                                               ("llama", "default", "scores"), ("bert", "default", "'bert'")])
def test_unsupported_tokenizer_is_a_clear_error(tmp_path, model, pre, match):
    write_with_tokenizer(tmp_path / "m.gguf", model, pre)
    with pytest.raises(CheckpointError, match=match):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


def test_gguf_tokenizer_files_load(tmp_path):
    from chai_models import load_tokenizer

    write_with_tokenizer(tmp_path / "m.gguf", "gpt2", "llama-bpe")
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    tok = load_tokenizer(tmp_path / "out")
    assert tok.vocab_size == VOCAB and tok.decode([3, 4]) == "t3t4"


# ----------------------------------------------------------------------------------------------------
# LLaMA-1/2 GGUFs: a sentencepiece vocabulary (tokenizer.ggml.model "llama")

USER_SYMBOL = "<|user|>"


@pytest.fixture(scope="module", params=[True, False], ids=["space-prefix", "no-space-prefix"])
def sp_model(tmp_path_factory, request):
    """A sentencepiece BPE trained here the way LLaMA's was: byte fallback, no normalization, digits split; with
    and without the space sentencepiece puts in front of the text (add_dummy_prefix)."""
    spm = pytest.importorskip("sentencepiece")
    from test_tokenizer import real_text

    folder = tmp_path_factory.mktemp("sp")
    lines = [ln for ln in real_text().splitlines() if ln.strip()][:3000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "sp"), vocab_size=512,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.999,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, allow_whitespace_only_pieces=True,
                                   user_defined_symbols=[USER_SYMBOL], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   add_dummy_prefix=request.param, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))


def write_sp_gguf(path, sp):
    """What llama.cpp's converter writes for a LLaMA-2 vocabulary: pieces, scores, token types, special ids."""
    n = sp.get_piece_size()
    types = []
    for i in range(n):
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.id_to_piece(i) == USER_SYMBOL:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("block_count", 1), ("context_length", 4096), ("embedding_length", HIDDEN),
                       ("feed_forward_length", FFN), ("head_count", HEADS), ("head_count_kv", KV_HEADS)]:
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_unk_token_id(sp.unk_id())
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(sp.encode("a", out_type=str)[0].startswith("\u2581"))
    w.add_chat_template("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
                        "m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}"
                        "{% endif %}{% endfor %}")
    for name, x in hf_weights(tied=False, vocab=n).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_gguf_tokenizer_matches_sentencepiece(tmp_path, sp_model):
    import sentencepiece as spm
    from test_tokenizer import ODD_TEXTS, real_text

    from chai_models import load_tokenizer

    write_sp_gguf(tmp_path / "m.gguf", sp_model)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    # the written tokenizer.model is the same model: pieces, scores, types and special ids
    back = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    n = sp_model.get_piece_size()
    assert back.get_piece_size() == n
    for i in range(n):
        assert (back.id_to_piece(i), back.get_score(i), back.is_control(i), back.is_byte(i), back.is_unknown(i)) == \
            (sp_model.id_to_piece(i), sp_model.get_score(i), sp_model.is_control(i), sp_model.is_byte(i),
             sp_model.is_unknown(i))
    assert (back.unk_id(), back.bos_id(), back.eos_id(), back.pad_id()) == (0, 1, 2, -1)

    tok = load_tokenizer(tmp_path / "out")
    assert tok.bos_id == 1 and tok.eos_ids == [2] and tok.add_bos and tok.vocab_size == n
    lines = real_text().splitlines()[3000:3400]  # lines the vocabulary was not trained on
    texts = lines + ODD_TEXTS[1:] + [f"{USER_SYMBOL} hello", "bytes: \u0b85\u0bb4\u0b95\u0bc1 \U0001f9ea"]
    byte_ids = {i for i in range(n) if sp_model.is_byte(i)}
    assert any(byte_ids & set(sp_model.encode(t)) for t in texts)  # the byte fallback is exercised
    for text in texts:
        ref = sp_model.encode(text)
        assert tok.encode(text, bos=False) == ref, text
        assert tok.encode(text) == [1] + ref
        assert tok.decode(tok.encode(text), skip_special=True) == sp_model.decode(ref)
        stream = tok.stream_decoder(skip_special=True)
        assert "".join([stream.push(i) for i in tok.encode(text)] + [stream.flush()]) == sp_model.decode(ref)
    assert tok.encode("a</s>b", bos=False) == sp_model.encode("a") + [2] + sp_model.encode("b")
    assert tok.apply_chat_template("Hi") == "<s>[INST] Hi [/INST]"
    model = load(tmp_path / "out")
    assert model.config.vocab_size == n and model.config.max_seq_len == 4096


def test_sentencepiece_gguf_without_unknown_token_is_a_clear_error(tmp_path, sp_model):
    write_sp_gguf(tmp_path / "m.gguf", sp_model)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"), "r+")  # mark <unk> as a normal token in place
    types = reader.fields["tokenizer.ggml.token_type"]
    types.parts[types.data[0]][0] = gguf.TokenType.NORMAL
    del reader
    with pytest.raises(CheckpointError, match="no unknown token"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
