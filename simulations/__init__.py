"""Simulations and stand-ins: the fake portal, packet-trace replays, benchmarks."""
