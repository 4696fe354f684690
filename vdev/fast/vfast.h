/* The VNIC device's compiled data path: shared declarations (also fed to cffi's cdef).
 *
 * Everything the C code touches is described by these structures, filled by the Python
 * side (vdev/fast/mirror.py) from the Python model before each burst. The Python model
 * stays the reference: C handles only the fast cases and hands everything else back.
 */
#define VF_MAX_MAPS 64
#define VF_MAX_QUEUES 30
#define VF_MAX_FNS 64
#define VF_DESC_SIZE 16
#define VF_MAX_FRAME 1514
#define VF_ARENA_SLOT 2048   /* one transmitted frame */
#define VF_RX_SLOT 65536     /* one received frame: what the tap backend reads at most */
#define VF_RSS_KEY_SIZE 40   /* layout.RSS_KEY_SIZE */
#define VF_RSS_TABLE_MAX 128 /* layout.RSS_TABLE_MAX */

typedef struct {
    uint64_t iova;
    uint64_t size;
    uint8_t *base;        /* host address of the mapping's first byte */
    uint32_t readable;
    uint32_t writable;
} vf_map;

typedef struct {
    uint8_t *descs;       /* size * VF_DESC_SIZE bytes, inside one DMA mapping */
    uint32_t *prod_reg;   /* in the register page: driver-written */
    uint32_t *cons_reg;   /* device-written */
    uint32_t size;        /* a power of two; 0: no ring (fall back) */
    uint32_t cons;        /* the device's private cons, in and out */
} vf_ring;

typedef struct {
    vf_map maps[VF_MAX_MAPS];
    uint32_t nmaps;
    uint32_t rx_fast;     /* 0: the receive limiter is on, frames go to Python */
    uint32_t tx_fast;     /* 0: the transmit limiter is on */
    uint32_t nqueues;
    uint8_t mac[6];
    uint8_t pad[2];
    vf_ring rx[VF_MAX_QUEUES];
    vf_ring tx[VF_MAX_QUEUES];
    /* receive-side scaling: the model's checked copy (vdev/vnic/rss.py), not the registers */
    uint32_t rss_on;      /* 1: spread TCP/UDP flows over rss_table */
    uint32_t rss_mask;    /* table entries - 1 */
    uint8_t rss_key[VF_RSS_KEY_SIZE];
    uint8_t rss_table[VF_RSS_TABLE_MAX];
    /* counted by C, drained into the Python counters after each burst */
    uint64_t rx_packets, rx_bytes, tx_packets, tx_bytes;
    uint32_t touched;     /* nonzero: a completion was written (raise IRQs) */
} vf_fn;

typedef struct {
    uint32_t used;        /* 0: empty slot */
    uint32_t key_ip;      /* network order as read from the frame */
    uint32_t key_port;    /* host order */
    uint32_t key_proto;
    uint32_t fn;          /* slot in the function array */
    uint32_t queue;
    uint32_t filter;      /* slot in the filter counter arrays */
    uint32_t pad;
} vf_entry;

typedef struct {
    vf_entry *rx;         /* open addressing, rx_mask + 1 entries */
    uint32_t rx_mask;
    vf_entry *tx;
    uint32_t tx_mask;
    uint64_t *filter_packets;
    uint64_t *filter_bytes;
    uint32_t nfilters;
    uint32_t *touched_filters;  /* slots whose counters went from 0 (drained per burst) */
    uint32_t ntouched;
    vf_fn *fns;
    uint32_t nfns;
    /* device counters, drained after each burst */
    uint64_t wire_rx_packets, wire_rx_bytes, wire_tx_packets, wire_tx_bytes, wire_tx_dropped;
    uint64_t delivered;
    /* why frames and descriptors went to the Python model (VF_WHY_*): diagnostics */
    uint64_t why[16];
    uint32_t handed_back;  /* set when a burst stopped at a frame or descriptor for Python */
} vf_dev;

#define VF_WHY_RX_LONG 0
#define VF_WHY_RX_NOT_L4 1
#define VF_WHY_RX_NO_FILTER 2
#define VF_WHY_RX_SLOW_FUNCTION 3
#define VF_WHY_RX_NO_BUFFER 4
#define VF_WHY_RX_BAD_BUFFER 5
#define VF_WHY_TX_LENGTH 8
#define VF_WHY_TX_IOMMU 9
#define VF_WHY_TX_MAC 10
#define VF_WHY_TX_NOT_L4 11
#define VF_WHY_TX_NO_FILTER 12

/* Read up to max frames from a non-blocking fd into arena slots (VF_RX_SLOT bytes each). Returns the number read; stops
 * at EAGAIN or any error. lens[i] is the length read(2) returned. */
int vf_read_burst(int fd, uint8_t *arena, uint32_t arena_size, uint32_t *lens, uint32_t max);

/* Steer frames [start, count) of the arena. Returns the index of the first frame C cannot
 * handle (the caller runs the Python model on it and calls again from the next one), or
 * count when all were handled. */
uint32_t vf_rx_steer(vf_dev *dev, const uint8_t *arena, uint32_t arena_size, const uint32_t *lens,
                     uint32_t start, uint32_t count);

/* The Toeplitz hash (Microsoft RSS) of the 12-byte IPv4 4-tuple input under a 40-byte key. */
uint32_t vf_toeplitz(const uint8_t *key, const uint8_t *input);

/* Take up to budget descriptors from TX ring (fn, queue) while they are fast cases:
 * the frames are copied into out (VF_ARENA_SLOT per frame) with out_lens; returns how many
 * descriptors were completed. If fd >= 0 the frames are also written to fd and counted on
 * the device (wire_tx_*); sent[i] says if the write succeeded. */
uint32_t vf_tx_burst(vf_dev *dev, uint32_t fn, uint32_t queue, uint32_t budget,
                     uint8_t *out, uint32_t out_size, uint32_t *out_lens, uint8_t *sent, int fd);
