"""The fused decode kernel (kernels.clustered_decode, new_token_decode) against the torch decode path, on CPU.

The Triton kernel runs under TRITON_INTERPRET=1, which must be set before triton is imported: the cases run in one
subprocess (tests/decode_kernel_cases.py) and each test below checks one of its results.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chai_models import chai
from decode_kernel_cases import (CASES, GEMV_CASES, MEMBERSHIP_CASES, MODEL_CASES, NEW_TOKEN_CASES, PROBS_CASES,
                                 ROPE_CACHE_CASES, SILU_CASES, WINDOW_CASES)

HERE = Path(__file__).resolve().parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed: the Triton kernel cannot run, even interpreted")


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(HERE / "decode_kernel_cases.py")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("name", list(CASES) + list(NEW_TOKEN_CASES) + list(MODEL_CASES) + list(SILU_CASES)
                         + list(GEMV_CASES) + list(MEMBERSHIP_CASES) + list(WINDOW_CASES) + list(PROBS_CASES)
                         + list(ROPE_CACHE_CASES) + ["inductor_fallbacks"])
def test_kernel_matches_torch_decode(interpreted, name):
    err = interpreted[name]
    assert not isinstance(err, str), err  # a traceback
    assert err < 1e-5, (name, err)


def test_cluster_lists():
    h2c = torch.tensor([[0, 1, 0, 2, 1, 0], [2, 2, 1, 0, 0, 0]])
    members, start = chai.cluster_lists(h2c, 3)
    assert members.tolist() == [[0, 2, 5, 1, 4, 3], [3, 4, 5, 2, 0, 1]]
    assert start.tolist() == [[0, 3, 5, 6], [0, 3, 4, 6]]
    gen = torch.Generator().manual_seed(0)
    for H, k in ((32, 4), (9, 3), (8, 8), (5, 1)):
        h2c = chai.canonical_labels(torch.randint(0, k, (4, H), generator=gen), k)
        k = int(h2c.max()) + 1
        members, start = chai.cluster_lists(h2c, k)
        for b in range(4):
            for c in range(k):
                heads = members[b, start[b, c]:start[b, c + 1]].tolist()
                assert heads == [h for h in range(H) if h2c[b, h] == c]  # ascending inside a cluster


@needs_triton
def test_decode_config():
    from chai_models import kernels

    # LLaMA-7B layer, 4 clusters: a whole mean-size cluster (8 heads) per program, the fewest splits that keep
    # ~1.5 programs per SM, within the limits; the two benchmark targets get the sweep's winners (H200)
    assert kernels.decode_config(1, 32, 4, 128, 8192)["split"] == 256
    assert kernels.decode_config(8, 32, 4, 128, 2048)["split"] == 512
    for B, T in ((1, 512), (1, 8192), (8, 2048), (8, 8192), (64, 8192)):
        for k in (4, 32):
            cfg = kernels.decode_config(B, 32, k, 128, T)
            n_splits = -(-T // cfg["split"])
            assert cfg["hpb"] == (8 if k == 4 else 1)
            assert cfg["split"] % cfg["block_t"] == 0 and cfg["split"] >= kernels.DECODE_MIN_SPLIT
            assert n_splits <= kernels.DECODE_MAX_SPLITS
            n_chunks = kernels.decode_chunks(32, k, cfg["hpb"])
            if cfg["split"] > kernels.DECODE_MIN_SPLIT:  # lengthened only while programs stay >= 1.5 per SM
                assert B * n_chunks * n_splits >= 1.5 * 132


def test_kernel_rule(monkeypatch):
    """chai.DENSE_DECODE_KERNEL (and CLUSTERED_, same rule): None picks the kernel for one-token calls while
    B x T <= DENSE_DECODE_MAX_POSITIONS; True / False force it; never for prefill, uncached calls, or where the
    kernels can't run."""
    from chai_models import kernels

    monkeypatch.setattr(kernels, "available", lambda t: True)
    q1, q8, q_prefill = torch.zeros(1, 4, 1, 8), torch.zeros(8, 4, 1, 8), torch.zeros(1, 4, 5, 8)
    k512, k1024, k2048 = (torch.zeros(1, 4, T, 8) for T in (512, 1024, 2048))
    pos = torch.tensor([3])

    def use(q, k, pos):
        return chai._use_kernel(chai.DENSE_DECODE_KERNEL, chai.DENSE_DECODE_MAX_POSITIONS, q, k, pos)

    monkeypatch.setattr(chai, "DENSE_DECODE_KERNEL", None)
    assert use(q1, k512, pos) and use(q1, k1024, pos)
    assert not use(q1, k2048, pos)
    assert not use(q8, k512, pos)  # B x T = 4096
    assert not use(q_prefill, k512, pos) and not use(q1, k512, None)
    assert not use(q1.double(), k512.double(), pos)  # fp64 keeps the torch path
    monkeypatch.setattr(chai, "DENSE_DECODE_KERNEL", True)
    assert use(q8, k2048, pos) and not use(q_prefill, k2048, pos)
    monkeypatch.setattr(chai, "DENSE_DECODE_KERNEL", False)
    assert not use(q1, k512, pos)
    monkeypatch.setattr(kernels, "available", lambda t: False)
    monkeypatch.setattr(chai, "DENSE_DECODE_KERNEL", True)
    assert not use(q1, k512, pos)


@needs_triton
def test_kernels_compile_for_hopper():
    """Every Triton kernel compiles for sm90 (no GPU needed): the interpreter runs kernels as NumPy and misses
    what only the compiler rejects (a loop-carried variable changing type, a bad constexpr branch)."""
    run = subprocess.run([sys.executable, str(HERE / "compile_kernels.py")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
