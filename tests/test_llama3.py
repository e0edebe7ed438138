"""LLaMA-3 family: Meta's tiktoken tokenizer.model against transformers' own tiktoken conversion, ignore_merges,
the LLaMA-3 GGUF tokenizer, Meta LLaMA-3/3.1/3.2 folders, and the LLaMA-3.x chat templates against jinja2.

No real LLaMA-3 files exist offline: the rank tables are trained here (a byte-level BPE on real English with
LLaMA-3's split rule), written in Meta's format ("base64-token rank" per line), with the special tokens after them.
"""
from __future__ import annotations

import base64
import json

import pytest
import torch
from conftest import hf_llama, rel_err
from test_tokenizer import CHATS, ODD_TEXTS, jinja_render, real_text

from chai_models import load, load_tokenizer
from chai_models.convert import convert
from chai_models.convert.meta import meta_config
from chai_models.tokenizer import (LLAMA3_CHAT_TEMPLATE, LLAMA3_PATTERN, TokenizerError, char_to_byte,
                                   llama3_special_tokens)

tokenizers = pytest.importorskip("tokenizers")

N_RANKS = 1200
LLAMA3_TEXTS = [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
    "tool call <|python_tag|>print(1)<|eom_id|> then <|end_of_text|>",
    "not special: <|eot_id| <|begin_of_text",
    "def f(x):\n    return x ** 2  # square\n\n\n\tindented\r\n  trailing   \n",
    "Numbers 1 12 123 1234 12345 3.14159 1,000,000 ٣٤٥ and I'M, you'RE, they've",
]


def texts() -> list[str]:
    text = real_text()
    return text.splitlines()[4000:4600] + ODD_TEXTS + LLAMA3_TEXTS


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    """A byte-level BPE rank table trained on real text with LLaMA-3's split rule: rank = merge order."""
    from tokenizers import Regex, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=N_RANKS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(real_text().splitlines()[:4000], trainer)
    table = char_to_byte()
    out = {bytes(table[c] for c in t): i for t, i in tok.get_vocab().items()}
    assert sorted(out.values()) == list(range(N_RANKS))
    return out


def write_tiktoken(path, ranks: dict[bytes, int]) -> None:
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def meta_tok_dir(tmp_path_factory, ranks):
    folder = tmp_path_factory.mktemp("meta_tok")
    write_tiktoken(folder / "tokenizer.model", ranks)
    (folder / "params.json").write_text(json.dumps({"use_scaled_rope": True}))  # 3.1+: tool tokens named
    return folder


@pytest.fixture(scope="module")
def oracle(meta_tok_dir, ranks):
    """transformers' own tiktoken -> tokenizers conversion (merges from the ranks, ignore_merges on, LLaMA-3's
    split), given the rank table directly in place of the `tiktoken` package's file reader."""
    transformers = pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(url):
            return dict(ranks)

    specials = llama3_special_tokens(tool_tokens=True)
    backend = Converter(vocab_file=str(meta_tok_dir / "tokenizer.model"), extra_special_tokens=specials).converted()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                                eos_token="<|end_of_text|>")


def test_llama3_special_token_ids():
    names = llama3_special_tokens(tool_tokens=True)
    assert len(names) == len(set(names)) == 256
    assert {i: names[i] for i in (0, 1, 4, 6, 7, 8, 9, 10)} == {
        0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
        7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"}
    assert names[5] == "<|reserved_special_token_2|>" and names[255] == "<|reserved_special_token_247|>"
    old = llama3_special_tokens(tool_tokens=False)  # LLaMA-3.0 leaves 4, 8 and 10 reserved
    assert (old[8], old[9], old[10], old[255]) == ("<|reserved_special_token_4|>", "<|eot_id|>",
                                                   "<|reserved_special_token_5|>", "<|reserved_special_token_250|>")


def test_tiktoken_model_matches_transformers(meta_tok_dir, oracle):
    tok = load_tokenizer(meta_tok_dir)
    assert tok.vocab_size == N_RANKS + 256 and tok.bos_id == N_RANKS and tok.add_bos
    assert tok.eos_ids[:1] == [N_RANKS + 1] and N_RANKS + 9 in tok.eos_ids
    whole = real_text()[:60_000]
    assert tok.encode(whole, bos=False) == oracle.encode(whole, add_special_tokens=False)
    for text in texts():
        ids = tok.encode(text, bos=False)
        assert ids == oracle.encode(text, add_special_tokens=False), text
        assert tok.encode(text) == [N_RANKS] + ids
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special=True) == oracle.decode(ids, skip_special_tokens=True)
    assert tok.encode("<|eot_id|>", bos=False) == [N_RANKS + 9]


def test_tiktoken_streaming(meta_tok_dir):
    tok = load_tokenizer(meta_tok_dir)
    text = "Streaming naïve text 🤗 日本語 with bytes.\nNext line."
    ids = tok.encode(text)
    stream = tok.stream_decoder(skip_special=True)
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == text


