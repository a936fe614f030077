"""The loop-hosted actor type and the command pipeline, in-process on a real uvloop loop."""

from __future__ import annotations

import asyncio
import random
import threading
import typing
from collections import deque
from typing import Any

import pykka
import pytest
import uvloop

from firezone_relay.actors.loop_actor import LoopActor
from firezone_relay.actors.offload import XdpRouteSink
from firezone_relay.actors.pipeline import ROUTES, Pipeline
from firezone_relay.protocol.commands import (
    Command,
    CreateAllocation,
    CreateChannelBinding,
    DeleteChannelBinding,
    FreeAllocation,
    SendMessage,
)
from firezone_relay.protocol.types import Family, udp

pytestmark = pytest.mark.system


class Recorder(LoopActor):
    def __init__(self, log: list[Any], *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(loop=loop)
        self.log = log
        self.thread: int | None = None

    def on_start(self) -> None:
        self.log.append("start")

    def on_receive(self, message: Any) -> Any:
        self.thread = threading.get_ident()
        if message == "boom":
            raise RuntimeError("boom")
        if message == "echo-self":
            self.actor_ref.tell("nested")
            self.log.append("after-nested-tell")
            return None
        self.log.append(message)
        return f"re:{message}"

    def on_failure(self, *exc_info: Any) -> None:
        self.log.append("failed")

    def on_stop(self) -> None:
        self.log.append("stop")


def _on_loop(body: Any) -> Any:
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(body(), 10))
    finally:
        loop.close()


def test_tell_from_the_loop_is_handled_at_once_and_in_order() -> None:
    async def body() -> None:
        log: list[Any] = []
        ref = Recorder.start(log)
        ref.tell(1)
        ref.tell(2)
        assert log == ["start", 1, 2]  # synchronous on the loop thread
        ref.tell("echo-self")  # a tell to itself while busy is queued behind the current message
        assert log[-2:] == ["after-nested-tell", "nested"]
        ref.stop(block=False)
        assert log[-1] == "stop"
        with pytest.raises(pykka.ActorDeadError):
            ref.tell(3)

    _on_loop(body)


def test_other_threads_reach_the_actor_through_the_loop() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        log: list[Any] = []
        ref = Recorder.start(log)
        loop_thread = threading.get_ident()
        # ask() from a worker thread: handled on the loop thread, reply comes back
        reply = await loop.run_in_executor(None, lambda: ref.ask("hi", timeout=5))
        assert reply == "re:hi"
        actor = ref._actor_weakref()
        assert actor is not None and actor.thread == loop_thread

        # many tells from many threads: all delivered, one wake-up each at most
        def spam(k: int) -> None:
            for i in range(200):
                ref.tell((k, i))

        await asyncio.gather(*(loop.run_in_executor(None, spam, k) for k in range(4)))
        # a barrier, not a pause: the mailbox is FIFO, so once this is answered every tell
        # sent before it has been handled
        assert await loop.run_in_executor(None, lambda: ref.ask("sync", timeout=5)) == "re:sync"
        got = [m for m in log if isinstance(m, tuple)]
        assert len(got) == 800
        for k in range(4):
            assert [i for kk, i in got if kk == k] == list(range(200))
        await loop.run_in_executor(None, lambda: ref.stop(block=True, timeout=5))
        assert log[-1] == "stop"

    _on_loop(body)


def test_an_actor_started_from_another_thread_runs_on_the_loop() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        log: list[Any] = []

        def start_and_ask() -> Any:
            ref = Recorder.start(log, loop=loop)
            return ref, ref.ask("from a thread", timeout=5)

        ref, reply = await loop.run_in_executor(None, start_and_ask)
        assert reply == "re:from a thread"
        assert log == ["start", "from a thread"]
        actor = ref._actor_weakref()
        assert actor is not None and actor.thread == threading.get_ident()
        ref.stop(block=False)

    _on_loop(body)


