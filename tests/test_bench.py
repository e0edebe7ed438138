"""tools/bench.py on CPU (tiny shape): the table's rows, in one process and one process per configuration.
Timings are not asserted (benchmarks print tables; they do not pass or fail)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--chai", "2", "dense", "--steps", "2",
        "--context", "64", "--ttft", "16"]


@pytest.mark.parametrize("processes", ["one", "per-config"])
def test_bench_table(processes):
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), *ARGS, "--processes", processes],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert sum(line.startswith("config") for line in lines) == 1  # one table header
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["dense"], ["2"])
            and "eager" in line}
    assert set(rows) == {"dense", "2"}
    # CHAI's row: its speed over dense and the ideal (byte-count) speedup, both as ratios
    assert rows["2"][-2].endswith("x") and rows["2"][-1].endswith("x"), rows["2"]
    if processes == "per-config":  # dense runs first whatever the order given, so the ratio has its reference
        assert lines.index(next(x for x in lines if x.startswith("dense "))) < lines.index(
            next(x for x in lines if x.startswith("2 ")))
    assert sum("time to first token at 16" in line for line in lines) == 2
