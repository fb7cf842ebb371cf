"""Video files as arrays: probe, decode with fps resampling, resize/crop, write.

Decoding streams frames through PyAV (its bundled FFmpeg), so the original
full-resolution video is never held in memory: each frame is resized by
swscale as it is decoded and only the frames an output time needs are kept.

Resampling follows the presentation times in the file, not an assumed constant
frame rate: output frame ``i`` (time ``t = i / fps``) is the latest decoded frame
whose time is ``<= t``. The number of output frames is the number of ``t`` in
``[0, duration)``, where ``duration`` is the stream's recorded duration, so
``VideoSource.length`` can answer from metadata alone and agree with ``load``.

``decode_video`` returns the whole video as one array (training, ``eval``); ``stream_video``
yields the same frames chunk by chunk for videos of any length (``blockdrop detect``).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from blockdrop.core.errors import DataError
from blockdrop.core.fileio import atomic_path

# Frame times and output times are compared with this slack (seconds), far below any frame period,
# so that 30 / 25 and a frame stamped 1.2 s are treated as equal despite float rounding.
_TIME_EPS = 1e-6


@dataclass(frozen=True)
class VideoMeta:
    """What a file says about its first video stream (duration in seconds)."""

    fps: float
    num_frames: int
    duration: float
    width: int
    height: int


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise DataError(f"{path}: cannot open video ({err})") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: no video stream")
    return container


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _count_packets(container, stream) -> int:
    """Demux (no decode) to count frames when the header does not say."""
    return sum(1 for packet in container.demux(stream) if packet.size > 0)


def probe_video(path: str | os.PathLike) -> VideoMeta:
    """Read fps, frame count, duration and size from the file's headers (no decoding)."""
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            num_frames = _count_packets(container, stream)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = num_frames / fps if fps > 0 else 0.0
        width, height = stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, OSError) as err:
        raise DataError(f"{path}: cannot read video headers ({err})") from None
    finally:
        container.close()
    if fps <= 0 or duration <= 0:
        raise DataError(f"{path}: video stream has no frame rate or duration")
    return VideoMeta(fps=fps, num_frames=num_frames, duration=duration, width=width, height=height)


def num_output_frames(duration: float, fps: float) -> int:
    """How many output times ``i / fps`` fall in ``[0, duration)``."""
    return max(0, math.ceil(duration * fps - _TIME_EPS))


def _resized_shape(height: int, width: int, size: int | tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) after resizing: ``size`` is the short side (aspect kept) or an explicit (H, W)."""
    if size is None:
        return height, width
    if isinstance(size, int):
        scale = size / min(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))
    return int(size[0]), int(size[1])


def _crop_box(shape: tuple[int, int], crop: int | tuple[int, int] | None, path: Path) -> tuple[slice, slice]:
    height, width = shape
    if crop is None:
        return slice(None), slice(None)
    ch, cw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    if ch > height or cw > width:
        raise DataError(f"{path}: crop {ch}x{cw} is larger than the resized frame {height}x{width}")
    top, left = (height - ch) // 2, (width - cw) // 2
    return slice(top, top + ch), slice(left, left + cw)


def _timed_frames(container, stream) -> Iterator[tuple[float, av.VideoFrame]]:
    """Decoded frames with their presentation time relative to the stream start (seconds)."""
    start = None
    if stream.start_time is not None and stream.time_base is not None:
        start = float(stream.start_time * stream.time_base)
    period = 1.0 / _stream_fps(stream) if _stream_fps(stream) > 0 else 0.0
    last = None
    for frame in container.decode(stream):
        time = frame.time
        if time is None:  # no pts: assume the nominal frame period after the previous frame
            time = (last + period) if last is not None else (start or 0.0)
        if start is None:
            start = time
        last = time
        yield time - start, frame


def decode_video(
    path: str | os.PathLike,
    *,
    fps: float | None = None,
    size: int | tuple[int, int] | None = None,
    crop: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode a video to ``(T, H, W, 3)`` uint8 RGB, optionally resampled, resized and centre-cropped.

    ``fps=None`` keeps every decoded frame. Otherwise ``T = ceil(duration * fps)`` and frame ``i`` is
    the latest source frame shown at or before ``i / fps`` (frames are repeated or skipped as needed).
    """
    path = Path(path)
    if fps is not None and not fps > 0:
        raise DataError(f"{path}: target fps must be positive, got {fps}")
    meta = probe_video(path)
    container = _open(path)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    total = num_output_frames(meta.duration, fps) if fps is not None else None
    try:
        picks = _pick_frames(_timed_frames(container, stream), fps, total)
        frames = _gather(picks, _FrameConverter(size, crop, path), total)
    except (av.FFmpegError, OSError) as err:
        raise DataError(f"{path}: cannot decode video ({err})") from None
    finally:
        container.close()
    if frames is None:
        raise DataError(f"{path}: no frames could be decoded")
    return frames  # (T, H, W, 3)


