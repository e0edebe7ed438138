"""Tokenizers against their references: HF `tokenizers` (byte-level BPE), transformers' GPT-2 tokenizer
(vocab.json + merges.txt, OPT's BOS rule), sentencepiece itself, and jinja2 for chat templates."""
from __future__ import annotations

import glob
import json

import pytest

from chai_models.tokenizer import TokenizerError, load_tokenizer

SPECIAL_TEXTS = [
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b <|im_end|>  <|im_start|>",
    "not special: <|im_sta rt|> <|im_end|",
]
ODD_TEXTS = ["", " ", "   leading and trailing   ", "tabs\tand\n\nnewlines\r\n", "digits 1234567890 3.14159 ٣٤",
             "naïve café — “quotes” 日本語のテキスト 🤗🚀 Ünïcödé", "don't it's we'll I'd they're", "x" * 300]


def real_text() -> str:
    """Over 100 KB of real English (Python's documentation topics and license texts)."""
    import pydoc_data.topics as topics

    text = "\n".join(topics.topics.values())
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        try:
            with open(path, encoding="utf-8") as f:
                text += f.read()
        except (UnicodeDecodeError, IsADirectoryError):
            pass
    assert len(text) > 100_000
    return text




@pytest.fixture(scope="module")
def smol_tok(smol_dir):
    return load_tokenizer(smol_dir)


