"""The one error type a user can cause, and the CLI boundary that reports it.

Exit codes, stable (README, "When something goes wrong"): 0 success, 2 a user error (one line
`error: ...` that names the fix), 3 training stopped because the loss diverged, 130 interrupted
(Ctrl-C or SIGTERM; a training run saves first).
"""

import os
import sys

EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def as_flag(name: str) -> str:
    """How the command line names an option: top_k is --top-k."""
    return "--" + name.replace("_", "-")


def as_field(name: str) -> str:
    """How the API names an option: as declared."""
    return name


class TangshiError(Exception):
    """A problem the user can fix; its message names the problem and the fix.

    An error about a request's options says so in the domain's words: `field` is the option it
    is about, and its message names options as {placeholders} ("{begin} is empty"; {field} is
    the option of `field`), with any other {value} given by keyword (a user's text goes there,
    never into the template). Each edge words it: the command line as flags (str(error):
    "--begin is empty"), the API as fields (error.worded(as_field): "begin is empty")."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, *, field: str | None = None, **values):
        super().__init__(message)
        self.field, self.values = field, values

    def worded(self, name=as_flag) -> str:
        """The message with every option named by `name` (a message about no field is as given)."""
        if self.field is None:
            return self.args[0]
        return self.args[0].format_map(_Names(name, {"field": name(self.field), **self.values}))

    def __str__(self) -> str:
        return self.worded(as_flag)


class _Names(dict):
    """Placeholders of a message: the values given, else option names worded by the edge."""

    def __init__(self, name, values: dict):
        super().__init__(values)
        self.name = name

    def __missing__(self, key: str) -> str:
        return self.name(key)


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
    except BrokenPipeError:  # the reader stopped reading (`| head`): what it took was written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush is quiet
    return 0
