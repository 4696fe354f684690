/* The VNIC device's compiled data path. See vfast.h and vdev/fast/__init__.py.
 *
 * Rules kept here: every index and length is checked before use; a descriptor is read
 * from shared memory once (volatile loads into locals) and only the locals are acted on;
 * the driver's prod is loaded once per burst with acquire ordering and cons is published
 * with release ordering after the write-backs. Anything unusual returns to Python.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "vfast.h"

#define ETH_HLEN 14
#define ETHERTYPE_IPV4 0x0800
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17

static inline uint32_t rd16be(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }

static inline uint32_t hash_key(uint32_t proto, uint32_t ip, uint32_t port)
{
    uint64_t h = ((uint64_t)ip << 24) ^ ((uint64_t)port << 8) ^ proto;
    h *= 0x9E3779B97F4A7C15ULL;
    return (uint32_t)(h >> 32);
}

static const vf_entry *lookup(const vf_entry *table, uint32_t mask, uint32_t proto,
                              uint32_t ip, uint32_t port)
{
    if (table == NULL)
        return NULL;
    uint32_t i = hash_key(proto, ip, port) & mask;
    /* The Python side keeps the table at most half full, so a probe ends at an empty
     * slot; the bound is a second guard. */
    for (uint32_t n = 0; n <= mask; n++, i = (i + 1) & mask) {
        const vf_entry *e = &table[i];
        if (!e->used)
            return NULL;
        if (e->key_ip == ip && e->key_port == port && e->key_proto == proto)
            return e;
    }
    return NULL;
}

/* The IPv4 transport key of a frame (protocol, address at addr_off, port at port_index
 * 0: source, 1: destination), as the Python classifier reads it. 0 if the frame is not a
 * well-formed first fragment of TCP or UDP. */
static int transport_key(const uint8_t *f, uint32_t len, int source, uint32_t *proto,
                         uint32_t *ip, uint32_t *port)
{
    if (len < 34)
        return 0;
    if (rd16be(f + 12) != ETHERTYPE_IPV4)
        return 0;
    uint32_t vihl = f[14];
    uint32_t hlen = (vihl & 0x0F) * 4;
    uint32_t total = rd16be(f + 16);
    if ((vihl >> 4) != 4 || hlen < 20 || total < hlen || ETH_HLEN + total > len)
        return 0;
    uint32_t p = f[23];
    if (p != IPPROTO_TCP_ && p != IPPROTO_UDP_)
        return 0;
    if (rd16be(f + 20) & 0x1FFF)
        return 0;
    if (total < hlen + 4)
        return 0;
    const uint8_t *l4 = f + ETH_HLEN + hlen; /* hlen + 4 <= total <= len - 14: in bounds */
    uint32_t addr;
    memcpy(&addr, f + (source ? 26 : 30), 4);
    *proto = p;
    *ip = addr;
    *port = rd16be(l4 + (source ? 0 : 2));
    return 1;
}

/* The RSS input of an unfragmented IPv4 TCP/UDP frame (source address, destination
 * address, source port, destination port, as on the wire); 0 if the frame is not one. The
 * checks are flow_tuple's in vdev/vnic/rss.py, so both paths spread the same frames. */
static int rss_tuple(const uint8_t *f, uint32_t len, uint8_t out[12])
{
    if (len < 34 || rd16be(f + 12) != ETHERTYPE_IPV4)
        return 0;
    uint32_t vihl = f[14];
    uint32_t hlen = (vihl & 0x0F) * 4;
    uint32_t total = rd16be(f + 16);
    if ((vihl >> 4) != 4 || hlen < 20 || total < hlen + 4 || ETH_HLEN + total > len)
        return 0;
    if (f[23] != IPPROTO_TCP_ && f[23] != IPPROTO_UDP_)
        return 0;
    if (rd16be(f + 20) & 0x3FFF) /* more fragments, or an offset */
        return 0;
    memcpy(out, f + 26, 8);                    /* both addresses */
    memcpy(out + 8, f + ETH_HLEN + hlen, 4);   /* both ports: hlen + 4 <= total <= len - 14 */
    return 1;
}

uint32_t vf_toeplitz(const uint8_t *key, const uint8_t *input)
{
    /* For each set input bit, left to right, XOR in the 32 key bits starting at its
     * position: window holds them, and takes the next key bit after every input bit.
     * 12 input bytes use key bytes 0..15 of the 40. */
    uint32_t window = ((uint32_t)key[0] << 24) | ((uint32_t)key[1] << 16) | ((uint32_t)key[2] << 8) | key[3];
    uint32_t result = 0;
    for (uint32_t i = 0; i < 12; i++) {
        uint32_t next = key[i + 4];
        for (uint32_t bit = 0; bit < 8; bit++) {
            if (input[i] & (0x80u >> bit))
                result ^= window;
            window = (window << 1) | ((next >> (7 - bit)) & 1u);
        }
    }
    return result;
}

