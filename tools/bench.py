#!/usr/bin/env python
"""Benchmark decode, prefill and capacity on random weights of real shapes; prints one table.

    python tools/bench.py --shape llama-2-7b --chai dense llama-7b --batch 1 8 --context 512 2048 8192 \
        --mode eager compiled --ttft 2048 --hf
    python tools/bench.py --shape tiny --device cpu --dtype float32     # CPU regression check
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chai_models.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
