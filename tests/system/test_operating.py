"""The operator verbs against the running daemon: ``sessions``, ``disconnect``, ``drain``,
``reload`` (secret rotation), ``top`` in tmux, ``--allocation-rate-limit``, and who may use
them (an unprivileged user is refused; the HTTP ports do not serve them)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firezone_relay.protocol import stun
from firezone_relay.protocol.auth import make_credentials
from firezone_relay.protocol.stun import Attr, Class
from simulations import channel_data
from simulations.relay_process import start_local
from simulations.turn_client import TurnClient
from tests.system.conftest import ROOT, RelayProcess, http

pytestmark = pytest.mark.system


def verb(
    relay: RelayProcess, *args: str, timeout: float = 15.0
) -> subprocess.CompletedProcess[str]:
    """``firezone-relay <args>`` aimed at ``relay`` through its control endpoint."""
    return subprocess.run(
        [sys.executable, "-m", "firezone_relay.actors.cli", *args,
         "--control-endpoint", f"127.0.0.1:{relay.control_port}"],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


class Client:
    """A TURN client on its own UDP socket, talking to ``relay``."""

    def __init__(self, relay: RelayProcess, username: str, password: str) -> None:
        self.relay = relay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2.0)
        self.turn = TurnClient(username, password, realm=relay_realm(relay))
        self.port = 0

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()
        return f"{host}:{port}"

    def ask(self, data: bytes) -> stun.Message:
        self.sock.sendto(data, self.relay.address)
        while True:
            answer = stun.parse(self.sock.recv(65536))
            if answer.cls in (Class.SUCCESS, Class.ERROR):
                return answer

    def allocate(self) -> stun.Message:
        self.turn.learn(self.ask(self.turn.allocate()))
        answer = self.ask(self.turn.allocate())
        if answer.cls == Class.SUCCESS:
            self.port = answer.get(Attr.XOR_RELAYED_ADDRESS)[1]
        return answer

    def bind(self, channel: int, peer: tuple[str, int]) -> None:
        assert self.ask(self.turn.channel_bind(channel, peer)).cls == Class.SUCCESS

    def send(self, channel: int, payload: bytes) -> None:
        self.sock.sendto(channel_data.encode(channel, payload), self.relay.address)

    def close(self) -> None:
        self.sock.close()


def relay_realm(relay: RelayProcess) -> str:
    return "firezone"


class Peer:
    """A UDP peer counting what it receives, on a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.datagrams = 0
        self.bytes = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return host, port

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.datagrams += 1
            self.bytes += len(data)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def closing() -> Iterator[list[Client | Peer]]:
    things: list[Client | Peer | RelayProcess] = []
    yield things
    for thing in things:
        if isinstance(thing, RelayProcess):
            thing.stop(signal.SIGKILL)
        else:
            thing.close()


def client_of(
    relay: RelayProcess, user: str, closing: list[Client | Peer], ttl: int = 3600
) -> Client:
    username, password = relay.credentials(user, ttl)
    client = Client(relay, username, password)
    closing.append(client)
    return client


def peer(closing: list[Client | Peer]) -> Peer:
    p = Peer()
    closing.append(p)
    return p


