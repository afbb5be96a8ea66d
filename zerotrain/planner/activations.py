"""Activation memory of the zerotrain GPT per rank and micro-batch, read off its code.

What autograd keeps for backward, tensor by tensor (b = micro-batch, s = sequence, n = b·s tokens,
h = width, a = heads, t = tp, V = vocabulary, p = bytes of the compute dtype, f = bytes of its
accumulate dtype: 4, or 8 for fp64). Per transformer block:

=============================  =====================  =========================================
held by                        elements               dtype
=============================  =====================  =========================================
ln_1, ln_2 inputs              2·n·h                  compute
ln_1, ln_2 mean and rstd       4·n                    compute on CPU, accumulate on CUDA
c_attn input, c_fc input       2·n·h                  compute
attention (fused kernels)      q, k, v: 3·n·h/t;      compute; logsumexp f (fp32), padded to
                               output: n·h/t;         a multiple of 32 positions by CUDA's
                               logsumexp: b·a/t·s     memory-efficient kernel
attention (math)               q, kᵀ, v copies        upcast: f (bf16/fp16 → fp32)
                               3·n·h/t; probabilities
                               b·a/t·s²; with dropout
                               its mask and the
                               dropped probabilities
                               2·b·a/t·s²; output
                               n·h/t (compute)
GELU input, mlp.c_proj input   2·4·n·h/t              compute
dropout masks (dropout > 0)    2·n·h                  compute on CPU, bool on CUDA
=============================  =====================  =========================================

Residual adds, views, transposes and dropout at p = 0 keep nothing.

The output of the fused kernels is laid out (b, s, heads, head_dim), so ``y.transpose(1, 2)
.contiguous()`` is free and c_proj saves that same tensor. Outside the blocks: the token ids and
positions (int64), the embedding dropout mask, ln_f's input and statistics, lm_head's input, and
the loss: ``LanguageModelLoss`` upcasts 16-bit logits to fp32 and ``cross_entropy`` keeps the
fp32 log-probabilities, n·V·4 bytes (the vocabulary-parallel loss keeps its fp32 softmax shard,
n·V/t·4). Which SDPA kernel runs (``default_attention``): on CPU (torch 2.13) the flash kernel for
every dtype when dropout is 0, else the math path; on CUDA flash (or cuDNN, same bytes) for
bf16/fp16, memory-efficient for fp32, math for fp64. Only the math path holds s×s matrices.

The peak is what is held at the end of the forward plus the larger working set of the backward:
the loss's (the gradients of the log-probabilities and of the logits, 2·n·V·f, while the
log-probabilities are still held) or the last block's, at mlp.c_proj's backward (ln_f, lm_head and
the loss released; alive: the gradient entering the block, n·h·p, the tied wte/lm_head weight
gradient, V/t·h·p, which autograd sums with the embedding's before accumulating it, the gradient
of the GELU output, 4·n·h/t·p, and c_proj's weight gradient, 4·h²/t·p).

Activation checkpointing (non-reentrant, one checkpoint per block): the forward keeps each block's
input (n·h·p, saved by the checkpoint) and, on CPU, the CPU RNG state it stashes (5,056 bytes);
backward recomputes one block at a time, so the last block's working set adds its recomputed
activations (all it holds but its input).

Measured on CPU (``tests/unit/test_planner_activations.py``): the held bytes equal, to the byte,
what autograd saves and what the CPU allocator holds at the end of the forward (fp32, fp64, bf16;
flash and math+dropout; with and without checkpointing); the peak is within 0.2 % of the
allocator's. CPU bf16 matmuls add packing scratch the plan leaves out (a few n·h·2 bytes). The
CUDA column follows torch's kernels as written (flash, cuDNN and memory-efficient attention keep
q, k, v, the output and the logsumexp; dropout keeps a bool mask; LayerNorm keeps fp32 statistics).

The GPU case (24 × 2048, 16 heads, V = 50304, s = 2048, b = 8, bf16, flash): n·h = 33.55M, one
block holds 16·n·h·2 = 1.074 GB (+ 1 MB logsumexp, 0.3 MB statistics), 24 blocks 25.77 GB; ln_f
and lm_head inputs 0.134 GB; fp32 log-probabilities 3.297 GB; held at the end of the forward 29.2
GB. The loss's backward adds 2 × 3.297 GB: peak activations 35.8 GB. With stage-3 model states at
N = 1 (2 + 4 + 4 + 8 bytes per parameter, 23.68 GB) and the transient buffers (0.44 GB) the planned
device peak is 59.9 GB; measured on an H200: 59.8 GB (55.7 GiB, ``torch.cuda.max_memory_allocated``).
The formula this replaces (Korthikanti et al., s×s scores in every layer) said 95.1 GB of
activations.
"""
from __future__ import annotations

