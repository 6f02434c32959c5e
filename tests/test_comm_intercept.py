"""The interceptor used by the communication-accounting test sees every kind of call once, with the
bytes the caller handed over: collectives (sync and async), direct isend/irecv, each op of a
batch_isend_irecv, barriers; and it leaves torch.distributed as it found it."""
import torch
import torch.distributed as dist

from comm_intercept import CommInterceptor
from dist import spawn


def _all_kinds(rank, world):
    sub = dist.new_group([0, 1])
    before = dist.all_reduce
    with CommInterceptor({id(sub): "sub"}) as seen:
        t = torch.ones(8)                                          # 32 bytes
        dist.all_reduce(t)
        dist.all_reduce(t, group=sub, async_op=True).wait()
        out = torch.empty(16)
        dist.all_gather_into_tensor(out, t, group=sub, async_op=True).wait()
        dist.all_gather_single(out, t, group=sub)                  # the newer name of the same call
        dist.reduce_scatter_tensor(torch.empty(4), t, group=sub)
        dist.broadcast(t, src=0, group=sub)
        dist.all_to_all_single(torch.empty(8), t, group=sub)
        peer = 1 - rank
        ops = [dist.P2POp(dist.isend, t, peer, group=sub), dist.P2POp(dist.irecv, torch.empty(8), peer, group=sub),
               dist.P2POp(dist.isend, torch.ones(2), peer, group=sub)]
        ops += [dist.P2POp(dist.irecv, torch.empty(2), peer, group=sub)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        reqs = [dist.isend(t, peer), dist.irecv(torch.empty(8), peer)] if rank == 0 else \
               [dist.irecv(torch.empty(8), peer), dist.isend(t, peer)]
        for w in reqs:
            w.wait()
        dist.barrier()
    assert dist.all_reduce is before
    return {f"{k}/{g}": [seen.records[(k, g)], seen.calls[(k, g)]] for k, g in seen.records}


def test_interceptor_counts_every_call_once():
    for r in spawn(2, _all_kinds):
        assert r == {"all_reduce/world": [32, 1], "all_reduce/sub": [32, 1], "all_gather/sub": [64, 2],
                     "reduce_scatter/sub": [32, 1], "broadcast/sub": [32, 1], "all_to_all/sub": [32, 1],
                     "send/sub": [40, 2], "recv/sub": [40, 2], "send/world": [32, 1], "recv/world": [32, 1],
                     "barrier/world": [0, 1]}, r
