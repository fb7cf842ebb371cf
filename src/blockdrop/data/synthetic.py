"""A synthetic untrimmed-video detection benchmark, rendered as real mp4 files.

Each video shows a slowly changing textured background, distractor objects that drift all the
time (and now and then twitch briefly like an action), and *actors*: objects that idle for a
while, perform one or more actions, and leave. An action is a motion pattern, not an
appearance: the same object kinds and colours are used by actors and distractors, so a
detector must recognise how something moves over time. Action strength fades in and out
around the annotated boundaries (which sit at half strength), so boundaries are soft.

Everything is drawn with vectorized numpy over whole frame chunks (no OpenCV) and is
deterministic per seed: video ``i`` uses ``numpy.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from blockdrop.data.synthetic_scene import render_video
from blockdrop.data.video import write_video
from blockdrop.core.fileio import atomic_write_text, check_output_folder, staged_folder
from blockdrop.core.errors import ConfigError

CLASSES = ("blink", "bounce", "grow", "orbit", "rotate", "slide")
_SPLIT_SEED = 1_000_003  # second SeedSequence word for the subset shuffle, apart from video indices
_FLAGS = {"seed": "--seed", "num_videos": "--videos", "size": "--size", "fps": "--fps"}  # `blockdrop data synthetic`


@dataclass(frozen=True)
class SyntheticSpec:
    """What to render. ``None`` for seed/num_videos/size/fps means the default (the CLI passes None)."""

    seed: int | None = 0
    num_videos: int | None = 80
    size: int | None = 64  # square frames, pixels (even: yuv420p)
    fps: float | None = 10.0
    durations: tuple[float, float] = (20.0, 40.0)  # video length range, seconds
    action_lengths: tuple[float, float] = (1.0, 8.0)  # seconds, log-uniform
    classes: tuple[str, ...] = CLASSES
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train / val / test
    distractors: tuple[int, int] = (2, 4)  # always-present drifting objects per video
    transients_per_minute: float = 4.0  # extra distractors that come and go
    bursts_per_minute: float = 4.0  # per distractor: brief action-like twitches (hard negatives)
    fade: tuple[float, float] = (0.3, 1.2)  # seconds over which an action ramps in / out
    noise: float = 0.03  # per-pixel sensor noise std (intensity 0..1)
    object_size: tuple[float, float] = (0.06, 0.1)  # object radius range, fraction of the frame side
    grain: float = 0.08  # amplitude of the fixed fine background texture (intensity 0..1)

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) is None:
                object.__setattr__(self, f.name, f.default)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, problem: str) -> ConfigError:
            flag = f" ({_FLAGS[name]})" if name in _FLAGS else ""
            return ConfigError(f"synthetic spec field {name!r}{flag}: {problem}, got {getattr(self, name)!r}")

        if not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "expected a non-negative integer")
        if self.num_videos < 1:
            raise bad("num_videos", "expected at least 1 video")
        if self.size < 16 or self.size % 2:
            raise bad("size", "expected an even frame side >= 16 pixels")
        if not 1.0 <= self.fps <= 120.0:
            raise bad("fps", "expected 1..120 frames per second")
        if not 2 * self.action_lengths[1] < self.durations[0] <= self.durations[1]:
            raise bad("durations", "expected min <= max and min more than twice the longest action")
        if not 0 < self.action_lengths[0] <= self.action_lengths[1]:
            raise bad("action_lengths", "expected 0 < min <= max")
        if not self.classes or set(self.classes) - set(CLASSES) or len(set(self.classes)) != len(self.classes):
            raise bad("classes", f"expected distinct names from {CLASSES}")
        if len(self.split) != 3 or min(self.split) < 0 or sum(self.split) <= 0:
            raise bad("split", "expected three non-negative train/val/test fractions")
        if not 0 < self.object_size[0] <= self.object_size[1] <= 0.25:
            raise bad("object_size", "expected 0 < min <= max <= 0.25 (radius as a fraction of the frame)")
        if not 0 <= self.grain <= 0.25:
            raise bad("grain", "expected 0..0.25")


@dataclass(frozen=True)
class SyntheticSummary:
    out: Path
    subsets: dict[str, int]  # videos per subset
    instances: dict[str, int]  # action instances per class
    seconds_of_video: float
    size: int
    fps: float
    render_seconds: float

    def describe(self) -> str:
        split = " / ".join(f"{n} {name}" for name, n in self.subsets.items())
        per_class = ", ".join(f"{name} {n}" for name, n in self.instances.items())
        return (f"rendered {sum(self.subsets.values())} videos ({split}), {self.size}x{self.size} at "
                f"{self.fps:g} fps, {self.seconds_of_video / 60:.1f} min in {self.render_seconds:.1f} s\n"
                f"{sum(self.instances.values())} action instances: {per_class}\n"
                f"wrote {self.out / 'videos'} and {self.out / 'annotations.json'}")



def _subsets(spec: SyntheticSpec) -> list[str]:
    """Subset of each video index: a seeded shuffle cut at the split fractions."""
    n = spec.num_videos
    fractions = np.asarray(spec.split, float) / sum(spec.split)
    n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
    names = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    order = np.random.default_rng([spec.seed, _SPLIT_SEED]).permutation(n)
    return [names[rank] for rank in np.argsort(order)]


def _video_id(index: int, count: int) -> str:
    return f"synthetic_{index:0{max(4, len(str(count - 1)))}d}"


def _render_into(folder: Path, spec: SyntheticSpec) -> dict:
    """Render every video into ``folder``/videos and return the annotation database."""
    database = {}
    for index, subset in enumerate(_subsets(spec)):
        rng = np.random.default_rng([spec.seed, index])
        num_frames = round(rng.uniform(*spec.durations) * spec.fps)
        frames, annotations = render_video(rng, spec, num_frames)
        video_id = _video_id(index, spec.num_videos)
        write_video(folder / "videos" / f"{video_id}.mp4", frames, spec.fps)
        database[video_id] = {"subset": subset, "duration": num_frames / spec.fps, "fps": spec.fps,
                              "annotations": annotations}
    return database


def render_synthetic(out: str | os.PathLike, spec: SyntheticSpec | None = None, *,
                     overwrite: bool = False) -> SyntheticSummary:
    """Render ``spec`` to ``out``/videos/<id>.mp4 and ``out``/annotations.json (OpenTAD convention).

    The dataset is built in a temporary sibling folder and moved into place at the end, so an
    interrupted run or a failed overwrite never leaves a half-written dataset at ``out``.
    """
    spec = spec if spec is not None else SyntheticSpec()
    out = Path(out)
    check_output_folder(out, overwrite)
    began = time.perf_counter()
    with staged_folder(out) as tmp:
        database = _render_into(tmp, spec)
        payload = {"classes": list(spec.classes), "database": database}
        atomic_write_text(tmp / "annotations.json", json.dumps(payload, indent=1))
    return _summary(out, spec, database, time.perf_counter() - began)


def _summary(out: Path, spec: SyntheticSpec, database: dict, seconds: float) -> SyntheticSummary:
    subsets = {name: sum(v["subset"] == name for v in database.values()) for name in ("train", "val", "test")}
    instances = {name: sum(a["label"] == name for v in database.values() for a in v["annotations"])
                 for name in spec.classes}
    return SyntheticSummary(out=out, subsets=subsets, instances=instances, size=spec.size, fps=spec.fps,
                            seconds_of_video=sum(v["duration"] for v in database.values()),
                            render_seconds=seconds)
