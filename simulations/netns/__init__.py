"""A NAT network of Linux network namespaces, and what runs inside it (root only).

``topology`` builds the namespaces (client and gateway behind a NAT router, the relay on the
public side; Firezone's two-router lab as a variant); ``agent`` is a TURN client with a TUN
tunnel, driven by the ``signalling`` hub (``tun`` opens the device); ``relay`` holds the
helpers that run the daemon inside the topology for the XDP benchmark.
"""
