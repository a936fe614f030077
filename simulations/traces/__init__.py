"""Packet traces: record them from live runs, build them from Firezone's code, replay them.

``tracefile`` reads and writes a trace (a pcap plus its expectations); ``record`` drives the
``scenarios`` against the daemon and writes what went over the wire; ``connlib`` writes the
traces built from connlib's and the Firezone relay's source; ``replay`` sends a trace to the
daemon and checks every answer. The traces themselves are in ``data/`` (``data/firezone/``
for the ones built from Firezone's code).
"""
