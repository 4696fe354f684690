"""``ofp_match`` with OXM TLVs (OpenFlow 1.3, 7.2.3): the fields this switch matches on.

A match is a list of OXM TLVs: class (u16, ``OFPXMC_OPENFLOW_BASIC``), field (7 bits),
has-mask (1 bit), payload length (u8), then the value and, when masked, the mask. The match
structure is ``type`` (u16, ``OFPMT_OXM``), ``length`` (u16, the header and the TLVs, not the
padding), the TLVs, then zero padding to a multiple of 8 bytes.

Checked here, in this order, each with the specification's ``OFPET_BAD_MATCH`` code: the
match type and length, every TLV's header and length against the field's size, fields we
do not know (``BAD_FIELD``), duplicates (``DUP_FIELD``), masks on fields that take none
(``BAD_MASK``), value bits outside the mask (``BAD_WILDCARDS``), and prerequisites
(``BAD_PREREQ``, 7.2.3.6: IPv4 fields need ``eth_type=0x0800``, ports need ``ip_proto``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from kernelctl.openflow.constants import BadMatch, ErrorType
from kernelctl.openflow.wire import OFPError, Reader, pad8

OFPMT_OXM: Final = 1
OFPXMC_OPENFLOW_BASIC: Final = 0x8000
_MATCH_HEADER: Final = struct.Struct("!HH")
_OXM_HEADER: Final = struct.Struct("!HBB")  # class, field << 1 | hasmask, length
MAX_FIELDS: Final = 16


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    number: int
    size: int
    maskable: bool


# 7.2.3.7: the OXM_OF_* fields this switch supports.
FIELDS: Final = (
    FieldSpec("in_port", 0, 4, False),
    FieldSpec("eth_dst", 3, 6, True),
    FieldSpec("eth_src", 4, 6, True),
    FieldSpec("eth_type", 5, 2, False),
    FieldSpec("ip_proto", 10, 1, False),
    FieldSpec("ipv4_src", 11, 4, True),
    FieldSpec("ipv4_dst", 12, 4, True),
    FieldSpec("tcp_src", 13, 2, False),
    FieldSpec("tcp_dst", 14, 2, False),
    FieldSpec("udp_src", 15, 2, False),
    FieldSpec("udp_dst", 16, 2, False),
)
BY_NUMBER: Final = {spec.number: spec for spec in FIELDS}
BY_NAME: Final = {spec.name: spec for spec in FIELDS}
_ORDER: Final = {spec.name: index for index, spec in enumerate(FIELDS)}

ETH_TYPE_IPV4: Final = 0x0800
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
# 7.2.3.6, the prerequisites of the fields above: (field, required field, required value).
_PREREQUISITES: Final = {
    "ip_proto": ("eth_type", ETH_TYPE_IPV4),
    "ipv4_src": ("eth_type", ETH_TYPE_IPV4),
    "ipv4_dst": ("eth_type", ETH_TYPE_IPV4),
    "tcp_src": ("ip_proto", IPPROTO_TCP),
    "tcp_dst": ("ip_proto", IPPROTO_TCP),
    "udp_src": ("ip_proto", IPPROTO_UDP),
    "udp_dst": ("ip_proto", IPPROTO_UDP),
}


def _bad(code: BadMatch, why: str) -> OFPError:
    return OFPError(ErrorType.BAD_MATCH, code, why)


@dataclass(frozen=True, slots=True)
class MatchField:
    """One field: ``mask`` None means exact; a stored mask is never all ones or zero."""

    name: str
    value: int
    mask: int | None = None


@dataclass(frozen=True, slots=True)
class Match:
    """A checked match: at most one entry per field, in the order of ``FIELDS``."""

    fields: tuple[MatchField, ...] = ()

    @classmethod
    def of(cls, **values: int | tuple[int, int]) -> Match:
        """``Match.of(eth_type=0x800, ipv4_src=(addr, mask))``, checked as on the wire."""
        fields = []
        for name, value in values.items():
            if isinstance(value, tuple):
                fields.append(MatchField(name, value[0], value[1]))
            else:
                fields.append(MatchField(name, value))
        return check_fields(fields)

    def get(self, name: str) -> MatchField | None:
        for item in self.fields:
            if item.name == name:
                return item
        return None

    def as_dict(self) -> dict[str, tuple[int, int | None]]:
        return {item.name: (item.value, item.mask) for item in self.fields}

    def covers(self, other: Match) -> bool:
        """Whether every packet ``other`` matches is matched by this (non-strict delete and
        modify select flows this way, 6.4)."""
        theirs = other.as_dict()
        for item in self.fields:
            spec = BY_NAME[item.name]
            full = (1 << (8 * spec.size)) - 1
            mine_mask = full if item.mask is None else item.mask
            if item.name not in theirs:
                return False
            their_value, their_mask = theirs[item.name]
            their_mask = full if their_mask is None else their_mask
            # Ours must be no more specific than theirs, and agree on the bits we fix.
            if mine_mask & ~their_mask:
                return False
            if (item.value ^ their_value) & mine_mask:
                return False
        return True


def check_fields(fields: list[MatchField]) -> Match:
    """Normalize and check a list of fields (used by the parser and by ``Match.of``)."""
    seen: dict[str, MatchField] = {}
    if len(fields) > MAX_FIELDS:
        raise _bad(BadMatch.BAD_LEN, f"at most {MAX_FIELDS} fields")
    for item in fields:
        spec = BY_NAME.get(item.name)
        if spec is None:
            raise _bad(BadMatch.BAD_FIELD, f"unsupported field {item.name!r}")
        if item.name in seen:
            raise _bad(BadMatch.DUP_FIELD, f"{item.name} appears twice")
        full = (1 << (8 * spec.size)) - 1
        if not 0 <= item.value <= full:
            raise _bad(BadMatch.BAD_VALUE, f"{item.name} value out of range")
        mask = item.mask
        if mask is not None:
            if not spec.maskable:
                raise _bad(BadMatch.BAD_MASK, f"{item.name} takes no mask in OpenFlow 1.3")
            if not 0 <= mask <= full:
                raise _bad(BadMatch.BAD_MASK, f"{item.name} mask out of range")
            if item.value & ~mask:
                raise _bad(BadMatch.BAD_WILDCARDS, f"{item.name} has value bits outside its mask")
            if mask == 0:
                continue  # matches anything: the same as leaving the field out
            if mask == full:
                mask = None
        seen[item.name] = MatchField(item.name, item.value, mask)
    for name in seen:
        prerequisite = _PREREQUISITES.get(name)
        if prerequisite is None:
            continue
        required, value = prerequisite
        have = seen.get(required)
        if have is None or have.mask is not None or have.value != value:
            raise _bad(BadMatch.BAD_PREREQ, f"{name} needs {required}={value:#x}")
    return Match(tuple(sorted(seen.values(), key=lambda f: _ORDER[f.name])))


def parse_match(reader: Reader) -> Match:
    """Read an ``ofp_match`` and its padding from ``reader``."""
    match_type, length = reader.unpack(_MATCH_HEADER, "match header")
    if match_type != OFPMT_OXM:
        raise _bad(BadMatch.BAD_TYPE, f"match type {match_type} (only OXM, 1, exists in 1.3)")
    if length < _MATCH_HEADER.size:
        raise _bad(BadMatch.BAD_LEN, f"match length {length} is shorter than its header")
    body = reader.sub(length - _MATCH_HEADER.size, "match", ErrorType.BAD_MATCH, BadMatch.BAD_LEN)
    reader.skip(pad8(length), "match padding")
    fields: list[MatchField] = []
    while body.remaining:
        oxm_class, field_mask, payload_len = body.unpack(_OXM_HEADER, "OXM header")
        payload = body.sub(payload_len, "OXM payload", ErrorType.BAD_MATCH, BadMatch.BAD_LEN)
        if oxm_class != OFPXMC_OPENFLOW_BASIC:
            raise _bad(BadMatch.BAD_FIELD, f"OXM class {oxm_class:#06x} is not supported")
        number, has_mask = field_mask >> 1, field_mask & 1
        spec = BY_NUMBER.get(number)
        if spec is None:
            raise _bad(BadMatch.BAD_FIELD, f"OXM field {number} is not supported")
        if payload_len != spec.size * (2 if has_mask else 1):
            raise _bad(BadMatch.BAD_LEN, f"{spec.name}: payload of {payload_len} bytes")
        value = int.from_bytes(payload.take(spec.size, spec.name), "big")
        mask = int.from_bytes(payload.take(spec.size, spec.name), "big") if has_mask else None
        if len(fields) >= MAX_FIELDS:
            raise _bad(BadMatch.BAD_LEN, f"at most {MAX_FIELDS} fields")
        fields.append(MatchField(spec.name, value, mask))
    return check_fields(fields)


def emit_match(match: Match) -> bytes:
    tlvs = bytearray()
    for item in match.fields:
        spec = BY_NAME[item.name]
        has_mask = item.mask is not None
        tlvs += _OXM_HEADER.pack(
            OFPXMC_OPENFLOW_BASIC, spec.number << 1 | has_mask, spec.size * (2 if has_mask else 1)
        )
        tlvs += item.value.to_bytes(spec.size, "big")
        if item.mask is not None:
            tlvs += item.mask.to_bytes(spec.size, "big")
    length = _MATCH_HEADER.size + len(tlvs)
    return _MATCH_HEADER.pack(OFPMT_OXM, length) + bytes(tlvs) + bytes(pad8(length))
