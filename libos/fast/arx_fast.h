/* The compiled libOS fast path: declarations shared by the C source and the cffi build.
 *
 * Everything here works on memory the caller owns (the DMA region, the register page,
 * Python buffers); nothing allocates and nothing keeps a pointer past the call. Every
 * length that comes from a frame or a descriptor is checked before it is used.
 */
#ifndef ARX_FAST_H
#define ARX_FAST_H

#include <stddef.h>
#include <stdint.h>

/* vdev.layout.VNIC_DESC: "<QHHHH", 16 bytes, little endian like the host. */
struct arx_desc {
    uint64_t iova;
    uint16_t length;
    uint16_t flags;
    uint16_t status;
    uint16_t reserved;
};

/* What the receive burst found out about a frame, before Python sees it. */
#define ARX_KIND_OTHER 0      /* not IPv4 TCP/UDP with a plain header: Python decides */
#define ARX_KIND_TCP 1        /* IPv4 (IHL 5, no fragment) TCP, both checksums verify */
#define ARX_KIND_UDP 2        /* IPv4 (IHL 5, no fragment) UDP, checksums verify or UDP's is 0 */
#define ARX_KIND_BAD_CSUM 3   /* IPv4 TCP/UDP whose IPv4, TCP or UDP checksum fails */

uint32_t arx_sum(const uint8_t *data, size_t length, uint32_t initial);
uint16_t arx_checksum(const uint8_t *data, size_t length, uint32_t initial);
int arx_classify(const uint8_t *frame, size_t length);

int arx_rx_burst(struct arx_desc *descs, uint32_t mask, const uint8_t *bufs, size_t bufs_len,
                 uint64_t bufs_iova, uint32_t buf_size, uint32_t start, uint32_t count,
                 uint8_t *out, size_t out_len, uint32_t *out_lengths, uint8_t *out_kinds,
                 uint32_t *errors);

int arx_tx_post(struct arx_desc *descs, uint32_t mask, uint8_t *bufs, size_t bufs_len,
                uint64_t bufs_iova, uint32_t buf_size, uint32_t prod,
                const uint8_t *frame, size_t length);

long arx_tcp_frame(uint8_t *out, size_t cap, const uint8_t *macs, const uint8_t *ips,
                   uint8_t ttl, uint16_t ident, uint16_t src_port, uint16_t dst_port,
                   uint32_t seq, uint32_t ack, uint8_t flags, uint16_t window,
                   const uint8_t *options, size_t options_len,
                   const uint8_t *payload, size_t payload_len);

long arx_udp_frame(uint8_t *out, size_t cap, const uint8_t *macs, const uint8_t *ips,
                   uint8_t ttl, uint16_t ident, uint16_t src_port, uint16_t dst_port,
                   const uint8_t *payload, size_t payload_len);

long arx_tx_tcp(struct arx_desc *descs, uint32_t mask, uint8_t *bufs, size_t bufs_len,
                uint64_t bufs_iova, uint32_t buf_size, uint32_t prod,
                const uint8_t *macs, const uint8_t *ips, uint8_t ttl, uint16_t ident,
                uint16_t src_port, uint16_t dst_port, uint32_t seq, uint32_t ack,
                uint8_t flags, uint16_t window, const uint8_t *options, size_t options_len,
                const uint8_t *payload, size_t payload_len);

/* Header prediction (RFC 9293 3.10.7.4 in the fast case; Van Jacobson, "4BSD header
 * prediction", 1990).
 *
 * The sequence variables of one connection's control block that prediction needs live in
 * this struct, and the Python state machine reads and writes them here too
 * (libos.net.tcp.control_block SharedControlBlock): there is one copy. C only reads
 * `state` (Python writes it, with the enum beside it in Python). Python owns the memory
 * (cffi ffi.new); C sees it only during arx_tcp_predict. Sequence numbers are modulo
 * 2**32 (RFC 9293 3.4). */
#define ARX_TCP_ESTABLISHED 3   /* the only state C acts in; the codes are Python's */

struct arx_tcb {
    uint32_t snd_una;
    uint32_t snd_max;
    uint32_t snd_wnd;    /* scaled: at most 65535 << 14 */
    uint32_t snd_wl1;
    uint32_t snd_wl2;
    uint32_t rcv_nxt;
    uint32_t rcv_adv;    /* the right edge of the window we offered */
    uint8_t state;       /* libos.net.tcp.control_block.STATE_CODES */
    uint8_t snd_shift;   /* the peer's window scale */
    uint8_t reserved[2];
};

/* What a predicted segment left for Python to finish. */
#define ARX_PREDICT_WINDOW_UPDATE 1    /* SND.WL1/WL2 moved (RFC 9293 3.10.7.4, fifth) */

struct arx_tcp_summary {
    uint32_t payload_offset;   /* in the frame */
    uint32_t payload_len;      /* appended at the old RCV.NXT, which moved past it */
    uint32_t ack;              /* SEG.ACK; SND.UNA is Python's to move */
    uint32_t acked;            /* SEG.ACK - SND.UNA: bytes of ours newly acknowledged */
    uint32_t flags;            /* ARX_PREDICT_* */
};

int arx_tcp_predict(struct arx_tcb *tcb, const uint8_t *frame, size_t length,
                    struct arx_tcp_summary *out);

#endif
