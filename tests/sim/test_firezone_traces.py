"""Replay the traces built from Firezone's code (connlib's TURN client and the Firezone
relay's own acceptance tests) against the full system, and check that they are what
``simulations.traces.connlib`` builds from that description."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.traces import connlib, replay, tracefile

pytestmark = pytest.mark.sim

TRACES = sorted(connlib.OUT_DIR.glob("*.pcap"))


def _meta(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(tracefile.expectations_path(path).read_text())
    return data


def _param(path: Path) -> Any:
    return pytest.param(path, id=path.stem)


def test_every_builder_has_its_trace() -> None:
    assert {p.stem for p in TRACES} == set(connlib.BUILDERS)


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem)
def test_trace_says_where_it_comes_from(trace: Path) -> None:
    meta = _meta(trace)
    assert meta["derived_from"], "each trace names the Firezone code it was built from"
    for origin in meta["derived_from"]:
        assert origin["repo"] == "firezone/firezone"
        assert origin["path"].startswith("rust/") and origin["functions"]


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem)
def test_trace_is_what_the_builder_writes(trace: Path, tmp_path: Path) -> None:
    """The pcap on disk is the builder's output, so the description in the code is the
    trace (``python -m simulations.traces.connlib`` rewrites them)."""
    built = connlib.BUILDERS[trace.stem]().save(tmp_path)
    assert tracefile.read_pcap(built) == tracefile.read_pcap(trace)
    assert _meta(built) == _meta(trace)


def test_connlib_requests_carry_connlibs_attributes() -> None:
    """Allocate and Refresh as MessagePrototype builds them: REQUESTED-TRANSPORT,
    ADDITIONAL-ADDRESS-FAMILY, SOFTWARE, then the credentials; no LIFETIME except 0."""
    from firezone_relay.protocol import stun
    from firezone_relay.protocol.stun import Attr, Class, Method

    trace = tracefile.load(connlib.OUT_DIR / "connlib_allocate.pcap")
    seen = set()
    for frame in trace.frames:
        if frame.dst[1] != tracefile.TRACE_LISTEN_PORT or frame.payload[0] >= 0x40:
            continue
        msg = stun.parse(frame.payload)
        if msg.cls != Class.REQUEST or msg.method not in (Method.ALLOCATE, Method.REFRESH):
            continue
        types = [t for t, _ in msg.attributes]
        head = [Attr.REQUESTED_TRANSPORT, Attr.ADDITIONAL_ADDRESS_FAMILY, Attr.SOFTWARE]
        assert types[:3] == head
        assert msg.get(Attr.SOFTWARE) == "snownet"
        assert types[-1] == Attr.MESSAGE_INTEGRITY and Attr.FINGERPRINT not in types
        assert Attr.LIFETIME not in types or msg.get(Attr.LIFETIME) == 0
        seen.add((msg.method, Attr.NONCE in types))
    assert (Method.ALLOCATE, False) in seen and (Method.ALLOCATE, True) in seen


@pytest.mark.parametrize("trace", [_param(p) for p in TRACES])
def test_replay(trace: Path, tmp_path: Path) -> None:
    speed = float(_meta(trace)["speed"])
    result = replay.run([trace], speed=speed, log_dir=tmp_path)
    print(result.report())
    assert result.ok, result.report()
    (r,) = result.traces
    assert r.sent > 0 and r.lost == 0 and r.matched == r.expected
