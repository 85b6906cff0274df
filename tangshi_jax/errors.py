"""The one error type a user can cause, and the CLI boundary that reports it."""

import sys


class TangshiError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


def run_cli(main, argv=None) -> int:
    """Run a command's `main`, turning a TangshiError into one line on stderr and exit code 2."""
    try:
        main(argv)
    except TangshiError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
