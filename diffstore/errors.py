"""One exception type for every refusal a user can fix.

The CLI prints its message (which names the problem and the fix) and exits non-zero;
anything else that escapes is a bug and keeps its traceback.
"""


class DiffstoreError(Exception):
    """Bad input or a refused operation; the message says what to do instead."""


def require(module: str, extra: str):
    """Import an optional dependency, or refuse naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DiffstoreError(f"this needs {module.split('.')[0]}, which is not installed: "
                             f"pip install 'diffstore[{extra}]'") from None
