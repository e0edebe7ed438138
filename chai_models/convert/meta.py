"""Meta's consolidated checkpoints (params.json + consolidated.NN.pth + tokenizer.model) -> our format.

Meta's tensor names are already ours. Two things differ:
- RoPE: Meta rotates interleaved pairs (2i, 2i+1); we rotate halves (i, i + D/2) like Hugging Face, so the rows
  of wq and wk are permuted within each head (the permutation transformers' converter applies).
- Model parallelism: with N shards each tensor is split along the dimension its layer is parallel in. Shards are
  memory-mapped and each tensor is concatenated on its own, so peak memory is about one tensor.
params.json leaves out what Meta's code knew per release, so it is inferred:
- LLaMA-3.x (its tokenizer.model is tiktoken's rank table, or vocab_size 128256): BOS <|begin_of_text|>, stop
  tokens <|end_of_text|>, <|eot_id|> (and <|eom_id|> from 3.1), context 8192 for 3.0 and 131072 for 3.1+
  (params.json's use_scaled_rope), the llama3 RoPE scaling with factor 8, or 32 for LLaMA-3.2 (the 1B and 3B
  text models, the only LLaMA-3.x models narrower than 4096, as Meta's Hugging Face release states);
- LLaMA-1/2 (sentencepiece): BOS 1, EOS 2, context 4096 for LLaMA-2 (norm_eps 1e-5) and 2048 for LLaMA-1 (1e-6).
A max_seq_len or rope_scaling_factor written in params.json wins over these.
The tokenizer goes beside the weights: tokenizer.model as it is, and for LLaMA-3 a tokenizer_config.json and
generation_config.json naming its special tokens, stop tokens and Meta's chat format.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from ..checkpoint import CheckpointError
from ..tokenizer import LLAMA3_CHAT_TEMPLATE, is_tiktoken_file, llama3_special_tokens, read_tiktoken
from .rope import rotate_half_rows
from .write import Source

# split dimension of each tensor kind across model-parallel shards (None: replicated)
_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
          "attention_norm": None, "ffn_norm": None, "norm": None}


def _kind(name: str) -> str:
    return name.split(".")[-2] if name.endswith(".weight") else name


LLAMA3_VOCAB = 128256  # 128000 ranks + 256 special tokens


def meta_config(params: dict, shapes: dict[str, torch.Size], n_shards: int, n_ranks: int | None = None) -> dict:
    """Our config from params.json; the sizes params.json leaves implicit come from the tensor shapes.

    n_ranks: the number of ranks of a LLaMA-3 tiktoken tokenizer.model beside it (None: sentencepiece or none).
    """
    dim, n_heads = params["dim"], params["n_heads"]
    vocab = params.get("vocab_size", -1)
    emb = shapes["tok_embeddings.weight"]
    if vocab is None or vocab < 0:  # LLaMA-1/2 write -1: the embedding knows (split along dim 1, or along vocab)
        vocab = emb[0] if emb[1] * n_shards == dim else emb[0] * n_shards
    llama3 = n_ranks is not None or vocab == LLAMA3_VOCAB
    scaled = bool(params.get("use_scaled_rope"))
    scaling = None
    if scaled:  # LLaMA-3.1's published constants; 3.2 extends further
        factor = params.get("rope_scaling_factor") or (32.0 if dim < 4096 else 8.0)
        scaling = {"rope_type": "llama3", "factor": float(factor), "low_freq_factor": 1.0,
                   "high_freq_factor": float(params.get("rope_high_freq_factor") or 4.0),
                   "original_max_position_embeddings": 8192}
    if llama3:
        base = n_ranks if n_ranks is not None else vocab - 256  # special tokens follow the ranks
        bos, eos = base, [base + 1, base + 8, base + 9] if scaled else [base + 1, base + 9]
        context = 131072 if scaled else 8192
    else:
        bos, eos = 1, [2]
        context = 4096 if params.get("norm_eps", 1e-5) >= 1e-5 else 2048
    return {
        "family": "llama",
        "vocab_size": int(vocab),
        "hidden_size": dim,
        "intermediate_size": int(shapes["layers.0.feed_forward.w1.weight"][0] * n_shards),
        "n_layers": params["n_layers"],
        "n_heads": n_heads,
        "n_kv_heads": params.get("n_kv_heads") or n_heads,
        "head_dim": dim // n_heads,
        "max_seq_len": int(params.get("max_seq_len") or context),
        "norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "rope_scaling": scaling,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_ids": eos,
        "pad_token_id": None,
    }


def tiktoken_ranks(src: Path) -> int | None:
    """The number of ranks of a LLaMA-3 tokenizer.model in src; None when it is sentencepiece's or absent."""
    path = src / "tokenizer.model"
    if not path.exists() or not is_tiktoken_file(path):
        return None
    return len(read_tiktoken(path))


