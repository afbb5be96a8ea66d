"""The planner's device/host split: a CUDA device vs a CPU run, and ZeRO-Offload to the host."""
import json

import pytest

from zerotrain.parallel.zero.policy import STAGES
from zerotrain.planner import DEFAULT_RUNTIME_OVERHEAD_BYTES, ModelSpec, cli_estimate, plan

PSI, N = 4000, 4
SPEC = ModelSpec.from_params(PSI, n_layer=4, n_embd=16, n_head=4, vocab_size=64)
KW = dict(dp=N, param_dtype="bf16", reduce_dtype="fp32", micro_batch=2, seq_len=8)


def test_cuda_device_counts_no_cpu_runtime_on_the_device():
    cpu = plan(SPEC, stage=2, device="cpu", **KW)
    cuda = plan(SPEC, stage=2, device="cuda", **KW)
    assert cpu.peak_rss_bytes == cpu.total_bytes + DEFAULT_RUNTIME_OVERHEAD_BYTES
    assert cuda.peak_rss_bytes == DEFAULT_RUNTIME_OVERHEAD_BYTES      # host: the process only
    assert cuda.model_states_bytes == cpu.model_states_bytes
    # bf16 LayerNorm statistics are fp32 on CUDA (the accumulate type), bf16 on CPU
    n, L = 16, 4
    assert cuda.activations.held_bytes - cpu.activations.held_bytes == (L * 4 + 2) * n * 2
    assert any("max_memory_reserved" in note for note in cuda.notes)
    assert not any("max_memory_reserved" in note for note in cpu.notes)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_offload_on_cuda_moves_master_states_and_owned_grads_to_the_host(stage):
    base = plan(SPEC, stage=stage, device="cuda", **KW)
    off = plan(SPEC, stage=stage, device="cuda", offload="cpu", **KW)
    policy = STAGES[stage]
    owned = PSI // N if policy.shard_optimizer else PSI
    assert (off.master_bytes, off.optimizer_states_bytes) == (4 * owned, 8 * owned)
    assert off.host_grads_bytes == 4 * owned                       # fp32 d2h destination
    assert off.host_bytes == 16 * owned
    device_grads = 0 if policy.shard_grads else 4 * PSI            # whole grads stay on device
    assert off.grads_bytes == device_grads
    assert off.total_bytes == (base.params_bytes + device_grads + off.comm_buffers_bytes
                               + off.activations_bytes)
    assert off.total_bytes < base.total_bytes
    assert off.peak_rss_bytes == off.host_bytes + DEFAULT_RUNTIME_OVERHEAD_BYTES
    assert off.comm == base.comm
    assert any("power of two" in note for note in off.notes)


def test_offload_on_a_cpu_run_changes_only_the_accounting():
    base = plan(SPEC, stage=3, device="cpu", **KW)
    off = plan(SPEC, stage=3, device="cpu", offload="cpu", **KW)
    assert off.host_bytes == base.master_bytes + base.optimizer_states_bytes
    assert off.total_bytes == base.total_bytes - off.host_bytes
    assert (off.peak_rss_bytes, off.model_states_bytes) == (base.peak_rss_bytes,
                                                             base.model_states_bytes)
    assert off.host_grads_bytes == 0


def test_offload_errors_name_the_value():
    with pytest.raises(ValueError, match=r"offload='nvme' is unknown: use None .* or 'cpu'"):
        plan(SPEC, stage=3, offload="nvme", **KW)


def test_cli_device_attention_offload(capsys):
    args = ["--params", "4000", "--layers", "4", "--hidden", "16", "--heads", "4", "--vocab", "64",
            "--dp", "4", "--micro-batch", "2", "--seq-len", "8", "--stage", "3"]
    assert cli_estimate(args + ["--device", "cuda", "--offload", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["plans"]["stage3"]
    assert (got["device"], got["offload"], got["activations"]["attention"]) == ("cuda", "cpu",
                                                                              "flash")
    assert got["host_bytes"] == 16 * PSI // 4 and got["grads_bytes"] == 0
    assert cli_estimate(args + ["--device", "cuda", "--offload", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())          # rich wraps at the terminal width
    assert "host memory (offload)" in out and "master (host)" in out and "peak RSS" not in out
    assert "flash attention" in out and "total on cuda" in out
    assert cli_estimate(args + ["--device", "cpu", "--attention", "math", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plans"]["stage3"]["activations"][
        "attention"] == "math"
    assert cli_estimate(args + ["--device", "cuda", "--dtype", "fp32", "--attention", "flash"]) == 2
    assert "flash kernels take bf16/fp16, not fp32" in capsys.readouterr().err
