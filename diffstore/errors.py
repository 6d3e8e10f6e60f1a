"""One exception type for every refusal a user can fix (and `require`, the refusal for a missing extra).

The CLI prints its message (which names the problem and the fix) and exits non-zero;
anything else that escapes is a bug and keeps its traceback.
"""


class DiffstoreError(Exception):
    """Bad input or a refused operation; the message says what to do instead."""


def require(module: str, extra: str | None = None):
    """Import an optional dependency, or refuse naming the extra that installs it (or the package itself:
    a reader-only install has numpy, zarr and xarray but no torch)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = module.split(".")[0]
        raise DiffstoreError(f"this needs {pkg}, which is not installed: "
                             + (f"pip install 'diffstore[{extra}]'" if extra else f"pip install {pkg}")) from None
