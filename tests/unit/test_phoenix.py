"""The sans-IO portal session, URL and reconnect policy, driven frame by frame on a fake clock."""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firezone_relay.protocol.phoenix import (
    BackoffConfig,
    Event,
    Fatal,
    HeartbeatSent,
    Hiccup,
    Ignored,
    Init,
    Joined,
    PhoenixSession,
    ReconnectPolicy,
    SessionConfig,
    login_url,
    parse_retry_after,
    redact_url,
    user_agent,
)

SECRET = "0" * 64


def frames(session: PhoenixSession) -> list[dict[str, object]]:
    out = []
    while (frame := session.next_frame()) is not None:
        out.append(json.loads(frame))
    return out


def events(session: PhoenixSession) -> list[Event]:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def reply(ref: object, status: str = "ok", topic: str = "relay", response: object = None) -> str:
    payload = {"status": status, "response": {} if response is None else response}
    return json.dumps({"topic": topic, "event": "phx_reply", "payload": payload, "ref": ref})


def push(event: str, payload: object, topic: str = "relay") -> str:
    return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": None})


def joined_session(now: float = 0.0, config: SessionConfig | None = None) -> PhoenixSession:
    session = PhoenixSession(SECRET, now, config)
    frames(session)
    session.handle_frame(reply(0), now)
    assert events(session) == [Joined()]
    return session


# ---- join


def test_join_is_the_first_frame_with_ref_zero() -> None:
    session = PhoenixSession(SECRET, 100.0)
    assert session.next_frame() == (
        '{"topic":"relay","event":"phx_join","payload":{"stamp_secret":"' + SECRET + '"},"ref":0}'
    )
    assert session.next_frame() is None
    assert events(session) == []
    assert not session.joined


def test_join_ok_reports_joined() -> None:
    session = PhoenixSession(SECRET, 0.0)
    frames(session)
    session.handle_frame(reply(0), 1.0)
    assert events(session) == [Joined()]
    assert session.joined
    assert session.poll_timeout() == 10.0  # next heartbeat, the join deadline is gone


def test_join_error_reply_is_fatal() -> None:
    session = PhoenixSession(SECRET, 0.0)
    frames(session)
    session.handle_frame(reply(0, "error", response={"reason": "nope"}), 1.0)
    [event] = events(session)
    assert isinstance(event, Fatal)
    assert "nope" in event.reason
    assert session.closed
    assert session.poll_timeout() is None


def test_join_not_acknowledged_in_time_is_a_hiccup() -> None:
    session = PhoenixSession(SECRET, 0.0)
    frames(session)
    assert session.poll_timeout() == 5.0
    session.handle_timeout(4.999)
    assert events(session) == []
    session.handle_timeout(5.0)
    [event] = events(session)
    assert isinstance(event, Hiccup)
    assert "join" in event.reason
    assert session.closed


def test_join_reply_on_another_topic_does_not_count() -> None:
    session = PhoenixSession(SECRET, 0.0)
    frames(session)
    session.handle_frame(reply(0, topic="other"), 1.0)
    [event] = events(session)
    assert isinstance(event, Ignored)
    assert not session.joined


def test_nothing_is_pipelined_before_the_join_reply() -> None:
    session = PhoenixSession(SECRET, 0.0, SessionConfig(heartbeat_interval=1.0, join_timeout=5.0))
    frames(session)
    for t in (1.0, 2.0, 3.0):
        session.handle_timeout(t)
    assert frames(session) == []
    session.handle_frame(reply(0), 3.5)
    assert events(session) == [Joined()]
    session.handle_timeout(4.0)
    assert [f["event"] for f in frames(session)] == ["heartbeat"]


# ---- heartbeats


def test_heartbeats_go_to_topic_phoenix_every_interval_with_increasing_refs() -> None:
    session = joined_session()
    sent = []
    for i in range(1, 4):
        now = 10.0 * i
        assert session.poll_timeout() == now
        session.handle_timeout(now - 0.001)
        assert frames(session) == []
        session.handle_timeout(now)
        [frame] = frames(session)
        assert frame == {"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": i}
        assert events(session) == [HeartbeatSent(i)]
        session.handle_frame(reply(i, topic="phoenix"), now + 0.01)
        assert events(session) == []
        sent.append(frame)
    assert len(sent) == 3


