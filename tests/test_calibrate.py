"""The offline phase: features, k-means curves, the elbow rule, chai.json, bad input.

The model is a random tiny LLaMA with PLANTED duplicate heads: heads of one group share their wq and wk rows,
so their attention probabilities are identical and the true cluster count of each layer is known.
"""
import json

import pytest
import torch

from chai_models import CheckpointError, ChaiConfig, set_chai
from chai_models.calibration import (calibrate_folder, main, plot_available, read_texts, split_paragraphs,
                                     texts_to_tokens)
from chai_models.chai.calibrate import (CHAI_JSON, CHAI_STATIC_JSON, PLOT_NAME, CalibrationError, calibrate_model,
                                        collect_features, kmeans_errors, n_k_slots, pick_clusters)
from chai_models.checkpoint import save_model
from chai_models.models.llama import Llama, LlamaConfig

H, D, VOCAB = 8, 16, 97
# head -> group per layer: 8 groups (dense), 3+3+2 (interleaved, so canonical labelling is exercised), one group
PLANTS = [list(range(8)), [0, 1, 2, 0, 1, 2, 0, 1], [0] * 8]
EXPECTED = [8, 3, 1]


def planted_model(plants=PLANTS, n_kv_heads=H, seed=0) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, n_layers=len(plants), n_heads=H,
                      n_kv_heads=n_kv_heads, head_dim=D)
    model = Llama(cfg).float().eval()
    with torch.no_grad():
        for attn, groups in zip(model.attention_layers, plants):
            # sharper attention than the default init, so distinct heads have clearly distinct probabilities
            attn.wq.weight.mul_(4.0)
            attn.wk.weight.mul_(4.0)
            wq = attn.wq.weight.view(H, D, -1)
            for h, g in enumerate(groups):
                wq[h] = wq[groups.index(g)]  # every head copies its group's first head
            wk = attn.wk.weight.view(n_kv_heads, D, -1)
            if n_kv_heads == H:  # MHA: K rows too, else the probabilities would differ
                for h, g in enumerate(groups):
                    wk[h] = wk[groups.index(g)]
            else:  # GQA: one K for all KV heads, so groups may span KV heads
                wk[1:] = wk[0]
    return model


def random_tokens(n=32, s=8, seed=1):
    return torch.randint(0, VOCAB, (n, s), generator=torch.Generator().manual_seed(seed))


class ByteTokenizer:  # stands in for load_tokenizer until the real one lands
    def encode(self, text, bos=None):
        return [b % VOCAB for b in text.encode()]


@pytest.fixture(scope="module")
def model():
    return planted_model()


@pytest.fixture(scope="module")
def result(model):
    return calibrate_model(model, random_tokens(), window=5, show_progress=False)


# ----------------------------------------------------------------------------------------------------
# calibrate_model on the planted model


def test_finds_planted_counts(result):
    assert result.clusters == EXPECTED
    assert result.errors.shape == (3, H)
    assert result.n_sequences == 32


def test_static_membership_is_the_planted_grouping(result):
    assert result.static_membership == [None, [0, 1, 2, 0, 1, 2, 0, 1], [0] * 8]
    assert result.static_agreement[1:] == [1.0, 1.0]


def test_features_are_window_probabilities(model):
    feats = collect_features(model, [random_tokens(4, 9)], window=5, show_progress=False)  # [L, N, H, 25]
    assert feats.shape == (3, 4, H, 25)
    p = feats.view(3, 4, H, 5, 5)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 4, H, 5))
    assert (p.triu(1) == 0).all()  # causal
    assert torch.equal(feats[2, :, 0], feats[2, :, 7])  # planted duplicates are exact


def test_batching_does_not_change_the_result(model, result):
    tokens = random_tokens()
    again = calibrate_model(model, list(tokens.split(5)), window=5, show_progress=False)
    assert again.clusters == result.clusters
    torch.testing.assert_close(again.errors, result.errors, rtol=1e-6, atol=1e-9)


def test_gqa_model_calibrates():
    m = planted_model(n_kv_heads=2)
    r = calibrate_model(m, random_tokens(16), window=5, show_progress=False)
    assert r.clusters == EXPECTED
    assert r.k_saving() == [0.0, 0.0, 0.5]  # k >= Hkv keeps all K; k = 1 keeps one of two KV heads


# ----------------------------------------------------------------------------------------------------
# k-means curves


def test_kmeans_errors_on_known_points():
    torch.manual_seed(0)
    centres = torch.randn(3, 6)
    x = centres[[0, 0, 1, 1, 1, 2]]  # 3 exact groups of 6 points
    e = kmeans_errors(x[None], n_init=4, seed=0)[0]  # [6]
    assert e[2:].abs().max() < 1e-10  # k >= 3: every group its own centre
    assert e[0] > e[1] > e[2]
    assert (e[1:] <= e[:-1]).all()  # non-increasing