def test_an_exception_in_a_told_message_kills_only_that_actor() -> None:
    async def body() -> None:
        log_a: list[Any] = []
        log_b: list[Any] = []
        a, b = Recorder.start(log_a), Recorder.start(log_b)
        a.tell("boom")
        assert log_a[-1] == "failed" and not a.is_alive()
        b.tell("fine")
        assert log_b[-1] == "fine" and b.is_alive()
        # an exception in an ask()ed message goes to the caller; the actor lives on
        future = b.ask("boom", block=False)
        with pytest.raises(RuntimeError):
            future.get(timeout=0)
        assert b.is_alive()
        b.stop(block=False)

    _on_loop(body)


def test_every_command_type_has_a_route() -> None:
    assert set(ROUTES) == set(typing.get_args(Command))


class FakeCore:
    """Stands in for the core's command FIFO only."""

    def __init__(self) -> None:
        self.commands: deque[Command] = deque()

    def next_command(self) -> Command | None:
        return self.commands.popleft() if self.commands else None


class FastPath(pykka.ThreadingActor):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[Command, ...]] = []

    def on_receive(self, message: Any) -> Any:
        if message == "batches":
            return list(self.batches)
        self.batches.append(message)
        return None


def test_pipeline_routes_each_command_to_its_target() -> None:
    async def body() -> None:
        core = FakeCore()
        sent: list[SendMessage] = []
        spawned: dict[int, list[Any]] = {}

        class Alloc(LoopActor):
            registered = False

            def __init__(self, port: int) -> None:
                super().__init__()
                self.port = port

            def on_receive(self, message: Any) -> Any:
                spawned[self.port].append(message)
                if isinstance(message, FreeAllocation):
                    self.stop()

            def on_stop(self) -> None:
                pipeline.allocation_gone(self.port, self.actor_ref)

        def spawn(port: int) -> Any:
            spawned[port] = []
            return Alloc.start(port)

        fast_path = FastPath.start()
        sink = XdpRouteSink(fast_path)  # type: ignore[arg-type]
        pipeline = Pipeline(core, sent.append, spawn, (sink,))  # type: ignore[arg-type]
        client, peer = udp(("127.0.0.1", 5000), ("127.0.0.1", 3478)), ("127.0.0.1", 6000)
        script: list[Command] = [
            CreateAllocation(50000, Family.V4),
            CreateChannelBinding(client, 0x4000, peer, 50000),
            SendMessage(b"ok", client),
            DeleteChannelBinding(client, 0x4000, peer, 50000),
            FreeAllocation(50000, Family.V4),
            FreeAllocation(50001, Family.V4),  # unknown port: ignored
        ]
        core.commands.extend(script)
        pipeline.drain()
        assert sent == [script[2]]
        assert spawned == {50000: [script[0], script[4]]}
        assert pipeline.allocations == {}
        batches = await asyncio.get_running_loop().run_in_executor(
            None, lambda: fast_path.ask("batches", timeout=5)
        )
        assert batches == [(script[1], script[3])]  # one tuple per drain, in order
        fast_path.stop()

        # every route sink gets the same tuple per drain; a dead XDP manager is dropped
        mirrored: list[tuple[Command, ...]] = []

        class Mirror:
            def sync_routes(self, commands: tuple[Any, ...]) -> None:
                mirrored.append(commands)

        pipeline.route_sinks.append(Mirror())
        core.commands.extend([script[1], script[3]])
        pipeline.drain()
        assert mirrored == [(script[1], script[3])] and sink.ref is None

    _on_loop(body)


def test_loop_actors_scale_to_thousands() -> None:
    async def body() -> None:
        log: list[Any] = []
        refs = [Recorder.start(log) for _ in range(2000)]
        order = list(range(2000))
        random.shuffle(order)
        for i in order:
            refs[i].stop(block=False)
        assert log.count("stop") == 2000
        assert threading.active_count() < 50  # no thread per actor

    _on_loop(body)
