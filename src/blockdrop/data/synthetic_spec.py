"""What a synthetic benchmark render holds: the spec shared by the dataset writer and the scene.

`blockdrop.data.synthetic` writes the dataset from a `SyntheticSpec`; `blockdrop.data.synthetic_scene`
draws one video of it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from blockdrop.core.errors import ConfigError

CLASSES = ("blink", "bounce", "grow", "orbit", "rotate", "slide")
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
