"""Which worker a client's datagrams reach: N ``SO_REUSEPORT`` listen sockets per family, made
by the supervisor in a fixed order, with a classic BPF program on the group that picks the
socket from the client's source address and port.

The kernel's own reuseport hash would move flows whenever a socket leaves the group (a worker
that crashed); this program's answer depends only on the source address and port and the
number of workers, and the supervisor keeps every socket open for the relay's whole life, so
the group never changes: while a worker restarts, its clients' datagrams wait in its socket.
``worker_for`` is the same hash in Python (tests predict a client's worker with it).

The program reads the IP header through ``SKF_NET_OFF`` (a reuseport program sees the UDP
payload at offset 0): IPv4's source address at 12 and source port after the IHL-long header;
IPv6's four source words at 8..20 and the source port at 40 (UDP directly after the fixed
header, as every client datagram we serve has it).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import socket
import struct
from typing import Final

from firezone_relay.protocol.types import Family

__all__ = ["attach_steering", "program", "reuseport_socket", "worker_for"]

logger = logging.getLogger("relay.workers")

SO_ATTACH_REUSEPORT_CBPF: Final = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)
SKF_NET_OFF: Final = -0x100000
_GOLDEN: Final = 0x9E3779B1
_MASK: Final = 0xFFFFFFFF

# classic BPF opcodes (linux/filter.h)
_LD_W_ABS, _LD_H_ABS, _LD_H_IND = 0x20, 0x28, 0x48
_LDX_B_MSH, _LDX_MEM, _ST = 0xB1, 0x61, 0x02
_ALU_XOR_X, _ALU_MUL_K, _ALU_RSH_K, _ALU_MOD_K = 0xAC, 0x24, 0x74, 0x94
_TAX, _RET_A = 0x07, 0x16

Instruction = tuple[int, int, int, int]


def _net(offset: int) -> int:
    return (SKF_NET_OFF + offset) & _MASK


def _mix(workers: int) -> list[Instruction]:
    """A ^= port (in X) was done; A = (A * golden) ^ ((A * golden) >> 16) mod workers."""
    return [
        (_ALU_MUL_K, 0, 0, _GOLDEN),
        (_TAX, 0, 0, 0),
        (_ALU_RSH_K, 0, 0, 16),
        (_ALU_XOR_X, 0, 0, 0),
        (_ALU_MOD_K, 0, 0, workers),
        (_RET_A, 0, 0, 0),
    ]


def program(family: Family, workers: int) -> list[Instruction]:
    """The steering program of one family's group of ``workers`` sockets."""
    if not 1 <= workers <= 1024:
        raise ValueError("1 to 1024 workers")
    if family is Family.V4:
        return [
            (_LDX_B_MSH, 0, 0, _net(0)),  # X = IHL * 4
            (_LD_H_IND, 0, 0, _net(0)),  # A = source port
            (_ST, 0, 0, 0),  # M[0] = port
            (_LD_W_ABS, 0, 0, _net(12)),  # A = source address
            (_LDX_MEM, 0, 0, 0),  # X = port
            (_ALU_XOR_X, 0, 0, 0),
            *_mix(workers),
        ]
    code: list[Instruction] = [(_LD_W_ABS, 0, 0, _net(8))]
    for offset in (12, 16, 20):
        code += [(_TAX, 0, 0, 0), (_LD_W_ABS, 0, 0, _net(offset)), (_ALU_XOR_X, 0, 0, 0)]
    code += [(_TAX, 0, 0, 0), (_LD_H_ABS, 0, 0, _net(40)), (_ALU_XOR_X, 0, 0, 0)]
    return code + _mix(workers)


def worker_for(host: str, port: int, workers: int) -> int:
    """The worker the program picks for a client at ``host:port`` (the same arithmetic)."""
    packed = ipaddress.ip_address(host.split("%")[0]).packed
    a = 0
    for (word,) in struct.iter_unpack("!I", packed):
        a ^= word
    a ^= port
    a = (a * _GOLDEN) & _MASK
    a ^= a >> 16
    return a % workers


def attach_steering(sock: socket.socket, family: Family, workers: int) -> None:
    """Attach the program to the reuseport group ``sock`` is in (OSError if the kernel
    refuses)."""
    code = program(family, workers)
    filters = (ctypes.c_ubyte * (8 * len(code)))()
    for i, (op, jt, jf, k) in enumerate(code):
        struct.pack_into("=HBBI", filters, 8 * i, op, jt, jf, k)
    fprog = struct.pack("@HP", len(code), ctypes.addressof(filters))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def reuseport_socket(family: Family, kind: int) -> socket.socket:
    """An unbound socket of ``kind`` with ``SO_REUSEPORT`` (IPv6 ones IPv6-only)."""
    af = socket.AF_INET6 if family is Family.V6 else socket.AF_INET
    sock = socket.socket(af, kind)
    try:
        if af == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except BaseException:
        sock.close()
        raise
    return sock
