"""Outputs are replaced whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from blockdrop.core.errors import DataError
from blockdrop.core.fileio import atomic_path, atomic_write_text, check_output_folder, staged_folder


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    with atomic_path(target, suffix=".json") as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".json" and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temporary left


def test_staged_folder_swaps_in_whole_or_keeps_the_previous(tmp_path):
    out = tmp_path / "data"
    with staged_folder(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_folder(out) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    with pytest.raises(DataError, match="--overwrite"):
        check_output_folder(out, overwrite=False)
    check_output_folder(out, overwrite=True)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_permissions_an_ordinary_open_gives(tmp_path, umask):
    """Not the 0600 / 0700 of a private temporary file: the rename would publish those."""
    before = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
        (tmp_path / "plain").mkdir()
        atomic_write_text(tmp_path / "atomic.txt", "x")
        with staged_folder(tmp_path / "staged") as tmp:
            (tmp / "inside.txt").write_text("x")
    finally:
        os.umask(before)

    def mode(name: str) -> int:
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    assert mode("atomic.txt") == mode("plain.txt") == 0o666 & ~umask
    assert mode("staged") == mode("plain") == 0o777 & ~umask
    assert mode("staged/inside.txt") == 0o666 & ~umask
