"""OpenFlow 1.3 numbers: message types, error types and codes, reserved ports, flags.

The values are those of the OpenFlow Switch Specification 1.3.x (ONF TS-006 and its
errata), section 7 ("The OpenFlow Protocol"); each group names the subsection it comes from.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

OFP_VERSION: Final = 0x04  # wire protocol version of OpenFlow 1.3
OFP_HEADER_LEN: Final = 8
OFP_MAX_LEN: Final = 0xFFFF  # the header's length field is a u16
OFP_NO_BUFFER: Final = 0xFFFFFFFF
OFPTT_ALL: Final = 0xFF  # "all tables" in flow deletes and stats requests
OFPG_ANY: Final = 0xFFFFFFFF
OFPM_ALL: Final = 0xFFFFFFFF  # "all meters" in meter stats and deletes
OFPM_MAX: Final = 0xFFFF0000  # last usable meter id
OFPCML_MAX: Final = 0xFFE5  # largest max_len an output to the controller may ask for
OFPCML_NO_BUFFER: Final = 0xFFFF
OFP_DEFAULT_MISS_SEND_LEN: Final = 128
ERROR_DATA_LEN: Final = 64  # 7.4.4: at least 64 bytes of the failed request go back


class MsgType(IntEnum):
    """7.1: ``ofp_type``."""

    HELLO = 0
    ERROR = 1
    ECHO_REQUEST = 2
    ECHO_REPLY = 3
    EXPERIMENTER = 4
    FEATURES_REQUEST = 5
    FEATURES_REPLY = 6
    GET_CONFIG_REQUEST = 7
    GET_CONFIG_REPLY = 8
    SET_CONFIG = 9
    PACKET_IN = 10
    FLOW_REMOVED = 11
    PORT_STATUS = 12
    PACKET_OUT = 13
    FLOW_MOD = 14
    GROUP_MOD = 15
    PORT_MOD = 16
    TABLE_MOD = 17
    MULTIPART_REQUEST = 18
    MULTIPART_REPLY = 19
    BARRIER_REQUEST = 20
    BARRIER_REPLY = 21
    QUEUE_GET_CONFIG_REQUEST = 22
    QUEUE_GET_CONFIG_REPLY = 23
    ROLE_REQUEST = 24
    ROLE_REPLY = 25
    GET_ASYNC_REQUEST = 26
    GET_ASYNC_REPLY = 27
    SET_ASYNC = 28
    METER_MOD = 29


class ErrorType(IntEnum):
    """7.4.4: ``ofp_error_type``."""

    HELLO_FAILED = 0
    BAD_REQUEST = 1
    BAD_ACTION = 2
    BAD_INSTRUCTION = 3
    BAD_MATCH = 4
    FLOW_MOD_FAILED = 5
    GROUP_MOD_FAILED = 6
    PORT_MOD_FAILED = 7
    TABLE_MOD_FAILED = 8
    QUEUE_OP_FAILED = 9
    SWITCH_CONFIG_FAILED = 10
    ROLE_REQUEST_FAILED = 11
    METER_MOD_FAILED = 12
    TABLE_FEATURES_FAILED = 13
    EXPERIMENTER = 0xFFFF


class HelloFailed(IntEnum):
    INCOMPATIBLE = 0
    EPERM = 1


class BadRequest(IntEnum):
    BAD_VERSION = 0
    BAD_TYPE = 1
    BAD_MULTIPART = 2
    BAD_EXPERIMENTER = 3
    BAD_EXP_TYPE = 4
    EPERM = 5
    BAD_LEN = 6
    BUFFER_EMPTY = 7
    BUFFER_UNKNOWN = 8
    BAD_TABLE_ID = 9
    IS_SLAVE = 10
    BAD_PORT = 11
    BAD_PACKET = 12
    MULTIPART_BUFFER_OVERFLOW = 13


class BadAction(IntEnum):
    BAD_TYPE = 0
    BAD_LEN = 1
    BAD_EXPERIMENTER = 2
    BAD_EXP_TYPE = 3
    BAD_OUT_PORT = 4
    BAD_ARGUMENT = 5
    EPERM = 6
    TOO_MANY = 7
    BAD_QUEUE = 8
    BAD_OUT_GROUP = 9
    MATCH_INCONSISTENT = 10
    UNSUPPORTED_ORDER = 11
    BAD_TAG = 12
    BAD_SET_TYPE = 13
    BAD_SET_LEN = 14
    BAD_SET_ARGUMENT = 15


class BadInstruction(IntEnum):
    UNKNOWN_INST = 0
    UNSUP_INST = 1
    BAD_TABLE_ID = 2
    UNSUP_METADATA = 3
    UNSUP_METADATA_MASK = 4
    BAD_EXPERIMENTER = 5
    BAD_EXP_TYPE = 6
    BAD_LEN = 7
    EPERM = 8


class BadMatch(IntEnum):
    BAD_TYPE = 0
    BAD_LEN = 1
    BAD_TAG = 2
    BAD_DL_ADDR_MASK = 3
    BAD_NW_ADDR_MASK = 4
    BAD_WILDCARDS = 5
    BAD_FIELD = 6
    BAD_VALUE = 7
    BAD_MASK = 8
    BAD_PREREQ = 9
    DUP_FIELD = 10
    EPERM = 11


class FlowModFailed(IntEnum):
    UNKNOWN = 0
    TABLE_FULL = 1
    BAD_TABLE_ID = 2
    OVERLAP = 3
    EPERM = 4
    BAD_TIMEOUT = 5
    BAD_COMMAND = 6
    BAD_FLAGS = 7


class SwitchConfigFailed(IntEnum):
    BAD_FLAGS = 0
    BAD_LEN = 1
    EPERM = 2


class MeterModFailed(IntEnum):
    UNKNOWN = 0
    METER_EXISTS = 1
    INVALID_METER = 2
    UNKNOWN_METER = 3
    BAD_COMMAND = 4
    BAD_FLAGS = 5
    BAD_RATE = 6
    BAD_BURST = 7
    BAD_BAND = 8
    BAD_BAND_VALUE = 9
    OUT_OF_METERS = 10
    OUT_OF_BANDS = 11


class Port(IntEnum):
    """7.2.1: reserved port numbers (``ofp_port_no``)."""

    MAX = 0xFFFFFF00
    IN_PORT = 0xFFFFFFF8
    TABLE = 0xFFFFFFF9
    NORMAL = 0xFFFFFFFA
    FLOOD = 0xFFFFFFFB
    ALL = 0xFFFFFFFC
    CONTROLLER = 0xFFFFFFFD
    LOCAL = 0xFFFFFFFE
    ANY = 0xFFFFFFFF


class FlowModCommand(IntEnum):
    ADD = 0
    MODIFY = 1
    MODIFY_STRICT = 2
    DELETE = 3
    DELETE_STRICT = 4


class FlowModFlags(IntEnum):
    SEND_FLOW_REM = 1 << 0
    CHECK_OVERLAP = 1 << 1
    RESET_COUNTS = 1 << 2
    NO_PKT_COUNTS = 1 << 3
    NO_BYT_COUNTS = 1 << 4


FLOW_MOD_FLAGS_ALL: Final = 0x1F


class Capabilities(IntEnum):
    """7.3.1: ``ofp_capabilities``."""

    FLOW_STATS = 1 << 0
    TABLE_STATS = 1 << 1
    PORT_STATS = 1 << 2
    GROUP_STATS = 1 << 3
    IP_REASM = 1 << 5
    QUEUE_STATS = 1 << 6
    PORT_BLOCKED = 1 << 8


class ConfigFlags(IntEnum):
    """7.3.2: ``ofp_config_flags`` (fragment handling)."""

    FRAG_NORMAL = 0
    FRAG_DROP = 1
    FRAG_REASM = 2
    FRAG_MASK = 3


class MultipartType(IntEnum):
    """7.3.5: ``ofp_multipart_type``."""

    DESC = 0
    FLOW = 1
    AGGREGATE = 2
    TABLE = 3
    PORT_STATS = 4
    QUEUE = 5
    GROUP = 6
    GROUP_DESC = 7
    GROUP_FEATURES = 8
    METER = 9
    METER_CONFIG = 10
    METER_FEATURES = 11
    TABLE_FEATURES = 12
    PORT_DESC = 13
    EXPERIMENTER = 0xFFFF


MULTIPART_MORE: Final = 1  # OFPMPF_REQ_MORE / OFPMPF_REPLY_MORE


class InstructionType(IntEnum):
    """7.2.4: ``ofp_instruction_type``."""

    GOTO_TABLE = 1
    WRITE_METADATA = 2
    WRITE_ACTIONS = 3
    APPLY_ACTIONS = 4
    CLEAR_ACTIONS = 5
    METER = 6
    EXPERIMENTER = 0xFFFF


class ActionType(IntEnum):
    """7.2.5: ``ofp_action_type``."""

    OUTPUT = 0
    COPY_TTL_OUT = 11
    COPY_TTL_IN = 12
    SET_MPLS_TTL = 15
    DEC_MPLS_TTL = 16
    PUSH_VLAN = 17
    POP_VLAN = 18
    PUSH_MPLS = 19
    POP_MPLS = 20
    SET_QUEUE = 21
    GROUP = 22
    SET_NW_TTL = 23
    DEC_NW_TTL = 24
    SET_FIELD = 25
    PUSH_PBB = 26
    POP_PBB = 27
    EXPERIMENTER = 0xFFFF


class PacketInReason(IntEnum):
    NO_MATCH = 0
    ACTION = 1
    INVALID_TTL = 2


class FlowRemovedReason(IntEnum):
    IDLE_TIMEOUT = 0
    HARD_TIMEOUT = 1
    DELETE = 2
    GROUP_DELETE = 3  # (METER_DELETE, 4, is OpenFlow 1.4)


class PortReason(IntEnum):
    ADD = 0
    DELETE = 1
    MODIFY = 2


class PortState(IntEnum):
    LINK_DOWN = 1 << 0
    BLOCKED = 1 << 1
    LIVE = 1 << 2


class PortFeatures(IntEnum):
    """7.2.1: ``ofp_port_features`` (the ones we report)."""

    F_10GB_FD = 1 << 6
    F_COPPER = 1 << 11


class MeterModCommand(IntEnum):
    ADD = 0
    MODIFY = 1
    DELETE = 2


class MeterFlags(IntEnum):
    KBPS = 1 << 0
    PKTPS = 1 << 1
    BURST = 1 << 2
    STATS = 1 << 3


class MeterBandType(IntEnum):
    DROP = 1
    DSCP_REMARK = 2
    EXPERIMENTER = 0xFFFF


class HelloElemType(IntEnum):
    VERSIONBITMAP = 1
