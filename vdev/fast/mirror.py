"""The Python half of the compiled VNIC data path: mirror the model into C, run a burst,
fold the results back into the model.

What is mirrored, and when:

* the exact receive and transmit filters (hash tables) and the function slots: rebuilt when
  the filter table or the set of functions changed (a cheap fingerprint, checked per burst);
* each function's DMA table, rings, MAC and limiter state: refreshed per burst. The C side
  holds raw pointers into the driver's memory and the register page only for the length of
  one burst: they are taken with ``ffi.from_buffer`` and released before the burst returns,
  so a DMA_UNMAP (which runs between bursts, in the same thread) never races with C and
  the owners' ``mmap.close``/``memoryview.release`` never find an export left behind.

The model's private ring ``cons`` is copied into C before a burst and back after it, so the
Python ring and the C ring agree at every point where Python code runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vdev.fast import load_module
from vdev.vnic.backend import TapBackend
from vdev.vnic.filters import ETHERTYPE_IPV4, FilterTable

if TYPE_CHECKING:
    from vdev.vnic.device import VnicDevice
    from vdev.vnic.function import VnicFunction

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_WHY = {  # vfast.h VF_WHY_*: why a frame or descriptor went to the Python model
    "rx_long": 0,
    "rx_not_l4": 1,
    "rx_no_filter": 2,
    "rx_slow_function": 3,
    "rx_no_buffer": 4,
    "rx_bad_buffer": 5,
    "tx_length": 8,
    "tx_iommu": 9,
    "tx_mac": 10,
    "tx_not_l4": 11,
    "tx_no_filter": 12,
}
_NO_FUNCTION = _U32  # an exact transmit filter of a function the device does not hold


def _hash_key(proto: int, ip: int, port: int) -> int:
    """The C side's ``hash_key`` (vfast.c), bit for bit."""
    h = (((ip << 24) ^ (port << 8) ^ proto) * 0x9E3779B97F4A7C15) & _U64
    return h >> 32


