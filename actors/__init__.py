"""The relay daemon: one uvloop event loop owning every socket, pykka actors owning lifecycles.

``actors.cli:main`` is the ``firezone-relay`` entry point; ``actors.daemon.Relay`` wires the
sans-IO core (``protocol``) to sockets, timers, actors, telemetry and the HTTP endpoints.
"""
