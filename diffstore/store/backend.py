"""Where a store lives: a local path or an fsspec URL, and what to tell the user when it cannot be reached."""

from __future__ import annotations

import errno
from pathlib import Path

import zarr

from ..errors import DiffstoreError

FS_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


class SafeLocalStore(zarr.storage.LocalStore):
    """A local store that never writes or deletes through a symbolic link inside it: a link planted in a shared
    store (x/c -> /home/you) must not make a writer overwrite, or `rm` delete, files outside the store. A node that
    is itself a link is unlinked by a delete, never followed. (The store's own root may be a link.)"""

    def inside(self, key: str, delete: bool = False) -> Path:
        path = self.root / key
        parts = Path(key).parts
        for i in range(1, len(parts) + (0 if delete else 1)):  # every folder between the root and the node
            if (self.root.joinpath(*parts[:i])).is_symlink():
                raise DiffstoreError(f"{self.root.joinpath(*parts[:i])} is a symbolic link inside the store; diffstore "
                                     "does not write or delete through links. Replace it with a real folder (or "
                                     "remove the link) and re-run")
        return path

    async def _set(self, key: str, value, exclusive: bool = False) -> None:
        self.inside(key)
        await super()._set(key, value, exclusive)

    async def delete(self, key: str) -> None:
        if self.inside(key, delete=True).is_symlink():
            self._check_writable()
            (self.root / key).unlink()
            return
        await super().delete(key)

    async def delete_dir(self, prefix: str) -> None:
        if prefix and self.inside(prefix, delete=True).is_symlink():
            self._check_writable()
            (self.root / prefix).unlink()
            return
        await super().delete_dir(prefix)


def zarr_store(url: str, read_only: bool, storage_options: dict | None = None):
    """A zarr Store for a local path or an fsspec URL; a missing filesystem library is named."""
    if "://" not in url or url.startswith("file://"):
        path = Path(url.removeprefix("file://")).expanduser()
        if path.is_file():  # (not "exists and not a dir": another writer may remove an empty folder meanwhile)
            raise DiffstoreError(f"{url} is a file, not a diffstore store: pass a directory path (e.g. data/f.zarr)")
        return SafeLocalStore(path, read_only=read_only)
    protocol = url.split("://")[0]
    try:
        return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
    except (ImportError, ValueError) as e:
        pkg = FS_PACKAGES.get(protocol, f"the fsspec backend for {protocol}://")
        raise DiffstoreError(f"cannot open {url}: {e}. Install {pkg} (pip install {pkg}) "
                             f"to use {protocol}:// stores") from None


def chain(e: BaseException) -> list[BaseException]:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def storage_failure(url: str, e: BaseException) -> str | None:
    """A message for a failure of the storage itself (credentials, network, permissions), None for others."""
    names = {type(x).__name__ for x in chain(e)}
    text = " ".join(str(x) for x in chain(e))
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return (f"no credentials to reach {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "and AWS_ENDPOINT_URL for a non-AWS server")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
                "ServerDisconnectedError", "ReadTimeoutError", "ConnectionClosedError"}:
        return (f"cannot reach the server of {url} ({e}); check the endpoint (AWS_ENDPOINT_URL) and the network, "
                "then re-run: finished shards are kept and skipped")
    if "AccessDenied" in text or "Forbidden" in text:
        return f"access to {url} was denied ({e}); use credentials that may read (and write) it"
    if "NoSuchBucket" in text:
        return f"the bucket of {url} does not exist; create it, or pass another --store"
    os_error = next((x for x in chain(e) if isinstance(x, OSError) and x.errno in OS_FIXES), None)
    return os_message(url, os_error) if os_error is not None else None


def describe_failure(url: str, e: BaseException, file: str = "") -> str:
    """Why `url` (or its `file`) could not be opened, and what to do."""
    where = f"{url.rstrip('/')}/{file}" if file else url
    return storage_failure(url, e) or (f"{where} is not a readable diffstore store ({type(e).__name__}: {e}); "
                                       "pass another --store path")


OS_FIXES = {errno.ENOSPC: "the disk is full: free space (or pass a --store on another disk) and re-run; "
                          "finished shards are kept",
            errno.EDQUOT: "the disk quota is exceeded: free space and re-run; finished shards are kept",
            errno.EROFS: "the file system is read-only: pass a writable --store path (reading commands still work)",
            errno.EACCES: "permission denied: pass a --store path you may write, or fix its permissions",
            errno.EPERM: "operation not permitted: pass a --store path you may write"}


def os_message(url: str, e: OSError) -> str:
    """Disk full, read-only file system, no permission: name the file and the fix."""
    return f"cannot write {e.filename or url}: {OS_FIXES.get(e.errno, e.strerror)}"
