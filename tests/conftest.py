"""Shared test helpers: a tiny generated TAD dataset of 3-channel sequences and its config."""

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def import_transformers():
    """transformers (the reference implementation), skipping the test when it is absent.

    A torchvision build that does not match torch would break transformers' image utilities,
    which the models used here never need; it is then hidden so transformers treats it as absent."""
    try:
        import torchvision  # noqa: F401  (only probed)
    except Exception:
        sys.modules["torchvision"] = None
    return pytest.importorskip("transformers")


def actionformer_module(relative: str):
    """A module of the actionformer package (an independent reference implementation), loaded by path,
    e.g. "utils/metrics.py" (ANETdetection, the mAP oracle): its package __init__ imports torchvision.
    Skips the test when actionformer is absent."""
    import importlib.util

    spec = importlib.util.find_spec("actionformer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("actionformer is not installed")
    path = f"{spec.submodule_search_locations[0]}/{relative}"
    module_spec = importlib.util.spec_from_file_location("_actionformer_" + Path(relative).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def actionformer_metrics():
    """ActionFormer's ANETdetection module (needs pandas and joblib; skips without them)."""
    pytest.importorskip("pandas")
    pytest.importorskip("joblib")
    return actionformer_module("utils/metrics.py")


def make_sequence_dataset(root: Path, videos: int = 8, rate: float = 10.0, *, length: int = 200,
                          starts=(20, 110), durations=(20, 50), subsets=None) -> None:
    """Sequences of 3 channels where class k is a step of +(k+1) on channel k over its segment.

    One segment starts at each of ``starts`` with a length drawn from ``durations`` (steps).
    ``subsets``: the subset of each video (default: 5 train, 2 val, the rest test)."""
    rng = np.random.default_rng(0)
    (root / "sequences").mkdir(parents=True)
    database = {}
    for i in range(videos):
        x = rng.normal(0, 0.1, size=(length, 3)).astype(np.float32)
        segments = []
        for start in starts:
            k, dur = int(rng.integers(0, 3)), int(rng.integers(*durations))
            x[start:start + dur, k] += k + 1
            segments.append({"segment": [start / rate, (start + dur) / rate], "label": f"c{k}"})
        np.save(root / "sequences" / f"v{i}.npy", x)
        subset = subsets[i] if subsets is not None else ("train" if i < 5 else ("val" if i < 7 else "test"))
        database[f"v{i}"] = {"subset": subset, "duration": length / rate, "fps": rate, "annotations": segments}
    (root / "annotations.json").write_text(json.dumps({"database": database, "classes": ["c0", "c1", "c2"]}))


def tiny_config(tmp_path: Path, **train) -> Path:
    root = tmp_path / "data"
    if not root.exists():
        make_sequence_dataset(root)
    cfg = {
        "data": {"kind": "sequence", "root": str(root), "window": 128, "test_stride": 64, "train_repeats": 2},
        "backbone": {"kind": "sequence", "depth": 2, "width": 32, "heads": 2, "patch": 4, "drop_path": 0.0},
        "head": {"embed_dim": 32, "fpn_dim": 32, "head_dim": 32, "attn_window": 5},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "warmup_epochs": 0, "ema_decay": 0.5, **train},
        "eval": {"batch_size": 4},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    """A TCP port nobody listens on right now (for a local process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
