"""Tensor parallelism (chai_models.parallel) on the CPU: ranks under torchrun with gloo against one process.

Each launch starts its ranks with `python -m torch.distributed.run --standalone` (a free port of its own) and runs
tests/tp_worker.py; the ranks' logits must equal one process's within fp32 rounding (dense, and CHAI with
ChaiConfig.groups = tp in the one process), and each rank must read only its slices of the checkpoint.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err

from chai_models import ChaiConfig, load, parallel, save_model
from chai_models.models.llama import Llama, LlamaConfig
from chai_models.models.opt import OPT, OPTConfig

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "weights" / "smollm2-135m-instruct"
HANG_GUARD_S = 900  # a rank that never returns (a deadlocked collective) fails the test instead of hanging it


def torchrun(n: int, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def tiny_llama(n_heads, n_kv_heads, seed=0, head_dim=16):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, n_layers=3, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, head_dim=head_dim, max_seq_len=64)
    m = Llama(cfg).eval()
    with torch.no_grad():  # sharper attention than the default init, so heads differ and clusters matter
        for attn in m.attention_layers:
            attn.wq.weight.mul_(4)
            attn.wk.weight.mul_(4)
    return m


def tiny_opt(seed=0, hidden_size=64):
    torch.manual_seed(seed)
    m = OPT(OPTConfig(vocab_size=64, hidden_size=hidden_size, ffn_dim=96, n_layers=3, n_heads=4, max_seq_len=64))
    m.eval()
    with torch.no_grad():  # every bias non-zero, so a bias added twice (or by one rank only) shows
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return m


@torch.no_grad()
def reference(path, chai, tokens, prefill):
    """One process: uncached logits, and the cached prefill + one-token decode logits."""
    model = load(path, chai=chai, backend="torch")
    B, S = tokens.shape
    full = model(tokens)
    model.setup_caches(B, S)
    steps = [model(tokens[:, :prefill], torch.arange(prefill))[:, -1]]
    for p in range(prefill, S):
        steps.append(model(tokens[:, p:p + 1], torch.tensor([p]))[:, -1])
    return full, torch.stack(steps, 1)


def run_cases(tmp_path, n, cases, **options):
    """cases: name -> (checkpoint, ChaiConfig or None, tokens, prefill[, options]); runs them all in one launch of n
    ranks and returns name -> [rank results]. options: device, backend, compile (tests/tp_worker.py)."""
    spec = [{"path": str(p), "chai": None if c is None else c.to_json(), "tokens": t.tolist(), "prefill": pf,
             "out": str(tmp_path / name), **options, **(rest[0] if rest else {})}
            for name, (p, c, t, pf, *rest) in cases.items()]
    job = tmp_path / "job.json"
    job.write_text(json.dumps(spec))
    torchrun(n, ROOT / "tests" / "tp_worker.py", job)
    return {name: [torch.load(tmp_path / f"{name}.{r}.pt") for r in range(n)] for name in cases}


def check_equal(ranks, ref_full, ref_cached, tol=1e-5):
    for r in ranks:  # replicated output projection: every rank has the same logits, bit for bit
        assert torch.equal(r["full"], ranks[0]["full"]) and torch.equal(r["cached"], ranks[0]["cached"])
    assert rel_err(ranks[0]["full"], ref_full) < tol
    assert rel_err(ranks[0]["cached"], ref_cached) < tol


def test_tiny_models_tp2_equal_one_process(tmp_path):
    """LLaMA MHA, GQA with KV heads split (8 heads, 2 KV heads), GQA with the KV head replicated (1 KV head), OPT with
    biases; dense and CHAI; uncached scoring and cached prefill + decode; each rank reads only its slices."""
    models = {"mha": tiny_llama(4, 4), "gqa": tiny_llama(8, 2, seed=1), "mqa": tiny_llama(4, 1, seed=2),
              "opt": tiny_opt(seed=3)}
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    cases, refs = {}, {}
    for name, m in models.items():
        path = tmp_path / name
        save_model(m, path)
        H = m.config.n_heads
        chai_cfg = ChaiConfig(clusters=[H, 2, H // 2 + 1], window=4, groups=2)  # 4 heads: [4, 2, 3]; 8: [8, 2, 5]
        for variant, c in (("dense", None), ("chai", chai_cfg)):
            cases[f"{name}_{variant}"] = (path, c, tokens, 3)  # a 3-token prefill: the window completes in decode
            refs[f"{name}_{variant}"] = reference(path, c, tokens, 3)
    cases["mha_chai_prefill"] = (tmp_path / "mha", cases["mha_chai"][1], tokens, 7)  # the window inside the prefill
    refs["mha_chai_prefill"] = reference(tmp_path / "mha", cases["mha_chai"][1], tokens, 7)
    # the triton backend's fused blocks (kernels interpreted on the CPU): the all-reduce before the residual add
    for name in ("gqa_chai", "opt_dense"):
        cases[f"{name}_triton"] = (*cases[name], {"backend": "triton"})
        refs[f"{name}_triton"] = refs[name]
    results = run_cases(tmp_path, 2, cases)
    for name, ranks in results.items():
        check_equal(ranks, *refs[name])
        assert ranks[0]["n_heads"] == [models[name.split("_")[0]].config.n_heads // 2] * 3
    # CHAI: [H, 2, H/2 + 1] clusters in 2 groups: each rank clusters its heads into its share (1, then 2 or 3 / 2)
    assert [r["n_clusters"] for r in results["mha_chai"]] == [[None, 1, 2], [None, 1, 1]]
    assert [r["n_clusters"] for r in results["gqa_chai"]] == [[None, 1, 3], [None, 1, 2]]
    # loading: the bytes the process read from files (the kernel's count) are this rank's tensors, no more
    for name in ("mha_dense", "gqa_dense", "opt_dense"):
        for r in results[name]:
            assert r["bytes_read"] == r["local_bytes"]
            assert r["local_bytes"] <= r["rchar"] < r["local_bytes"] + 64 * 1024, r
            full = sum(t.numel() * t.element_size() for t in models[name.split("_")[0]].state_dict().values())
            assert r["local_bytes"] < 0.75 * full  # the embeddings are replicated, the blocks split


def test_chai_groups_validation():
    with pytest.raises(ValueError, match="divides n_heads"):
        ChaiConfig(clusters=[9, 3], groups=2).validate(2, 9)
    with pytest.raises(ValueError, match="counts >= 3"):
        ChaiConfig(clusters=[9, 2], groups=3).validate(2, 9)
    with pytest.raises(ValueError, match="static"):
        ChaiConfig(clusters=[4, 2], groups=2, static_membership=[None, [0, 0, 1, 1]]).validate(2, 4)
    assert ChaiConfig(clusters=[9, 7], groups=3).group_counts(1, 9) == [3, 2, 2]


def test_head_ranges_and_refusals():
    assert parallel.head_ranges(8, 2, 1, 2) == ((4, 4), (1, 1))  # KV heads split
    assert parallel.head_ranges(8, 2, 3, 4) == ((6, 2), (1, 1))  # KV heads split, one each
    assert parallel.head_ranges(8, 1, 1, 2) == ((4, 4), (0, 1))  # one KV head, replicated
    assert parallel.head_ranges(16, 2, 3, 4) == ((12, 4), (1, 1))  # 2 KV heads over 4 ranks: each holds its one
    with pytest.raises(ValueError, match="divisible by 2"):
        parallel.head_ranges(9, 3, 0, 2)
    with pytest.raises(ValueError, match="KV heads"):
        parallel.head_ranges(12, 4, 0, 6)
    assert [parallel.split(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]


def test_groups_reproduce_per_rank_clustering():
    """One process with groups = g clusters each contiguous block of H/g heads alone: the same membership as
    clustering each block as its own layer."""
    from chai_models.chai import cluster_groups, cluster_heads

    feats = torch.rand(3, 9, 25, generator=torch.Generator().manual_seed(0)) ** 3
    rep, h2c = cluster_groups(feats, [2, 1, 3])
    parts = [cluster_heads(feats[:, 3 * g:3 * g + 3], k) for g, k in enumerate([2, 1, 3])]
    assert torch.equal(rep, torch.cat([parts[0][0], parts[1][0] + 3, parts[2][0] + 6], 1))
    assert torch.equal(h2c, torch.cat([parts[0][1], parts[1][1] + 2, parts[2][1] + 3], 1))


@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").exists(), reason="needs weights/smollm2-135m-instruct")
def test_smollm2_tp3_equal_one_process_and_reads_a_third(tmp_path):
    """SmolLM2-135M (9 heads, 3 KV heads): tp = 3, dense and CHAI (3 clusters in the later layers, one per rank; and
    6), the same logits as one process with groups = 3; a rank reads its blocks' third and the tied embeddings."""
    tokens = torch.randint(0, 49152, (1, 14), generator=torch.Generator().manual_seed(0))
    chai_cfg = ChaiConfig.from_spec("10:3", 30, 9, groups=3)
    cases = {"dense": (SMOLLM2, None, tokens, 10), "chai": (SMOLLM2, chai_cfg, tokens, 10),
             "chai6": (SMOLLM2, dataclasses.replace(chai_cfg, clusters=[9] * 10 + [6] * 20), tokens, 3)}
    results = run_cases(tmp_path, 3, cases)
    for name, (path, c, t, pf) in cases.items():
        check_equal(results[name], *reference(path, c, t, pf))
    file_bytes = (SMOLLM2 / "model.safetensors").stat().st_size
    for r in results["dense"]:
        assert r["local_bytes"] <= r["rchar"] < r["local_bytes"] + 64 * 1024
        assert r["rchar"] < 0.5 * file_bytes  # 28.3M replicated embedding + a third of 106M block parameters


