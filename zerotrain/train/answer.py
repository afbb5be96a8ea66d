"""Answers and summaries from a model: batched greedy generation with the KV cache, stopped at the
end of the sentence; and the held-out evaluation of both tasks beside their baselines.

Prompts of equal token length are decoded together (one KV cache per batch, no padding, so a batch
gives exactly what one prompt alone would). A row stops at the end-of-text token, at a line
break after some text, or (``sentence=True``) right after the first ``.``, ``!`` or ``?`` that ends a word; rows
that stopped are carried along until the whole batch has.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from zerotrain.data import EOT
from zerotrain.data.tasks import prompts, qa, summaries
from zerotrain.model.generate import KVCache

_SENTENCE = re.compile(r"[.!?](?=\s|$)")


def _finish(text: str, *, sentence: bool) -> tuple[str, bool]:
    """(text cut at its stop, whether it has stopped)."""
    lead = len(text) - len(text.lstrip())               # line breaks before any text do not stop it
    cut = min([i for i in (text.find(EOT), text.find("\n", lead)) if i >= 0], default=len(text))
    stopped = cut < len(text)
    if sentence:
        m = _SENTENCE.search(text, 0, cut)
        if m:
            cut, stopped = m.end(), True
    return text[:cut], stopped


class Stopper:
    """Which tokens may end an answer (only those are decoded while generating)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.may_stop = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
        for i in range(tokenizer.vocab_size):
            text = tokenizer.decode([i])
            self.may_stop[i] = i == tokenizer.eot_id or any(c in text for c in ".!?\n")


@torch.no_grad()
def _decode_batch(model, ids: list[list[int]], *, max_new: int, stopper: Stopper, sentence: bool) -> list[str]:
    x = torch.tensor(ids, dtype=torch.long, device=next(model.parameters()).device)
    cache = KVCache.for_model(model, len(ids))
    out = [[] for _ in ids]
    done = [False] * len(ids)
    logits = model(x, kv_cache=cache, start_pos=0)
    for step in range(max_new):
        token = logits[:, -1, :].argmax(dim=-1)              # (B,)
        for r, t in enumerate(token.tolist()):
            if done[r]:
                continue
            out[r].append(t)
            if stopper.may_stop[t]:
                done[r] = _finish(stopper.tokenizer.decode(out[r]), sentence=sentence)[1]
        if all(done) or step == max_new - 1:
            break
        logits = model(token.unsqueeze(1), kv_cache=cache, start_pos=x.size(1) + step)
    return [_finish(stopper.tokenizer.decode(o), sentence=sentence)[0].strip() for o in out]


def generate_answers(model, tokenizer, prompt_texts: list[str], *, sentence: bool, max_new_tokens: int = 48,
                     batch_size: int = 32, stopper: Stopper | None = None) -> list[str]:
    """Greedy continuation of each prompt, cut at its stop; prompts must fit the context."""
    stopper = stopper or Stopper(tokenizer)
    block = model.config.block_size
    encoded = tokenizer.encode_batch(prompt_texts)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        if len(ids) >= block:
            raise ValueError(f"prompt {i} is {len(ids)} tokens; the model's context is {block} tokens")
        groups[len(ids)].append(i)
    was_training = model.training
    model.eval()
    answers: list[str] = [""] * len(prompt_texts)
    try:
        for length, members in sorted(groups.items()):
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                texts = _decode_batch(model, [encoded[i] for i in chunk], max_new=min(max_new_tokens, block - length),
                                      stopper=stopper, sentence=sentence)
                for i, text in zip(chunk, texts):
                    answers[i] = text
    finally:
        model.train(was_training)
    return answers


def answer_questions(model, tokenizer, items: list[qa.QAExample], **kw) -> list[str]:
    return generate_answers(model, tokenizer, [prompts.qa_prompt(e.question, e.passage) for e in items],
                            sentence=True, **kw)


def summarize_documents(model, tokenizer, documents: list[str], **kw) -> list[str]:
    return generate_answers(model, tokenizer, [prompts.summary_prompt(d) for d in documents], sentence=False, **kw)


def fits(tokenizer, prompt_text: str, block_size: int, *, room: int = 8) -> bool:
    return len(tokenizer.encode(prompt_text)) + room <= block_size


# ------------------------------------------------------------------ held-out evaluation
def qa_report(items: list[qa.QAExample], systems: dict[str, list[str]]) -> dict:
    """Scores of each system overall and split into closed-book / with-passage questions."""
    report = {}
    for name, preds in systems.items():
        entry = qa.score(preds, items)
        for part, keep in (("closed_book", lambda e: e.passage is None), ("with_passage", lambda e: e.passage)):
            idx = [i for i, e in enumerate(items) if keep(e)]
            entry[part] = qa.score([preds[i] for i in idx], [items[i] for i in idx])
        report[name] = entry
    return report


def summary_report(items: list[dict], systems: dict[str, list[str]]) -> dict:
    report = {}
    for name, preds in systems.items():
        entry = summaries.rouge(preds, [p["summary"] for p in items])
        for source in sorted({p["source"] for p in items}):
            idx = [i for i, p in enumerate(items) if p["source"] == source]
            entry[source] = summaries.rouge([preds[i] for i in idx], [items[i]["summary"] for i in idx])
        report[name] = entry
    return report


def lead_k(train_pairs: list[dict]) -> int:
    """k for the lead-k baseline: the mean summary length (words) of the training pairs, rounded."""
    lengths = [len(p["summary"].split()) for p in train_pairs] or [8]
    return max(1, round(sum(lengths) / len(lengths)))
