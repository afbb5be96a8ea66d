"""Held-out evaluation of a run on a task, beside the task's baselines, in one process.

QA: exact match, token F1 and full-sentence share of the run's answers; baselines: the question
copied as the answer, the nearest WordNet gloss by word overlap, and the pretrained model zero-shot
(the fine-tuning run's base, prompted with the same template and decoded alike). Summarization: ROUGE-1/2/L F1;
baselines: the first k words of the document (k = mean training summary length), its first
sentence, and the pretrained model zero-shot. Held-out documents that do not fit the context are
left out (and counted).
"""
from __future__ import annotations

from pathlib import Path

from zerotrain.data.tasks import eval_items, qa, summaries, summary_pairs

from .answer import answer_questions, decoding, documents_that_fit, lead_k, qa_report, summarize_documents, summary_report


def evaluate_qa(model, tokenizer, *, items: list, base_model=None, **decode) -> dict:
    systems = {"model": answer_questions(model, tokenizer, items, **decode),
               "copy question": qa.copy_question(items), "nearest gloss": qa.NearestGloss()(items)}
    if base_model is not None:
        systems["pretrained zero-shot"] = answer_questions(base_model, tokenizer, items, **decode)
    report = qa_report(items, systems)
    return {"task": "qa", "scores": report, "examples": [
        {"question": e.question, "passage": e.passage, "reference": e.answer, "answer": a}
        for e, a in zip(items[:5], systems["model"][:5])]}


def evaluate_summaries(model, tokenizer, *, items: list, cache_dir, base_model=None, **decode) -> dict:
    block = model.config.block_size
    kept = documents_that_fit(tokenizer, items, block)
    k = lead_k([p for p in summary_pairs(cache_dir) if p["split"] == "train"])
    docs = [p["document"] for p in kept]
    systems = {"model": summarize_documents(model, tokenizer, docs, **decode),
               f"lead-{k} words": [summaries.lead_words(d, k) for d in docs],
               "first sentence": [summaries.first_sentence(d) for d in docs]}
    if base_model is not None:
        systems["pretrained zero-shot"] = summarize_documents(base_model, tokenizer, docs, **decode)
    return {"task": "summarize", "scores": summary_report(kept, systems), "left_out_too_long": len(items) - len(kept),
            "examples": [{"document": p["document"], "reference": p["summary"], "summary": s}
                         for p, s in zip(kept[:5], systems["model"][:5])]}


def evaluate_task(task: str, model, tokenizer, *, run_dir: Path, examples: int | None, base_model=None,
                  seed: int = 0, beams: int | None = None, length_penalty: float | None = None) -> dict:
    """Scores beside the baselines; both models decode alike (the task's ``DECODING`` unless given)."""
    cache = Path(run_dir) / "data"
    items = eval_items(task, examples, cache, seed=seed)
    decode = decoding(task, beams, length_penalty)
    if task == "qa":
        result = evaluate_qa(model, tokenizer, items=items, base_model=base_model, **decode)
    else:
        result = evaluate_summaries(model, tokenizer, items=items, cache_dir=cache, base_model=base_model, **decode)
    return {**result, "decoding": decode}


def _row(name: str, values: list[float], width: int = 22) -> str:
    return f"  {name:<{width}}" + "".join(f"{v:>10.3f}" for v in values)


def _decoding_words(d: dict | None) -> str:
    if not d or d["beams"] == 1:
        return "greedy"
    return f"beam search, {d['beams']} beams, length penalty {d['length_penalty']:g}"


def format_task(result: dict) -> str:
    scores = result["scores"]
    how = _decoding_words(result.get("decoding"))
    if result["task"] == "qa":
        n = scores["model"]["examples"]
        lines = [f"question answering, {n} held-out questions (half closed-book, half with a passage), {how}:",
                 f"  {'':<22}{'EM':>10}{'F1':>10}{'sentence':>10}{'F1 closed':>10}{'F1 passage':>11}"]
        for name, s in scores.items():
            lines.append(_row(name, [s["exact_match"], s["f1"], s["full_sentence"], s["closed_book"]["f1"],
                                     s["with_passage"]["f1"]]))
        for ex in result["examples"][:2]:
            lines.append(f"  Q: {ex['question']}" + (f"   [passage: {ex['passage']}]" if ex["passage"] else ""))
            lines.append(f"  A: {ex['answer']}   (reference: {ex['reference']})")
        return "\n".join(lines)
    n = scores["model"]["examples"]
    sources = [k for k in scores["model"] if k in summaries.SOURCES]
    lines = [f"summarization, {n} held-out documents ({result['left_out_too_long']} longer than the context "
             f"left out), {how}, ROUGE F1:",
             f"  {'':<22}{'R-1':>10}{'R-2':>10}{'R-L':>10}" + "".join(f"{'R-L ' + s[:6]:>11}" for s in sources)]
    for name, s in scores.items():
        lines.append(_row(name, [s["rouge1"], s["rouge2"], s["rougeL"]] + [s[src]["rougeL"] for src in sources]))
    for ex in result["examples"][:2]:
        lines.append(f"  document: {' '.join(ex['document'].split())[:160]}...")
        lines.append(f"  summary:  {ex['summary']}   (reference: {ex['reference']})")
    return "\n".join(lines)
