"""lr_at at its key points: warm-up, the peak, the middle and the end of each decay style."""
import math

import pytest

from megagpt.config import TrainConfig
from megagpt.optim.lr import lr_at, warmup_steps


def cfg(**over) -> TrainConfig:
    base = dict(lr=1.0, min_lr=0.1, train_iters=12, warmup=2, decay_style="cosine")
    base.update(over)
    return TrainConfig(**base)


def test_warmup_is_linear_and_reaches_the_peak():
    c = cfg()
    assert lr_at(0, c) == pytest.approx(0.5)          # step 0 already learns: lr * 1/2
    assert lr_at(1, c) == pytest.approx(1.0)          # the last warm-up step runs at the peak


def test_warmup_as_a_fraction_of_train_iters():
    c = cfg(warmup=0.25)                               # 0.25 * 12 = 3 steps
    assert warmup_steps(c) == 3
    assert [lr_at(s, c) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert warmup_steps(cfg(warmup=0.0)) == 0
    assert lr_at(0, cfg(warmup=0.0)) < 1.0             # no warm-up: decay starts at once


@pytest.mark.parametrize("style,power,mid", [("cosine", 1.0, 0.55), ("linear", 1.0, 0.55),
                                             ("polynomial", 2.0, 0.1 + 0.9 * 0.25), ("constant", 1.0, 1.0)])
def test_decay_midpoint_and_end(style, power, mid):
    c = cfg(decay_style=style, decay_power=power)
    # decay runs over iterations 3..12 (1-based): progress 0.5 at iteration 7 = step 6
    assert lr_at(6, c) == pytest.approx(mid)
    end = 1.0 if style == "constant" else 0.1
    assert lr_at(11, c) == pytest.approx(end)          # the last step runs at min_lr
    assert lr_at(50, c) == pytest.approx(end)          # and it holds after train_iters
    after = [lr_at(s, c) for s in range(1, 12)]
    assert all(a >= b for a, b in zip(after, after[1:])), f"{style}: not monotone after warm-up: {after}"


def test_linear_and_cosine_at_a_quarter():
    # step 4 = iteration 5: progress (5 - 2) / 10 = 0.3
    assert lr_at(4, cfg(decay_style="linear")) == pytest.approx(0.1 + 0.9 * 0.7)
    assert lr_at(4, cfg()) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.3)))


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(-1, cfg())
