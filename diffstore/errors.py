"""One exception type for every refusal a user can fix.

The CLI prints its message (which names the problem and the fix) and exits non-zero;
anything else that escapes is a bug and keeps its traceback.
"""


class DiffstoreError(Exception):
    """Bad input or a refused operation; the message says what to do instead."""