def test_damaged_tiktoken_file_is_a_clear_error(tmp_path, ranks):
    write_tiktoken(tmp_path / "tokenizer.model", {t: r for t, r in ranks.items() if r != 700})
    with pytest.raises(TokenizerError, match="ranks are not 0..*restore it"):
        load_tokenizer(tmp_path)
    write_tiktoken(tmp_path / "tokenizer.model", ranks)
    with open(tmp_path / "tokenizer.model", "a") as f:
        f.write("not-base64! 5\n")
    with pytest.raises(TokenizerError, match="line 1201 is not 'base64-token rank'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    with pytest.raises(TokenizerError, match="neither a sentencepiece model nor a LLaMA-3 tiktoken"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------------
# ignore_merges in tokenizer.json, and the LLaMA-3 GGUF tokenizer


def tokenizer_json(oracle) -> dict:
    return json.loads(oracle.backend_tokenizer.to_str())


def test_ignore_merges_tokenizer_json_matches_hf(tmp_path, oracle):
    doc = tokenizer_json(oracle)
    assert doc["model"]["ignore_merges"] is True
    # words that are whole tokens of the vocabulary but that the merges would split otherwise
    extra = {"Ġxyzzyplugh": N_RANKS + 300, "Ġqwfpgj": N_RANKS + 301}
    doc["model"]["vocab"].update(extra)
    text = "a xyzzyplugh and a qwfpgj, " + real_text()[:30_000]
    for ignore in (True, False):
        doc["model"]["ignore_merges"] = ignore
        (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
        ours, ref = load_tokenizer(tmp_path), tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert (N_RANKS + 300 in ids) is ignore and (N_RANKS + 301 in ids) is ignore


@pytest.mark.parametrize("pre, ignore", [("llama-bpe", True), ("gpt2", False)])
def test_gguf_llama3_tokenizer_matches_transformers(tmp_path, oracle, pre, ignore):
    gguf = pytest.importorskip("gguf")
    from test_gguf import hf_weights, write_header

    from chai_models.convert.gguf import convert_gguf

    doc = tokenizer_json(oracle)
    vocab = {i: t for t, i in doc["model"]["vocab"].items()}
    vocab.update({a["id"]: a["content"] for a in doc["added_tokens"]})
    tokens = [vocab[i] for i in range(len(vocab))]
    merges = [" ".join(m) if isinstance(m, list) else m for m in doc["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if i >= N_RANKS else gguf.TokenType.NORMAL for i in range(len(tokens))]
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    write_header(w, context=131072)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(N_RANKS)
    w.add_eos_token_id(N_RANKS + 9)
    w.add_add_bos_token(True)
    for name, x in hf_weights(tied=True, vocab=len(tokens)).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    written = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert written["model"]["ignore_merges"] is ignore
    tok = load_tokenizer(tmp_path / "out")
    assert tok.bos_id == N_RANKS and tok.add_bos and tok.eos_ids == [N_RANKS + 9]
    if pre == "llama-bpe":
        for text in texts():
            assert tok.encode(text, bos=False) == oracle.encode(text, add_special_tokens=False), text


# ----------------------------------------------------------------------------------------------------
# Meta LLaMA-3 folders


def shapes(dim, vocab, ffn):
    return {"tok_embeddings.weight": torch.Size([vocab, dim]), "layers.0.feed_forward.w1.weight": torch.Size([ffn, dim])}


@pytest.mark.parametrize("params, ffn, bos, eos, context, factor", [
    # Meta-Llama-3-8B: no use_scaled_rope
    ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
      "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}, 14336, 128000, [128001, 128009], 8192,
     None),
    # Llama-3.1-8B
    ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
      "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}, 14336,
     128000, [128001, 128008, 128009], 131072, 8.0),
    # Llama-3.2-1B
    ({"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256,
      "ffn_dim_multiplier": 1.5, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}, 8192,
     128000, [128001, 128008, 128009], 131072, 32.0),
    # Llama-2-7b: vocab -1, sentencepiece
    ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}, 11008,
     1, [2], 4096, None),
    # LLaMA-1 7B
    ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}, 11008,
     1, [2], 2048, None),
], ids=["llama-3", "llama-3.1", "llama-3.2", "llama-2", "llama-1"])
def test_meta_params_of_each_release(params, ffn, bos, eos, context, factor):
    vocab = 128256 if params["vocab_size"] > 0 else 32000
    cfg = meta_config(params, shapes(params["dim"], vocab, ffn), 1)
    assert (cfg["vocab_size"], cfg["intermediate_size"]) == (vocab, ffn)
    assert (cfg["bos_token_id"], cfg["eos_token_ids"], cfg["max_seq_len"]) == (bos, eos, context)
    assert (cfg["rope_scaling"] or {}).get("factor") == factor
    if factor:
        assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaled, n_shards", [(False, 1), (True, 2)], ids=["llama-3", "llama-3.1-2shards"])