def wait_for(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling step


def sessions(relay: RelayProcess, *args: str) -> list[dict[str, object]]:
    done = verb(relay, "sessions", "--json", *args)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


# -- sessions and disconnect ------------------------------------------------------------------


def test_sessions_lists_three_allocations_of_two_users_with_their_fields(
    relay_factory: object, closing: list[Client | Peer]
) -> None:
    relay: RelayProcess = relay_factory(scheme="rest")  # type: ignore[operator]
    alice1, alice2 = client_of(relay, "alice", closing), client_of(relay, "alice", closing, 3000)
    bob = client_of(relay, "bob", closing)
    for c in (alice1, alice2, bob):
        assert c.allocate().cls == Class.SUCCESS
    target = peer(closing)
    alice1.bind(0x4000, target.address)
    for _ in range(5):
        alice1.send(0x4000, b"x" * 100)
    wait_for(lambda: target.datagrams == 5, 5, "the relayed datagrams")

    rows = sessions(relay)
    assert [(r["user"], r["id"]) for r in rows] == sorted(
        [("alice", alice1.port), ("alice", alice2.port), ("bob", bob.port)]
    )
    row = next(r for r in rows if r["id"] == alice1.port)
    assert row["client"] == alice1.address and row["transport"] == "udp"
    assert row["relayed"] == [f"127.0.0.1:{alice1.port}"]
    assert row["channels"] == 1 and row["permissions"] == 1
    assert row["to_peer_datagrams"] == 5 and row["to_peer_bytes"] == 500
    assert row["to_client_datagrams"] == 0
    assert 0 <= float(row["age_s"]) < 30 and 500 < float(row["expires_in_s"]) <= 600  # type: ignore[arg-type]
    assert str(row["username"]).endswith(":alice")

    assert {r["id"] for r in sessions(relay, "--user", "alice")} == {alice1.port, alice2.port}
    table = verb(relay, "sessions").stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "USER", "CLIENT"] and len(table) == 4
    assert any(line.startswith(str(alice1.port)) and "5 dg 500 B" in line for line in table)


def test_disconnect_frees_at_once_the_next_request_gets_437_and_data_stops(
    relay_factory: object, closing: list[Client | Peer]
) -> None:
    relay: RelayProcess = relay_factory(scheme="rest")  # type: ignore[operator]
    bob, alice = client_of(relay, "bob", closing), client_of(relay, "alice", closing)
    for c in (bob, alice):
        assert c.allocate().cls == Class.SUCCESS
    target = peer(closing)
    bob.bind(0x4000, target.address)
    bob.send(0x4000, b"before")
    wait_for(lambda: target.datagrams == 1, 5, "the first datagram")

    done = verb(relay, "disconnect", "--user", "bob")
    assert done.returncode == 0, done.stderr
    assert f"disconnected 1 allocation(s): {bob.port}" in done.stdout
    bob.send(0x4000, b"after")
    assert bob.ask(bob.turn.refresh(600)).get(Attr.ERROR_CODE)[0] == 437
    time.sleep(0.3)  # what the relay would have sent by now
    assert target.datagrams == 1
    assert [r["user"] for r in sessions(relay)] == ["alice"]

    assert verb(relay, "disconnect", "--allocation", str(alice.port)).returncode == 0
    assert sessions(relay) == []
    missing = verb(relay, "disconnect", "--allocation", str(alice.port))
    assert missing.returncode == 1 and "no such allocation" in missing.stderr


# -- drain -------------------------------------------------------------------------------------


def test_drain_refuses_new_allocations_keeps_relaying_and_exits_0_after_the_last(
    relay_factory: object, closing: list[Client | Peer]
) -> None:
    relay: RelayProcess = relay_factory(scheme="rest")  # type: ignore[operator]
    old = client_of(relay, "old", closing)
    assert old.allocate().cls == Class.SUCCESS
    target = peer(closing)
    old.bind(0x4000, target.address)

    done = verb(relay, "drain", "--deadline", "60")
    assert done.returncode == 0, done.stderr
    assert "draining: 1 allocation(s) left" in done.stdout
    assert http("GET", f"{relay.health}/readyz")[0] == 503
    new = client_of(relay, "new", closing)
    assert new.allocate().get(Attr.ERROR_CODE)[0] == 508
    for _ in range(20):  # traffic still flows
        old.send(0x4000, b"y" * 200)
        time.sleep(0.01)
    wait_for(lambda: target.datagrams == 20, 5, "traffic during the drain")
    assert relay.alive()

    assert old.ask(old.turn.refresh(0)).cls == Class.SUCCESS  # the last allocation ends
    assert relay.proc.wait(5) == 0
    assert "drained: no allocation left" in relay.log()


