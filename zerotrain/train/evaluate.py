"""What a run learned: held-out perplexity and bits per byte, cloze accuracy, samples, baselines.

Every function here is collective over the data-parallel group: each rank scores its contiguous
share of the windows / passages and the sums are all-reduced. Ranks run the same number of
forward passes (a rank whose share is exhausted runs a dummy one), because at ZeRO stage 3
every forward gathers parameters and needs all ranks. Samples are generated on every rank in
lockstep (same prompt, same seed, no early stop), so every rank gets the same text.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from zerotrain.data import (EOT, TokenDataset, build_cloze, cloze_accuracy, lm_metrics,
                            num_eval_windows, unigram_cloze_baseline, unigram_perplexity)
from zerotrain.distributed import comm
from zerotrain.model import generate

from .placement import device_of, to_device

log = logging.getLogger("zerotrain")
DEFAULT_PROMPTS = ("In the beginning", "The Lord said to Moses,", "Jesus answered")


class FullLogits:
    """The model as generation and scoring see it: full-vocabulary logits on every rank.

    Under tensor parallelism the model returns this rank's vocabulary shard; the shards are
    gathered over the tp group (and padding columns cut off)."""

    def __init__(self, model, mesh):
        self.model, self.group = model, mesh.tp_group if mesh.tp > 1 else None
        self.config = model.config

    @property
    def training(self) -> bool:
        return self.model.training

    def parameters(self):
        return self.model.parameters()

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, idx, **kwargs):
        logits = self.model(idx, **kwargs)
        if self.group is None:
            return logits
        from zerotrain.parallel.tensor import gather_logits
        return gather_logits(logits, self.group, vocab_size=self.config.vocab_size)


def full_logits(model, mesh):
    return model if mesh.tp == 1 else FullLogits(model, mesh)


def _share(count: int, mesh) -> tuple[range, int]:
    """This rank's contiguous share of ``count`` items and the largest share of any rank."""
    per = math.ceil(count / mesh.dp)
    lo = min(count, mesh.dp_rank * per)
    return range(lo, min(count, lo + per)), per


def _sum(values: list[float], mesh) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=mesh.device)
    comm.all_reduce(t, mesh.dp_group)
    return t.tolist()


def _dummy_forward(model) -> None:
    model(torch.zeros(1, 1, dtype=torch.long, device=device_of(model)))


@torch.no_grad()
def heldout_metrics(model, dataset: TokenDataset, *, mesh, tokenizer, block_size: int,
                    max_windows: int | None = None, batch_size: int = 16) -> dict[str, float]:
    """Loss, perplexity and bits per byte over the non-overlapping windows of ``dataset`` (or
    ``max_windows`` of them spread evenly over it)."""
    total = num_eval_windows(dataset, block_size)
    count = total if max_windows is None else min(total, max_windows)
    share, per = _share(count, mesh)
    starts = np.arange(share.start, share.stop, dtype=np.int64) * total // count * block_size
    nll = tokens = nbytes = 0.0
    was_training = model.training
    model.eval()
    model = full_logits(model, mesh)
    for first in range(0, per, batch_size):
        chunk = starts[first:first + batch_size]
        if len(chunk) == 0:
            _dummy_forward(model)
            continue
        x, y = dataset.windows(chunk, block_size)
        x, y = to_device(x, device_of(model)), to_device(y, device_of(model))
        logits = model(x).float()
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        tokens += y.numel()
        nbytes += tokenizer.num_bytes(y.reshape(-1).tolist())
    model.train(was_training)
    nll, tokens, nbytes = _sum([nll, tokens, nbytes], mesh)
    out = lm_metrics(nll, int(tokens), int(nbytes))
    out["windows"] = count
    return out


@torch.no_grad()
def cloze_eval(model, passages, *, mesh, tokenizer, block_size: int) -> float:
    """Greedy whole-word accuracy over ``passages``, shared over the ranks."""
    share, per = _share(len(passages), mesh)
    mine = [passages[i] for i in share]
    was_training = model.training
    model.eval()
    correct = 0.0
    if mine:
        logits = full_logits(model, mesh)
        on_device = lambda ids: logits(ids.to(device_of(model)))  # noqa: E731
        correct = round(cloze_accuracy(on_device, tokenizer, mine, max_len=block_size) * len(mine))
    for _ in range(per - len(mine)):
        _dummy_forward(model)
    model.train(was_training)
    return _sum([correct], mesh)[0] / len(passages)


