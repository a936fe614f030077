"""A relay of two workers (``--num-worker-threads 2``) on loopback: clients are steered by
their source address and port (the supervisor's BPF program, not the kernel's hash), each
worker allocates from its own share of the ports, a killed worker comes back on the same
socket without touching the other's clients, and the relay stops as one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from firezone_relay.actors.steering import worker_for
from firezone_relay.protocol import stun
from firezone_relay.protocol.ports import PortShares
from firezone_relay.protocol.stream_framing import channel_data_frame
from firezone_relay.protocol.stun import Attr, Class
from simulations import channel_data
from simulations.portal_thread import PortalThread
from simulations.turn_client import TurnClient
from tests.system.conftest import RelayProcess, free_port, http, start_relay
from tests.system.stream_client import StreamClient, relayed_address
from tests.system.test_daemon_portal import _wait_status
from tests.system.test_operating import sessions, verb
from tests.system.test_otlp_traces import Collector

pytestmark = pytest.mark.system

WORKERS = 2
CHANNEL = 0x4000


def _workers(relay: RelayProcess) -> list[int]:
    """The supervisor's children (the workers), by pid."""
    path = Path(f"/proc/{relay.pid}/task/{relay.pid}/children")
    with contextlib.suppress(OSError):
        return [int(p) for p in path.read_text().split()]
    return []


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def _share(relay: RelayProcess, index: int) -> tuple[int, int]:
    return PortShares(relay.lowest_port, relay.highest_port, WORKERS).of(index)


