"""Choose the decoding of a task on held-out items the reported evaluation never uses.

``zerotrain eval RUN --task T`` scores the first 200 held-out items in a seeded order; this sweep
scores beam widths and length penalties on the items after those (``--skip 200``), so the
defaults in ``zerotrain/train/answer.py`` (``DECODING``) are not fitted to the reported numbers.

    .venv/bin/python scripts/decoding_sweep.py tiny-zero3-ft --task summarize
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from zerotrain.data.tasks import eval_items, qa, summaries
from zerotrain.train.answer import answer_questions, documents_that_fit, summarize_documents
from zerotrain.train.inference import find_run, load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--task", choices=["qa", "summarize"], required=True)
    ap.add_argument("--skip", type=int, default=200, help="held-out items the reported evaluation uses")
    ap.add_argument("--items", type=int, default=400, help="held-out items after those, for the sweep")
    ap.add_argument("--beams", default="1,2,4,8")
    ap.add_argument("--length-penalties", default="0.5,1,1.5,2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run_dir = find_run(args.run, args.runs_dir).resolve()
    _, _, tokenizer, model, step = load_run(str(run_dir), str(run_dir.parent))
    items = eval_items(args.task, None, run_dir / "data", seed=0)[args.skip:args.skip + args.items]
    if args.task == "summarize":
        items = documents_that_fit(tokenizer, items, model.config.block_size)
    print(f"{run_dir.name} at step {step}: {len(items)} held-out {args.task} items after the first {args.skip}")
    grid = [(1, 1.0)] + [(b, lp) for b, lp in itertools.product(map(int, args.beams.split(",")),
                                                                  map(float, args.length_penalties.split(",")))
                         if b > 1]
    for beams, lp in grid:
        t = time.perf_counter()
        if args.task == "qa":
            s = qa.score(answer_questions(model, tokenizer, items, beams=beams, length_penalty=lp), items)
            line = f"F1 {s['f1']:.3f}  EM {s['exact_match']:.3f}  full sentences {s['full_sentence']:.3f}"
        else:
            preds = summarize_documents(model, tokenizer, [p["document"] for p in items], beams=beams,
                                        length_penalty=lp)
            s = summaries.rouge(preds, [p["summary"] for p in items])
            line = f"R-1 {s['rouge1']:.3f}  R-2 {s['rouge2']:.3f}  R-L {s['rougeL']:.3f}"
        print(f"beams {beams}  length penalty {lp:<4}  {line}  ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
