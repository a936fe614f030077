"""A pykka actor type whose inbox is drained by an asyncio event loop instead of a thread.

Allocation actors must touch loop-owned sockets (``loop.add_reader``) and the sans-IO core, which
are not thread-safe, and there may be ten thousand of them: a thread each would be wasteful and
fragile. A :class:`LoopActor` runs its handlers on the loop thread, so
it can own loop resources directly, costs no thread, and still speaks pykka (``tell``, ``ask``,
``stop``, proxies) to the rest of the system.

Delivery rules:

* a message put from the loop thread while the actor is idle is handled at once, in the caller's
  stack (a "calling-thread dispatcher"), so commands keep the order the core emitted them in;
* a message put while the actor is already handling one, or from another thread, is handled on a
  later loop pass (``call_soon_threadsafe``).

Never block on a reply (``ask(block=True)``, ``future.get()``) from the loop thread unless the
actor is known to be idle; use ``ask(block=False)`` and a callback, or ``tell``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Self

import pykka
from pykka import ActorRef, ActorRegistry

if TYPE_CHECKING:
    from pykka._envelope import Envelope  # the inbox protocol's item type

__all__ = ["LoopActor", "LoopInbox"]

logger = logging.getLogger("relay.actors")


class LoopInbox:
    """The actor inbox protocol (``put``/``get``/``empty``) on a deque, woken through a loop."""

    __slots__ = ("_drain", "_draining", "_items", "_loop", "_scheduled", "_thread_id")

    def __init__(self) -> None:
        self._items: collections.deque[Envelope[object]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: Callable[[], None] | None = None
        self._thread_id: int | None = None
        self._scheduled = False
        self._draining = False

    def bind(
        self, loop: asyncio.AbstractEventLoop, drain: Callable[[], None], thread_id: int | None
    ) -> None:
        self._loop = loop
        self._drain = drain
        self._thread_id = thread_id

    def put(self, envelope: Envelope[object], /) -> None:
        self._items.append(envelope)
        if self._drain is None:  # not started yet: the start drains what is queued
            return
        if self._thread_id == threading.get_ident():
            if not self._draining:
                self._drain()
            return  # the running drain picks it up
        if not self._scheduled:
            self._scheduled = True
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # loop closed: the message can never be handled
                logger.debug("message for a loop actor after its loop closed")

    def _wake(self) -> None:
        # Clear the flag before draining: a put racing with the drain schedules another wake-up
        # instead of being stranded.
        self._scheduled = False
        self._thread_id = threading.get_ident()
        if not self._draining:
            assert self._drain is not None  # only put() after bind() schedules a wake-up
            self._drain()

    def get(self) -> Envelope[object]:
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items


class LoopActor(pykka.Actor):
    """Base class for actors hosted on an asyncio loop (see the module docstring).

    Pass ``loop=`` when starting from outside the loop thread; on the loop thread the running
    loop is used.
    """

    #: Whether ``start`` registers the actor in pykka's global registry. The registry is a list
    #: with O(n) unregister; actors that exist by the ten thousand (allocations) opt out and are
    #: tracked by their owner instead.
    registered: ClassVar[bool] = True

    actor_inbox: LoopInbox

    def __init__(self, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__()
        self.actor_loop = loop if loop is not None else asyncio.get_running_loop()

    # Any: pykka's signature; the arguments are the subclass constructor's
    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> ActorRef[Self]:
        if cls.registered:
            return super().start(*args, **kwargs)
        obj = cls(*args, **kwargs)
        obj._start_actor_loop()
        return obj.actor_ref

    @staticmethod
    def _create_actor_inbox() -> LoopInbox:
        return LoopInbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:  # Any: pykka's signature (any reply)
        return pykka.ThreadingFuture()

    def _start_actor_loop(self) -> None:
        loop = self.actor_loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self.actor_inbox.bind(loop, self._drain, threading.get_ident())
            self._begin()
        else:
            loop.call_soon_threadsafe(self._begin_from_loop)

    def _begin_from_loop(self) -> None:
        self.actor_inbox.bind(self.actor_loop, self._drain, threading.get_ident())
        self._begin()

    def _begin(self) -> None:
        self._actor_loop_setup()  # runs on_start(); a failure stops the actor
        if self.actor_stopped.is_set():
            self._actor_loop_teardown()
        elif not self.actor_inbox.empty():
            self._drain()

    def _drain(self) -> None:
        inbox = self.actor_inbox
        inbox._draining = True
        try:
            while not self.actor_stopped.is_set() and not inbox.empty():
                self._handle_envelope(inbox.get())
        finally:
            inbox._draining = False
        if self.actor_stopped.is_set():
            self._actor_loop_teardown()  # answers what is left with ActorDeadError

    def _handle_envelope(self, envelope: Envelope[object]) -> None:
        # The same contract as pykka's threaded receive loop: a reply future gets the result or
        # the exception; an exception from a tell()ed message kills the actor.
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                logger.info("Exception returned from %s to caller:", self, exc_info=True)
                envelope.reply_to.set_exception()
            else:
                exc_info = sys.exc_info()
                self._handle_failure(*exc_info)
                try:
                    self.on_failure(*exc_info)
                except Exception:
                    self._handle_failure(*sys.exc_info())
        except BaseException:
            # KeyboardInterrupt/SystemExit belong to the loop: stop this actor and let it rise.
            self._stop()
            raise

    # Any: sys.exc_info()'s (type, value, traceback), handed to logging as they are; its
    # exc_info type has no room for the all-None triple (pykka ignores the same error)
    def _handle_failure(self, *exc_info: Any) -> None:
        logger.error("Unhandled exception in %s:", self, exc_info=exc_info)
        if self.registered:
            ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()

    def _stop(self) -> None:
        if not self.registered:
            # Skip pykka's O(n) registry scan; the rest matches Actor._stop.
            self.actor_stopped.set()
            try:
                self.on_stop()
            except Exception:
                self._handle_failure(*sys.exc_info())
            return
        super()._stop()
