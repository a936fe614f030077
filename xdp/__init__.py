"""XDP fast path: an in-kernel TURN ChannelData router compiled by bcc.

``turn_router.c`` is the program; ``loader`` compiles, configures and attaches it (through a
bpf_link, so it goes away with the process); ``maps`` and ``bindings`` hold the byte layouts and
the command-to-map-entry logic; ``bpfsys`` issues the raw bpf(2) commands; ``interface`` and
``netns`` read interface facts and switch namespaces. The actor that owns it all is
``actors.xdp_manager``; frames for tests and benchmarks are crafted in ``simulations.frames``.
Importing this package never imports bcc.
"""