from dataclasses import dataclass

from zerotrain.planner.spec import ModelSpec

DEVICES = ("cpu", "cuda")
ATTENTION_KERNELS = ("flash", "efficient", "math")
CPU_RNG_STATE_BYTES = 5056   # torch.get_rng_state().numel(), stashed per checkpointed block


@dataclass(frozen=True)
class Activations:
    """Activation bytes per rank for one micro-batch.

    ``held_bytes``: kept for backward at the end of the forward (what saved-tensor hooks count,
    plus the RNG states checkpoints stash). ``peak_bytes``: held + the backward's largest
    working set (``backward_bytes``, named by ``backward_what``). ``parts``: held_bytes by what
    holds them."""

    attention: str
    held_bytes: int
    peak_bytes: int
    backward_bytes: int
    backward_what: str
    parts: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class _Dims:
    b: int
    s: int
    h: int
    a: int
    t: int
    L: int
    V: int | None
    p: int          # compute dtype bytes
    f: int          # accumulate dtype bytes (4, or 8 for fp64)
    cuda: bool
    dropout: float

    @property
    def n(self) -> int:
        return self.b * self.s

    @property
    def local(self) -> int:                       # attention width on this tp rank
        return self.h // self.t

    @property
    def hidden(self) -> int:                      # MLP width on this tp rank
        return -(-4 * self.h // self.t)

    @property
    def mask(self) -> int:                        # bytes per dropout-mask element
        return 1 if self.cuda else self.p


def default_attention(device: str, param_dtype: str, dropout: float = 0.0) -> str:
    """The kernel ``scaled_dot_product_attention`` runs for the zerotrain GPT in training
    (causal, no explicit mask, head_dim ≤ 256; CUDA: sm80 or newer)."""
    if device == "cpu":
        return "flash" if dropout == 0 else "math"
    return {"bf16": "flash", "fp16": "flash", "fp32": "efficient"}.get(param_dtype, "math")


def resolve_attention(attention: str, *, device: str, param_dtype: str, dropout: float) -> str:
    """``attention`` checked against what the device offers; ``"auto"`` → ``default_attention``."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is unknown: use 'cpu' or 'cuda'")
    if attention == "auto":
        return default_attention(device, param_dtype, dropout)
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention={attention!r} is unknown: use 'auto' or one of "
                         f"{', '.join(ATTENTION_KERNELS)}")
    why = None
    if device == "cpu" and attention == "efficient":
        why = "the memory-efficient kernel is CUDA-only; use 'flash' or 'math' on CPU"
    elif device == "cpu" and attention == "flash" and dropout:
        why = f"CPU's flash kernel takes no dropout (dropout={dropout}); use 'math' or 'auto'"
    elif device == "cuda" and attention == "flash" and param_dtype not in ("bf16", "fp16"):
        why = f"flash kernels take bf16/fp16, not {param_dtype}; use 'efficient' or 'auto'"
    elif device == "cuda" and attention == "efficient" and param_dtype == "fp64":
        why = "the memory-efficient kernel takes no fp64; use 'math' or 'auto'"
    if why:
        raise ValueError(f"attention={attention!r} on {device}: {why}")
    return attention


def _attention_parts(d: _Dims, kernel: str) -> list[tuple[str, int]]:
    hl, heads = d.local, d.a // d.t
    if kernel != "math":
        lse_len = -(-d.s // 32) * 32 if (kernel == "efficient" and d.cuda) else d.s
        return [("q, k, v", 3 * d.n * hl * d.p), ("attention output", d.n * hl * d.p),
                ("attention logsumexp", d.b * heads * lse_len * d.f)]
    probs = d.b * heads * d.s * d.s
    parts = [("q, kᵀ, v copies (math)", 3 * d.n * hl * d.f),
             ("attention probabilities (math)", probs * d.f)]
    if d.dropout:
        parts += [("attention dropout mask", probs * (1 if d.cuda else d.f)),
                  ("dropped attention probabilities", probs * d.f)]
    return parts + [("attention output", d.n * hl * d.p)]


def _block_parts(d: _Dims, kernel: str) -> list[tuple[str, int]]:
    """What one transformer block keeps for backward (its input is the first LayerNorm input)."""
    stat = d.f if d.cuda else d.p
    parts = [("layernorm inputs", 2 * d.n * d.h * d.p), ("layernorm statistics", 4 * d.n * stat),
             ("c_attn and c_fc inputs", 2 * d.n * d.h * d.p)]
    parts += _attention_parts(d, kernel)
    parts.append(("GELU input and mlp.c_proj input", 2 * d.n * d.hidden * d.p))
    if d.dropout:
        parts.append(("dropout masks", 2 * d.n * d.h * d.mask))
    return parts


def _outer_parts(d: _Dims) -> list[tuple[str, int]]:
    """Everything outside the blocks: embedding, final LayerNorm, lm_head, loss."""
    parts = [("token ids and positions", d.n * 8 + d.s * 8 + (d.n if d.t > 1 else 0))]
    if d.dropout:
        parts.append(("embedding dropout mask", d.n * d.h * d.mask))
    return parts + _tail_parts(d)


def _tail_parts(d: _Dims) -> list[tuple[str, int]]:
    """What ln_f, lm_head and the loss keep: all released before the last block's backward."""
    stat = d.f if d.cuda else d.p
    parts = [("ln_f input and statistics, lm_head input", 2 * d.n * d.h * d.p + 2 * d.n * stat)]
    if d.V is None:
        return parts
    if d.t == 1:     # cross_entropy: fp32 log-probabilities, the targets, the weight total
        return parts + [("log-probabilities (fp32 upcast)", d.n * d.V * d.f + d.n * 8 + d.f)]
    rows = -(-d.V // d.t)    # vocabulary-parallel loss: softmax shard, local ids, two masks, count
    return parts + [("softmax shard (fp32)", d.n * rows * d.f + d.n * 10 + 8)]


def _loss_backward(d: _Dims) -> int:
    """Bytes the loss's backward allocates beyond what the forward held, at its peak."""
    if d.V is None:
        return 0
    if d.t == 1:     # nll grad + log_softmax grad, after the targets were released
        return 2 * d.n * d.V * d.f - d.n * 8 - d.f
    rows = -(-d.V // d.t)
    return d.n * rows * d.f + (d.n * rows * d.p if d.p != d.f else 0)


def _block_backward(d: _Dims, recompute: int) -> int:
    """Bytes on top of the held ones while the last block runs mlp.c_proj's backward: the tail
    (ln_f, lm_head, loss) is released; alive are the gradient entering the block, the tied
    lm_head/wte weight gradient (summed with the embedding's before it is accumulated), the block's
    recomputed activations (checkpointing), the gradient of the GELU output and c_proj's weight
    gradient."""
    tail = sum(b for _, b in _tail_parts(d))
    tied = -(-d.V // d.t) * d.h * d.p if d.V else 0
    mlp = d.n * d.hidden * d.p + d.hidden * d.h * d.p
    return d.n * d.h * d.p + tied + recompute + mlp - tail


def activations(spec: ModelSpec, *, tp: int, micro_batch: int, seq_len: int, param_dtype: str,
                elem: int, device: str, attention: str, checkpointing: bool) -> Activations:
    """Activation bytes per rank for one micro-batch (``spec`` must have a shape)."""
    d = _Dims(b=micro_batch, s=seq_len, h=spec.n_embd, a=spec.n_head, t=tp, L=spec.n_layer,
              V=spec.vocab_size, p=elem, f=8 if param_dtype == "fp64" else 4,
              cuda=device == "cuda", dropout=spec.dropout)
    kernel = resolve_attention(attention, device=device, param_dtype=param_dtype,
                               dropout=spec.dropout)
    block = _block_parts(d, kernel)
    x = d.n * d.h * d.p                           # one block's input
    if checkpointing:
        rng = 0 if d.cuda else CPU_RNG_STATE_BYTES
        layers = [("block inputs (checkpointed)", d.L * (x + rng))]
        block_work = _block_backward(d, sum(b for _, b in block) - x)
        block_what = "the last block's recompute and backward"
    else:
        layers = [(f"{name} ×{d.L}", d.L * b) for name, b in block]
        block_work = _block_backward(d, 0)
        block_what = "the last block's backward"
    work, what = max((_loss_backward(d), "the loss's backward"), (block_work, block_what))
    parts = tuple(layers + _outer_parts(d))
    held = sum(b for _, b in parts)
    return Activations(attention=kernel, held_bytes=held, peak_bytes=held + work,
                       backward_bytes=work, backward_what=what, parts=parts)