@pytest.fixture(scope="module")
def oracle(smol_dir):
    """HF tokenizers built by hand from the same vocab/merges with SmolLM2's pre-tokenizer (digits, then
    GPT-2 byte-level), so this also checks the tokenizer.json that the GGUF conversion wrote."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    doc = json.loads((smol_dir / "tokenizer.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in doc["model"]["merges"]]
    tok = tokenizers.Tokenizer(models.BPE(doc["model"]["vocab"], merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(a["content"], special=True, normalized=False) for a in doc["added_tokens"]])
    return tok


@pytest.mark.slow
def test_bpe_ids_match_hf_on_real_text(smol_tok, oracle):
    text = real_text()
    # line by line too: many short texts exercise text starts and ends, not only one long stream
    lines = text.splitlines()[:3000]
    assert smol_tok.encode(text) == oracle.encode(text).ids
    assert [smol_tok.encode(x) for x in lines] == [e.ids for e in oracle.encode_batch(lines)]


@pytest.mark.slow
@pytest.mark.parametrize("text", SPECIAL_TEXTS + ODD_TEXTS)
def test_bpe_special_and_odd_strings(smol_tok, oracle, text):
    assert smol_tok.encode(text) == oracle.encode(text).ids
    assert smol_tok.decode(smol_tok.encode(text)) == text


@pytest.mark.slow
def test_bpe_roundtrip_and_streaming(smol_tok):
    text = real_text()[:20_000] + " ".join(ODD_TEXTS)
    ids = smol_tok.encode(text)
    assert smol_tok.decode(ids) == text
    stream = smol_tok.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # no half characters shown along the way
    # a character split over tokens: the first token alone shows nothing yet
    emoji = smol_tok.encode("🤗")
    assert len(emoji) > 1
    stream = smol_tok.stream_decoder()
    assert [stream.push(i) for i in emoji][:-1] == [""] * (len(emoji) - 1)


@pytest.mark.slow
def test_smollm2_special_ids(smol_tok):
    assert smol_tok.bos_id == 1 and smol_tok.pad_id == 2
    assert smol_tok.eos_ids[0] == 2 and smol_tok.encode("<|im_end|>") == [2]
    assert smol_tok.add_bos is False and smol_tok.encode("hi", bos=True)[0] == 1
    assert smol_tok.vocab_size == 49152
    assert smol_tok.decode([1, 28120, 2], skip_special=True) == smol_tok.decode([28120])


# ----------------------------------------------------------------------------------------------------
# chat templates against jinja2


CHATS = [
    "What is the capital of France?",
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nA short one."}],
]


def jinja_render(template: str, messages, add_generation_prompt: bool, **tokens) -> str:
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # the options transformers renders with
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **tokens)


@pytest.mark.slow
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("chat", CHATS)
def test_smollm2_chat_template_matches_jinja(smol_tok, chat, gen):
    ref = jinja_render(smol_tok.chat_template, chat, gen)
    assert smol_tok.apply_chat_template(chat, add_generation_prompt=gen) == ref


def tiny_bpe_folder(tmp_path, texts, config: dict, **files):
    """A tokenizer folder from a byte-level BPE trained here with `tokenizers` (no real GPT-2 vocab offline)."""
    from tokenizers import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=600, min_frequency=2,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    trainer.save_model(str(tmp_path))  # vocab.json + merges.txt
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, doc in files.items():
        (tmp_path / name).write_text(json.dumps(doc))
    return tmp_path


LLAMA3_TEMPLATE = (  # the LLaMA-3 (3.0) instruct format, written out for this test
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
    " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0"
    " == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.mark.parametrize("chat", CHATS)
def test_llama3_chat_template_matches_jinja(tmp_path, chat):
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA3_TEMPLATE}
    tok = load_tokenizer(tiny_bpe_folder(tmp_path, [real_text()[:20000]], cfg))
    assert tok.apply_chat_template(chat) == jinja_render(LLAMA3_TEMPLATE, chat, True, bos_token="<s>")


def test_unknown_chat_template_is_a_clear_error(tmp_path):
    cfg = {"chat_template": "{% for m in messages %}### {{ m['content'] }}{% endfor %}"}
    tok = load_tokenizer(tiny_bpe_folder(tmp_path, [real_text()[:20000]], cfg))
    with pytest.raises(TokenizerError, match="raw mode"):
        tok.apply_chat_template("hi")


# ----------------------------------------------------------------------------------------------------
# GPT-2 / OPT folders (vocab.json + merges.txt)


def test_gpt2_vocab_merges_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    text = real_text()
    folder = tiny_bpe_folder(tmp_path, text.splitlines()[:4000], {"bos_token": "<s>", "eos_token": "</s>"})
    ours = load_tokenizer(folder)
    ref = transformers.GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    sample = text[:60_000]
    assert ours.encode(sample) == ref.encode(sample, add_special_tokens=False)
    for s in ODD_TEXTS:
        assert ours.encode(s) == ref.encode(s, add_special_tokens=False)
        assert ours.decode(ours.encode(s)) == s


def test_opt_prepends_eos_as_bos(tmp_path):
    # HF's OPT tokenizer (GPT2Tokenizer with bos '</s>') puts '</s>' (id 2) in front of every text
    transformers = pytest.importorskip("transformers")
    folder = tiny_bpe_folder(tmp_path, real_text().splitlines()[:4000],
                             {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"},
                             **{"config.json": {"family": "opt"}})
    ours = load_tokenizer(folder)
    ref = transformers.GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), bos_token="</s>",
                                     eos_token="</s>", unk_token="</s>", pad_token="<pad>")
    text = "Hello world, this is OPT.</s> 42"
    assert ours.bos_id == 2 and ours.pad_id == 1 and 2 in ours.eos_ids
    assert ours.encode(text) == [2] + ref.encode(text, add_special_tokens=False)
    assert ours.encode(text, bos=False)[0] != 2


# ----------------------------------------------------------------------------------------------------
# sentencepiece (LLaMA-1/2 tokenizer.model)


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("sp")
    lines = [ln for ln in real_text().splitlines() if ln.strip()][:3000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def test_sentencepiece_matches_sentencepiece(sp_folder):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    tok = load_tokenizer(sp_folder)
    assert tok.bos_id == 1 and tok.eos_ids == [2] and tok.add_bos
    for text in real_text().splitlines()[:300] + ODD_TEXTS[1:]:
        assert tok.encode(text, bos=False) == ref.encode(text)
        assert tok.encode(text) == [1] + ref.encode(text)
        assert tok.decode(tok.encode(text), skip_special=True) == ref.decode(ref.encode(text))
    assert tok.encode("a</s>b", bos=False) == ref.encode("a") + [2] + ref.encode("b")


def test_sentencepiece_streaming(sp_folder):
    tok = load_tokenizer(sp_folder)
    text = "Streaming naïve text 🤗 with bytes.\nNext line."
    ids = tok.encode(text, bos=False)
    stream = tok.stream_decoder()
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == tok.decode(ids)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["llama-bpe", "gpt2", "smollm"])
def test_gguf_pre_tokenizers_match_hf(smol_dir, tmp_path, pre):
    # SmolLM2's vocabulary under each pre-tokenizer the GGUF converter can write; HF reads the same JSON
    tokenizers = pytest.importorskip("tokenizers")
    from chai_models.convert.gguf import PRE_TOKENIZERS

    doc = json.loads((smol_dir / "tokenizer.json").read_text(encoding="utf-8"))
    doc["pre_tokenizer"] = PRE_TOKENIZERS[pre]
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    ours, ref = load_tokenizer(tmp_path), tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = real_text()[:150_000] + " ".join(ODD_TEXTS + SPECIAL_TEXTS)
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False).ids
