"""Replay every trace in simulations/traces/data/ against the full system (daemon subprocess, test
portal where the trace needs one); a hostile trace runs beside the legit trace it names.
Also: the replayer catches what it should, the recorder's traces replay, pcaps round-trip."""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class
from simulations.channel_data import encode as channel_data
from simulations.traces import record, replay, tracefile
from simulations.traces.scenarios import STANDALONE, bind, ping_pong, relayed
from simulations.traces.tracefile import Frame, Trace

pytestmark = pytest.mark.sim

ROOT = Path(__file__).resolve().parents[2]
TRACES = sorted(replay.TRACES_DIR.glob("*.pcap"))


def test_traces_are_there() -> None:
    names = {p.stem for p in TRACES}
    assert {
        "client",
        "gateway",
        "relay_loop",
        "roaming",
        "retransmissions",
        "expiry",
        "stale_nonce",
        "garbage",
    } <= names
    assert any(tracefile.load(p).expectations.kind == "hostile" for p in TRACES)


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem)
def test_trace(trace: Path, tmp_path: Path) -> None:
    paths = replay.with_companions([trace])
    result = replay.run(paths, log_dir=tmp_path)
    print(result.report())
    assert result.ok, result.report()
    for r in result.traces:
        assert r.sent > 0
        assert r.matched + r.lost == r.expected
        if r.kind == "legit":
            assert r.lost == 0


# --- the replayer catches mismatches ---------------------------------------------------------


def _find(trace: Trace, predicate: object) -> int:
    for index, frame in enumerate(trace.frames):
        if predicate(frame):  # type: ignore[operator]
            return index
    raise AssertionError("no such frame")


def _is_error(code: int) -> object:
    def check(frame: Frame) -> bool:
        payload = frame.payload
        if len(payload) < 20 or payload[0] >= 0x40:
            return False
        msg = stun.parse(payload)
        return msg.cls == Class.ERROR and msg.get(Attr.ERROR_CODE)[0] == code

    return check


def test_wrong_error_code_is_reported(tmp_path: Path) -> None:
    marked: list[int] = []

    def mutate(trace: Trace) -> None:
        index = _find(trace, _is_error(437))
        frame = trace.frames[index]
        changed = frame.payload.replace(b"\x00\x00\x04\x25", b"\x00\x00\x04\x26", 1)
        assert changed != frame.payload
        trace.frames[index] = replace(frame, payload=changed)
        marked.append(index + 1)

    result = replay.run(
        [replay.TRACES_DIR / "retransmissions.pcap"], mutate=mutate, log_dir=tmp_path
    )
    assert not result.ok
    mismatch = result.traces[0].mismatch
    assert mismatch is not None and mismatch.frame == marked[0]
    assert "ERROR-CODE: 437" in mismatch.reason
    report = result.report()
    assert "expected (scapy)" in report and "actual (scapy)" in report


def test_relayed_payload_difference_is_reported(tmp_path: Path) -> None:
    def mutate(trace: Trace) -> None:
        client = trace.expectations.roles["client"][0]
        index = _find(
            trace,
            lambda f: tracefile.format_addr(f.dst) == client and 0x40 <= f.payload[0] <= 0x4F,
        )
        frame = trace.frames[index]
        trace.frames[index] = replace(frame, payload=frame.payload[:-1] + b"!")

    result = replay.run([replay.TRACES_DIR / "roaming.pcap"], mutate=mutate, log_dir=tmp_path)
    assert not result.ok
    mismatch = result.traces[0].mismatch
    assert mismatch is not None
    assert "does not match" in mismatch.reason or "payload differs" in mismatch.reason


def test_missing_datagram_is_reported(tmp_path: Path) -> None:
    """An expectation the relay never fulfils (a response to a dropped datagram)."""

    def mutate(trace: Trace) -> None:
        client = tracefile.parse_addr(trace.expectations.roles["client"][0])
        last = trace.frames[-1]
        bogus = stun.encode(stun.Method.BINDING, Class.SUCCESS, b"x" * 12, [])
        trace.frames.append(Frame(last.t + 0.01, ("127.0.0.1", 3478), client, bogus))

    result = replay.run(
        [replay.TRACES_DIR / "stale_nonce.pcap"], mutate=mutate, timeout=0.5, log_dir=tmp_path
    )
    mismatch = result.traces[0].mismatch
    assert mismatch is not None and "did not arrive" in mismatch.reason


