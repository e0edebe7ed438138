"""GGUF (llama architecture) -> our format, through the `gguf` package's reader and dequantizers.

What this has to undo, relative to a Hugging Face checkpoint:
- GGUF lists tensor shapes fastest-dimension first (ggml's `ne`); the reader's numpy arrays are already in
  row-major order, so a [rows, cols] weight comes back as rows x cols.
- llama.cpp's converter permutes the rows of attn_q / attn_k from HF's rotate-half order into interleaved
  pairs (GGML's "normal" RoPE); we permute them back, since llama.py implements rotate-half.
- Quantized tensors are dequantized to the dtype asked for (float32 by default), by the `gguf` package's own
  dequantizers: every type it can dequantize is accepted.
The tokenizer stored in the GGUF metadata is written out as the files chai_models.tokenizer reads:
- byte-level BPE (tokenizer.ggml.model "gpt2": SmolLM2, LLaMA-3): tokenizer.json with the pre-tokenizer that
  tokenizer.ggml.pre names;
- sentencepiece (tokenizer.ggml.model "llama": LLaMA-1/2, Mistral, TinyLlama): the tokens, scores and token
  types go back into a sentencepiece tokenizer.model (a protobuf written here), which the sentencepiece
  package runs exactly as it ran the original;
plus tokenizer_config.json (special tokens, add_bos, chat template) and generation_config.json (stop tokens).
"""
from __future__ import annotations

import json
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import DEFAULT_SHARD_BYTES, CheckpointError
from ..tokenizer import LLAMA3_PRE_TOKENIZER
from .rope import rotate_half_rows
from .write import Source, write_source

# GGUF per-layer tensor name -> our name (both followed by .weight / .bias)
_LAYER_NAMES = {
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
}
_GLOBAL_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}

# llama.cpp's token_type values (tokenizer.ggml.token_type); sentencepiece numbers its piece types the same way
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> HF pre_tokenizer JSON. The regexes are the splitting rules each model family was
# trained with (llama.cpp keys its own copies by the same names).
_GPT2_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "default": _GPT2_BYTELEVEL,
    "gpt2": _GPT2_BYTELEVEL,
    # SmolLM / StarCoder: every digit on its own, then GPT-2's byte-level split
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     _GPT2_BYTELEVEL]},
    # LLaMA-3: one regex (numbers in groups of up to three), then bytes mapped without a second regex
    "llama-bpe": LLAMA3_PRE_TOKENIZER,
    "llama3": LLAMA3_PRE_TOKENIZER,
    "llama-v3": LLAMA3_PRE_TOKENIZER,
}
# LLaMA-3's names: its tokens look a whole pre-token up in the vocabulary before merging (tiktoken's rule, which
# LLaMA-3's tokenizer.json states as ignore_merges: true), and llama.cpp adds BOS unless the file says otherwise
LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3"}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise CheckpointError("converting a .gguf file needs the `gguf` package: pip install 'chai-models[gguf]' "
                              "(or pip install gguf)") from e
    return gguf


# ----------------------------------------------------------------------------------------------------
# metadata


def field(reader, key: str, default=None):
    """A metadata value as a Python value (str, int, float, bool or list), or default when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def architecture(reader, src) -> str:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{src}: general.architecture is {arch!r}; only 'llama'-architecture GGUF files "
                              "(LLaMA, SmolLM2, TinyLlama, Mistral-style) can be converted")
    return arch


def rope_scaling(reader, arch: str, src) -> dict | None:
    kind = field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(field(reader, f"{arch}.rope.scaling.factor"))}
    raise CheckpointError(f"{src}: rope scaling type {kind!r} is not supported (supported: none, linear; "
                          "LLaMA-3.1-style scaling is read from the rope_freqs tensor)")


def llama_config(reader, src) -> dict:
    """Our LlamaConfig fields from the GGUF hyperparameters."""
    a = architecture(reader, src)
    n_heads = int(field(reader, f"{a}.attention.head_count"))
    hidden = int(field(reader, f"{a}.embedding_length"))
    head_dim = int(field(reader, f"{a}.attention.key_length", hidden // n_heads))
    rot = field(reader, f"{a}.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise CheckpointError(f"{src}: rope.dimension_count {rot} != head_dim {head_dim}; partial rotary "
                              "embeddings are not supported by chai_models' llama")
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = field(reader, f"{a}.vocab_size") or (len(tokens) if tokens else None) or embedding_rows(reader)
    names = {t.name for t in reader.tensors}
    eos = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return {
        "family": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(field(reader, f"{a}.feed_forward_length")),
        "n_layers": int(field(reader, f"{a}.block_count")),
        "n_heads": n_heads,
        "n_kv_heads": int(field(reader, f"{a}.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "max_seq_len": int(field(reader, f"{a}.context_length", 2048)),
        "norm_eps": f32_value(field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": f32_value(field(reader, f"{a}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling(reader, a, src),
        "tie_word_embeddings": "output.weight" not in names,  # llama.cpp drops the copy when tied
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_ids": list(dict.fromkeys(int(e) for e in eos if e is not None)),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
    }


def f32_value(x) -> float:
    """GGUF stores floats as float32; the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(x)))


