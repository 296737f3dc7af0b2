"""Atomic writes: a temporary name beside the target, then a rename."""

from __future__ import annotations

import fsspec
import pytest

from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes, atomic_write_on


def _failing_rename(path1: str, path2: str, **kwargs: object) -> None:
    raise PermissionError(13, "Permission denied")


def test_atomic_write_makes_the_folder_and_replaces_the_whole_file(tmp_path):
    target = tmp_path / "new" / "folder" / "file.json"
    atomic_write_bytes(str(target), b"first")
    atomic_write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def test_atomic_write_through_an_fsspec_url():
    atomic_write_bytes("memory://fsio-test/a/b.bin", b"bytes")
    fs = fsspec.filesystem("memory")
    assert fs.cat("/fsio-test/a/b.bin") == b"bytes"
    assert fs.ls("/fsio-test/a", detail=False) == ["/fsio-test/a/b.bin"]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    fs = fsspec.filesystem("file")
    target = tmp_path / "store.json"
    target.write_bytes(b"old")
    monkeypatch.setattr(fs, "mv", _failing_rename)
    # the store's form: the OSError itself, for the caller to name
    with pytest.raises(PermissionError):
        atomic_write_on(fs, str(target), b"new")
    # the URL form: a WmlabError that names the URL
    with pytest.raises(WmlabError, match="cannot write .*store.json: Permission denied"):
        atomic_write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["store.json"]
