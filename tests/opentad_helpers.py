"""OpenTAD's checkpoint layout, as its own tools/train.py wrote it (tests/data/opentad/adatad_tiny_keys.json,
see the README there), and a fabricator of checkpoints in that layout."""

import json
from pathlib import Path

import torch

from blockdrop.models.tokenizers import sinusoid_table

DATA = Path(__file__).parent / "data" / "opentad"
OPENTAD_PREFIX = "module.backbone.model.backbone."  # DDP "module." + detector.backbone + BackboneWrapper.model + .backbone


def opentad_layout() -> dict:
    return json.loads((DATA / "adatad_tiny_keys.json").read_text())


def fabricate_opentad_checkpoint(path: Path, seed: int = 0) -> dict:
    """A checkpoint laid out exactly as OpenTAD's tools/train.py saves one (adatad_tiny_keys.json, written
    by OpenTAD's own save_checkpoint): container keys, `module.`-prefixed model and EMA states in saved
    order, AdamW state per parameter index with OpenTAD's parameter groups, the scheduler's state. Values
    are random; the sin-cos `pos_embed` buffer is the table VideoMAE uses."""
    layout = opentad_layout()
    gen = torch.Generator().manual_seed(seed)
    dtypes = {"float32": torch.float32, "int64": torch.int64}

    def state(entries, scale):
        out = {}
        for key, shape, dtype in entries:
            if key.endswith("pos_embed"):
                out[key] = sinusoid_table(shape[1], shape[2])[None]
            elif dtypes[dtype].is_floating_point:
                out[key] = scale * torch.randn(shape, generator=gen)
            else:
                out[key] = torch.zeros(shape, dtype=dtypes[dtype])
        return out

    model = state(layout["state_dict"], 0.05)
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() and "pos_embed" not in k
           else v.clone() for k, v in model.items()}
    groups, opt_state, index = [], {}, 0
    for group in layout["optimizer"]["param_groups"]:
        params = list(range(index, index + group["num_params"]))
        for i, name in zip(params, group["param_names"]):
            opt_state[i] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros_like(model[name]),
                            "exp_avg_sq": torch.zeros_like(model[name])}
        values = {"lr": 1e-4, "weight_decay": 0.05, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False,
                  "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
                  "decoupled_weight_decay": True, "initial_lr": 1e-4}
        groups.append({**{k: values[k] for k in group["keys"]}, "params": params})
        index += group["num_params"]
    scheduler = {"warmup_epoch": 5, "max_epoch": 100, "warmup_start_lr": 0.0, "eta_min": 1e-8,
                 "base_lrs": [2e-4, 1e-4, 1e-4], "last_epoch": 2, "_step_count": 3, "_is_initial": False,
                 "_get_lr_called_within_step": False, "_last_lr": [1e-5, 5e-6, 5e-6]}
    assert set(scheduler) == set(layout["scheduler"]["state_dict"])
    checkpoint = {"epoch": 1, "state_dict": model, "optimizer": {"state": opt_state, "param_groups": groups},
                  "scheduler": scheduler, "state_dict_ema": ema}
    assert list(checkpoint) == layout["container_keys"]
    torch.save(checkpoint, path)
    return checkpoint
