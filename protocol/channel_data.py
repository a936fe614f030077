"""ChannelData numbers (RFC 8656 §12.4): the range a client can bind. The per-datagram paths
parse the 4-byte header themselves (``protocol.client_input``, ``protocol.server``); encoding
and decoding whole messages is for tests and simulations (``simulations.channel_data``)."""

from __future__ import annotations

MIN_CHANNEL = 0x4000
MAX_CHANNEL = 0x4FFF
#: every channel number a client can bind (4096): a per-allocation cap this high is never
#: reached by numbering alone, since a number is one channel (cooling down or bound)
CHANNEL_NUMBERS = MAX_CHANNEL - MIN_CHANNEL + 1
