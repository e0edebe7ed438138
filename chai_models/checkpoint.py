"""Our checkpoint format: config.json + safetensors (sharded past a size limit) + tokenizer files.

Writing streams tensor by tensor into shards, inside a temporary folder that is renamed at the end, so
a failed conversion leaves nothing behind and an existing checkpoint is only replaced with force=True.
Loading builds the model on the meta device and assigns mmap-ed tensors, so weights are never held twice.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from .errors import UserError

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or contradicts its config. The message says how to fix it."""


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise UserError(f"unsupported dtype {name}; use one of {sorted(DTYPES)}")
        return name
    key = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(name, name)
    if key not in DTYPES:
        raise UserError(f"unsupported dtype {name!r}; use one of {sorted(DTYPES)} (or fp32/fp16/bf16)")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# ----------------------------------------------------------------------------------------------------
# config.json


def read_config(path: str | os.PathLike) -> dict:
    """Reads a converted checkpoint's config.json (path: the folder)."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist; convert a model into it first with "
            f"`python tools/convert_weights.py SRC {folder}`"
        )
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder; convert it with "
                              f"`python tools/convert_weights.py {folder} weights/NAME`")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.exists():
        raise CheckpointError(
            f"{folder} has no {CONFIG_NAME}: it is not a converted chai_models checkpoint; convert the "
            f"source with `python tools/convert_weights.py SRC DST` and load DST"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-run the conversion with --force") from e
    if not isinstance(cfg, dict) or "family" not in cfg:
        raise CheckpointError(f"{cfg_path} has no 'family' field; it was not written by chai_models' converter")
    return cfg


def config_from_dict(cls, d: dict, where: str = "config.json"):
    """Builds a config dataclass from a dict; unknown or missing fields, values of the wrong type and values the
    config rejects (a size < 1, n_heads not a multiple of n_kv_heads, ...) are CheckpointErrors naming the file
    and the field, not guesses or tracebacks."""
    import dataclasses
    import typing

    fields = {f.name: f for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if k not in ("family", "format_version", "torch_dtype")}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CheckpointError(f"{where}: missing required field(s) {missing} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fix = "; correct it in the file, or re-convert the source with --force"
    for name, value in d.items():
        if not _has_type(value, hints[name]):
            raise CheckpointError(f"{where}: {name} = {json.dumps(value)} is {_json_kind(value)}; it must be "
                                  f"{_type_words(hints[name])}{fix}")
    try:
        return cls(**d)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}{fix}") from e


def _has_type(value, hint) -> bool:
    """Whether a JSON value fits a config field's annotation (int, float, bool, str, dict, list[X], X | None)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:  # JSON writes 10000.0 as 10000
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:  # a single item stands for a list of one (eos_token_ids: 2)
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value) or _has_type(value, args[0])
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_words(hint) -> str:
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(a) for a in args)
    if origin is list:
        return "a list of " + _type_words(args[0]).removeprefix("an ").removeprefix("a ") + "s"
    words = {type(None): "null", int: "an integer", float: "a number", bool: "true or false", str: "a string",
             dict: "an object"}
    return words.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _json_kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------------------------------
# writing


# A conversion's temporary folder is named .NAME.tmp-PID@HOST-RANDOM (and a replaced checkpoint is moved aside to
# .NAME.old-PID@HOST for a moment; HOST: a hash of the machine's name); a process killed with SIGKILL or SIGTERM
# leaves it behind. The next conversion into the same parent removes those whose process on this machine is gone,
# and those it cannot check (another machine's, a name without a pid) once nothing has touched them for
# STALE_AFTER_S.
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)@(?P<host>[0-9a-f]{8})(?:-\w+)?|\w+)")
STALE_AFTER_S = 6 * 3600


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _owner() -> str:
    return f"{os.getpid()}@{_host_tag()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_leftovers(parent: str | os.PathLike, log=None) -> list[Path]:
    """Removes the temporary folders that killed conversions left in parent (see _LEFTOVER); returns them.
    log(line) is told each one and why (default: printed to stderr)."""
    import time

    log = log or (lambda line: print(line, file=sys.stderr))
    removed = []
    for path in sorted(Path(parent).iterdir()) if Path(parent).is_dir() else []:
        m = _LEFTOVER.fullmatch(path.name)
        if m is None or not path.is_dir():
            continue
        pid = int(m["pid"]) if m["pid"] and m["host"] == _host_tag() else None
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:  # its own process finished with it just now
            continue
        if pid is not None and pid != os.getpid() and not _process_alive(pid):
            why = f"its conversion, process {pid}, is gone"
        elif age > STALE_AFTER_S:
            why = f"untouched for {age / 3600:.1f} hours"
        else:
            continue  # a conversion still running, perhaps in another process
        shutil.rmtree(path, ignore_errors=True)
        log(f"removed {path}, the temporary folder of an interrupted conversion ({why})")
        removed.append(path)
    return removed


def _follow_umask(folder: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors writes 0600 files; outputs get the modes the umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside dst; on success it replaces dst, on failure it is removed.

    Leftovers of killed conversions in dst's parent are removed first (remove_stale_leftovers); the output's
    folder and files get the modes that the umask gives."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to overwrite it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(dst.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{_owner()}-", dir=dst.parent))
    try:
        yield tmp
        _follow_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():  # force: move the old one aside first so that a crash never leaves neither
        old = dst.parent / f".{dst.name}.old-{_owner()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


