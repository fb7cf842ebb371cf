"""OpenTAD/ActivityNet annotation files: load, validate, presets, save.

One JSON file describes a whole dataset::

    {"database": {video_id: {"subset": str, "duration": seconds,
                             "annotations": [{"segment": [start_s, end_s], "label": str}],
                             "fps": optional, "label_id": optional}},
     "classes": optional [str], "taxonomy": optional ActivityNet taxonomy}

Loading reads the caller's dict and never writes to it: the result is built from fresh
frozen objects, so a dataset cannot corrupt ground truth in place (a defect of the
authors' release). Every problem raises ``AnnotationError`` with one line naming the
file, the video id and the field. See docs/data-format.md for the decisions.

Segments are kept as written, those past their video's duration included: ActionFormer's and
OpenTAD's evaluators count them as ground truth (ActionFormer's THUMOS14 file has 30 such
segments in 5 videos), so a reported mAP depends on keeping them. Training cannot see them:
``Annotations.for_training()`` drops the segments that start at or after the duration and
clips those that end after it, and counts both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from blockdrop.core.errors import AnnotationError
from blockdrop.core.fileio import atomic_path

# An end this far past the duration is float noise (fps rounding), clipped without a note.
OVERSHOOT_TOLERANCE_S = 1e-3

THUMOS14_CLASSES = (
    "BaseballPitch", "BasketballDunk", "Billiards", "CleanAndJerk", "CliffDiving",
    "CricketBowling", "CricketShot", "Diving", "FrisbeeCatch", "GolfSwing",
    "HammerThrow", "HighJump", "JavelinThrow", "LongJump", "PoleVault",
    "Shotput", "SoccerPenalty", "TennisSwing", "ThrowDiscus", "VolleyballSpiking",
)


@dataclass(frozen=True)
class Segment:
    """One ground-truth action instance, times in seconds."""

    start: float
    end: float
    label: str


@dataclass(frozen=True)
class VideoInfo:
    video_id: str
    subset: str
    duration: float
    segments: tuple[Segment, ...]
    fps: float | None = None


@dataclass(frozen=True)
class Trimmed:
    """What ``Annotations.for_training`` changed: segments dropped (they start at or after their
    video's duration) and clipped (they end after it, by more than OVERSHOOT_TOLERANCE_S)."""

    dropped: int
    clipped: int

    def as_dict(self) -> dict:
        return {"dropped_past_duration": self.dropped, "clipped_to_duration": self.clipped}


@dataclass(frozen=True)
class Annotations:
    """A loaded, validated annotation file. Treat ``videos`` as read-only.

    ``notes`` lists everything loading changed or found on purpose (segments past the duration,
    dropped videos or labels, duplicates kept), so nothing is altered silently. ``trimmed`` is
    None for the segments as written, else what ``for_training`` changed.
    """

    videos: dict[str, VideoInfo]
    classes: tuple[str, ...]
    source: str | None = None
    notes: tuple[str, ...] = ()
    trimmed: Trimmed | None = None

    def past_duration(self) -> list[tuple[str, int, Segment]]:
        """(video id, index, segment) of every segment that ends past its video's duration (beyond
        float noise) or starts at or after it, in file order."""
        return [(vid, i, seg) for vid, info in self.videos.items() for i, seg in enumerate(info.segments)
                if seg.start >= info.duration or seg.end > info.duration + OVERSHOOT_TOLERANCE_S]

    def for_training(self) -> Annotations:
        """The segments training can see: those that start at or after their video's duration are
        dropped, those that end after it end there (float-noise overshoots are clipped uncounted).
        Evaluation keeps every segment as written, as ActionFormer's and OpenTAD's evaluators do."""
        videos, dropped, clipped = {}, 0, 0
        for vid, info in self.videos.items():
            kept = []
            for seg in info.segments:
                if seg.start >= info.duration:
                    dropped += 1
                    continue
                clipped += seg.end > info.duration + OVERSHOOT_TOLERANCE_S
                kept.append(replace(seg, end=min(seg.end, info.duration)))
            videos[vid] = replace(info, segments=tuple(kept))
        note = (f"training: {dropped} segment(s) that start at or after their video's duration dropped, "
                f"{clipped} that end after it clipped")
        notes = self.notes + ((note,) if dropped or clipped else ())
        return replace(self, videos=videos, notes=notes, trimmed=Trimmed(dropped, clipped))

    def subset(self, *names: str) -> Annotations:
        """The videos of the named subsets; classes are kept so label indices stay stable."""
        present = {v.subset for v in self.videos.values()}
        unknown = [n for n in names if n not in present]
        if not names or unknown:
            raise AnnotationError(
                f"{self.source or '<annotations>'}: field 'subset': unknown subset(s) {unknown or list(names)}; "
                f"available: {sorted(present)}")
        wanted = set(names)
        videos = {vid: info for vid, info in self.videos.items() if info.subset in wanted}
        return replace(self, videos=videos)

    def class_index(self, label: str) -> int:
        try:
            return self.classes.index(label)
        except ValueError:
            raise AnnotationError(f"{self.source or '<annotations>'}: field 'label': unknown class {label!r}") from None

    def to_json(self) -> dict:
        """A fresh JSON-ready dict in the same convention; loading it gives equal videos."""
        database = {}
        for vid, info in self.videos.items():
            entry = {"subset": info.subset, "duration": info.duration,
                     "annotations": [{"segment": [s.start, s.end], "label": s.label} for s in info.segments]}
            if info.fps is not None:
                entry["fps"] = info.fps
            database[vid] = entry
        return {"classes": list(self.classes), "database": database}


@dataclass(frozen=True)
class _SubsetRule:
    """THUMOS14 ids name their split; files disagree on the subset word, so the id decides."""

    prefix: str
    subset: str
    aliases: frozenset[str]  # lower-case file subset names consistent with this split


@dataclass(frozen=True)
class Preset:
    name: str
    classes: tuple[str, ...] | None  # None: taken from the file (taxonomy, classes or labels)
    num_classes: int
    subsets: tuple[str, ...]
    ignored_labels: frozenset[str] = frozenset()
    subset_rules: tuple[_SubsetRule, ...] = ()


def get_preset(name: str) -> Preset:
    """The named dataset convention; built on call so there is no module-level mutable state."""
    if name == "thumos14":
        # No video is left out: ActionFormer's evaluator scores video_test_0000270 and video_test_0001496
        # as its file has them (OpenTAD's file omits 270), and so must ours to report the same mAP.
        return Preset(
            name="thumos14", classes=THUMOS14_CLASSES, num_classes=20, subsets=("validation", "test"),
            ignored_labels=frozenset({"Ambiguous"}),
            subset_rules=(
                _SubsetRule("video_validation_", "validation", frozenset({"training", "validation"})),
                _SubsetRule("video_test_", "test", frozenset({"validation", "test"})),
            ))
    if name == "activitynet13":
        return Preset(name="activitynet13", classes=None, num_classes=200,
                      subsets=("training", "validation", "testing"))
    raise AnnotationError(f"field 'preset': unknown preset {name!r}; choose 'thumos14' or 'activitynet13'")


def _fail(where: str, video_id: str | None, field_name: str, problem: str) -> AnnotationError:
    video = f"video {video_id!r}: " if video_id is not None else ""
    return AnnotationError(f"{where}: {video}field {field_name!r}: {problem}")


def _number(value, where, video_id, field_name) -> float:
    # bool is an int subclass in Python but never a time; NaN/inf parse from JSON but are not times.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(where, video_id, field_name, f"expected a finite number, got {value!r}")
    return float(value)


def _read(source) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return source, "<annotations dict>"
    where = str(source)
    try:
        with open(source, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise AnnotationError(f"{where}: file not found") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{where}: cannot read: {e}") from None
    if not isinstance(raw, dict):
        raise _fail(where, None, "database", f"top level must be an object, got {type(raw).__name__}")
    return raw, where


def _taxonomy_leaves(taxonomy, where) -> tuple[str, ...]:
    """ActivityNet taxonomy: the classes are the nodes that are nobody's parent."""
    if not isinstance(taxonomy, list):
        raise _fail(where, None, "taxonomy", "expected a list of nodes")
    for i, node in enumerate(taxonomy):
        if not isinstance(node, dict) or not isinstance(node.get("nodeName"), str) or "nodeId" not in node:
            raise _fail(where, None, f"taxonomy[{i}]", "expected an object with 'nodeName' and 'nodeId'")
    parents = {node.get("parentId") for node in taxonomy}
    return tuple(sorted({n["nodeName"] for n in taxonomy if n["nodeId"] not in parents}))


def _declared_classes(raw: dict, preset: Preset | None, where: str) -> tuple[str, ...] | None:
    """Class order fixed before reading labels: preset, else file 'classes', else taxonomy."""
    declared = None
    if "classes" in raw:
        declared = raw["classes"]
        if (not isinstance(declared, list) or not all(isinstance(c, str) and c for c in declared)
                or len(set(declared)) != len(declared)):
            raise _fail(where, None, "classes", "expected a list of distinct non-empty strings")
        declared = tuple(declared)
    elif raw.get("taxonomy"):  # OpenTAD's thumos_14_anno.json has an empty "taxonomy": {}
        declared = _taxonomy_leaves(raw["taxonomy"], where)
    if declared is not None and not declared:
        raise _fail(where, None, "classes", "empty class set")
    if preset is not None and preset.classes is not None:
        if declared is not None and set(declared) != set(preset.classes):
            extra = sorted(set(declared) ^ set(preset.classes))
            raise _fail(where, None, "classes", f"differ from the {preset.name} classes: {extra}")
        declared = preset.classes
    return declared


def _resolve_subset(raw_subset, video_id, preset, allowed, where) -> str:
    if not isinstance(raw_subset, str) or not raw_subset:
        raise _fail(where, video_id, "subset", f"expected a non-empty string, got {raw_subset!r}")
    name = raw_subset
    if preset is not None:
        name = raw_subset.lower()
        for rule in preset.subset_rules:
            if video_id.startswith(rule.prefix):
                if name not in rule.aliases:
                    raise _fail(where, video_id, "subset",
                                f"{raw_subset!r} contradicts the video id (expected one of {sorted(rule.aliases)})")
                name = rule.subset
                break
    if allowed is not None and name not in allowed:
        raise _fail(where, video_id, "subset", f"unknown subset {raw_subset!r}; allowed: {list(allowed)}")
    return name


@dataclass
class _Reader:
    """Per-load state: where errors point, the checks to apply, and the notes being collected."""

    where: str
    overflow: str
    known: frozenset[str] | None  # declared classes; None: any label (classes come from labels)
    preset: Preset | None
    allowed: tuple[str, ...] | None
    notes: list[str] = field(default_factory=list)

    def video(self, vid, entry) -> VideoInfo:
        where = self.where
        if not isinstance(vid, str) or not vid:
            raise _fail(where, None, "database", f"video ids must be non-empty strings, got {vid!r}")
        if not isinstance(entry, dict):
            raise _fail(where, vid, "database", "expected an object per video")
        for key in ("subset", "duration", "annotations"):
            if key not in entry:
                raise _fail(where, vid, key, "missing")
        subset = _resolve_subset(entry["subset"], vid, self.preset, self.allowed, where)
        duration = _number(entry["duration"], where, vid, "duration")
        if duration <= 0:
            raise _fail(where, vid, "duration", f"must be positive, got {duration}")
        fps = None
        if entry.get("fps") is not None:
            fps = _number(entry["fps"], where, vid, "fps")
            if fps <= 0:
                raise _fail(where, vid, "fps", f"must be positive, got {fps}")
        if not isinstance(entry["annotations"], list):
            raise _fail(where, vid, "annotations", "expected a list")
        segments, seen = [], {}
        for i, item in enumerate(entry["annotations"]):
            seg = self.segment(vid, i, item, duration)
            if seg is None:
                continue
            if seg in seen:  # kept: the evaluator counts duplicates; noted so it is not silent
                self.notes.append(f"{vid}: annotations[{i}] duplicates annotations[{seen[seg]}] (kept)")
            seen.setdefault(seg, i)
            segments.append(seg)
        return VideoInfo(vid, subset, duration, tuple(segments), fps)

    def segment(self, vid, i, item, duration) -> Segment | None:
        where, name = self.where, f"annotations[{i}]"
        if not isinstance(item, dict):
            raise _fail(where, vid, name, "expected an object")
        for key in ("segment", "label"):
            if key not in item:
                raise _fail(where, vid, f"{name}.{key}", "missing")
        label, seg = item["label"], item["segment"]
        if not isinstance(label, str) or not label:
            raise _fail(where, vid, f"{name}.label", f"expected a non-empty string, got {label!r}")
        label_id = item.get("label_id")
        if label_id is not None and (isinstance(label_id, bool) or not isinstance(label_id, int)):
            raise _fail(where, vid, f"{name}.label_id", f"expected an integer, got {label_id!r}")
        if not isinstance(seg, (list, tuple)) or len(seg) != 2:
            raise _fail(where, vid, f"{name}.segment", f"expected [start, end], got {seg!r}")
        start, end = (_number(x, where, vid, f"{name}.segment") for x in seg)
        end = self._checked_end(vid, f"{name}.segment", start, end, duration)
        if self.preset is not None and label in self.preset.ignored_labels:
            self.notes.append(f"{vid}: {name} label {label!r} ignored by the {self.preset.name} preset")
            return None
        if self.known is not None and label not in self.known:
            raise _fail(where, vid, f"{name}.label", f"unknown class {label!r}")
        return Segment(start, end, label)

    def _checked_end(self, vid, name, start, end, duration) -> float:
        if start < 0:
            raise _fail(self.where, vid, name, f"negative start {start}")
        if end <= start:
            raise _fail(self.where, vid, name, f"end {end} <= start {start}")
        if start >= duration or end > duration + OVERSHOOT_TOLERANCE_S:
            where = "starts at or after" if start >= duration else "ends past"
            if self.overflow == "reject":
                raise _fail(self.where, vid, name, f"[{start}, {end}] s {where} the duration {duration} s")
            self.notes.append(f"{vid}: {name} [{start}, {end}] s {where} the duration {duration} s "
                              f"(kept for evaluation; training drops or clips it)")
        return end


def _final_classes(declared, videos, preset, where) -> tuple[str, ...]:
    classes = declared
    if classes is None:
        classes = tuple(sorted({s.label for v in videos.values() for s in v.segments}))
    if not classes:
        raise _fail(where, None, "classes", "empty class set (no classes, taxonomy or labelled segments)")
    if preset is not None and len(classes) != preset.num_classes:
        raise _fail(where, None, "classes", f"the {preset.name} preset expects {preset.num_classes} classes, "
                                            f"found {len(classes)}")
    return classes


def load_annotations(path_or_dict, *, preset: str | None = None, overflow: str = "keep",
                     subsets=None) -> Annotations:
    """Load and validate an annotation file (path) or an already-parsed dict.

    preset: "thumos14" or "activitynet13" fixes class order and subset names.
    overflow: "keep" keeps segments past their video's duration as written (noted; what the
    evaluators score), "reject" makes them an error. ``Annotations.for_training()`` gives what
    training can see.
    subsets: subset names a video may have (after the preset's mapping); others error.
    """
    if overflow not in ("keep", "reject"):
        raise AnnotationError(f"field 'overflow': expected 'keep' or 'reject', got {overflow!r}")
    spec = get_preset(preset) if preset is not None else None
    raw, where = _read(path_or_dict)
    allowed = tuple(subsets) if subsets is not None else None
    if spec is not None:
        bad = [s for s in (allowed or ()) if s not in spec.subsets]
        if bad:
            raise _fail(where, None, "subsets", f"{bad} are not {spec.name} subsets {list(spec.subsets)}")
        allowed = allowed or spec.subsets
    database = raw.get("database")
    if not isinstance(database, dict):
        problem = "missing" if database is None else "expected an object of videos"
        raise _fail(where, None, "database", problem)
    declared = _declared_classes(raw, spec, where)
    known = None if declared is None else frozenset(declared)
    reader = _Reader(where, overflow, known, spec, allowed)
    videos = {}
    for vid, entry in database.items():
        videos[vid] = reader.video(vid, entry)
    classes = _final_classes(declared, videos, spec, where)
    source = None if isinstance(path_or_dict, Mapping) else where
    return Annotations(videos, classes, source, tuple(reader.notes))


def save_annotations(annotations: Annotations, path) -> Path:
    """Write ``annotations.to_json()`` atomically: a temp file in the same folder, then a rename,
    so a crash or error never leaves a half-written file at ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(annotations.to_json(), f, indent=1)
    return path
