"""OPT: parity with transformers' OPTForCausalLM on random weights of real OPT shapes, conversion, CHAI.

The HF models are saved the three ways OPT checkpoints exist in the wild (sharded pytorch_model.bin with an
index and lm_head present, the bare `decoder.*` prefix of OPTModel / facebook's files, and safetensors from
save_pretrained), converted with chai_models.convert and loaded with chai_models.load.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import rel_err  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from chai_models import ChaiConfig, CheckpointError, load, set_chai  # noqa: E402
from chai_models.chai import chai_layers  # noqa: E402
from chai_models.convert import convert  # noqa: E402
from chai_models.models.opt import OPT, OPT_PRESETS, OPTConfig, opt_config  # noqa: E402

TOL = 1e-5  # relative error (norm of difference / norm of reference) in fp32

# HF config kwargs per variant. The 125m and 350m shapes keep every real dimension but depth (2 layers) and
# vocabulary (shrunk to keep the CPU suite quick; vocab only sizes the embedding table).
VARIANTS = {
    # sharded pytorch_model.bin + index, `model.decoder.*` keys, lm_head.weight present
    "125m": dict(save="bin-sharded", hf=dict(vocab_size=2048, hidden_size=768, ffn_dim=3072, num_hidden_layers=2,
                                             num_attention_heads=12, max_position_embeddings=2048)),
    # OPTModel.save_pretrained: bare `decoder.*` keys, safetensors; post-LN, 512-wide embedding projected
    "350m": dict(save="bare-prefix", hf=dict(vocab_size=2048, hidden_size=1024, ffn_dim=4096, num_hidden_layers=2,
                                             num_attention_heads=16, max_position_embeddings=2048,
                                             word_embed_proj_dim=512, do_layer_norm_before=False)),
    # OPTForCausalLM.save_pretrained (safetensors, sharded by a small max_shard_size)
    "tiny": dict(save="safetensors", hf=dict(vocab_size=256, hidden_size=64, ffn_dim=160, num_hidden_layers=3,
                                             num_attention_heads=8, max_position_embeddings=128)),
    "tiny-post-ln": dict(save="safetensors", hf=dict(vocab_size=256, hidden_size=64, ffn_dim=160,
                                                     num_hidden_layers=3, num_attention_heads=8,
                                                     max_position_embeddings=128, word_embed_proj_dim=32,
                                                     do_layer_norm_before=False)),
    "tiny-no-bias-no-affine": dict(save="bin-sharded", hf=dict(vocab_size=256, hidden_size=64, ffn_dim=160,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               max_position_embeddings=128, enable_bias=False,
                                                               layer_norm_elementwise_affine=False)),
}


def random_hf_opt(hf_kwargs, seed=0):
    """An OPTForCausalLM in fp32 with every parameter random (biases and LayerNorms too, so that a swapped
    or dropped one shows in the logits), in eval mode, eager attention."""
    cfg = transformers.OPTConfig(**hf_kwargs)
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def save_bin_sharded(model, folder: Path, n_shards=2):
    """The pre-safetensors HF layout: pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json."""
    model.config.save_pretrained(folder)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}  # includes the tied lm_head.weight
    keys = list(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::n_shards]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_source(model, folder: Path, how: str):
    folder.mkdir(parents=True)
    if how == "bin-sharded":
        save_bin_sharded(model, folder)
    elif how == "bare-prefix":
        model.model.save_pretrained(folder)  # OPTModel: keys `decoder.*`, no lm_head
    elif how == "safetensors":
        model.save_pretrained(folder, max_shard_size="100KB")
    else:
        raise ValueError(how)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> (hf model, our loaded model, source folder, converted folder); built once per module."""
    root = tmp_path_factory.mktemp("opt")
    cache = {}

    def get(variant):
        if variant not in cache:
            spec = VARIANTS[variant]
            hf = random_hf_opt(spec["hf"])
            src = save_source(hf, root / f"{variant}-hf", spec["save"])
            dst = convert(src, root / variant)
            cache[variant] = hf, load(dst, dtype=torch.float32), src, dst
        return cache[variant]

    return get


