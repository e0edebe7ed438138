"""Hugging Face folders -> our format: config mapping, an explicit key map, and a streaming tensor reader.

Sources: model.safetensors, model-0000N-of-0000M.safetensors (with or without an index), pytorch_model.bin
and its shards. Tensors are read one at a time (safetensors) or one shard at a time (.bin, mmap-ed), so
peak memory is about one shard.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..checkpoint import CheckpointError
from .write import Source

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "added_tokens.json", "chat_template.jinja")

IGNORED = object()  # a source key we know and deliberately drop


def hf_weight_files(src: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).exists():
            try:
                files = sorted(set(json.loads((src / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{src / index} is corrupt ({e})") from e
            missing = [f for f in files if not (src / f).exists()]
            if missing:
                raise CheckpointError(f"{src / index} lists {missing} which are missing from {src}")
            return [src / f for f in files]
    for pattern in ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model.bin",
                    "pytorch_model-*-of-*.bin"):
        files = sorted(src.glob(pattern))
        if files:
            return files
    return []


def iter_hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for k in f.keys():
                        yield k, f.get_tensor(k)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {e})") from e
        else:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint "
                                      f"({type(e).__name__}: {e})") from e
            yield from sd.items()
            del sd


# ----------------------------------------------------------------------------------------------------
# LLaMA


def _rope_scaling(hf: dict) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling from either transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return float(theta), {"rope_type": "llama3", **{k: scaling[k] for k in keys}}
    if rope_type == "linear":
        return float(theta), {"rope_type": "linear", "factor": scaling["factor"]}
    raise CheckpointError(f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")


def llama_config(hf: dict) -> dict:
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}; this converter handles "
                              "'llama' and 'opt'")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act {act!r} is not supported for LLaMA (only silu)")
    n_heads = hf["num_attention_heads"]
    theta, scaling = _rope_scaling(hf)
    eos = hf.get("eos_token_id")
    return {
        "family": "llama",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // n_heads,
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_ids": [] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        "pad_token_id": hf.get("pad_token_id"),
    }


_LLAMA_LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_key(key: str, cfg: dict):
    """HF key -> our key, IGNORED, or None (unknown)."""
    if key == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if key == "model.norm.weight":
        return "norm.weight"
    if key == "lm_head.weight":
        return IGNORED if cfg["tie_word_embeddings"] else "output.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        i, mod, kind = m.groups()
        if mod == "self_attn.rotary_emb" or int(i) >= cfg["n_layers"]:
            return None if int(i) >= cfg["n_layers"] else IGNORED
        if mod in _LLAMA_LAYER:
            return f"layers.{i}.{_LLAMA_LAYER[mod]}.{kind}"
    if re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", key):
        return IGNORED  # old checkpoints saved the RoPE buffer; we recompute it
    return None


# ----------------------------------------------------------------------------------------------------
# OPT


def opt_config(hf: dict) -> dict:
    if hf.get("model_type") != "opt":
        raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}, not 'opt'")
    act = hf.get("activation_function", "relu")
    if act != "relu":
        raise CheckpointError(f"activation_function {act!r} is not supported for OPT (only relu)")
    if not hf.get("tie_word_embeddings", True):
        raise CheckpointError("tie_word_embeddings is false: an untied OPT lm_head is not supported (every "
                              "public OPT ties it to the token embedding)")
    pre_ln = bool(hf.get("do_layer_norm_before", True))
    if pre_ln and hf.get("_remove_final_layer_norm", False):
        raise CheckpointError("_remove_final_layer_norm with do_layer_norm_before (a legacy transformers "
                              "layout) is not supported: a pre-LN OPT here always has its final LayerNorm")
    hidden = hf["hidden_size"]
    eos = hf.get("eos_token_id", 2)
    return {
        "family": "opt",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hidden,
        "ffn_dim": hf["ffn_dim"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"],
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "word_embed_proj_dim": hf.get("word_embed_proj_dim") or hidden,
        "do_layer_norm_before": pre_ln,
        "enable_bias": bool(hf.get("enable_bias", True)),
        "layer_norm_elementwise_affine": bool(hf.get("layer_norm_elementwise_affine", True)),
        "activation": act,
        "bos_token_id": hf.get("bos_token_id", 2),
        "eos_token_ids": [] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        "pad_token_id": hf.get("pad_token_id", 1),
    }


_OPT_LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.out_proj": "attention.wo", "self_attn_layer_norm": "attention_norm", "fc1": "feed_forward.fc1",
    "fc2": "feed_forward.fc2", "final_layer_norm": "ffn_norm",
}
_OPT_TOP = {
    "embed_tokens.weight": "tok_embeddings.weight", "embed_positions.weight": "pos_embeddings.weight",
    "project_in.weight": "project_in.weight", "project_out.weight": "project_out.weight",
    "final_layer_norm.weight": "norm.weight", "final_layer_norm.bias": "norm.bias",
}


def opt_key(key: str, cfg: dict):
    """HF key -> our key, IGNORED, or None (unknown).

    OPTForCausalLM saves `model.decoder.*`; OPTModel and the original facebook/opt-* files save `decoder.*`.
    A key that the config rules out is an error naming both (the weights and config.json disagree).
    """
    if key == "lm_head.weight":
        return IGNORED  # tied: it is the token embedding (opt_config refuses untied models)
    m = re.fullmatch(r"(?:model\.)?decoder\.(.+)", key)
    if not m:
        return None
    rest = m.group(1)
    if rest in _OPT_TOP:
        why = None
        if rest.startswith("project_") and cfg["word_embed_proj_dim"] == cfg["hidden_size"]:
            why = f"word_embed_proj_dim == hidden_size ({cfg['hidden_size']}), so there is no {rest.split('.')[0]}"
        elif rest.startswith("final_layer_norm") and not cfg["do_layer_norm_before"]:
            why = "do_layer_norm_before is false (post-LN blocks), so there is no final LayerNorm"
        elif rest.startswith("final_layer_norm") and not cfg["layer_norm_elementwise_affine"]:
            why = "layer_norm_elementwise_affine is false, so LayerNorms have no weights"
        if why:
            raise CheckpointError(f"the source has {key!r} but its config.json says {why}; the weights and "
                                  "config.json come from different models")
        return _OPT_TOP[rest]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", rest)
    if m:
        i, mod, kind = m.groups()
        if int(i) < cfg["n_layers"] and mod in _OPT_LAYER:
            return f"layers.{i}.{_OPT_LAYER[mod]}.{kind}"
    return None


# family name -> (config mapping, key mapping): the Hugging Face side only; the model classes are
# chai_models.models.FAMILIES
FAMILIES: dict[str, tuple[Callable[[dict], dict], Callable[[str, dict], object]]] = {
    "llama": (llama_config, llama_key),
    "opt": (opt_config, opt_key),
}


def read_hf_config(src: Path) -> tuple[dict, Callable]:
    try:
        hf = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{src / 'config.json'} is not valid JSON ({e})") from e
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{src}: model_type {family!r} is not supported; supported: {sorted(FAMILIES)}")
    to_config, to_key = FAMILIES[family]
    cfg = to_config(hf)
    cfg["_source_dtype"] = hf.get("torch_dtype") or hf.get("dtype")
    return cfg, to_key


def hf_tensors(src: Path, cfg: dict, to_key) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (our_key, tensor) for every weight of an HF folder; unknown keys are an error."""
    for key, t in iter_hf_tensors(hf_weight_files(src)):
        ours = to_key(key, cfg)
        if ours is IGNORED:
            continue
        if ours is None:
            raise CheckpointError(f"{src}: unknown tensor {key!r} for a {cfg['family']} model; it has no mapping "
                                  "in chai_models/convert/hf.py (is this really a plain "
                                  f"{cfg['family']} checkpoint?)")
        yield ours, t


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


# ----------------------------------------------------------------------------------------------------
# the reader


def detect(src: Path) -> bool:
    """A folder with a config.json; `read` says what else is missing."""
    return src.is_dir() and (src / "config.json").exists()


def read(src: Path, dtype: torch.dtype | None = None) -> Source:
    """Our config and a lazy stream of our tensors for a Hugging Face folder; dtype None keeps the source's."""
    if not hf_weight_files(src):
        raise CheckpointError(f"{src} has a config.json but no weights (model*.safetensors or "
                              "pytorch_model*.bin)")
    cfg, to_key = read_hf_config(src)
    return Source(cfg, hf_tensors(src, cfg, to_key), dtype, extra_files=lambda tmp: copy_tokenizer_files(src, tmp))
