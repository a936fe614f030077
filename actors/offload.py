"""The XDP offload's wiring: start the map manager actor off the loop, hand it to the command
pipelines that feed it, add its histograms to the metrics, and stop it.

Process-wide: one XDP program serves the interface whatever number of workers feed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from firezone_relay.actors.telemetry import BucketHistogram, BucketSource
from firezone_relay.protocol.commands import CreateChannelBinding
from firezone_relay.protocol.types import FiveTuple, Transport

if TYPE_CHECKING:
    import pykka

    from firezone_relay.actors.endpoints import Endpoints
    from firezone_relay.actors.pipeline import ChannelCommand, Pipeline
    from firezone_relay.actors.xdp_manager import PortCounters, XdpManager, XdpOptions

__all__ = ["Offload"]

logger = logging.getLogger("relay")


class Offload:
    """The XDP map manager of ``options`` (None: userspace only)."""

    def __init__(self, options: XdpOptions | None) -> None:
        self.options = options
        self.ref: pykka.ActorRef[XdpManager] | None = None
        self._reader: Any = None
        self.owners = PortOwners()
        #: the per-allocation counts array, for worker processes to map (None: none)
        self.port_counts_fd: int | None = None

    async def start(
        self, loop: asyncio.AbstractEventLoop, pipelines: Sequence[Pipeline], metrics: Endpoints
    ) -> None:
        """Load the program and start the manager; the ``pipelines`` then tell it their
        channel commands. Unavailable offload logs one warning and leaves the relay in
        userspace; mandatory offload raises."""
        options = self.options
        if options is None:
            return
        from firezone_relay.actors import xdp_manager

        # Loading compiles and verifies the program (seconds of blocking bcc calls): do it on a
        # worker thread while the loop stays responsive.
        ref = await loop.run_in_executor(None, xdp_manager.start_offload, options)
        if ref is None:
            return
        self.ref = ref
        self.owners.counters = await loop.run_in_executor(
            None, lambda: ref.proxy().port_counters().get(timeout=10)
        )
        self.port_counts_fd = await loop.run_in_executor(
            None, lambda: ref.proxy().port_counts_fd().get(timeout=10)
        )
        sink = XdpRouteSink(ref, self.owners)
        for pipeline in pipelines:
            pipeline.route_sinks.append(sink)
        reader = await loop.run_in_executor(
            None, lambda: ref.proxy().counter_reader().get(timeout=10)
        )
        if reader is not None:
            self._reader = reader
            metrics.packet_sizes.sources.append(
                BucketSource({"relay.datapath": "xdp"}, self._sizes)
            )
            metrics.bridge.add(
                BucketHistogram(
                    "relay.xdp.processing.duration",
                    "ns",
                    "Time the eBPF XDP program spent processing one relayed packet",
                    _ns_bounds(),
                    [BucketSource({}, self._durations)],
                )
            )
        logger.info("eBPF offloading enabled on %s", options.interface)

    def stop(self, timeout: float) -> None:
        if self.ref is not None:
            with contextlib.suppress(Exception):
                self.ref.stop(block=True, timeout=timeout)
        counters, self.owners.counters = self.owners.counters, None
        if counters is not None:
            counters.close()
        fd, self.port_counts_fd = self.port_counts_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def allocation_counts(self, port: int, client: FiveTuple) -> tuple[int, int, int, int]:
        """What the XDP program relayed for the allocation on ``port`` of ``client``, in the
        order of ``protocol.allocations.COUNTERS`` (zeros without offload)."""
        return self.owners.counts(port, client)

    def totals(self) -> tuple[int, int] | None:
        """Datagrams and bytes the XDP program relayed (None: no counters)."""
        if self._reader is None:
            return None
        counters = self._reader.read()
        return sum(counters.packet_size_buckets), int(counters.relayed_bytes)

    def _sizes(self) -> tuple[Sequence[int], float]:
        counters = self._reader.read()
        return counters.packet_size_buckets, counters.relayed_bytes

    def _durations(self) -> tuple[Sequence[int], float]:
        counters = self._reader.read()
        return counters.processing_ns_buckets, counters.processing_ns_total


_ZERO = (0, 0, 0, 0)


class PortOwners:
    """Which allocation the program's per-port counters belong to (loop thread only).

    The kernel counts per allocation port (``port_counts``) and never resets: a port is reused
    by later allocations. The first channel a new client binds on a port (the program relays
    nothing for a port before that) records the client as the port's owner and the counters'
    values then as its baseline; an allocation's XDP traffic is the counters minus the
    baseline while its client owns the port. The same client given the same port again by its
    next allocation keeps the count running (both allocations' XDP traffic)."""

    def __init__(self) -> None:
        self.counters: PortCounters | None = None
        self._owners: dict[int, tuple[FiveTuple, tuple[int, int, int, int]]] = {}

    def note(self, commands: tuple[ChannelCommand, ...]) -> None:
        """Before the manager installs ``commands``: take a baseline for every new owner."""
        counters = self.counters
        if counters is None:
            return
        for command in commands:
            if not isinstance(command, CreateChannelBinding):
                continue
            port, client = command.allocation_port, command.client
            owner = self._owners.get(port)
            if client.transport is Transport.UDP and (owner is None or owner[0] != client):
                self._owners[port] = (client, counters.read(port))

    def counts(self, port: int, client: FiveTuple) -> tuple[int, int, int, int]:
        owner = self._owners.get(port)
        if owner is None or owner[0] != client or self.counters is None:
            return _ZERO
        now, base = self.counters.read(port), owner[1]
        return (now[0] - base[0], now[1] - base[1], now[2] - base[2], now[3] - base[3])


class XdpRouteSink:
    """The XDP map manager as a ``RouteSink``: each drain's channel commands are told to it
    as one tuple (it coalesces them per map key, the last word winning). A dead manager means
    offload is gone: userspace still relays everything."""

    def __init__(self, ref: pykka.ActorRef[XdpManager], owners: PortOwners | None = None) -> None:
        self.ref: pykka.ActorRef[XdpManager] | None = ref
        self.owners = owners

    def sync_routes(self, commands: tuple[ChannelCommand, ...]) -> None:
        if self.ref is None:
            return
        if self.owners is not None:
            self.owners.note(commands)
        try:
            self.ref.tell(commands)
        except Exception:  # dead actor
            logger.warning("XDP map manager is gone; channel updates dropped")
            self.ref = None


def _ns_bounds() -> tuple[float, ...]:
    """The XDP program's processing-time buckets: bucket 0 is 0 ns, bucket i [2^(i-1), 2^i)."""
    from firezone_relay.xdp.maps import NUM_NS_BUCKETS

    return (0.0, *(float(1 << i) for i in range(1, NUM_NS_BUCKETS - 1)))
