"""Benchmarks and load: the sans-IO core (``core``), the worst datagram (``worst_datagram``),
the daemon against coturn (``daemon``, with ``daemon_client`` as its load generator and
``coturn/`` for coturn's configuration), the XDP fast path (``xdp``) and a fuzzer that
measures the daemon under hostile load (``fuzz``)."""