def test_more_than_three_unanswered_heartbeats_end_the_session() -> None:
    session = joined_session()
    heartbeats = 0
    now = 0.0
    while not session.closed:
        now += 10.0
        session.handle_timeout(now)
        heartbeats += len(frames(session))
    assert heartbeats == 4
    assert session.unanswered_heartbeats == 4
    hiccups = [e for e in events(session) if isinstance(e, Hiccup)]
    assert len(hiccups) == 1
    assert "unanswered" in hiccups[0].reason
    assert now == 50.0


def test_an_answer_clears_older_unanswered_heartbeats() -> None:
    session = joined_session()
    for now in (10.0, 20.0, 30.0):
        session.handle_timeout(now)
    frames(session)
    events(session)
    assert session.unanswered_heartbeats == 3
    session.handle_frame(reply(3, topic="phoenix"), 31.0)
    assert session.unanswered_heartbeats == 0
    # a late answer to an older heartbeat is harmless
    session.handle_frame(reply(1, topic="phoenix"), 32.0)
    assert [type(e) for e in events(session)] == [Ignored]
    for now in (40.0, 50.0, 60.0, 70.0):
        session.handle_timeout(now)
    assert not session.closed


def test_a_late_wakeup_sends_one_heartbeat() -> None:
    session = joined_session()
    session.handle_timeout(95.0)
    assert len(frames(session)) == 1
    assert session.poll_timeout() == 105.0


def test_refs_are_per_connection() -> None:
    first = joined_session()
    first.handle_timeout(10.0)
    assert frames(first)[0]["ref"] == 1
    second = PhoenixSession(SECRET, 20.0)
    assert frames(second)[0]["ref"] == 0


# ---- portal pushes


def test_init_is_reported_and_changes_nothing() -> None:
    session = joined_session()
    session.handle_frame(push("init", {}), 1.0)
    assert events(session) == [Init({})]
    assert frames(session) == []
    assert session.joined


def test_phx_close_is_a_hiccup() -> None:
    session = joined_session()
    session.handle_frame(push("phx_close", {}), 1.0)
    [event] = events(session)
    assert isinstance(event, Hiccup)
    assert session.closed


def test_phx_error_is_ignored_quietly() -> None:
    session = joined_session()
    session.handle_frame(push("phx_error", {}), 1.0)
    assert events(session) == [Ignored("phx_error on topic 'relay'", quiet=True)]
    assert session.joined


def test_disconnect_token_expired_is_fatal() -> None:
    session = joined_session()
    session.handle_frame(push("disconnect", {"reason": "token_expired"}), 1.0)
    [event] = events(session)
    assert isinstance(event, Fatal)
    assert "token expired" in event.reason
    session.handle_frame(reply(5), 2.0)  # closed: nothing more happens
    session.handle_timeout(100.0)
    assert events(session) == []
    assert frames(session) == []


def test_disconnect_with_another_reason_is_ignored() -> None:
    session = joined_session()
    session.handle_frame(push("disconnect", {"reason": "maintenance"}), 1.0)
    [event] = events(session)
    assert isinstance(event, Ignored)
    assert session.joined


BAD_INPUT: list[str | bytes] = [
    b"\x00\x01binary",
    b'{"topic":"relay","event":"phx_close","payload":{},"ref":null}',  # binary is never parsed
    "x" * (64 * 1024 + 1),
    json.dumps({"topic": "relay", "event": "phx_close", "payload": {}, "pad": "y" * 70000}),
    "not json",
    "{",
    "[1, 2, 3]",
    '"a string"',
    "null",
    "{}",
    '{"topic": 1, "event": "init"}',
    '{"topic": "relay"}',
    push("surprise", {"a": 1}),
    push("init", {}, topic="elsewhere"),
    reply(None),
    reply(12345),
    reply("0", topic="elsewhere"),
    reply(True),
    reply(1.5),
    json.dumps({"topic": "relay", "event": "phx_reply", "payload": {"status": "maybe"}, "ref": 0}),
    json.dumps({"topic": "relay", "event": "phx_reply", "payload": [], "ref": 0}),
    json.dumps({"topic": "relay", "event": "disconnect", "payload": "token_expired", "ref": None}),
    "[" * 30000 + "]" * 30000,  # deep nesting within the size limit
    '{"ref": ' + "9" * 5000 + "}",
    "\ud800",
]


