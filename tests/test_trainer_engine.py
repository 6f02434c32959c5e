"""The training loop runs the executor whose bubble test_pipeline_bubble.py measures.

That test builds its own PipelineEngine with wait_p2p="deferred"; the Trainer builds another. Were
the Trainer's built with wait_p2p="batch" (each p2p batch waited on when posted, receives in their
send's round), every pipeline test would still pass while training ran the executor that loses
interleaving's gain. Here one real training step of PP2 with vp 2 (forked ranks, gloo) must
dispatch exactly the gloo schedule with receives posted one op ahead (build_schedule(...,
early_recv=True)), which only the deferred executor can run without deadlock.
"""
import contextlib
import io

from dist import spawn
from megagpt.config import config_from_dict
from megagpt.pipeline.schedule import build_schedule
from test_comm_accounting import raw_config

MICROBATCHES = 4


def _one_step(rank, world, raw, run_dir):
    from megagpt.train import Trainer
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(config_from_dict(raw, world), run_dir)
        trainer.run()
    return [(o.kind, o.microbatch, o.chunk, o.peer) for o in trainer.engine.trace]


def test_training_dispatches_the_early_receive_schedule(tmp_path):
    raw = raw_config(model=dict(num_layers=4), parallel=dict(pp=2, vp=2), microbatches=MICROBATCHES)
    want = build_schedule("1f1b", 2, 2, MICROBATCHES, early_recv=True)
    for rank, trace in enumerate(spawn(2, _one_step, raw, str(tmp_path), timeout=240)):
        assert trace == [(o.kind, o.microbatch, o.chunk, o.peer) for o in want[rank]], f"rank {rank}"
