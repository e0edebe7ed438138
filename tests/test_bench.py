"""tools/bench.py on CPU (tiny shape): the table's rows, in one process and one process per configuration.
Timings are not asserted (benchmarks print tables; they do not pass or fail)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--chai", "2", "dense", "--steps", "2",
        "--context", "64", "--ttft", "16"]


@pytest.mark.parametrize("processes,backends", [("one", ["torch"]), ("per-config", ["torch", "triton"])])
def test_bench_table(processes, backends):
    # triton on the CPU runs the kernels interpreted (conftest sets TRITON_INTERPRET=1 without a GPU)
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), *ARGS, "--processes", processes,
                          "--backend", *backends],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert sum(line.startswith("config") for line in lines) == 1  # one table header
    rows = {" ".join(line.split()[:2]): line.split() for line in lines if "eager" in line}
    assert set(rows) == {f"{b} {c}" for b in backends for c in ("dense", "2")}, lines
    for backend in backends:
        # CHAI's row: its speed over dense (same backend) and the ideal (byte-count) speedup, both as ratios
        chai_row = rows[f"{backend} 2"]
        assert chai_row[-2].endswith("x") and chai_row[-1].endswith("x"), chai_row
        # dense runs first whatever the order given, so the ratio has its reference
        assert lines.index(next(x for x in lines if x.startswith(f"{backend} dense "))) < lines.index(
            next(x for x in lines if x.startswith(f"{backend} 2 ")))
    assert sum("time to first token at 16" in line for line in lines) == 2 * len(backends)


def test_bench_process_per_cell_in_turns_with_a_peer(tmp_path):
    """--processes per-cell: each (configuration, B, T) in a process of its own, still one table; with --load-jobs the
    processes load two at a time and time in turns, CHAI's rows still getting their ratios from dense's processes;
    a --peer script runs for each cell and its lines print; a cell that --max-kv-gb leaves out is not started, and
    says so."""
    import torch
    from chai_models.bench import dense_kv_bytes
    limit = (dense_kv_bytes("tiny", 2, 32, torch.float32) + 1) / 1e9  # B=2 T=64 is over it, the rest fit
    peer = tmp_path / "peer.py"
    peer.write_text("import sys\nprint('peer timer', *sys.argv[1:])\n")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--shape", "tiny", "--device", "cpu",
                          "--dtype", "float32", "--chai", "2", "dense", "--steps", "2", "--batch", "1", "2",
                          "--context", "32", "64", "--backend", "torch", "--processes", "per-cell", "--max-kv-gb",
                          repr(limit), "--load-jobs", "2", "--peer", f"{peer} B={{B}} T={{T}}"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert sum(line.startswith("config") for line in lines) == 1, lines
    rows = {tuple(line.split()[1:4]): line.split() for line in lines if line.startswith("torch ")}
    cells = [("1", "32"), ("1", "64"), ("2", "32")]
    assert set(rows) == {(spec, *c) for spec in ("dense", "2") for c in cells + [("2", "64")]}, lines
    for spec in ("dense", "2"):
        assert "left out: dense KV cache" in " ".join(rows[(spec, "2", "64")])
        assert all(rows[(spec, *c)][4] == "eager" for c in cells)
    assert all(rows[("2", *c)][-1].endswith("x") and rows[("2", *c)][-2].endswith("x") for c in cells)
    assert sorted(line for line in lines if line.startswith("peer")) == [f"peer timer B={B} T={T}" for B, T in cells]
    for bad_args, words in ((["--processes", "per-cell", "--ttft", "16"], ["--ttft", "per-cell"]),
                            (["--load-jobs", "2"], ["--load-jobs", "per-cell"]),
                            (["--processes", "per-cell", "--peer", str(tmp_path / "none.py")], ["--peer"])):
        bad = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--shape", "tiny", "--device", "cpu",
                              *bad_args], capture_output=True, text=True)
        assert bad.returncode == 2 and all(w in bad.stderr for w in words), bad.stderr


def test_bench_warm_up_compiles_first_then_times_from_the_compile_cache(tmp_path):
    """--warm-jobs: every (configuration, cell) step compiles in a process of its own before anything is timed, and
    the timed process then loads its graph from the compile cache on disk (a fresh cache here, so the hit is the
    warm-up's)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--shape", "tiny", "--device", "cpu",
                          "--dtype", "float32", "--chai", "dense", "--steps", "2", "--context", "64", "--mode",
                          "compiled", "--backend", "torch", "--processes", "per-config", "--warm-jobs", "2"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert any(line.startswith("# warm-up: 1 compiled steps") for line in lines), lines
    row = next(line for line in lines if line.startswith("torch dense"))
    assert ", from the compile cache; " in row and row.endswith(" s into its process)"), row


def test_bench_warm_only_compiles_and_times_nothing(tmp_path):
    """--warm-only: the warm-up alone (one call compiles, a later one times); the next run loads from the cache."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    args = [sys.executable, str(ROOT / "tools" / "bench.py"), "--shape", "tiny", "--device", "cpu", "--dtype",
            "float32", "--chai", "dense", "--steps", "2", "--context", "64", "--mode", "compiled", "--backend", "torch",
            "--processes", "per-config"]
    warm = subprocess.run([*args, "--warm-jobs", "1", "--warm-only"], capture_output=True, text=True, env=env)
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert warm.stdout.startswith("# warm-up: 1 compiled steps") and "torch dense" not in warm.stdout, warm.stdout
    timed = subprocess.run(args, capture_output=True, text=True, env=env)
    assert timed.returncode == 0, timed.stderr[-2000:]
    row = next(line for line in timed.stdout.splitlines() if line.startswith("torch dense"))
    assert ", from the compile cache; " in row and row.endswith(" s into its process)"), row


@pytest.mark.parametrize("args,words", [(["--processes", "one", "--warm-jobs", "2"], ["--warm-jobs", "per-config"]),
                                        (["--processes", "per-config", "--warm-only"], ["--warm-only", "--warm-jobs"])])
def test_bench_warm_up_flags_need_their_setting(args, words):
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--shape", "tiny", "--device", "cpu",
                          *args], capture_output=True, text=True)
    assert run.returncode == 2 and all(w in run.stderr for w in words), run.stderr


def test_bench_max_kv_gb_leaves_out_the_big_cells(tmp_path):
    """--max-kv-gb: a cell whose dense KV cache is over the limit is left out, dense and CHAI alike, and the warm-up
    does not compile it."""
    import torch
    from chai_models.bench import dense_kv_bytes
    limit = (dense_kv_bytes("tiny", 1, 64, torch.float32) + 1) / 1e9  # T=64 fits, T=128 does not
    base = [sys.executable, str(ROOT / "tools" / "bench.py"), "--shape", "tiny", "--device", "cpu", "--dtype",
            "float32", "--steps", "2", "--context", "64", "128", "--max-kv-gb", repr(limit)]
    run = subprocess.run([*base, "--chai", "dense", "2", "--processes", "one"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {(line.split()[1], line.split()[3]): line for line in run.stdout.splitlines()
            if line.startswith("torch ")}
    for spec in ("dense", "2"):
        assert "eager" in rows[(spec, "64")] and "left out: dense KV cache" in rows[(spec, "128")], rows
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    warm = subprocess.run([*base, "--chai", "dense", "--mode", "compiled", "--backend", "torch", "--processes",
                           "per-config", "--warm-jobs", "1", "--warm-only"], capture_output=True, text=True, env=env)
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert warm.stdout.startswith("# warm-up: 1 compiled steps"), warm.stdout


def test_bench_projections_table():
    """tools/bench_projections.py on CPU (the kernels interpreted): a row per projection group and a layer total, each
    with the torch path beside the kernel (which it checks first); --sweep lists the three fastest launch configs;
    rows past the kernels' reach and unknown groups are refused."""
    base = [sys.executable, str(ROOT / "tools" / "bench_projections.py"), "--shape", "tiny", "--device", "cpu"]
    run = subprocess.run([*base, "--dtype", "float32", "--rows", "2", "--copies", "1"], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines() if not line.startswith(("#", "projection"))]
    assert [r[0] for r in rows] == ["q/k/v", "wo", "gate/up", "down", "head", "layer"], run.stdout
    ratios = [r[-1] if r[0] != "layer" else r[4] for r in rows]  # torch / kernel
    assert all(r[1] == "2" for r in rows) and all(float(x[:-1]) >= 0 and x.endswith("x") for x in ratios), run.stdout
    sweep = subprocess.run([*base, "--dtype", "float32", "--rows", "2", "--copies", "1", "--only", "wo", "--sweep"],
                           capture_output=True, text=True)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    found = [line.split() for line in sweep.stdout.splitlines() if line.startswith("  sweep")]
    assert len(found) == 3 and all("BLOCK_N=" in " ".join(r) for r in found), sweep.stdout  # the three fastest
    assert [float(r[2]) for r in found] == sorted(float(r[2]) for r in found)
    for args, words in ((["--rows", "33"], "1..32 rows"), (["--only", "wq"], "its groups: q/k/v, wo")):
        bad = subprocess.run([*base, *args], capture_output=True, text=True)
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr


def test_bench_attention_table(monkeypatch):
    """tools/bench_attention.py on CPU (the kernels interpreted): a row per (layer, B, T) with the step's other path
    beside the decode kernel (which it checks first: a wrong kernel fails the timing); --sweep lists the three
    fastest launch configs; bad cluster counts and contexts are refused."""
    from chai_models.fast import attention as fast_attention

    base = [sys.executable, str(ROOT / "tools" / "bench_attention.py"), "--shape", "tiny", "--device", "cpu",
            "--dtype", "float32", "--copies", "1"]
    run = subprocess.run([*base, "--clusters", "0", "3", "--batch", "2", "--context", "64", "520"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines() if not line.startswith(("#", "layer"))]
    assert [r[:3] for r in rows] == [["dense", "2", "64"], ["dense", "2", "520"], ["k=3", "2", "64"],
                                     ["k=3", "2", "520"]], run.stdout
    # the step's path: the decode kernel up to B x T of the layer's limit, then the other
    limits = {"dense": fast_attention.DENSE_DECODE_MAX_POSITIONS, "k=3": fast_attention.CLUSTERED_DECODE_MAX_POSITIONS}
    assert [r[8] for r in rows] == ["kernel" if int(r[1]) * int(r[2]) <= limits[r[0]] else "other" for r in rows]
    assert all(r[7].endswith("x") and "split=" in " ".join(r[9:]) for r in rows), run.stdout
    sweep = subprocess.run([*base, "--clusters", "0", "--batch", "1", "--context", "64", "--sweep"],
                           capture_output=True, text=True)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    found = [line.split() for line in sweep.stdout.splitlines() if line.startswith("  sweep")]
    assert len(found) == 3 and all("block_t=" in " ".join(r) for r in found), sweep.stdout
    assert [float(r[3]) for r in found] == sorted(float(r[3]) for r in found)
    for args, words in ((["--clusters", "8"], "1..7 clusters"), (["--context", "40"], "use more")):
        bad = subprocess.run([*base, *args], capture_output=True, text=True)
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr

    import torch

    from chai_models import bench_attention

    monkeypatch.setattr(bench_attention, "decode_launch", lambda q, *a, **kw: torch.zeros(q.shape[0], 8, q.shape[2]))
    with pytest.raises(RuntimeError, match="differs from the other path"):
        bench_attention.time_attention(bench_attention.layer_shape("tiny"), 0, 1, 64, "kernel", 1, torch.float32,
                                       torch.device("cpu"))
