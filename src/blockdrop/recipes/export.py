"""Export a saved detector (trained or compressed) as a self-contained graph for deployment.

The checkpoint carries its own builder, so neither the config nor the uncompressed original is
needed. The exported graph maps one batch of windows to the head's raw per-point predictions:

    inputs (B, window, ...)   as the dataset gives them: uint8 frames (B, T, H, W, 3) for video
                              (normalised inside the graph), float32 (B, T, C) for sequences
    mask   (B, window) bool   valid input steps
 -> cls_logits (B, P, K)      class logits per point (sigmoid for scores)
    offsets    (B, P, 2)      (left, right) distances, in units of the point's stride
    valid      (B, P) bool    points on valid feature steps
    points     (P, 4)         [t, reg_lo, reg_hi, stride], t in feature steps

A point's segment is ``(t - left * stride, t + right * stride) * feature_stride`` input steps;
``feature_stride`` and the class names are written next to the graph (``<out>.json``), so a
deployment needs only those two files. Decoding, NMS and window merging stay in Python
(`Detector.predict`, `blockdrop.tad.postprocess`): they are data-dependent and cheap.

Formats: ``pt2`` (torch.export; load with ``torch.export.load(path).module()``) and ``onnx``
(torch's dynamo exporter; needs ``pip install 'blockdrop[export-onnx]'``). Shapes are fixed to the
batch size asked for and the config's window. Every export is loaded back and run on a test
window; outputs that differ from the eager model by more than ``tolerance`` are an error and
nothing is written.

``opentad`` writes the VideoMAE backbone (compressed or not) back to OpenTAD: a ``.pth`` holding
``{"state_dict": ...}`` under mmaction's key names with the prefix ``backbone.``, what OpenTAD's
``custom.pretrain`` reads into its ``Recognizer3D`` (mmengine's ``load_checkpoint``); the kept
blocks are renumbered 0.. in order, each with its adapter. The sidecar gives the
``VisionTransformerAdapter`` arguments to build it with (``depth``, ``adapter_index``, ``img_size``,
...). The head keeps blockdrop's names and is not converted: OpenTAD trains its own. The file is
read back by blockdrop's OpenTAD importer into a fresh backbone, whose features must equal the
model's on the test window.

Every file is written under its final name in a temporary folder next to ``out`` and moved into
place after the check, so a file refers to its companions by the names they will have. What is
already at ``out``, ``<out>.data`` or ``<out>.json`` is replaced only when it is an earlier export
(the sidecar lists it); anything else there (a user's file, a folder, a device) is refused first. An ONNX
graph holds its weights (protobuf caps a file at 2 GB); a model too large for that keeps them in
``<out>.data`` beside it. ``ExportResult.files`` lists everything written: ship those files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blockdrop.core.errors import BlockdropError
from blockdrop.core.fileio import atomic_write_text, check_output_file, temporary_beside
from blockdrop.models.checkpoints import export_mmaction_videomae, load_mmaction_videomae, opentad_backbone_args
from blockdrop.models.tokenizers import TubeletEmbed
from blockdrop.recipes.build import builder_config, example_window, load_detector

FORMATS = ("pt2", "onnx", "opentad")
OPENTAD_PREFIX = "backbone."  # OpenTAD's custom.pretrain loads into its Recognizer3D, whose backbone is `backbone`
OUTPUT_NAMES = ("cls_logits", "offsets", "valid", "points")
# Weights up to this size go inside the .onnx file (torch's own threshold, under protobuf's 2 GB
# cap with room for the graph); larger ones go to <out>.data next to it.
EMBED_LIMIT = 1.5 * 2**30


class RawDetector(nn.Module):
    """The detector's forward with plain tensor outputs (what an exporter can trace)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor):
        head = self.detector(inputs, mask).head
        return head.cls_logits, head.offsets, head.valid, head.points


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float  # exported vs eager outputs on the check window
    sidecar: Path  # <out>.json: classes, feature_stride, shapes
    files: tuple[Path, ...]  # everything written: the graph, <out>.data when the weights are outside, the sidecar


def _check_window(builder: dict, batch: int):
    """A deterministic, non-trivial window of the model's input shape (random frames or values)."""
    cfg = builder_config(builder)
    zeros, mask = example_window(cfg, builder["in_channels"])
    gen = torch.Generator().manual_seed(0)
    if zeros.dtype == torch.uint8:
        inputs = torch.randint(0, 256, (batch, *zeros.shape[1:]), generator=gen, dtype=torch.uint8)
    else:
        inputs = torch.randn((batch, *zeros.shape[1:]), generator=gen)
    mask = mask.expand(batch, -1).clone()
    mask[:, mask.shape[1] * 3 // 4:] = False  # a padded tail, as the last window of a video has
    return inputs, mask, cfg


def _max_diff(expected, got) -> float:
    worst = 0.0
    for name, a, b in zip(OUTPUT_NAMES, expected, got):
        b = torch.as_tensor(b)
        if a.shape != b.shape:
            raise BlockdropError(f"export check: output {name} has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
        if a.dtype == torch.bool:
            if not torch.equal(a, b.bool()):
                raise BlockdropError(f"export check: output {name} differs from the eager model")
            continue
        worst = max(worst, float((a.float() - b.float()).abs().max()))
    return worst


def _export_pt2(raw: nn.Module, args: tuple, path: Path):
    program = torch.export.export(raw, args)
    torch.export.save(program, path)
    return torch.export.load(path).module()(*args)


def _export_onnx(raw: nn.Module, args: tuple, path: Path):
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's dynamo exporter imports it lazily)
    except ImportError as err:
        raise BlockdropError(f"--format onnx needs {err.name}: pip install 'blockdrop[export-onnx]'") from None
    program = torch.onnx.export(raw, args, dynamo=True, input_names=["inputs", "mask"],
                                output_names=list(OUTPUT_NAMES), verbose=False)
    weights = sum(t.numel() * t.element_size() for t in raw.state_dict().values())
    # external data is named after the file it is saved as: <path.name>.data, the final name here
    program.save(path, external_data=weights > EMBED_LIMIT)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return session.run(list(OUTPUT_NAMES), feeds)


def _export_opentad(model: nn.Module, inputs: torch.Tensor, path: Path, window: int) -> tuple[float, dict]:
    """The backbone under OpenTAD's names at ``path``; returns (max |features - re-imported features|, what
    the sidecar says about building it in OpenTAD)."""
    backbone = model.backbone
    vit = getattr(backbone, "vit", backbone)
    if not isinstance(vit.tokenizer, TubeletEmbed):
        raise BlockdropError(f"--format opentad: OpenTAD takes a VideoMAE backbone; this model's tokenizer is "
                             f"{type(vit.tokenizer).__name__}")
    if getattr(backbone, "input_mode", "rgb") != "rgb":
        raise BlockdropError(f"--format opentad: this backbone takes {backbone.input_mode} (backbone.input), "
                             f"which OpenTAD's pipeline does not compute")
    torch.save({"state_dict": export_mmaction_videomae(vit, prefix=OPENTAD_PREFIX, identity_fc_norm=True)}, path)
    again = copy.deepcopy(backbone)
    for tensor in again.state_dict().values():
        tensor.zero_()  # every value must come from the file
    load_mmaction_videomae(getattr(again, "vit", again), torch.load(path, map_location="cpu", weights_only=True))
    diff = float((again(inputs) - backbone(inputs)).abs().max())
    args = opentad_backbone_args(vit)
    steps = round(window / backbone.feature_stride)
    return diff, {"vision_transformer_adapter": {**args, "patch_size": vit.tokenizer.patch,
                                                 "num_frames": vit.tokenizer.num_frames, "total_frames": window},
                  "post_processing": {"reduction": vit.tokenizer.pool_kind,
                                      "interpolate_size": steps if steps != window // vit.tokenizer.tubelet else None},
                  "load_with": "OpenTAD config: model.backbone.custom.pretrain = this file; "
                               "model.backbone.backbone = VisionTransformerAdapter(**vision_transformer_adapter)",
                  "head": "not exported: the ActionFormer head keeps blockdrop's names; OpenTAD trains its own"}


@contextlib.contextmanager
def _staged_files(out: Path):
    """Yield ``(folder, moved)``: write ``folder / out.name`` and any companion files there. When the
    block succeeds each is moved next to ``out`` under its own name, companions before the main
    file (so it never points at a missing one), and ``moved`` lists them; on failure nothing moves."""
    folder = temporary_beside(out, folder=True)
    moved: list[Path] = []
    try:
        yield folder, moved
        for staged in sorted(folder.iterdir(), key=lambda p: (p.name == out.name, p.name)):
            with open(staged, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(staged, out.parent / staged.name)
            moved.append(out.parent / staged.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _earlier_export(out: Path) -> set[str]:
    """The names an earlier export to ``out`` wrote (its sidecar lists them, itself included)."""
    sidecar = out.with_name(out.name + ".json")
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        return {str(name) for name in record["files"]} | {sidecar.name} if "format" in record else set()
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def check_export_out(out: Path) -> None:
    """Refuse ``--out`` before any work when a file the export would write is not an earlier
    export's: a user's own file, a folder, a device."""
    ours = _earlier_export(out)
    for path in (out, out.with_name(out.name + ".data"), out.with_name(out.name + ".json")):
        check_output_file(path, "--out", ours=lambda p, name=path.name: name in ours,
                          what=f"a file an earlier export to {out.name} wrote")


def export_detector(checkpoint: str | Path, out: str | Path, *, fmt: str = "pt2", batch: int = 1,
                    tolerance: float = 1e-4) -> ExportResult:
    """Export ``checkpoint`` (a `train` or `compress` model.safetensors) to ``out``."""

    if fmt not in FORMATS:
        raise BlockdropError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if batch < 1:
        raise BlockdropError(f"--batch must be at least 1, got {batch}")
    checkpoint, out = Path(checkpoint), Path(out)
    check_export_out(out)
    model, builder = load_detector(checkpoint, "checkpoint")
    model = model.float().eval()
    inputs, mask, cfg = _check_window(builder, batch)
    with torch.no_grad():
        with _staged_files(out) as (folder, written):
            if fmt == "opentad":
                diff, described = _export_opentad(model, inputs, folder / out.name, cfg.data.window)
            else:
                raw = RawDetector(model).eval()
                expected = raw(inputs, mask)
                diff = _max_diff(expected, (_export_pt2 if fmt == "pt2" else _export_onnx)(raw, (inputs, mask),
                                                                                           folder / out.name))
                described = {"outputs": list(OUTPUT_NAMES)}
            if not diff <= tolerance:
                raise BlockdropError(f"{out}: exported model differs from the eager one by {diff:.2e} "
                                     f"(> tolerance {tolerance:g}); nothing written")
    sidecar = out.with_name(out.name + ".json")
    atomic_write_text(sidecar, json.dumps({
        "format": fmt, "checkpoint": str(checkpoint), "classes": builder["classes"],
        "inputs": {"shape": list(inputs.shape), "dtype": str(inputs.dtype).removeprefix("torch.")},
        "mask": {"shape": list(mask.shape), "dtype": "bool"}, **described,
        "feature_stride": float(model.feature_stride), "rate": None if cfg.data.rate is None else float(cfg.data.rate),
        "blocks": int(model.backbone.depth), "max_abs_diff": diff,
        "files": [p.name for p in written],  # the export itself: the graph, and <out>.data if the weights are outside
    }, indent=2) + "\n")
    return ExportResult(out, fmt, diff, sidecar, (*written, sidecar))
