"""``zerotrain ask RUN "question" [--passage FILE]`` and ``zerotrain summarize RUN FILE|-``.

Both load the run's latest checkpoint in one process and generate with the KV cache, all questions
(documents) in one batched call: answers greedily, summaries by beam search (``--beams``,
``--length-penalty`` change either); answers stop at the end of their first sentence, summaries
at the end of their line. Every input is checked before the model is loaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zerotrain.data.tasks import prompts

from .options import Options, UsageError

ROOM = 16          # tokens an answer or summary needs after its prompt


def _parser(prog: str, what: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"zerotrain {prog}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help=f"run name (in --runs-dir) or run directory, e.g. {Options().run_name}-ft")
    p.add_argument("inputs", nargs="+", help=what)
    p.add_argument("--runs-dir", default="runs", help="where runs live (default ./runs)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    add_decoding_flags(p, prog)
    return p


def add_decoding_flags(p: argparse.ArgumentParser, command: str) -> None:
    """``--beams`` and ``--length-penalty``, their defaults named from ``DECODING`` (``eval``: each task's)."""
    from .answer import DECODING
    tasks = {"ask": ["qa"], "summarize": ["summarize"]}.get(command, list(DECODING))

    def default(key: str) -> str:
        if len(tasks) == 1:
            return str(DECODING[tasks[0]][key])
        return ", ".join(f"{t} {DECODING[t][key]}" for t in tasks)
    p.add_argument("--beams", type=int, default=None, help=f"beam width, 1 for greedy (default {default('beams')})")
    p.add_argument("--length-penalty", type=float, default=None,
                   help=f"a finished beam's score is log-probability / length**this (default {default('length_penalty')})")


def check_decoding(args) -> None:
    if args.beams is not None and args.beams < 1:
        raise UsageError(f"--beams {args.beams}: must be >= 1 (1 is greedy)")
    if args.length_penalty is not None and not args.length_penalty >= 0:
        raise UsageError(f"--length-penalty {args.length_penalty}: must be >= 0 (0 ranks beams by log-probability alone)")


def _read(path: str, what: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} file not found: {path}; pass an existing text file or - for standard input") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} file {path} is not UTF-8 text") from None


def _check_fit(tokenizer, block: int, text: str, label: str, *, words: int) -> None:
    n = len(tokenizer.encode(text))
    if n + ROOM > block:
        over = n + ROOM - block
        raise UsageError(f"{label} takes {n} tokens with its prompt, but the model's context is {block} tokens "
                         f"and the answer needs {ROOM} of them; shorten it by at least {over} tokens "
                         f"(about {max(1, round(words * (block - ROOM) / n))} words fit)")


def _load(args):
    from .inference import load_run
    from .spawn import configure_logging
    configure_logging(0, quiet=True)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    check_decoding(args)
    opts, _, tokenizer, model, _ = load_run(args.run, args.runs_dir)
    return tokenizer, model


def cli_ask(argv: list[str]) -> int:
    from .answer import decoding, generate_answers
    p = _parser("ask", "one or more questions")
    p.add_argument("--passage", default=None, help="a text file (or -) the answers should come from")
    args = p.parse_args(argv)
    try:
        for q in args.inputs:
            if not q.strip():
                raise UsageError("the question is empty; ask something, e.g. "
                                 f"zerotrain ask {args.run} \"What is the capital of Peru?\"")
        passage = _read(args.passage, "--passage") if args.passage else None
        if passage is not None and not passage.strip():
            raise UsageError(f"--passage {args.passage} is empty; give a text that holds the answer, or leave it out")
        tokenizer, model = _load(args)
        texts = [prompts.qa_prompt(q, passage) for q in args.inputs]
        for q, text in zip(args.inputs, texts):
            _check_fit(tokenizer, model.config.block_size, text, f"the question {q[:40]!r}"
                       + (" with its passage" if passage else ""), words=len(text.split()))
    except UsageError as e:
        print(f"zerotrain ask: error: {e}", file=sys.stderr)
        return 2
    answers = generate_answers(model, tokenizer, texts, sentence=True, max_new_tokens=args.max_new_tokens,
                               **decoding("qa", args.beams, args.length_penalty))
    for q, a in zip(args.inputs, answers):
        print(a if len(args.inputs) == 1 else f"Q: {q}\nA: {a}")
    return 0


def cli_summarize(argv: list[str]) -> int:
    from .answer import decoding, generate_answers
    args = _parser("summarize", "text files to summarize, - for standard input").parse_args(argv)
    try:
        docs = [_read(path, "document") for path in args.inputs]
        for path, doc in zip(args.inputs, docs):
            if not doc.strip():
                raise UsageError(f"document {path} is empty; give a text to summarize")
        tokenizer, model = _load(args)
        texts = [prompts.summary_prompt(d) for d in docs]
        for path, doc, text in zip(args.inputs, docs, texts):
            label = "the document on standard input" if path == "-" else f"document {path}"
            _check_fit(tokenizer, model.config.block_size, text, label, words=len(doc.split()))
    except UsageError as e:
        print(f"zerotrain summarize: error: {e}", file=sys.stderr)
        return 2
    summaries = generate_answers(model, tokenizer, texts, sentence=False, max_new_tokens=args.max_new_tokens,
                                 **decoding("summarize", args.beams, args.length_penalty))
    for path, s in zip(args.inputs, summaries):
        print(s if len(args.inputs) == 1 else f"{path}: {s}")
    return 0
