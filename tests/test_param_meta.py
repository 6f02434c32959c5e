"""Every parameter carries a ParamMeta, set where it is created: the global shape its ShardSpec maps
to this rank's piece, the sequence-parallel flag, and the tied group with which copy is the extra one."""
import torch

from dist import tiny_model_cfg
from megagpt.model.gpt import GPTModel
from megagpt.parallel.layers import ParamMeta
from megagpt.parallel.state import ParallelState


def chunk(tp, pp_rank, pre, post, sp=True, **over):
    ps = ParallelState.virtual(tp=tp, pp=2, pp_rank=pp_rank)
    return GPTModel(tiny_model_cfg(**over), ps, sequence_parallel=sp, layer_ids=[pp_rank], pre_process=pre,
                    post_process=post, device=torch.device("meta"))


def test_every_param_has_its_meta():
    for tp in (1, 2):
        for pp_rank, pre, post in ((0, True, False), (1, False, True)):
            model = chunk(tp, pp_rank, pre, post, bias=True)
            for name, p in model.named_parameters():
                meta = p.meta
                assert isinstance(meta, ParamMeta), name
                assert tuple(p.shape) == meta.spec.local_shape(meta.global_shape, tp), name
                assert meta.tied is None and not meta.tied_copy, name
                # SP: replicated over TP (norms, row-parallel biases) yet applied to sequence shards
                assert meta.sequence_parallel == (tp > 1 and meta.spec.dim is None), name


def test_tied_embedding_marks_its_copy():
    first, last = chunk(2, 0, True, False, tie_embeddings=True), chunk(2, 1, False, True, tie_embeddings=True)
    assert first.embedding.weight.meta.tied == last.embedding.weight.meta.tied == "embedding"
    assert not first.embedding.weight.meta.tied_copy and last.embedding.weight.meta.tied_copy
    single = GPTModel(tiny_model_cfg(tie_embeddings=True), device=torch.device("meta"))
    assert single.embedding.weight.meta.tied == "embedding" and not single.embedding.weight.meta.tied_copy
