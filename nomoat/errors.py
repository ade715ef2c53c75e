"""The one exception type for bad user input.

The CLI prints its message as a single line and exits with status 2; library callers catch it like any error.
Bugs stay ordinary exceptions so that they keep their tracebacks.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, a corrupt shard, a wrong config key."""
