"""Errors a user can cause and fix. Each message names the file, field, sample or URL and what to do.

Commands catch `UserError` and print its message; every other exception is a bug and propagates.
"""


class UserError(ValueError):
    """Base of all user-fixable errors."""
