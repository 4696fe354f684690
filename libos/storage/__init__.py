"""The libOS storage library: the Caladan persistent log on a block device."""

from libos.storage.blockdev import (
    BlockDevice,
    BlockDeviceError,
    DeviceOp,
    FileBlockDevice,
    MemoryBlockDevice,
    SimulatedCrash,
)
from libos.storage.log import (
    LogClosed,
    LogCorruption,
    LogError,
    LogFailed,
    LogFull,
    PersistentLog,
    RecordTooLarge,
    RecoveryReport,
)

__all__ = [
    "BlockDevice",
    "BlockDeviceError",
    "DeviceOp",
    "FileBlockDevice",
    "LogClosed",
    "LogCorruption",
    "LogError",
    "LogFailed",
    "LogFull",
    "MemoryBlockDevice",
    "PersistentLog",
    "RecordTooLarge",
    "RecoveryReport",
    "SimulatedCrash",
]
