"""Benchmarks of the relay daemon. Prints figures; asserts nothing.

    python -m simulations.bench_daemon [--sections scale,throughput,latency] [--allocations 10000]
                                       [--rates 20000,50000,max] [--duration 3] [--no-coturn]

scale       10k allocations against an in-process relay (driven by a client *process*, so the
            relay's memory and CPU are its own): creation time, RSS per allocation, expiry of all
            of them (the core's timer firing), then free_all at shutdown.
throughput  100-byte ChannelData, one way, client -> relay -> sink, at fixed offered rates and
            flat out: delivered datagrams/s, loss, relay CPU, relay CPU per datagram. Our relay
            and coturn (../shared/reference/coturn/coturn-ltc.conf, adapted to free ports) are
            run alternately under the same load generator; the ratio is printed.
latency     sequential 100-byte ping-pong through a channel vs the same ping-pong direct; the
            relay-added latency per traversal is half the RTT difference.

Every run is bounded in time and count. The machine is shared: re-run before quoting numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulations import bench_daemon_client as tl

ROOT = Path(__file__).resolve().parents[1]
COTURN_CONF = ROOT.parent / "shared" / "reference" / "coturn" / "coturn-ltc.conf"
SECRET = "bench-secret"


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for target in (1 << 20, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
            return
        except (ValueError, OSError):
            continue


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int | None = None) -> int:
    path = Path(f"/proc/{pid or os.getpid()}/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def firezone_credentials(i: int, secret: str = SECRET) -> tuple[str, str]:
    from protocol.auth import make_credentials

    return make_credentials("firezone", secret, int(time.time()) + 3600, f"bench{i}")


# -- scale ----------------------------------------------------------------------------------------


def client_allocate_main(argv: list[str]) -> None:
    """Child process: allocate N times against --server, print a JSON summary."""
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--secret", default=SECRET)
    args = p.parse_args(argv)
    raise_nofile()
    host, port = args.server.rsplit(":", 1)
    clients = tl.open_clients(args.n, "127.0.0.1", lambda i: firezone_credentials(i, args.secret))
    elapsed = tl.allocate_all(clients, (host, int(port)), window=512)
    ok = sum(1 for c in clients if c.relayed is not None)
    errors: dict[str, int] = {}
    for c in clients:
        if c.error is not None:
            errors[str(c.error)] = errors.get(str(c.error), 0) + 1
    print(json.dumps({"elapsed": elapsed, "ok": ok, "errors": errors}), flush=True)


async def _run_client(server_port: int, n: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulations.bench_daemon",
        "client-allocate",
        "--server",
        f"127.0.0.1:{server_port}",
        "--n",
        str(n),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def bench_scale(n: int) -> None:
    import logging

    import uvloop

    from actors.daemon import Relay, Settings
    from protocol.server import ServerConfig

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    raise_nofile()
    listen = free_port()
    settings = Settings(
        server=ServerConfig(
            public_ip4="127.0.0.1",
            listen_port=listen,
            lowest_port=20000,
            highest_port=32767,
            allow_loopback_peers=True,
        ),
        bind_ip4="127.0.0.1",
        auth_secret=SECRET,
        health_check_addr=None,
        control_endpoint=None,
        stats_interval=3600,
    )

    async def main() -> None:
        relay = Relay(settings)
        await relay.start()
        gc.collect()
        rss0 = rss_kb()
        cpu0 = time.process_time()
        created = await _run_client(listen, n)
        cpu_create = time.process_time() - cpu0
        gc.collect()
        rss1 = rss_kb()
        live = relay.server.num_allocations
        print(
            f"scale: {created['ok']}/{n} allocations created in {created['elapsed']:.2f} s "
            f"(client-measured, 401 + authenticated Allocate each; errors {created['errors']}); "
            f"relay CPU {cpu_create:.2f} s"
        )
        print(
            f"scale: relay RSS {rss0 / 1024:.1f} MB -> {rss1 / 1024:.1f} MB with {live} live: "
            f"{(rss1 - rss0) * 1024 / max(live, 1) / 1000:.2f} kB per allocation "
            f"(core state + actor + socket object + loop handle; kernel socket buffers are "
            f"not in RSS)"
        )

        # expiry: the core's timer fires past every allocation's lifetime
        start = time.perf_counter()
        relay._armed = time.monotonic() + 7200
        relay._on_timer()
        expiry = time.perf_counter() - start
        print(
            f"scale: expiry of {live} allocations (timer -> core -> FreeAllocation -> actors "
            f"close sockets): {expiry:.2f} s; left: {relay.server.num_allocations} in the core, "
            f"{len(relay.pipeline.allocations)} actors, "
            f"{len(relay.dataplane.allocation_sockets)} sockets"
        )
        gc.collect()
        print(f"scale: RSS after expiry {rss_kb() / 1024:.1f} MB")

        created = await _run_client(listen, n)
        live = relay.server.num_allocations
        gc.collect()
        print(
            f"scale: second round: {created['ok']}/{n} created in {created['elapsed']:.2f} s; "
            f"RSS {rss_kb() / 1024:.1f} MB (memory is reused, not leaked)"
        )
        start = time.perf_counter()
        await relay.shutdown()
        took = time.perf_counter() - start
        print(f"scale: shutdown freeing {live} allocations (free_all): {took:.2f} s")

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 600))
    finally:
        loop.close()


# -- relays under test ----------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    credentials: Callable[[int], tuple[str, str]]
    workdir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_udp(port: int, timeout: float = 10.0) -> None:
    """Wait until a STUN Binding on the port is answered."""
    from aioice import stun

    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(
                bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST)), ("127.0.0.1", port)
            )
            try:
                s.recv(2048)
                return
            except OSError:
                continue
    raise RuntimeError(f"nothing answers on UDP {port}")


def start_ours(workdir: Path) -> Server:
    port = free_port()
    log = open(workdir / "relay.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "actors.cli",
            "--public-ip4-addr",
            "127.0.0.1",
            "--bind-ip4-addr",
            "127.0.0.1",
            "--allow-loopback-peers",
            "--listen-port",
            str(port),
            "--lowest-port",
            "61000",
            "--highest-port",
            "65535",
            "--auth-secret",
            SECRET,
            "--health-check-addr",
            f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
            "--control-endpoint",
            f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RUST_LOG": "warn", "PYTHONPATH": str(ROOT)},
    )
    wait_udp(port)
    return Server("python relay", proc, port, firezone_credentials, workdir)


def start_coturn(workdir: Path) -> Server:
    port = free_port()
    conf = []
    for line in COTURN_CONF.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in ("listening-port", "min-port", "cli-password", "cli-ip", "cli-port", "pidfile"):
            continue
        conf.append(line)
    conf += [
        f"listening-port={port}",
        "min-port=61000",
        "no-cli",
        f"pidfile={workdir / 'turnserver.pid'}",
    ]
    (workdir / "coturn.conf").write_text("\n".join(conf) + "\n")
    log = open(workdir / "coturn.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["turnserver", "-c", str(workdir / "coturn.conf")],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_udp(port)
    return Server("coturn", proc, port, lambda i: ("alice", "secretpw"), workdir)


# -- throughput -----------------------------------------------------------------------------------


def _sink(conn: Any, n: int) -> None:
    """Child process: n sockets that count what arrives; answers 'count' requests."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    conn.send([s.getsockname()[1] for s in socks])
    poller = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    count = 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for fd, _ in poller.poll(0.01):
            s = by_fd[fd]
            for _ in range(512):
                try:
                    s.recv(2048)
                except BlockingIOError:
                    break
                count += 1
        if conn.poll():
            if conn.recv() == "stop":
                conn.send(count)
                return
            conn.send(count)