def tokens(vocab, B=2, S=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, S), generator=g)


# ----------------------------------------------------------------------------------------------------
# Conversion layouts


def test_sources_have_the_intended_layouts(converted):
    _, _, src, _ = converted("125m")
    assert (src / "pytorch_model.bin.index.json").exists() and len(list(src.glob("pytorch_model-*.bin"))) == 2
    keys = json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert "lm_head.weight" in keys and "model.decoder.embed_tokens.weight" in keys
    _, _, src, _ = converted("350m")
    keys = load_file(src / "model.safetensors")
    assert "decoder.project_in.weight" in keys and not any(k.startswith("model.") for k in keys)
    assert "lm_head.weight" not in keys and "decoder.final_layer_norm.weight" not in keys
    _, _, src, _ = converted("tiny")
    assert (src / "model.safetensors.index.json").exists()


def test_converted_config_and_no_second_lm_head(converted):
    _, model, _, dst = converted("350m")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["family"] == "opt" and cfg["word_embed_proj_dim"] == 512 and cfg["do_layer_norm_before"] is False
    assert isinstance(model, OPT) and model.norm is None
    assert tuple(model.project_in.weight.shape) == (1024, 512) and tuple(model.project_out.weight.shape) == (512, 1024)
    assert tuple(model.pos_embeddings.weight.shape) == (2048 + 2, 1024)
    assert not any("output" in k or "lm_head" in k for k in model.state_dict())


# ----------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(converted, variant):
    hf, model, _, _ = converted(variant)
    x = tokens(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(x).logits
        ours = model(x)
        hf.config._attn_implementation = "sdpa"  # the other HF kernel; both must agree with us
        try:
            ref_sdpa = hf(x).logits
        finally:
            hf.config._attn_implementation = "eager"
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < TOL, f"eager: {rel_err(ours, ref):.2e}"
    assert rel_err(ours, ref_sdpa) < TOL, f"sdpa: {rel_err(ours, ref_sdpa):.2e}"


def test_hf_positions_from_an_all_ones_mask_are_arange(converted):
    # HF derives OPT positions from cumsum(attention_mask) - 1; unpadded, that is 0..S-1, which we use
    hf, _, _, _ = converted("tiny")
    x = tokens(hf.config.vocab_size)
    with torch.no_grad():
        a = hf(x, attention_mask=torch.ones_like(x)).logits
        b = hf(x, position_ids=torch.arange(x.shape[1]).expand_as(x)).logits
        c = hf(x).logits
    assert torch.equal(a, b) and torch.equal(a, c)


def greedy_hf(hf, prompt, n):
    ids = prompt
    with torch.no_grad():
        for _ in range(n):  # full recompute: the reference, no HF cache involved
            nxt = hf(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompt.shape[1]:]


def greedy_ours_cached(model, prompt, n):
    B, S = prompt.shape
    model.setup_caches(B, S + n)
    out = []
    try:
        with torch.no_grad():
            logits = model(prompt, torch.arange(S))
            for i in range(n):
                nxt = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
                out.append(nxt)
                if i + 1 < n:
                    logits = model(nxt, torch.tensor([S + i]))
    finally:
        model.clear_caches()
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", ["125m", "350m", "tiny-post-ln"])
def test_greedy_20_tokens_match_transformers(converted, variant):
    hf, model, _, _ = converted(variant)
    prompt = tokens(hf.config.vocab_size, B=2, S=7, seed=3)
    want = greedy_hf(hf, prompt, 20)
    assert torch.equal(greedy_ours_cached(model, prompt, 20), want)
    with torch.no_grad():  # and without our cache
        ids = prompt
        for _ in range(20):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids[:, 7:], want)


