"""Actions (7.2.5) and instructions (7.2.4) of OpenFlow 1.3.

Both are TLV lists: type (u16), length (u16, the whole TLV, a multiple of 8), body. An
instruction's length must cover its fixed part and stay inside the flow entry; an action
list inside an instruction must fill it exactly. Each violation is the specification's
error (``OFPET_BAD_INSTRUCTION``/``OFPBIC_BAD_LEN``, ``OFPET_BAD_ACTION``/``OFPBAC_BAD_LEN``,
unknown types ``OFPBIC_UNKNOWN_INST`` / ``OFPBAC_BAD_TYPE``).

The codec knows the actions this switch can carry out (output, set_queue) and the
instructions a controller uses to say what it wants (apply-actions, write-actions,
clear-actions, meter, goto-table); whether the switch accepts a combination is the model's
question (``kernelctl.openflow.switch``), not the codec's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from kernelctl.openflow.constants import (
    ActionType,
    BadAction,
    BadInstruction,
    ErrorType,
    InstructionType,
)
from kernelctl.openflow.wire import OFPError, Reader

_TLV: Final = struct.Struct("!HH")
_OUTPUT: Final = struct.Struct("!HHIH6x")  # type, len, port, max_len, pad (16 bytes)
_SET_QUEUE: Final = struct.Struct("!HHI")  # type, len, queue_id (8 bytes)
_ACTIONS_INSTRUCTION: Final = struct.Struct("!HH4x")  # type, len, pad, then actions
_GOTO_TABLE: Final = struct.Struct("!HHB3x")
_METER: Final = struct.Struct("!HHI")
_CLEAR: Final = struct.Struct("!HH4x")
MAX_ACTIONS: Final = 32  # per list: bounds the work one flow entry can ask of the switch
MAX_INSTRUCTIONS: Final = 8


@dataclass(frozen=True, slots=True)
class Output:
    port: int
    max_len: int = 0


@dataclass(frozen=True, slots=True)
class SetQueue:
    queue_id: int


Action = Output | SetQueue


@dataclass(frozen=True, slots=True)
class ApplyActions:
    actions: tuple[Action, ...]


@dataclass(frozen=True, slots=True)
class WriteActions:
    actions: tuple[Action, ...]


@dataclass(frozen=True, slots=True)
class ClearActions:
    pass


@dataclass(frozen=True, slots=True)
class GotoTable:
    table_id: int


@dataclass(frozen=True, slots=True)
class Meter:
    meter_id: int


Instruction = ApplyActions | WriteActions | ClearActions | GotoTable | Meter


def _bad_action(code: BadAction, why: str) -> OFPError:
    return OFPError(ErrorType.BAD_ACTION, code, why)


def _bad_instruction(code: BadInstruction, why: str) -> OFPError:
    return OFPError(ErrorType.BAD_INSTRUCTION, code, why)


def parse_actions(reader: Reader) -> tuple[Action, ...]:
    """Every action in ``reader`` (which must end exactly at the list's end)."""
    actions: list[Action] = []
    while reader.remaining:
        start = reader.pos
        reader.error_type, reader.error_code = ErrorType.BAD_ACTION, BadAction.BAD_LEN
        action_type, length = reader.unpack(_TLV, "action header")
        if length < 8 or length % 8:
            raise _bad_action(BadAction.BAD_LEN, f"action length {length} (a multiple of 8, at least 8)")
        reader.pos = start
        body = reader.sub(length, "action", ErrorType.BAD_ACTION, BadAction.BAD_LEN)
        if len(actions) >= MAX_ACTIONS:
            raise _bad_action(BadAction.TOO_MANY, f"at most {MAX_ACTIONS} actions in a list")
        if action_type == ActionType.OUTPUT:
            if length != _OUTPUT.size:
                raise _bad_action(BadAction.BAD_LEN, f"output action of {length} bytes")
            _t, _l, port, max_len = body.unpack(_OUTPUT, "output action")
            actions.append(Output(port, max_len))
        elif action_type == ActionType.SET_QUEUE:
            if length != _SET_QUEUE.size:
                raise _bad_action(BadAction.BAD_LEN, f"set_queue action of {length} bytes")
            _t, _l, queue_id = body.unpack(_SET_QUEUE, "set_queue action")
            actions.append(SetQueue(queue_id))
        elif action_type == ActionType.EXPERIMENTER:
            raise _bad_action(BadAction.BAD_EXPERIMENTER, "no experimenter actions are supported")
        else:
            raise _bad_action(BadAction.BAD_TYPE, f"action type {action_type} is not supported")
    return tuple(actions)


def emit_actions(actions: tuple[Action, ...]) -> bytes:
    out = bytearray()
    for action in actions:
        if isinstance(action, Output):
            out += _OUTPUT.pack(ActionType.OUTPUT, _OUTPUT.size, action.port, action.max_len)
        else:
            out += _SET_QUEUE.pack(ActionType.SET_QUEUE, _SET_QUEUE.size, action.queue_id)
    return bytes(out)


def parse_instructions(reader: Reader) -> tuple[Instruction, ...]:
    instructions: list[Instruction] = []
    while reader.remaining:
        start = reader.pos
        reader.error_type, reader.error_code = ErrorType.BAD_INSTRUCTION, BadInstruction.BAD_LEN
        kind, length = reader.unpack(_TLV, "instruction header")
        if length < 8 or length % 8:
            raise _bad_instruction(BadInstruction.BAD_LEN, f"instruction length {length}")
        reader.pos = start
        body = reader.sub(length, "instruction", ErrorType.BAD_INSTRUCTION, BadInstruction.BAD_LEN)
        if len(instructions) >= MAX_INSTRUCTIONS:
            raise _bad_instruction(BadInstruction.BAD_LEN, f"at most {MAX_INSTRUCTIONS} instructions")
        if kind in (InstructionType.APPLY_ACTIONS, InstructionType.WRITE_ACTIONS):
            body.unpack(_ACTIONS_INSTRUCTION, "actions instruction")
            actions = parse_actions(body)
            instructions.append(
                ApplyActions(actions) if kind == InstructionType.APPLY_ACTIONS else WriteActions(actions)
            )
        elif kind == InstructionType.CLEAR_ACTIONS:
            if length != _CLEAR.size:
                raise _bad_instruction(BadInstruction.BAD_LEN, f"clear-actions of {length} bytes")
            instructions.append(ClearActions())
        elif kind == InstructionType.GOTO_TABLE:
            if length != _GOTO_TABLE.size:
                raise _bad_instruction(BadInstruction.BAD_LEN, f"goto-table of {length} bytes")
            _k, _l, table_id = body.unpack(_GOTO_TABLE, "goto-table")
            instructions.append(GotoTable(table_id))
        elif kind == InstructionType.METER:
            if length != _METER.size:
                raise _bad_instruction(BadInstruction.BAD_LEN, f"meter instruction of {length} bytes")
            _k, _l, meter_id = body.unpack(_METER, "meter instruction")
            instructions.append(Meter(meter_id))
        elif kind == InstructionType.WRITE_METADATA:
            raise _bad_instruction(BadInstruction.UNSUP_INST, "write-metadata is not supported")
        elif kind == InstructionType.EXPERIMENTER:
            raise _bad_instruction(BadInstruction.BAD_EXPERIMENTER, "no experimenter instructions")
        else:
            raise _bad_instruction(BadInstruction.UNKNOWN_INST, f"instruction type {kind}")
    return tuple(instructions)


def emit_instructions(instructions: tuple[Instruction, ...]) -> bytes:
    out = bytearray()
    for item in instructions:
        if isinstance(item, (ApplyActions, WriteActions)):
            body = emit_actions(item.actions)
            kind = InstructionType.APPLY_ACTIONS if isinstance(item, ApplyActions) else InstructionType.WRITE_ACTIONS
            out += _ACTIONS_INSTRUCTION.pack(kind, _ACTIONS_INSTRUCTION.size + len(body)) + body
        elif isinstance(item, ClearActions):
            out += _CLEAR.pack(InstructionType.CLEAR_ACTIONS, _CLEAR.size)
        elif isinstance(item, GotoTable):
            out += _GOTO_TABLE.pack(InstructionType.GOTO_TABLE, _GOTO_TABLE.size, item.table_id)
        else:
            out += _METER.pack(InstructionType.METER, _METER.size, item.meter_id)
    return bytes(out)
