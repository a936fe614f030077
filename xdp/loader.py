"""Compile, configure, attach and feed the XDP TURN router (blocking; run it off the event loop).

``TurnRouter`` is synchronous and single-threaded by design: the map manager actor owns one and
is the only writer of its maps.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from firezone_relay.xdp import bpfsys, interface
from firezone_relay.xdp.maps import (
    CONFIG_SIZE,
    STATS_SIZE,
    RouterConfig,
    XdpCounters,
)

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("turn_router.c")
PROGRAM = b"xdp_turn_router"
DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")
ATTACH_MODES = {"driver": bpfsys.XDP_FLAGS_DRV_MODE, "generic": bpfsys.XDP_FLAGS_SKB_MODE}


class XdpUnavailable(RuntimeError):
    """The XDP fast path cannot run here (no bcc, kernel refused, no interface...)."""


def import_bcc() -> ModuleType:
    """Import bcc; fall back to Debian's python3-bpfcc package alone (it is pure ctypes), so
    an interpreter without /usr/lib/python3/dist-packages on its path still finds it without
    pulling in the rest of Debian's packages."""
    try:
        return importlib.import_module("bcc")
    except ImportError:
        pass
    init = DEBIAN_BCC / "__init__.py"
    if not init.exists():
        raise XdpUnavailable(
            "bcc is not installed (Debian: apt-get install python3-bpfcc; see .ci/install-bcc.sh)"
        )
    spec = importlib.util.spec_from_file_location(
        "bcc", init, submodule_search_locations=[str(DEBIAN_BCC)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules["bcc"]
        raise XdpUnavailable(f"bcc failed to import: {e}") from e
    return module


class TurnRouter:
    """One loaded instance of xdp/turn_router.c: its program, maps and (optional) attachment."""

    def __init__(
        self, max_bindings: int = 65536, timing_sample: int = 256, source: Path | None = None
    ) -> None:
        """``timing_sample``: time one packet in that many (a power of two; 1 = every packet)."""
        if timing_sample < 1 or timing_sample & (timing_sample - 1):
            raise ValueError("timing_sample must be a power of two")
        bcc = import_bcc()
        source = source or SOURCE
        try:
            # Any: bcc is untyped (and imported at run time, so its BPF class is not known here)
            self._bpf: Any = bcc.BPF(
                src_file=str(source).encode(),
                cflags=[
                    f"-DMAX_BINDINGS={int(max_bindings)}",
                    f"-DTIMING_SAMPLE={int(timing_sample)}",
                    "-w",
                ],
            )
            fn = self._bpf.load_func(PROGRAM, bcc.BPF.XDP)
        except Exception as e:
            raise XdpUnavailable(f"the kernel or bcc refused the XDP program: {e}") from e
        self._bcc = bcc
        self.prog_fd: int = fn.fd
        self.prog_id = bpfsys.prog_id(self.prog_fd)
        self.chan_to_peer_fd: int = self._bpf[b"chan_to_peer"].map_fd
        self.peer_to_chan_fd: int = self._bpf[b"peer_to_chan"].map_fd
        self._config_fd: int = self._bpf[b"config"].map_fd
        self.stats_fd: int = self._bpf[b"stats"].map_fd
        try:
            self.port_counts_fd: int = self._bpf[b"port_counts"].map_fd
        except KeyError:  # an older build (the benchmark's --compare): no per-port counters
            self.port_counts_fd = -1
        self.ncpus = bpfsys.possible_cpus()
        self.max_bindings = max_bindings
        self._link_fd: int | None = None
        self.interface: str | None = None
        self.config: RouterConfig | None = None

    # -- configuration -------------------------------------------------------------------

    def configure(self, config: RouterConfig) -> None:
        packed = config.pack()
        assert len(packed) == CONFIG_SIZE
        bpfsys.map_update(self._config_fd, b"\0\0\0\0", packed)
        self.config = config

    def disable(self) -> None:
        """Pass every packet (keeps the maps)."""
        bpfsys.map_update(self._config_fd, b"\0\0\0\0", bytes(CONFIG_SIZE))

    # -- attachment ----------------------------------------------------------------------

    def attach(self, ifname: str, mode: str = "driver") -> None:
        """Attach through a bpf_link, replacing a stale netlink-attached program if present.

        The link dies with its FD, so nothing stays attached once this process is gone. A live
        link of another process (another relay) is never replaced: that raises EBUSY.
        """
        if mode not in ATTACH_MODES:
            raise ValueError(f"attach mode must be one of {sorted(ATTACH_MODES)}, not {mode!r}")
        if self._link_fd is not None:
            raise RuntimeError(f"already attached to {self.interface}")
        try:
            index = interface.ifindex(ifname)
        except OSError as e:
            raise XdpUnavailable(f"no interface {ifname!r}: {e}") from e
        flags = ATTACH_MODES[mode]
        try:
            self._link_fd = bpfsys.link_create_xdp(self.prog_fd, index, flags)
        except bpfsys.BpfError as e:
            if e.errno not in (errno.EBUSY, errno.EEXIST):
                raise XdpUnavailable(f"cannot attach XDP to {ifname} ({mode}): {e}") from e
            # A program attached through netlink (e.g. left over by a killed process using
            # `ip link` or bcc's attach_xdp). Remove it in both modes and retry once.
            log.warning("replacing a stale XDP program on %s", ifname)
            for f in ATTACH_MODES.values():
                self._bcc.BPF.remove_xdp(ifname, f)
            try:
                self._link_fd = bpfsys.link_create_xdp(self.prog_fd, index, flags)
            except bpfsys.BpfError as e2:
                raise XdpUnavailable(
                    f"cannot attach XDP to {ifname} ({mode}): {e2}"
                    " (another process holds an XDP link on it?)"
                ) from e2
        self.interface = ifname

    def detach(self) -> None:
        if self._link_fd is not None:
            os.close(self._link_fd)
            self._link_fd = None
            self.interface = None

    @property
    def attached(self) -> bool:
        return self._link_fd is not None

    def close(self) -> None:
        """Detach and release the program and its maps."""
        self.detach()
        bpf, self._bpf = self._bpf, None
        if bpf is not None:
            bpf.cleanup()

    # -- maps --------------------------------------------------------------------------

    def update(
        self, entries_c2p: list[tuple[bytes, bytes]], entries_p2c: list[tuple[bytes, bytes]]
    ) -> None:
        for fd, entries in (
            (self.chan_to_peer_fd, entries_c2p),
            (self.peer_to_chan_fd, entries_p2c),
        ):
            if not entries:
                continue
            keys = [k for k, _ in entries]
            values = [v for _, v in entries]
            if len(entries) == 1:
                bpfsys.map_update(fd, keys[0], values[0])
            else:
                bpfsys.map_update_batch(fd, keys, values)

    def delete(self, keys_c2p: list[bytes], keys_p2c: list[bytes]) -> None:
        """Delete keys; missing keys are ignored."""
        for fd, keys in ((self.chan_to_peer_fd, keys_c2p), (self.peer_to_chan_fd, keys_p2c)):
            if len(keys) > 1:
                try:
                    bpfsys.map_delete_batch(fd, keys)
                    continue
                except bpfsys.BatchError as e:
                    keys = keys[e.done :]
            for k in keys:
                bpfsys.map_delete(fd, k)

    # -- observation ---------------------------------------------------------------------

    def counters(self) -> XdpCounters:
        stride = (STATS_SIZE + 7) & ~7
        raw = bpfsys.map_lookup(self.stats_fd, b"\0\0\0\0", stride * self.ncpus)
        assert raw is not None
        return XdpCounters.from_percpu(raw, self.ncpus)

    def reset_counters(self) -> None:
        stride = (STATS_SIZE + 7) & ~7
        bpfsys.map_update(self.stats_fd, b"\0\0\0\0", bytes(stride * self.ncpus))

    def test_run(
        self, packet: bytes, repeat: int = 1, ingress_ifindex: int = 0
    ) -> bpfsys.TestRunResult:
        """Run the program on ``packet`` in the kernel (BPF_PROG_TEST_RUN), unattached."""
        return bpfsys.prog_test_run(self.prog_fd, packet, repeat, ingress_ifindex)
