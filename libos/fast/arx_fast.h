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

#endif