def test_kmeans_errors_use_cosine_geometry():
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]])  # the first two are the same direction
    e = kmeans_errors(x)[0]
    assert e[1] < 1e-12
    torch.testing.assert_close(e[0], torch.tensor(4 / 3, dtype=torch.float64))  # unit points (1,0),(1,0),(0,1)


# ----------------------------------------------------------------------------------------------------
# The elbow rule on synthetic curves


def test_rule_clear_elbow():
    assert pick_clusters([10.0, 5.0, 0.2, 0.15, 0.1, 0.05, 0.02, 0.0], 0.05) == 3


def test_rule_no_elbow_linear_stays_dense():
    for n in (8, 32):
        assert pick_clusters([float(n - k) for k in range(1, n + 1)], 0.05) == n


def test_rule_flat_curves_give_one_cluster():
    assert pick_clusters([0.0] * 8, 0.05) == 1
    assert pick_clusters([3.0] * 8, 0.05) == 1
    assert pick_clusters([1e-9, 5e-10] + [0.0] * 6, 0.05, atol=1e-6) == 1  # rounding noise only


def test_rule_reference_decides_structure():
    curve = [1.0, 0.5, 0.3, 0.2, 0.12, 0.07, 0.03, 0.0]
    assert pick_clusters(curve, 0.05) == 7  # well below the chord
    assert pick_clusters(curve, 0.05, reference=curve) == 8  # but no better than structureless heads
    assert pick_clusters(curve, 0.05, reference=[1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.2, 0.0]) == 7


def test_rule_tolerance_is_checked():
    with pytest.raises(CalibrationError, match="tolerance"):
        pick_clusters([2.0, 1.0, 0.0], 1.5)


def test_n_k_slots_follows_chai_layer():
    assert n_k_slots(8, 8, 8) == 8 and n_k_slots(3, 8, 8) == 3
    assert n_k_slots(3, 8, 2) == 2 and n_k_slots(1, 8, 2) == 1


# ----------------------------------------------------------------------------------------------------
# calibrate_folder: chai.json beside the checkpoint, driving the model


@pytest.fixture()
def folder(tmp_path, model):
    d = tmp_path / "planted"
    save_model(model, d)
    return d


@pytest.fixture()
def text_file(tmp_path):
    f = tmp_path / "calib.txt"
    paras = [" ".join(f"w{(i * 7 + j) % 13}" for j in range(6)) + f" para {i}" for i in range(40)]
    f.write_text("\n\n".join(paras) + "\n")
    return f


def test_chai_json_drives_the_model_to_dense_logits(folder, text_file, model):
    res = calibrate_folder(folder, text_file, n=24, tokenizer=ByteTokenizer(), show_progress=False, plot=False)
    assert res.clusters == EXPECTED
    cfg = ChaiConfig.load(folder / CHAI_JSON)
    assert cfg.clusters == EXPECTED and cfg.window == 5 and cfg.static_membership is None
    cal = cfg.calibration
    assert cal["n_sequences"] == 24 and cal["tolerance"] == 0.05 and cal["data"] == str(text_file)
    assert len(cal["errors"]) == 3 and len(cal["errors"][0]) == H and "date" in cal and "rule" in cal
    assert cal["static_membership"][1] == [0, 1, 2, 0, 1, 2, 0, 1]
    static = ChaiConfig.load(folder / CHAI_STATIC_JSON)
    assert static.static_membership == [None, [0, 1, 2, 0, 1, 2, 0, 1], [0] * 8]
    tokens = random_tokens(3, 12, seed=5)
    with torch.no_grad():
        dense = model(tokens)
        for c in (cfg, static):
            set_chai(model, c)
            torch.testing.assert_close(model(tokens), dense, rtol=1e-5, atol=1e-5)
        set_chai(model, None)


def test_never_overwrites_without_force(folder, text_file):
    kw = dict(n=8, tokenizer=ByteTokenizer(), show_progress=False, plot=False)
    calibrate_folder(folder, text_file, **kw)
    with pytest.raises(FileExistsError, match="force"):
        calibrate_folder(folder, text_file, **kw)
    calibrate_folder(folder, text_file, force=True, **kw)


@pytest.mark.skipif(not plot_available(), reason="matplotlib (the plots extra) is not installed")
def test_elbow_plot_is_written(folder, text_file):
    calibrate_folder(folder, text_file, n=8, tokenizer=ByteTokenizer(), show_progress=False, plot=True)
    png = folder / PLOT_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_lists_every_layer(result):
    t = result.table()
    assert len(t.splitlines()) == 1 + 3 + 1 and "K cache saved" in t


# ----------------------------------------------------------------------------------------------------
# Data


def test_default_text_is_python_documentation():
    texts, source = read_texts(None)
    assert len(texts) > 1024 and "pydoc_data" in source