def test_drain_deadline_and_sigusr1(relay_factory: object, closing: list[Client | Peer]) -> None:
    relay: RelayProcess = relay_factory(scheme="rest")  # type: ignore[operator]
    assert client_of(relay, "stays", closing).allocate().cls == Class.SUCCESS
    start = time.monotonic()
    assert verb(relay, "drain", "--deadline", "1").returncode == 0
    assert relay.proc.wait(10) == 0
    assert time.monotonic() - start >= 0.9
    assert "drain deadline: 1 allocations left" in relay.log()

    other: RelayProcess = relay_factory(scheme="rest")  # type: ignore[operator]
    other.proc.send_signal(signal.SIGUSR1)
    assert other.proc.wait(5) == 0  # nothing to wait for
    assert "draining" in other.log()


# -- reload: secret rotation -------------------------------------------------------------------


def test_secret_rotation_through_reload(closing: list[Client | Peer], tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text("secret-A-0123456789abcdef0123456789\n")
    relay = start_local(tmp_path, "--auth-secret-file", str(secrets), scheme="rest")
    closing.append(relay)  # type: ignore[arg-type]
    expiry = int(time.time()) + 3600

    def allocates(secret: str, user: str) -> bool:
        username, password = make_credentials("rest", secret, expiry, user)
        client = Client(relay, username, password)
        closing.append(client)
        return bool(client.allocate().cls == Class.SUCCESS)

    a, b = "secret-A-0123456789abcdef0123456789", "secret-B-0123456789abcdef0123456789"
    assert allocates(a, "a1") and not allocates(b, "b1")

    secrets.write_text(f"# rotating\n{b}\n{a}\n")
    done = verb(relay, "reload")
    assert done.returncode == 0 and "2 secret(s)" in done.stdout, done.stderr
    assert allocates(a, "a2") and allocates(b, "b2")
    minted = subprocess.run(
        [sys.executable, "-m", "firezone_relay.actors.cli", "credentials", "--auth-scheme", "rest",
         "--auth-secret-file", str(secrets), "--user", "minted", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    creds = json.loads(minted.stdout)
    minted_client = Client(relay, creds["username"], creds["password"])
    closing.append(minted_client)
    assert minted_client.allocate().cls == Class.SUCCESS  # signed with B, the first

    secrets.write_text(f"{b}\n")
    relay.proc.send_signal(signal.SIGHUP)  # the same as `reload`
    wait_for(lambda: relay.log().count("reload: 1 accepted secret") == 1, 5, "SIGHUP's reload")
    assert allocates(b, "b3") and not allocates(a, "a3")

    secrets.write_text("")  # a broken file changes nothing
    broken = verb(relay, "reload")
    assert broken.returncode == 1 and "holds no secret" in broken.stderr
    assert allocates(b, "b4")

    secrets.write_text(f"{b}\nshort\n")  # a short secret anywhere in it changes nothing
    short = verb(relay, "reload")
    assert short.returncode == 1, short.stdout
    assert f"the auth secret in {secrets} is too short (5 characters)" in short.stderr
    assert allocates(b, "b5")


# -- who may use them ----------------------------------------------------------------------------


def _source_copy() -> Iterator[Path]:
    """The package's source in a directory any user can read (the repository may not be)."""
    with tempfile.TemporaryDirectory(prefix="relay-ops-") as tmp:
        package = Path(tmp) / "firezone_relay"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for part in ("protocol", "actors"):
            shutil.copytree(
                ROOT / part, package / part, ignore=shutil.ignore_patterns("*.so", "*.c")
            )
        os.chmod(tmp, 0o755)
        for path in Path(tmp).rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        yield Path(tmp)


def test_an_unprivileged_user_is_refused_and_the_http_ports_do_not_serve_the_verbs(
    relay: RelayProcess,
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root to run a verb as nobody")
    socket_path = f"/run/firezone-relay/control-{relay.control_port}.sock"
    assert os.stat(socket_path).st_mode & 0o777 == 0o600
    as_nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
    with contextlib.contextmanager(_source_copy)() as source:
        env = {"PYTHONPATH": str(source), "PATH": os.environ["PATH"]}
        code = ("import sys; from firezone_relay.actors.admin_cli import VERBS; "
                "sys.exit(VERBS[sys.argv[1]](sys.argv[2:]))")  # fmt: skip
        for args in (["sessions"], ["disconnect", "--user", "x"], ["reload"], ["drain"]):
            done = subprocess.run(
                [*as_nobody, "/usr/bin/python3", "-c", code, *args,
                 "--control-endpoint", f"127.0.0.1:{relay.control_port}"],
                env=env, capture_output=True, text=True, timeout=15, check=False,
            )  # fmt: skip
            assert done.returncode == 1, done
            assert "permission denied" in done.stderr and "only root" in done.stderr
            assert "Traceback" not in done.stderr
        # with the file opened to everyone, the relay still checks who is asking
        os.chmod(socket_path, 0o666)
        try:
            done = subprocess.run(
                [*as_nobody, "/usr/bin/python3", "-c", code, "sessions",
                 "--control-endpoint", f"127.0.0.1:{relay.control_port}"],
                env=env, capture_output=True, text=True, timeout=15, check=False,
            )  # fmt: skip
        finally:
            os.chmod(socket_path, 0o600)
        assert done.returncode == 1 and "only root and the relay's user" in done.stderr, done
    assert relay.readyz()  # nothing drained

    for base in (relay.health, relay.control):
        for method, route in (("GET", "/sessions"), ("POST", "/disconnect"), ("POST", "/drain"),
                              ("POST", "/reload"), ("GET", "/stats")):  # fmt: skip
            assert http(method, f"{base}{route}?user=x")[0] == 404
    assert http("POST", f"{relay.control}/log_filter?directives=info")[0] == 200


# -- top -------------------------------------------------------------------------------------


def test_top_in_tmux_shows_the_live_numbers_and_quits_on_q(
    relay_factory: object, closing: list[Client | Peer]
) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    relay: RelayProcess = relay_factory(scheme="rest")  # type: ignore[operator]
    sender = client_of(relay, "streamer", closing)
    assert sender.allocate().cls == Class.SUCCESS
    target = peer(closing)
    sender.bind(0x4000, target.address)
    stop = threading.Event()

    def stream() -> None:  # 100 datagrams of 1000 bytes a second
        while not stop.is_set():
            sender.send(0x4000, b"z" * 1000)
            time.sleep(0.01)

    streaming = threading.Thread(target=stream, daemon=True)
    streaming.start()
    session = f"relay-top-{relay.control_port}"
    command = (f"{sys.executable} -m firezone_relay.actors.cli top "
               f"--control-endpoint 127.0.0.1:{relay.control_port}")  # fmt: skip
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30",
                    "-e", f"PYTHONPATH={ROOT}", command], check=True)  # fmt: skip
    try:
        screen = ""

        def shows_traffic() -> bool:
            nonlocal screen
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                    capture_output=True, text=True, check=False).stdout  # fmt: skip
            line = next((x for x in screen.splitlines() if x.startswith("client->peer")), "")
            return "allocations 1" in screen and "streamer" in screen and line.split()[1:2] != ["0"]

        try:
            wait_for(shows_traffic, 10, "top to show the traffic")
        finally:
            print(screen)
        (rate,) = [x.split()[1] for x in screen.splitlines() if x.startswith("client->peer")]
        assert 50 <= int(rate) <= 150  # about 100 datagrams a second
        print(screen)
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)

        def ended() -> bool:
            alive = subprocess.run(["tmux", "has-session", "-t", session],
                                   capture_output=True, check=False)  # fmt: skip
            return alive.returncode != 0

        wait_for(ended, 5, "top to quit on q")
    finally:
        stop.set()
        streaming.join(2)
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)


