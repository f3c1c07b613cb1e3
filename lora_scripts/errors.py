"""Errors the user can fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix; the CLI prints str(exc) as one line and exits non-zero."""
