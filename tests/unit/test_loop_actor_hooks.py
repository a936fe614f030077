"""``LoopActor`` (actors/loop_actor.py) replaces pykka's thread with the event loop through
pykka's internal hooks for new actor types. pykka may change them in any release: this test
names each hook and the shape we rely on, so such a release fails here, loudly, instead of
somewhere in the daemon."""

from __future__ import annotations

import inspect

import pykka
from pykka import _envelope

from firezone_relay.actors.loop_actor import LoopActor, LoopInbox

#: hook -> the parameters (after self) LoopActor calls or overrides it with
HOOKS = {
    "_create_actor_inbox": [],  # staticmethod, overridden
    "_create_future": [],  # staticmethod, overridden
    "_start_actor_loop": ["self"],  # overridden, called by Actor.start
    "_actor_loop_setup": ["self"],  # called: runs on_start, a failure stops the actor
    "_actor_loop_teardown": ["self"],  # called: answers what is left with ActorDeadError
    "_handle_receive": ["self", "message"],  # called per envelope
    "_handle_failure": ["self", "exception_type", "exception_value", "traceback"],
    "_stop": ["self"],  # overridden
}


def test_pykka_still_has_every_hook_loop_actor_uses() -> None:
    for name, params in HOOKS.items():
        hook = getattr(pykka.Actor, name, None)
        assert callable(hook), f"pykka.Actor.{name} is gone: LoopActor needs porting"
        found = list(inspect.signature(hook).parameters)
        assert found == params, f"pykka.Actor.{name}{found} changed: LoopActor needs porting"


def test_pykka_still_keeps_the_state_loop_actor_reads() -> None:
    actor = LoopActor.__new__(LoopActor)
    pykka.Actor.__init__(actor)
    assert hasattr(actor, "actor_stopped") and hasattr(actor, "actor_ref")
    assert isinstance(actor.actor_inbox, LoopInbox)  # made by our _create_actor_inbox
    envelope = _envelope.Envelope("message", reply_to=None)
    assert (envelope.message, envelope.reply_to) == ("message", None)


def test_the_inbox_speaks_pykkas_inbox_protocol() -> None:
    wanted = {n for n in dir(pykka._actor.ActorInbox) if not n.startswith("_")}
    assert wanted <= set(dir(LoopInbox)), wanted - set(dir(LoopInbox))
