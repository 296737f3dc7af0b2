"""File access through fsspec, so that ``s3://`` works wherever a local path does."""

from __future__ import annotations

import uuid

import fsspec

from wmlab.errors import WmlabError


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that readers see the old file or the whole new one.

    The bytes go to a temporary name beside the target and are renamed into place: a kill
    mid-write leaves only a ``.tmp-`` file, never a torn target.
    """
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    try:
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as handle:
            handle.write(data)
        fs.mv(tmp, path)
    except OSError as exc:
        raise WmlabError(f"cannot write {url}: {exc.strerror or exc}; check the path and "
                         "its permissions") from None


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)
