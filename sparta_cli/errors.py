"""The two kinds of failure the CLI reports in one line instead of a traceback."""


class SpartaError(Exception):
    """A usage or configuration problem the user can fix: exit code 2.

    The message names the problem and the fix, on one line.
    """

    exit_code = 2


class RunFailure(SpartaError):
    """A failure during a run that was correctly configured (NaN loss, disk full): exit code 1."""

    exit_code = 1


class Diverged(RunFailure):
    """The training loss became NaN or infinite: the configuration (its rate, most often) is at fault,
    not the machine, so a search ranks it below every finished trial."""


class Interrupted(RunFailure):
    """Ctrl-C or SIGTERM: a checkpoint was written; exit 130 like a shell."""

    exit_code = 130