/* The host address of [iova, iova + len) if one mapping holds it with the access. */
static uint8_t *translate(const vf_fn *fn, uint64_t iova, uint32_t len, int write)
{
    if (len == 0 || fn->nmaps > VF_MAX_MAPS)
        return NULL;
    for (uint32_t i = 0; i < fn->nmaps; i++) {
        const vf_map *m = &fn->maps[i];
        if (iova < m->iova)
            continue;
        uint64_t off = iova - m->iova;
        /* off < size and len <= size - off: no overflow in either comparison. */
        if (off >= m->size || (uint64_t)len > m->size - off)
            continue;
        if (write ? !m->writable : !m->readable)
            return NULL;
        return m->base + off;
    }
    return NULL;
}

typedef struct {
    uint64_t iova;
    uint16_t length, flags, status, reserved;
} desc_t;

static void fetch_desc(const vf_ring *r, uint32_t index, desc_t *d)
{
    const volatile uint8_t *p = r->descs + (size_t)(index & (r->size - 1)) * VF_DESC_SIZE;
    uint8_t copy[VF_DESC_SIZE];
    for (int i = 0; i < VF_DESC_SIZE; i++)
        copy[i] = p[i];
    memcpy(&d->iova, copy, 8);
    memcpy(&d->length, copy + 8, 2);
    memcpy(&d->flags, copy + 10, 2);
    memcpy(&d->status, copy + 12, 2);
    memcpy(&d->reserved, copy + 14, 2);
}

static void write_back(const vf_ring *r, uint32_t index, uint16_t length, uint16_t status)
{
    uint8_t *p = r->descs + (size_t)(index & (r->size - 1)) * VF_DESC_SIZE + 8;
    uint16_t values[3] = {length, 0, status};
    memcpy(p, values, sizeof values);
}

static void count_filter(vf_dev *dev, uint32_t slot, uint32_t len)
{
    /* slot < nfilters was checked by the caller; touched_filters has nfilters entries and
     * each slot enters it once per drain (when its count leaves 0). */
    if (dev->filter_packets[slot] == 0 && dev->ntouched < dev->nfilters)
        dev->touched_filters[dev->ntouched++] = slot;
    dev->filter_packets[slot]++;
    dev->filter_bytes[slot] += len;
}

static uint32_t why(vf_dev *dev, unsigned reason, uint32_t index)
{
    if (reason < sizeof dev->why / sizeof dev->why[0])
        dev->why[reason]++;
    dev->handed_back = 1;
    return index;
}

static int ring_ok(const vf_ring *r)
{
    return r->descs != NULL && r->prod_reg != NULL && r->cons_reg != NULL && r->size >= 8
           && (r->size & (r->size - 1)) == 0;
}

int vf_read_burst(int fd, uint8_t *arena, uint32_t arena_size, uint32_t *lens, uint32_t max)
{
    uint32_t n = 0;
    while (n < max && (uint64_t)(n + 1) * VF_RX_SLOT <= arena_size) {
        ssize_t got = read(fd, arena + (size_t)n * VF_RX_SLOT, VF_RX_SLOT);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        lens[n++] = (uint32_t)got;
    }
    return (int)n;
}

