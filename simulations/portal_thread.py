"""The test portal on an event loop of its own thread, for synchronous callers (tests,
benchmarks), optionally inside a network namespace.

The thread enters the namespace for good before the portal listens, so a portal on
``127.0.0.1`` is reachable from that namespace's loopback only (the relay's, in the NAT
topology). Everything that touches the portal runs on its loop through :meth:`call`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from simulations.portal import Portal, Relay


class PortalThread:
    """``with PortalThread(token) as p`` (or ``p = PortalThread(...).start()`` and
    ``p.close()``); ``p.portal`` is the :class:`~simulations.portal.Portal`."""

    def __init__(
        self, token: str = "relay-token", *, netns: str | None = None, **portal: Any
    ) -> None:
        self.token = token
        self.netns = netns
        self._portal_kwargs = portal
        self.portal: Portal | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="portal", daemon=True)

    def start(self) -> PortalThread:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"portal did not start: {self._error!r}")
        return self

    def __enter__(self) -> PortalThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _main(self) -> None:
        try:
            if self.netns is not None:
                from firezone_relay.xdp.netns import enter

                enter(self.netns)  # this thread only, for good
            self.loop = asyncio.new_event_loop()
            self.portal = Portal(self.token, **self._portal_kwargs)
            self.loop.run_until_complete(self.portal.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.portal.stop())
        self.loop.close()

    @property
    def url(self) -> str:
        assert self.portal is not None
        return self.portal.url

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        """``fn(*args)`` on the portal's loop (awaited if it returns a coroutine)."""
        assert self.loop is not None

        async def invoke() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(invoke(), self.loop).result(timeout)

    def stop_serving(self) -> None:
        """Stop listening and drop every connection, as a portal deploy would."""
        assert self.portal is not None
        self.call(self.portal.stop)

    def start_serving(self) -> None:
        assert self.portal is not None
        self.call(self.portal.start)

    def joined_relays(self) -> list[Relay]:
        assert self.portal is not None
        return list(self.call(self.portal.connected_relays))

    def credentials(self, public_key: str) -> tuple[str, str]:
        """The username and password the portal hands a client for the first joined relay."""
        assert self.portal is not None
        entries = self.call(self.portal.credentials, public_key)
        assert entries, "no relay has joined the portal"
        return entries[0]["username"], entries[0]["password"]

    def close(self) -> None:
        """Stop the portal and its loop, and wait for the thread."""
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
