"""Turn channel-binding commands into XDP map changes, keeping a shadow of what is installed.

A batch of commands is coalesced per map key (the last word wins), so one batch costs at most
one update and one delete syscall per map. The shadow makes deletes exact: an entry is removed
only if it still belongs to the binding being deleted, never one that replaced it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from firezone_relay.protocol.commands import CreateChannelBinding, DeleteChannelBinding
from firezone_relay.protocol.types import Transport
from firezone_relay.xdp.maps import binding_entries


@dataclass(slots=True)
class MapChanges:
    """Entries to write and keys to delete, per map."""

    update_c2p: list[tuple[bytes, bytes]] = field(default_factory=list)
    update_p2c: list[tuple[bytes, bytes]] = field(default_factory=list)
    delete_c2p: list[bytes] = field(default_factory=list)
    delete_p2c: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.update_c2p or self.update_p2c or self.delete_c2p or self.delete_p2c)


class BindingTable:
    """What the kernel maps hold (chan_to_peer and peer_to_chan), as raw key -> value bytes."""

    def __init__(self) -> None:
        self.c2p: dict[bytes, bytes] = {}
        self.p2c: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self.c2p)

    def plan(self, commands: Iterable[object]) -> MapChanges:
        """Apply ``commands`` to the shadow and return the kernel changes that mirror them.

        Anything that is not a channel-binding command is ignored.
        """
        before_c2p: dict[bytes, bytes | None] = {}
        before_p2c: dict[bytes, bytes | None] = {}
        for command in commands:
            if not isinstance(command, CreateChannelBinding | DeleteChannelBinding):
                continue
            if command.client.transport is not Transport.UDP:
                continue  # the XDP program relays UDP clients only
            try:
                (ck, pk), _ = binding_entries(
                    command.client.remote, command.channel, command.peer, command.allocation_port
                )
            except (ValueError, TypeError, IndexError, struct.error):
                continue  # not a binding we can express: userspace keeps relaying it
            before_c2p.setdefault(ck, self.c2p.get(ck))
            before_p2c.setdefault(pk, self.p2c.get(pk))
            if isinstance(command, CreateChannelBinding):
                # A key re-pointed elsewhere leaves its old partner dangling: drop that too.
                old_pk = self.c2p.get(ck)
                if old_pk is not None and old_pk != pk and self.p2c.get(old_pk) == ck:
                    before_p2c.setdefault(old_pk, ck)
                    del self.p2c[old_pk]
                old_ck = self.p2c.get(pk)
                if old_ck is not None and old_ck != ck and self.c2p.get(old_ck) == pk:
                    before_c2p.setdefault(old_ck, pk)
                    del self.c2p[old_ck]
                self.c2p[ck] = pk
                self.p2c[pk] = ck
            else:
                if self.c2p.get(ck) == pk:
                    del self.c2p[ck]
                if self.p2c.get(pk) == ck:
                    del self.p2c[pk]
        changes = MapChanges()
        for before, now, updates, deletes in (
            (before_c2p, self.c2p, changes.update_c2p, changes.delete_c2p),
            (before_p2c, self.p2c, changes.update_p2c, changes.delete_p2c),
        ):
            for key, old in before.items():
                new = now.get(key)
                if new is None:
                    if old is not None:
                        deletes.append(key)
                elif new != old:
                    updates.append((key, new))
        return changes

    def forget(self, c2p_keys: Iterable[bytes] = (), p2c_keys: Iterable[bytes] = ()) -> None:
        """Drop entries the kernel refused (e.g. a full map): they stay in userspace."""
        for k in c2p_keys:
            self.c2p.pop(k, None)
        for k in p2c_keys:
            self.p2c.pop(k, None)
