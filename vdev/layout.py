"""The hardware ABI of the virtual devices, defined once.

Both sides import this module: the device models in ``vdev`` and the drivers in the
libOS. Nothing here does I/O; it only names offsets, sizes and values.

A function exposes one PCI BAR (region 0) of two pages:

* the **register page** (offset 0, 4 KiB), which the driver maps with ``mmap`` through the
  vfio-user sparse-mmap capability; both sides read and write it directly;
* the **doorbell page** (offset 4 KiB, 4 KiB), which is *not* mappable: the driver reaches it
  only with a vfio-user REGION_WRITE message, so a doorbell write is a trapped access that
  wakes the device host. The driver rings it only when the device has said, in the register
  page, that it is asleep (AF_XDP ``need_wakeup``, virtio event suppression); while the
  device polls, posting work costs the driver no system call at all.

Descriptor rings and packet buffers live in the *driver's* memory (a memfd it registers
with DMA_MAP); descriptors carry I/O virtual addresses (IOVAs) that the device translates
through its DMA table, the IOMMU of this model.

Register page, global block (offsets in bytes)::

    off   size  field            written by  meaning
    0x00  u32   magic            device      MAGIC_VNIC or MAGIC_VSIC
    0x04  u32   abi_version      device      ABI_VERSION
    0x08  u32   num_queues       device      queue pairs (VNIC) or request queues (VSIC)
    0x0c  u32   max_ring_size    device      largest ring (a power of two)
    0x10  u32   max_frame        device      largest frame (VNIC) / block size (VSIC)
    0x14  u32   function_id      device      the function's number in its device
    0x18  u8[6] mac              device      the function's MAC address
    0x20  u32   ipv4             device      granted IPv4 address, network order
    0x24  u32   status           device      STATUS_* bits
    0x28  u64   iommu_faults     device      descriptors refused by the DMA check
    0x30  u64   capacity_blocks  device      VSIC: size of the VSA in blocks

VNIC receive-side scaling block (see ``vdev.vnic.rss``)::

    off   size    field           written by  meaning
    0x40  u32     rss_control     driver      RSS_ENABLE: spread TCP/UDP flows over the queues
    0x44  u32     rss_table_size  driver      entries of rss_table in use: a power of two,
                                              1..RSS_TABLE_MAX
    0x48  u32     rss_state       device      RSS_STATE_*: what the device made of the block
    0x4c  u32     rss_refusals    device      how many settings the device refused
    0x50  u8[40]  rss_key         driver      the Toeplitz secret key (Microsoft RSS)
    0x80  u8[128] rss_table       driver      indirection table: a queue number per entry

The device reads the whole block once, when it looks at the ring enable bits (on a wake-up,
so a doorbell makes it look), and acts on its own checked copy; a table entry that names no
queue of the function, a bad table size or an unknown control bit refuses the whole setting
(RSS_STATE_REFUSED: every frame goes to its filter's queue, as with RSS off).

Ring block ``RING_BASE + RING_STRIDE * ring_index``; the VNIC has rings RX0, TX0, RX1,
TX1, ... (``ring_index = 2 * queue + direction``); the VSIC has request queue q at index q::

    off   size  field            written by  meaning
    0x00  u64   ring_iova        driver      where the descriptor array is (IOVA)
    0x08  u32   ring_size        driver      entries, a power of two <= max_ring_size
    0x0c  u32   enable           driver      1: the device may use the ring
    0x10  u32   prod             driver      descriptors posted (free-running counter)
    0x14  u32   cons             device      descriptors completed (free-running counter)
    0x18  u32   device_asleep    device      1: the device will not look at prod until rung
    0x1c  u32   irq_wanted       driver      1: the driver sleeps; raise the ring's IRQ
    0x20  u32   error            device      RING_ERR_*: nonzero stops the ring
    0x24  u32   reserved
    0x28  u64   error_completions device     descriptors completed with a nonzero status

The device reads ``ring_iova`` and ``ring_size`` once, when it picks up ``enable``, and
works from its own copy from then on (which memory a DMA_UNMAP takes the ring from
included): rewriting them changes nothing until the ring is disabled and enabled again.

The counters ``prod`` and ``cons`` only move forward (modulo 2**32, as in netmap and
virtio). Descriptors in ``[cons, prod)`` belong to the device, the rest to the driver.
A ``prod`` more than ``ring_size`` ahead of ``cons`` is a driver bug: the device sets
``error`` to RING_ERR_INDEX and stops that ring only.

Each descriptor is read once, into the device's private memory, and validated there; a
driver that rewrites a descriptor after posting it changes nothing the device will act on.
"""

from __future__ import annotations

import struct
from typing import Final

ABI_VERSION: Final = 1
MAGIC_VNIC: Final = 0x4E585241  # "ARXN" read as little-endian bytes
MAGIC_VSIC: Final = 0x53585241  # "ARXS"

