"""Memory and communication planner: bytes per rank for any model, ZeRO stage, dp, tp, dtype.

    spec = ModelSpec.from_preset("gpt2-124m")        # or .from_module(m) / .from_params(7.5e9)
    p = plan(spec, stage=2, dp=8, param_dtype="bf16", device="cuda", micro_batch=8)
    p.model_states_bytes, p.total_bytes, p.comm.dp_wire_bytes, p.extras
    p.activations.held_bytes, p.activations.attention         # what autograd keeps, which kernel
    plan(spec, stage=3, dp=1, param_dtype="bf16", device="cuda", offload="cpu").host_bytes
    recommend(spec, memory_bytes=16e9, dp_options=[1, 2, 4, 8], param_dtype="bf16")

Built from the stage table (``zerotrain.parallel.zero.policy``): no planner code branches on the
stage number.
"""
from zerotrain.planner.activations import Activations, default_attention
from zerotrain.planner.cli import cli_estimate
from zerotrain.planner.comm import CommVolume
from zerotrain.planner.memory import DEFAULT_RUNTIME_OVERHEAD_BYTES, Extra, Plan, dtype_name, plan
from zerotrain.planner.recommend import fits, recommend
from zerotrain.planner.spec import ModelSpec, UnitSpec

__all__ = ["ModelSpec", "UnitSpec", "Plan", "CommVolume", "Extra", "Activations", "plan", "fits",
           "recommend", "default_attention", "cli_estimate", "dtype_name",
           "DEFAULT_RUNTIME_OVERHEAD_BYTES"]