def embedding_rows(reader) -> int | None:
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            return int(t.shape[-1])  # ne order: [hidden, vocab]
    return None


# ----------------------------------------------------------------------------------------------------
# tensors


def our_name(name: str, n_layers: int) -> str | None:
    """GGUF tensor name -> ours; None when it has no place in our model."""
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < n_layers \
            and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


@lru_cache(maxsize=1)
def supported_types() -> tuple[str, ...]:
    """The tensor types the installed `gguf` package dequantizes: each is tried on one block of zero bytes."""
    gguf = _gguf()
    names = []
    for qtype in gguf.GGMLQuantizationType:
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        try:
            out = gguf.quants.dequantize(np.zeros((1, nbytes), np.uint8), qtype)
        except (NotImplementedError, ValueError, TypeError):
            continue
        if out.dtype == np.float32 and out.size == block:  # a view of raw bytes (I8, F64, ...) is no dequantizer
            names.append(qtype.name)
    return tuple(names)


def dequantize(t, src) -> np.ndarray:
    """One GGUF tensor as a float32 numpy array in row-major [rows, cols] (or [n]) shape."""
    gguf = _gguf()
    qtype = t.tensor_type.name
    if qtype not in supported_types():
        raise CheckpointError(f"{src}: tensor {t.name!r} is stored as {qtype}, which the installed gguf package "
                              f"cannot dequantize (it can: "
                              f"{', '.join(supported_types())}); upgrade it (pip install -U gguf), re-quantize the "
                              "model with llama.cpp's llama-quantize, or convert from the HF folder")
    x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    shape = tuple(int(n) for n in reversed(t.shape))  # ne order -> row-major
    return np.array(x.reshape(shape), dtype=np.float32)  # a copy: F32 data is a read-only view of the mmap


