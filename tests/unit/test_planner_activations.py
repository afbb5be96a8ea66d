"""The planner's activation bytes against what torch holds for a small zerotrain GPT on CPU
(``activation_probe.measure``: saved-tensor bytes, and the CPU allocator's bytes at the end of the
forward and at the peak of forward + backward).

Left out of the plan and so of the bf16 peak checks: CPU bf16 matmuls allocate packing scratch
(oneDNN) during backward, measured 1.3-3.5 n·h·2 bytes (h = 64-512), which moves the peak by
3-12 % in these tiny models when a block's backward, not the loss's, is the peak.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from activation_probe import measure as probe
from zerotrain.model import GPT, GPTConfig
from zerotrain.planner import ModelSpec, plan
from zerotrain.planner.activations import (CPU_RNG_STATE_BYTES, default_attention,
                                          resolve_attention)

NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}


class _Checkpointed(torch.nn.Module):
    """One block under non-reentrant activation checkpointing."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, kv_cache=None, start_pos=0):
        return checkpoint(self.block, x, use_reentrant=False)


def measure(config: GPTConfig, dtype: torch.dtype, batch: int, *, ckpt: bool) -> dict[str, int]:
    torch.manual_seed(0)
    model = GPT(config).to(dtype)
    if ckpt:
        model.blocks = torch.nn.ModuleList(_Checkpointed(b) for b in model.blocks)
    idx = torch.randint(0, config.vocab_size, (batch, config.block_size))
    targets = torch.randint(0, config.vocab_size, (batch, config.block_size))
    return probe(model, idx, targets)


def predict(config: GPTConfig, dtype: torch.dtype, batch: int, *, ckpt: bool, **kw):
    p = plan(ModelSpec.from_config(config), stage=0, dp=1, param_dtype=NAMES[dtype],
             micro_batch=batch, activation_checkpointing=ckpt, device="cpu", **kw)
    return p.activations


SMALL = dict(vocab_size=512, block_size=64, n_layer=3, n_head=4, n_embd=64)   # the loss peaks
WIDE = dict(vocab_size=16, block_size=48, n_layer=2, n_head=2, n_embd=64)     # a block peaks


