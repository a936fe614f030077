"""Open a TUN device (layer-3, no packet-info header) in the caller's network namespace.

The NAT agents carry a real tunnel over TURN: the kernel's TCP (curl, http.server) writes IP
packets into the device, the agent reads them, and writes what arrives from the peer back.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

#: Firezone's tunnel MTU: leaves room for the outer IPv6 + UDP + ChannelData headers.
DEFAULT_MTU = 1280


def open_tun(name: str) -> int:
    """A non-blocking fd of the TUN device ``name`` (created if it does not exist)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except BaseException:
        os.close(fd)
        raise
    return fd


def configure(name: str, addresses: list[str], mtu: int = DEFAULT_MTU) -> None:
    """Assign ``addresses`` (CIDR, IPv4 or IPv6) and bring the device up."""
    _ip("link", "set", "dev", name, "mtu", str(mtu))
    for cidr in addresses:
        if ":" in cidr:
            _ip("-6", "addr", "add", cidr, "dev", name, "nodad")
        else:
            _ip("addr", "add", cidr, "dev", name)
    _ip("link", "set", "dev", name, "up")


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
