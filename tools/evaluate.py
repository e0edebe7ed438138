#!/usr/bin/env python
"""Evaluate dense vs CHAI (calibrated, spec, static, random grouping): perplexity, agreement, KL, zero-shot tasks.

    python tools/evaluate.py MODEL_DIR --text pydoc [--text FILE|DIR] [--task [LAYOUT:]FILE.jsonl]
                             [--chai auto|FILE.json|SPEC|NAME=SPEC ...] [--static] [--random N] [--plot PNG]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from chai_models.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
