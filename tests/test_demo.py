"""`blockdrop demo` end to end on a tiny stand-in for HAPT (the real conversion is tested in test_hapt)."""

import json

from blockdrop.cli import main

from conftest import make_sequence_dataset

TINY = ["data.window=128", "data.test_stride=64", "data.train_repeats=1", "backbone.depth=3", "backbone.width=32",
        "backbone.heads=2", "backbone.patch=4", "head.embed_dim=32", "head.fpn_dim=32", "head.head_dim=32",
        "head.attn_window=5", "train.epochs=6", "train.eval_every=1", "train.patience=1", "train.threads=1",
        "train.batch_size=2", "train.ema_decay=0.5", "compress.alignment.train.ema_decay=0", "compress.selection.videos=null", "compress.alignment.train.epochs=1",
        "compress.alignment.train.eval_every=1", "compress.alignment.train.threads=1", "compress.latency_threads=1",
        "compress.stopping.max_blocks=1"]


def test_demo_trains_a_teacher_compresses_it_and_says_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "demo"
    make_sequence_dataset(out / "data" / "hapt")  # present: the demo skips the HAPT conversion
    args = ["demo", "--out", str(out), "--quiet"] + [a for kv in TINY for a in ("--set", kv)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "demo.json").read_text())
    teacher = result["teacher"]
    assert teacher["planned_epochs"] == 6 and teacher["patience"] == 1 and teacher["blocks"] == 3
    assert teacher["epochs"] <= 6 and 1 <= teacher["val_best_epoch"] <= teacher["epochs"]
    # it stopped early exactly when the last epoch was a patience past the best one
    assert teacher["stopped_early"] == (teacher["epochs"] < 6)
    assert teacher["plateaued"] or not teacher["stopped_early"]
    assert result["blocks_dropped"] == 1 and result["compressed"]["blocks"] == 2
    assert len(result["dropped_original_blocks"]) == 1 and result["table"][0]["model"] == "teacher"
    assert result["teacher"]["average_mAP"] == result["table"][0]["test_average_mAP"]
    assert f"at epoch {teacher['val_best_epoch']}" in printed.splitlines()[0]
    for line in ("report: ", "model: ", "export: ", "detect: "):
        assert any(row.startswith(line) for row in printed.splitlines()), line
    assert any(row == f"report:  {out / 'compressed' / 'report.html'}" for row in printed.splitlines())
    assert (out / "compressed" / "report.html").stat().st_size > 0 and (out / "compressed" / "report.md").exists()
    # a re-run continues: nothing is trained again, and the same numbers come back
    again = main(args)
    assert again == 0 and json.loads((out / "demo.json").read_text())["table"] == result["table"]
