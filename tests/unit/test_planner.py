"""The memory/communication planner reproduces the ZeRO paper's numbers and zerotrain's layout."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from zerotrain.planner import (DEFAULT_RUNTIME_OVERHEAD_BYTES, ModelSpec, UnitSpec, cli_estimate,
                               fits, plan, recommend)

MIXED = dict(param_dtype="bf16", reduce_dtype="bf16")  # the paper's setting: K = 12


def _ms(spec, stage, dp, **kw):
    return plan(spec, stage=stage, dp=dp, **kw).model_states_bytes


# ---------------------------------------------------------------- the paper's numbers
def test_paper_table_7_5b_on_64():
    spec, psi, n = ModelSpec.from_params(7.5e9), 7_500_000_000, 64
    got = [_ms(spec, s, n, **MIXED) for s in range(4)]
    assert got == [16 * psi, 4 * psi + 12 * psi // n, 2 * psi + 14 * psi // n, 16 * psi // n]
    assert [round(b / 1e9, 3 if b < 10e9 else 1) for b in got] == [120.0, 31.4, 16.6, 1.875]
    assert f"{got[3] / 1e9:.2f}" == "1.88"


def test_one_trillion_on_1024_is_15_6_gb():
    p = plan(ModelSpec.from_params(1e12), stage=3, dp=1024, **MIXED)
    assert p.model_states_bytes == 15_625_000_000
    assert round(p.model_states_bytes / 1e9, 1) == 15.6


def test_pure_fp32_formulas_at_n2():
    spec = ModelSpec(name="m", units=(UnitSpec("root", 1000), UnitSpec("b0", 600, 10)))
    psi = 1610
    got = [_ms(spec, s, 2, param_dtype="fp32") for s in range(4)]
    assert got == [16 * psi, 8 * psi + 8 * psi // 2, 4 * psi + 12 * psi // 2, 16 * psi // 2]
    p = plan(spec, stage=1, dp=2, param_dtype="fp32")
    assert (p.master_bytes, p.reduce_dtype) == (0, "fp32")  # the shard is the master
    # the only transient: the peer's half of the largest unit (root, 1000) received while reducing
    assert [(e.name, e.bytes) for e in p.extras] == [("reduce scratch", 500 * 4)]
    assert p.comm_buffers_bytes == 500 * 4


def test_mixed_precision_with_fp32_reductions_and_sgd():
    spec, psi = ModelSpec.from_params(1000), 1000
    assert _ms(spec, 0, 4, param_dtype="bf16") == (2 + 4 + 4 + 8) * psi  # engine default reduce
    assert _ms(spec, 2, 4, param_dtype="bf16") == 2 * psi + (4 + 4 + 8) * psi // 4
    assert _ms(spec, 1, 4, param_dtype="fp32", optimizer="sgd") == 8 * psi
    assert _ms(spec, 1, 4, param_dtype="fp32", optimizer="sgd-momentum") == 8 * psi + psi
    p = plan(spec, stage=3, dp=4, param_dtype=torch.float64)
    assert (p.master_dtype, p.master_bytes, p.model_states_bytes) == ("fp64", 0, 32 * psi // 4)


def test_turing_nlg_fits_with_zero1_tp4_but_not_without_zero():
    spec = ModelSpec.from_params(17.2e9)   # 256 V100s: tp 4 x dp 64, or tp 16 x dp 16
    paper = dict(param_dtype="fp16", reduce_dtype="fp16")
    zero1 = plan(spec, stage=1, dp=64, tp=4, **paper)
    tp16 = plan(spec, stage=0, dp=16, tp=16, **paper)
    tp4 = plan(spec, stage=0, dp=64, tp=4, **paper)
    assert zero1.numel_per_tp_rank == 4_300_000_000
    assert zero1.model_states_bytes == 4 * 4_300_000_000 + 12 * 4_300_000_000 // 64
    assert fits(zero1, 32e9, measure="model_states") and fits(tp16, 32e9, measure="model_states")
    assert not fits(tp4, 32e9, measure="model_states")
    assert tp4.model_states_bytes == 16 * 4_300_000_000


# ---------------------------------------------------------------- communication
def test_comm_volumes_2_2_2_3_psi():
    spec, psi, n = ModelSpec.from_params(4000), 4000, 4
    plans = [plan(spec, stage=s, dp=n, param_dtype="bf16") for s in range(4)]
    assert [p.comm.dp_elements for p in plans] == [2 * psi, 2 * psi, 2 * psi, 3 * psi]
    # all-reduce of fp32 grads; reduce-scatter fp32 + all-gather(s) of bf16 params
    assert [p.comm.dp_bytes for p in plans] == [8 * psi, 6 * psi, 6 * psi, 8 * psi]
    assert [p.comm.dp_wire_bytes for p in plans] == [6 * psi, 4.5 * psi, 4.5 * psi, 6 * psi]
    assert plan(spec, stage=3, dp=1, param_dtype="bf16").comm.dp_wire_bytes == 0
    assert plans[0].comm.tp_elements == 0


def _shaped(n_layer=3, h=16, a=4, vocab=100):
    return ModelSpec.from_params(10_000, n_layer=n_layer, n_embd=h, n_head=a, vocab_size=vocab)


def test_tensor_parallel_comm_megatron():
    spec, b, s, h = _shaped(), 2, 8, 16
    p = plan(spec, stage=0, dp=1, tp=2, param_dtype="bf16", micro_batch=b, seq_len=s)
    elems = (3 * 4 + 2) * 2 * b * s * h       # 4 all-reduces per block + embedding + lm_head
    assert (p.comm.tp_elements, p.comm.tp_bytes, p.comm.tp_wire_bytes) == (
        elems, 2 * elems, elems)
    ck = plan(spec, stage=0, dp=1, tp=2, param_dtype="bf16", micro_batch=b, seq_len=s,
              activation_checkpointing=True)
    assert ck.comm.tp_elements == (3 * 6 + 2) * 2 * b * s * h


# ---------------------------------------------------------------- activations
def test_activations_closed_form_bf16_flash_on_cuda():
    """One block holds 16·n·h compute-dtype elements under fused attention (no s×s scores), plus
    fp32 LayerNorm statistics and logsumexp; the loss holds fp32 log-probabilities and its
    backward adds two more n·V fp32 buffers (see activations.py)."""
    spec = _shaped()                       # s=8 b=2 h=16 a=4 L=3 V=100
    n, h, s, b, a, V = 16, 16, 8, 2, 4, 100
    block = 16 * n * h * 2 + 4 * n * 4 + b * a * s * 4
    outer = n * 8 + s * 8 + (2 * n * h * 2 + 2 * n * 4) + (n * V * 4 + n * 8 + 4)
    p = plan(spec, stage=0, dp=1, param_dtype="bf16", micro_batch=b, seq_len=s, device="cuda")
    assert p.activations.attention == "flash"
    assert p.activations.held_bytes == 3 * block + outer
    assert p.activations_bytes == 3 * block + outer + 2 * n * V * 4 - n * 8 - 4
    fp32 = plan(spec, stage=0, dp=1, param_dtype="fp32", micro_batch=b, seq_len=s, device="cuda")
    assert fp32.activations.attention == "efficient"   # logsumexp padded to 32 positions
    assert fp32.activations.held_bytes == 3 * (16 * n * h * 4 + 4 * n * 4 + b * a * 32 * 4) + (
        n * 8 + s * 8 + 2 * n * h * 4 + 2 * n * 4 + n * V * 4 + n * 8 + 4)


def test_issue_12_run_on_one_h200_within_10_percent():
    """24 × 2048, 16 heads, V = 50304, s = 2048, b = 8, bf16, fp32 reduce, stage 3, N = 1:
    measured peak 59.8 GB (55.7 GiB, torch.cuda.max_memory_allocated). The old model (Korthikanti,
    s×s scores in every layer) said 95.1 GB of activations, 119.2 GB in all."""
    spec = ModelSpec.from_params(1315819520, n_layer=24, n_embd=2048, n_head=16, vocab_size=50304)
    p = plan(spec, stage=3, dp=1, param_dtype="bf16", reduce_dtype="fp32", micro_batch=8,
             seq_len=2048, device="cuda")
    assert p.model_states_bytes == 18 * 1315819520
    assert round(p.activations.held_bytes / 1e9, 1) == 29.2
    assert round(p.activations_bytes / 1e9, 1) == 35.8
    assert p.total_bytes == pytest.approx(59.8e9, rel=0.01)
    assert p.peak_rss_bytes == DEFAULT_RUNTIME_OVERHEAD_BYTES      # the host holds no model bytes


def test_no_shape_means_no_activations_and_a_note():
    p = plan(ModelSpec.from_params(1e6), stage=2, dp=2, param_dtype="bf16", seq_len=64)
    assert p.activations_bytes == 0
    assert any("n_layer, n_embd and n_head are unknown" in n for n in p.notes)
    assert any("one sharding unit" in n for n in p.notes)


# ---------------------------------------------------------------- units, padding, transients
class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d)
        self.ln = nn.LayerNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(2))


class _Toy(nn.Module):
    def __init__(self, d=4, vocab=10):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(2))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight


def test_units_from_module_on_meta_tied_once_nested_list_stays_in_block():
    with torch.device("meta"):
        spec = ModelSpec.from_module(_Toy())
    block = UnitSpec("blocks.0", split=4 * 12 + 12, replicated=8 + 2 * 16)
    assert spec.units == (UnitSpec("root", 40), block, UnitSpec("blocks.1", 60, 40))
    assert spec.numel() == 40 + 2 * 100
    assert spec.numel(tp=4) == 10 + 2 * (15 + 40)


def test_padding_and_transients_named():
    spec = ModelSpec(name="m", units=(UnitSpec("root", 10), UnitSpec("b0", 7), UnitSpec("b1", 5)))
    p2 = plan(spec, stage=2, dp=3, param_dtype="fp32")       # padded 12, 9, 6 = 27
    assert (p2.params_bytes, p2.grads_bytes, p2.optimizer_states_bytes) == (108, 36, 72)
    # 3 send buffers of the largest unit in flight, and the point-to-point reduce-scatter's
    # scratch for the peers' chunks of each ((dp - 2) of dp chunks)
    assert p2.comm_buffers_bytes == 3 * 12 * 4 + 3 * 4 * 4
    pad = {e.name: e for e in p2.extras}["padding"]
    assert pad.bytes == round(4 * 5 + (4 + 8) * 5 / 3)     # 5 pad elements: whole params, shards
    p3 = plan(spec, stage=3, dp=3, param_dtype="bf16", reduce_dtype="bf16")
    extras = {e.name: e for e in p3.extras}
    assert extras["gathered parameters"].bytes == (12 + 9) * 2
    assert "root + b0" in extras["gathered parameters"].note
    assert extras["unit gradient buffers"].bytes == 3 * 12 * 2
    assert extras["reduce scratch"].bytes == 3 * 4 * 2
    assert p3.total_bytes == p3.model_states_bytes + (12 + 9 + 3 * 12 + 3 * 4) * 2
    assert p3.peak_rss_bytes == p3.total_bytes + DEFAULT_RUNTIME_OVERHEAD_BYTES


def test_errors_name_field_value_and_fix():
    spec = ModelSpec.from_params(100)
    with pytest.raises(ValueError, match=r"stage=4 is not a ZeRO stage; use one of 0 "):
        plan(spec, stage=4, dp=1, param_dtype="fp32")
    with pytest.raises(ValueError, match=r"dp=0: must be a positive integer"):
        plan(spec, stage=0, dp=0, param_dtype="fp32")
    with pytest.raises(ValueError, match=r"param_dtype='fp8' is not a known dtype: use one of"):
        plan(spec, stage=0, dp=1, param_dtype="fp8")
    with pytest.raises(ValueError, match=r"optimizer='lion' is unknown"):
        plan(spec, stage=0, dp=1, param_dtype="fp32", optimizer="lion")
    with pytest.raises(ValueError, match=r"params=0: give a positive parameter count"):
        ModelSpec.from_params(0)


# ---------------------------------------------------------------- recommend and the CLI
def test_recommend_cheapest_rule_and_none():
    spec = ModelSpec.from_params(7.5e9)
    rec = recommend(spec, memory_bytes=32e9, dp_options=[16, 64], stages=range(4),
                    measure="model_states", **MIXED)
    assert [(p.stage, p.dp) for p in rec] == [(1, 64), (2, 16), (2, 64), (3, 16), (3, 64)]
    assert all(p.model_states_bytes <= 32e9 for p in rec)
    assert recommend(spec, memory_bytes=1e9, dp_options=[64], measure="model_states",
                     **MIXED) == []


def test_recommend_prefers_largest_micro_batch_that_fits():
    spec = _shaped(h=64, vocab=1000)
    rec = recommend(spec, memory_bytes=3e6, dp_options=[1], micro_batches=[1, 2, 4, 8],
                    stages=[0], seq_len=64, param_dtype="fp32")
    assert rec and all(p.total_bytes <= 3e6 for p in rec)
    assert rec[0].micro_batch == max(p.micro_batch for p in rec) < 8


def test_cli_json_keys(capsys):
    assert cli_estimate(["--params", "7.5e9", "--dp", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [out[f"stage{s}"] for s in range(4)] == [
        120_000_000_000, 31_406_250_000, 16_640_625_000, 1_875_000_000]
    assert out["plans"]["stage3"]["comm"]["dp_elements"] == 3 * 7_500_000_000
    assert cli_estimate(["--params", "7.5e9", "--dp", "64", "--dtype", "fp32", "--json",
                         "--stage", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "stage1" not in out and out["stage2"] == 4 * 7_500_000_000 + 12 * 7_500_000_000 // 64


def test_cli_memory_gb_fit_and_impossible(capsys):
    assert cli_estimate(["--params", "7.5e9", "--dp", "64", "--tp", "1", "--memory-gb", "20",
                         "--fit", "model_states", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommend"][0]["stage"] == 2 and "stage 2, dp=64" in out["message"]
    assert cli_estimate(["--params", "7.5e9", "--dp", "1", "--tp", "1", "--memory-gb", "1"]) == 1
    assert "no configuration fits in 1 GB per rank" in capsys.readouterr().out
    assert cli_estimate(["--params", "-3"]) == 2
    assert "give a positive parameter count" in capsys.readouterr().err


def test_default_runtime_overhead_matches_bare_torch_process():
    code = ("import torch;print([l for l in open('/proc/self/status') if l.startswith('VmRSS')]"
            "[0].split()[1])")
    rss = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout) * 1024
    assert 0.6 * DEFAULT_RUNTIME_OVERHEAD_BYTES < rss < 1.6 * DEFAULT_RUNTIME_OVERHEAD_BYTES


# ---------------------------------------------------------------- the zerotrain GPT presets
def test_presets_count_like_the_model():
    model = pytest.importorskip("zerotrain.model")
    spec = ModelSpec.from_preset("gpt2-124m")
    with torch.device("meta"):
        gpt = model.GPT(model.get_config("gpt2-124m"))
    assert spec.numel() == sum(p.numel() for p in gpt.parameters()) == 124_439_808
    assert [u.name for u in spec.units] == ["root"] + [f"blocks.{i}" for i in range(12)]
    d = 768   # per block: qkv w+b, attn proj w, fc w+b, mlp proj w split; 2 LNs + 2 biases not
    assert spec.units[1] == UnitSpec("blocks.0", 12 * d * d + 3 * d + 4 * d, 6 * d)
    assert spec.units[0] == UnitSpec("root", 50257 * d, 1024 * d + 2 * d)
    assert (spec.n_layer, spec.n_embd, spec.n_head, spec.block_size) == (12, 768, 12, 1024)


def test_tnlg_preset_fits_32gb_with_zero1_tp4():
    pytest.importorskip("zerotrain.model")
    spec = ModelSpec.from_preset("tnlg-17b")
    assert round(spec.numel() / 1e9, 1) == 17.2
    paper = dict(param_dtype="fp16", reduce_dtype="fp16")
    assert fits(plan(spec, stage=1, dp=64, tp=4, **paper), 32e9, measure="model_states")
    assert fits(plan(spec, stage=0, dp=16, tp=16, **paper), 32e9, measure="model_states")
    assert not fits(plan(spec, stage=0, dp=64, tp=4, **paper), 32e9, measure="model_states")
    assert any("n_head=28 is not divisible by tp=16" in n
               for n in plan(spec, stage=0, dp=16, tp=16, **paper).notes)
