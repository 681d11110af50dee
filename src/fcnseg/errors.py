"""User-facing errors: one line that names the file or value and says what to do next."""


class FcnsegError(Exception):
    """A mistake in the user's input (a file, a flag, a value). The CLI prints it on one line, no traceback."""
