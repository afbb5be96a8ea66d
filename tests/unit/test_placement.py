"""Where zerotrain train runs: the GPUs when CUDA is present (one rank per GPU, NCCL, bf16 unless
set), the CPU otherwise; asking for CUDA without one is a clear error."""
from __future__ import annotations

import pytest
import torch

from zerotrain.train.cli import _train_parser, resolve_options
from zerotrain.train.options import UsageError
from zerotrain.train.placement import backend_for, run_device, to_device


def _opts(tmp_path, *argv):
    return resolve_options(_train_parser().parse_args(["--runs-dir", str(tmp_path), *argv]))


def _fake_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_cpu_machine_keeps_two_ranks_and_fp32(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    opts = _opts(tmp_path)
    assert (run_device(opts), opts.parallel.nproc, opts.parallel.precision, backend_for(opts)) == ("cpu", 2, "fp32", "gloo")
    with pytest.raises(UsageError, match="parallel.device=cuda: this machine has no CUDA device"):
        _opts(tmp_path, "--device", "cuda")


def test_gpus_mean_one_rank_each_nccl_and_bf16_unless_set(tmp_path, monkeypatch):
    _fake_gpus(monkeypatch, 4)
    opts = _opts(tmp_path)
    assert (run_device(opts), opts.parallel.nproc, opts.parallel.precision, backend_for(opts)) == ("cuda", 4, "bf16", "nccl")
    opts = _opts(tmp_path, "--nproc", "2", "parallel.precision=fp32")
    assert (opts.parallel.nproc, opts.parallel.precision) == (2, "fp32")
    opts = _opts(tmp_path, "--device", "cpu")
    assert (run_device(opts), opts.parallel.nproc, opts.parallel.precision, backend_for(opts)) == ("cpu", 2, "fp32", "gloo")


def test_to_device_is_a_no_op_on_the_cpu():
    t = torch.arange(4)
    assert to_device(t, torch.device("cpu")) is t