@pytest.mark.parametrize("variant", ["125m", "350m", "tiny", "tiny-no-bias-no-affine"])
def test_cached_decode_equals_uncached_forward(converted, variant):
    _, model, _, _ = converted(variant)
    x = tokens(model.config.vocab_size, B=2, S=20)
    with torch.no_grad():
        full = model(x)
        model.setup_caches(3, 32)  # a larger cache than needed: unused slots must stay masked
        try:
            parts = [model(x[:, :12], torch.arange(12))]
            parts += [model(x[:, i:i + 1], torch.tensor([i])) for i in range(12, 16)]
            parts += [model(x[:, 16:20], torch.arange(16, 20))]  # a chunk after position 0: causal over 0..19
            last = model(x, last_only=True)  # uncached, the last position's logits only
        finally:
            model.clear_caches()
    assert rel_err(torch.cat(parts, 1), full) < TOL
    assert last.shape == (2, 1, full.shape[-1]) and rel_err(last, full[:, -1:]) < TOL


def test_forward_without_input_pos_ignores_an_allocated_cache(converted):
    _, model, _, _ = converted("tiny")
    x = tokens(model.config.vocab_size, B=2, S=20)
    with torch.no_grad():
        full = model(x)
        model.setup_caches(2, 32)
        try:
            head = model(x[:, :12], torch.arange(12))
            assert torch.equal(model(x), full)  # scoring in between leaves the cache as it was
            tail = torch.cat([model(x[:, i:i + 1], torch.tensor([i])) for i in range(12, 20)], 1)
        finally:
            model.clear_caches()
    assert rel_err(torch.cat([head, tail], 1), full) < TOL


# ----------------------------------------------------------------------------------------------------
# CHAI on OPT


def test_chai_with_every_layer_dense_is_exactly_dense(converted):
    # counts equal to the heads keep those layers dense: bit for bit
    _, model, _, _ = converted("125m")
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        dense = model(x)
        set_chai(model, ChaiConfig([model.config.n_heads] * model.config.n_layers))
        try:
            assert not chai_layers(model)
            assert torch.equal(model(x), dense)
        finally:
            set_chai(model, None)


@pytest.mark.parametrize("variant", ["tiny", "125m"])
def test_chai_with_one_cluster_per_head_matches_dense(converted, variant):
    # k == H forced through the clustered code: checks that OPT's q scaling reaches CHAI's window and clustered
    # attention once (scale 1.0 there), not twice or never
    _, model, _, _ = converted(variant)
    cfg, x = model.config, tokens(model.config.vocab_size, S=20)
    with torch.no_grad():
        dense = model(x)
        set_chai(model, ChaiConfig([cfg.n_heads] * cfg.n_layers), cluster_dense_layers=True)
        try:
            assert len(chai_layers(model)) == cfg.n_layers
            assert rel_err(model(x), dense) < TOL
            model.setup_caches(2, 32)
            cached = torch.cat([model(x[:, :9], torch.arange(9))]
                               + [model(x[:, i:i + 1], torch.tensor([i])) for i in range(9, 20)], 1)
            assert rel_err(cached, dense) < TOL
            assert all(a.ready for a in chai_layers(model))
        finally:
            model.clear_caches()
            set_chai(model, None)


@pytest.mark.parametrize("variant", ["tiny", "tiny-post-ln"])
def test_calibration_features_are_hf_attention_probabilities(converted, variant):
    # the features CHAI clusters on are OPT's own attention probabilities (q scaled once, as in HF)
    from chai_models.chai.calibrate import collect_features

    hf, model, _, _ = converted(variant)
    x = tokens(hf.config.vocab_size, B=2, S=5)
    feats = collect_features(model, [x], window=5, show_progress=False)  # [L, B, H, 25]
    with torch.no_grad():
        attn = hf(x, output_attentions=True).attentions  # L x [B, H, 5, 5]
    ref = torch.stack([a.flatten(2) for a in attn])
    assert rel_err(feats, ref) < TOL


