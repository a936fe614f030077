"""Network-namespace fixtures for integration tests (root only).

The namespaces and the topology are ``simulations.netns.topology``'s (shared with the
benchmarks). What keeps them from leaking:

* every namespace is named ``fzn<pid><worker>...-<role>``: unique per test process, so parallel
  runs (other engineers, xdist workers) never touch each other's namespaces;
* at session start, namespaces left by a *dead* process (SIGKILLed run) are purged, and at
  session end whatever this process still holds;
* topologies are built step by step and purged on any exception;
* teardown deletes the namespaces, which removes veths, routes, nft tables and any attached
  XDP program; processes started inside are killed by pid (``ip netns pids``).

Nothing is created in the root namespace and nothing is connected to it.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from simulations.netns.topology import DEFAULT_PREFIX, Netns, Topology, purge, purge_stale

#: the prefix of the single namespaces ``make_netns`` creates (apart from the topologies')
SINGLE_PREFIX = DEFAULT_PREFIX + "n"
_counter = itertools.count(1)

__all__ = ["Netns", "Topology", "require_bcc", "require_root_tools"]


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0 and shutil.which("ip"):
        purge_stale()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.geteuid() == 0 and shutil.which("ip"):
        purge(SINGLE_PREFIX)
        purge(DEFAULT_PREFIX)


def require_root_tools(*tools: str) -> None:
    """Skip (with the reason) unless we are root and have the tools."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, XDP)")
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (see .ci/install-bcc.sh)")


def require_bcc() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loading BPF programs)")
    from firezone_relay.xdp.loader import XdpUnavailable, import_bcc

    try:
        import_bcc()
    except XdpUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], Netns]]:
    """``make_netns(role)``: a namespace that is deleted after the test, whatever happens."""
    require_root_tools()
    created: list[Netns] = []

    def make(role: str) -> Netns:
        ns = Netns.create(f"{SINGLE_PREFIX}-{role}{next(_counter)}")
        created.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in created:
            ns.delete()


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A fresh four-namespace NAT topology per test (about 0.3 s), deleted afterwards: client
    and gateway behind cone NATs, the relay ``p0`` on the router's public segment. Its
    addresses are private: a relay under test needs ``--allow-private-peers``."""
    require_root_tools("nft", "ethtool")
    with Topology() as t:
        yield t
