"""The XDP map manager: owns the in-kernel TURN router (xdp/) for the lifetime of the relay.

A pykka ``ThreadingActor`` because every bcc/bpf call blocks (compiling takes seconds). It
loads and attaches the program on start, mirrors channel bindings into the kernel maps from
``CreateChannelBinding`` / ``DeleteChannelBinding`` commands (told to it as tuples, one per
drain of the core, and applied as one map batch), hands out kernel counters, and detaches on
stop. The attachment is a bpf_link held by this process, so the kernel also detaches it when
the process dies, however it dies.

XDP is an accelerator: if it cannot run (no bcc, the kernel refuses the program, no such
interface) the manager logs one warning and the relay keeps relaying in userspace, unless the
operator made offload mandatory, in which case :func:`start_offload` raises.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pykka

from firezone_relay.protocol.commands import CreateChannelBinding, DeleteChannelBinding
from firezone_relay.xdp import bpfsys, interface
from firezone_relay.xdp import netns as netns_mod
from firezone_relay.xdp.bindings import BindingTable
from firezone_relay.xdp.maps import (
    PORT_COUNTS_SIZE,
    PORT_IN,
    STATS_SIZE,
    RouterConfig,
    XdpCounters,
)

logger = logging.getLogger("relay.xdp")

__all__ = [
    "CounterReader",
    "PortCounters",
    "XdpManager",
    "XdpOffloadRequired",
    "XdpOptions",
    "XdpStatus",
    "start_offload",
]


class XdpOffloadRequired(RuntimeError):
    """Offload was made mandatory but cannot run."""


@dataclass(frozen=True, slots=True)
class XdpOptions:
    """Where and how to run the XDP router; ports and public addresses are the relay's own
    (``actors.cli.settings_from_args`` copies them from the core's config)."""

    interface: str
    attach_mode: str = "driver"  # or "generic"
    public_ip4: str | None = None
    public_ip6: str | None = None
    interface_ip4: str | None = None  # None: read from the interface
    interface_ip6: str | None = None
    listen_port: int = 3478
    lowest_port: int = 49152
    highest_port: int = 65535
    mandatory: bool = False
    max_bindings: int = 65536
    timing_sample: int = 256  # time one packet in this many (power of two)
    ttl: int = 64
    netns: str | None = None  # run the actor thread in /run/netns/<name> (tests)


@dataclass(frozen=True, slots=True)
class XdpStatus:
    active: bool
    interface: str
    attach_mode: str
    reason: str | None = None  # why not active
    prog_id: int | None = None
    bindings: int = 0
    interface_ip4: str | None = None
    interface_ip6: str | None = None


class CounterReader:
    """Reads the kernel counters from any thread without going through the actor's inbox.

    Holds its own duplicate of the stats map FD, so it stays valid (reading the last values)
    after the manager stopped.
    """

    def __init__(self, stats_fd: int, ncpus: int) -> None:
        self._fd: int | None = os.dup(stats_fd)
        self._ncpus = ncpus

    def read(self) -> XdpCounters:
        if self._fd is None:
            return XdpCounters()
        stride = (STATS_SIZE + 7) & ~7
        raw = bpfsys.map_lookup(self._fd, b"\0\0\0\0", stride * self._ncpus)
        return XdpCounters.from_percpu(raw, self._ncpus) if raw else XdpCounters()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class PortCounters:
    """What the program relayed per allocation port, read from any thread without a system
    call: the ``port_counts`` array mapped into this process (read-only). The mapping keeps the
    map alive, so it reads the last values after the manager stopped."""

    def __init__(self, fd: int) -> None:
        self._map: mmap.mmap | None = mmap.mmap(
            fd, PORT_COUNTS_SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ
        )
        self._words = memoryview(self._map).cast("Q")

    def read(self, port: int) -> tuple[int, int, int, int]:
        """(datagrams, bytes) client -> peer, then peer -> client, of allocation ``port``;
        zeros for a port out of range or after :meth:`close`."""
        if self._map is None or not 0 <= port < PORT_IN:
            return (0, 0, 0, 0)
        w = self._words
        i, j = 2 * port, 2 * (PORT_IN + port)
        return (w[i], w[i + 1], w[j], w[j + 1])

    def close(self) -> None:
        words, mapped, self._map = self._words, self._map, None
        if mapped is not None:
            words.release()
            mapped.close()


class XdpManager(pykka.ThreadingActor):
    """Owns one :class:`xdp.loader.TurnRouter`; the only writer of its maps."""

    # A daemon thread, so a crashing main thread cannot be kept alive by this actor (the link
    # FD, and with it the attachment, goes away with the process).
    use_daemon_thread = True

    def __init__(self, options: XdpOptions) -> None:
        super().__init__()
        self.options = options
        self._router: Any = None
        self._table = BindingTable()
        self._reason: str | None = None
        self._full_warned = False

    # -- lifecycle -----------------------------------------------------------------------

    def on_start(self) -> None:
        try:
            self._load()
        except Exception as exc:  # bcc, the verifier and netlink raise all sorts of things
            self._reason = str(exc) or type(exc).__name__
            self._close_router()
            if not self.options.mandatory:
                logger.warning(
                    "XDP offload on %s unavailable, relaying in userspace only: %s",
                    self.options.interface,
                    self._reason,
                )

    def _load(self) -> None:
        from firezone_relay.xdp.loader import TurnRouter

        o = self.options
        if o.netns is not None:
            netns_mod.enter(o.netns)  # this actor's thread only
        try:
            interface.ifindex(o.interface)
        except OSError as exc:
            raise RuntimeError(f"no interface {o.interface!r}") from exc
        ip4 = o.interface_ip4 or interface.ipv4_address(o.interface)
        ip6 = o.interface_ip6 or interface.ipv6_address(o.interface, prefer=o.public_ip6)
        config = RouterConfig(
            listen_port=o.listen_port,
            lowest_port=o.lowest_port,
            highest_port=o.highest_port,
            public_ip4=o.public_ip4,
            public_ip6=o.public_ip6,
            interface_ip4=ip4,
            interface_ip6=ip6,
            ttl=o.ttl,
        )
        router = TurnRouter(max_bindings=o.max_bindings, timing_sample=o.timing_sample)
        self._router = router
        router.configure(config)
        router.attach(o.interface, o.attach_mode)
        if (o.public_ip4 or ip4) and (o.public_ip6 or ip6) and not (ip4 and ip6):
            logger.warning(
                "XDP on %s: no interface address for %s; cross-family relaying stays in userspace",
                o.interface,
                "IPv6" if ip4 else "IPv4",
            )
        logger.info(
            "XDP TURN router attached to %s (%s mode, program id %d, interface %s / %s)",
            o.interface,
            o.attach_mode,
            router.prog_id,
            ip4,
            ip6,
        )

    def on_stop(self) -> None:
        self._close_router()

    def on_failure(self, *_exc_info: object) -> None:
        self._close_router()

    def _close_router(self) -> None:
        router, self._router = self._router, None
        if router is not None:
            try:
                router.close()
                logger.info("XDP TURN router detached from %s", self.options.interface)
            except Exception:
                logger.exception("detaching the XDP router failed")

    # -- commands ------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        """``tell`` entry point: a tuple (or list) of commands, or a single command."""
        if isinstance(message, CreateChannelBinding | DeleteChannelBinding):
            message = (message,)
        if isinstance(message, tuple | list):
            self.apply(message)
        return None

    def apply(self, commands: Iterable[object]) -> int:
        """Mirror channel-binding commands into the maps; returns the number of map changes."""
        try:
            commands = tuple(commands)
        except TypeError:
            return 0
        if self._router is None:
            return 0
        changes = self._table.plan(commands)
        if not changes:
            return 0
        try:
            self._router.delete(changes.delete_c2p, changes.delete_p2c)
        except Exception as exc:
            logger.warning("XDP map delete failed: %s", exc)
        for fd, entries, is_c2p in (
            (self._router.chan_to_peer_fd, changes.update_c2p, True),
            (self._router.peer_to_chan_fd, changes.update_p2c, False),
        ):
            if entries:
                self._write(fd, entries, is_c2p)
        return (
            len(changes.update_c2p)
            + len(changes.update_p2c)
            + len(changes.delete_c2p)
            + len(changes.delete_p2c)
        )

    def _write(self, fd: int, entries: list[tuple[bytes, bytes]], is_c2p: bool) -> None:
        try:
            if len(entries) == 1:
                bpfsys.map_update(fd, *entries[0])
            else:
                bpfsys.map_update_batch(fd, [k for k, _ in entries], [v for _, v in entries])
            return
        except bpfsys.BatchError as exc:
            rest = entries[exc.done :]
        except bpfsys.BpfError:
            rest = entries
        failed: list[bytes] = []
        for key, value in rest:
            try:
                bpfsys.map_update(fd, key, value)
            except bpfsys.BpfError as exc:
                failed.append(key)
                if not self._full_warned:
                    self._full_warned = True
                    logger.warning(
                        "XDP map update failed (%s); affected channels relay in userspace", exc
                    )
        if failed:
            if is_c2p:
                self._table.forget(c2p_keys=failed)
            else:
                self._table.forget(p2c_keys=failed)

    # -- observation ---------------------------------------------------------------------

    def counters(self) -> XdpCounters:
        """Kernel counters summed over CPUs (all zero when offload is not active)."""
        if self._router is None:
            return XdpCounters()
        result: XdpCounters = self._router.counters()
        return result

    def counter_reader(self) -> CounterReader | None:
        if self._router is None:
            return None
        return CounterReader(self._router.stats_fd, self._router.ncpus)

    def port_counts_fd(self) -> int | None:
        """A new descriptor of the per-allocation counts array, for a worker process to map
        (``PortCounters``): the caller owns and closes it. None without offload."""
        if self._router is None or self._router.port_counts_fd < 0:
            return None
        return os.dup(self._router.port_counts_fd)

    def port_counters(self) -> PortCounters | None:
        """The per-allocation counters, mapped (None when offload is not active or the kernel
        cannot map the array: ``sessions`` then shows userspace traffic only)."""
        if self._router is None:
            return None
        try:
            return PortCounters(self._router.port_counts_fd)
        except (OSError, ValueError) as exc:
            logger.warning("XDP per-allocation counters unavailable: %s", exc)
            return None

    def status(self) -> XdpStatus:
        r = self._router
        cfg = r.config if r is not None else None
        return XdpStatus(
            active=r is not None and r.attached,
            interface=self.options.interface,
            attach_mode=self.options.attach_mode,
            reason=self._reason,
            prog_id=r.prog_id if r is not None else None,
            bindings=len(self._table),
            interface_ip4=cfg.interface_ip4 if cfg is not None else None,
            interface_ip6=cfg.interface_ip6 if cfg is not None else None,
        )

    def test_run(self, packet: bytes, repeat: int = 1) -> tuple[int, bytes]:
        """Run the attached program on ``packet`` (BPF_PROG_TEST_RUN); (verdict, bytes out)."""
        if self._router is None:
            raise RuntimeError("XDP offload is not active")
        res = self._router.test_run(packet, repeat)
        return res.retval, res.data


def start_offload(options: XdpOptions, timeout: float = 60.0) -> pykka.ActorRef[XdpManager] | None:
    """Start the manager and wait until the program is attached (blocks: seconds).

    Returns the actor, or None when offload is unavailable (one warning has been logged);
    raises :class:`XdpOffloadRequired` instead when ``options.mandatory``.
    """
    ref = XdpManager.start(options)
    try:
        status = ref.proxy().status().get(timeout=timeout)
    except Exception as exc:
        with contextlib.suppress(Exception):
            ref.stop(block=False)
        if options.mandatory:
            raise XdpOffloadRequired(f"XDP offload on {options.interface} failed: {exc}") from exc
        logger.warning("XDP offload on %s unavailable: %s", options.interface, exc)
        return None
    if status.active:
        return ref
    ref.stop(block=True, timeout=timeout)
    if options.mandatory:
        raise XdpOffloadRequired(
            f"XDP offload on {options.interface} is mandatory but unavailable: {status.reason}"
        )
    return None