def test_meta_llama3_folder_converts(tmp_path, monkeypatch, ranks, scaled, n_shards):
    import test_meta

    vocab = N_RANKS + 256
    rope = {"rope_theta": 500000.0}
    if scaled:  # a narrow model with use_scaled_rope: LLaMA-3.2's factor 32
        rope["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = hf_llama(seed=3, vocab_size=vocab, num_key_value_heads=2, **rope)
    monkeypatch.setitem(test_meta.SPLIT, "tok_embeddings", 0)  # LLaMA-3 splits the embedding along the vocabulary
    test_meta.write_meta(hf, tmp_path / "meta", n_shards)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    del params["max_seq_len"]  # Meta's LLaMA-3 params.json has none
    params.update({"vocab_size": vocab, "rope_theta": 500000.0}, **({"use_scaled_rope": True} if scaled else {}))
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    write_tiktoken(tmp_path / "meta" / "tokenizer.model", ranks)
    convert(tmp_path / "meta", tmp_path / "ours")

    model = load(tmp_path / "ours", dtype=torch.float32)
    assert model.config.max_seq_len == (131072 if scaled else 8192)
    x = torch.randint(0, vocab, (2, 40))
    with torch.no_grad():
        assert rel_err(model(x), hf(x).logits) < 1e-5
    tok = load_tokenizer(tmp_path / "ours")
    stops = [N_RANKS + 1, N_RANKS + 8, N_RANKS + 9] if scaled else [N_RANKS + 1, N_RANKS + 9]
    assert tok.bos_id == N_RANKS and sorted(tok.eos_ids) == stops
    assert (tok.token_to_id("<|eom_id|>") == N_RANKS + 8) is scaled
    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.apply_chat_template(chat) == text
    assert tok.encode_chat(chat)[:2] == [N_RANKS, N_RANKS + 6]


# ----------------------------------------------------------------------------------------------------
# LLaMA-3.x chat templates

# The structure of Meta's LLaMA-3.1 instruct template, written out for this test: a date default, a system turn
# always (cut-off, date, the system message), tool branches, then the turns.
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' + message.tool_calls[0].function.name + '<|eom_id|>' }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content | tojson + "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# LLaMA-3.2's: today's date where the renderer offers strftime_now (transformers does)
LLAMA32_TEMPLATE = LLAMA31_TEMPLATE.replace(
    '{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}',
    '{%- if not date_string is defined %}{%- if strftime_now is defined %}'
    '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
    '{%- endif %}{%- endif %}')


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory, ranks):
    folder = tmp_path_factory.mktemp("llama3_chat")
    write_tiktoken(folder / "tokenizer.model", ranks)
    return folder


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("chat", CHATS + [[{"role": "system", "content": "  Answer in French.\n"},
                                           {"role": "user", "content": " Bonjour "}]])
@pytest.mark.parametrize("template", [LLAMA31_TEMPLATE, LLAMA32_TEMPLATE, LLAMA3_CHAT_TEMPLATE],
                         ids=["3.1", "3.2", "3.0"])
def test_llama3x_chat_templates_match_jinja(llama3_folder, template, chat, gen):
    import datetime

    (llama3_folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = load_tokenizer(llama3_folder)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    ref = jinja_render(template, chat, gen, bos_token="<|begin_of_text|>", strftime_now=strftime_now)
    assert tok.apply_chat_template(chat, add_generation_prompt=gen) == ref
    if template is not LLAMA3_CHAT_TEMPLATE:
        ref = jinja_render(template, chat, gen, bos_token="<|begin_of_text|>", date_string="01 Jan 2025")
        assert tok.apply_chat_template(chat, add_generation_prompt=gen, date_string="01 Jan 2025") == ref


def test_llama31_tool_messages_are_a_clear_error(llama3_folder):
    (llama3_folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA31_TEMPLATE}))
    tok = load_tokenizer(llama3_folder)
    chat = [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny"}]
    with pytest.raises(TokenizerError, match="'tool'.*raw mode"):
        tok.apply_chat_template(chat)


def test_hf_llama3_folder_keeps_tokenizer_and_chat_template_jinja(tmp_path, oracle):
    # a transformers-saved LLaMA-3.1-style folder: tokenizer.json (ignore_merges) + chat_template.jinja
    hf = hf_llama(seed=4, vocab_size=N_RANKS + 256, num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(oracle.backend_tokenizer.to_str())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True}))
    (tmp_path / "hf" / "chat_template.jinja").write_text(LLAMA31_TEMPLATE)
    convert(tmp_path / "hf", tmp_path / "ours")
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == LLAMA31_TEMPLATE
    tok = load_tokenizer(tmp_path / "ours")
    chat = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(chat) == jinja_render(LLAMA31_TEMPLATE, chat, True, bos_token="<|begin_of_text|>")
    assert N_RANKS + 9 in tok.eos_ids
    for text in texts()[-20:]:
        assert tok.encode(text, bos=False) == oracle.encode(text, add_special_tokens=False)
