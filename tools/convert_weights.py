#!/usr/bin/env python
"""Convert a Hugging Face folder or a .gguf file into chai_models' checkpoint format.

    python tools/convert_weights.py SRC DST [--dtype bfloat16] [--force]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from chai_models.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
