"""Two fine-tuned runs on the same held-out items, item by item, with a paired bootstrap.

Decodes each item with both runs (the task's ``DECODING``, as ``zerotrain eval`` does), scores it
(QA: token F1 and full sentence; summaries: ROUGE-L F1) and prints each run's mean and the 95 %
interval of the mean difference A - B from paired bootstrap resamples of the items. The README's
multi-task against single-task comparisons on every held-out item come from it.

    .venv/bin/python scripts/paired_eval.py tiny-zero3-ft tiny-zero3-qa --task qa --examples 0
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from zerotrain.data.tasks import eval_items, qa, summaries
from zerotrain.train.answer import answer_questions, documents_that_fit, summarize_documents
from zerotrain.train.inference import find_run, load_run


def paired_interval(a, b, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, 2.5th and 97.5th percentile of that mean over paired bootstrap resamples)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError(f"paired_interval needs two equal, non-empty lists of scores; got {diff.shape}")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def item_scores(task: str, model, tokenizer, items: list) -> dict[str, list[float]]:
    if task == "qa":
        answers = answer_questions(model, tokenizer, items)
        return {"F1": [qa.token_f1(p, e.answer) for p, e in zip(answers, items)],
                "full sentence": [float(qa.is_full_sentence(p, e.subject)) for p, e in zip(answers, items)]}
    written = summarize_documents(model, tokenizer, [p["document"] for p in items])
    return {"ROUGE-L": summaries.rouge_items(written, [p["summary"] for p in items])["rougeL"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--task", choices=("qa", "summarize"), required=True)
    ap.add_argument("--examples", type=int, default=200, help="held-out items (0: all)")
    ap.add_argument("--runs-dir", default="runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = [find_run(r, args.runs_dir).resolve() for r in (args.run_a, args.run_b)]
    loaded = [load_run(str(r), str(r.parent)) for r in runs]
    tokenizer = loaded[0][2]
    items = eval_items(args.task, args.examples or None, runs[0] / "data")
    if args.task == "summarize":
        block = min(m[3].config.block_size for m in loaded)
        items = documents_that_fit(tokenizer, items, block)
    scores = [item_scores(args.task, m[3], tokenizer, items) for m in loaded]
    print(f"{args.task}: {len(items)} held-out items; A = {runs[0].name}, B = {runs[1].name}")
    for metric in scores[0]:
        a, b = scores[0][metric], scores[1][metric]
        mean, low, high = paired_interval(a, b)
        print(f"  {metric:<14} A {np.mean(a):.3f}   B {np.mean(b):.3f}   A - B {mean:+.3f} [{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main()