# -- the rate limit ------------------------------------------------------------------------------


def test_the_rate_limit_holds_one_allocation_to_its_rate_and_leaves_another_alone(
    relay_factory: object, closing: list[Client | Peer]
) -> None:
    rate = 250_000
    relay: RelayProcess = relay_factory("--allocation-rate-limit", str(rate), scheme="rest")  # type: ignore[operator]
    heavy, light = client_of(relay, "heavy", closing), client_of(relay, "light", closing)
    for c in (heavy, light):
        assert c.allocate().cls == Class.SUCCESS
    heavy_peer, light_peer = peer(closing), peer(closing)
    heavy.bind(0x4000, heavy_peer.address)
    light.bind(0x4000, light_peer.address)
    payload = b"h" * 1000
    seconds = 4.0
    start = time.monotonic()
    sent_light = 0
    tick = 0
    while (elapsed := time.monotonic() - start) < seconds:
        for _ in range(10):  # heavy: 1 MB/s, four times its limit
            heavy.send(0x4000, payload)
        if tick % 10 == 0:  # light: 100 kB/s, under it
            for _ in range(10):
                light.send(0x4000, payload)
            sent_light += 10
        tick += 1
        time.sleep(max(0.0, tick * 0.01 - elapsed))
    time.sleep(0.5)
    delivered = heavy_peer.bytes / seconds
    assert 0.8 * rate <= delivered <= 1.2 * rate, delivered
    assert light_peer.datagrams == sent_light
    rows = {r["user"]: r for r in sessions(relay)}
    assert rows["heavy"]["to_peer_bytes"] == heavy_peer.bytes
    assert rows["light"]["to_peer_datagrams"] == sent_light
    _, text = http("GET", f"{relay.health}/metrics")
    dropped = next(
        float(line.rpartition(" ")[2]) for line in text.splitlines()
        if line.startswith("relay_datagrams_dropped") and 'reason="rate_limited"' in line
    )  # fmt: skip
    assert dropped == tick * 10 - heavy_peer.datagrams