@pytest.mark.parametrize("data", BAD_INPUT, ids=range(len(BAD_INPUT)))
def test_bad_input_is_ignored_without_dropping_the_session(data: str | bytes) -> None:
    session = joined_session()
    session.handle_frame(data, 1.0)
    evs = events(session)
    assert len(evs) == 1
    assert isinstance(evs[0], Ignored)
    assert not evs[0].quiet or "phx_error" in evs[0].reason or "unknown ref" in evs[0].reason
    assert frames(session) == []
    assert session.joined
    session.handle_timeout(10.0)
    assert frames(session)[0]["event"] == "heartbeat"


def test_reply_with_unknown_ref_before_join_leaves_the_join_pending() -> None:
    session = PhoenixSession(SECRET, 0.0)
    frames(session)
    session.handle_frame(reply(7), 1.0)
    assert [type(e) for e in events(session)] == [Ignored]
    session.handle_frame(reply("0"), 1.0)  # refs may come back as strings
    assert events(session) == [Joined()]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=200), st.binary(max_size=200)), max_size=10))
def test_arbitrary_frames_never_raise(inputs: list[str | bytes]) -> None:
    session = PhoenixSession(SECRET, 0.0)
    join = session.next_frame()
    for i, data in enumerate(inputs):
        session.handle_frame(data, float(i))
        session.handle_timeout(float(i))
    assert join is not None
    assert json.loads(join)["payload"] == {"stamp_secret": SECRET}
    for event in events(session):
        assert isinstance(event, Joined | Init | HeartbeatSent | Ignored | Hiccup | Fatal)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=20,
    ),
    st.sampled_from(["phx_reply", "phx_close", "phx_error", "disconnect", "init", "x"]),
)
def test_arbitrary_payloads_never_raise(payload: object, event: str) -> None:
    session = joined_session()
    session.handle_frame(json.dumps({"topic": "relay", "event": event, "payload": payload}), 1.0)
    session.handle_frame(
        json.dumps({"topic": "relay", "event": event, "payload": payload, "ref": 0}), 1.0
    )
    events(session)


# ---- URL, user agent, Retry-After


@pytest.mark.parametrize(
    ("api_url", "expected"),
    [
        ("wss://api.firezone.dev", "wss://api.firezone.dev/relay/websocket"),
        ("https://api.firezone.dev/", "wss://api.firezone.dev/relay/websocket"),
        ("ws://localhost:8081", "ws://localhost:8081/relay/websocket"),
        ("http://10.0.0.1:4000/base", "ws://10.0.0.1:4000/base/relay/websocket"),
        ("HTTPS://example.com/a/b/?x=1#frag", "wss://example.com/a/b/relay/websocket"),
        ("wss://user:pw@example.com:444", "wss://example.com:444/relay/websocket"),
        ("ws://[::1]:4000", "ws://[::1]:4000/relay/websocket"),
    ],
)
def test_login_url_maps_scheme_and_appends_the_path(api_url: str, expected: str) -> None:
    assert login_url(api_url, port=3478) == expected + "?port=3478"


@pytest.mark.parametrize("api_url", ["ftp://example.com", "example.com", "unix:/tmp/x", "wss://"])
def test_login_url_refuses_other_urls(api_url: str) -> None:
    with pytest.raises(ValueError, match="portal URL"):
        login_url(api_url, port=3478)


def test_login_url_query_order_and_optional_parameters() -> None:
    url = login_url(
        "wss://p.example", port=3479, name="relay 1", ipv4="1.2.3.4", ipv6="::1", token="t&k"
    )
    assert url == (
        "wss://p.example/relay/websocket?token=t%26k&name=relay+1&ipv4=1.2.3.4&ipv6=%3A%3A1&port=3479"
    )
    assert login_url("wss://p.example", port=1, ipv6="::1") == (
        "wss://p.example/relay/websocket?ipv6=%3A%3A1&port=1"
    )
    assert "token=<redacted>&name=relay+1" in redact_url(url)
    assert "t%26k" not in redact_url(url)