class ShardedWriter:
    """Streams named tensors into safetensors shards of at most max_shard_bytes each.

    Peak memory is about one shard. With one shard the file is model.safetensors; with more, the shards are
    model-0000N-of-0000M.safetensors plus model.safetensors.index.json.
    """

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        idx = len(self._shards)
        save_file(self._pending, str(self.folder / f"shard-{idx:05d}.safetensors"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.folder / "shard-00000.safetensors", self.folder / SINGLE_NAME)
            return [SINGLE_NAME]
        names, weight_map = [], {}
        for i, keys in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.safetensors", self.folder / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return names


def write_config(folder: str | os.PathLike, config: dict, dtype: torch.dtype) -> None:
    out = {"family": config["family"], "format_version": FORMAT_VERSION, "torch_dtype": dtype_name(dtype)}
    out.update({k: v for k, v in config.items() if k != "family"})
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(out, indent=2) + "\n")


def save_model(model: torch.nn.Module, folder: str | os.PathLike, force: bool = False,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Saves a chai_models model (weights + config.json) in our format."""
    import dataclasses

    with atomic_output_dir(folder, force) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        dtype = None
        for name, t in model.state_dict().items():
            writer.add(name, t)
            dtype = dtype or t.dtype
        writer.close()
        write_config(tmp, {"family": model.family, **dataclasses.asdict(model.config)}, dtype)


# ----------------------------------------------------------------------------------------------------
# reading


def weight_files(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Maps each safetensors file of the checkpoint to the tensor names it should hold."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is corrupt ({e}); re-run the conversion with --force") from e
        files: dict[str, list[str]] = {}
        for k, f in weight_map.items():
            files.setdefault(f, []).append(k)
        for f in files:
            if not (folder / f).exists():
                raise CheckpointError(f"{folder / f} is listed in {INDEX_NAME} but missing; re-run the "
                                      "conversion with --force")
        return files
    single = folder / SINGLE_NAME
    if not single.exists():
        raise CheckpointError(f"{folder} has no {SINGLE_NAME} (nor {INDEX_NAME}); the checkpoint is incomplete, "
                              "re-run the conversion with --force")
    return {SINGLE_NAME: None}


def iter_tensors(folder: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) from a checkpoint's safetensors files, memory-mapped, one at a time."""
    from safetensors import safe_open

    folder = Path(folder)
    for fname, expected in weight_files(folder).items():
        path = folder / fname
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                if expected is not None and sorted(keys) != sorted(expected):
                    raise CheckpointError(f"{path} does not hold the tensors its index lists; re-run the "
                                          "conversion with --force")
                for k in keys:
                    yield k, f.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); re-run the "
                                  "conversion with --force") from e


def load_weights(model: torch.nn.Module, folder: str | os.PathLike, device, dtype: torch.dtype) -> None:
    """Assigns a checkpoint's tensors to a model built on the meta device, checking names and shapes."""
    expected = model.state_dict()
    seen = set()
    for name, t in iter_tensors(folder):
        if name not in expected:
            raise CheckpointError(f"{folder}: unknown tensor {name!r} for a {model.family} model; the checkpoint "
                                  "and its config.json disagree (re-convert it with --force)")
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{folder}: tensor {name!r} has shape {tuple(t.shape)} but config.json implies "
                                  f"{want}; the weights and config.json come from different models")
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        model.load_state_dict({name: t}, strict=False, assign=True)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{folder}: missing tensor(s) {missing[:5]}{more}; the checkpoint is incomplete, "
                              "re-run the conversion with --force")


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         chai=None, backend: str = "auto"):
    """Loads a converted checkpoint as a Llama or OPT model, in eval mode, on device, in dtype.

    dtype None keeps the checkpoint's own. chai: None (dense), "auto" (chai.json beside the checkpoint if present),
    a preset name or spec string, a chai.json path, or a ChaiConfig. backend: "auto" (the Triton kernels on CUDA
    when triton is installed), "torch" (the plain modules) or "triton" (chai_models.fast).
    """
    return load_with(load_weights, path, device, dtype, chai, backend)


def load_with(read_weights, path, device="cpu", dtype=None, chai=None, backend: str = "auto"):
    """load, with the weights read by read_weights(model, path, device, dtype) into the model built on the meta
    device (load_weights; a tensor-parallel rank reads its slices: chai_models.parallel.load)."""
    from .chai import install, resolve
    from .fast import apply
    from .models import FAMILIES

    cfg = read_config(path)
    if cfg["family"] not in FAMILIES:
        raise CheckpointError(f"{path}/config.json: unknown family {cfg['family']!r}; known: {sorted(FAMILIES)}")
    cls = FAMILIES[cfg["family"]]
    config = config_from_dict(cls.config_class, cfg, f"{path}/{CONFIG_NAME}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for but CUDA is not available here; use device='cpu'")
    dtype = dtype_from_name(dtype if dtype is not None else cfg.get("torch_dtype", "float32"))
    with torch.device("meta"):
        model = cls(config)
    read_weights(model, path, device, dtype)
    model.init_buffers(device)
    model.eval()
    model.checkpoint_path = str(path)
    chai_cfg = resolve(chai, model, path)
    if chai_cfg is not None:
        install(model, chai_cfg)
    apply(model, backend)
    return model
