"""The stage 2-3 reduce-buffer pool: best fit, bounded retention, trimmed between steps."""
import torch

from zerotrain.parallel.zero.unit import ScratchPool


def test_smallest_fitting_buffer_is_reused_as_a_prefix():
    pool = ScratchPool(keep=3)
    big, small = pool.take(100, torch.float32, "cpu"), pool.take(60, torch.float32, "cpu")
    pool.give(big)
    pool.give(small)
    got = pool.take(50, torch.float32, "cpu")
    assert got.numel() == 50 and got.data_ptr() == small.data_ptr()      # smallest that fits
    again = pool.take(80, torch.float32, "cpu")
    assert again.data_ptr() == big.data_ptr()
    pool.give(got)                                                        # a view returns its base
    assert [b.numel() for b in pool.buffers] == [60]
    fresh = pool.take(70, torch.float32, "cpu")                           # nothing fits: new buffer
    assert fresh.data_ptr() not in (big.data_ptr(), small.data_ptr())
    assert pool.take(10, torch.float64, "cpu").dtype == torch.float64     # dtype must match


def test_retention_is_bounded_and_trim_keeps_the_largest():
    pool = ScratchPool(keep=2)
    bufs = [pool.take(n, torch.float32, "cpu") for n in (10, 30, 20)]
    for b in bufs:
        pool.give(b)
    assert sorted(b.numel() for b in pool.buffers) == [10, 30]           # the third was dropped
    pool.trim(1)
    assert [b.numel() for b in pool.buffers] == [30]
    assert ScratchPool(keep=0).buffers == []
