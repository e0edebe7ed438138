"""Tensor parallelism across the GPUs of one host (Megatron-style) on torch.distributed, applied from outside.

`shard(model, group)` cuts a plain model (built on the meta device, or loaded) in place, in the style of gpt-fast's
tp.py; the model files never see it:

    attention wq, wk, wv      split by heads (output rows): a rank projects H/tp query heads and their KV heads, and
                              attends over its own KV cache, with no communication
    LLaMA w1, w3; OPT fc1     split by output rows (a slice of the hidden layer of the MLP)
    wo; LLaMA w2, OPT fc2     split by input columns (RowParallelLinear): a rank's partial product, one all-reduce
                              sums them, and the bias (OPT) is added once, after the sum
    embeddings, norms, output replicated
So a block costs two all-reduces of [B, S, hidden]. Why the embeddings and the output projection are replicated: a
token lookup reads B rows of the table, so splitting it saves memory only and costs one more all-reduce; the output
projection is 4% (LLaMA-2-7B, tp=2) to 5% (OPT-66B, tp=8) of a rank's bytes per decode step, and replicated it gives
every rank bit-identical logits, so every rank samples the same token with no broadcast (generation.py runs unchanged
on every rank) and the models' forward, which computes the logits inline, stays untouched.

GQA: the KV heads are split when tp divides n_kv_heads; when n_kv_heads divides tp, every rank holds the one KV head
its query heads read (a KV head replicated over tp / n_kv_heads ranks); other combinations are refused.

CHAI (chai.install reads model.tensor_parallel): each rank clusters its own heads into its share of each layer's
count, with no communication. One process reproduces it exactly with ChaiConfig.groups = tp.

`load` is checkpoint.load for one rank: it builds the model on the meta device, shards it, then reads only the rank's
slices of each tensor from the safetensors files with positioned reads (no whole-file mmap), so a rank's host memory
is its shard plus the replicated tensors, never the whole checkpoint.

Run with torchrun: `torchrun --nproc-per-node N -m chai_models generate ...`, `torchrun ... tools/bench.py ...`.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch.distributed import _functional_collectives as funcol
except ImportError:  # a torch built without torch.distributed: one process only, nothing here is reached
    funcol = None


@dataclass
class TensorParallel:
    rank: int
    world: int
    group: object  # a torch.distributed ProcessGroup


# ----------------------------------------------------------------------------------------------------
# The process group


def init_from_env(device: str | None = None) -> tuple[TensorParallel | None, str]:
    """Under torchrun (WORLD_SIZE > 1) joins the default process group, NCCL on CUDA and gloo on the CPU, and returns
    (TensorParallel, this rank's device: cuda:LOCAL_RANK); otherwise (None, device). device None: cuda if available."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    group = dist.group.WORLD
    return TensorParallel(dist.get_rank(group), dist.get_world_size(group), group), device


class RowParallelLinear(nn.Linear):
    """A linear layer whose input features are split across the ranks: each multiplies its slice, one all-reduce
    sums the partial products, and the bias (whole on every rank) is added once, after the sum."""

    tp_group = None

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        # a functional collective: traced by torch.compile and captured in a CUDA graph like any other op
        y = funcol.all_reduce(partial, "sum", self.tp_group)
        return y if self.bias is None else y + self.bias

    def forward(self, x):
        return self.reduce(F.linear(x, self.weight))


# ----------------------------------------------------------------------------------------------------
# Which slice of which tensor a rank holds


def split(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, length) of rank's part of n items, as even as possible (the first ranks take one more)."""
    base, extra = divmod(n, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def head_ranges(n_heads: int, n_kv_heads: int, rank: int, world: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((first query head, count), (first KV head, count)) of a rank."""
    if n_heads % world:
        raise ValueError(f"tensor parallelism over {world} ranks needs n_heads ({n_heads}) divisible by {world}; "
                         f"use a number of processes that divides {n_heads}")
    n_q = n_heads // world
    q0 = rank * n_q
    if n_kv_heads % world == 0:  # KV heads split
        return (q0, n_q), (rank * (n_kv_heads // world), n_kv_heads // world)
    if world % n_kv_heads == 0:  # each rank's query heads read one KV head, which it holds (replicated)
        return (q0, n_q), (q0 // (n_heads // n_kv_heads), 1)
    raise ValueError(f"tensor parallelism over {world} ranks with {n_kv_heads} KV heads: {world} must divide "
                     f"n_kv_heads or be a multiple of it; use a number of processes that divides {n_kv_heads}")


def plan(model, rank: int, world: int) -> dict[str, tuple[int, int, int]]:
    """The split tensors of a rank: state-dict name -> (dim, start, length); every other tensor is replicated."""
    cfg = model.config
    (q0, n_q), (kv0, n_kv) = head_ranges(cfg.n_heads, cfg.n_kv_heads, rank, world)
    D = cfg.head_dim
    names = set(model.state_dict())
    out = {}
    for i, blk in enumerate(model.layers):
        a, m = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        llama = hasattr(blk.feed_forward, "w1")
        up, down = (("w1", "w3"), "w2") if llama else (("fc1",), "fc2")
        f0, n_f = split(getattr(blk.feed_forward, down).in_features, rank, world)
        rows = {"wq": (q0 * D, n_q * D), "wk": (kv0 * D, n_kv * D), "wv": (kv0 * D, n_kv * D)}
        rows = {f"{a}.{k}": v for k, v in rows.items()} | {f"{m}.{k}": (f0, n_f) for k in up}
        for name, (start, n) in rows.items():  # output rows: the weight and its bias
            out[f"{name}.weight"] = (0, start, n)
            out[f"{name}.bias"] = (0, start, n)
        out[f"{a}.wo.weight"] = (1, q0 * D, n_q * D)  # input columns: the weight only, the bias is added once
        out[f"{m}.{down}.weight"] = (1, f0, n_f)
    return {k: v for k, v in out.items() if k in names}


def shard(model, group=None) -> dict[str, tuple[int, int, int]]:
    """Cuts a plain model in place for this rank of `group` (default: the default process group); returns plan().

    The model may be on the meta device (load() then reads the slices) or hold weights (they are narrowed). Shard
    before installing CHAI (install then clusters per rank) and before setting up caches.
    """
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("the model is already sharded")
    if model.chai_config is not None or model.max_batch_size:
        raise ValueError("shard a plain model: before installing CHAI (set_chai / load(chai=...)) and before "
                         "setup_caches")
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    slices = plan(model, rank, world)
    for name, (dim, start, n) in slices.items():
        mod_name, attr = name.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        p = getattr(mod, attr)
        if p.is_meta:
            shape = list(p.shape)
            shape[dim] = n
            t = torch.empty(shape, dtype=p.dtype, device="meta")
        else:
            t = p.detach().narrow(dim, start, n).clone()
        setattr(mod, attr, nn.Parameter(t, requires_grad=p.requires_grad))
        if attr == "weight":
            mod.out_features, mod.in_features = t.shape
    cfg = model.config
    (_, n_q), (_, n_kv) = head_ranges(cfg.n_heads, cfg.n_kv_heads, rank, world)
    for blk in model.layers:
        blk.attention.n_heads, blk.attention.n_kv_heads = n_q, n_kv
        mlp = blk.feed_forward
        for lin in (blk.attention.wo, mlp.w2 if hasattr(mlp, "w2") else mlp.fc2):
            lin.__class__ = RowParallelLinear
            lin.tp_group = group
    model.tensor_parallel = TensorParallel(rank, world, group)
    return slices


# ----------------------------------------------------------------------------------------------------
# Loading a rank's slices


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def safetensors_header(path) -> tuple[dict, int]:
    """The header of a .safetensors file (name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):  # a positioned read may return less than asked (Linux caps one call near 2 GiB)
        got = os.preadv(fd, [buf], offset)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset}")
        buf, offset = buf[got:], offset + got


def read_tensor(fd: int, entry: dict, data_start: int, part: tuple[int, int, int] | None) -> torch.Tensor:
    """One tensor of an open .safetensors file, or only its slice part = (dim, start, length): one positioned read
    per contiguous run of the slice, so exactly the slice's bytes are read."""
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    shape, begin = list(entry["shape"]), data_start + entry["data_offsets"][0]
    es = torch.empty((), dtype=dtype).element_size()
    dim, start, n = part if part is not None else (0, 0, shape[0] if shape else 1)
    outer = math.prod(shape[:dim])  # contiguous runs: one per index of the dims before `dim`
    inner = math.prod(shape[dim + 1:]) * es  # bytes of one step along `dim`
    run = n * inner
    out_shape = shape[:dim] + [n] + shape[dim + 1:] if shape else []
    buf = torch.empty(outer * run, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    for r in range(outer):
        _pread_into(fd, view[r * run:(r + 1) * run], begin + r * (shape[dim] * inner if shape else 0) + start * inner)
    return buf.view(dtype).view(out_shape)


def load_slices(model, folder, slices: dict, full_shapes: dict, device, dtype) -> int:
    """Assigns a sharded meta model the rank's slices (slices: plan(); full_shapes: the unsharded state-dict shapes),
    checking names and shapes as checkpoint.load_weights does. Returns the bytes read."""
    from .checkpoint import CheckpointError, weight_files

    folder = Path(folder)
    seen, nbytes = set(), 0
    for fname in weight_files(folder):
        path = folder / fname
        try:
            header, data_start = safetensors_header(path)
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{path} is corrupt or truncated ({e}); re-run the conversion with --force") from e
        fd = os.open(path, os.O_RDONLY)
        try:
            for name, entry in header.items():
                if name not in full_shapes:
                    raise CheckpointError(f"{folder}: unknown tensor {name!r} for a {model.family} model; the "
                                          "checkpoint and its config.json disagree (re-convert it with --force)")
                if tuple(entry["shape"]) != full_shapes[name]:
                    raise CheckpointError(f"{folder}: tensor {name!r} has shape {tuple(entry['shape'])} but "
                                          f"config.json implies {full_shapes[name]}; the weights and config.json "
                                          "come from different models")
                t = read_tensor(fd, entry, data_start, slices.get(name))
                nbytes += t.numel() * t.element_size()
                t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                model.load_state_dict({name: t}, strict=False, assign=True)
                seen.add(name)
        finally:
            os.close(fd)
    missing = sorted(set(full_shapes) - seen)
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {missing[:5]}; the checkpoint is incomplete, re-run the "
                              "conversion with --force")
    return nbytes


def load(path, device="cpu", dtype=None, chai=None, backend: str = "auto", group=None):
    """checkpoint.load for this rank of a tensor-parallel group (default: the default process group, which must be
    initialised: torchrun + init_from_env). Same arguments; model.bytes_read says how much of the files it read."""
    from .checkpoint import load_with

    if not dist.is_initialized():
        raise RuntimeError("parallel.load needs a process group: run under torchrun and call "
                           "chai_models.parallel.init_from_env() first")

    def read_slices(model, path, device, dtype):
        full_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        slices = shard(model, group)
        model.bytes_read = load_slices(model, path, slices, full_shapes, device, dtype)

    return load_with(read_slices, path, device, dtype, chai, backend)


def host_memory() -> dict:
    """This process's resident memory now and at its peak, and the bytes it has read through read calls (Linux
    /proc: VmRSS, VmHWM, rchar)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            out["rchar"] = int(line.split()[1])
    return {"rss": out["VmRSS"], "peak_rss": out["VmHWM"], "rchar": out["rchar"]}