def bench_throughput_one(
    server: Server, rates: list[str], duration: float, flows: int
) -> list[dict[str, Any]]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    sink = ctx.Process(target=_sink, args=(child, flows), daemon=True)
    sink.start()
    results = []
    try:
        sink_ports = parent.recv()
        clients = tl.open_clients(flows, "127.0.0.1", server.credentials)
        addr = ("127.0.0.1", server.port)
        tl.allocate_all(clients, addr)
        bad = [c.error for c in clients if c.relayed is None]
        if bad:
            raise RuntimeError(f"{server.name}: allocations failed: {bad}")
        tl.channel_bind_all(clients, addr, [("127.0.0.1", p) for p in sink_ports])
        bad = [c.error for c in clients if c.error]
        if bad:
            raise RuntimeError(f"{server.name}: channel binds failed: {bad}")
        payload = tl.channel_data(0x4000, tl.random_payload(100))
        socks = [c.sock for c in clients]
        for rate_text in rates:
            rate = None if rate_text == "max" else int(rate_text)
            time.sleep(0.3)
            parent.send("count")
            before = parent.recv()
            cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
            sent = 0
            end = t0 + duration
            if rate is None:
                while time.monotonic() < end:
                    for _ in range(64):
                        for s in socks:
                            try:
                                s.sendto(payload, addr)
                                sent += 1
                            except BlockingIOError:
                                pass
            else:
                tick = 0.001
                next_tick = t0
                while True:
                    now = time.monotonic()
                    if now >= end:
                        break
                    due = int((now - t0) * rate) - sent
                    for _ in range(max(due, 0)):
                        try:
                            socks[sent % flows].sendto(payload, addr)
                        except BlockingIOError:
                            pass
                        sent += 1
                    next_tick += tick
                    delay = next_tick - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
            t1 = time.monotonic()
            time.sleep(0.3)  # let queues drain
            cpu1 = cpu_seconds(server.proc.pid)
            parent.send("count")
            delivered = parent.recv() - before
            elapsed = t1 - t0
            results.append(
                {
                    "relay": server.name,
                    "offered": rate_text,
                    "sent_per_s": sent / elapsed,
                    "delivered_per_s": delivered / elapsed,
                    "loss": 1 - delivered / sent if sent else 0.0,
                    "cpu": (cpu1 - cpu0) / elapsed,
                    "us_per_dgram": (cpu1 - cpu0) / delivered * 1e6 if delivered else float("nan"),
                }
            )
        for c in clients:
            c.sock.close()
    finally:
        parent.send("stop")
        with_timeout = parent.poll(5)
        if with_timeout:
            parent.recv()
        sink.join(5)
        if sink.is_alive():
            sink.kill()
    return results


