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
    """Each citation names a commit and a file that exists there: SOURCES.json holds the blob
    of every cited file at that commit, as ``python -m simulations.traces.connlib
    --verify-sources <firezone clone>`` found it (which also finds every cited name in it)."""
    meta = _meta(trace)
    sources = json.loads(connlib.SOURCES.read_text())
    assert meta["derived_from"], "each trace names the Firezone code it was built from"
    for origin in meta["derived_from"]:
        assert origin["repo"] == sources["repo"] == "firezone/firezone"
        assert origin["commit"] == sources["commit"] == connlib.FIREZONE_COMMIT
        assert origin["path"] in sources["files"], origin["path"]
        assert origin["functions"]
    assert set(sources["files"]) == set(connlib.cited_sources())


def _stun_frames(trace: Path) -> list[tuple[tracefile.Frame, Any]]:
    from firezone_relay.protocol import stun

    out = []
    for frame in tracefile.load(trace).frames:
        try:
            out.append((frame, stun.parse(frame.payload)))
        except stun.ParseError:
            continue  # ChannelData, relayed data
    return out


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem)
def test_what_only_we_send_is_labelled_ours(trace: Path) -> None:
    """A trace expecting an answer Firezone's relay would not give says so under ``ours``;
    one whose expectations are ours throughout is named ``ours_``."""
    from firezone_relay.protocol.stun import Attr

    meta = _meta(trace)
    to_clients = [
        msg for frame, msg in _stun_frames(trace) if frame.src[1] == tracefile.TRACE_LISTEN_PORT
    ]
    if any(Attr.ADDRESS_ERROR_CODE in dict(m.attributes) for m in to_clients):
        assert any("ADDRESS-ERROR-CODE" in text for text in meta["ours"])
    if trace.stem.startswith("ours_") or meta["needs"] == "allow-list":
        assert trace.stem.startswith("ours_") and meta["ours"]


def test_stale_nonce_path_is_connlibs() -> None:
    """438 with a new NONCE, then the same request re-signed with that NONCE (a new
    transaction) succeeds, and later requests carry it."""
    from firezone_relay.protocol.stun import Attr, Class

    (trace,) = [p for p in TRACES if "stale_nonce" in p.stem and "438" in p.stem]
    frames = _stun_frames(trace)
    stale = [i for i, (_, m) in enumerate(frames) if m.cls == Class.ERROR]
    (i,) = [i for i in stale if frames[i][1].get(Attr.ERROR_CODE)[0] == 438]
    answer = frames[i][1]
    request = next(m for f, m in frames[:i] if m.transaction_id == answer.transaction_id)
    fresh = answer.get(Attr.NONCE)
    assert request.get(Attr.NONCE) != fresh
    retry = next(m for f, m in frames[i + 1 :] if m.cls == Class.REQUEST)
    assert retry.method == request.method and retry.transaction_id != request.transaction_id
    assert retry.get(Attr.NONCE) == fresh
    assert retry.get(Attr.CHANNEL_NUMBER) == request.get(Attr.CHANNEL_NUMBER)
    ok = next(
        m
        for f, m in frames[i + 1 :]
        if m.transaction_id == retry.transaction_id and m.cls != Class.REQUEST
    )
    assert ok.cls == Class.SUCCESS
    later = [
        m for _, m in frames[i + 1 :] if m.cls == Class.REQUEST and Attr.NONCE in dict(m.attributes)
    ]
    assert later and all(m.get(Attr.NONCE) == fresh for m in later)


@pytest.mark.parametrize(
    "trace", [p for p in TRACES if p.stem.startswith("connlib_")], ids=lambda p: p.stem
)
def test_connlib_picks_its_socket_as_connlib_does(trace: Path) -> None:
    """One Binding per family of a dual-stack relay, from that family's socket; the first
    answer (IPv4) picks the socket, the first Allocate leaves from it before the IPv6 answer
    arrives, and every authenticated request of the trace leaves from it."""
    from firezone_relay.protocol.stun import Attr, Class, Method

    frames = _stun_frames(trace)
    b4, b6, a4, allocate = frames[:4]
    assert b4[1].method == b6[1].method == Method.BINDING
    assert b4[1].cls == b6[1].cls == Class.REQUEST
    assert ":" not in b4[0].dst[0] + b4[0].src[0] and ":" in b6[0].dst[0] and ":" in b6[0].src[0]
    assert a4[1].transaction_id == b4[1].transaction_id and a4[0].dst == b4[0].src
    assert allocate[1].method == Method.ALLOCATE and allocate[0].src == b4[0].src
    late = [
        i
        for i, (_, m) in enumerate(frames)
        if m.cls == Class.SUCCESS and m.transaction_id == b6[1].transaction_id
    ]
    assert late and late[0] > 3, "the IPv6 answer comes after the Allocate"
    signed = {
        f.src
        for f, m in frames
        if f.dst[1] == tracefile.TRACE_LISTEN_PORT and Attr.USERNAME in dict(m.attributes)
    }
    assert signed == {b4[0].src}


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem)
def test_credentials_are_the_portals(trace: Path) -> None:
    """Usernames as the portal mints them: ``<expiry>:<salt>``, the salt base64 (no
    padding) of a SHA-256; a gateway's expiry is 2038-01-01, as the portal gives gateways."""
    import base64

    meta = _meta(trace)
    for username, spec in meta["credentials"].items():
        expiry, salt = username.split(":")
        assert len(base64.b64decode(salt + "=")) == 32 and "=" not in salt
        assert spec["user"] == salt
        if "gateway" in trace.stem:
            assert int(expiry) == spec["expiry"] == 2145916800


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
