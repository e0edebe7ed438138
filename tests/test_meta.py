"""Meta consolidated checkpoints: a tiny HF model written out the way Meta ships weights, converted back."""
import json

import pytest
import torch
from conftest import hf_llama, rel_err

from chai_models import CheckpointError, load
from chai_models.convert import convert

HF_TO_META = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
              "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def to_interleaved(w, n_heads):
    """The inverse of the converter's permutation: rotate-half rows back to Meta's interleaved pairs."""
    rows, hidden = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, hidden).transpose(1, 2).reshape(rows, hidden)


def write_meta(hf, folder, n_shards):
    cfg = hf.config
    folder.mkdir()
    sd = {}
    for k, v in hf.state_dict().items():
        if k == "model.embed_tokens.weight":
            sd["tok_embeddings.weight"] = v
        elif k == "model.norm.weight":
            sd["norm.weight"] = v
        elif k == "lm_head.weight":
            sd["output.weight"] = v
        else:
            parts = k.split(".")  # model.layers.{i}.{module path}.weight
            i, mod = parts[2], ".".join(parts[3:-1])
            name = f"layers.{i}.{HF_TO_META[mod]}.weight"
            if mod == "self_attn.q_proj":
                v = to_interleaved(v, cfg.num_attention_heads)
            elif mod == "self_attn.k_proj":
                v = to_interleaved(v, cfg.num_key_value_heads)
            sd[name] = v
    for s in range(n_shards):
        shard = {"rope.freqs": torch.ones(4)}  # Meta saves the RoPE buffer; the converter recomputes it
        for name, v in sd.items():
            kind = name.split(".")[-2]
            dim = SPLIT.get(kind)
            shard[name] = v.clone() if dim is None else v.chunk(n_shards, dim=dim)[s].clone()
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": -1, "multiple_of": 16,
              "norm_eps": cfg.rms_norm_eps, "max_seq_len": cfg.max_position_embeddings}
    (folder / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("kv, n_shards", [(4, 1), (2, 2)], ids=["mha-1shard", "gqa-2shards"])
def test_meta_consolidated_matches_transformers(tmp_path, kv, n_shards):
    hf = hf_llama(seed=kv, num_key_value_heads=kv)
    write_meta(hf, tmp_path / "meta", n_shards)
    convert(tmp_path / "meta", tmp_path / "ours")
    ours = load(tmp_path / "ours", dtype=torch.float32)
    assert ours.config.intermediate_size == hf.config.intermediate_size and ours.config.vocab_size == 256
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) < 1e-5


def test_meta_incomplete_shards(tmp_path):
    hf = hf_llama(seed=1, num_key_value_heads=2)
    write_meta(hf, tmp_path / "meta", 2)
    sd = torch.load(tmp_path / "meta" / "consolidated.01.pth")
    sd.pop("layers.1.attention.wo.weight")
    torch.save(sd, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="same tensors"):
        convert(tmp_path / "meta", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
