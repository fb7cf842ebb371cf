"""The scene of one synthetic video: motion patterns, actors and distractors, background, drawing.

`render_video(rng, spec, num_frames)` returns the frames and the action annotations of one video
of the benchmark that `blockdrop.data.synthetic` writes to disk (see that module for what the
videos show). Vectorized numpy over chunks of frames; everything random comes from ``rng``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockdrop.data.synthetic_spec import SyntheticSpec

_CHUNK = 64  # frames drawn at once; bounds memory at large sizes


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _envelope(t: np.ndarray, start: float, end: float, ramp_in: float, ramp_out: float) -> np.ndarray:
    """Action strength over time (T,): 0 -> 1 -> 0, crossing one half exactly at start and end."""
    rise = _smoothstep((t - start + ramp_in / 2) / ramp_in)
    fall = _smoothstep((end + ramp_out / 2 - t) / ramp_out)
    return rise * fall


def _pattern(kind: str, rng: np.random.Generator, t: np.ndarray, env: np.ndarray, start: float,
             size: int, fps: float) -> dict[str, np.ndarray]:
    """Offsets an action adds to its object's track, each (T,): dx, dy, angle, scale, blink."""
    tau = t - start
    zero = np.zeros_like(t)
    out = {"dx": zero, "dy": zero, "angle": zero, "scale": zero, "blink": zero}
    if kind == "slide":  # horizontal back-and-forth at constant speed
        amp, freq = rng.uniform(0.12, 0.25) * size, rng.uniform(0.3, 0.7)
        out["dx"] = env * amp * (2 / np.pi) * np.arcsin(np.sin(2 * np.pi * freq * tau))
    elif kind == "bounce":  # vertical hops
        amp, freq = rng.uniform(0.12, 0.22) * size, rng.uniform(0.8, 1.5)
        out["dy"] = -env * amp * np.abs(np.sin(np.pi * freq * tau))
    elif kind == "orbit":  # circling around its resting place
        amp, freq = rng.uniform(0.08, 0.16) * size, rng.uniform(0.4, 0.9) * rng.choice([-1, 1])
        out["dx"] = env * amp * np.sin(2 * np.pi * freq * tau)
        out["dy"] = env * amp * (np.cos(2 * np.pi * freq * tau) - 1)
    elif kind == "rotate":  # spinning in place; integrate the rate so fading slows it smoothly
        rate = rng.uniform(0.6, 1.5) * np.pi * rng.choice([-1, 1])
        out["angle"] = np.cumsum(env * rate) / fps
    elif kind == "grow":  # pulsing size
        amp, freq = rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)
        out["scale"] = env * amp * (0.5 - 0.5 * np.cos(2 * np.pi * freq * tau))
    elif kind == "blink":  # colour flips to its complement a few times a second
        freq = rng.uniform(1.2, 2.5)
        out["blink"] = env * (np.sin(2 * np.pi * freq * tau) > 0)
    return out


def _drift(rng: np.random.Generator, t: np.ndarray, amplitude: float, max_freq: float) -> np.ndarray:
    """Smooth random wandering (T,) in [-amplitude, amplitude]: two slow sinusoids."""
    weights = rng.dirichlet([1.0, 1.0]) * amplitude
    freqs = rng.uniform(0.03, max_freq, size=2)
    phases = rng.uniform(0, 2 * np.pi, size=2)
    return (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0)



