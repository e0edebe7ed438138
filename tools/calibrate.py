#!/usr/bin/env python
"""Calibrate CHAI's per-layer cluster counts for a converted checkpoint; writes chai.json beside it.

    python tools/calibrate.py MODEL_DIR [--data FILE.txt|FILE.jsonl] [-n 1024] [--window 5] [--tolerance 0.05]
                              [--device cuda] [--force] [--no-plot]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from chai_models.calibration import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
