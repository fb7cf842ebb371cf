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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blockdrop.core.fileio import atomic_write_text, check_output_folder, staged_folder
from blockdrop.data.synthetic_scene import render_video
from blockdrop.data.synthetic_spec import CLASSES, SyntheticSpec
from blockdrop.data.video import write_video

__all__ = ["CLASSES", "SyntheticSpec", "SyntheticSummary", "render_synthetic"]

_SPLIT_SEED = 1_000_003  # second SeedSequence word for the subset shuffle, apart from video indices


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