@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").exists(), reason="needs weights/smollm2-135m-instruct")
def test_cli_generate_under_torchrun_equals_one_process():
    """`torchrun --nproc-per-node 3 -m chai_models generate ...` prints (on rank 0 only) the greedy text of one
    process, dense and with CHAI (groups = 3 in the one process)."""
    from chai_models import generate, load_tokenizer, set_chai

    prompt, n = "What is the capital of France?", 12
    tok = load_tokenizer(SMOLLM2)
    model = load(SMOLLM2, backend="torch")
    for spec in (None, "10:3"):
        set_chai(model, None if spec is None else ChaiConfig.from_spec(spec, 30, 9, groups=3))
        want = generate(model, tok, [prompt], max_new_tokens=n, chat=True).texts[0]
        args = ["-m", "chai_models", "generate", prompt, "--model", SMOLLM2, "--device", "cpu", "--max-new-tokens", n]
        out = torchrun(3, *args, *(["--chai", spec] if spec else [])).stdout
        assert out.strip() == want.strip(), (out, want)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_compiled_decode_equals_one_process(tmp_path):
    """NCCL, backend auto (the Triton kernels and fused blocks), the compiled CUDA-graph decode step with its
    all-reduces inside the graph: fp32 logits equal one process's eager ones."""
    models = {"gqa": tiny_llama(8, 2, seed=1, head_dim=32), "opt": tiny_opt(seed=3, hidden_size=128)}  # D = 32
    tokens = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(0))
    cases, refs = {}, {}
    for name, m in models.items():
        save_model(m, tmp_path / name)
        for variant, c in (("dense", None), ("chai", ChaiConfig(clusters=[m.config.n_heads, 2, 4], groups=2))):
            cases[f"{name}_{variant}"] = (tmp_path / name, c, tokens, 8)
            refs[f"{name}_{variant}"] = reference(tmp_path / name, c, tokens, 8)
    results = run_cases(tmp_path, 2, cases, device="cuda", backend="auto", compile=True)
    for name, ranks in results.items():
        check_equal(ranks, *refs[name], tol=1e-4)