class UdpClient:
    """A TURN client on a socket of its own, whose source port is chosen so that the steering
    program sends it to worker ``worker``."""

    def __init__(
        self, relay: RelayProcess, worker: int, port: int | None = None, user: str | None = None
    ) -> None:
        self.relay = relay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if port is not None:
            self.sock.bind(("127.0.0.1", port))
        else:
            while True:  # a free port the program maps to ``worker``
                self.sock.bind(("127.0.0.1", 0))
                if worker_for("127.0.0.1", self.port, WORKERS) == worker:
                    break
                self.sock.close()
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        assert worker_for("127.0.0.1", self.port, WORKERS) == worker
        self.sock.settimeout(5)
        username, password = relay.credentials(user)
        self.turn = TurnClient(username, password)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def transact(self, request: bytes) -> stun.Message:
        tid = request[8:20]
        self.sock.sendto(request, self.relay.address)
        while True:
            data = self.sock.recv(65536)
            if data[0] < 0x40 and data[8:20] == tid:
                return stun.parse(data)

    def allocate(self) -> tuple[str, int]:
        response = self.transact(self.turn.allocate(signed=False))
        if response.get(Attr.ERROR_CODE) is not None:
            self.turn.learn(response)
            response = self.transact(self.turn.allocate())
        assert response.cls == Class.SUCCESS, response.get(Attr.ERROR_CODE)
        relayed = response.get(Attr.XOR_RELAYED_ADDRESS)
        return relayed if isinstance(relayed[0], str) else relayed[0]  # type: ignore[no-any-return]

    def bind(self, peer: tuple[str, int]) -> None:
        response = self.transact(self.turn.channel_bind(CHANNEL, peer))
        assert response.cls == Class.SUCCESS, response.get(Attr.ERROR_CODE)

    def send(self, data: bytes) -> None:
        self.sock.sendto(channel_data.encode(CHANNEL, data), self.relay.address)

    def receive(self) -> bytes:
        while True:
            data = self.sock.recv(65536)
            if data[0] >= 0x40:
                return channel_data.decode(data)[1]

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def echo_peer() -> Iterator[tuple[str, int]]:
    """A UDP peer on its own thread that echoes every datagram."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65536)
            except TimeoutError:
                continue
            sock.sendto(data, addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()
    finally:
        stop.set()
        thread.join(2)
        sock.close()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    relay = start_relay(tmp_path, "--num-worker-threads", str(WORKERS))
    yield relay
    relay.stop(signal.SIGKILL)


def _relayed_on(relay: RelayProcess, worker: int, client: UdpClient, peer: tuple[str, int]) -> int:
    """Allocate (on the predicted worker's share), bind a channel, echo once; the port."""
    _host, port = client.allocate()
    low, high = _share(relay, worker)
    assert low <= port <= high, (worker, port, (low, high))
    client.bind(peer)
    client.send(b"hello from %d" % worker)
    assert client.receive() == b"hello from %d" % worker
    return port


def test_clients_land_on_the_worker_the_program_picks_and_relay_both_ways(
    relay: RelayProcess,
) -> None:
    assert len(_workers(relay)) == WORKERS
    with echo_peer() as peer:
        clients = [UdpClient(relay, w) for w in (0, 1)]
        for worker, client in enumerate(clients):
            _relayed_on(relay, worker, client, peer)
        # more clients, each on the worker predicted from its source port: the kernel's own
        # reuseport hash would disagree with the prediction for about half of them
        for i in range(12):
            worker = i % WORKERS
            extra = UdpClient(relay, worker)
            _relayed_on(relay, worker, extra, peer)
            extra.close()
        for client in clients:
            client.close()


def test_a_killed_worker_comes_back_on_the_same_socket_and_the_other_loses_nothing(
    relay: RelayProcess,
) -> None:
    pids = _workers(relay)
    assert len(pids) == WORKERS
    with echo_peer() as peer:
        survivor, victim = UdpClient(relay, 0), UdpClient(relay, 1)
        _relayed_on(relay, 0, survivor, peer)
        _relayed_on(relay, 1, victim, peer)
        # which pid is worker 1: the one whose log line says so
        victim_pid = next(p for p in pids if f"worker 1 started (pid {p})" in relay.log())

        sent = received = 0
        killed_at = 0.0
        for i in range(300):  # the survivor's traffic goes on across the kill
            if i == 100:
                os.kill(victim_pid, signal.SIGKILL)
                killed_at = time.monotonic()
                # asked while worker 1 is down: waits in its socket for the new worker
                victim.sock.sendto(victim.turn.binding(), relay.address)
            survivor.send(b"%d" % i)
            sent += 1
            assert survivor.receive() == b"%d" % i
            received += 1
        assert (sent, received) == (300, 300)

        # the binding request sent to the dead worker is answered by its successor
        answer = stun.parse(victim.sock.recv(65536))
        assert answer.cls == Class.SUCCESS
        back = time.monotonic() - killed_at
        _wait(lambda: len(_workers(relay)) == WORKERS and relay.readyz())
        print(f"worker 1 answered {back * 1000:.0f} ms after its SIGKILL")
        assert victim_pid not in _workers(relay)
        assert f"worker 1 (pid {victim_pid}) exited with SIGKILL" in relay.log()

        # the same 5-tuple reaches worker 1 again, which lost its allocation: a new one works
        port = victim.port
        victim.close()
        again = UdpClient(relay, 1, port=port)
        _relayed_on(relay, 1, again, peer)
        # and the survivor's allocation lives on
        survivor.send(b"still here")
        assert survivor.receive() == b"still here"
        again.close()
        survivor.close()


def test_metrics_are_the_relay_totals_and_readyz_needs_every_worker(relay: RelayProcess) -> None:
    with echo_peer() as peer:
        clients = [UdpClient(relay, w) for w in (0, 1, 0)]
        for client, worker in zip(clients, (0, 1, 0), strict=True):
            _relayed_on(relay, worker, client, peer)

        def metric(name: str) -> float:
            text = http("GET", f"{relay.health}/metrics")[1]
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(name + " ") or line.startswith(name + "{")
            )

        _wait(lambda: metric("relay_active_allocations") == 3)
        _wait(lambda: metric("relay_active_channels") == 3)
        assert relay.readyz()
        for client in clients:
            client.close()


def test_sigterm_stops_every_worker(relay: RelayProcess) -> None:
    pids = _workers(relay)
    with echo_peer() as peer:
        client = UdpClient(relay, 1)
        _relayed_on(relay, 1, client, peer)
        code, took = relay.stop(signal.SIGTERM)
        client.close()
    assert code == 0, relay.log()[-3000:]
    assert took < 2.0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid)
    assert "freed 1 allocations worker=1" in relay.log()