def bench_throughput(rates: list[str], duration: float, coturn: bool, rounds: int = 2) -> None:
    all_results: list[dict[str, Any]] = []
    starters = [start_ours] + ([start_coturn] if coturn else [])
    for _ in range(rounds):
        for starter in starters:
            with tempfile.TemporaryDirectory() as tmp:
                server = starter(Path(tmp))
                try:
                    all_results += bench_throughput_one(server, rates, duration, flows=10)
                finally:
                    server.stop()
    print(
        "throughput: 100 B ChannelData one way, 10 allocations, Python paced sender, "
        f"{duration:g} s per rate, {rounds} alternating rounds (best round shown)"
    )
    print(
        f"{'relay':>14} {'offered':>8} {'sent/s':>9} {'delivered/s':>12} {'loss':>7} "
        f"{'relay CPU':>9} {'CPU us/dgram':>12}"
    )
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in all_results:
        key = (r["relay"], r["offered"])
        if key not in best or r["delivered_per_s"] > best[key]["delivered_per_s"]:
            best[key] = r
    for r in best.values():
        print(
            f"{r['relay']:>14} {r['offered']:>8} {r['sent_per_s']:>9.0f} "
            f"{r['delivered_per_s']:>12.0f} {r['loss']:>7.2%} {r['cpu']:>9.0%} "
            f"{r['us_per_dgram']:>12.2f}"
        )
    if coturn:
        for rate in rates:
            ours, theirs = best.get(("python relay", rate)), best.get(("coturn", rate))
            if ours and theirs:
                print(
                    f"throughput ratio python/coturn at {rate}: delivered "
                    f"{ours['delivered_per_s'] / theirs['delivered_per_s']:.2f}, CPU per datagram "
                    f"{ours['us_per_dgram'] / theirs['us_per_dgram']:.2f}x coturn's"
                )