def rope_freqs_scaling(x: np.ndarray, cfg: dict, src) -> dict:
    """LLaMA-3.1-style rope_freqs (per-frequency divisors) -> our rope_scaling, when it matches a known recipe.

    GGUF keeps only the resulting divisors, not the parameters; we try the published LLaMA-3.1/3.2 recipe
    (low 1, high 4, original context 8192, factor = the largest divisor) and accept it only if it
    reproduces every divisor.
    """
    from ..models.llama import LlamaConfig, rope_inv_freq

    x = x.reshape(-1).astype(np.float64)
    if np.allclose(x, 1.0):
        return None
    guess = {"rope_type": "llama3", "factor": float(x.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
    base = {k: v for k, v in cfg.items() if k != "family" and not k.startswith("_")}
    plain = rope_inv_freq(LlamaConfig(**{**base, "rope_scaling": None})).double()
    scaled = rope_inv_freq(LlamaConfig(**{**base, "rope_scaling": guess})).double()
    if plain.shape[0] == x.shape[0] and np.allclose((plain / scaled).numpy(), x, rtol=1e-3):
        return guess
    raise CheckpointError(f"{src}: rope_freqs holds RoPE scaling divisors that match no recipe chai_models "
                          "knows (LLaMA-3.1 with low 1 / high 4 / 8192); convert from the HF folder instead")


def gguf_tensors(reader, cfg: dict, dtype: torch.dtype, src):
    """Yields (our_name, tensor) for every weight, dequantized, renamed and with Q/K rows unpermuted."""
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # read into the config (RoPE scaling) by `read`; not a weight of our model
        name = our_name(t.name, cfg["n_layers"])
        if name is None:
            raise CheckpointError(f"{src}: unknown tensor {t.name!r} for a llama model; chai_models/convert/gguf.py "
                                  "has no mapping for it (is this really a plain llama GGUF?)")
        w = torch.from_numpy(dequantize(t, src))
        if name.endswith(("attention.wq.weight", "attention.wq.bias")):
            w = rotate_half_rows(w, cfg["n_heads"])
        elif name.endswith(("attention.wk.weight", "attention.wk.bias")):
            w = rotate_half_rows(w, cfg["n_kv_heads"])
        yield name, w.to(dtype)


# ----------------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_files(reader, src) -> dict[str, dict | bytes]:
    """The GGUF's tokenizer as the files of a converted folder: {file name: JSON document or raw bytes}."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind is None:
        return {}
    if kind == "llama":
        return sentencepiece_files(reader, src)
    if kind != "gpt2":
        raise CheckpointError(f"{src}: tokenizer.ggml.model is {kind!r}; chai_models converts byte-level BPE "
                              "('gpt2') and sentencepiece ('llama') tokenizers from GGUF; convert the HF folder "
                              "instead (it carries the tokenizer files)")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{src}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer chai_models does not know "
                              f"(known: {sorted(PRE_TOKENIZERS)}); add its split rule to PRE_TOKENIZERS in "
                              "chai_models/convert/gguf.py")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges = field(reader, "tokenizer.ggml.merges") or []
    return {
        "tokenizer.json": bpe_tokenizer_json(tokens, types, merges, pre),
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast",
                                  **tokenizer_config(reader, tokens, add_bos_default=pre in LLAMA3_PRE)},
        "generation_config.json": generation_config(reader),
    }


def bpe_tokenizer_json(tokens: list[str], types: list[int], merges: list[str], pre: str) -> dict:
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": ty == TOKEN_CONTROL}
             for i, (tok, ty) in enumerate(zip(tokens, types)) if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in LLAMA3_PRE,
                  "vocab": {tok: i for i, tok in enumerate(tokens)}, "merges": list(merges)},
    }


def _token(reader, tokens, key):
    i = field(reader, f"tokenizer.ggml.{key}_token_id")
    return None if i is None or i >= len(tokens) else tokens[i]


def tokenizer_config(reader, tokens, add_bos_default: bool) -> dict:
    cfg = {
        "bos_token": _token(reader, tokens, "bos"),
        "eos_token": _token(reader, tokens, "eos"),
        "unk_token": _token(reader, tokens, "unknown"),
        "pad_token": _token(reader, tokens, "padding"),
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", add_bos_default)),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "model_max_length": field(reader, "llama.context_length"),
    }
    template = field(reader, "tokenizer.chat_template")
    if template is not None:
        cfg["chat_template"] = template
    return cfg


# ----------------------------------------------------------------------------------------------------
# sentencepiece vocabularies -> tokenizer.model


def sentencepiece_files(reader, src) -> dict[str, dict | bytes]:
    """A 'llama' (sentencepiece) vocabulary as tokenizer.model + tokenizer_config.json + generation_config.json.

    The scores are the BPE merge priorities and the token types say which pieces are control, unknown, byte
    (<0xNN>, the byte fallback) or user-defined tokens, exactly as sentencepiece stores them; the normalizer is
    LLaMA's (no normalization, a space put in front of the text unless tokenizer.ggml.add_space_prefix is false).
    """
    import sentencepiece as spm

    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    if not tokens or scores is None or types is None or not len(tokens) == len(scores) == len(types):
        raise CheckpointError(f"{src}: a sentencepiece ('llama') vocabulary needs tokenizer.ggml.tokens, .scores and "
                              ".token_type of equal length; this file's tokenizer metadata is incomplete")
    if TOKEN_UNKNOWN not in types:
        raise CheckpointError(f"{src}: the sentencepiece vocabulary has no unknown token (token type 2); "
                              "sentencepiece needs one")
    ids = {k: field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    if ids["unknown"] is None:
        ids["unknown"] = types.index(TOKEN_UNKNOWN)
    proto = sentencepiece_model_proto(
        tokens, scores, types, {k: (None if i is None or i >= len(tokens) else int(i)) for k, i in ids.items()},
        add_dummy_prefix=bool(field(reader, "tokenizer.ggml.add_space_prefix", True)),
        remove_extra_whitespaces=bool(field(reader, "tokenizer.ggml.remove_extra_whitespaces", False)))
    try:
        spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own message
        raise CheckpointError(f"{src}: its sentencepiece vocabulary does not load in sentencepiece ({e})") from e
    return {
        "tokenizer.model": proto,
        "tokenizer_config.json": tokenizer_config(reader, tokens, add_bos_default=True),
        "generation_config.json": generation_config(reader),
    }


def sentencepiece_model_proto(tokens: list[str], scores: list[float], types: list[int], ids: dict[str, int | None],
                              add_dummy_prefix: bool, remove_extra_whitespaces: bool) -> bytes:
    """sentencepiece's ModelProto (sentencepiece_model.proto) for a BPE model, written field by field.

    ModelProto: 1 pieces {1 piece, 2 score, 3 type}, 2 trainer_spec, 3 normalizer_spec. The trainer spec
    carries what the processor reads at run time: model type (BPE = 2), byte fallback and the special pieces.
    """
    pieces = b"".join(_pb_bytes(1, _pb_bytes(1, t.encode("utf-8")) + _pb_float(2, s) + _pb_int(3, int(ty)))
                      for t, s, ty in zip(tokens, scores, types))
    trainer = _pb_int(3, 2) + _pb_int(4, len(tokens)) + _pb_int(35, int(TOKEN_BYTE in types))
    for key, id_field, piece_field in (("unknown", 40, 45), ("bos", 41, 46), ("eos", 42, 47), ("padding", 43, 48)):
        i = ids[key]
        trainer += _pb_int(id_field, -1 if i is None else i)
        if i is not None:
            trainer += _pb_bytes(piece_field, tokens[i].encode("utf-8"))
    normalizer = (_pb_bytes(1, b"identity") + _pb_int(3, int(add_dummy_prefix))
                  + _pb_int(4, int(remove_extra_whitespaces)) + _pb_int(5, 1))
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


def _pb_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are written as 64-bit two's complement
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb_int(field_number: int, n: int) -> bytes:
    return _pb_varint(field_number << 3) + _pb_varint(n)


def _pb_float(field_number: int, x: float) -> bytes:
    return _pb_varint(field_number << 3 | 5) + struct.pack("<f", x)


def _pb_bytes(field_number: int, data: bytes) -> bytes:
    return _pb_varint(field_number << 3 | 2) + _pb_varint(len(data)) + data


def generation_config(reader) -> dict:
    eos = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return {"bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": list(dict.fromkeys(e for e in eos if e is not None)),
            "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id")}


def write_json_files(folder: Path, docs: dict[str, dict | bytes]) -> None:
    for name, doc in docs.items():
        if isinstance(doc, bytes):
            (folder / name).write_bytes(doc)
        else:
            (folder / name).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# the reader and the entry point


def detect(src: Path) -> bool:
    """A .gguf file."""
    return src.is_file() and src.suffix == ".gguf"


def read(src: Path, dtype: torch.dtype | None = None) -> Source:
    """Our config and a lazy stream of dequantized tensors for a .gguf file; dtype None means float32."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(src))
    except Exception as e:  # the reader raises ValueError/struct errors on a bad magic or a truncated file
        raise CheckpointError(f"{src} could not be read as GGUF ({type(e).__name__}: {e})") from e
    cfg = llama_config(reader, src)
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            cfg["rope_scaling"] = rope_freqs_scaling(dequantize(t, src), cfg, src)
    docs = tokenizer_files(reader, src)  # before the weights: a tokenizer we cannot write fails fast
    dtype = dtype or torch.float32
    n = sum(t.name != "rope_freqs.weight" for t in reader.tensors)
    return Source(cfg, gguf_tensors(reader, cfg, dtype, src), dtype, n,
                  extra_files=lambda tmp: write_json_files(tmp, docs), desc=f"converting {src.name}")


def convert_gguf(src, dst, dtype: torch.dtype | None = None, force: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Converts a llama-architecture .gguf file into our format at dst; returns dst."""
    src, dst = Path(src), Path(dst)
    return write_source(dst, read(src, dtype), force, max_shard_bytes)
