"""User-facing errors: the CLI prints one line and exits with status 1."""


class QuantkitError(Exception):
    """A problem with the user's input, stated with the fix."""
