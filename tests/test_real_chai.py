"""CHAI on the real default model (SmolLM2-135M-Instruct, fp32, CPU): generation stays sensible, CHAI agrees
with dense attention better than a random grouping of the same counts, calibration on a small sample drives
generation, the command line works with the shipped chai.json; and the shipped chai.json reaches the folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chai_models import ChaiConfig, generate, load, load_tokenizer, set_chai
from chai_models.default_model import DATA_DIR, DEFAULT_MODEL_NAME, ensure_default_model

QUESTION = "What is the capital of France?"
AGGRESSIVE = "15:2"  # layers 15..29 with 2 clusters of 9 heads: 2 < 3 KV heads, so those layers drop K
REPO = Path(__file__).resolve().parent.parent
SHIPPED = DATA_DIR / f"{DEFAULT_MODEL_NAME}.chai.json"


# ----------------------------------------------------------------------------------------------------
# the shipped counts reach the converted folder (no model needed)


def test_shipped_chai_json_is_copied_beside_checkpoint(tmp_path):
    dst = tmp_path / DEFAULT_MODEL_NAME
    dst.mkdir()
    (dst / "config.json").write_text("{}")  # an already-converted folder: no download, no conversion
    assert ensure_default_model(tmp_path) == dst
    shipped = ChaiConfig.load(SHIPPED)
    assert ChaiConfig.load(dst / "chai.json").clusters == shipped.clusters
    assert len(shipped.clusters) == 30 and all(1 <= k <= 9 for k in shipped.clusters)
    static = ChaiConfig.load(dst / "chai_static.json")
    assert static.clusters == shipped.clusters and static.static_membership is not None
    # a chai.json of the user's own (their calibration) is never replaced
    (dst / "chai_static.json").unlink()
    ChaiConfig(clusters=[4] * 30).save(dst / "chai.json")
    ensure_default_model(tmp_path)
    assert ChaiConfig.load(dst / "chai.json").clusters == [4] * 30
    assert not (dst / "chai_static.json").exists()


def test_package_data_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert "[tool.setuptools.package-data]" in text and '"data/*.json"' in text


# ----------------------------------------------------------------------------------------------------
# the real model




@pytest.fixture(scope="module")
def smol(smol_dir):
    return load(smol_dir, dtype="float32")


@pytest.fixture(scope="module")
def tok(smol_dir):
    return load_tokenizer(smol_dir)


@pytest.fixture()
def model(smol):
    yield smol
    set_chai(smol, None)  # the next test starts dense


def spec(model, s: str) -> ChaiConfig:
    return ChaiConfig.from_spec(s, model.config.n_layers, model.config.n_heads)


@pytest.mark.slow
def test_aggressive_chai_still_answers_and_saves_k_cache(model, tok):
    set_chai(model, spec(model, AGGRESSIVE))
    out = generate(model, tok, QUESTION, max_new_tokens=20, chat=True)
    # measured: "The capital of France is Paris." (dense says the same). Counts below 15:2 break it:
    # 10:2 answers "The French language is a language.", 15:1 "The capital of France is France. ..."
    assert "Paris" in out.texts[0], out.texts[0]
    b = model.kv_cache_bytes()
    assert b["saved"] > 0, b  # measured 147780 B = 5.6% of K+V at generate's cache of 57 positions
    # a full 2048-position cache: 15 of 30 layers keep 2 of 3 KV heads' K -> 1/6 of K, 1/12 = 8.3% of K+V,
    # less CHAI's per-sequence window state (measured 8.2%)
    model.setup_caches(1, 2048)
    b = model.kv_cache_bytes()
    assert b["k"] * 6 == b["v"] * 5
    assert 0.08 < b["saved"] / b["dense_total"] <= 1 / 12, b


def pydoc_windows(tok, n: int = 3, length: int = 256) -> list[list[int]]:
    from chai_models.evaluate import make_windows, read_text

    _, text = read_text("pydoc")  # pydoc_data/topics.py, as the evaluation and calibration read it
    ids = tok.encode(text[:20_000])
    return make_windows(ids, length)[:n]


@pytest.mark.slow
def test_chai_agreement_with_dense_beats_random_grouping(model, tok, smol_dir):
    from chai_models.evaluate import Method, random_grouping, score_windows

    H = model.config.n_heads
    windows = pydoc_windows(tok)
    assert [len(w) for w in windows] == [256] * 3
    methods = [Method("dense", None, "dense"), Method("aggressive", spec(model, AGGRESSIVE))]
    methods += [Method(f"random[aggressive]@{s}", random_grouping(methods[1].chai, H, s), "random") for s in (0, 1)]
    stats = score_windows(model, methods, windows, batch_size=3, show_progress=False)
    agree = {m: s.agreement for m, s in stats.items()}
    print({m: round(a, 4) for m, a in agree.items()})
    assert agree["dense"] == 1.0
    # Measured on these 765 predicted positions (fp32, CPU):
    #   aggressive 0.553 (random groupings of its counts, seeds 0/1: 0.428 / 0.459)
    # SmolLM2-135M has little head redundancy, so CHAI changes the top-1 token at ~45% of positions even with
    # the calibrated counts (docs/evaluation.md: 50% agreement over 4088 positions). The floor 0.50 sits
    # ~5 points under the measurement (room for thread-count / BLAS rounding flipping near-ties) and above
    # every random grouping: a broken membership (wrong heads, wrong representative, stale window) falls
    # toward the random level and fails it.
    for name in ("aggressive",):
        assert agree[name] >= 0.50, (name, agree)
        for s in (0, 1):
            assert agree[name] > agree[f"random[{name}]@{s}"] + 0.03, (name, agree)
        assert stats[name].perplexity < min(stats[f"random[{name}]@{s}"].perplexity for s in (0, 1))


@pytest.mark.slow
def test_calibration_on_a_small_sample_drives_generation(model, tok, smol_dir, tmp_path):
    from chai_models.calibration import calibrate_folder

    folder = tmp_path / "smol"
    folder.mkdir()
    for f in smol_dir.iterdir():
        if f.name.startswith("chai") or not f.is_file():
            continue
        if f.suffix == ".safetensors":
            os.symlink(f.resolve(), folder / f.name)  # 540 MB: linked, not copied
        else:
            shutil.copyfile(f, folder / f.name)
    res = calibrate_folder(folder, n=32, plot=False, show_progress=False)
    assert res.n_sequences == 32 and len(res.clusters) == 30
    cfg = ChaiConfig.load(folder / "chai.json")
    assert cfg.clusters == res.clusters and all(1 <= k <= 9 for k in cfg.clusters)
    assert cfg.calibration["n_sequences"] == 32
    assert ChaiConfig.load(folder / "chai_static.json").static_membership is not None

    set_chai(model, cfg)
    out = generate(model, tok, QUESTION, max_new_tokens=12, chat=True)
    assert out.texts[0].strip() and out.n_generated > 0

    loaded = load(folder, chai="auto")  # the chai.json beside the checkpoint, found by load
    assert loaded.chai_config is not None and loaded.chai_config.clusters == cfg.clusters
    again = generate(loaded, load_tokenizer(folder), QUESTION, max_new_tokens=12, chat=True)
    assert again.tokens == out.tokens  # same weights, same counts: the same greedy tokens


@pytest.mark.slow
def test_cli_generate_with_shipped_chai(smol_dir):
    assert ChaiConfig.load(smol_dir / "chai.json").clusters == ChaiConfig.load(SHIPPED).clusters
    cmd = [sys.executable, "-m", "chai_models", "generate", QUESTION, "--chai", "auto", "--max-new-tokens", "16",
           "--model", str(smol_dir), "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)  # a hang guard
    assert run.returncode == 0, run.stderr
    # the shipped counts keep the answer: Paris
    assert "Paris" in run.stdout, run.stdout
    assert "CHAI clusters per layer:" in run.stderr and "(of 9 heads; membership from the" in run.stderr, run.stderr
    assert "decode attention scores skipped" in run.stderr, run.stderr
    assert "prompt tokens" in run.stderr


@pytest.mark.slow
def test_shipped_counts_keep_perplexity_close_to_dense(model, tok, smol_dir):
    """The shipped chai.json (budget rule, 2%, membership from the prompt) on text outside its calibration data."""
    from chai_models.evaluate import Method, make_windows, read_text, score_windows

    cfg = ChaiConfig.load(smol_dir / "chai.json")
    assert cfg.calibration["rule"] == "budget" and cfg.calibration["budget"] == 0.02
    _, text = read_text("/usr/share/common-licenses/GPL-3")
    windows = make_windows(tok.encode(text, bos=False), 512)[:2]
    stats = score_windows(model, [Method("dense", None, "dense"), Method("shipped", cfg)], windows, batch_size=2,
                          show_progress=False, prompt_len=32)
    # within a few percent of dense (the README table measures it on GPL-3 with the same prompt length)
    assert stats["shipped"].perplexity < 1.05 * stats["dense"].perplexity, stats