@dataclass(frozen=True)
class _Track:
    """One object's per-frame state; every array is (T,) or (T, 3) for colour."""

    shape: str  # "disc" | "square" | "bar"
    radius: float  # pixels at scale 1
    x: np.ndarray
    y: np.ndarray
    angle: np.ndarray
    scale: np.ndarray
    colour: np.ndarray  # (T, 3) in 0..1
    alpha: np.ndarray  # presence 0..1


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour (3,) from a uniform hue; the same distribution for actors and distractors.

    Its luma is pushed away from the background's (~0.42): yuv420p keeps chroma at half resolution,
    so an isoluminant small object would all but vanish after encoding.
    """
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6  # HSV -> RGB without colorsys' per-call branching
    colour = val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)
    luma = float(colour @ np.array([0.299, 0.587, 0.114]))
    if luma >= 0.42:  # brighten towards white until luma >= 0.65
        return 1 - (1 - colour) * (1 - max(luma, 0.65)) / (1 - luma)
    return colour * min(luma, 0.2) / luma  # darken towards black until luma <= 0.2


def _presence(t: np.ndarray, start: float, end: float, fade: float = 0.3) -> np.ndarray:
    return _smoothstep((t - start) / fade) * _smoothstep((end - t) / fade)


def _make_track(rng, spec: SyntheticSpec, t: np.ndarray, actions: list[tuple[str, float, float]],
                present: tuple[float, float], wander: float, max_freq: float, reach: float) -> _Track:
    """An object doing ``actions`` [(class, start, end)] while wandering ``wander`` * size.

    ``reach`` (fraction of the frame) is how far its actions may carry it from its resting place.
    """
    size, radius = spec.size, rng.uniform(*spec.object_size) * spec.size
    # A spinning disc or square barely changes; bars also appear on other objects, so a bar is no giveaway.
    shapes = ["bar"] if any(kind == "rotate" for kind, _, _ in actions) else ["disc", "square", "bar"]
    margin = (wander + reach) * size  # keeps drift plus the widest action inside the frame
    lo, hi = min(margin, size / 2), max(size - margin, size / 2)
    x = rng.uniform(lo, hi) + _drift(rng, t, wander * size, max_freq)
    y = rng.uniform(lo, hi) + _drift(rng, t, wander * size, max_freq)
    angle, scale, blink = np.full_like(t, rng.uniform(0, np.pi)), np.ones_like(t), np.zeros_like(t)
    for kind, start, end in actions:
        ramp_in, ramp_out = rng.uniform(*spec.fade, size=2).clip(max=0.8 * (end - start))
        motion = _pattern(kind, rng, t, _envelope(t, start, end, ramp_in, ramp_out), start, size, spec.fps)
        x, y = x + motion["dx"], y + motion["dy"]
        angle, scale, blink = angle + motion["angle"], scale + motion["scale"], blink + motion["blink"]
    base = _random_colour(rng)
    colour = base + blink[:, None] * ((1 - base) - base)
    return _Track(shape=str(rng.choice(shapes)), radius=radius, x=np.clip(x, 0, size), y=np.clip(y, 0, size),
                  angle=angle, scale=scale, colour=colour, alpha=_presence(t, *present))


def _schedule(rng, spec: SyntheticSpec, duration: float) -> list[list[tuple[str, float, float]]]:
    """Actions grouped by actor: separate actors may overlap; one actor's actions may be adjacent."""
    actors: list[list[tuple[str, float, float]]] = []
    low, high = np.log(spec.action_lengths)
    start, join = rng.uniform(0.5, 3.0), False
    while True:
        length = float(np.exp(rng.uniform(low, high)))
        end = start + length
        if end > duration - 0.5:
            return actors
        previous = actors[-1][-1][0] if join else None
        action = (str(rng.choice([c for c in spec.classes if c != previous])), start, end)
        if join:  # the same object switches straight to a different action
            actors[-1].append(action)
        else:
            actors.append([action])
        mode = rng.choice(["overlap", "adjacent", "gap"], p=[0.2, 0.15, 0.65])
        join = mode == "adjacent" and len(spec.classes) > 1
        if mode == "overlap":  # another object starts before this one finishes
            start = end - rng.uniform(0.3, 0.7) * length
        else:
            start = end if join else end + rng.uniform(0.5, 4.0)


def _plan_video(rng, spec: SyntheticSpec, duration: float, t: np.ndarray):
    """Tracks (in drawing order) and the annotation list of one video."""
    tracks, annotations = [], []
    for actions in _schedule(rng, spec, duration):
        lead_in, lead_out = rng.uniform(0.5, 4.0, size=2)
        present = (actions[0][1] - lead_in, actions[-1][2] + lead_out)
        tracks.append(_make_track(rng, spec, t, actions, present, wander=0.04, max_freq=0.1, reach=0.27))
        annotations += [{"segment": [round(s, 3), round(e, 3)], "label": k} for k, s, e in actions]
    minutes = duration / 60
    spans = [(-1.0, duration + 1.0)] * int(rng.integers(spec.distractors[0], spec.distractors[1] + 1))
    for _ in range(rng.poisson(spec.transients_per_minute * minutes)):
        begin = rng.uniform(-2.0, duration)
        spans.append((begin, begin + rng.uniform(3.0, 10.0)))
    for present in spans:
        bursts = []
        for _ in range(rng.poisson(spec.bursts_per_minute * minutes)):
            begin = rng.uniform(0, duration)
            bursts.append((str(rng.choice(spec.classes)), begin, begin + rng.uniform(0.2, 0.6)))
        tracks.append(_make_track(rng, spec, t, bursts, present, wander=0.2, max_freq=0.15, reach=0.12))
    order = rng.permutation(len(tracks))  # occlusion order: actors are not always on top
    annotations.sort(key=lambda a: (a["segment"][0], a["segment"][1]))
    return [tracks[i] for i in order], annotations



def _texture(rng, size: int, cells: int) -> np.ndarray:
    """Smooth random colour texture (size, size, 3): a cells x cells grid, bilinearly upsampled."""
    grid = rng.uniform(0, 1, (cells, cells, 3)).astype(np.float32)
    pos = np.linspace(0, cells - 1, size)
    lo = np.minimum(pos.astype(int), cells - 2)
    w = (pos - lo).astype(np.float32)
    interp = np.zeros((size, cells), np.float32)  # (size, cells) linear interpolation matrix
    interp[np.arange(size), lo], interp[np.arange(size), lo + 1] = 1 - w, w
    return np.einsum("ic,cdk,jd->ijk", interp, grid, interp)


