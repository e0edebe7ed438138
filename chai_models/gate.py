"""Processes that load side by side and time one at a time.

A benchmark grid spends most of its minutes starting processes and loading compiled steps (15-30 s per process for
a 7B step from the compile caches) and a few seconds per cell timing. `run_in_turns` starts a group of processes
that fit in the device's memory together and lets them load at once; a process calls `wait_turn()` when it is ready
to time, and that call returns only once every process of its group is ready (or gone) and the ones before it have
ended. While a process times, the others of its group only wait and no later group has started, so each timing is a
lone process's.

`python -m chai_models.gate SCRIPT [ARG...]` runs another project's timer script (a peer, such as gpt-fast's) under
the same rule without changing it: each function it compiles with torch.compile waits for its turn before its second
call (the first call compiles the step or loads it from the compile caches).

`python -m chai_models.gate --turns 'DIR SCRIPT ARG...' ...` runs several such scripts in turns, each from its own
source tree DIR: two builds of this project timed in one device call, each step in a process of its own.

    python -m chai_models.gate --turns --need-gb 30 '. tools/bench.py --batch 8 --processes one' \
        '../old tools/bench.py --batch 8 --processes one'
"""
from __future__ import annotations

import argparse
import functools
import os
import runpy
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV = "CHAI_MODELS_GATE"  # set by run_in_turns: the path prefix of this process's .ready and .go files


def wait_turn() -> None:
    """Says this process is ready to time and blocks until its turn; returns at once in a process that
    run_in_turns did not start, and on later calls (a process keeps its turn until it ends)."""
    gate = os.environ.pop(ENV, None)
    if not gate:
        return
    parent = os.getppid()
    Path(gate + ".ready").touch()
    while not os.path.exists(gate + ".go"):
        if os.getppid() != parent:
            sys.exit("the process that ran this one in turns has ended; nothing is timed")
        time.sleep(0.05)


@dataclass
class Job:
    cmd: list[str]
    need: int  # device bytes the process holds while it waits for its turn
    env: dict = field(default_factory=lambda: dict(os.environ))


def tree_env(tree: str) -> dict:
    """This process's environment with the source tree `tree` first on PYTHONPATH, so that a child imports that
    tree's chai_models."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")]))}


def groups(jobs: list[Job], budget: int, max_jobs: int) -> list[list[Job]]:
    """Consecutive jobs, in order, grouped while they fit: at most max_jobs, and needs within budget (a job that
    needs more than the budget runs alone)."""
    out: list[list[Job]] = []
    for job in jobs:
        last = out[-1] if out else None
        if last and len(last) < max_jobs and sum(j.need for j in last) + job.need <= budget:
            last.append(job)
        else:
            out.append([job])
    return out


def run_in_turns(jobs: list[Job], budget: int, max_jobs: int, on_done) -> None:
    """Runs the jobs group by group (`groups`): a group's processes start together and load; once all of them are
    ready (called wait_turn) or have ended, each in order gets its turn and runs to its end. on_done(job, returncode,
    stdout) follows each job's end, in order. Standard error passes through."""
    with tempfile.TemporaryDirectory(prefix="chai-gate-") as tmp:
        n = 0
        for group in groups(jobs, budget, max_jobs):
            running = []
            for job in group:
                gate = os.path.join(tmp, str(n))
                n += 1
                out = tempfile.TemporaryFile("w+")  # a file, not a pipe: a waiting process never blocks on output
                proc = subprocess.Popen(job.cmd, stdout=out, text=True, env={**job.env, ENV: gate})
                running.append((job, gate, proc, out))
            try:
                while not all(p.poll() is not None or os.path.exists(g + ".ready") for _, g, p, _ in running):
                    time.sleep(0.05)
                for job, gate, proc, out in running:
                    if proc.poll() is None:
                        Path(gate + ".go").touch()
                    proc.wait()
                    out.seek(0)
                    on_done(job, proc.returncode, out.read())
                    out.close()
            finally:
                for _, _, proc, _ in running:
                    if proc.poll() is None:
                        proc.kill()


def _gated_compile(compile_fn):
    @functools.wraps(compile_fn)
    def gated(model=None, **kwargs):
        if model is None:  # @torch.compile(...) as a decorator factory
            return lambda fn: gated(fn, **kwargs)
        compiled = compile_fn(model, **kwargs)
        calls = 0

        def call(*args, **kw):
            nonlocal calls
            calls += 1
            if calls == 2:
                wait_turn()
            return compiled(*args, **kw)

        return call

    return gated


def run_peer(argv: list[str]) -> None:
    """Runs the timer script argv[0] with arguments argv[1:] as its __main__, its torch.compile gated."""
    if not argv:
        sys.exit("usage: python -m chai_models.gate SCRIPT [ARG...]")
    if not os.path.isfile(argv[0]):
        sys.exit(f"no peer timer script at {argv[0]}")
    import torch

    torch.compile = _gated_compile(torch.compile)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


def run_trees(argv: list[str]) -> int:
    """--turns: each job 'DIR SCRIPT ARG...' runs as `python -m chai_models.gate SCRIPT ARG...` from DIR (and
    DIR's chai_models), in turns; prints '=== DIR SCRIPT ARG...  exit status N' and the job's output as each ends.
    Exit status: the number of jobs that failed."""
    p = argparse.ArgumentParser(prog="python -m chai_models.gate --turns", description=run_trees.__doc__)
    p.add_argument("jobs", nargs="+", metavar="'DIR SCRIPT ARG...'")
    p.add_argument("--load-jobs", type=int, default=6, metavar="N", help="processes that load at once (default 6)")
    p.add_argument("--need-gb", type=float, default=30, help="device memory one job holds, GiB (default 30)")
    p.add_argument("--budget-gb", type=float, default=0, help="memory the jobs of a group share, GiB (default: 90%% "
                                                               "of the device's free memory, or half the RAM)")
    a = p.parse_args(argv)
    jobs, names = [], {}
    for spec in a.jobs:
        words = shlex.split(spec)
        if len(words) < 2 or not os.path.isdir(words[0]) or not os.path.isfile(os.path.join(*words[:2])):
            p.error(f"{spec!r}: each job is 'DIR SCRIPT ARG...', SCRIPT a file inside the folder DIR")
        tree = os.path.abspath(words[0])
        job = Job(["bash", "-c", f"cd {shlex.quote(tree)} && exec {shlex.quote(sys.executable)} -m chai_models.gate "
                                 f"{shlex.join(words[1:])}"], int(a.need_gb * 2**30), tree_env(tree))
        jobs.append(job)
        names[id(job)] = spec
    failed = 0

    def done(job, returncode, out):
        nonlocal failed
        failed += returncode != 0
        print(f"=== {names[id(job)]}  exit status {returncode}\n{out}", end="" if out.endswith("\n") else "\n",
              flush=True)

    run_in_turns(jobs, int(a.budget_gb * 2**30) or memory_budget(), a.load_jobs, done)
    return failed


def memory_budget(device=None) -> int:
    """Bytes that the processes of a group may hold together: 90% of a CUDA device's free memory (the first one by
    default, if any), or half the RAM."""
    import torch

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--turns"]:
        sys.exit(run_trees(sys.argv[2:]))
    run_peer(sys.argv[1:])
