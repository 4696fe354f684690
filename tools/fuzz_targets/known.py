"""Findings the fuzzers make that are routed elsewhere, by crash signature.

Each entry is a defect in code this fuzzing work does not own, with a saved reproducer in
``tests/fuzz_corpus/<target>/``. ``tools/fuzz`` reports them as known instead of new, and
tests/test_fuzz.py lets their reproducers fail as expected failures; it also checks that
every entry still reproduces, so an entry must go as soon as its defect is fixed.
"""

from __future__ import annotations

KNOWN_OPEN: dict[str, str] = {
    # vdev/vnic/function.py VnicFunction._on_unmap decides which rings live in the unmapped
    # window by re-reading RING_IOVA from the driver-writable register page; a driver that
    # rewrote it keeps the ring running on memory it unmapped (issue 7, defect 15).
    "ContractViolation@on_fetch: ring fetched a descriptor after its memory was unmapped": "issue 7 #15: VnicFunction._on_unmap re-reads RING_IOVA",
    # vdev/mgmt.py recv_message catches ValueError and MgmtError only; json.loads of a deeply
    # nested document raises RecursionError, which escapes (and the message's fds leak).
    "RecursionError@vdev/mgmt.py:recv_message": "issue 7 #4 / item 2: the typed control protocol replaces vdev.mgmt",
    # vdev/vnic/default_function.py answers any IPv4 datagram with protocol UDP with port
    # unreachable without parsing the UDP header: a datagram shorter than 8 bytes gets an
    # ICMP error quoting less than header + 8 bytes (RFC 792), which our own parser refuses.
    "ContractViolation@one_input_packets: default function sent a malformed frame (SanityError)": "default function: port unreachable for a malformed UDP datagram",
    # vdev/vnic/default_function.py sends port unreachable about a datagram from 0.0.0.0
    # (RFC 1122 3.2.2: never about a datagram whose source is not one host).
    "ContractViolation@_check_reply: ICMP error sent about a datagram from": "default function: ICMP error to source 0.0.0.0",
}
