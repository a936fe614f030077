"""A short soak with churn (``simulations/bench/soak.py``, issue 17 item 8): both userspace
data paths side by side, allocations created, refreshed, deleted and left to expire,
channels rebound, traffic, an attacker's channels beside them; at each check the C mirror
equals the core's routes, nothing is lost, nothing failed, no traceback."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from firezone_relay.actors import udpio
from simulations.bench.soak import parse_args, run
from tests.required import REQUIRE_ALL

pytestmark = pytest.mark.system


def test_a_twenty_second_soak_passes(tmp_path: Path) -> None:
    if udpio.IMPL != "compiled" and REQUIRE_ALL:
        pytest.fail(f"the compiled helper is not in use here: {udpio.IMPL_REASON}")
    # allocation ports below the simulator's (20000+) and above a long soak's (10000-16999)
    base = random.randrange(17000, 18200, 2)
    args = parse_args(
        [
            "--minutes", "0.34",
            "--time-scale", "0.02",  # allocations and channels live 12 s: they expire here
            "--rate", "2000",
            "--allocations", "150",
            "--attack-channels", "200",
            "--port-base", str(base),
        ]
    )  # fmt: skip
    result = run(args, tmp_path)
    assert result.ok, (result.problems, result.counts, result.failures)
    assert sorted(r.side for r in result.rows) == ["compiled", "compiled", "python", "python"]
    for side, counts in result.counts.items():
        # the churn really happened on both paths
        assert counts["created"] > 150 and counts["deleted"] > 10 and counts["expired"] > 10, side
    compiled = [r for r in result.rows if r.side == "compiled"]
    assert all(r.mirror > 0 and r.equal for r in compiled)
