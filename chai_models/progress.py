"""Progress bars through tqdm when it is installed (the `progress` extra); a quiet no-op otherwise."""
from __future__ import annotations

import sys


def progress(iterable=None, total=None, desc=None, unit="it", disable=None):
    if disable is None:
        disable = not sys.stderr.isatty()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Plain(iterable)
    # leave=True: a finished bar stays on screen as the record of what ran and how long it took
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=True)


class _Plain:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass
