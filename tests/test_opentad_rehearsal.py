"""One rehearsal of the THUMOS14 / OpenTAD user's whole path, at tiny size, through the CLI.

What the user has: an AdaTAD VideoMAE detector trained by OpenTAD (its checkpoint laid out exactly as
OpenTAD's tools/train.py saves one: tests/opentad_helpers.py, from OpenTAD's own output), an
annotation file in ActionFormer's THUMOS14 format (real entries of its thumos14.json, their times
scaled onto short videos; one video keeps segments past its duration, as the real file has), and
mp4 files named as THUMOS14 videos. The commands run in the order docs/opentad.md gives them:
data check -> train (the head on the imported backbone) -> compress (one step) -> eval -> detect ->
export back to OpenTAD, whose file must hold OpenTAD's key set and import again to the same outputs.
The messages a THUMOS user meets first are checked on the way.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blockdrop.cli import main
from blockdrop.data.video import write_video
from blockdrop.recipes.build import load_detector

from opentad_helpers import OPENTAD_PREFIX, fabricate_opentad_checkpoint, opentad_layout

EXCERPT = Path(__file__).parent / "data" / "real_annotations" / "thumos14_actionformer_excerpt.json"
# THUMOS14 video ids of the excerpt and the length their mp4 gets here (seconds at 30 fps)
VIDEOS = {"video_validation_0000051": 3.0, "video_validation_0000052": 2.4, "video_validation_0000053": 2.8,
          "video_validation_0000364": 2.6, "video_test_0000004": 2.2, "video_test_0000814": 3.0}
FPS, SIZE = 30.0, 48


def make_thumos_like(root: Path) -> dict:
    """videos/<id>.mp4 and thumos14.json: each video's real entry, duration set to its mp4 and every time
    scaled by the same factor (segments past the real duration stay past the new one)."""
    real = json.loads(EXCERPT.read_text())
    database = {}
    rng = np.random.default_rng(0)
    for vid, seconds in VIDEOS.items():
        entry = json.loads(json.dumps(real["database"][vid]))
        scale = seconds / entry["duration"]
        entry["duration"] = seconds
        frames = rng.integers(0, 60, (round(seconds * FPS), SIZE, SIZE, 3), dtype=np.uint8)
        for ann in entry["annotations"]:
            ann["segment"] = [round(t * scale, 3) for t in ann["segment"]]
            ann["segment(frames)"] = [round(t * FPS, 1) for t in ann["segment"]]
            start, end = (int(t * FPS) for t in ann["segment"])
            frames[start:end, :, : SIZE // 2] += np.uint8(120 + 6 * ann["label_id"])  # something to detect
        database[vid] = entry
        write_video(root / "videos" / f"{vid}.mp4", frames, FPS)
    (root / "thumos14.json").write_text(json.dumps({"version": real["version"], "database": database}))
    return database


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's files: the data folder, the OpenTAD checkpoint, and the --set flags of the tiny setup."""
    tmp = tmp_path_factory.mktemp("thumos")
    database = make_thumos_like(tmp / "thumos14")
    checkpoint = tmp / "epoch_59.pth"
    fabricate_opentad_checkpoint(checkpoint)
    args = opentad_layout()["vision_transformer_adapter_args"]
    sets = [f"data.root={tmp / 'thumos14'}", "data.frame_size=32", "data.window=32", "data.test_stride=16",
            "data.val_fraction=0.25", "data.num_workers=0",
            f"backbone.depth={args['depth']}", f"backbone.width={args['embed_dims']}",
            f"backbone.heads={args['num_heads']}", "backbone.grad_checkpointing=false",
            "head.embed_dim=32", "head.fpn_dim=32", "head.head_dim=32",
            "train.epochs=2", "train.warmup_epochs=0", "train.ema_decay=0.5", "train.threads=1",
            "compress.stopping.max_blocks=1", "compress.alignment.train.epochs=1",
            "compress.alignment.train.warmup_epochs=0", "compress.alignment.train.ema_decay=0",
            "compress.latency_threads=1"]
    flags = [x for s in sets for x in ("--set", s)]
    return {"tmp": tmp, "database": database, "checkpoint": checkpoint, "flags": flags}


def record_videos(run_dir: Path) -> set:
    """The training videos of a run (the validation videos it held out are not among them)."""
    from blockdrop.core.config import load_config
    from blockdrop.core.schema import ExperimentConfig
    from blockdrop.recipes.build import load_experiment_annotations, split_annotations

    cfg = load_config(ExperimentConfig, run_dir / "config.yaml")
    return set(split_annotations(cfg.data, load_experiment_annotations(cfg.data), cfg.train.seed)["train"].videos)


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_opentad_users_path_end_to_end(user, capsys):
    tmp, flags, ckpt = user["tmp"], user["flags"], user["checkpoint"]
    imported = ["--set", f"backbone.checkpoint={ckpt}", "--set", "backbone.checkpoint_format=adatad"]

    # 1. data check: every video readable; the segments past a video's duration reported
    code, out, _ = run(["data", "check", "thumos14_adatad_s", *flags], capsys)
    assert code == 0, out
    past = sum(1 for v in user["database"].values() for a in v["annotations"] if a["segment"][0] >= v["duration"])
    assert past == 5 and f"{past} segment(s) in 2 video(s) lie past their video's duration" in out
    assert "6 media files" in out and "all readable" in out

    # 2. train the head on the imported AdaTAD backbone (OpenTAD's EMA weights, adapters included)
    teacher_run = tmp / "runs" / "thumos14_s"
    code, _, err = run(["train", "thumos14_adatad_s", *flags, *imported, "--set", "train.freeze_backbone=true",
                        "--out", teacher_run, "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads((teacher_run / "summary.json").read_text())
    record = summary["train_annotations"]  # what training could not see is counted
    trained_ids = set(user["database"]) - {v for v in user["database"] if v.startswith("video_test_")}
    assert record["videos"] == len(trained_ids) - 1  # one held out for validation (val_fraction 0.25)
    past_in_training = 2 if "video_validation_0000364" in record_videos(teacher_run) else 0
    assert record["dropped_past_duration"] == past_in_training and record["clipped_to_duration"] == 0
    assert json.loads((teacher_run / "run.json").read_text())["train_annotations"] == record
    teacher, _ = load_detector(teacher_run / "model.safetensors")
    ema = torch.load(ckpt, weights_only=True)["state_dict_ema"]
    assert torch.equal(teacher.backbone.vit.blocks[1].adapter.up_proj.weight,
                       ema[OPENTAD_PREFIX + "blocks.1.adapter.up_proj.weight"])  # frozen: OpenTAD's as it was

    # 3. compress: one block, selected by mAP@0.5 on the training videos, aligned, merged
    pbd = tmp / "runs" / "thumos14_s_pbd"
    code, _, err = run(["compress", "thumos14_adatad_s", *flags, "--teacher", teacher_run / "model.safetensors",
                        "--out", pbd, "--quiet"], capsys)
    assert code == 0, err
    history = json.loads((pbd / "history.json").read_text())
    assert len(history["steps"]) == 1
    compressed, _ = load_detector(pbd / "model.safetensors")
    assert compressed.backbone.depth == 1

    # 4. eval once on the test split
    code, out, err = run(["eval", "thumos14_adatad_s", *flags, "--checkpoint", pbd / "model.safetensors",
                          "--json", tmp / "test_metrics.json", "--predictions", tmp / "test_predictions.json"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp / "test_metrics.json").read_text())
    test_segments = sum(len(v["annotations"]) for k, v in user["database"].items() if k.startswith("video_test_"))
    assert metrics["subset"] == "test" and metrics["blocks"] == 1
    assert metrics["num_ground_truth"] == test_segments  # those past the duration count, as OpenTAD counts them

    # 5. detect on a video file
    video = tmp / "thumos14" / "videos" / "video_test_0000004.mp4"
    code, out, err = run(["detect", video, "--checkpoint", pbd / "model.safetensors", "--out", tmp / "results.json"],
                         capsys)
    assert code == 0, err
    assert "video_test_0000004" in json.loads((tmp / "results.json").read_text())["results"]

    # 6. back to OpenTAD: the backbone under OpenTAD's key names, for the compressed depth
    exported = tmp / "deploy" / "thumos14_s_pbd_backbone.pth"
    code, out, err = run(["export", pbd / "model.safetensors", "--format", "opentad", "--out", exported], capsys)
    assert code == 0, err
    state = torch.load(exported, weights_only=True)["state_dict"]
    # OpenTAD's backbone keys at depth 1, as its custom.pretrain reads them into the Recognizer3D (the saved
    # detector's keys without the DistributedDataParallel and BackboneWrapper prefix "module.backbone.model.")
    theirs = {k.removeprefix("module.backbone.model."): shape for k, shape, _ in opentad_layout()["state_dict"]
              if k.startswith(OPENTAD_PREFIX) and ".blocks.1." not in k}
    assert {k: list(v.shape) for k, v in state.items()} == theirs
    sidecar = json.loads(exported.with_name(exported.name + ".json").read_text())
    assert sidecar["format"] == "opentad" and sidecar["max_abs_diff"] <= 1e-4
    assert sidecar["vision_transformer_adapter"]["depth"] == 1
    assert sidecar["vision_transformer_adapter"]["adapter_index"] == [0]

    # ... and it imports again (our importer, strict) to the compressed backbone's outputs
    from blockdrop.recipes.build import build_detector, load_experiment

    sets = [f for f in flags if f != "--set"] + [f"backbone.checkpoint={exported}", "backbone.checkpoint_format=adatad",
                                                 "backbone.depth=1", "backbone.adapter_blocks=[0]",
                                                 "compress.stopping.max_blocks=null",
                                                 "compress.stopping.target_macs_reduction=0.5"]
    again = build_detector(load_experiment("thumos14_adatad_s", sets), 20, 3)
    frames = torch.randint(0, 256, (1, 32, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again.backbone.eval()(frames), compressed.backbone.eval()(frames), rtol=0, atol=1e-6)


@pytest.mark.parametrize("command", ["compress", "eval", "detect", "export"])
def test_an_opentad_pth_where_a_blockdrop_model_goes_says_how_it_gets_in(user, capsys, command):
    ckpt, flags = user["checkpoint"], user["flags"]
    argv = {"compress": ["compress", "thumos14_adatad_s", *flags, "--teacher", ckpt, "--out", user["tmp"] / "x"],
            "eval": ["eval", "thumos14_adatad_s", *flags, "--checkpoint", ckpt],
            "detect": ["detect", user["tmp"] / "thumos14" / "videos" / "video_test_0000004.mp4", "--checkpoint", ckpt],
            "export": ["export", ckpt, "--out", user["tmp"] / "x.pt2"]}[command]
    code, _, err = run(argv, capsys)
    assert code == 2
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert str(ckpt) in line and "PyTorch checkpoint" in line
    assert "backbone.checkpoint_format=adatad" in line and "blockdrop train" in line
    assert not (user["tmp"] / "x").exists() and not (user["tmp"] / "x.pt2").exists()


@pytest.mark.parametrize("given,wanted", [("adatad", "mmaction"), ("mmaction", "adatad")])
def test_the_wrong_checkpoint_format_names_the_right_one(user, capsys, tmp_path, given, wanted):
    """A plain pretrained VideoMAE read as AdaTAD suggests mmaction; an AdaTAD file read as mmaction, adatad."""
    if given == "adatad":  # a plain VideoMAE: OpenTAD's checkpoint without its adapters
        state = torch.load(user["checkpoint"], weights_only=True)
        plain = {k: v for k, v in state["state_dict"].items() if ".adapter." not in k}
        path = tmp_path / "vit-small-p16_videomae-k400-pre.pth"
        torch.save({"state_dict": plain}, path)
    else:
        path = user["checkpoint"]
    code, _, err = run(["train", "thumos14_adatad_s", *user["flags"], "--set", f"backbone.checkpoint={path}",
                        "--set", f"backbone.checkpoint_format={given}", "--out", tmp_path / "run"], capsys)
    assert code == 2
    line = err.strip()
    assert "\n" not in line and f"backbone.checkpoint_format: {wanted}" in line and str(path) in line
    assert "adapters='checkpoint'" not in line  # config words only
    assert not (tmp_path / "run").exists()
