"""The two kinds of failure the CLI reports in one line instead of a traceback."""


class SpartaError(Exception):
    """A usage or configuration problem the user can fix: exit code 2.

    The message names the problem and the fix, on one line.
    """

    exit_code = 2


class RunFailure(SpartaError):
    """A failure during a run that was correctly configured (NaN loss, disk full): exit code 1."""

    exit_code = 1