# -- stream clients ------------------------------------------------------------------------------


def test_sessions_show_the_stream_transport_and_stats_count_open_connections(
    relay_factory: object, tmp_path: Path
) -> None:
    """A TCP and a TLS client with an allocation each, and a TCP connection without one:
    ``sessions`` names each allocation's transport and client, and ``/stats`` (what ``top``
    shows) counts the open connections per transport, down again when they close."""
    import ssl

    from firezone_relay.actors.admin_cli import AdminClient
    from firezone_relay.actors.top import render
    from simulations.relay_process import free_port
    from tests.system.stream_client import StreamClient, relayed_address
    from tests.system.tls_files import make_cert

    cert, key = make_cert(tmp_path)
    tls_port = free_port()
    relay: RelayProcess = relay_factory(  # type: ignore[operator]
        "--tls-listen-port", str(tls_port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key),
    )  # fmt: skip
    admin = AdminClient(f"/run/firezone-relay/control-{relay.control_port}.sock")
    context = ssl.create_default_context(cafile=str(cert))
    tcp = StreamClient.connect(relay)
    tls = StreamClient.connect(relay, tls_port, tls=context)
    idle = StreamClient.connect(relay)
    try:
        ports = {
            "tcp": relayed_address(tcp.allocate())[1],
            "tls": relayed_address(tls.allocate())[1],
        }
        rows = {r["id"]: r for r in sessions(relay)}
        for transport, client in (("tcp", tcp), ("tls", tls)):
            row = rows[ports[transport]]
            host, port = client.sock.getsockname()[:2]
            assert row["transport"] == transport and row["client"] == f"{host}:{port}"
        table = verb(relay, "sessions").stdout
        assert "/tcp" in table and "/tls" in table

        stats = admin.request("GET", "/stats")
        assert stats["connections"] == {"tcp": 2, "tls": 1}
        screen = render(stats, None, 120)
        assert "connections  tcp 2  tls 1" in screen
    finally:
        for client in (tcp, tls, idle):
            client.close()
    wait_for(
        lambda: admin.request("GET", "/stats")["connections"] == {"tcp": 0, "tls": 0},
        5,
        "the closed connections to leave the count",
    )
