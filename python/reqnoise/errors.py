"""Exceptions that the CLI turns into one-line messages and exit codes."""


class ReqnoiseError(Exception):
    """A user-facing failure: bad input, refused operation, inconsistent files.

    The message names the problem (which tensor, which shape, which file). ``exit_code`` is what the CLI
    returns for it.
    """

    exit_code = 1


class RefusedError(ReqnoiseError):
    """The operation was refused on purpose (e.g. a pre-registration lock no longer matches)."""

    exit_code = 2
