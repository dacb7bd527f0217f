"""The command line's exit codes (cheap to import: the commands read them lazily)."""

import enum


class ExitStatus(enum.IntEnum):
    """The exit codes, as the README documents them."""

    OK = 0  # every input done
    ERROR = 1  # the run failed (model, device, output, ...)
    USAGE = 2  # bad command line
    PARTIAL = 3  # done, but some inputs failed (each is named on stderr and in the output)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
    TERMINATED = 143  # SIGTERM (128 + SIGTERM), where a command stops cleanly on it