@dataclass(frozen=True)
class _Background:
    """A textured background that slowly morphs between two textures and flickers in brightness."""

    first: np.ndarray  # (S, S, 3)
    second: np.ndarray  # (S, S, 3)
    grain: np.ndarray  # (S, S, 1) fixed fine texture
    morph: tuple[float, float]  # period (s), phase
    flicker: tuple[float, float]

    @classmethod
    def random(cls, rng: np.random.Generator, size: int, grain: float = 0.08) -> _Background:
        return cls(first=_texture(rng, size, 6), second=_texture(rng, size, 6),
                   grain=rng.uniform(-grain, grain, (size, size, 1)).astype(np.float32),
                   morph=(rng.uniform(15, 40), rng.uniform(0, 2 * np.pi)),
                   flicker=(rng.uniform(5, 15), rng.uniform(0, 2 * np.pi)))

    def at(self, t: np.ndarray) -> np.ndarray:
        """Frames (T, S, S, 3) float32 at times ``t`` (T,): mid grey, moderate contrast."""
        blend = 0.5 + 0.5 * np.sin(2 * np.pi * t / self.morph[0] + self.morph[1])
        light = 1 + 0.08 * np.sin(2 * np.pi * t / self.flicker[0] + self.flicker[1])
        tex = self.first + blend[:, None, None, None].astype(np.float32) * (self.second - self.first)
        return ((0.25 + 0.35 * tex + self.grain) * light[:, None, None, None]).astype(np.float32)


def _draw(frames: np.ndarray, track: _Track, rows: slice) -> None:
    """Alpha-blend one object into ``frames`` (T_chunk, S, S, 3) in place, antialiased by ~1 px.

    The mask is computed only inside the box the object occupies during this chunk.
    """
    alpha = track.alpha[rows]
    shown = np.nonzero(alpha > 1e-3)[0]
    if len(shown) == 0:
        return
    size = frames.shape[1]
    x, y, scale = (a[rows][shown].astype(np.float32) for a in (track.x, track.y, track.scale))
    extent = 1.6 * track.radius * scale.max() + 1.5  # covers every shape, any angle
    left, right = int(max(x.min() - extent, 0)), int(min(x.max() + extent + 1, size))
    top, bottom = int(max(y.min() - extent, 0)), int(min(y.max() + extent + 1, size))
    if left >= right or top >= bottom:
        return
    dx = np.arange(left, right, dtype=np.float32)[None, None, :] + 0.5 - x[:, None, None]  # (n, 1, w)
    dy = np.arange(top, bottom, dtype=np.float32)[None, :, None] + 0.5 - y[:, None, None]  # (n, h, 1)
    r = (np.float32(track.radius) * scale)[:, None, None]
    if track.shape == "disc":
        mask = np.clip(r - np.sqrt(dx * dx + dy * dy) + 0.5, 0, 1)
    else:
        half_w, half_h = (0.85 * r, 0.85 * r) if track.shape == "square" else (1.5 * r, 0.45 * r)
        angle = track.angle[rows][shown].astype(np.float32)
        cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        mask = np.clip(half_w - np.abs(u) + 0.5, 0, 1) * np.clip(half_h - np.abs(v) + 0.5, 0, 1)
    weight = (mask * alpha[shown, None, None].astype(np.float32))[..., None]  # (n, h, w, 1)
    colour = track.colour[rows][shown, None, None, :].astype(np.float32)  # (n, 1, 1, 3)
    patch = frames[shown, top:bottom, left:right]
    frames[shown, top:bottom, left:right] = patch + weight * (colour - patch)


def render_video(rng: np.random.Generator, spec: SyntheticSpec, num_frames: int) -> tuple[np.ndarray, list]:
    """One video: frames (T, S, S, 3) uint8 and its annotations (seconds)."""
    t = np.arange(num_frames) / spec.fps
    tracks, annotations = _plan_video(rng, spec, num_frames / spec.fps, t)
    background = _Background.random(rng, spec.size, spec.grain)
    video = np.empty((num_frames, spec.size, spec.size, 3), np.uint8)
    for begin in range(0, num_frames, _CHUNK):
        rows = slice(begin, min(begin + _CHUNK, num_frames))
        frames = background.at(t[rows])
        for track in tracks:
            _draw(frames, track, rows)
        frames += np.float32(spec.noise) * rng.standard_normal(frames.shape, dtype=np.float32)
        video[rows] = np.clip(frames * 255 + 0.5, 0, 255).astype(np.uint8)
    return video, annotations