@pytest.mark.parametrize("shape", [SMALL, WIDE], ids=["loss-peak", "block-peak"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["flash", "math+dropout"])
def test_saved_and_peak_bytes_match_the_plan(shape, dtype, dropout):
    config = GPTConfig(**shape, dropout=dropout)
    got = measure(config, dtype, 2, ckpt=False)
    act = predict(config, dtype, 2, ckpt=False)
    assert act.attention == ("flash" if dropout == 0 else "math")
    assert act.held_bytes == got["saved"] == got["held"]
    assert act.peak_bytes == pytest.approx(got["peak"], rel=0.005), act.backward_what


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bf16_saved_bytes_match_including_the_fp32_loss_and_math_upcast(dropout):
    """bf16: the log-probabilities are fp32 (the loss upcasts the logits); with dropout the math
    path on CPU upcasts q, k, v and the s×s probabilities to fp32 as well."""
    config = GPTConfig(**SMALL, dropout=dropout)
    got = measure(config, torch.bfloat16, 2, ckpt=False)
    act = predict(config, torch.bfloat16, 2, ckpt=False)
    assert act.held_bytes == got["saved"] == got["held"]
    # the loss peaks: CPU bf16 matmul scratch, which the plan leaves out, is not part of it
    assert act.peak_bytes == pytest.approx(got["peak"], rel=0.005)


@pytest.mark.parametrize("shape", [SMALL, WIDE], ids=["loss-peak", "block-peak"])
def test_activation_checkpointing_per_block(shape):
    """Non-reentrant checkpoint per block: the forward keeps each block's input (and the CPU RNG
    state); backward recomputes one block at a time."""
    config = GPTConfig(**shape)
    got = measure(config, torch.float32, 2, ckpt=True)
    act = predict(config, torch.float32, 2, ckpt=True)
    full = predict(config, torch.float32, 2, ckpt=False)
    assert act.held_bytes == got["held"]
    # the block inputs are saved tensors (the checkpoint saves them); the RNG states are not
    assert got["saved"] == act.held_bytes - config.n_layer * CPU_RNG_STATE_BYTES
    assert act.peak_bytes == pytest.approx(got["peak"], rel=0.005)
    assert act.held_bytes < 0.5 * full.held_bytes


def test_checkpointing_row_of_the_plan_and_its_tp_traffic():
    config = GPTConfig(**SMALL)
    spec = ModelSpec.from_config(config)
    kw = dict(stage=3, dp=2, param_dtype="fp32", micro_batch=2)
    ck, no = plan(spec, activation_checkpointing=True, **kw), plan(spec, **kw)
    assert ck.activations_bytes == ck.activations.peak_bytes < no.activations_bytes
    assert ck.total_bytes - no.total_bytes == ck.activations_bytes - no.activations_bytes
    assert ck.comm.dp_bytes == no.comm.dp_bytes      # recompute runs while the unit is gathered


def test_default_attention_per_device_and_errors():
    assert [default_attention("cpu", d) for d in ("fp32", "bf16", "fp64")] == ["flash"] * 3
    assert default_attention("cpu", "bf16", 0.1) == "math"
    assert [default_attention("cuda", d) for d in ("bf16", "fp16", "fp32", "fp64")] == [
        "flash", "flash", "efficient", "math"]
    with pytest.raises(ValueError, match=r"attention='flash' on cuda: flash kernels take "
                                         r"bf16/fp16, not fp32; use 'efficient' or 'auto'"):
        resolve_attention("flash", device="cuda", param_dtype="fp32", dropout=0.0)
    with pytest.raises(ValueError, match=r"attention='efficient' on cpu: .*CUDA-only"):
        resolve_attention("efficient", device="cpu", param_dtype="fp32", dropout=0.0)
    with pytest.raises(ValueError, match=r"device='tpu' is unknown"):
        resolve_attention("auto", device="tpu", param_dtype="fp32", dropout=0.0)
    with pytest.raises(ValueError, match=r"dropout=1.5: must be a probability in \[0, 1\)"):
        ModelSpec.from_params(1e6, dropout=1.5)


def test_math_attention_holds_the_score_matrices():
    config = GPTConfig(**SMALL)
    flash = predict(config, torch.float32, 2, ckpt=False, attention="flash")
    math_ = predict(config, torch.float32, 2, ckpt=False, attention="math")
    b, a, s, L = 2, config.n_head, config.block_size, config.n_layer
    # math: fp32 copies of q, kᵀ, v and the s×s probabilities instead of q, k, v + logsumexp
    assert math_.held_bytes - flash.held_bytes == L * (b * a * s * s * 4 - b * a * s * 4)


@pytest.mark.parametrize("stage", [0, 2])
def test_shard_model_activation_checkpointing_reduces_activations_as_planned(stage):
    """zerotrain's own per-unit checkpointing (shard_model(activation_checkpointing=True)) keeps
    what the plan's checkpointing row says: each block's input, not its activations. (At stage 3
    the saved weights are views of a buffer freed after the forward, which this probe cannot tell
    from activations; the stage does not change what is saved.)"""
    import zerotrain
    config = GPTConfig(**SMALL)
    saved = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = zerotrain.shard_model(GPT(config), stage=stage, activation_checkpointing=ckpt)
        idx = torch.randint(0, config.vocab_size, (2, config.block_size))
        saved[ckpt] = probe(model, idx, torch.roll(idx, -1, 1))["saved"]
    plain, ckpt = (predict(config, torch.float32, 2, ckpt=c) for c in (False, True))
    assert saved[False] == plain.held_bytes
    assert saved[True] == ckpt.held_bytes - config.n_layer * CPU_RNG_STATE_BYTES
    reduction, predicted = saved[False] - saved[True], plain.held_bytes - ckpt.held_bytes
    assert reduction == pytest.approx(predicted, rel=0.2) and reduction > 0.5 * saved[False]
