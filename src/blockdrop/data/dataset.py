"""The torch Dataset: annotations + a per-video source -> fixed-length windows.

Train mode gives one item per video per epoch, a random crop of ``window`` input steps
(``random_truncation``). Test mode gives one item per sliding window of every video. Segments
leave here in input steps relative to the window start; the head divides by its feature stride.

Randomness is drawn from ``np.random.default_rng((seed, epoch, index))``: an item depends only
on those three numbers, never on DataLoader workers, their count or the order items are asked
for. Annotations are read, never written (the authors' release mutated them in place).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from blockdrop.data.annotations import Annotations
from blockdrop.data.windows import crop_segments, random_truncation, seconds_to_steps, sliding_windows
from blockdrop.core.errors import DataError


def _video_targets(annotations: Annotations, video_id: str, rate: float):
    """(segments (N, 2) float64 in input steps, labels (N,) int64) of one video."""
    info = annotations.videos[video_id]
    seconds = np.array([[s.start, s.end] for s in info.segments], dtype=np.float64).reshape(-1, 2)
    labels = np.array([annotations.class_index(s.label) for s in info.segments], dtype=np.int64)
    return seconds_to_steps(seconds, rate), labels


def _sequence_length(source, video_id: str) -> int:
    # Sources that can tell the length without decoding (SequenceSource) save a full load.
    length = source.length(video_id) if hasattr(source, "length") else len(source.load(video_id))
    if length < 1:
        raise DataError(f"video {video_id!r}: the source gave an empty sequence")
    return int(length)


def augment_window(inputs: torch.Tensor, kinds, rng: np.random.Generator) -> torch.Tensor:
    """Label-preserving augmentation of one video training window (T, H, W, 3), the same for
    every frame so motion is untouched: "hflip" mirrors left-right with probability 1/2;
    "channel_shuffle" permutes the colour channels at random (for data whose classes do not
    depend on colour, such as the synthetic set; not for real footage). Draws from ``rng`` only
    for the kinds asked for, in a fixed order."""
    if "hflip" in kinds and rng.random() < 0.5:
        inputs = inputs.flip(2)
    if "channel_shuffle" in kinds:
        inputs = inputs[..., torch.as_tensor(rng.permutation(3))]
    return inputs.contiguous()


TAIL_PADS = ("zeros", "repeat")


def _window_input(array, start: int, window: int, tail_pad: str = "zeros"):
    """(window, ...) tensor from array[start:start + window], padded past the end, and its (window,) mask.

    tail_pad "zeros" fills with zeros (black frames); "repeat" repeats the last step, as OpenTAD's
    LoadFrames pads its frame indices (np.pad mode "edge"). Either way the mask marks the padding
    invalid; the backbone still sees it, so the features of the last real steps depend on it (through
    the clips that straddle the end and the adapters' temporal convolution).
    uint8 video stays uint8 (normalising is the model's job, and it is 4x smaller to move);
    anything else becomes float32.
    """
    chunk = np.asarray(array[start:start + window])  # (n, ...) with n <= window
    dtype = np.uint8 if chunk.dtype == np.uint8 else np.float32
    out = np.zeros((window,) + chunk.shape[1:], dtype=dtype)
    out[:len(chunk)] = chunk
    if tail_pad == "repeat" and 0 < len(chunk) < window:
        out[len(chunk):] = chunk[-1]
    mask = np.arange(window) < len(chunk)
    return torch.from_numpy(out), torch.from_numpy(mask)


class TADDataset(Dataset):
    """Windows of ``window`` input steps with their ground truth.

    annotations: an ``Annotations`` (usually ``.subset(...)`` of one split).
    source: has ``.rate`` (input steps per second) and ``.load(video_id) -> (T, ...)`` array;
        an optional ``.length(video_id)`` avoids loading whole videos to plan test windows.
    feature_stride: input steps per backbone output step; ``window`` must be a multiple so the
        feature sequence and its mask have a whole length.
    """

    def __init__(self, annotations: Annotations, source, *, window: int, train: bool, stride: int | None = None,
                 feature_stride: int = 1, seed: int = 0, min_keep: float = 0.5, repeats: int = 1,
                 augment: tuple[str, ...] = (), tail_pad: str = "zeros"):
        if window < 1 or feature_stride < 1 or window % feature_stride:
            raise DataError(f"field 'window': {window} must be a positive multiple of "
                            f"feature_stride {feature_stride}")
        stride = max(1, window // 2) if stride is None else stride
        if not train and not 1 <= stride <= window:
            raise DataError(f"field 'stride': must be in [1, window={window}], got {stride}")
        if repeats < 1:
            raise DataError(f"field 'repeats': must be at least 1, got {repeats}")
        if seed < 0:
            raise DataError(f"field 'seed': must be non-negative, got {seed}")
        if tail_pad not in TAIL_PADS:
            raise DataError(f"field 'tail_pad': must be one of {list(TAIL_PADS)}, got {tail_pad!r}")
        self.annotations = annotations
        self.source = source
        self.rate = float(source.rate)
        self.window, self.train, self.stride = window, train, stride
        self.feature_stride, self.seed, self.min_keep = feature_stride, seed, min_keep
        self.epoch, self.repeats, self.augment, self.tail_pad = 0, repeats, tuple(augment), tail_pad
        self._targets = {vid: _video_targets(annotations, vid, self.rate) for vid in annotations.videos}
        self._items = self._plan_items()

    def _plan_items(self) -> list[tuple[str, int]]:
        """(video_id, window_start) per item; train starts are drawn in __getitem__."""
        if self.train:  # `repeats` independent random crops of every video per epoch
            return [(vid, 0) for _ in range(self.repeats) for vid in self.annotations.videos]
        items = []
        for vid in self.annotations.videos:
            length = _sequence_length(self.source, vid)
            items.extend((vid, start) for start in sliding_windows(length, self.window, self.stride))
        return items

    def set_epoch(self, epoch: int) -> None:
        """Draw new training crops: call before each epoch (DataLoader workers copy the dataset
        when an iterator starts, so this does not reach ``persistent_workers``)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        video_id, start = self._items[index]
        array = self.source.load(video_id)  # (T, ...)
        length = len(array)
        if length < 1:
            raise DataError(f"video {video_id!r}: the source gave an empty sequence")
        segments, labels = self._targets[video_id]
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            start, kept, indices = random_truncation(length, segments, self.window, rng, self.min_keep)
        else:
            kept, indices = crop_segments(segments, start, min(self.window, length - start), self.min_keep)
        inputs, mask = _window_input(array, start, self.window, self.tail_pad)
        if self.train and self.augment:
            if inputs.dim() != 4 or inputs.shape[-1] != 3:
                raise DataError(f"video {video_id!r}: augment {list(self.augment)} needs (T, H, W, 3) frames, "
                                f"got {tuple(inputs.shape)}")
            inputs = augment_window(inputs, self.augment, rng)
        return {
            "inputs": inputs,                                                    # (window, ...)
            "mask": mask,                                                        # (window,) bool
            "segments": torch.from_numpy(kept.astype(np.float32)).reshape(-1, 2),  # (N, 2) input steps
            "labels": torch.from_numpy(labels[indices]),                         # (N,) int64
            "video_id": video_id,
            "window_start": int(start),
            "rate": self.rate,
        }


def collate_windows(items: list[dict]) -> dict:
    """Batch items: inputs (B, window, ...), mask (B, window), window_start (B,) int64,
    rate (B,) float64; segments, labels and video_id stay per-item lists (N varies)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    return {
        "inputs": torch.stack([it["inputs"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "segments": [it["segments"] for it in items],
        "labels": [it["labels"] for it in items],
        "video_id": [it["video_id"] for it in items],
        "window_start": torch.tensor([it["window_start"] for it in items], dtype=torch.int64),
        "rate": torch.tensor([it["rate"] for it in items], dtype=torch.float64),
    }
