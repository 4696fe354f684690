/* The VSIC's compiled request check. See vsic.h and vdev/fast/vsic_mirror.py.
 *
 * The order of the checks, and so which error a request with several faults gets, is
 * VsicFunction._check's; tests/test_vsic_fast_diff.py holds both to the same answers.
 * Rules kept here: a descriptor is copied out of shared memory once (volatile byte loads)
 * and only the copy is judged; no sum of two driver values is formed before it is known
 * not to wrap; every index into the mirrored tables is checked against its length; and
 * anything the mirror cannot describe goes back to the Python model (VS_FALLBACK).
 */
#include <stdint.h>
#include <string.h>

#include "vsic.h"

typedef struct {
    uint8_t opcode, flags;
    uint32_t tag;
    uint64_t vsa_block;
    uint32_t block_count;
    uint64_t iova;
} vs_desc;

static void fetch(const uint8_t *descs, uint32_t slot, vs_desc *d)
{
    /* The driver may rewrite the slot while we read it: copy it once, then decode the copy,
     * so every check and the runs all see the same values. */
    const volatile uint8_t *p = descs + (size_t)slot * VS_DESC_SIZE;
    uint8_t copy[VS_DESC_SIZE];
    for (int i = 0; i < VS_DESC_SIZE; i++)
        copy[i] = p[i];
    d->opcode = copy[0];
    d->flags = copy[1];
    memcpy(&d->tag, copy + 4, 4);         /* little-endian host, as the ring is */
    memcpy(&d->vsa_block, copy + 8, 8);
    memcpy(&d->block_count, copy + 16, 4);
    memcpy(&d->iova, copy + 24, 8);
}

/* The index of the mapping that holds [iova, iova + len) with the access, or -1 (an IOMMU
 * fault): DmaTable.translate. len > 0. */
static int64_t find_map(const vs_fn *fn, uint64_t iova, uint64_t len, int device_writes)
{
    /* The last mapping starting at or below iova (bisect_right - 1): maps are sorted and
     * disjoint, so no other one can hold iova. */
    uint32_t lo = 0, hi = fn->nmaps;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (fn->maps[mid].iova <= iova)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -1;
    const vs_map *m = &fn->maps[lo - 1];
    uint64_t off = iova - m->iova;   /* m->iova <= iova: no wrap */
    /* off < size and len <= size - off: the range ends inside the mapping, with no sum. */
    if (off >= m->size || len > m->size - off)
        return -1;
    if (device_writes ? !m->writable : !m->readable)
        return -1;
    return (int64_t)(lo - 1);
}

/* The extent holding VSA block b < capacity: the last with vsa_start <= b. */
static uint32_t find_extent(const vs_fn *fn, uint64_t b)
{
    uint32_t lo = 0, hi = fn->nextents;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (fn->extents[mid].vsa_start <= b)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo == 0 ? 0 : lo - 1;
}

/* _check for one descriptor: the status, and for a read or write that passed, the mapping. */
static uint32_t check(const vs_fn *fn, const vs_desc *d, int64_t *map)
{
    *map = -1;
    if (d->flags & ~VS_KNOWN_FLAGS)
        return VS_BAD_OPCODE;
    int device_writes;
    if (d->opcode == VS_OP_FLUSH)
        return d->flags ? VS_BAD_OPCODE : VS_OK;
    if (d->opcode == VS_OP_READ) {
        if (d->flags)
            return VS_BAD_OPCODE;   /* FUA is for writes */
        device_writes = 1;          /* a read from the VSA is a device write into the buffer */
    } else if (d->opcode == VS_OP_WRITE) {
        if (fn->read_only)
            return VS_READ_ONLY;
        device_writes = 0;
    } else {
        return VS_BAD_OPCODE;
    }
    if (d->block_count < 1 || d->block_count > VS_MAX_REQUEST_BLOCKS)
        return VS_BAD_LENGTH;
    /* VirtualStorageArea.in_range: count <= capacity and block <= capacity - count, never
     * block + count, which wraps past 2**64 for a hostile block. */
    if (d->block_count > fn->capacity || d->vsa_block > fn->capacity - d->block_count)
        return VS_OUT_OF_RANGE;
    if (d->iova & (VS_BLOCK_SIZE - 1))
        return VS_MISALIGNED;
    uint64_t nbytes = (uint64_t)d->block_count * VS_BLOCK_SIZE;   /* <= 1 MiB */
    *map = find_map(fn, d->iova, nbytes, device_writes);
    return *map < 0 ? VS_IOMMU_FAULT : VS_OK;
}

