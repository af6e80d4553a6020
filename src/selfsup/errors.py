"""Errors a user can cause and fix: the CLI prints them as one line, without a traceback."""


class SelfsupError(Exception):
    """A problem with the user's input (a path, an option, a file's contents).

    The message names the file or option and says what was expected.
    """


class NonFiniteLossError(SelfsupError):
    """The training loss became NaN or infinite."""
