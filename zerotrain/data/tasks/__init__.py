"""Fine-tuning tasks: direct question answering (``qa``) and abstractive summarization (``summarize``).

``check_tasks`` validates task names; ``task_pairs(name, split, cache_dir)`` gives (prompt, target)
pairs for fine-tuning; ``eval_items(name, n, cache_dir)`` a seeded sample of held-out items.
Summarization pairs are built once into ``<cache_dir>/summarize.jsonl`` (see ``summaries``).
"""
from __future__ import annotations

import difflib
import json
import logging
import random
from pathlib import Path

from . import prompts, qa, summaries

log = logging.getLogger("zerotrain")

TASKS = {
    "qa": "direct question answering with full-sentence answers (WordNet 3.0 facts)",
    "summarize": "one-line abstractive summaries (Debian package descriptions, Python docstrings)",
}


def check_tasks(names: list[str] | str) -> list[str]:
    """Task names from a list or "qa,summarize"; an unknown or repeated name raises ValueError."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    if not items or not all(items):
        raise ValueError(f"--tasks {','.join(items)!r} names no task; choose from {', '.join(TASKS)} "
                         "(e.g. --tasks qa,summarize)")
    for name in items:
        if name not in TASKS:
            close = difflib.get_close_matches(name, list(TASKS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown task '{name}' in --tasks; {hint}tasks: {', '.join(TASKS)}")
    if len(set(items)) != len(items):
        raise ValueError(f"--tasks {','.join(items)}: a task is named twice")
    return items


def summary_pairs(cache_dir: str | Path) -> list[dict]:
    """Every summarization pair (both splits), built once into ``cache_dir/summarize.jsonl``."""
    path = Path(cache_dir) / "summarize.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    sources = list(summaries.SOURCES)
    if not summaries.translation_files():
        log.warning("Debian package descriptions not found in %s (fetch them with `%s` as root); "
                    "summarization uses Python docstrings only", summaries.APT_LISTS, summaries.SET_UP)
        sources.remove("debian")
    pairs = summaries.build_pairs(sources)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    tmp.replace(path)
    log.info("summarization: %d pairs from %s -> %s", len(pairs), ", ".join(sources), path)
    return pairs


def task_pairs(name: str, split: str, cache_dir: str | Path) -> list[tuple[str, str]]:
    """(prompt, target text) pairs of ``name``'s ``split``."""
    if name == "qa":
        return [(prompts.qa_prompt(e.question, e.passage), prompts.target_text(e.answer))
                for e in qa.examples(split)]
    return [(prompts.summary_prompt(p["document"]), prompts.target_text(p["summary"]))
            for p in summary_pairs(cache_dir) if p["split"] == split]


def eval_items(name: str, n: int | None, cache_dir: str | Path, *, seed: int = 0) -> list:
    """Up to ``n`` held-out items (QAExample or summary pair dicts) in a seeded order."""
    items = qa.examples("test") if name == "qa" else [p for p in summary_pairs(cache_dir) if p["split"] == "test"]
    random.Random(seed).shuffle(items)
    return items if n is None else items[:n]


__all__ = ["TASKS", "check_tasks", "eval_items", "prompts", "qa", "summaries", "summary_pairs", "task_pairs"]
