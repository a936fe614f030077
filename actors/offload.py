"""The XDP offload's wiring: start the map manager actor off the loop, hand it to the command
pipelines that feed it, add its histograms to the metrics, and stop it.

Process-wide: one XDP program serves the interface whatever number of workers feed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from firezone_relay.actors.telemetry import BucketHistogram, BucketSource

if TYPE_CHECKING:
    import pykka

    from firezone_relay.actors.endpoints import Endpoints
    from firezone_relay.actors.pipeline import ChannelCommand, Pipeline
    from firezone_relay.actors.xdp_manager import XdpManager, XdpOptions

__all__ = ["Offload"]

logger = logging.getLogger("relay")


class Offload:
    """The XDP map manager of ``options`` (None: userspace only)."""

    def __init__(self, options: XdpOptions | None) -> None:
        self.options = options
        self.ref: pykka.ActorRef[XdpManager] | None = None
        self._reader: Any = None

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
        sink = XdpRouteSink(ref)
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


class XdpRouteSink:
    """The XDP map manager as a ``RouteSink``: each drain's channel commands are told to it
    as one tuple (it coalesces them per map key, the last word winning). A dead manager means
    offload is gone: userspace still relays everything."""

    def __init__(self, ref: pykka.ActorRef[XdpManager]) -> None:
        self.ref: pykka.ActorRef[XdpManager] | None = ref

    def sync_routes(self, commands: tuple[ChannelCommand, ...]) -> None:
        if self.ref is None:
            return
        try:
            self.ref.tell(commands)
        except Exception:  # dead actor
            logger.warning("XDP map manager is gone; channel updates dropped")
            self.ref = None


def _ns_bounds() -> tuple[float, ...]:
    """The XDP program's processing-time buckets: bucket 0 is 0 ns, bucket i [2^(i-1), 2^i)."""
    from firezone_relay.xdp.maps import NUM_NS_BUCKETS

    return (0.0, *(float(1 << i) for i in range(1, NUM_NS_BUCKETS - 1)))
