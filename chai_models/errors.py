"""The one exception type for mistakes a user can make and fix: a bad path, a bad config.json, a bad --chai spec,
a download that cannot be made. Its message names the problem and the fix in one line; the command-line entry
points print it as `error: ...` and exit with status 2. Any other exception is a bug and keeps its traceback."""
from __future__ import annotations

import sys


class UserError(ValueError):
    """A problem in the user's input or environment; str(e) says what is wrong and how to fix it."""


def run_main(main, argv=None) -> int:
    """Runs a command-line main(argv): a UserError becomes one `error:` line and status 2, Ctrl-C status 130;
    anything else propagates with its traceback."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
