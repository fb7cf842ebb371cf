"""Outputs are replaced whole or not at all."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from blockdrop.core.errors import CheckpointError, DataError, DiskFullError, OutputError
from blockdrop.core.fileio import (append_text, atomic_path, atomic_write_text, check_output_file, check_output_folder,
                                   is_json_object, is_temporary, load_state, save_torch, staged_folder,
                                   temporary_beside, write_json)


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


# ---- issue 25 --------------------------------------------------------------------------------------

def test_every_temporary_name_is_one_the_startup_cleanup_finds(tmp_path):
    names = []
    for suffix in ("", ".png", ".npy", ".mp4"):
        with atomic_path(tmp_path / f"out{suffix}", suffix=suffix) as tmp:
            names.append(tmp)
            assert is_temporary(tmp) and tmp.suffix == (suffix or tmp.suffix), tmp
    with staged_folder(tmp_path / "folder") as tmp:
        assert is_temporary(tmp)
    assert is_temporary(temporary_beside(tmp_path / "x", folder=True))
    assert not is_temporary(tmp_path / "report.png") and not is_temporary(tmp_path / ".run.previous")


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_a_write_never_replaces_what_is_not_a_regular_file(tmp_path, kind):
    target = {"folder": tmp_path / "out.json", "fifo": tmp_path / "out.json", "device": Path("/dev/null")}[kind]
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    mode = target.stat().st_mode
    with pytest.raises(OutputError, match=rf"^{re.escape(str(target))}: exists and is a"):
        atomic_write_text(target, "{}")
    with pytest.raises(OutputError, match=rf"^--json {re.escape(str(target))}: exists and is a"):
        check_output_file(target, "--json")
    assert target.stat().st_mode == mode and [p.name for p in tmp_path.iterdir()] == ([target.name] if kind != "device" else [])


def test_a_write_through_a_link_replaces_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    write_json(tmp_path / "link.json", {"new": 1})
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "real.json").read_text()) == {"new": 1}


def test_an_existing_file_is_replaced_only_when_it_is_ours(tmp_path):
    mine, theirs = tmp_path / "metrics.json", tmp_path / "notes.txt"
    write_json(mine, {"average_mAP": 1.0})
    theirs.write_text("a user's notes")
    check_output_file(mine, "--json", ours=is_json_object)
    with pytest.raises(OutputError, match=r"--json .*notes.txt: exists and is not a JSON file; remove it"):
        check_output_file(theirs, "--json", ours=is_json_object, what="a JSON file")


def test_an_unwritable_folder_names_the_path_asked_for(tmp_path):
    with pytest.raises(OutputError, match=r"^/sys/blockdrop-test.json: cannot write there \("):
        write_json("/sys/blockdrop-test.json", {})


def test_saved_state_reloads_and_a_damaged_one_is_one_guarded_error(tmp_path):
    state = {"epoch": 3, "w": torch.arange(5.0)}
    path = save_torch(state, tmp_path / "train_state.pt")
    loaded = load_state(path, remedy="x")
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], state["w"])
    assert load_state(path, remedy="x", apply=lambda s: s["epoch"] * 2) == 6
    with pytest.raises(CheckpointError, match=r"train_state.pt: cannot resume from it \(KeyError: 'model'\); redo it"):
        load_state(path, remedy="redo it", apply=lambda s: s["model"])  # a state of another kind
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"train_state.pt: cannot resume from it \(RuntimeError: .*\); redo it"):
        load_state(path, remedy="redo it")
    (tmp_path / "selection.json").write_text('{"drop": [1')
    with pytest.raises(CheckpointError, match=r"selection.json: cannot resume from it \(JSONDecodeError"):
        load_state(tmp_path / "selection.json", remedy="x", json_file=True)


def test_an_append_is_a_whole_line_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    assert append_text(path, '{"epoch": 1}\n') == 0
    before = path.read_bytes()

    class Full:  # the disk fills after half the line was written
        def __init__(self, real):
            self.real = real

        def write(self, text):
            self.real.write(text[: len(text) // 2])
            self.real.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: Full(real_open(*a, **k)))
    with pytest.raises(DiskFullError, match=rf"^{re.escape(str(tmp_path))}: no space left on its disk for "
                                            r"metrics.jsonl \(needs \d+ bytes, .* free\)"):
        append_text(path, '{"epoch": 2, "loss": 0.5}\n')
    monkeypatch.undo()
    assert path.read_bytes() == before