def test_user_agent_format() -> None:
    ua = user_agent("Debian", "12", "1.4.5", "x86_64", "6.1.0-18-amd64")
    assert ua == "Debian/12 relay/1.4.5 (x86_64; 6.1.0-18-amd64)"
    odd = user_agent("Debian GNU/Linux", "", "0.1.0", "x86 64", "(weird)")
    assert re.fullmatch(r"\S+/\S+ relay/0\.1\.0 \(\S+; \S+\)", odd)


def test_parse_retry_after() -> None:
    assert parse_retry_after(None, 0.0) is None
    assert parse_retry_after("120", 0.0) == 120.0
    assert parse_retry_after(" 3 ", 0.0) == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412490.0) == 0.0
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after("-5", 0.0) is None


# ---- reconnect policy


def test_initial_phase_retries_every_second_and_gives_up_after_15_s() -> None:
    policy = ReconnectPolicy(random.Random(1))
    policy.start(0.0)
    now, attempts = 0.0, 1
    while (delay := policy.next_delay(now)) is not None:
        assert delay == 1.0
        now += delay + 0.01  # each attempt fails after 10 ms
        attempts += 1
    assert 14.0 < now <= 15.1
    assert attempts == 15


def test_after_a_join_first_retry_is_immediate_then_jittered_exponential_backoff() -> None:
    policy = ReconnectPolicy(random.Random(7))
    policy.start(0.0)
    policy.joined(1.0)
    now = 100.0
    assert policy.next_delay(now) == 0.0
    interval = 0.5
    for _ in range(30):
        delay = policy.next_delay(now)
        assert delay is not None
        assert interval * 0.5 <= delay <= interval * 1.5
        now += delay
        interval = min(interval * 1.5, 60.0)
    assert interval == 60.0


def test_backoff_resets_after_a_join() -> None:
    policy = ReconnectPolicy(random.Random(3))
    policy.joined(0.0)
    for t in range(10):
        policy.next_delay(float(t))
    policy.joined(20.0)
    assert policy.next_delay(30.0) == 0.0
    delay = policy.next_delay(30.0)
    assert delay is not None
    assert 0.25 <= delay <= 0.75


def test_a_partition_longer_than_the_limit_gives_up() -> None:
    policy = ReconnectPolicy(random.Random(3), BackoffConfig(max_elapsed=100.0))
    policy.joined(0.0)
    now = 1000.0
    assert policy.next_delay(now) == 0.0
    while (delay := policy.next_delay(now)) is not None:
        now += delay
    assert 1040.0 < now <= 1100.0


def test_default_partition_limit_is_a_day() -> None:
    policy = ReconnectPolicy(random.Random(3))
    policy.joined(0.0)
    assert policy.next_delay(0.0) == 0.0
    assert policy.next_delay(23 * 3600.0) is not None
    assert policy.next_delay(24 * 3600.0 + 1) is None


def test_retry_after_is_a_lower_bound_and_capped() -> None:
    policy = ReconnectPolicy(random.Random(3), BackoffConfig(max_retry_after=300.0))
    policy.joined(0.0)
    assert policy.next_delay(10.0, retry_after=30.0) == 30.0
    assert policy.next_delay(50.0, retry_after=10_000.0) == 300.0
    initial = ReconnectPolicy(random.Random(3))
    initial.start(0.0)
    assert initial.next_delay(0.1, retry_after=5.0) == 5.0
    assert initial.next_delay(5.2, retry_after=30.0) is None  # past the initial deadline


def test_policy_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[float | None]:
        policy = ReconnectPolicy(random.Random(seed))
        policy.joined(0.0)
        return [policy.next_delay(float(t)) for t in range(10)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_ignored_reasons_are_printable_and_short() -> None:
    session = joined_session()
    session.handle_frame("\n[fake] log line\x1b[31m" + "z" * 1000, 1.0)
    [event] = events(session)
    assert isinstance(event, Ignored)
    assert event.reason.isprintable()
    assert len(event.reason) < 200