def test_bench_under_torchrun_prints_one_table_with_allreduce_share():
    """tools/bench.py under torchrun: rank 0 alone prints; each row has the all-reduce time and its share."""
    out = torchrun(2, ROOT / "tools" / "bench.py", "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                   "--chai", "dense", "2", "--steps", "2", "--context", "32").stdout.splitlines()
    assert sum(line.startswith("config") for line in out) == 1, out
    rows = {" ".join(line.split()[:2]): line.split() for line in out if " eager " in line}
    assert set(rows) == {"torch dense", "torch 2"}, out
    for row in rows.values():
        ar_ms, share = float(row[-2]), float(row[-1])
        assert ar_ms > 0 and 0 < share < 100 * 10  # timed apart, so noise can put it past the step


def test_tp_step_model_counts_bytes_and_allreduces():
    """bench --tp-model: per-rank weight bytes of LLaMA-2-7B at tp=2 by hand (blocks split, output replicated)."""
    from chai_models.bench import tp_step_model

    d, f, L, V = 4096, 11008, 32, 32000
    blocks = L * (4 * d * d + 3 * d * f) // 2 + L * 2 * d  # split projections, replicated norms
    weights = 2 * (blocks + V * d + d)  # bf16; the output projection and final norm whole on every rank
    kv = 2 * L * 16 * 512 * 128 * 2  # 16 KV heads per rank, T = 512
    text = tp_step_model("llama-2-7b", 2, 1, 512, torch.bfloat16, 4e12, 10e-6)
    assert f"weights read {weights / 1e9:.2f} GB" in text and f"KV read {kv / 1e9:.2f} GB" in text, text
    assert "all-reduces 64 of 8.2 kB" in text
    floor = (weights + kv) / 4e12 + 64 * 10e-6
    assert f"= {floor * 1e3:.2f} ms/step" in text, text


def test_evaluate_groups_methods():
    """evaluate --groups G: each CHAI method also runs with its heads clustered in G groups, at the same counts."""
    from chai_models.evaluate import EvaluationError, build_methods

    cfg = LlamaConfig(vocab_size=16, hidden_size=36, intermediate_size=16, n_layers=2, n_heads=9, n_kv_heads=3,
                      head_dim=4)
    model = Llama(cfg)
    methods = build_methods(model, None, ["9,5"], groups=[3], n_random=1)
    assert [(m.name, m.chai and m.chai.groups) for m in methods] == [
        ("dense", None), ("chai[9,5]", 1), ("chai[9,5]/g3", 3), ("random[chai[9,5]]", 1)]
    assert methods[2].chai.clusters == [9, 5]
    with pytest.raises(EvaluationError, match="counts >= 3"):
        build_methods(model, None, ["9,2"], groups=[3])
