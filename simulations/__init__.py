"""What tests and benchmarks run against the daemon, never imported by it: the fake portal
(``portal``, ``portal_thread``), the one daemon launcher (``relay_process``), TURN request
builders (``turn_client``) and XDP test frames (``frames``); and three tools: ``traces`` (the
packet-trace simulator), ``netns`` (the NAT network of namespaces) and ``bench``."""