# -- latency --------------------------------------------------------------------------------------


def ping_pong(
    client: socket.socket,
    to: tuple[str, int],
    peer: socket.socket,
    wrap: Callable[[bytes], bytes],
    unwrap_len: int,
    count: int,
) -> list[float]:
    """RTTs in µs: client sends, the peer echoes, the client receives. Blocking sockets."""
    rtts = []
    payload = b"p" * 100
    client.settimeout(1.0)
    peer.settimeout(1.0)
    for _ in range(count):
        t0 = time.perf_counter_ns()
        client.sendto(wrap(payload), to)
        data, source = peer.recvfrom(2048)
        peer.sendto(data, source)
        client.recv(2048)
        rtts.append((time.perf_counter_ns() - t0) / 1000)
        time.sleep(0.0005)  # light load: ~1,000 round trips/s at most
    return rtts


def bench_latency_one(server: Server, count: int) -> tuple[float, float, float, float]:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    clients = tl.open_clients(1, "127.0.0.1", server.credentials)
    addr = ("127.0.0.1", server.port)
    tl.allocate_all(clients, addr)
    tl.channel_bind_all(clients, addr, [peer.getsockname()])
    c = clients[0].sock
    c.setblocking(True)
    relayed = ping_pong(c, addr, peer, lambda p: tl.channel_data(0x4000, p), 4, count)
    direct = ping_pong(c, peer.getsockname(), peer, lambda p: p, 0, count)
    c.close()
    peer.close()
    q = statistics.quantiles
    return (
        statistics.median(relayed),
        q(relayed, n=100)[98],
        statistics.median(direct),
        q(direct, n=100)[98],
    )


def bench_latency(count: int, coturn: bool) -> None:
    starters = [start_ours] + ([start_coturn] if coturn else [])
    print(
        f"latency: {count} sequential 100 B round trips through a channel vs direct, "
        "light load (<= 1k round trips/s)"
    )
    for starter in starters:
        with tempfile.TemporaryDirectory() as tmp:
            server = starter(Path(tmp))
            try:
                p50, p99, d50, d99 = bench_latency_one(server, count)
            finally:
                server.stop()
        print(
            f"latency: {server.name:>12}: RTT p50 {p50:.0f} us p99 {p99:.0f} us; direct p50 "
            f"{d50:.0f} us p99 {d99:.0f} us; relay-added per traversal p50 "
            f"{(p50 - d50) / 2:.0f} us"
        )


def main() -> None:
    if sys.argv[1:2] == ["client-allocate"]:
        client_allocate_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", default="scale,throughput,latency")
    p.add_argument("--allocations", type=int, default=10_000)
    p.add_argument("--rates", default="20000,50000,max")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--pings", type=int, default=2000)
    p.add_argument("--no-coturn", action="store_true")
    args = p.parse_args()
    sections = args.sections.split(",")
    coturn = not args.no_coturn and shutil.which("turnserver") is not None
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if "scale" in sections:
        bench_scale(args.allocations)
    if "throughput" in sections:
        bench_throughput(args.rates.split(","), args.duration, coturn)
    if "latency" in sections:
        bench_latency(args.pings, coturn)


if __name__ == "__main__":
    main()
