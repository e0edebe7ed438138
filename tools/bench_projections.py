#!/usr/bin/env python
"""One layer's projections alone: the GEMV / small-M GEMM against cuBLAS on the packed weights; prints one table.

    python tools/bench_projections.py --shape llama-2-7b --rows 1 8 32
    TRITON_INTERPRET=1 python tools/bench_projections.py --shape tiny --device cpu --dtype float32   # CPU check
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chai_models.bench_projections import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
