"""Multimodal training: the SFT loop (align/sft.py) on rows of text, images and audio.

    python examples/train_multimodal.py --config examples/configs/multimodal-tiny.yaml --data data/mm/train

Differences from SFT, and nothing else:
  data      a multimodal dataset (multimodal/dataset.py, or any object with `len()` and
            `batch(indices) -> (tokens, labels, segment_ids [b, s] each, spec.Media)`); rows are taken
            cyclically, as SFT's are
  kwargs    each microbatch's `media` travels beside its `packing` to every stage (the first uses it)
  labels    no label is a placeholder id (`mask_placeholders`)
  modes     joint (default) or train.freeze_lm: the adapters only, the decoder frozen (train.py)
The loss is SFT's: the sum over trainable labels / their global count over microbatches and DP.
"""
from __future__ import annotations

import itertools

from ..align.base import AlignTrainer
from ..align.sft import SFTTrainer
from ..data.sampler import MicroBatchSampler
from ..model.packing import IGNORE_INDEX, packing_of
from .adapters import is_placeholder


def mask_placeholders(m, labels):
    """labels [b, s] with IGNORE_INDEX where the target is a media placeholder: whatever made the rows, no
    position learns to predict one (the dataset's loss mask already says so; the last placeholder of a
    run keeps its label, the text after the medium, as in LLaVA)."""
    return labels.masked_fill(is_placeholder(m, labels), IGNORE_INDEX)


def open_rows(path: str, m, seq_len: int, packed: bool = True):
    """The multimodal dataset at `path` (multimodal/dataset.py) as rows of seq_len (rows.py), its vocab and
    placeholder ids checked against the model's (one line)."""
    from .dataset import MultimodalDataset
    from .rows import MultimodalRows
    data = MultimodalDataset(path)
    if data.vocab_size > m.vocab_size:
        raise ValueError(f"model.vocab_size: {m.vocab_size} is smaller than the vocab {data.vocab_size} of the "
                         f"tokenizer that made {path}")
    for field, tid in (("image_token_id", data.image_id), ("audio_token_id", data.audio_id)):
        if getattr(m, field) not in (None, tid):
            raise ValueError(f"model.{field}: {getattr(m, field)}, but {path} was made with id {tid}")
    return MultimodalRows(data, seq_len, packed)


def batch_of(rows, indices):
    """tokens, labels, segment ids [b, s] and the Media of rows[indices] (a rows object's own `batch`, if any)."""
    if hasattr(rows, "batch"):
        return rows.batch(indices)
    from .rows import make_batch
    return make_batch(rows, indices)


class MultimodalTrainer(SFTTrainer):
    stage, held_out_flag = "multimodal", "--valid PREFIX"

    def __init__(self, cfg, run_dir: str, data, valid=None, load: str | None = None, packed: bool = True):
        """data / valid: a dataset prefix (str) or a rows object (see the module docstring). Without valid
        there is no validation (train.eval_interval set to 0): a training-set loss is never logged as val_loss."""
        if data is None:
            raise ValueError("multimodal: --data PREFIX (written by tools/preprocess_multimodal.py) is required")
        self.packed, self._sources = packed, (data, valid)
        cfg, no_val = self.without_validation(cfg, valid is not None)
        AlignTrainer.__init__(self, cfg, run_dir, None, load)
        self.say_no_validation(no_val)

    def _build_data(self, data_path):
        seq = self.cfg.train.seq_len
        rows = [open_rows(d, self.cfg.model, seq, self.packed) if isinstance(d, str) else d for d in self._sources]
        self.needs_data = True
        self.train_data, self.valid_data = rows

    def _microbatch_fn(self, dataset, first_sample: int):
        """(get(i) -> (tokens, labels), kwargs(i) -> {"packing", "media"}, this replica's trainable count)."""
        t, m = self.cfg.train, self.cfg.model
        sampler = MicroBatchSampler(1 << 62, first_sample, t.micro_batch_size, self.ps.dp.rank, self.dp)
        mbs = []
        for idx in itertools.islice(sampler, self.num_microbatches):
            tokens, labels, seg, media = batch_of(dataset, [i % len(dataset) for i in idx])
            mbs.append((tokens, mask_placeholders(m, labels), seg, media))
        dev = self.ps.device
        count = sum(int((labels >= 0).sum()) for _, labels, _, _ in mbs)
        kw = [{"packing": packing_of(seg).to(dev) if self.packed else None, "media": media.to(dev)}
              for _, _, seg, media in mbs]
        return (lambda i: (mbs[i][0].to(dev), mbs[i][1].to(dev))), (lambda i: kw[i]), count