PAGE_SIZE: Final = 4096
REGISTER_PAGE_OFFSET: Final = 0
DOORBELL_PAGE_OFFSET: Final = PAGE_SIZE
BAR0_SIZE: Final = 2 * PAGE_SIZE
BAR0_INDEX: Final = 0

# --- global block -----------------------------------------------------------------
REG_MAGIC: Final = 0x00
REG_ABI_VERSION: Final = 0x04
REG_NUM_QUEUES: Final = 0x08
REG_MAX_RING_SIZE: Final = 0x0C
REG_MAX_FRAME: Final = 0x10
REG_FUNCTION_ID: Final = 0x14
REG_MAC: Final = 0x18
REG_IPV4: Final = 0x20
REG_STATUS: Final = 0x24
REG_IOMMU_FAULTS: Final = 0x28
REG_CAPACITY_BLOCKS: Final = 0x30

STATUS_ENABLED: Final = 0x1
STATUS_FAULT: Final = 0x2  # the device stopped this function (see the rings' error)

# --- receive-side scaling (VNIC) --------------------------------------------------
REG_RSS_CONTROL: Final = 0x40
REG_RSS_TABLE_SIZE: Final = 0x44
REG_RSS_STATE: Final = 0x48
REG_RSS_REFUSALS: Final = 0x4C
REG_RSS_KEY: Final = 0x50
REG_RSS_TABLE: Final = 0x80
RSS_KEY_SIZE: Final = 40
RSS_TABLE_MAX: Final = 128
RSS_BLOCK_END: Final = REG_RSS_TABLE + RSS_TABLE_MAX  # == RING_BASE: the block fits below it

RSS_ENABLE: Final = 0x1
RSS_KNOWN_CONTROL: Final = RSS_ENABLE

RSS_STATE_OFF: Final = 0
RSS_STATE_ON: Final = 1
RSS_STATE_REFUSED: Final = 2

# --- ring blocks ------------------------------------------------------------------
RING_BASE: Final = 0x100
RING_STRIDE: Final = 0x40
MAX_RINGS: Final = (PAGE_SIZE - RING_BASE) // RING_STRIDE  # 60

RING_IOVA: Final = 0x00
RING_SIZE: Final = 0x08
RING_ENABLE: Final = 0x0C
RING_PROD: Final = 0x10
RING_CONS: Final = 0x14
RING_DEVICE_ASLEEP: Final = 0x18
RING_IRQ_WANTED: Final = 0x1C
RING_ERROR: Final = 0x20
RING_ERROR_COMPLETIONS: Final = 0x28

RING_ERR_NONE: Final = 0
RING_ERR_INDEX: Final = 1  # prod ran more than ring_size ahead of cons
RING_ERR_SETUP: Final = 2  # ring_iova/ring_size do not describe a mapped ring
RING_ERR_UNMAPPED: Final = 3  # the memory under the ring was unmapped

MIN_RING_SIZE: Final = 8
MAX_RING_SIZE: Final = 4096

# Doorbell page: one u32 per ring; the value written is the driver's new prod (it is a
# hint, the device always reads prod from the register page).
DOORBELL_STRIDE: Final = 4


def ring_reg(ring_index: int, field: int) -> int:
    """Offset in the register page of ``field`` of ring ``ring_index``."""
    return RING_BASE + RING_STRIDE * ring_index + field


def doorbell_offset(ring_index: int) -> int:
    """Offset in BAR0 of the doorbell of ring ``ring_index`` (inside the doorbell page)."""
    return DOORBELL_PAGE_OFFSET + DOORBELL_STRIDE * ring_index


# --- VNIC descriptors -------------------------------------------------------------
# One layout for RX and TX (16 bytes):
#
#   off size field     written by        meaning
#   0   u64  iova      driver            buffer address (IOVA)
#   8   u16  length    driver / device   TX: frame length; RX: buffer size, then frame length
#   10  u16  flags     driver            0 (reserved)
#   12  u16  status    device            DESC_* completion status
#   14  u16  reserved
VNIC_DESC: Final = struct.Struct("<QHHHH")
VNIC_DESC_SIZE: Final = VNIC_DESC.size
VNIC_DESC_LENGTH_OFFSET: Final = 8
VNIC_DESC_STATUS_OFFSET: Final = 12

RX: Final = 0
TX: Final = 1

VNIC_MAX_FRAME: Final = 1514  # Ethernet header + 1500-byte MTU, no FCS
VNIC_BUFFER_SIZE: Final = 2048

