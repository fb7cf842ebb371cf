"""`blockdrop detect`: run a saved video detector on video files. No config or annotations needed.

The checkpoint (model.safetensors from train or compress) carries the decode rate, frame size,
window, test stride, class names and the post-processing settings it was trained with. Each
video is decoded as a stream (`data.video.stream_video`) and cut into the same sliding test
windows as `blockdrop eval`: the test-mode `TADDataset` itself, reading a forward-only view of the
stream, so the last window is padded and masked as eval pads it. Windows go through the same
`tad.inference.predict_windows` and `results_from_windows` as eval, so the detections equal eval's
for the same video.

Memory: the view keeps only the frames from the latest window's start on (at most one window and
one chunk of ``test_stride`` frames), and a batch holds ``eval.batch_size`` windows, so peak memory
does not grow with the video's length. The per-window candidates kept for merging do (a few
hundred numbers per window).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blockdrop.compress.saving import read_compressed_metadata
from blockdrop.core.config import from_dict
from blockdrop.core.errors import BlockdropError, ConfigError, DataError
from blockdrop.core.schema import EvalConfig, ExperimentConfig
from blockdrop.data.annotations import Annotations, VideoInfo
from blockdrop.data.video import VideoMeta, num_output_frames, probe_video, stream_video
from blockdrop.recipes.build import builder_config, check_model_file, load_detector, make_dataset
from blockdrop.recipes.timeline import plot_timeline
from blockdrop.tad.inference import predict_windows, results_from_windows


@dataclass(frozen=True)
class DetectSettings:
    """What detect takes from the checkpoint (and the flags that override it)."""

    experiment: ExperimentConfig  # data (window, test_stride, frame_size), backbone, head
    rate: float  # decode fps: input steps per second
    eval: EvalConfig  # batch size and post-processing, as eval runs them
    classes: tuple[str, ...]


def detect_settings(builder: dict, checkpoint: Path, *, fps: float | None = None, min_score: float | None = None,
                    warn: Callable[[str], None] | None = None) -> DetectSettings:
    """The checkpoint's data and eval settings; ``fps`` overrides the decode rate (``warn`` is told
    when it differs from the training rate), ``min_score`` the score floor."""
    cfg = builder_config(builder, source=f"{checkpoint} metadata")
    if cfg.data.kind != "video":
        raise ConfigError(f"{checkpoint}: a {cfg.data.kind}-data model (data.kind {cfg.data.kind!r}); "
                          f"`blockdrop detect` runs video models on video files (use `blockdrop eval` for it)")
    if fps is not None and not fps > 0:
        raise ConfigError(f"--fps must be positive, got {fps}")
    trained = cfg.data.rate
    if fps is None and trained is None:
        raise ConfigError(f"{checkpoint}: the model's data.rate is not recorded (it came from its annotation "
                          f"file's fps); pass the decode rate with --fps")
    if fps is not None and trained is not None and abs(fps - trained) > 1e-9:
        (warn or _warn)(f"--fps {fps:g} differs from the {trained:g} fps the model was trained at: each window of "
                        f"{cfg.data.window} frames now spans {cfg.data.window / fps:.1f} s instead of "
                        f"{cfg.data.window / trained:.1f} s, so actions look {trained / fps:.2f}x as fast; "
                        f"segments are still reported in seconds")
    evaluation = _eval_section(builder, checkpoint)
    if min_score is not None:
        if not min_score > 0:
            raise ConfigError(f"--min-score must be positive, got {min_score}")
        evaluation = replace(evaluation, min_score=float(min_score))
    return DetectSettings(cfg, float(fps if fps is not None else trained), evaluation, tuple(builder["classes"]))


def _eval_section(builder: dict, checkpoint: Path) -> EvalConfig:
    """The checkpoint's eval section (post-processing as the model was validated with); keys an
    earlier version wrote and this one lacks are skipped, missing ones take the defaults."""
    section = (builder.get("config") or {}).get("eval") or {}
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    return from_dict(EvalConfig, {k: v for k, v in section.items() if k in known}, source=f"{checkpoint} metadata")


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


class _ForwardFrames:
    """A streamed video as a sliceable ``(T, H, W, 3)`` array for slices that only move forward.

    The test-mode dataset asks for ``frames[start:start + window]`` with non-decreasing starts;
    frames before the latest start are dropped, so at most a window plus a chunk is held.
    """

    def __init__(self, chunks: Iterator[np.ndarray], length: int, path: Path) -> None:
        self.chunks, self.length, self.path = chunks, length, path
        self.offset = 0  # video frame index of buffer[0]
        self.buffer: np.ndarray | None = None  # (n, H, W, 3)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.length) if isinstance(key, slice) else (-1, -1, 0)
        if step != 1 or start < self.offset:  # the dataset never does this: a bug, not bad input
            raise IndexError(f"a streamed video is read front to back in slices; got {key!r} after frame {self.offset}")
        if self.buffer is not None:
            self.buffer = self.buffer[start - self.offset:]
        self.offset = start
        while self.buffer is None or len(self.buffer) < stop - start:
            chunk = next(self.chunks, None)
            if chunk is None:
                held = 0 if self.buffer is None else len(self.buffer)
                raise DataError(f"{self.path}: the stream ended at frame {self.offset + held} of {self.length}")
            self.buffer = chunk if self.buffer is None else np.concatenate([self.buffer, chunk])
        return self.buffer[:stop - start]  # (stop - start, H, W, 3)

    def close(self) -> None:
        self.chunks.close()  # closes the container even when a window failed


class _StreamSource:
    """The dataset's source protocol (``rate``, ``load``, ``length``) over one streamed video."""

    def __init__(self, frames: _ForwardFrames, rate: float) -> None:
        self.frames, self.rate = frames, rate

    def load(self, video_id: str) -> _ForwardFrames:
        return self.frames

    def length(self, video_id: str) -> int:
        return len(self.frames)


