"""One exception type for every refusal a user can fix (and `require`, the refusal for a missing extra), and
`redact`, which masks the credentials a message may carry before it is shown.

The CLI prints its message (which names the problem and the fix) and exits non-zero;
anything else that escapes is a bug and keeps its traceback. Dependency-free: the CLI prints errors with it even
when an interrupted import left a library half-loaded.
"""

import re


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


# user:password@ in a URL (also where a library quotes the URL's host part alone: botocore's "Invalid bucket name
# "KEY:SECRET@bucket""), and secret-looking query parameters: masked in every message the CLI prints
CREDENTIALS = (re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^@\s]*:[^@\s]*@"),
               re.compile(r"(?P<pre>^|[\s\"'(])[^\s\"'@/:]+:[^\s\"'@/]+@"),
               re.compile(r"(?P<name>(?:aws_)?(?:secret[A-Za-z_]*|access_key[A-Za-z_]*|session_token|token|password)"
                          r"=)[^&\s'\"]+", re.IGNORECASE))


def redact(text: str) -> str:
    """`text` with credentials in URLs (s3://KEY:SECRET@bucket -> s3://***@bucket) and query strings masked."""
    text = CREDENTIALS[0].sub(lambda m: f"{m['scheme']}***@", text)
    text = CREDENTIALS[1].sub(lambda m: f"{m['pre']}***@", text)
    return CREDENTIALS[2].sub(lambda m: f"{m['name']}***", text)
