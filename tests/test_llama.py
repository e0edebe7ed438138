"""LLaMA: parity with transformers' LlamaForCausalLM through save_pretrained -> convert -> load."""
import json
import os

import pytest
import torch
from conftest import hf_llama, rel_err

from chai_models import CheckpointError, load
from chai_models.convert import convert
from chai_models.convert import main as convert_main

VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "tied": dict(tie_word_embeddings=True),
    "head_dim": dict(head_dim=24, num_key_value_heads=2),
    "bias": dict(attention_bias=True, mlp_bias=True),
}


def save_sharded_bin(hf_model, folder, n_shards=3):
    """Saves like old transformers did: pytorch_model-0000N-of-0000M.bin shards plus an index."""
    os.makedirs(folder, exist_ok=True)
    hf_model.config.save_pretrained(folder)
    sd = {k: v.clone() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    keys = list(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::n_shards]}
        torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module", params=list(VARIANTS) + ["sharded_bin"])
def pair(request, tmp_path_factory):
    name = request.param
    hf = hf_llama(seed=len(name), **VARIANTS.get(name, dict(num_key_value_heads=2)))
    d = tmp_path_factory.mktemp(name)
    if name == "sharded_bin":
        save_sharded_bin(hf, d / "hf")
    else:
        hf.save_pretrained(d / "hf")
    convert(d / "hf", d / "ours", max_shard_bytes=200_000 if name == "gqa" else 2**31)
    return hf, load(d / "ours", dtype=torch.float32), d


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = hf(x).logits, ours(x)
    assert rel_err(out, ref) < 1e-5


def test_greedy_continuation_matches(pair):
    hf, ours, _ = pair
    x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf.generation_config.eos_token_id = None  # no early stop: compare 20 tokens
        hf.generation_config.pad_token_id = 0
        ref = hf.generate(x, max_new_tokens=20, do_sample=False)[0, 12:].tolist()
        ours.setup_caches(1, 64)
        logits = ours(x, torch.arange(12))
        toks = []
        for pos in range(12, 32):
            t = logits[0, -1].argmax().item()
            toks.append(t)
            logits = ours(torch.tensor([[t]]), torch.tensor([pos]))
    assert toks == ref


def test_cached_decode_equals_full_forward(pair):
    _, ours, _ = pair
    x = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(x)
        ours.setup_caches(3, 40)
        parts = [ours(x[:, :25], torch.arange(25))]
        parts += [ours(x[:, p:p + 1], torch.tensor([p])) for p in range(25, 40)]
    assert rel_err(torch.cat(parts, 1), full) < 1e-5


def test_sharded_output_has_index(tmp_path):
    hf = hf_llama(seed=3)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ours", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert rel_err(load(tmp_path / "ours", dtype=torch.float32)(x), hf(x).logits) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_load_and_run(tmp_path, dtype):
    hf = hf_llama(seed=4, num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ours", dtype="bfloat16")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    m = load(tmp_path / "ours", dtype=dtype)
    assert m.tok_embeddings.weight.dtype == dtype
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        out = m(x)
        ref = hf(x).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 5e-2
    assert load(tmp_path / "ours").tok_embeddings.weight.dtype == torch.bfloat16  # default: stored dtype


# ----------------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def converted(tmp_path):
    hf = hf_llama(seed=5)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ours")
    return tmp_path


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*convert"):
        load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "out")


def test_missing_weights_file(converted):
    (converted / "ours" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(converted / "ours")


def test_folder_without_config(converted):
    (converted / "ours" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(converted / "ours")


def test_corrupt_safetensors(converted):
    f = converted / "ours" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(converted / "ours")


def test_shape_contradicts_config(converted):
    cfg_path = converted / "ours" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] += 8
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="feed_forward.*has shape.*config.json implies"):
        load(converted / "ours")


def test_unknown_config_field(converted):
    cfg_path = converted / "ours" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["n_experts"] = 8
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown field.*n_experts"):
        load(converted / "ours")


def _rewrite_hf_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_unknown_key_in_source(converted):
    _rewrite_hf_weights(converted / "hf", lambda sd: sd.__setitem__("model.layers.0.mlp.expert.weight",
                                                                    torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unknown tensor 'model.layers.0.mlp.expert.weight'"):
        convert(converted / "hf", converted / "out2")
    assert not (converted / "out2").exists() and not leftovers(converted)


def test_missing_key_in_source(converted):
    _rewrite_hf_weights(converted / "hf", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="lacks tensor.*layers.1.feed_forward.w3.weight"):
        convert(converted / "hf", converted / "out2")
    assert not (converted / "out2").exists() and not leftovers(converted)


def test_source_shape_contradicts_config(converted):
    _rewrite_hf_weights(converted / "hf", lambda sd: sd.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(CheckpointError, match="norm.weight.*shape"):
        convert(converted / "hf", converted / "out2")
    assert not (converted / "out2").exists() and not leftovers(converted)


def test_existing_output_needs_force(converted, capsys):
    before = (converted / "ours" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--force"):
        convert(converted / "hf", converted / "ours")
    assert convert_main([str(converted / "hf"), str(converted / "ours")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (converted / "ours" / "model.safetensors").stat().st_mtime_ns == before
    assert convert_main([str(converted / "hf"), str(converted / "ours"), "--force"]) == 0
    assert not leftovers(converted)
    load(converted / "ours")


def test_sequence_longer_than_cache(converted):
    m = load(converted / "ours")
    with pytest.raises(RuntimeError, match="setup_caches"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.arange(4))
    m.setup_caches(2, 16)
    with pytest.raises(ValueError, match="17 tokens.*holds 16 positions"):
        m(torch.zeros(1, 17, dtype=torch.long), torch.arange(17))
    with pytest.raises(ValueError, match="batch of 3.*holds 2"):
        m(torch.zeros(3, 4, dtype=torch.long), torch.arange(4))


def test_unsupported_dtype_and_device(converted):
    with pytest.raises(ValueError, match="unsupported dtype"):
        load(converted / "ours", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load(converted / "ours", device="cuda")