# A stream whose decoded frames stop this many seconds before the recorded duration is truncated
# (a cut-off download): decode_video pads such a file with its last frame; the stream refuses it.
_TRUNCATION_SLACK = 1.0


def stream_video(
    path: str | os.PathLike,
    *,
    fps: float,
    size: int | tuple[int, int] | None = None,
    crop: int | tuple[int, int] | None = None,
    chunk: int = 64,
) -> Iterator[np.ndarray]:
    """Decode a video chunk by chunk: ``(n, H, W, 3)`` uint8 arrays with ``n <= chunk``.

    Concatenated, the chunks equal ``decode_video(path, fps=fps, size=size, crop=crop)`` (the same
    resampling, resize and crop, ``num_output_frames(duration, fps)`` frames in all), but only one
    chunk is held at a time, so memory does not grow with the video's length. Errors are raised as
    they are met: a file that cannot be opened before the first chunk, one that breaks while
    decoding, or whose frames end more than a second before its recorded duration (truncated), at
    that point.
    """
    path = Path(path)
    if not fps > 0:
        raise DataError(f"{path}: target fps must be positive, got {fps}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    meta = probe_video(path)
    total = num_output_frames(meta.duration, fps)
    container = _open(path)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    decoded = _Watched(_timed_frames(container, stream))
    convert, buffer, filled = _FrameConverter(size, crop, path), None, 0
    try:
        for frame in _pick_frames(decoded, fps, total):
            if decoded.ended and decoded.last < meta.duration - 1.0 / meta.fps - _TRUNCATION_SLACK:
                raise DataError(f"{path}: truncated: frames end at {decoded.last:.2f} s of the "
                                f"{meta.duration:.2f} s its header records")
            array = convert(frame)
            if buffer is None:
                buffer = np.empty((min(chunk, total), *array.shape), np.uint8)
            buffer[filled] = array
            filled += 1
            if filled == len(buffer):
                yield buffer
                buffer, filled = np.empty_like(buffer), 0  # a new array: the caller may keep the last
    except (av.FFmpegError, OSError) as err:
        raise DataError(f"{path}: cannot decode video ({err})") from None
    finally:
        container.close()
    if buffer is None:
        raise DataError(f"{path}: no frames could be decoded")
    if filled:
        yield buffer[:filled]


class _Watched:
    """Passes (time, frame) pairs through, remembering the last time and whether they ran out."""

    def __init__(self, timed_frames) -> None:
        self.timed_frames, self.last, self.ended = timed_frames, 0.0, False

    def __iter__(self):
        for time, frame in self.timed_frames:
            self.last = time
            yield time, frame
        self.ended = True


def _pick_frames(timed_frames, fps: float | None, total: int | None) -> Iterator:
    """For output i = 0 .. total - 1, yield the latest frame whose time is <= i / fps.

    Output times before the first frame show the first frame; the last frame stays on screen
    until the end. ``fps=None`` yields every frame as it comes.
    """
    previous, emitted = None, 0
    for time, frame in timed_frames:
        if fps is None:
            yield frame
            continue
        # Every output time before this frame's time is still showing the previous frame.
        while emitted < total and emitted / fps < time - _TIME_EPS:
            yield previous if previous is not None else frame
            emitted += 1
        if emitted >= total:
            return
        previous = frame
    if fps is not None and previous is not None:
        for _ in range(total - emitted):
            yield previous


def _gather(picks, convert, total: int | None) -> np.ndarray | None:
    """Convert picked frames into one (T, H, W, 3) array; None if there were none.

    With a known count the array is allocated once and filled, avoiding np.stack's second copy.
    """
    if total is None:
        arrays = [convert(frame) for frame in picks]
        return np.stack(arrays) if arrays else None
    out = None
    for index, frame in enumerate(picks):
        array = convert(frame)
        if out is None:
            out = np.empty((total, *array.shape), np.uint8)
        out[index] = array
    return out


class _FrameConverter:
    """Resize (swscale, area filter) and centre-crop one decoded frame; repeats reuse the last array."""

    def __init__(self, size, crop, path: Path) -> None:
        self.size, self.crop, self.path = size, crop, path
        self.geometry = None  # ((H, W), (rows, cols)), fixed by the first frame
        self.last = None  # (frame, array): the frame object is kept so identity cannot be reused

    def __call__(self, frame) -> np.ndarray:
        if self.last is not None and self.last[0] is frame:
            return self.last[1]
        if self.geometry is None:
            shape = _resized_shape(frame.height, frame.width, self.size)
            self.geometry = shape, _crop_box(shape, self.crop, self.path)
        (height, width), (rows, cols) = self.geometry
        rgb = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")
        array = np.ascontiguousarray(rgb[rows, cols])  # (H, W, 3)
        self.last = (frame, array)
        return array


def _encoder(codec: str, path) -> str:
    """The requested encoder if this FFmpeg build has it. Only the default, libx264, falls back
    (to MPEG-4 part 2, always built in); a codec the caller named explicitly is never swapped."""
    try:
        av.Codec(codec, "w")
        return codec
    except (av.FFmpegError, ValueError):
        if codec == "libx264":
            return "mpeg4"
        raise DataError(f"{path}: codec {codec!r} cannot encode with this FFmpeg build") from None


# crf 18 is visually lossless; "veryfast" costs ~1/3 of the CPU of "medium" for slightly larger files.
_DEFAULT_OPTIONS = {"libx264": {"crf": "18", "preset": "veryfast"}}


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    *,
    codec: str = "libx264",
    options: Mapping[str, str] | None = None,
) -> Path:
    """Write ``(T, H, W, 3)`` uint8 RGB frames as a playable yuv420p video, atomically.

    The default ``libx264`` falls back to ``mpeg4`` (built into every FFmpeg) when this build lacks
    it; any other codec that cannot encode is an error.
    yuv420p halves chroma resolution, so H and W must be even. The file is written next to its
    destination under a temporary name and moved into place, so a crash never leaves half a video.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise DataError(f"{path}: expected non-empty (T, H, W, 3) uint8 frames, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise DataError(f"{path}: yuv420p needs even frame sizes, got {height}x{width}")
    if not fps > 0:
        raise DataError(f"{path}: fps must be positive, got {fps}")
    encoder = _encoder(codec, path)
    try:
        with atomic_path(path, suffix=path.suffix or ".mp4") as tmp:
            _encode(tmp, frames, fps, encoder, options)
    except (av.FFmpegError, OSError) as err:
        raise DataError(f"{path}: cannot write video ({err})") from None
    return path


def _encode(tmp: Path, frames: np.ndarray, fps: float, encoder: str, options) -> None:
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if encoder == "mpeg4":  # no CRF: give it a generous bit rate (~1 bit per pixel)
            stream.bit_rate = int(frames.shape[1] * frames.shape[2] * float(rate))
        stream.options = dict(options if options is not None else _DEFAULT_OPTIONS.get(encoder, {}))
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))  # flush delayed frames


class VideoSource:
    """A folder of videos served as ``(T, H, W, 3)`` uint8 arrays at ``rate`` frames per second.

    Decoding is the slow part of training on video, so decoded arrays can be cached as ``.npy`` in
    ``cache_dir``; the cache key covers the file (path, mtime, size) and the decode arguments, so a
    changed video or a different fps/size never serves a stale array.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        fps: float,
        size: int | tuple[int, int] | None,
        crop: int | tuple[int, int] | None = None,
        suffix: str = ".mp4",
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if not fps > 0:
            raise DataError(f"{root}: video source fps must be positive, got {fps}")
        self.root = Path(root)
        self.rate = float(fps)
        self.size = size
        self.crop = crop
        self.suffix = suffix
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def path(self, video_id: str) -> Path:
        path = self.root / f"{video_id}{self.suffix}"
        if not path.is_file():
            raise DataError(f"{path}: video file not found for video {video_id!r}")
        return path

    def _cache_path(self, path: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        stat = path.stat()
        key = repr((str(path.resolve()), stat.st_mtime_ns, stat.st_size, self.rate, self.size, self.crop))
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{path.stem}-{digest}.npy"

    def load(self, video_id: str) -> np.ndarray:
        """Decoded frames ``(T, H, W, 3)`` uint8, from the cache when it is fresh."""
        path = self.path(video_id)
        cached = self._cache_path(path)
        if cached is not None and cached.is_file():
            try:
                return np.load(cached)
            except (OSError, ValueError):
                pass  # a damaged cache entry is rebuilt below
        frames = decode_video(path, fps=self.rate, size=self.size, crop=self.crop)
        if cached is not None:
            _save_npy_atomic(cached, frames)
        return frames

    def length(self, video_id: str) -> int:
        """Number of frames ``load`` returns, from the headers (no decoding)."""
        return num_output_frames(probe_video(self.path(video_id)).duration, self.rate)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
