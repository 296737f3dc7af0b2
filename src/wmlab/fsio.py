"""File access through fsspec, so that ``s3://`` works wherever a local path does."""

from __future__ import annotations

import uuid

import fsspec

from wmlab.errors import WmlabError


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` (its folder made if absent) as ``atomic_write_on`` does; a
    failure is a ``WmlabError`` that names the URL."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    try:
        fs.makedirs(parent, exist_ok=True)
        atomic_write_on(fs, path, data)
    except OSError as exc:
        raise WmlabError(f"cannot write {url}: {exc.strerror or exc}; check the path and "
                         "its permissions") from None


def atomic_write_on(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` of ``fs`` so that readers see the old file or the whole new
    one.

    The bytes go to a temporary name beside the target (``<path>.tmp-<8 hex digits>``) and
    are renamed into place: a kill mid-write leaves only a ``.tmp-`` file, never a torn
    target. A failed rename removes its temporary file and raises the ``OSError``, for
    callers (the episode store) that name the failure in their own terms.
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    try:
        fs.mv(tmp, path)
    except OSError:
        fs.rm(tmp)
        raise


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)