def detect_video(model: nn.Module, path: Path, video_id: str, meta: VideoMeta, settings: DetectSettings) -> dict:
    """One video's results dict ``{"results": {video_id: [...]}}``, as `eval` would give it."""
    data = settings.experiment.data
    chunks = stream_video(path, fps=settings.rate, size=data.frame_size, crop=data.frame_size,
                          chunk=data.test_stride or max(1, data.window // 2))
    frames = _ForwardFrames(chunks, num_output_frames(meta.duration, settings.rate), path)
    video = Annotations(videos={video_id: VideoInfo(video_id, "detect", meta.duration, (), settings.rate)},
                        classes=settings.classes, source=str(path))
    try:
        dataset = make_dataset(settings.experiment, video, _StreamSource(frames, settings.rate), train=False,
                               feature_stride=model.feature_stride)
        windows = predict_windows(model, dataset, settings.eval)
    finally:
        frames.close()
    return results_from_windows(windows, video, settings.rate, settings.eval)


def video_ids(videos: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """{file stem: path}; two inputs with one stem would overwrite each other's results."""
    ids: dict[str, Path] = {}
    for video in map(Path, videos):
        if video.stem in ids:
            raise BlockdropError(f"{video}: video id {video.stem!r} is also the id of {ids[video.stem]} "
                                 f"(ids are file stems; rename one)")
        ids[video.stem] = video
    if not ids:
        raise BlockdropError("no video files given")
    return ids


def resolve_device(name: str | None) -> torch.device:
    """``--device``, default the GPU when there is one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BlockdropError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BlockdropError(f"--device {name}: CUDA is not available on this machine")
    return device


def checkpoint_builder(checkpoint: Path) -> dict:
    """The builder a saved detector carries, read from its metadata alone (no weights)."""
    return read_compressed_metadata(check_model_file(checkpoint, "--checkpoint")).builder


def probe_videos(paths: dict[str, Path]) -> dict[str, VideoMeta]:
    """Every file's headers; the bad ones are one error naming them all (as the media check does)."""
    metas, bad = {}, []
    for video_id, path in paths.items():
        try:
            metas[video_id] = probe_video(path)
        except DataError as err:
            bad.append(" ".join(str(err).split()))
    if len(bad) > 1:
        raise DataError(f"{len(bad)} bad video files: {'; '.join(bad)}")
    if bad:
        raise DataError(bad[0])
    return metas


def check_rate(settings: DetectSettings, metas: dict[str, VideoMeta], paths: dict[str, Path]) -> None:
    """Refuse a decode rate at which a window spans less than one frame of a video: each frame would
    be repeated in many windows, and the work would grow with the rate for nothing."""
    window = settings.experiment.data.window
    video_id = max(metas, key=lambda v: settings.rate / metas[v].fps)
    source = metas[video_id].fps
    if window / settings.rate < 1 / source:
        raise ConfigError(f"--fps {settings.rate:g}: a window of {window} frames would span "
                          f"{1000 * window / settings.rate:.2g} ms, less than one frame of {paths[video_id]} "
                          f"({source:g} fps, {1000 / source:.3g} ms a frame); use at most {window * source:g}")


def detect_videos(videos: Sequence[str | os.PathLike], checkpoint: str | os.PathLike, *, fps: float | None = None,
                  device: str | None = None, min_score: float | None = None,
                  warn: Callable[[str], None] | None = None) -> dict:
    """Detections of a saved video detector on each file: ``{"results": {stem: [{"segment": [s, e],
    "label": name, "score": p}, ...]}}``, segments in seconds, each video's sorted by score.

    Every file is probed before the model runs, so bad ones fail fast, all named in one error; a
    ``fps`` at which a window spans less than one frame of a video is refused.
    """
    checkpoint = Path(checkpoint)
    paths = video_ids(videos)
    metas = probe_videos(paths)
    notes: list[str] = []  # told only once the rate is known to be usable
    settings = detect_settings(checkpoint_builder(checkpoint), checkpoint, fps=fps, min_score=min_score,
                               warn=notes.append)
    check_rate(settings, metas, paths)
    for note in notes:
        (warn or _warn)(note)
    target = resolve_device(device)
    model, _ = load_detector(checkpoint, "--checkpoint")  # only now are weights read: every check above is cheap
    model.to(target)
    results = {}
    for video_id, path in paths.items():
        results.update(detect_video(model, path, video_id, metas[video_id], settings)["results"])
    return {"results": results}


def plot_detections(results: dict, path: str | os.PathLike, videos: Sequence[str | os.PathLike],
                    checkpoint: str | os.PathLike, *, ground_truth: Annotations | None = None) -> Path:
    """``detect_videos``' results as a timeline PNG (recipes/timeline.py), each video's x axis its
    duration, lanes in the checkpoint's class order."""
    durations = {video_id: probe_video(p).duration for video_id, p in video_ids(videos).items()}
    classes = checkpoint_builder(Path(checkpoint))["classes"]
    return plot_timeline(results, path, durations=durations, classes=classes, ground_truth=ground_truth)
