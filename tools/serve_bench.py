#!/usr/bin/env python
"""Serving benchmark (continuous batching, dense vs CHAI in one memory budget); prints one table.

    python tools/serve_bench.py --shape llama-2-7b --memory-gb 60 --requests 256
    python tools/serve_bench.py --shape tiny --device cpu --requests 12 --prompt-len 4 48 --output-len 2 16 \
        --memory-gb 0.01 --single-requests 3 --chai 2
    python tools/serve_bench.py --pair --model weights/smollm2-135m-instruct
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chai_models.serve_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