def read_meta(src: Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """(our config, stream of (our name, tensor)) for a Meta consolidated folder."""
    try:
        params = json.loads((src / "params.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{src / 'params.json'} is not valid JSON ({e})") from e
    files = sorted(src.glob("consolidated.*.pth"))
    try:
        shards = [torch.load(str(f), map_location="cpu", weights_only=True, mmap=True) for f in files]
    except Exception as e:
        raise CheckpointError(f"{src}: a consolidated shard could not be read ({type(e).__name__}: {e})") from e
    names = [k for k in shards[0] if k != "rope.freqs"]  # rope.freqs: a buffer we recompute
    for f, sd in zip(files, shards):
        if sorted(k for k in sd if k != "rope.freqs") != sorted(names):
            raise CheckpointError(f"{f} does not hold the same tensors as {files[0]}; the shards are incomplete")
    cfg = meta_config(params, {k: shards[0][k].shape for k in names}, len(shards), tiktoken_ranks(src))

    def tensors():
        for name in names:
            parts = [sd[name] for sd in shards]
            if len(parts) == 1:
                t = parts[0]
            elif name == "tok_embeddings.weight":  # LLaMA-1/2 split the embedding dim, LLaMA-3 the vocabulary
                t = torch.cat(parts, dim=1 if parts[0].shape[1] * len(parts) == cfg["hidden_size"] else 0)
            else:
                split = _SPLIT.get(_kind(name))
                t = parts[0] if split is None else torch.cat(parts, dim=split)
            if name.endswith("attention.wq.weight"):
                t = rotate_half_rows(t, cfg["n_heads"])
            elif name.endswith("attention.wk.weight"):
                t = rotate_half_rows(t, cfg["n_kv_heads"])
            yield name, t

    return cfg, tensors()


def copy_tokenizer(src: Path, dst: Path, cfg: dict) -> None:
    """tokenizer.model as it is; for LLaMA-3 also the files that name its special tokens and chat format."""
    import shutil

    if not (src / "tokenizer.model").exists():
        return
    shutil.copyfile(src / "tokenizer.model", dst / "tokenizer.model")
    n_ranks = tiktoken_ranks(src)
    if n_ranks is None:
        return
    specials = llama3_special_tokens(tool_tokens=cfg["rope_scaling"] is not None)
    config = {
        "bos_token": specials[0], "eos_token": specials[1], "add_bos_token": True,
        "added_tokens_decoder": {str(n_ranks + i): {"content": t, "special": True} for i, t in enumerate(specials)},
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "model_max_length": cfg["max_seq_len"],
    }
    generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_ids"]}
    for name, doc in (("tokenizer_config.json", config), ("generation_config.json", generation)):
        (dst / name).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# the reader


def detect(src: Path) -> bool:
    """A folder with a params.json; `read` says what else is missing."""
    return src.is_dir() and (src / "params.json").exists()


def read(src: Path, dtype: torch.dtype | None = None) -> Source:
    """Our config and a stream of our tensors for a Meta consolidated folder; dtype None keeps the source's."""
    if not sorted(src.glob("consolidated.*.pth")):
        raise CheckpointError(f"{src} has params.json but no consolidated.*.pth shards")
    cfg, tensors = read_meta(src)
    return Source(cfg, tensors, dtype, extra_files=lambda tmp: copy_tokenizer(src, tmp, cfg))
