#!/usr/bin/env python
"""One layer's attention for a decode token alone: the decode kernel against SDPA (dense) or clustered_probs + cuBLAS
(CHAI); prints one table.

    python tools/bench_attention.py --shape llama-2-7b --clusters 0 4 --batch 1 8 32 --context 512 2048 8192
    TRITON_INTERPRET=1 python tools/bench_attention.py --shape tiny --device cpu --dtype float32   # CPU check
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chai_models.bench_attention import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
