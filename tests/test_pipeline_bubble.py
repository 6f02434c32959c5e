"""The bubble measured on the real engine (forked ranks, gloo, chunks that sleep), not simulated.

A forward sleeps t_f/vp and a backward t_b/vp per chunk, so the compute is known and what is
measured is the executor's own order and waits (megagpt/pipeline/bubble.py). The bubble must be
within 0.03 of (p-1)/(v m), and interleaving must beat 1F1B at the same p and m, on a grid with
m not divisible by p. These are the figures the planner's choice of vp rests on.
"""
import pytest

from megagpt.pipeline.bubble import measure_bubble

T_F, T_B, TOL = 0.06, 0.12, 0.03
PAIRS = [(2, 4), (2, 5), (4, 8), (4, 6)]          # (p, m): m = 5 and 6 are not multiples of p


def measured(p, v, m, wait_p2p="deferred", attempts=3):
    """Best of 2 timed runs, tried again (up to `attempts` times) while it misses: noise on a shared
    machine only adds time (a late wake-up, a descheduled rank), so a miss every time is the
    engine's, not the machine's. Each attempt forks fresh ranks."""
    best = None
    for _ in range(attempts):
        got = measure_bubble(p, v, m, T_F, T_B, wait_p2p=wait_p2p, repeats=2)
        if best is None or got["measured"] < best["measured"]:
            best = got
        if abs(best["measured"] - best["ideal"]) <= TOL or wait_p2p != "deferred":
            break
    return best


@pytest.mark.parametrize("p,m", PAIRS)
def test_measured_bubble_is_p_minus_1_over_v_m_and_interleaving_wins(p, m):
    plain, interleaved = measured(p, 1, m), measured(p, 2, m)
    for got in (plain, interleaved):
        assert got["simulated"] == pytest.approx(got["ideal"], abs=1e-9)
        assert abs(got["measured"] - got["ideal"]) <= TOL, got
    assert interleaved["measured"] < plain["measured"], (plain, interleaved)


def test_the_simulator_models_the_executor_that_waits_on_every_batch():
    """The old executor (each p2p batch waited on at once) loses interleaving's gain; the
    simulator's blocking model predicts the bubble it really shows, not the ideal."""
    got = measured(2, 2, 4, wait_p2p="batch")
    assert got["simulated"] > got["ideal"] + 0.1          # 0.29 vs 0.125
    assert got["measured"] > got["ideal"] + 0.1, got
    # noise only adds time, so the lower bound is tight and the upper one allows a loaded machine
    assert got["simulated"] - TOL <= got["measured"] <= got["simulated"] + 0.08, got