static int overlaps(uint64_t a, uint64_t a_len, uint64_t b, uint64_t b_len)
{
    /* [a, a + a_len) and [b, b + b_len) share a byte; written with differences only, since
     * a range may end at 2**64 exactly. */
    if (a_len == 0 || b_len == 0)
        return 0;
    return a >= b ? a - b < b_len : b - a < a_len;
}

uint32_t vs_check_batch(const vs_fn *fn, const uint8_t *descs, uint64_t descs_len, uint32_t ring_size,
                        uint64_t ring_iova, uint32_t first, uint32_t count, vs_req *out, vs_run *runs,
                        uint32_t max_runs, uint32_t *runs_used)
{
    if (runs_used == NULL)
        return 0;
    *runs_used = 0;
    if (fn == NULL || descs == NULL || out == NULL || runs == NULL)
        return 0;
    /* A ring the Python model would not have opened: let it decide. */
    if (ring_size == 0 || (ring_size & (ring_size - 1)) || (uint64_t)ring_size * VS_DESC_SIZE > descs_len)
        return 0;
    if (count > ring_size)
        count = ring_size;   /* the caller's pending is at most the ring size: distinct slots */
    uint64_t ring_bytes = (uint64_t)ring_size * VS_DESC_SIZE;
    uint32_t used = 0;       /* runs filled */
    uint32_t n;
    for (n = 0; n < count; n++) {
        vs_desc d;
        fetch(descs, (first + n) & (ring_size - 1), &d);
        vs_req *r = &out[n];
        r->opcode_flags = (uint64_t)d.opcode | ((uint64_t)d.flags << 8);
        r->tag = d.tag;
        r->vsa_block = d.vsa_block;
        r->block_count = d.block_count;
        r->buffer_iova = d.iova;
        r->runs = 0;
        int64_t map;
        uint32_t status = check(fn, &d, &map);
        r->status = status;
        r->map = map < 0 ? 0 : (uint64_t)map;
        if (status != VS_OK || d.opcode == VS_OP_FLUSH)
            continue;
        /* A read or write that passed: translate. It needs at most one run per block and one
         * per extent from the first one on. */
        uint32_t index = find_extent(fn, d.vsa_block);
        uint64_t need = d.block_count;
        if (need > (uint64_t)(fn->nextents - index))
            need = fn->nextents - index;
        if (need > (uint64_t)(max_runs - used)) {
            if (used > 0)
                break;                 /* Python acts on n results and calls again */
            r->status = VS_FALLBACK;   /* cannot fit even alone: the model translates it */
            continue;
        }
        uint64_t map_off = d.iova - fn->maps[map].iova;
        uint64_t position = d.vsa_block, left = d.block_count, done = 0;
        uint32_t start = used;
        while (left) {
            if (index >= fn->nextents)
                break;                 /* the extents end before the range: a bad mirror */
            const vs_extent *e = &fn->extents[index];
            if (position < e->vsa_start || position - e->vsa_start >= e->count)
                break;                 /* not the extent holding position: a bad mirror */
            uint64_t into = position - e->vsa_start;
            uint64_t take = e->count - into < left ? e->count - into : left;
            vs_run *run = &runs[used++];
            run->physical = e->physical + into;
            run->count = take;
            run->offset = map_off + done * VS_BLOCK_SIZE;
            position += take;
            done += take;
            left -= take;
            index++;
        }
        if (left) {
            used = start;
            r->status = VS_FALLBACK;
            continue;
        }
        r->runs = (uint64_t)start | ((uint64_t)(used - start) << 32);
        /* A read whose buffer covers descriptors: the model would fetch the next descriptors
         * after this read rewrote them, so stop here and read them afresh next call. */
        if (d.opcode == VS_OP_READ && overlaps(d.iova, done * VS_BLOCK_SIZE, ring_iova, ring_bytes)) {
            n++;
            break;
        }
    }
    *runs_used = used;
    return n;
}
