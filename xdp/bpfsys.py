"""The few bpf(2) commands we issue ourselves, through ctypes.

bcc compiles and loads the program; map updates with raw bytes, batches, BPF_PROG_TEST_RUN and
XDP attachment through a bpf_link are done here so their byte layouts stay explicit, and so the
attachment dies with the process (a link FD, unlike bcc's netlink attach, is released by the
kernel when its last FD closes, even on SIGKILL).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from dataclasses import dataclass

_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BPF_LINK_CREATE = 28

BPF_XDP = 37  # enum bpf_attach_type
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) command failed; ``errno`` tells why."""


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = _SYSCALL_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(0, f"bpf(2) syscall number unknown on {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf cmd {cmd}: {os.strerror(err)}")
    return int(ret)


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = ctypes.create_string_buffer(struct.pack("=I4xQQQ", fd, _addr(k), _addr(v), flags), 32)
    _bpf(BPF_MAP_UPDATE_ELEM, attr)


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; False if it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    attr = ctypes.create_string_buffer(struct.pack("=I4xQQQ", fd, _addr(k), 0, 0), 32)
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr)
    except BpfError as e:
        if e.errno == 2:  # ENOENT
            return False
        raise
    return True


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = ctypes.create_string_buffer(struct.pack("=I4xQQQ", fd, _addr(k), _addr(v), 0), 32)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    except BpfError as e:
        if e.errno == 2:
            return None
        raise
    return v.raw


def _batch(cmd: int, fd: int, keys: bytes, values: bytes | None, count: int) -> int:
    k = ctypes.create_string_buffer(keys, len(keys))
    v = ctypes.create_string_buffer(values, len(values)) if values is not None else None
    # struct { u64 in_batch, out_batch, keys, values; u32 count, map_fd; u64 elem_flags, flags; }
    attr = ctypes.create_string_buffer(
        struct.pack("=QQQQIIQQ", 0, 0, _addr(k), _addr(v), count, fd, 0, 0), 56
    )
    try:
        _bpf(cmd, attr)
    except BpfError as e:
        done = struct.unpack_from("=I", attr.raw, 32)[0]
        raise BatchError(e.errno or 0, str(e), done) from None
    return int(struct.unpack_from("=I", attr.raw, 32)[0])


class BatchError(BpfError):
    """A batch stopped early; ``done`` elements were processed."""

    def __init__(self, err: int, msg: str, done: int) -> None:
        super().__init__(err, msg)
        self.done = done


def map_update_batch(fd: int, keys: list[bytes], values: list[bytes]) -> int:
    return _batch(BPF_MAP_UPDATE_BATCH, fd, b"".join(keys), b"".join(values), len(keys))


def map_delete_batch(fd: int, keys: list[bytes]) -> int:
    return _batch(BPF_MAP_DELETE_BATCH, fd, b"".join(keys), None, len(keys))


def link_create_xdp(prog_fd: int, ifindex: int, flags: int) -> int:
    """Attach an XDP program through a bpf_link; returns the link FD (close it to detach)."""
    attr = ctypes.create_string_buffer(struct.pack("=IIII", prog_fd, ifindex, BPF_XDP, flags), 64)
    return _bpf(BPF_LINK_CREATE, attr)


def prog_id(prog_fd: int) -> int:
    """The kernel-wide id of a loaded program (as ``bpftool prog`` lists it)."""
    info = ctypes.create_string_buffer(256)
    attr = ctypes.create_string_buffer(struct.pack("=IIQ", prog_fd, len(info), _addr(info)), 16)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    # struct bpf_prog_info { __u32 type; __u32 id; ... }
    return int(struct.unpack_from("=I", info.raw, 4)[0])


@dataclass(frozen=True, slots=True)
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int  # mean per repetition


def prog_test_run(
    prog_fd: int, packet: bytes, repeat: int = 1, ingress_ifindex: int = 0, out_size: int = 0
) -> TestRunResult:
    """Run an XDP program on ``packet`` in the kernel (BPF_PROG_TEST_RUN)."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    out_len = out_size or len(packet) + 512
    data_out = ctypes.create_string_buffer(out_len)
    # struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    ctx = ctypes.create_string_buffer(struct.pack("=6I", 0, len(packet), 0, ingress_ifindex, 0, 0))
    attr = ctypes.create_string_buffer(
        struct.pack(
            "=IIIIQQIIIIQQIII4x",
            prog_fd,
            0,
            len(packet),
            out_len,
            _addr(data_in),
            _addr(data_out),
            repeat,
            0,
            len(ctx),
            0,
            _addr(ctx),
            0,
            0,
            0,
            0,
        ),
        80,
    )
    _bpf(BPF_PROG_TEST_RUN, attr)
    retval, _, size_out = struct.unpack_from("=III", attr.raw, 4)
    duration = struct.unpack_from("=I", attr.raw, 36)[0]
    return TestRunResult(retval, data_out.raw[:size_out], duration)


def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n
