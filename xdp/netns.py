"""Switch the calling thread into a named network namespace (Python 3.11 has no os.setns).

setns(2) on a thread changes only that thread; sockets and threads created while inside stay in
the namespace after switching back, which lets one process own sockets in several namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def setns_fd(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter(name: str) -> None:
    """Move the calling thread into ``/run/netns/<name>`` for good."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns_fd(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def netns(name: str | None) -> Iterator[None]:
    """Run the block in namespace ``name`` (no-op for None), then switch back."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(name)
        try:
            yield
        finally:
            setns_fd(own)
    finally:
        os.close(own)
