"""Check every media file of a dataset before a run starts, so that a bad file fails in seconds,
not 25% into epoch 1 or at the first validation after hours of training.

A video passes when it opens, has a video stream, every packet of that stream can be read (their
count must equal the frames the file's index declares: a damaged index or a cut file reads fewer),
and its first and last frames decode. A sequence passes when its ``.npy`` array loads as a finite
``(T, C)`` float array. What the check cannot see: corruption inside frame data that the decoder
conceals (it decodes without error; only a checksum of the file would tell).

Files that passed are remembered by name, size and modification time in a small JSON file (in the
decode cache folder when there is one, else in the data folder when it is writable), so a second
run does not pay for the check again.
"""

from __future__ import annotations

import json
from pathlib import Path

import av

from blockdrop.core.errors import BlockdropError, DataError
from blockdrop.core.fileio import write_json
from blockdrop.data.sequences import load_sequence

CACHE_FILE = "media_check.json"


def check_video(path: Path) -> str | None:
    """None if the video is readable end to end, else what is wrong with it (one phrase)."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as err:
        return f"cannot be opened ({getattr(err, 'strerror', None) or err})"
    try:
        if not container.streams.video:
            return "has no video stream"
        stream = container.streams.video[0]
        declared = stream.frames
        try:
            readable = sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.FFmpegError as err:
            return f"cannot be read to its end ({err})"
        if readable == 0:
            return "has no frames"
        if declared and readable != declared:
            return f"declares {declared} frames but {readable} can be read (cut short or damaged)"
        return _decode_ends(container, stream)
    finally:
        container.close()


def _decode_ends(container, stream) -> str | None:
    """Decode the first frame and the frames of the last second."""
    try:
        container.seek(0, stream=stream)
        if next(container.decode(stream), None) is None:
            return "has no decodable frame"
        end = float(stream.duration * stream.time_base) if stream.duration else 0.0
        container.seek(int(max(0.0, end - 1.0) / stream.time_base), stream=stream, backward=True)
        if not any(True for _ in container.decode(stream)):
            return "has no decodable frame in its last second"
    except av.FFmpegError as err:
        return f"does not decode ({err})"
    return None


def check_sequence(path: Path) -> str | None:
    try:
        load_sequence(path, mmap=True)
    except DataError as err:
        return str(err).removeprefix(f"{path}: ")
    return None


def _cache_path(source, cache_dir: str | None) -> Path | None:
    folder = Path(cache_dir) if cache_dir else Path(source.root)
    return folder / (CACHE_FILE if cache_dir else f".blockdrop-{CACHE_FILE}")


def _stamp(path: Path) -> list:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def check_media(source, video_ids, *, video: bool, cache_dir: str | None = None) -> dict[str, str]:
    """{video id: problem} for every bad file among ``video_ids`` (empty when all are fine)."""
    cache_path = _cache_path(source, cache_dir)
    try:
        passed = json.loads(cache_path.read_text()) if cache_path is not None and cache_path.is_file() else {}
    except (OSError, ValueError):
        passed = {}
    problems = {}
    for video_id in sorted(video_ids):
        try:
            path = source.path(video_id)
        except DataError:
            problems[video_id] = "is missing"
            continue
        if passed.get(path.name) == _stamp(path):
            continue
        problem = check_video(path) if video else check_sequence(path)
        if problem is None:
            passed[path.name] = _stamp(path)
        else:
            problems[video_id] = problem
    _remember(cache_path, passed)
    return problems


def _remember(cache_path: Path | None, passed: dict) -> None:
    if cache_path is None:
        return
    try:
        write_json(cache_path, passed)
    except (OSError, BlockdropError):
        pass  # a read-only data folder: the check is redone next time, nothing else changes


def describe_problems(source, problems: dict[str, str], shown: int = 10) -> str:
    """'N bad media files: <file> <problem>; ...' on one line."""
    items = []
    for video_id, problem in sorted(problems.items()):
        where = Path(source.root) / video_id if problem == "is missing" else _path(source, video_id)
        items.append(f"{where} {problem}")
    more = f"; ... and {len(items) - shown} more" if len(items) > shown else ""
    return f"{len(items)} bad media file{'s' if len(items) != 1 else ''}: " + "; ".join(items[:shown]) + more


def _path(source, video_id: str) -> Path:
    try:
        return source.path(video_id)
    except DataError:
        return Path(source.root) / video_id
