"""PhaseTimer: seconds and call counts per named phase, and the table the loop logs."""

import pytest

from megatron_vrft.trainer.timing import PhaseTimer


def test_phase_timer_accumulates():
    timer = PhaseTimer()
    for _ in range(3):
        with timer.phase("a"):
            sum(range(1000))
    with timer.phase("b"):
        pass
    assert timer.calls == {"a": 3, "b": 1}
    assert timer.total() == pytest.approx(sum(timer.seconds.values()))
    assert "a" in timer.table() and "total" in timer.table()