# --- the recorder -----------------------------------------------------------------------------


async def _tiny(s: record.Session) -> None:
    tc = s.turn_client(s.credential("client"))
    ep = s.endpoint("client")
    peer = s.endpoint("peer")
    alloc = await s.allocate(ep, tc)
    await bind(ep, tc, 0x4000, peer.addr)
    await ping_pong(ep, 0x4000, peer, relayed(alloc), "tiny", 3)
    ep.send(channel_data(0x4123, b"unbound"), note="unbound channel")
    await peer.quiet(0.05)
    record.expect_success(await ep.request(tc.refresh(0)), tc)


def test_record_then_replay(tmp_path: Path) -> None:
    scenario = record.Scenario("tiny", _tiny, "recorded by the test suite", dict(STANDALONE))
    path = asyncio.run(record.record(scenario, tmp_path))
    trace = tracefile.load(path)
    assert trace.expectations.scenario == "tiny"
    assert set(trace.expectations.roles) == {"client", "peer"}
    assert len(trace.expectations.credentials) == 1
    assert any(f.dst[1] == tracefile.TRACE_LISTEN_PORT for f in trace.frames)
    notes = [o.get("note") for o in trace.expectations.frames.values()]
    assert "Allocate without nonce" in notes and "unbound channel" in notes
    if shutil.which("tcpdump"):
        out = subprocess.run(["tcpdump", "-nr", str(path)], capture_output=True, text=True)
        assert out.returncode == 0
        assert len(out.stdout.splitlines()) == len(trace.frames)
    result = replay.run([path], log_dir=tmp_path)
    assert result.ok, result.report()


def test_command_line(tmp_path: Path) -> None:
    trace = replay.TRACES_DIR / "stale_nonce.pcap"
    ok = subprocess.run(
        [sys.executable, "-m", "simulations.traces.replay", str(trace)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "stale_nonce [legit]: ok" in ok.stdout
    broken = tmp_path / "broken.pcap"
    loaded = tracefile.load(trace)
    frames = list(loaded.frames)
    index = _find(loaded, _is_error(438))
    frames[index] = replace(
        frames[index],
        payload=frames[index].payload.replace(b"\x00\x00\x04\x26", b"\x00\x00\x04\x25", 1),
    )
    tracefile.save(broken, frames, loaded.expectations)
    bad = subprocess.run(
        [sys.executable, "-m", "simulations.traces.replay", str(broken)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert f"broken: frame {index + 1}: ERROR-CODE" in bad.stdout


# --- pcap files -------------------------------------------------------------------------------


def test_pcap_round_trip(tmp_path: Path) -> None:
    frames = [
        Frame(0.0, ("127.0.0.2", 40000), ("127.0.0.1", 3478), stun.encode(1, 0, b"t" * 12)),
        Frame(0.25, ("::1", 40001), ("::1", 3478), b""),
        Frame(0.5, ("127.0.0.1", 20000), ("127.0.0.4", 40002), bytes(range(256)) * 6),
        Frame(1.0, ("::1", 20001), ("::1", 40003), struct.pack("!HH", 0x4000, 2) + b"hi"),
    ]
    path = tmp_path / "t.pcap"
    tracefile.write_pcap(path, frames)
    assert tracefile.read_pcap(path) == frames
    assert "TURN ChannelData" in tracefile.dissect(frames[3].payload)
    assert "STUN" in tracefile.dissect(frames[0].payload)


def test_every_hostile_trace_at_once(tmp_path: Path) -> None:
    """All hostile traces together, beside the client, gateway and relay-loop traces, on one
    relay: every legit datagram still arrives."""
    names = ["relay_loop", "client", "gateway"]
    hostile = [p for p in TRACES if tracefile.load(p).expectations.kind == "hostile"]
    paths = [replay.TRACES_DIR / f"{n}.pcap" for n in names] + hostile
    result = replay.run(paths, log_dir=tmp_path)
    print(result.report())
    assert result.ok, result.report()
    assert all(r.lost == 0 for r in result.traces if r.kind == "legit")