uint32_t vf_rx_steer(vf_dev *dev, const uint8_t *arena, uint32_t arena_size, const uint32_t *lens,
                     uint32_t start, uint32_t count)
{
    uint32_t i;
    for (i = start; i < count; i++) {
        uint32_t len = lens[i];
        if ((uint64_t)(i + 1) * VF_RX_SLOT > arena_size)
            return i; /* the caller's count is past its arena: stop, never read past it */
        if (len > VF_MAX_FRAME)
            return why(dev, VF_WHY_RX_LONG, i); /* longer than the fast case: Python decides */
        const uint8_t *f = arena + (size_t)i * VF_RX_SLOT;
        uint32_t proto, ip, port;
        if (!transport_key(f, len, 0, &proto, &ip, &port))
            return why(dev, VF_WHY_RX_NOT_L4, i);
        const vf_entry *e = lookup(dev->rx, dev->rx_mask, proto, ip, port);
        if (e == NULL || e->fn >= dev->nfns || e->filter >= dev->nfilters)
            return why(dev, VF_WHY_RX_NO_FILTER, i);
        vf_fn *fn = &dev->fns[e->fn];
        if (!fn->rx_fast || e->queue >= fn->nqueues || e->queue >= VF_MAX_QUEUES)
            return why(dev, VF_WHY_RX_SLOW_FUNCTION, i);
        uint32_t queue = e->queue;
        uint8_t tuple[12];
        if (fn->rss_on && rss_tuple(f, len, tuple)) {
            uint32_t slot = vf_toeplitz(fn->rss_key, tuple) & fn->rss_mask & (VF_RSS_TABLE_MAX - 1);
            queue = fn->rss_table[slot];
            if (queue >= fn->nqueues || queue >= VF_MAX_QUEUES)
                return why(dev, VF_WHY_RX_SLOW_FUNCTION, i); /* the model refuses such tables */
        }
        vf_ring *r = &fn->rx[queue];
        if (!ring_ok(r))
            return why(dev, VF_WHY_RX_NO_BUFFER, i);
        uint32_t prod = __atomic_load_n(r->prod_reg, __ATOMIC_ACQUIRE);
        uint32_t pending = prod - r->cons;
        if (pending == 0 || pending > r->size)
            return why(dev, VF_WHY_RX_NO_BUFFER, i); /* the Python model counts it */
        desc_t d;
        fetch_desc(r, r->cons, &d);
        if (len > d.length)
            return why(dev, VF_WHY_RX_BAD_BUFFER, i);
        uint8_t *dst = translate(fn, d.iova, len, 1);
        if (dst == NULL)
            return why(dev, VF_WHY_RX_BAD_BUFFER, i);
        memcpy(dst, f, len);
        write_back(r, r->cons, (uint16_t)len, 0);
        r->cons += 1;
        __atomic_store_n(r->cons_reg, r->cons, __ATOMIC_RELEASE);
        fn->rx_packets++;
        fn->rx_bytes += len;
        fn->touched = 1;
        count_filter(dev, e->filter, len);
        dev->wire_rx_packets++;
        dev->wire_rx_bytes += len;
        dev->delivered++;
    }
    return i;
}

uint32_t vf_tx_burst(vf_dev *dev, uint32_t fnum, uint32_t queue, uint32_t budget,
                     uint8_t *out, uint32_t out_size, uint32_t *out_lens, uint8_t *sent, int fd)
{
    if (fnum >= dev->nfns)
        return 0;
    vf_fn *fn = &dev->fns[fnum];
    if (!fn->tx_fast || queue >= fn->nqueues || queue >= VF_MAX_QUEUES)
        return 0;
    vf_ring *r = &fn->tx[queue];
    if (!ring_ok(r))
        return 0;
    uint32_t prod = __atomic_load_n(r->prod_reg, __ATOMIC_ACQUIRE);
    uint32_t pending = prod - r->cons;
    if (pending > r->size)
        return 0; /* the Python model fails the ring */
    if (budget > pending)
        budget = pending;
    uint32_t done = 0;
    while (done < budget && (uint64_t)(done + 1) * VF_ARENA_SLOT <= out_size) {
        desc_t d;
        fetch_desc(r, r->cons, &d);
        uint32_t len = d.length;
        if (len < ETH_HLEN || len > VF_MAX_FRAME) {
            why(dev, VF_WHY_TX_LENGTH, 0);
            break;
        }
        const uint8_t *src = translate(fn, d.iova, len, 0);
        if (src == NULL) {
            why(dev, VF_WHY_TX_IOMMU, 0);
            break;
        }
        /* Copy first, then check: the filter judges the bytes that go on the wire. */
        uint8_t *frame = out + (size_t)done * VF_ARENA_SLOT;
        memcpy(frame, src, len);
        if (memcmp(frame + 6, fn->mac, 6) != 0) {
            why(dev, VF_WHY_TX_MAC, 0);
            break;
        }
        uint32_t proto, ip, port;
        if (!transport_key(frame, len, 1, &proto, &ip, &port)) {
            why(dev, VF_WHY_TX_NOT_L4, 0);
            break;
        }
        const vf_entry *e = lookup(dev->tx, dev->tx_mask, proto, ip, port);
        if (e == NULL || e->fn != fnum || e->filter >= dev->nfilters) {
            why(dev, VF_WHY_TX_NO_FILTER, 0);
            break;
        }
        write_back(r, r->cons, (uint16_t)len, 0);
        r->cons += 1;
        out_lens[done] = len;
        count_filter(dev, e->filter, len);
        fn->tx_packets++;
        fn->tx_bytes += len;
        done++;
    }
    if (done == 0)
        return 0;
    __atomic_store_n(r->cons_reg, r->cons, __ATOMIC_RELEASE);
    fn->touched = 1;
    if (fd >= 0) {
        for (uint32_t k = 0; k < done; k++) {
            ssize_t put;
            do {
                put = write(fd, out + (size_t)k * VF_ARENA_SLOT, out_lens[k]);
            } while (put < 0 && errno == EINTR);
            sent[k] = put >= 0;
            if (put >= 0) {
                dev->wire_tx_packets++;
                dev->wire_tx_bytes += out_lens[k];
            } else {
                dev->wire_tx_dropped++;
            }
        }
    }
    return done;
}