@pytest.mark.parametrize("variant,clusters", [("tiny", [8, 3, 1]), ("tiny-post-ln", [2, 5, 8]),
                                              ("125m", [12, 3]), ("350m", [5, 16])])
def test_chai_cached_equals_uncached(converted, variant, clusters):
    _, model, _, _ = converted(variant)
    x = tokens(model.config.vocab_size, B=2, S=24)
    with torch.no_grad():
        dense = model(x)
        set_chai(model, ChaiConfig(clusters))
        try:
            ref = model(x)
            assert rel_err(ref, dense) > 1e-4  # clustering changed something
            model.setup_caches(2, 32)
            b = model.kv_cache_bytes()
            assert b["k"] < b["v"] and b["saved"] > 0
            prefill = torch.cat([model(x[:, :16], torch.arange(16))]
                                + [model(x[:, i:i + 1], torch.tensor([i])) for i in range(16, 24)], 1)
            assert rel_err(prefill, ref) < TOL
            model.setup_caches(2, 32)  # one token at a time from position 0: the window path
            tokenwise = torch.cat([model(x[:, i:i + 1], torch.tensor([i])) for i in range(24)], 1)
            assert rel_err(tokenwise, ref) < TOL
        finally:
            model.clear_caches()
            set_chai(model, None)


# ----------------------------------------------------------------------------------------------------
# Presets and the model's own errors


# facebook/opt-* parameter counts (the embedding counted once: the head is tied)
PUBLIC_PARAMS = {"opt-125m": 125.2e6, "opt-350m": 331.2e6, "opt-1.3b": 1.316e9, "opt-2.7b": 2.652e9,
                 "opt-6.7b": 6.658e9, "opt-13b": 12.853e9, "opt-30b": 29.975e9, "opt-66b": 65.7e9}


@pytest.mark.parametrize("name", list(OPT_PRESETS))
def test_presets_have_the_public_shapes(name):
    cfg = opt_config(name)
    assert cfg.vocab_size == 50272 and cfg.max_seq_len == 2048 and cfg.hidden_size % cfg.n_heads == 0
    assert cfg.ffn_dim == 4 * cfg.hidden_size and cfg.head_dim in (64, 80, 128)  # 2.7b: 32 heads of 80
    with torch.device("meta"):
        n = sum(p.numel() for p in OPT(cfg).parameters())
    assert abs(n / PUBLIC_PARAMS[name] - 1) < 0.005, f"{name}: {n / 1e6:.1f}M parameters"
    # and the same count as transformers' model of the same HF config
    hf_cfg = transformers.OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, ffn_dim=cfg.ffn_dim,
                                    num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                    word_embed_proj_dim=cfg.word_embed_proj_dim,
                                    do_layer_norm_before=cfg.do_layer_norm_before)
    with torch.device("meta"):
        hf_n = sum(p.numel() for p in transformers.OPTForCausalLM(hf_cfg).parameters())
    assert n == hf_n


def test_preset_names_and_overrides():
    assert opt_config("125m") == opt_config("opt-125m")
    c = opt_config("350m", n_layers=2, vocab_size=100)
    assert (c.n_layers, c.vocab_size, c.word_embed_proj_dim, c.do_layer_norm_before) == (2, 100, 512, False)
    assert opt_config("66b").n_heads == 72 and opt_config("66b").n_layers == 64
    with pytest.raises(ValueError, match="unknown OPT size"):
        opt_config("opt-175m")


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        OPTConfig(vocab_size=10, hidden_size=30, ffn_dim=8, n_layers=1, n_heads=4)
    with pytest.raises(ValueError, match="relu"):
        OPTConfig(vocab_size=10, hidden_size=32, ffn_dim=8, n_layers=1, n_heads=4, activation="gelu")


