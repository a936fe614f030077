"""Benchmarks of the relay daemon. Prints figures; asserts nothing.

    python -m simulations.bench.daemon [--sections scale,throughput,latency] [--allocations 10000]
                                       [--rates 20000,50000,max] [--duration 3] [--no-coturn]

scale       10k allocations against an in-process relay (driven by a client *process*, so the
            relay's memory and CPU are its own): creation time, RSS per allocation, expiry of all
            of them (the core's timer firing), then free_all at shutdown.
throughput  100-byte ChannelData, one way, client -> relay -> sink, at fixed offered rates and
            flat out: delivered datagrams/s, loss, relay CPU, relay CPU per datagram. Our relay
            and coturn (simulations/bench/coturn/bench.conf, on free ports) are
            run alternately under the same load generator; the ratio is printed.
multicore   (asked for by name) ours with 1 and 2 workers (--num-worker-threads) beside coturn
            with relay-threads=2, nothing pinned, client->peer and peer->client at the same
            rates: delivered/s, loss, relay CPU per delivered datagram, ratios 2/1 and against
            coturn.
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

from simulations.bench import daemon_client as tl
from simulations.relay_process import spawn_daemon

ROOT = Path(__file__).resolve().parents[2]
COTURN_CONF = Path(__file__).resolve().parent / "coturn" / "bench.conf"
SECRET = "bench-daemon-secret-0123456789"
#: relay ports of the relays under test: below the kernel's ephemeral range, apart from the
#: system tests' 61000+ slices and the simulator's 20000-32000 (they may run at the same time)
PORTS = (16000, 19999)


def ensure_helper() -> str:
    """The data path of the installed relay under test (`pip install .` builds the compiled
    helper; benchmarks measure what a clone installs)."""
    from firezone_relay.actors.udpio import IMPLEMENTATION

    return IMPLEMENTATION


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


def tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid`` and its live children (a relay's workers), all threads included."""
    total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    for child in children:
        try:
            total += tree_cpu_seconds(int(child))
        except (OSError, IndexError, ValueError):
            continue  # a worker that just exited
    return total


