"""The collectives in ``zerotrain.distributed.comm``: point-to-point (gloo's default here) and native
algorithms give the same results and the same byte counts, in place and out of place, with several
collectives in flight at once, on the world group and on dp subgroups of a tp mesh."""
from __future__ import annotations

import pytest
import torch

from harness import spawn

CHUNK = 5


def _full(rank: int, n: int, salt: int) -> torch.Tensor:
    # integer-valued floats: every sum is exact, so both algorithms must agree bit for bit
    return torch.arange(n * CHUNK, dtype=torch.float32) * (rank + 1) + 100 * salt + rank


def _expected_reduce(n: int, me: int, salt: int) -> torch.Tensor:
    return sum(_full(r, n, salt) for r in range(n)).view(n, CHUNK)[me]


def _exercise(mesh, p2p: bool):
    from zerotrain.distributed import comm

    comm.set_point_to_point(p2p)
    comm.reset_comm_report()
    group, n, me = mesh.dp_group, mesh.dp, mesh.dp_rank
    out = {}
    try:
        # out of place, several in flight, waited in reverse order of issue
        fulls = [_full(me, n, s) for s in range(3)]
        outs = [torch.full((CHUNK,), float("nan")) for _ in range(3)]
        shards = [torch.arange(CHUNK, dtype=torch.float32) + 10 * me + 1000 * s for s in range(2)]
        gathered = [torch.full((n * CHUNK,), float("nan")) for _ in range(2)]
        handles = [comm.reduce_scatter(o, f, group, async_op=True) for o, f in zip(outs, fulls)]
        handles += [comm.all_gather(g, s, group, async_op=True) for g, s in zip(gathered, shards)]
        for h in reversed(handles):
            h.wait()
        out["rs"] = [o.clone() for o in outs]
        out["ag"] = [g.clone() for g in gathered]
        # in place: output is this rank's own chunk of the input
        full = _full(me, n, 7)
        comm.reduce_scatter(full.view(n, CHUNK)[me], full, group)
        out["rs_in_place"] = full.clone()
        buf = torch.zeros(n * CHUNK)
        buf.view(n, CHUNK)[me].copy_(torch.arange(CHUNK, dtype=torch.float32) + 10 * me)
        comm.all_gather(buf, buf.view(n, CHUNK)[me], group)
        out["ag_in_place"] = buf
        if n > 1:
            try:
                full = _full(me, n, 8)
                comm.reduce_scatter(full.view(n, CHUNK)[(me + 1) % n], full, group)
                out["bad_alias"] = None
            except ValueError as exc:
                out["bad_alias"] = str(exc)
        out["report"] = comm.comm_report()
    finally:
        comm.set_point_to_point(True)
    out.update(n=n, me=me)
    return out


def _check(results):
    for r in results:
        n, me = r["n"], r["me"]
        for s, got in enumerate(r["rs"]):
            torch.testing.assert_close(got, _expected_reduce(n, me, s), rtol=0, atol=0)
        for s, got in enumerate(r["ag"]):
            want = torch.cat([torch.arange(CHUNK, dtype=torch.float32) + 10 * k + 1000 * s for k in range(n)])
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        in_place = r["rs_in_place"].view(n, CHUNK)
        own = _full(me, n, 7).view(n, CHUNK)
        for k in range(n):       # own chunk reduced, the others untouched
            want = _expected_reduce(n, me, 7) if k == me else own[k]
            torch.testing.assert_close(in_place[k], want, rtol=0, atol=0)
        want = torch.cat([torch.arange(CHUNK, dtype=torch.float32) + 10 * k for k in range(n)])
        torch.testing.assert_close(r["ag_in_place"], want, rtol=0, atol=0)


@pytest.mark.parametrize("world,tp", [(2, 1), (3, 1), (4, 2)])
def test_point_to_point_matches_native(world, tp):
    p2p = spawn(_exercise, world, True, tp=tp)
    native = spawn(_exercise, world, False, tp=tp)
    _check(p2p)
    _check(native)
    for a, b in zip(p2p, native):
        assert a["report"] == b["report"]           # the same logical and wire bytes, per collective
        assert a["report"]["reduce_scatter"]["calls"] == 4
        n = a["n"]
        assert a["report"]["reduce_scatter"]["bytes"] == 4 * n * CHUNK * 4
        assert a["report"]["all_gather"]["wire_bytes"] == pytest.approx(3 * n * CHUNK * 4 * (n - 1) / n)
        assert "own chunk" in a["bad_alias"] and "own chunk" in b["bad_alias"]