class FastPath:
    """One device's compiled data path. ``rx_budget`` and ``tx_budget`` bound a burst."""

    def __init__(self, rx_budget: int, tx_budget: int) -> None:
        module = load_module()
        self._module_name: str = module.__name__
        self.ffi: Any = module.ffi
        self.lib: Any = module.lib
        ffi, lib = self.ffi, self.lib
        self.rx_budget = rx_budget
        self.tx_budget = tx_budget
        self._dev: Any = ffi.new("vf_dev *")
        self._fns: Any = ffi.new("vf_fn[]", lib.VF_MAX_FNS)
        self._dev.fns = self._fns
        self._rx_arena: Any = ffi.new("uint8_t[]", rx_budget * lib.VF_RX_SLOT)
        self._rx_arena_size = rx_budget * lib.VF_RX_SLOT
        self._rx_lens: Any = ffi.new("uint32_t[]", rx_budget)
        self._tx_out: Any = ffi.new("uint8_t[]", tx_budget * lib.VF_ARENA_SLOT)
        self._tx_out_size = tx_budget * lib.VF_ARENA_SLOT
        self._tx_lens: Any = ffi.new("uint32_t[]", tx_budget)
        self._tx_sent: Any = ffi.new("uint8_t[]", tx_budget)
        self._keep: list[Any] = []  # C tables and arrays the vf_dev points at
        self._fingerprint: tuple[object, ...] | None = None
        self._functions: list[VnicFunction] = []
        self._slot: dict[int, int] = {}  # function id -> slot
        self._filter_ids: list[int] = []  # filter slot -> filter id
        self._held: list[Any] = []  # buffers exported for the current burst
        # slot -> (the function's RSS object, its generation) last copied into C: the key
        # and table are copied only when the model accepted a new setting.
        self._rss_loaded: dict[int, tuple[int, int]] = {}
        self.rx_fast_frames = 0  # frames C delivered (for tests and the bench)
        self.tx_fast_frames = 0

    # ---- configuration mirror -------------------------------------------------------

    def _sync_config(self, device: VnicDevice) -> None:
        filters = device.filters
        # Every add takes a new id and every remove shrinks the rule dict, so together they
        # change on any change of the filter table (FilterTable has no version counter).
        fingerprint = (filters._next_id, len(filters._rules), tuple(map(id, device.functions.values())))
        if fingerprint == self._fingerprint:
            return
        functions = list(device.functions.values())[: self.lib.VF_MAX_FNS]
        self._functions = functions
        self._rss_loaded = {}
        self._slot = {function.function_id: slot for slot, function in enumerate(functions)}
        self._build_tables(filters)
        self._dev.nfns = len(functions)
        self._fingerprint = fingerprint

    def _build_tables(self, filters: FilterTable) -> None:
        ffi = self.ffi
        rx = [(key, rule) for key, rule in filters._rx_exact.items() if key[0] == ETHERTYPE_IPV4]
        tx = [(key, rule) for key, rule in filters._tx_exact.items() if key[0] == ETHERTYPE_IPV4]
        self._filter_ids = [rule.filter_id for _key, rule in rx] + [rule.filter_id for _key, rule in tx]
        nfilters = max(1, len(self._filter_ids))
        packets = ffi.new("uint64_t[]", nfilters)
        nbytes = ffi.new("uint64_t[]", nfilters)
        touched = ffi.new("uint32_t[]", nfilters)
        rx_table, rx_mask = self._hash_table(
            [(key, self._slot.get(rule.function_id, _NO_FUNCTION), rule.queue, index) for index, (key, rule) in enumerate(rx)]
        )
        tx_table, tx_mask = self._hash_table(
            [(key, self._slot.get(rule.function_id, _NO_FUNCTION), 0, len(rx) + index) for index, (key, rule) in enumerate(tx)]
        )
        dev = self._dev
        dev.rx, dev.rx_mask, dev.tx, dev.tx_mask = rx_table, rx_mask, tx_table, tx_mask
        dev.filter_packets, dev.filter_bytes, dev.touched_filters = packets, nbytes, touched
        dev.nfilters = len(self._filter_ids)
        dev.ntouched = 0
        self._keep = [rx_table, tx_table, packets, nbytes, touched]

    def _hash_table(self, entries: list[tuple[tuple[int, int, bytes, int], int, int, int]]) -> tuple[Any, int]:
        size = 16
        while size < 2 * len(entries):  # at most half full: every probe ends at a hole
            size *= 2
        table = self.ffi.new("vf_entry[]", size)
        mask = size - 1
        for (_ethertype, proto, ip, port), slot, queue, filter_slot in entries:
            ip_word = int.from_bytes(ip, "little")  # as C's memcpy reads it on x86-64
            index = _hash_key(proto, ip_word, port) & mask
            while table[index].used:
                index = (index + 1) & mask
            entry = table[index]
            entry.used, entry.key_ip, entry.key_port, entry.key_proto = 1, ip_word, port, proto
            entry.fn, entry.queue, entry.filter = slot, queue, filter_slot
        return table, mask

    # ---- per-burst state ------------------------------------------------------------------

    def _export(self, buffer: object) -> Any:
        pointer = self.ffi.from_buffer("uint8_t[]", buffer)
        self._held.append(pointer)
        return pointer

    def _release(self) -> None:
        release = self.ffi.release
        for pointer in self._held:
            release(pointer)
        self._held.clear()

    def _load_function(self, slot: int, function: VnicFunction, rx: bool, tx_queue: int) -> None:
        """Point C at ``function``'s DMA table and rings for this burst."""
        ffi = self.ffi
        fn = self._fns[slot]
        mappings = function.dma_table._mappings
        count = 0
        for mapping in mappings[: self.lib.VF_MAX_MAPS]:
            entry = fn.maps[count]
            entry.iova, entry.size = mapping.iova, mapping.size
            entry.base = self._export(mapping.memory)
            entry.readable, entry.writable = int(mapping.readable), int(mapping.writable)
            count += 1
        fn.nmaps = count  # a mapping past VF_MAX_MAPS is missed: C falls back, Python decides
        fn.nqueues = min(function.num_queues, self.lib.VF_MAX_QUEUES)
        fn.mac = function.config.mac
        rss = function.rss
        if self._rss_loaded.get(slot) != (id(rss), rss.generation):
            self._rss_loaded[slot] = (id(rss), rss.generation)
            fn.rss_on = int(rss.enabled)
            if rss.enabled:
                fn.rss_mask = rss.mask
                ffi.memmove(fn.rss_key, rss.key, len(rss.key))
                ffi.memmove(fn.rss_table, rss.table, len(rss.table))
        fn.rx_fast = int(function.rx_limit is None)
        fn.tx_fast = int(function.tx_limit is None)
        fn.touched = 0
        page = self._export(function.regs.page)
        u32 = ffi.cast("uint32_t *", page)
        rings = function.rx_rings if rx else function.tx_rings
        c_rings = fn.rx if rx else fn.tx
        for queue in range(fn.nqueues):
            if not rx and queue != tx_queue:
                continue
            c_ring = c_rings[queue]
            ring = rings[queue]
            if ring is None:
                c_ring.size = 0
                c_ring.descs = ffi.NULL
                continue
            c_ring.descs = self._export(ring.descs)
            c_ring.prod_reg = u32 + ring._prod_at
            c_ring.cons_reg = u32 + ring._cons_at
            c_ring.size = ring.size
            c_ring.cons = ring.cons

    def _store_back(self, device: VnicDevice, slot: int, function: VnicFunction, rx: bool, tx_queue: int = -1) -> None:
        fn = self._fns[slot]
        rings = function.rx_rings if rx else function.tx_rings
        c_rings = fn.rx if rx else fn.tx
        for queue in range(fn.nqueues):
            if not rx and queue != tx_queue:
                # A TX burst loads one ring: the other C rings still hold an earlier
                # burst's cons, which must not move the model's rings back.
                continue
            ring = rings[queue]
            if ring is not None and c_rings[queue].size:
                ring.cons = c_rings[queue].cons
        if fn.touched:
            device._irq_pending.add(function)
        counters = function.counters
        filter_counters = device.filters._function_counters(function.function_id)
        if fn.rx_packets:
            counters.rx_packets += fn.rx_packets
            counters.rx_bytes += fn.rx_bytes
            filter_counters.rx_packets += fn.rx_packets
            filter_counters.rx_bytes += fn.rx_bytes
            fn.rx_packets = fn.rx_bytes = 0
        if fn.tx_packets:
            counters.tx_packets += fn.tx_packets
            counters.tx_bytes += fn.tx_bytes
            filter_counters.tx_packets += fn.tx_packets
            filter_counters.tx_bytes += fn.tx_bytes
            fn.tx_packets = fn.tx_bytes = 0

    def _drain_device(self, device: VnicDevice) -> None:
        dev = self._dev
        counters = device.counters
        if dev.wire_rx_packets:
            counters.wire_rx_packets += dev.wire_rx_packets
            counters.wire_rx_bytes += dev.wire_rx_bytes
            counters.delivered += dev.delivered
            self.rx_fast_frames += dev.delivered
            dev.wire_rx_packets = dev.wire_rx_bytes = dev.delivered = 0
        if dev.wire_tx_packets or dev.wire_tx_dropped:
            counters.wire_tx_packets += dev.wire_tx_packets
            counters.wire_tx_bytes += dev.wire_tx_bytes
            counters.wire_tx_dropped += dev.wire_tx_dropped
            dev.wire_tx_packets = dev.wire_tx_bytes = dev.wire_tx_dropped = 0
        rules = device.filters._rules
        for index in range(dev.ntouched):
            filter_slot = dev.touched_filters[index]
            rule = rules.get(self._filter_ids[filter_slot])
            if rule is not None:
                rule.packets += dev.filter_packets[filter_slot]
                rule.bytes += dev.filter_bytes[filter_slot]
            dev.filter_packets[filter_slot] = 0
            dev.filter_bytes[filter_slot] = 0
        dev.ntouched = 0

    # ---- receive ----------------------------------------------------------------------------

    def receive_from_wire(self, device: VnicDevice, queue: int, now: float) -> int:
        """The compiled RX burst of ``VnicDevice.receive_from_wire``; frames C cannot handle
        go, one at a time and in order, through the Python model."""
        lib = self.lib
        backend = device.backend
        lens = self._rx_lens
        frames: list[bytes] | None = None
        if isinstance(backend, TapBackend):
            fds = backend.fds()
            if not 0 <= queue < len(fds):
                return 0
            count = lib.vf_read_burst(fds[queue], self._rx_arena, self._rx_arena_size, lens, self.rx_budget)
        else:
            # A backend without fds (a fake wire in tests): copy its frames into the arena.
            frames = backend.receive(queue, self.rx_budget)[: self.rx_budget]
            slot_size = lib.VF_RX_SLOT
            arena = self.ffi.buffer(self._rx_arena)
            for index, frame in enumerate(frames):
                length = min(len(frame), slot_size)
                arena[index * slot_size : index * slot_size + length] = frame[:length]
                lens[index] = len(frame)
            count = len(frames)
        if count <= 0:
            return 0
        start = 0
        while start < count:
            self._sync_config(device)
            functions = self._functions
            try:
                for slot, function in enumerate(functions):
                    self._load_function(slot, function, True, -1)
                stop = lib.vf_rx_steer(self._dev, self._rx_arena, self._rx_arena_size, lens, start, count)
                for slot, function in enumerate(functions):
                    self._store_back(device, slot, function, True)
            finally:
                self._release()
            self._drain_device(device)
            if stop >= count:
                break
            # The reference handles this frame (ARP, the default function, a full or
            # broken ring, a fault, a limiter...), then C goes on with the next one.
            if frames is not None:
                frame = frames[stop]
            else:
                offset = stop * lib.VF_RX_SLOT
                frame = bytes(self.ffi.buffer(self._rx_arena + offset, lens[stop]))
            device.receive_from_wire(queue, now, [frame])
            start = stop + 1
        return count

    # ---- transmit ---------------------------------------------------------------------------

    def transmit(self, device: VnicDevice, function: VnicFunction, queue: int, budget: int) -> int:
        """Complete up to ``budget`` fast-case descriptors of TX ring ``queue`` of ``function``
        and put their frames on the wire; returns how many. The Python model goes on from
        the first descriptor this leaves."""
        ring = function.tx_rings[queue]
        if ring is None or function.tx_limit is not None or budget <= 0:
            return 0
        if ring.pending() <= 0:
            return 0
        self._sync_config(device)
        slot = self._slot.get(function.function_id)
        if slot is None:
            return 0
        backend = device.backend
        fd = -1
        if isinstance(backend, TapBackend):
            fds = backend.fds()
            if fds:
                fd = fds[0]  # TapBackend.send puts every frame on queue 0
        budget = min(budget, self.tx_budget)
        total = 0
        dev = self._dev
        # The driver posts while the device works: when C found the ring empty (rather
        # than stopping at a descriptor for the model) and budget is left, look again, so
        # frames posted meanwhile go out here and not through the slower model.
        while total < budget:
            dev.handed_back = 0
            try:
                self._load_function(slot, function, False, queue)
                done = self.lib.vf_tx_burst(
                    dev, slot, queue, budget - total, self._tx_out, self._tx_out_size, self._tx_lens, self._tx_sent, fd
                )
                self._store_back(device, slot, function, False, queue)
            finally:
                self._release()
            if done and fd < 0:
                out = self.ffi.buffer(self._tx_out)
                slot_size = self.lib.VF_ARENA_SLOT
                for index in range(done):
                    device.send_to_wire(out[index * slot_size : index * slot_size + self._tx_lens[index]])
            self._drain_device(device)
            total += done
            if done == 0 or dev.handed_back or ring.pending() <= 0:
                break
        self.tx_fast_frames += total
        return int(total)

    def stats(self) -> dict[str, object]:
        """For the device's snapshot: which build runs and how much it carried."""
        why = self._dev.why
        return {
            "module": self._module_name,
            "rx_frames": self.rx_fast_frames,
            "tx_frames": self.tx_fast_frames,
            "to_model": {name: int(why[index]) for name, index in _WHY.items() if why[index]},
        }


def make_fast_path(rx_budget: int, tx_budget: int) -> FastPath | None:
    """The compiled path, or None when ARRAKIS_PURE=1 asks for the pure-Python one.

    A missing build is an error rather than a silent fallback: a device host that should be
    fast must not quietly run slow (run ``python -m vdev.fast.build``)."""
    from vdev.fast import pure_requested

    if pure_requested():
        return None
    return FastPath(rx_budget, tx_budget)
