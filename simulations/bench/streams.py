"""TURN over TCP and TLS beside coturn: relay CPU per relayed message. Prints; asserts nothing.

    python -m simulations.bench.streams [--clients 100] [--messages 200] [--interval-ms 20]
                                        [--length 100] [--rounds 2] [--no-coturn]

The same load for both relays: coturn's own ``turnutils_uclient -t`` (TCP) and ``-S -t`` (TLS),
``--clients`` sessions, each sending ``--messages`` Send indications of ``--length`` bytes every
``--interval-ms`` to ``turnutils_peer``, which echoes them (uclient's channel mode picks channel
numbers past 0x4FFF, which RFC 8656 refuses). Every echoed message crosses the relay twice
(client -> peer as a Send indication, peer -> client as a Data indication), so a round's relayed
messages are uclient's sent + received. Each relay runs pinned to CPU 1 (the load on CPU 0) and
its CPU time (user + system of all its threads, from /proc) over the round is divided by them.
coturn is Debian's ``turnserver`` with ``tls-listening-port`` and the same self-signed
certificate, and as many relay threads as ours relays on (``--coturn-relay-threads``, 1: our
event loop; ``default`` leaves coturn's own, one per CPU, which on the one pinned CPU costs it
more context switches). The rounds alternate between the relays, so the machine's neighbours weigh
on both alike.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from simulations.bench.daemon import PORTS, cpu_seconds, free_port, pinned
from simulations.relay_process import spawn_daemon

SECRET = "bench-secret-streams-0123456789"
REALM = "bench.realm"
COTURN_CONF = """\
listening-ip=127.0.0.1
relay-ip=127.0.0.1
use-auth-secret
static-auth-secret={secret}
realm={realm}
no-dtls
no-tcp-relay
allow-loopback-peers
no-rfc5780
no-stun-backward-compatibility
no-multicast-peers
no-cli
log-file=stdout
simple-log
listening-port={port}
tls-listening-port={tls_port}
cert={cert}
pkey={key}
min-port={low}
max-port={high}
pidfile={workdir}/turnserver.pid
"""

_COUNTERS = re.compile(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")


@dataclass
class Relay:
    name: str
    proc: subprocess.Popen[bytes]
    tcp_port: int
    tls_port: int

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def make_cert(workdir: Path) -> tuple[Path, Path]:
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key),
            "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def wait_tcp(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on TCP {port}")


def start_ours(workdir: Path, cert: Path, key: Path) -> Relay:
    port, tls_port = free_port(), free_port(socket.SOCK_STREAM)
    args = [
        "--public-ip4-addr", "127.0.0.1", "--bind-ip4-addr", "127.0.0.1",
        "--allow-loopback-peers", "--listen-port", str(port),
        "--lowest-port", str(PORTS[0]), "--highest-port", str(PORTS[1]),
        "--auth-secret", SECRET, "--auth-scheme", "rest", "--realm", REALM,
        "--no-single-allocation-per-username",
        "--max-stream-connections-per-source", "1000",
        "--tls-listen-port", str(tls_port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key),
        "--health-check-addr", f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
        "--control-endpoint", f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
    ]  # fmt: skip
    daemon = spawn_daemon(args, workdir / "relay.log", env={"RUST_LOG": "warn"}, wrapper=pinned([]))
    wait_tcp(port)
    wait_tcp(tls_port)
    return Relay("python relay", daemon.proc, port, tls_port)


def start_coturn(workdir: Path, cert: Path, key: Path, relay_threads: str = "1") -> Relay:
    port, tls_port = free_port(), free_port(socket.SOCK_STREAM)
    conf = COTURN_CONF.format(
        secret=SECRET, realm=REALM, port=port, tls_port=tls_port, cert=cert, key=key,
        low=PORTS[0], high=PORTS[1], workdir=workdir,
    )  # fmt: skip
    if relay_threads != "default":
        conf += f"relay-threads={int(relay_threads)}\n"
    (workdir / "coturn.conf").write_text(conf)
    log = open(workdir / "coturn.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        pinned(["turnserver", "-c", str(workdir / "coturn.conf")]),
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_tcp(port)
    wait_tcp(tls_port)
    return Relay("coturn", proc, port, tls_port)


def run_round(
    relay: Relay, tls: bool, peer_port: int, args: argparse.Namespace
) -> tuple[int, float]:
    """(relayed messages, relay CPU seconds) of one uclient run."""
    argv = [
        "timeout", "120", "taskset", "-c", "0", "turnutils_uclient", "-t", "-s", "-c",
        "-m", str(args.clients), "-n", str(args.messages), "-l", str(args.length),
        "-z", str(args.interval_ms), "-W", SECRET, "-u", "bench",
        "-e", "127.0.0.1", "-r", str(peer_port),
        "-p", str(relay.tls_port if tls else relay.tcp_port),
    ]  # fmt: skip
    if tls:
        argv.insert(argv.index("-t"), "-S")
    argv.append("127.0.0.1")
    before = cpu_seconds(relay.proc.pid)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=150).stdout
    cpu = cpu_seconds(relay.proc.pid) - before
    counters = _COUNTERS.findall(out)
    if not counters:
        raise RuntimeError(f"uclient printed no counters:\n{out[-2000:]}")
    sent, received = (int(x) for x in counters[-1])
    return sent + received, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--interval-ms", type=int, default=20)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-coturn", action="store_true")
    p.add_argument("--coturn-relay-threads", default="1", help="a number, or 'default'")
    args = p.parse_args()
    if shutil.which("turnutils_uclient") is None or shutil.which("turnutils_peer") is None:
        raise SystemExit("needs coturn's turnutils_uclient and turnutils_peer")
    coturn = not args.no_coturn and shutil.which("turnserver") is not None
    results: dict[tuple[str, str], list[tuple[int, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        workdir = Path(tmp)
        cert, key = make_cert(workdir)
        peer_port = free_port()
        peer_log = open(workdir / "peer.log", "wb")  # noqa: SIM115
        peer = subprocess.Popen(
            ["taskset", "-c", "0", "turnutils_peer", "-L", "127.0.0.1", "-p", str(peer_port)],
            stdout=peer_log,
            stderr=subprocess.STDOUT,
        )
        relays: list[Relay] = []
        try:
            relays.append(start_ours(workdir, cert, key))
            if coturn:
                relays.append(start_coturn(workdir, cert, key, args.coturn_relay_threads))
            for _ in range(args.rounds):
                for transport in ("tcp", "tls"):
                    for relay in relays:
                        figures = run_round(relay, transport == "tls", peer_port, args)
                        results.setdefault((relay.name, transport), []).append(figures)
        finally:
            for relay in relays:
                relay.stop()
            peer.terminate()
            peer.wait(5)
    print(
        f"{args.clients} uclient sessions x {args.messages} messages of {args.length} B every "
        f"{args.interval_ms} ms, echoed; median of {args.rounds} rounds; coturn relay-threads="
        f"{args.coturn_relay_threads}"
    )
    print(f"{'relay':14} {'transport':9} {'relayed':>9} {'expected':>9} {'CPU s':>7} {'us/msg':>8}")
    expected = 2 * args.clients * args.messages
    per_msg: dict[tuple[str, str], float] = {}
    for (name, transport), rounds in results.items():
        relayed = int(statistics.median(r for r, _ in rounds))
        cpu = statistics.median(c for _, c in rounds)
        us = statistics.median(c / max(r, 1) * 1e6 for r, c in rounds)
        per_msg[(name, transport)] = us
        print(f"{name:14} {transport:9} {relayed:9d} {expected:9d} {cpu:7.2f} {us:8.1f}")
    for transport in ("tcp", "tls"):
        ours, theirs = per_msg.get(("python relay", transport)), per_msg.get(("coturn", transport))
        if ours and theirs:
            print(f"{transport}: ours/coturn CPU per relayed message = {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