def _state(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
    return "zombie"


def test_workers_die_with_the_supervisor(relay: RelayProcess) -> None:
    pids = _workers(relay)
    assert len(pids) == WORKERS
    os.kill(relay.pid, signal.SIGKILL)
    relay.proc.wait(5)

    def gone() -> bool:
        return all(not Path(f"/proc/{pid}").exists() for pid in pids)

    _wait(gone)
    # nothing holds the listen port any more
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", relay.listen_port))


@pytest.fixture
def portal() -> Iterator[PortalThread]:
    with PortalThread("relay-token") as p:
        yield p


def test_portal_join_and_its_secret_with_workers(tmp_path: Path, portal: PortalThread) -> None:
    portal.call(portal.portal.refuse, 503)
    relay = start_relay(
        tmp_path,
        "--num-worker-threads",
        str(WORKERS),
        "--api-url",
        portal.portal.url,
        "relay-token",
        "relay-1",
        wait_ready=False,
    )
    try:
        _wait_status(relay, "/healthz", 200)
        time.sleep(0.5)
        assert http("GET", f"{relay.health}/readyz")[0] == 503  # workers up, not joined
        portal.call(portal.portal.accept)
        _wait_status(relay, "/readyz", 200)
        joined = portal.portal.connected_relays()
        assert [(r.name, r.port) for r in joined] == [("relay-1", relay.listen_port)]
        # credentials the portal mints work on both workers (one secret for the relay)
        with echo_peer() as peer:
            for worker in (0, 1):
                creds = portal.call(portal.portal.credentials, f"client-{worker}")[0]
                client = UdpClient(relay, worker)
                client.turn = TurnClient(creds["username"], creds["password"])
                _relayed_on(relay, worker, client, peer)
                client.close()
        code, took = relay.stop()
        assert code == 0 and took < 2.0
    finally:
        relay.stop(signal.SIGKILL)


def test_portal_fatal_stops_every_worker(tmp_path: Path, portal: PortalThread) -> None:
    relay = start_relay(
        tmp_path,
        "--num-worker-threads",
        str(WORKERS),
        "--api-url",
        portal.portal.url,
        "wrong-token",
        wait_ready=False,
    )
    try:
        code = relay.proc.wait(20)
        assert code == 1, relay.log()[-2000:]
        assert "rejected the token" in relay.log()
    finally:
        relay.stop(signal.SIGKILL)


def test_operator_verbs_answer_for_every_worker(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, "--num-worker-threads", str(WORKERS), scheme="rest")
    try:
        with echo_peer() as peer:
            alice = [UdpClient(relay, w, user="alice") for w in (0, 1)]
            bob = UdpClient(relay, 1, user="bob")
            ports = [_relayed_on(relay, w, c, peer) for w, c in ((0, alice[0]), (1, alice[1]))]
            bob_port = _relayed_on(relay, 1, bob, peer)

            rows = sessions(relay)
            assert sorted((r["worker"], r["id"], r["user"]) for r in rows) == sorted(
                [(0, ports[0], "alice"), (1, ports[1], "alice"), (1, bob_port, "bob")]
            )
            table = verb(relay, "sessions").stdout.splitlines()
            assert table[0].split()[:3] == ["WORKER", "ID", "USER"] and len(table) == 4

            done = verb(relay, "disconnect", "--user", "alice")
            assert done.returncode == 0, done.stderr
            assert "disconnected 2 allocation(s)" in done.stdout
            assert [r["user"] for r in sessions(relay)] == ["bob"]
            assert verb(relay, "reload").returncode == 0

            done = verb(relay, "drain")
            assert done.returncode == 0, done.stderr
            assert "draining: 1 allocation(s) left" in done.stdout
            assert http("GET", f"{relay.health}/readyz")[0] == 503
            refused = UdpClient(relay, 1)
            with pytest.raises(AssertionError, match="508"):
                refused.allocate()
            refused.close()
            # the last allocation ends: both workers have exited, and so does the relay
            assert bob.transact(bob.turn.refresh(0)).cls == Class.SUCCESS
            assert relay.proc.wait(5) == 0
            assert "drained: no allocation left" in relay.log()
            for client in (*alice, bob):
                client.close()
    finally:
        relay.stop(signal.SIGKILL)


def test_spans_of_each_worker_say_which(tmp_path: Path) -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = free_port(socket.SOCK_STREAM)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    relay = start_relay(
        tmp_path,
        "--num-worker-threads",
        str(WORKERS),
        "--otlp-grpc-endpoint",
        f"127.0.0.1:{port}",
        env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    try:
        with echo_peer() as peer:
            for worker in (0, 1):
                client = UdpClient(relay, worker)
                _relayed_on(relay, worker, client, peer)
                client.close()
        for worker in (0, 1):
            _wait(
                lambda w=worker: any(
                    s.resource.get("relay.worker") == str(w)
                    for s in collector.spans("allocation.create")
                )
            )
        assert len(collector.spans("allocation.create")) == 2
    finally:
        relay.stop(signal.SIGKILL)
        server.stop(0)


# -- one relay across workers (the core's registry, nonces and relay loop over the channel) --


def test_one_username_from_two_workers_keeps_one_allocation(relay: RelayProcess) -> None:
    first, second = UdpClient(relay, 0), UdpClient(relay, 1)
    second.turn = TurnClient(first.turn.username, first.turn.password)  # the same username
    with echo_peer() as peer:
        _relayed_on(relay, 0, first, peer)
        _relayed_on(relay, 1, second, peer)
        # the registry had worker 0 free the first one before worker 1 answered
        answer = first.transact(first.turn.refresh(600))
        assert answer.get(Attr.ERROR_CODE)[0] == 437
        rows = sessions(relay)
        assert [(r["worker"], r["client"]) for r in rows] == [(1, f"127.0.0.1:{second.port}")]
    first.close()
    second.close()


def test_the_per_user_quota_holds_for_the_relay(tmp_path: Path) -> None:
    relay = start_relay(
        tmp_path,
        "--num-worker-threads",
        str(WORKERS),
        "--max-allocations-per-user",
        "2",
        scheme="rest",
    )
    try:
        with echo_peer() as peer:
            held = [UdpClient(relay, w, user="carol") for w in (0, 1)]
            for worker, client in enumerate(held):
                _relayed_on(relay, worker, client, peer)
            for worker in (0, 1):  # a third, on either worker, is over the quota
                extra = UdpClient(relay, worker, user="carol")
                with pytest.raises(AssertionError, match="486"):
                    extra.allocate()
                extra.close()
            other = UdpClient(relay, 0, user="dave")  # another user is not affected
            _relayed_on(relay, 0, other, peer)
            for client in (*held, other):
                client.close()
    finally:
        relay.stop(signal.SIGKILL)


def test_the_relay_loop_between_two_workers(relay: RelayProcess) -> None:
    a, b = UdpClient(relay, 0), UdpClient(relay, 1)
    a_relayed, b_relayed = a.allocate(), b.allocate()
    assert PortShares(relay.lowest_port, relay.highest_port, WORKERS).owner(b_relayed[1]) == 1
    a.bind(b_relayed)
    b.bind(a_relayed)
    for i in range(20):
        a.send(b"a to b %d" % i)
        assert b.receive() == b"a to b %d" % i
        b.send(b"b to a %d" % i)
        assert a.receive() == b"b to a %d" % i
    a.close()
    b.close()


def test_max_allocations_holds_for_the_relay_not_per_worker(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, "--num-worker-threads", str(WORKERS), "--max-allocations", "2")
    try:
        with echo_peer() as peer:
            # both on worker 0: a split of the cap (1 each) would refuse the second
            held = [UdpClient(relay, 0), UdpClient(relay, 0)]
            for client in held:
                _relayed_on(relay, 0, client, peer)
            extra = UdpClient(relay, 1)
            with pytest.raises(AssertionError, match="508"):
                extra.allocate()
            # one ends: worker 1 gets the room
            assert held[0].transact(held[0].turn.refresh(0)).cls == Class.SUCCESS
            later = UdpClient(relay, 1)
            _relayed_on(relay, 1, later, peer)
            for client in (*held, extra, later):
                client.close()
    finally:
        relay.stop(signal.SIGKILL)


def test_tcp_clients_are_served_by_whichever_worker_accepted_them(relay: RelayProcess) -> None:
    """TURN over TCP on the workers' SO_REUSEPORT listeners: each connection's allocation is
    in the share of the worker that accepted it, and relays both ways."""
    owners = PortShares(relay.lowest_port, relay.highest_port, WORKERS)
    seen: set[int | None] = set()
    with echo_peer() as peer:
        for _ in range(8):
            client = StreamClient.connect(relay)
            try:
                _host, port = relayed_address(client.allocate())
                seen.add(owners.owner(port))
                client.bind(CHANNEL, peer)
                client.send(channel_data_frame(CHANNEL, b"over tcp"))
                frame = client.next_frame()
                assert frame[4 : 4 + 8] == b"over tcp"
            finally:
                client.close()
    assert seen <= {0, 1} and None not in seen
