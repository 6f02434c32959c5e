"""Curricula (data/curriculum.py): blend weights piecewise linear in the step, a sequence-length warm-up.

The assignment follows the schedule within 2 samples in every window (each step's global batch, and
windows of 3 steps), is a function of the sample index alone (a longer run's assignment starts with a
shorter one's), and a run resumed mid-curriculum (weights changing, sequence length still growing)
reproduces the uninterrupted run's losses bit for bit. Bad schedules fail with a one-line error."""
import os

import numpy as np
import pytest

from dist import spawn
from megagpt.config import ConfigError, config_from_dict
from megagpt.data.curriculum import curriculum_assignment, seq_len_at, weights_at
from test_train_e2e import SMALL, TINY, _cli, _losses, _make_data

KNOTS = [[0, 0.9, 0.1, 0.0], [10, 0.1, 0.6, 0.3], [20, 1, 1, 2]]
GB = 8


def test_weights_are_piecewise_linear():
    w = weights_at(KNOTS, np.array([-3, 0, 5, 10, 15, 20, 99]))
    np.testing.assert_allclose(w[0], [0.9, 0.1, 0.0])
    np.testing.assert_allclose(w[1], w[0])
    np.testing.assert_allclose(w[2], [0.5, 0.35, 0.15])
    np.testing.assert_allclose(w[3], [0.1, 0.6, 0.3])
    np.testing.assert_allclose(w[4], [0.175, 0.425, 0.4])
    np.testing.assert_allclose(w[5], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(w[6], w[5])


@pytest.mark.parametrize("window", [GB, 3 * GB, 7])
def test_realised_shares_follow_the_schedule_in_every_window(window):
    size = GB * 30
    index, sample = curriculum_assignment(KNOTS, GB, size)
    want = weights_at(KNOTS, np.arange(size) // GB)
    worst = 0.0
    for start in range(0, size - window + 1):
        got = np.bincount(index[start:start + window], minlength=3)
        worst = max(worst, np.abs(got - want[start:start + window].sum(axis=0)).max())
    assert worst <= 2.0, f"a window of {window} samples is {worst:.2f} samples off the schedule"
    for d in range(3):                                       # each dataset read in order, each sample once
        assert list(sample[index == d]) == list(range((index == d).sum()))


def test_assignment_depends_on_the_sample_index_only():
    a = curriculum_assignment(KNOTS, GB, 100)
    b = curriculum_assignment(KNOTS, GB, 240)
    assert (a[0] == b[0][:100]).all() and (a[1] == b[1][:100]).all()


def test_seq_len_warmup():
    lengths = [seq_len_at(s, 64, [16, 4], multiple=2) for s in range(6)]
    assert lengths == [16, 28, 40, 52, 64, 64]
    assert seq_len_at(3, 64, None) == 64


def _raw(**data):
    return {"model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 128, "max_seq_len": 64},
            "train": {"seq_len": 32}, "data": data}


@pytest.mark.parametrize("data,needle", [
    (dict(blend=[1, "a", 1, "b"], curriculum=[[0, 0, 0], [5, 1, 1]]), "data.curriculum: row 0 (step 0) weights"),
    (dict(blend=[1, "a", 1, "b"], curriculum=[[0, 1, 1], [0, 1, 2]]), "data.curriculum: steps must increase"),
    (dict(blend=[1, "a", 1, "b"], curriculum=[[5, 1, 1], [2, 1, 2]]), "data.curriculum: steps must increase"),
    (dict(blend=[1, "a", 1, "b"], curriculum=[[0, 1, 1, 1]]), "data.curriculum: 3 weights per row"),
    (dict(curriculum=[[0, 1, 1]]), "data.curriculum: needs data.blend"),
    (dict(seq_len_warmup=[64, 4]), "data.seq_len_warmup: start 64"),
    (dict(seq_len_warmup=[8]), "data.seq_len_warmup: expected"),
])
def test_bad_schedules_fail_in_one_line(data, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_raw(**data))
    assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)


def test_resume_mid_curriculum_is_bit_exact(tmp_path):
    """Steps 0-5 with the weights moving from dataset a to b over steps 0-6 and the sequence growing from
    8 to 32 tokens over 4 steps; saved at 3, resumed from there in a new run: steps 4-6 equal."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _make_data(a)
    _make_data(b, docs=80)
    base = ["--config", TINY, *SMALL, "--train-iters", "6", "train.eval_interval=0", "train.global_batch_size=8",
            f"data.blend=[1, {a}, 1, {b}]", "data.curriculum=[[0, 0.9, 0.1], [6, 0.1, 0.9]]",
            "data.seq_len_warmup=[8, 4]"]
    spawn(1, _cli, base + ["--save-interval", "3", "--run-dir", str(tmp_path / "full")], timeout=180)
    spawn(1, _cli, base + ["--load", os.path.join(str(tmp_path / "full"), "step_00000003"),
                           "--run-dir", str(tmp_path / "resumed")], timeout=180)
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(full) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6], (full, resumed)
    assert all(full[s] == resumed[s] for s in (4, 5, 6)), (full, resumed)


def _trainer_data(rank, world, argv_overrides, run_dir):
    import contextlib
    import io
    from megagpt.config import load_config
    from megagpt.train import Trainer
    cfg = load_config(TINY, argv_overrides, world_size=world)
    with contextlib.redirect_stdout(io.StringIO()):
        tr = Trainer(cfg, run_dir)
    shapes = []
    for step in (0, 2, 5):
        tr.step = step
        length = seq_len_at(step, cfg.train.seq_len, cfg.data.seq_len_warmup, 1)
        tokens, labels = tr._microbatch_fn(tr.train_data, 0, length)(0)
        shapes.append(list(tokens.shape))
    return {"index": tr.train_data.dataset_index.tolist(), "shapes": shapes}


def test_trainer_reads_the_schedule(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _make_data(a)
    _make_data(b, docs=80)
    over = [*SMALL, "train.train_iters=6", "train.global_batch_size=8", f"data.blend=[1, {a}, 1, {b}]",
            "data.curriculum=[[0, 0.9, 0.1], [6, 0.1, 0.9]]", "data.seq_len_warmup=[8, 4]", "train.eval_interval=0"]
    r = spawn(1, _trainer_data, over, str(tmp_path / "r"), timeout=120)[0]
    assert r["index"] == curriculum_assignment([[0, 0.9, 0.1], [6, 0.1, 0.9]], 8, 48)[0].tolist()
    assert r["shapes"] == [[2, 8], [2, 20], [2, 32]]
