"""chai_models.gate: processes that load side by side and time one at a time. The assertions are on the order of
events in a shared log, which the protocol fixes whatever the machine's speed."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from chai_models import gate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _job(log: Path, name: str, need: int = 1, fail: bool = False) -> gate.Job:
    """A process that logs its load, its turn's start and its end; fail: it dies before it is ready."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from chai_models.gate import wait_turn
        def log(what):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{what}} {name}\\n")
        log("load")
        time.sleep(0.05)
        if {fail}:
            sys.exit(3)
        wait_turn()
        log("start")
        time.sleep(0.1)
        log("end")
        print("timed {name}")
    """)
    return gate.Job([sys.executable, "-c", code], need, ENV)


def test_groups_keep_order_and_fit_budget_and_count():
    jobs = [gate.Job(["x"], n) for n in (3, 3, 3, 9, 1, 1, 1)]
    sizes = [[j.need for j in g] for g in gate.groups(jobs, budget=7, max_jobs=2)]
    assert sizes == [[3, 3], [3], [9], [1, 1], [1]]  # the 9 is over the budget: it runs alone


def test_run_in_turns_loads_a_group_together_then_times_one_at_a_time(tmp_path):
    log = tmp_path / "log"
    jobs = [_job(log, n) for n in "abc"] + [_job(log, "x", fail=True)] + [_job(log, n) for n in "de"]
    done = []
    gate.run_in_turns(jobs, budget=10, max_jobs=3, on_done=lambda job, rc, out: done.append((rc, out.strip())))
    assert done == [(0, "timed a"), (0, "timed b"), (0, "timed c"), (3, ""), (0, "timed d"), (0, "timed e")]
    events = log.read_text().split("\n")[:-1]
    groups = ["abc", "xde"]
    for i, group in enumerate(groups):
        loads = [events.index(f"load {n}") for n in group]
        starts = [events.index(f"start {n}") for n in group if n != "x"]
        assert max(loads) < min(starts), events  # every process of the group loaded before any timed
        for n in group.replace("x", ""):  # one at a time: nothing between a turn's start and its end
            assert events[events.index(f"start {n}") + 1] == f"end {n}", events
        if i:  # the next group starts only after the last turn of the one before has ended
            assert events.index(f"end {groups[i - 1][-1]}") < min(loads), events


def test_wait_turn_returns_at_once_outside_a_pool(monkeypatch):
    monkeypatch.delenv(gate.ENV, raising=False)
    gate.wait_turn()


def test_a_peer_script_waits_for_its_turn_before_its_second_compiled_call(tmp_path):
    """python -m chai_models.gate SCRIPT: the peer's torch.compile'd function loads (first call) beside the others
    and runs its later calls in its turn alone."""
    log = tmp_path / "log"
    peer = tmp_path / "peer.py"
    peer.write_text(textwrap.dedent(f"""
        import sys, torch
        step = torch.compile(lambda x: x + 1, backend="eager")
        for i in range(1, 4):
            step(torch.ones(2))
            with open({str(log)!r}, "a") as f:
                f.write(f"{{sys.argv[1]}} {{i}}\\n")
        print("peer", sys.argv[1])
    """))
    jobs = [gate.Job([sys.executable, "-m", "chai_models.gate", str(peer), n], 1, ENV) for n in "ab"]
    done = []
    gate.run_in_turns(jobs, budget=10, max_jobs=2, on_done=lambda job, rc, out: done.append((rc, out.strip())))
    assert done == [(0, "peer a"), (0, "peer b")]
    events = log.read_text().split("\n")[:-1]
    assert set(events[:2]) == {"a 1", "b 1"}, events  # both loaded first
    assert events[2:] == ["a 2", "a 3", "b 2", "b 3"], events  # then a's turn, then b's
    missing = subprocess.run([sys.executable, "-m", "chai_models.gate", str(tmp_path / "nope.py")],
                             capture_output=True, text=True, env=ENV)
    assert missing.returncode != 0 and "no peer timer script" in missing.stderr


def test_turns_runs_each_job_from_its_own_tree(tmp_path):
    """--turns: each 'DIR SCRIPT ARG...' runs from its own folder with that folder's chai_models first on the path (two
    builds timed in one call); each job's output follows a header with its exit status; a failed job counts in the
    exit status; a job that is no 'DIR SCRIPT' is refused."""
    trees = []
    for name in ("new", "old"):
        tree = tmp_path / name
        (tree / "chai_models").mkdir(parents=True)
        (tree / "chai_models" / "__init__.py").write_text(f"BUILD = {name!r}\n")
        (tree / "chai_models" / "gate.py").write_text((ROOT / "chai_models" / "gate.py").read_text())
        (tree / "timer.py").write_text(textwrap.dedent("""
            import os, sys
            import chai_models
            from chai_models.gate import wait_turn
            wait_turn()
            print("build", chai_models.BUILD, "in", os.path.basename(os.getcwd()), *sys.argv[1:])
            sys.exit(int(sys.argv[1]))
        """))
        trees.append(tree)
    run = subprocess.run([sys.executable, "-m", "chai_models.gate", "--turns", "--need-gb", "0.001",
                          f"{trees[0]} timer.py 0", f"{trees[1]} timer.py 4"], capture_output=True, text=True,
                         env=ENV, cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-2000:]  # one job failed
    assert run.stdout.splitlines() == [f"=== {trees[0]} timer.py 0  exit status 0", "build new in new 0",
                                       f"=== {trees[1]} timer.py 4  exit status 4", "build old in old 4"], run.stdout
    bad = subprocess.run([sys.executable, "-m", "chai_models.gate", "--turns", f"{trees[0]} none.py"],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert bad.returncode == 2 and "'DIR SCRIPT ARG...'" in bad.stderr, bad.stderr
