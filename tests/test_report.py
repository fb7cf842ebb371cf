"""report.html of a real (tiny) compress run: self-contained, every figure a PNG, every text escaped."""

import base64
import json
import re
import shutil
from html import escape

import pytest
import torch
import yaml

from blockdrop.core.config import load_config
from blockdrop.core.schema import ExperimentConfig
from blockdrop.recipes import report_figures
from blockdrop.recipes.compress import compress_experiment
from blockdrop.recipes.report import NEEDS_EXTRA, write_report
from blockdrop.recipes.train import train_experiment

from conftest import tiny_config

PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("Summary", "Steps", "Accuracy against cost", "Block selection", "Alignment fine-tuning",
            "Detections on validation videos", "Stopping", "Configuration (config.yaml)", "Environment")
STOP = "rolled back: <b>max_accuracy_drop</b> & more"  # markup a report must show, not obey


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-block teacher compressed by one step; its history then given a rolled-back step 2."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("report")
    config = tiny_config(tmp, epochs=1)
    train_experiment(load_config(ExperimentConfig, config, ["backbone.depth=3"]), out=tmp / "teacher", progress=False)
    teacher = tmp / "teacher" / "model.safetensors"
    cfg = load_config(ExperimentConfig, config, [
        "backbone.depth=3", "compress.stopping.max_blocks=1", "compress.selection.block_metric=average_mAP",
        "compress.alignment.train.epochs=2", "compress.alignment.train.batch_size=2",
        "compress.alignment.train.ema_decay=0.5", "compress.latency_threads=1", f"compress.teacher={teacher}"])
    out = tmp / "run <&>"
    compress_experiment(cfg, out=out, progress=False)
    assert (out / "report.html").is_file()  # compress writes it at the end of every run
    history = json.loads((out / "history.json").read_text())
    rejected = json.loads(json.dumps(history["steps"][0]))
    rejected.update(step=2, status="rolled_back", blocks_dropped=2)
    history.update(rejected=rejected, stopped=STOP)
    (out / "history.json").write_text(json.dumps(history))
    return out


def _images(html: str) -> dict[str, bytes]:
    """alt text -> the decoded bytes of every <img> (each must be an inline base64 PNG)."""
    images = re.findall(r'<img alt="([^"]*)" src="([^"]*)"', html)
    assert len(images) == html.count("<img")
    assert all(src.startswith("data:image/png;base64,") for _, src in images)
    return {alt: base64.b64decode(src.split(",", 1)[1], validate=True) for alt, src in images}


def test_report_html_embeds_every_figure_and_escapes_text(run):
    pytest.importorskip("matplotlib")
    written = write_report(run)
    html = (run / "report.html").read_text()
    assert run / "report.html" in written and run / "report.md" in written
    images = _images(html)
    assert set(images) == {"validation average_mAP against cost", "selection scores per step and block",
                           "alignment of step 1", "alignment of step 2", "detection timeline"}
    for png in images.values():
        assert png[:8] == PNG and len(png) > 5000
    # the PNG files beside report.html are the figures it embeds
    assert (run / "report.png").read_bytes() == images["validation average_mAP against cost"]
    assert (run / "report_timeline.png").read_bytes() == images["detection timeline"]
    for heading in SECTIONS:
        assert f">{escape(heading)}</h2>" in html
    # the timeline ran both models: the teacher and the 2-block final model, no note of a missing part
    assert "Not drawn" not in html
    # the stop reason and the run folder's name are shown escaped, never as markup
    assert escape(STOP) in html and "<b>" not in html
    assert f"<title>{escape('Progressive Block Drop: run <&>')}</title>" in html
    assert "rolled back" in html and "Step 2 (dropping block" in html
    # self-contained: nothing is fetched
    assert not re.search(r"https?://|<script|<link|url\(", html)
    # the config and what the runs recorded of the environment
    assert "teacher_mode: original" in html and "cpu_capability" in html and "annotations_sha256" in html


def test_without_matplotlib_the_html_says_how_to_get_figures(run, tmp_path, monkeypatch):
    copy = shutil.copytree(run, tmp_path / "run")
    for png in copy.glob("*.png"):
        png.unlink()
    monkeypatch.setattr(report_figures, "pyplot", lambda: None)
    write_report(copy)
    html = (copy / "report.html").read_text()
    assert escape(NEEDS_EXTRA) in html and "pip install" in html and "<img" not in html
    assert all(f">{escape(heading)}</h2>" in html for heading in SECTIONS)
    assert escape(STOP) in html and not list(copy.glob("*.png"))


def test_missing_data_is_said_plainly(run, tmp_path):
    pytest.importorskip("matplotlib")
    copy = shutil.copytree(run, tmp_path / "run")
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"]["root"] = str(tmp_path / "gone")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    write_report(copy)
    html = (copy / "report.html").read_text()
    assert "Not drawn: the run&#x27;s data or models cannot be read:" in html and "gone" in html
    assert "detection timeline" not in html and len(_images(html)) == 4  # the other figures are there
