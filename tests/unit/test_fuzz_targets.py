"""The fuzz targets (simulations/fuzz_targets.py): every seed from the trace files passes its
target as plain Python, the server's scripts get past authentication, and a bounded
coverage-guided run of each target under atheris (``fuzz_coverage.fuzz``, a fixed number of
executions with libFuzzer's seed fixed) finds nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from simulations.bench.fuzz_coverage import fuzz
from simulations.fuzz_targets import TARGETS, run_script, seeds
from tests.required import REQUIRE_ALL

#: executions per target in the bounded run: about 3 s for the codec, 7 s for the server
RUNS = {"stun": 50_000, "server": 10_000, "stream_framing": 50_000, "proxy_protocol": 50_000}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_seed_passes_its_target(target: str) -> None:
    run = TARGETS[target]
    count = 0
    for seed in seeds(target):
        run(seed)
        count += 1
    assert count >= 20  # the traces are there


def test_a_server_script_allocates_binds_relays_and_expires() -> None:
    """The hand-written seed: the signed steps authenticate, so the fuzzer starts deep."""
    *_, path = seeds("server")
    emitted = run_script(path)
    for command in ("CreateAllocation", "CreateChannelBinding", "DeleteChannelBinding"):
        assert emitted[command] == 1, emitted
    assert emitted["FreeAllocation"] == 1  # the hour's advance expired it


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_bounded_coverage_guided_run_finds_nothing(target: str, tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        if REQUIRE_ALL:
            pytest.fail("atheris is not installed (the test dependency group has it)")
        pytest.skip("atheris is not installed")
    (run,) = fuzz([target], tmp_path, runs=RUNS[target])
    assert run.crashes == []
    assert run.executions >= RUNS[target]
    assert run.edges > 0 and run.features >= run.edges