DESC_OK: Final = 0
DESC_IOMMU_FAULT: Final = 1  # the buffer is not inside the function's DMA map
DESC_BAD_LENGTH: Final = 2  # zero, too long, or larger than the buffer
DESC_TX_FILTERED: Final = 3  # the frame's source fields were not granted (anti-spoofing)
DESC_IO_ERROR: Final = 4  # VSIC: the backing store failed
DESC_OUT_OF_RANGE: Final = 5  # VSIC: block range outside the VSA
DESC_BAD_OPCODE: Final = 6  # VSIC: unknown operation
DESC_MISALIGNED: Final = 7  # VSIC: buffer not aligned for direct I/O

DESC_STATUS_NAMES: Final = {
    DESC_OK: "ok",
    DESC_IOMMU_FAULT: "iommu-fault",
    DESC_BAD_LENGTH: "bad-length",
    DESC_TX_FILTERED: "tx-filtered",
    DESC_IO_ERROR: "io-error",
    DESC_OUT_OF_RANGE: "out-of-range",
    DESC_BAD_OPCODE: "bad-opcode",
    DESC_MISALIGNED: "misaligned",
}


def vnic_ring_index(queue: int, direction: int) -> int:
    return 2 * queue + direction


# --- interrupts -------------------------------------------------------------------
# The device raises MSI-X vector q (one per queue pair or request queue) by writing the
# eventfd the driver registered with SET_IRQS; only when that ring's irq_wanted is set.
IRQ_INDEX_MSIX: Final = 2


# --- VSIC: the virtual storage controller -------------------------------------------
# A VSIC function serves one virtual storage area (VSA): ``capacity_blocks`` blocks of
# VSIC_BLOCK_SIZE bytes, numbered from 0, that the device maps onto extents of its image.
# In the register page, ``num_queues`` is the number of request queues (request queue q
# is ring q), ``max_frame`` is the block size, ``capacity_blocks`` the VSA's size, and
# STATUS_READ_ONLY in ``status`` says that writes will be refused.
#
# Each request queue is ONE ring: the completion is written back into the slot of its
# request (as the VNIC does), so there is no separate response ring to size or overflow,
# and a driver that never reaps simply finds its ring full. The device completes the
# requests of one ring in order; ``cons`` says how many are complete. Request descriptor
# (32 bytes):
#
#   off size field        written by  meaning
#   0   u8   opcode       driver      VSIC_OP_*
#   1   u8   flags        driver      VSIC_FLAG_* (unknown bits: DESC_BAD_OPCODE)
#   2   u16  status       device      DESC_* completion status (valid once cons passed it)
#   4   u32  tag          driver      opaque; the device writes back the tag it acted on
#   8   u64  vsa_block    driver      first block, in VSA blocks (read, write)
#   16  u32  block_count  driver      1..VSIC_MAX_REQUEST_BLOCKS (read, write)
#   20  u32  reserved     driver      0
#   24  u64  buffer_iova  driver      VSIC_BLOCK_SIZE-aligned buffer of block_count blocks
#
# A flush ignores vsa_block, block_count and buffer_iova: it makes every write completed
# before it durable (NVMe Flush). VSIC_FLAG_FUA on a write makes that write durable before
# its completion (NVMe/SCSI force unit access); on a read or a flush it is refused.
# Statuses used: DESC_OK, DESC_IOMMU_FAULT (buffer not inside one DMA mapping with the
# needed permission), DESC_BAD_LENGTH (block_count 0 or too large), DESC_OUT_OF_RANGE,
# DESC_BAD_OPCODE, DESC_MISALIGNED (buffer_iova not block aligned: O_DIRECT would refuse
# it), DESC_IO_ERROR, and DESC_READ_ONLY (a write to a read-only VSA).
VSIC_DESC: Final = struct.Struct("<BBHIQIIQ")
VSIC_DESC_SIZE: Final = VSIC_DESC.size
VSIC_DESC_STATUS_OFFSET: Final = 2
# status and tag, written back by the device at VSIC_DESC_STATUS_OFFSET
VSIC_COMPLETION: Final = struct.Struct("<HI")

VSIC_BLOCK_SIZE: Final = 4096
VSIC_MAX_REQUEST_BLOCKS: Final = 256  # 1 MiB: bounds the device's work per request

VSIC_OP_READ: Final = 1
VSIC_OP_WRITE: Final = 2
VSIC_OP_FLUSH: Final = 3
VSIC_OP_NAMES: Final = {VSIC_OP_READ: "read", VSIC_OP_WRITE: "write", VSIC_OP_FLUSH: "flush"}

VSIC_FLAG_FUA: Final = 0x01
VSIC_KNOWN_FLAGS: Final = VSIC_FLAG_FUA

DESC_READ_ONLY: Final = 8  # VSIC: a write to a read-only VSA
VSIC_STATUS_NAMES: Final = {**DESC_STATUS_NAMES, DESC_READ_ONLY: "read-only"}

STATUS_READ_ONLY: Final = 0x4  # VSIC: the VSA refuses writes
RING_ERR_DEVICE: Final = 4  # the device failed internally on this ring (a device bug)