def sample_texts(model, tokenizer, prompts, *, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 40, top_p: float | None = None, greedy: bool = False,
                 seed: int = 0, mesh=None) -> list[str]:
    """One continuation per prompt (prompt included), cut at the end-of-text token."""
    model = model if mesh is None else full_logits(model, mesh)
    texts = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        device = device_of(model)
        gen = torch.Generator(device=device).manual_seed(seed)
        out = generate(model, torch.tensor([ids], dtype=torch.long, device=device), max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                       eos_id=None, generator=gen)
        texts.append(tokenizer.decode(out[0].tolist()).split(EOT)[0])
    return texts


def unigram_baseline(data, tokenizer, *, block_size: int, windows: int) -> dict[str, float]:
    """The add-one unigram model scored on exactly the tokens the model predicted."""
    train = np.load(data.train_path, mmap_mode="r")
    held = np.load(data.heldout_path, mmap_mode="r")
    return unigram_perplexity(np.asarray(train), np.asarray(held[1:windows * block_size + 1]),
                              tokenizer.vocab_size, tokenizer=tokenizer)


def _cloze_passages(text: str, tokenizer, n: int, *, seed: int) -> list:
    """``n`` passages, or a tenth of that when the held-out text has too few, else none."""
    for count in (n, n // 10):
        if count:
            try:
                return build_cloze(text, tokenizer, n=count, seed=seed)
            except ValueError:
                continue
    if n:
        log.warning("the held-out text has too few cloze passages; skipping the cloze evaluation")
    return []


def evaluate_run(model, data, tokenizer, *, mesh, block_size: int, cloze_passages: int,
                 prompts=DEFAULT_PROMPTS, sample_tokens: int = 48, seed: int = 0) -> dict:
    """The full report of a run (collective): metrics, baselines and samples."""
    held = TokenDataset(data.heldout_path, block_size)
    results = {"heldout_books": list(data.heldout_names),
               "model": heldout_metrics(model, held, mesh=mesh, tokenizer=tokenizer, block_size=block_size)}
    results["unigram"] = unigram_baseline(data, tokenizer, block_size=block_size,
                                          windows=int(results["model"]["windows"]))
    passages = _cloze_passages(data.heldout_text, tokenizer, cloze_passages, seed=seed)
    if passages:
        results["cloze"] = {"passages": len(passages),
                            "accuracy": cloze_eval(model, passages, mesh=mesh, tokenizer=tokenizer,
                                                   block_size=block_size),
                            "baseline": unigram_cloze_baseline(data.train_text, passages)}
    if sample_tokens:
        texts = sample_texts(model, tokenizer, prompts, max_new_tokens=sample_tokens, seed=seed, mesh=mesh)
        results["samples"] = dict(zip(prompts, texts))
        results["sampling"] = {"temperature": 0.8, "top_k": 40, "seed": seed}
    return results


def format_results(results: dict) -> str:
    m, u = results["model"], results["unigram"]
    lines = []
    if results.get("training"):
        t = results["training"]
        loss = t["final_train_loss"]
        final = "" if loss is None else f"; train loss {loss:.3f} (mean of the last 10 steps)"
        lines.append(f"trained {t['step']} steps, {t['tokens']:,} tokens in {t['elapsed_s']:.0f}s "
                     f"({t['tokens_per_s']:,} tokens/s){final}")
    lines += [f"held-out text ({', '.join(results['heldout_books'])}; {int(m['tokens']):,} tokens, "
             f"{int(m['bytes']):,} bytes):",
             f"  model    loss {m['loss']:6.3f}   perplexity {m['perplexity']:9.2f}   "
             f"bits/byte {m['bits_per_byte']:.3f}",
             f"  unigram  loss {u['loss']:6.3f}   perplexity {u['perplexity']:9.2f}   "
             f"bits/byte {u['bits_per_byte']:.3f}   (add-one unigram baseline)"]
    if "cloze" in results:
        c = results["cloze"]
        lines.append(f"cloze (LAMBADA-style last word, {c['passages']} held-out passages): "
                     f"model {100 * c['accuracy']:.1f}%   frequent-word baseline {100 * c['baseline']:.1f}%")
    if "samples" in results:
        s = results["sampling"]
        lines.append(f"samples (temperature {s['temperature']}, top-k {s['top_k']}, seed {s['seed']}):")
        for text in results["samples"].values():
            lines.append("  > " + " ".join(text.split()))
    return "\n".join(lines)