def rss_kb(pid: int | None = None) -> int:
    path = Path(f"/proc/{pid or os.getpid()}/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def firezone_credentials(i: int, secret: str = SECRET) -> tuple[str, str]:
    from firezone_relay.protocol.auth import make_credentials

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
        "simulations.bench.daemon",
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

    from firezone_relay.actors.daemon import Relay, Settings
    from firezone_relay.protocol.server import ServerConfig

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
        relay.datapath.fire_timer_at(time.monotonic() + 7200)
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


def start_ours(workdir: Path, workers: int = 1, pin: bool = True) -> Server:
    port = free_port()
    args = [
        "--public-ip4-addr",
        "127.0.0.1",
        "--bind-ip4-addr",
        "127.0.0.1",
        "--allow-loopback-peers",
        "--listen-port",
        str(port),
        "--lowest-port",
        str(PORTS[0]),
        "--highest-port",
        str(PORTS[1]),
        "--auth-secret",
        SECRET,
        "--health-check-addr",
        f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
        "--control-endpoint",
        f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
        "--num-worker-threads",
        str(workers),
    ]
    wrapper = pinned([]) if pin else []
    daemon = spawn_daemon(args, workdir / "relay.log", env={"RUST_LOG": "warn"}, wrapper=wrapper)
    wait_udp(port)
    if workers > 1:  # every worker up: each answers its share of sources
        time.sleep(1.0)
    name = "python relay" if pin else f"ours-{workers}"
    return Server(name, daemon.proc, port, firezone_credentials, workdir)


def start_coturn(workdir: Path, threads: int | None = None, pin: bool = True) -> Server:
    port = free_port()
    conf = COTURN_CONF.read_text().splitlines()
    conf += [
        f"listening-port={port}",
        f"min-port={PORTS[0]}",
        f"max-port={PORTS[1]}",
        "no-cli",
        f"pidfile={workdir / 'turnserver.pid'}",
    ]
    if threads is not None:
        conf.append(f"relay-threads={threads}")
    (workdir / "coturn.conf").write_text("\n".join(conf) + "\n")
    log = open(workdir / "coturn.log", "wb")  # noqa: SIM115
    argv = ["turnserver", "-c", str(workdir / "coturn.conf")]
    proc = subprocess.Popen(
        pinned(argv) if pin else argv,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_udp(port)
    name = "coturn" if pin else f"coturn-{threads}"
    return Server(name, proc, port, lambda i: ("alice", "secretpw"), workdir)


# -- throughput -----------------------------------------------------------------------------------

RELAY_CPU, LOAD_CPU = 1, 0
PRIORITY = -10  # nice value of the relays and the load generator, when run as root
DIRECTIONS = ("client->peer", "peer->client", "loop c->c")


def pinned(argv: list[str]) -> list[str]:
    """Pin a relay to its own core (the load generator and sink get the other one). As root,
    also raise its priority, and the generator's: the machine is shared, and the figures should
    be the relays', not the neighbours' (both relays get the same treatment)."""
    if os.geteuid() == 0 and shutil.which("nice"):
        argv = ["nice", "-n", str(PRIORITY), *argv]
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        argv = ["taskset", "-c", str(RELAY_CPU), *argv]
    return argv


def _setup_flows(server: Server, flows: int) -> dict[str, tuple[list[object], list[socket.socket]]]:
    """Allocations and channels for each direction: the generator's flat send list and the
    sockets the sink counts on."""
    addr = ("127.0.0.1", server.port)
    clients = tl.open_clients(flows, "127.0.0.1", server.credentials)
    looped = tl.open_clients(flows, "127.0.0.1", lambda i: server.credentials(10_000 + i))
    peers = []
    for _ in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        peers.append(s)
    everyone = clients + looped
    tl.allocate_all(everyone, addr)
    bad = [c.error for c in everyone if c.relayed is None]
    if bad:
        raise RuntimeError(f"{server.name}: allocations failed: {bad[:5]}")
    tl.channel_bind_all(clients, addr, [p.getsockname() for p in peers])
    # the relay loop: pairs (a, b), each with a channel to the other's relayed address
    partners = [looped[i ^ 1].relayed for i in range(flows)]
    tl.channel_bind_all(looped, addr, [p for p in partners if p is not None])
    bad = [c.error for c in everyone if c.error]
    if bad:
        raise RuntimeError(f"{server.name}: channel binds failed: {bad[:5]}")
    for s in [c.sock for c in everyone] + peers:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, 1 << 20)
    payload = tl.random_payload(100)
    framed = tl.channel_data(0x4000, payload)
    c2p: list[object] = []
    p2c: list[object] = []
    loop: list[object] = []
    for c, p in zip(clients, peers, strict=True):
        c2p += (c.sock, framed, addr)
        p2c += (p, payload, c.relayed)
    for a in looped[0::2]:
        loop += (a.sock, framed, addr)
    return {
        "client->peer": (c2p, peers),
        "peer->client": (p2c, [c.sock for c in clients]),
        "loop c->c": (loop, [b.sock for b in looped[1::2]]),
    }


def bench_throughput_one(
    server: Server,
    rates: list[str],
    duration: float,
    flows: int,
    directions: tuple[str, ...] = DIRECTIONS,
) -> list[dict[str, Any]]:
    ctx = mp.get_context("fork")
    results = []
    setups = _setup_flows(server, flows)
    for direction in directions:
        items, sink_socks = setups[direction]
        parent, child = ctx.Pipe()
        sink = ctx.Process(target=tl.count_forever, args=(child, sink_socks), daemon=True)
        sink.start()
        try:
            for rate_text in rates:
                rate = None if rate_text == "max" else int(rate_text)
                time.sleep(0.2)
                parent.send("count")
                before = parent.recv()
                cpu0 = tree_cpu_seconds(server.proc.pid)
                sent, ns = tl.blast(items, rate, duration)
                time.sleep(0.3)  # let queues drain
                cpu1 = tree_cpu_seconds(server.proc.pid)
                parent.send("count")
                delivered = parent.recv() - before
                elapsed = ns / 1e9
                results.append(
                    {
                        "relay": server.name,
                        "direction": direction,
                        "offered": rate_text,
                        "sent_per_s": sent / elapsed,
                        "delivered_per_s": delivered / elapsed,
                        "loss": max(0.0, 1 - delivered / sent) if sent else 0.0,
                        "cpu": (cpu1 - cpu0) / elapsed,
                        "us_per_dgram": (cpu1 - cpu0) / delivered * 1e6
                        if delivered
                        else float("nan"),
                    }
                )
        finally:
            parent.send("stop")
            if parent.poll(5):
                parent.recv()
            sink.join(5)
            if sink.is_alive():
                sink.kill()
    for sockets_ in setups.values():
        for s in sockets_[1]:
            s.close()
    return results


def bench_throughput(
    rates: list[str], duration: float, coturn: bool, rounds: int, flows: int, plot: str | None
) -> None:
    _, _, implementation = tl.batch_io()
    all_results: list[dict[str, Any]] = []
    starters = [start_ours] + ([start_coturn] if coturn else [])
    affinity = os.sched_getaffinity(0)
    if len(affinity) >= 2:
        os.sched_setaffinity(0, {LOAD_CPU})
    niceness = os.nice(0)
    if os.geteuid() == 0:
        os.nice(PRIORITY - niceness)
    try:
        for r in range(rounds):
            for starter in starters if r % 2 == 0 else starters[::-1]:
                with tempfile.TemporaryDirectory() as tmp:
                    server = starter(Path(tmp))
                    try:
                        all_results += bench_throughput_one(server, rates, duration, flows)
                    finally:
                        server.stop()
    finally:
        os.sched_setaffinity(0, affinity)
        if os.geteuid() == 0:
            os.nice(niceness - os.nice(0))
    print(
        f"throughput: 100 B payloads, {flows} allocations, {duration:g} s per rate, {rounds} "
        f"rounds alternating the relays (median shown); each relay pinned to CPU {RELAY_CPU}, "
        f"load generator and sink on CPU {LOAD_CPU} ({implementation}); "
        "CPU is the relay process's, per delivered datagram"
    )
    table: dict[tuple[str, str, str], dict[str, float]] = {}
    for key in {(r["relay"], r["direction"], r["offered"]) for r in all_results}:
        rows = [r for r in all_results if (r["relay"], r["direction"], r["offered"]) == key]
        table[key] = {
            k: statistics.median(r[k] for r in rows)
            for k in ("sent_per_s", "delivered_per_s", "loss", "cpu", "us_per_dgram")
        }
    names = [s.__name__ for s in starters]
    relays = ["python relay"] + (["coturn"] if "start_coturn" in names else [])
    head = f"{'direction':>13} {'offered':>7}"
    for name in relays:
        head += f" | {name[:12]:>12}: {'sent/s':>7} {'deliv/s':>7} {'loss':>6} {'CPU':>4}"
        head += f" {'us/dg':>5}"
    if len(relays) == 2:
        head += " | ours/coturn: deliv  us/dg"
    print(head)
    for direction in DIRECTIONS:
        for rate in rates:
            line = f"{direction:>13} {rate:>7}"
            for name in relays:
                r = table[(name, direction, rate)]
                line += (
                    f" | {'':>12}  {r['sent_per_s']:>7.0f} {r['delivered_per_s']:>7.0f} "
                    f"{r['loss']:>6.1%} {r['cpu']:>4.0%} {r['us_per_dgram']:>5.2f}"
                )
            if len(relays) == 2:
                ours = table[(relays[0], direction, rate)]
                theirs = table[(relays[1], direction, rate)]
                line += (
                    f" | {'':>11}  {ours['delivered_per_s'] / theirs['delivered_per_s']:>5.2f} "
                    f"{ours['us_per_dgram'] / theirs['us_per_dgram']:>6.2f}"
                )
            print(line)
    if plot:
        plot_delivered(table, relays, rates, plot)


#: the multi-core section's directions (the relay loop across workers is the core's part)
MULTICORE_DIRECTIONS = ("client->peer", "peer->client")


def bench_multicore(
    rates: list[str], duration: float, coturn: bool, rounds: int, flows: int, pings: int = 0
) -> None:
    """Ours with 1 and 2 workers beside coturn with relay-threads=2, nothing pinned, the same
    load: delivered datagrams/s, loss, and relay CPU (all processes and threads) per delivered
    datagram. On a 2-core machine the load generator and sink compete for the cores."""
    starters: list[tuple[str, Callable[[Path], Server]]] = [
        ("ours-1", lambda w: start_ours(w, 1, pin=False)),
        ("ours-2", lambda w: start_ours(w, 2, pin=False)),
    ]
    if coturn:
        starters.append(("coturn-2", lambda w: start_coturn(w, 2, pin=False)))
    results: list[dict[str, Any]] = []
    for r in range(rounds):
        for name, starter in starters if r % 2 == 0 else starters[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                server = starter(Path(tmp))
                server.name = name
                try:
                    results += bench_throughput_one(
                        server, rates, duration, flows, MULTICORE_DIRECTIONS
                    )
                finally:
                    server.stop()
    print(
        f"multi-core: 100 B payloads, {flows} allocations per direction, {duration:g} s per "
        f"rate, {rounds} rounds alternating (median shown), nothing pinned, "
        f"{os.cpu_count()} CPUs shared with the load generator and sink; CPU is the relay's "
        "(all its processes and threads), per delivered datagram"
    )
    names = [n for n, _ in starters]
    table: dict[tuple[str, str, str], dict[str, float]] = {}
    for key in {(r["relay"], r["direction"], r["offered"]) for r in results}:
        rows = [r for r in results if (r["relay"], r["direction"], r["offered"]) == key]
        table[key] = {
            k: statistics.median(r[k] for r in rows)
            for k in ("sent_per_s", "delivered_per_s", "loss", "cpu", "us_per_dgram")
        }
    head = f"{'direction':>13} {'offered':>7}"
    for name in names:
        head += f" | {name:>8}: {'deliv/s':>7} {'loss':>6} {'CPU':>4} {'us/dg':>5}"
    head += " | 2/1: deliv us/dg"
    if coturn:
        head += " | ours-2/coturn-2: deliv us/dg"
    print(head)
    for direction in MULTICORE_DIRECTIONS:
        for rate in rates:
            line = f"{direction:>13} {rate:>7}"
            for name in names:
                row = table[(name, direction, rate)]
                line += (
                    f" | {'':>8}  {row['delivered_per_s']:>7.0f} {row['loss']:>6.1%} "
                    f"{row['cpu']:>4.0%} {row['us_per_dgram']:>5.2f}"
                )
            one, two = table[("ours-1", direction, rate)], table[("ours-2", direction, rate)]
            line += (
                f" | {two['delivered_per_s'] / one['delivered_per_s']:>9.2f} "
                f"{two['us_per_dgram'] / one['us_per_dgram']:>5.2f}"
            )
            if coturn:
                theirs = table[("coturn-2", direction, rate)]
                line += (
                    f" | {two['delivered_per_s'] / theirs['delivered_per_s']:>21.2f} "
                    f"{two['us_per_dgram'] / theirs['us_per_dgram']:>5.2f}"
                )
            print(line)
    if pings:  # relay-added latency at light load, each relay unpinned as above
        for name, starter in starters:
            with tempfile.TemporaryDirectory() as tmp:
                server = starter(Path(tmp))
                try:
                    p50, p99, d50, d99 = bench_latency_one(server, pings)
                finally:
                    server.stop()
            print(
                f"latency: {name:>8}: relay-added per traversal p50 {(p50 - d50) / 2:.1f} us "
                f"p99 {(p99 - d99) / 2:.1f} us ({pings} sequential 100 B round trips)"
            )


def plot_delivered(
    table: dict[tuple[str, str, str], dict[str, float]],
    relays: list[str],
    rates: list[str],
    path: str,
) -> None:
    """Delivered vs offered rate per relay and direction (needs the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install '.[bench]'); no plot written")
        return
    fig, axes = plt.subplots(1, len(DIRECTIONS), figsize=(5 * len(DIRECTIONS), 4), sharey=True)
    for ax, direction in zip(axes, DIRECTIONS, strict=True):
        for name in relays:
            rows = sorted(
                (table[(name, direction, rate)] for rate in rates), key=lambda r: r["sent_per_s"]
            )
            offered = [r["sent_per_s"] / 1000 for r in rows]
            ax.plot(offered, [r["delivered_per_s"] / 1000 for r in rows], "o-", label=name)
        top = max(table[(n, direction, r)]["sent_per_s"] for n in relays for r in rates) / 1000
        ax.plot([0, top], [0, top], ":", color="grey", label="no loss")
        ax.set_title(direction)
        ax.set_xlabel("offered (k datagrams/s)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("delivered (k datagrams/s)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: delivered vs offered written to {path}")


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
            f"{(p50 - d50) / 2:.1f} us p99 {(p99 - d99) / 2:.1f} us"
        )


def main() -> None:
    if sys.argv[1:2] == ["client-allocate"]:
        client_allocate_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(
        prog="python -m simulations.bench.daemon",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--sections", default="scale,throughput,latency")
    p.add_argument("--allocations", type=int, default=10_000)
    p.add_argument("--rates", default="20000,50000,max")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--pings", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--flows", type=int, default=100, help="allocations per direction")
    p.add_argument("--plot", default="bench_daemon.png", help="PNG path ('' for none)")
    p.add_argument("--no-coturn", action="store_true")
    args = p.parse_args()
    print(f"data path helper: {ensure_helper()}")
    sections = args.sections.split(",")
    coturn = not args.no_coturn and shutil.which("turnserver") is not None
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if "scale" in sections:
        bench_scale(args.allocations)
    if "throughput" in sections:
        bench_throughput(
            args.rates.split(","), args.duration, coturn, args.rounds, args.flows, args.plot or None
        )
    if "latency" in sections:
        bench_latency(args.pings, coturn)
    if "multicore" in sections:
        bench_multicore(
            args.rates.split(","), args.duration, coturn, args.rounds, args.flows, args.pings
        )


if __name__ == "__main__":
    main()