def test_model_errors():
    model = OPT(OPTConfig(vocab_size=16, hidden_size=16, ffn_dim=32, n_layers=1, n_heads=2, max_seq_len=8))
    with pytest.raises(ValueError, match="learned positions for 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="learned positions for 8"):
        model.setup_caches(1, 9)
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.arange(2))


def test_public_api_exports_opt():
    import chai_models

    assert chai_models.OPT is OPT and chai_models.OPTConfig is OPTConfig


# ----------------------------------------------------------------------------------------------------
# Bad sources


@pytest.fixture
def tiny_src(tmp_path):
    hf = random_hf_opt(VARIANTS["tiny"]["hf"])
    src = tmp_path / "src"
    hf.save_pretrained(src)  # one model.safetensors
    return src


def edit_tensors(src: Path, fn):
    f = src / "model.safetensors"
    sd = dict(load_file(f))
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def edit_config(src: Path, **kw):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(kw)
    (src / "config.json").write_text(json.dumps(cfg))


def test_unknown_source_key_is_an_error(tiny_src, tmp_path):
    edit_tensors(tiny_src, lambda sd: sd.__setitem__("model.decoder.layers.0.self_attn.rotary.weight",
                                                     torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unknown tensor 'model.decoder.layers.0.self_attn.rotary.weight'"):
        convert(tiny_src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layer_beyond_the_config_is_an_error(tiny_src, tmp_path):
    edit_config(tiny_src, num_hidden_layers=2)
    with pytest.raises(CheckpointError, match="unknown tensor 'model.decoder.layers.2"):
        convert(tiny_src, tmp_path / "out")


def test_final_norm_in_a_post_ln_config_is_an_error(tiny_src, tmp_path):
    edit_config(tiny_src, do_layer_norm_before=False)  # the source has decoder.final_layer_norm: contradiction
    with pytest.raises(CheckpointError, match="final_layer_norm.*do_layer_norm_before is false"):
        convert(tiny_src, tmp_path / "out")


def test_shape_contradicting_config_is_an_error(tiny_src, tmp_path):
    edit_config(tiny_src, ffn_dim=128)
    with pytest.raises(CheckpointError, match=r"fc\d\.\w+' has shape .*160.* but the config implies .*128"):
        convert(tiny_src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_missing_tensor_is_an_error(tiny_src, tmp_path):
    edit_tensors(tiny_src, lambda sd: sd.pop("model.decoder.layers.1.fc2.bias"))
    with pytest.raises(CheckpointError, match="lacks tensor.*layers.1.feed_forward.fc2.bias"):
        convert(tiny_src, tmp_path / "out")


def test_unsupported_configs_are_errors(tiny_src, tmp_path):
    edit_config(tiny_src, activation_function="gelu")
    with pytest.raises(CheckpointError, match="only relu"):
        convert(tiny_src, tmp_path / "out")
    edit_config(tiny_src, activation_function="relu", tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="untied"):
        convert(tiny_src, tmp_path / "out")


def test_existing_output_needs_force(tiny_src, tmp_path):
    out = tmp_path / "out"
    convert(tiny_src, out)
    before = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--force"):
        convert(tiny_src, out)
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    convert(tiny_src, out, force=True)
    assert load(out).config.n_layers == 3


def test_projection_in_a_config_without_one_is_an_error(tmp_path):
    hf = random_hf_opt(VARIANTS["tiny-post-ln"]["hf"])
    src = tmp_path / "src"
    hf.save_pretrained(src)
    edit_config(src, word_embed_proj_dim=64)
    # drop the tensors whose shape would also contradict (which error comes first depends on key order)
    edit_tensors(src, lambda sd: [sd.pop(k) for k in list(sd) if "embed_tokens" in k])
    with pytest.raises(CheckpointError, match="project_(in|out).*word_embed_proj_dim == hidden_size"):
        convert(src, tmp_path / "out")
