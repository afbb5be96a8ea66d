"""Where a fine-tuned model's answers lose the question's subject, token by token.

Feeds each held-out question's reference answer to the model (teacher forcing) and counts how
often the model's most likely next token is the reference token at each position of the subject
inside the answer: the first subject token, the second, the third, and any later one. Also prints
the share of subjects whose every token is predicted right. Uses the held-out questions after the
200 that ``zerotrain eval`` reports, like ``decoding_sweep.py``.

    .venv/bin/python scripts/subject_tokens.py tiny-zero3-ft
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from zerotrain.data.tasks import eval_items, prompts
from zerotrain.train.inference import find_run, load_run


def subject_span(target: list[int], tokenizer, subject: str) -> range | None:
    """Positions in ``target`` of the subject as the answer writes it (as asked, or capitalised)."""
    for form in (subject, subject[:1].upper() + subject[1:]):
        ids = tokenizer.encode(" " + form)
        for j in range(len(target) - len(ids) + 1):
            if target[j:j + len(ids)] == ids:
                return range(j, j + len(ids))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--skip", type=int, default=200, help="held-out items the reported evaluation uses")
    ap.add_argument("--items", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run_dir = find_run(args.run, args.runs_dir).resolve()
    _, _, tokenizer, model, step = load_run(str(run_dir), str(run_dir.parent))
    model.eval()
    items = eval_items("qa", None, run_dir / "data", seed=0)[args.skip:args.skip + args.items]
    right: dict[tuple[str, int], list[bool]] = defaultdict(list)
    whole: list[bool] = []
    for item in items:
        prompt = tokenizer.encode(prompts.qa_prompt(item.question, item.passage))
        target = tokenizer.encode(prompts.target_text(item.answer))
        ids = prompt + target
        span = subject_span(target, tokenizer, item.subject)
        if span is None or len(ids) > model.config.block_size:
            continue
        with torch.no_grad():
            predicted = model(torch.tensor([ids]))[0].argmax(-1).tolist()
        hits = [predicted[len(prompt) + k - 1] == target[k] for k in span]
        kind = "with passage" if item.passage else "closed-book"
        for n, hit in enumerate(hits):
            right[(kind, min(n, 3))].append(hit)
        whole.append(all(hits))
    print(f"{run_dir.name} at step {step}: {len(whole)} held-out answers whose subject was found")
    for (kind, n), hits in sorted(right.items()):
        position = ["first", "second", "third", "later"][n]
        print(f"  {kind:<13} {position:<7} subject token right {sum(hits) / len(hits):.3f}  ({len(hits)})")
    print(f"  every subject token right: {sum(whole) / len(whole):.3f}")


if __name__ == "__main__":
    main()
