"""The one error type a user can cause, and the CLI boundary that reports it.

Exit codes, stable (README, "When something goes wrong"): 0 success, 2 a user error (one line
`error: ...` that names the fix), 3 training stopped because the loss diverged, 130 interrupted
(Ctrl-C or SIGTERM; a training run saves first).
"""

import sys

EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class TangshiError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""

    exit_code = EXIT_USER_ERROR


class Diverged(TangshiError):
    """Training stopped on a non-finite or runaway loss; nothing of the diverged state was saved."""

    exit_code = EXIT_DIVERGED


def run_cli(main, argv=None) -> int:
    """Run a command's `main`, turning a TangshiError into one line on stderr and its exit code."""
    try:
        main(argv)
    except TangshiError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