def test_jsonl_and_txt(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": "second one"}) + "\n")
    assert read_texts(j)[0] == ["hello world", "second one"]
    assert split_paragraphs("a\nb\n\n\nc\n") == ["a\nb", "c"]


def test_texts_to_tokens_skips_short_and_is_seeded():
    texts = ["ab", "abcdef", "xyzuvw", "hi", "longer text"]
    a = texts_to_tokens(texts, ByteTokenizer(), n=10, window=5, seed=3)
    assert a.shape == (3, 5)
    assert torch.equal(a, texts_to_tokens(texts, ByteTokenizer(), n=10, window=5, seed=3))


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_missing_data_file(folder, tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        calibrate_folder(folder, tmp_path / "nope.txt", tokenizer=ByteTokenizer(), plot=False)


@pytest.mark.parametrize("name,content", [("empty.txt", ""), ("blank.txt", "\n \n\n"), ("empty.jsonl", "\n")])
def test_empty_data_file(folder, tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(CalibrationError, match="empty"):
        calibrate_folder(folder, f, tokenizer=ByteTokenizer(), plot=False)


def test_bad_jsonl_and_unknown_type(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2 .*'text'"):
        read_texts(bad)
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(CalibrationError, match=r"\.txt"):
        read_texts(other)


def test_zero_sequences(folder, model):
    with pytest.raises(CalibrationError, match="at least one sequence"):
        calibrate_folder(folder, n=0, tokenizer=ByteTokenizer(), plot=False)
    with pytest.raises(CalibrationError, match="N = 0"):
        calibrate_model(model, torch.zeros(0, 8, dtype=torch.long), show_progress=False)


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        calibrate_folder(tmp_path, tokenizer=ByteTokenizer(), plot=False)
    assert main([str(tmp_path), "--no-plot"]) == 2


def test_too_short_sequences_and_window(model, text_file, folder):
    with pytest.raises(CalibrationError, match="at least window=5"):
        calibrate_model(model, random_tokens(4, 3), window=5, show_progress=False)
    with pytest.raises(CalibrationError, match="window = 1"):
        calibrate_model(model, random_tokens(4, 3), window=1, show_progress=False)
    with pytest.raises(CalibrationError, match="has 50 tokens"):
        calibrate_folder(folder, text_file, window=50, tokenizer=ByteTokenizer(), plot=False)


# ----------------------------------------------------------------------------------------------------
# The budget rule on a folder, and the random-shape timing run


def test_budget_rule_writes_chai_json_within_budget(folder, text_file, model):
    from chai_models.calibration import calibrate_budget_folder

    cal = calibrate_budget_folder(folder, 0.05, text_file, membership="window", seq_len=16, n_search=3, n_check=3,
                                  prompt_len=4, tokenizer=ByteTokenizer(), counts=[1, 3, 4], show_progress=False)
    cfg = ChaiConfig.load(folder / CHAI_JSON)
    rec = cfg.calibration
    assert cfg.clusters == cal.chosen.clusters and cfg.membership == "window"
    assert rec["rule"] == "budget" and rec["budget"] == 0.05 and rec["data"] == str(text_file)
    assert rec["n_search"] == 3 and rec["n_check"] == 3 and rec["seq_len"] == 16
    assert rec["chai_ppl"] <= rec["dense_ppl"] * 1.05 + 1e-3
    with pytest.raises(FileExistsError):
        calibrate_budget_folder(folder, 0.05, text_file, tokenizer=ByteTokenizer(), show_progress=False)
    with pytest.raises(CalibrationError, match="other settings"):  # --reuse needs the same data and settings
        calibrate_budget_folder(folder, 0.01, text_file, seq_len=32, force=True, tokenizer=ByteTokenizer(),
                                reuse=folder / CHAI_JSON, show_progress=False)


def test_random_shape_timing_run(capsys):
    from chai_models.calibration import main as calibrate_main

    assert calibrate_main(["--random-shape", "tiny", "--rule", "elbow", "-n", "4", "--seq-len", "8"]) == 0
    assert "tiny (random weights)" in capsys.readouterr().out
    assert calibrate_main(["--random-shape", "tiny", "--n-search", "2", "--seq-len", "12", "--membership",
                           "window", "--counts", "4"]) == 0
    out = capsys.readouterr().out
    assert "budget rule" in out and "measured runs" in out
    assert calibrate_main(["--random-shape", "nope"]) == 2


def test_shipped_chai_json_is_reusable():
    """The README's `calibrate.py COPY --budget 0.05 --reuse weights/smollm2-135m-instruct/chai.json` reuses the
    shipped file's single-layer runs: it must record the settings --reuse compares, at calibrate's defaults."""
    import inspect
    from pathlib import Path

    import chai_models
    from chai_models.calibration import calibrate_budget_folder

    shipped = Path(chai_models.__file__).parent / "data" / "smollm2-135m-instruct.chai.json"
    rec = ChaiConfig.load(shipped).calibration
    defaults = inspect.signature(calibrate_budget_folder).parameters
    want = {"rule": "budget", "data": read_texts(None)[1],
            **{k: defaults[k].default for k in ("seq_len", "n_search", "prompt_len", "seed", "window", "prompt_rows")}}
    assert {k: rec.get(k) for k in want} == want
    assert set(rec["sensitivity"]) == {"window", "prompt"}  # both memberships' single-layer runs, for any budget
