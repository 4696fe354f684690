/* The compiled libOS fast path (see arx_fast.h and libos/fast/__init__.py). */
#include "arx_fast.h"

#include <string.h>

#define ETH_LEN 14u
#define IP_LEN 20u
#define TCP_LEN 20u
#define UDP_LEN 8u
#define IP_PROTO_TCP 6u
#define IP_PROTO_UDP 17u
#define MAX_FRAME 1514u

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void put16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* RFC 1071: the 16-bit one's complement sum of big-endian words, folded to 16 bits
 * (an odd last byte is padded with a zero). Summed in 64 bits so no carry is lost. */
uint32_t arx_sum(const uint8_t *data, size_t length, uint32_t initial) {
    uint64_t sum = initial;
    size_t i = 0;
    for (; i + 1 < length; i += 2)
        sum += (uint64_t)((data[i] << 8) | data[i + 1]);
    if (i < length)
        sum += (uint64_t)data[i] << 8;
    while (sum >> 16)
        sum = (sum & 0xffffu) + (sum >> 16);
    return (uint32_t)sum;
}

uint16_t arx_checksum(const uint8_t *data, size_t length, uint32_t initial) {
    return (uint16_t)(~arx_sum(data, length, initial) & 0xffffu);
}

/* Verify the IPv4 header and the TCP or UDP checksum of one frame. Frames this does not
 * understand (ARP, options, fragments, other protocols, short or inconsistent lengths)
 * are ARX_KIND_OTHER: Python parses those and counts whatever is wrong with them. */
int arx_classify(const uint8_t *frame, size_t length) {
    if (length < ETH_LEN + IP_LEN || be16(frame + 12) != 0x0800)
        return ARX_KIND_OTHER;
    const uint8_t *ip = frame + ETH_LEN;
    if (ip[0] != 0x45)
        return ARX_KIND_OTHER;
    uint32_t total = be16(ip + 2);
    if (total < IP_LEN || total > length - ETH_LEN)
        return ARX_KIND_OTHER;
    if (be16(ip + 6) & 0x3fffu) /* MF or a fragment offset */
        return ARX_KIND_OTHER;
    uint8_t proto = ip[9];
    if (proto != IP_PROTO_TCP && proto != IP_PROTO_UDP)
        return ARX_KIND_OTHER;
    uint32_t l4_len = total - IP_LEN;
    if (proto == IP_PROTO_TCP && l4_len < TCP_LEN)
        return ARX_KIND_OTHER;
    if (proto == IP_PROTO_UDP && (l4_len < UDP_LEN || be16(ip + IP_LEN + 4) != l4_len))
        return ARX_KIND_OTHER;
    if (arx_sum(ip, IP_LEN, 0) != 0xffffu)
        return ARX_KIND_BAD_CSUM;
    const uint8_t *l4 = ip + IP_LEN;
    if (proto == IP_PROTO_UDP && be16(l4 + 6) == 0)
        return ARX_KIND_UDP; /* RFC 768: no checksum was computed */
    uint32_t pseudo = arx_sum(ip + 12, 8, proto + l4_len);
    if (arx_sum(l4, l4_len, pseudo) != 0xffffu)
        return ARX_KIND_BAD_CSUM;
    return proto == IP_PROTO_TCP ? ARX_KIND_TCP : ARX_KIND_UDP;
}

/* Take `count` completed RX descriptors from `start` on: copy each good frame into
 * `out` (frame i at i * buf_size), record its length and kind, and post the slot's
 * buffer back to the device. The caller has checked that `count` descriptors are
 * completed; the device wrote the lengths, so each is checked against the buffer.
 * Returns the number of frames copied; `*errors` counts descriptors with an error
 * status or an impossible length. */
int arx_rx_burst(struct arx_desc *descs, uint32_t mask, const uint8_t *bufs, size_t bufs_len,
                 uint64_t bufs_iova, uint32_t buf_size, uint32_t start, uint32_t count,
                 uint8_t *out, size_t out_len, uint32_t *out_lengths, uint8_t *out_kinds,
                 uint32_t *errors) {
    if ((size_t)mask + 1 > bufs_len / buf_size || (size_t)count * buf_size > out_len ||
        count > mask + 1)
        return -1;
    int frames = 0;
    *errors = 0;
    for (uint32_t k = 0; k < count; k++) {
        uint32_t slot = (start + k) & mask;
        struct arx_desc *d = &descs[slot];
        /* Read the device's write-back once into locals: no double fetch. */
        uint16_t status = d->status;
        uint16_t length = d->length;
        if (status == 0 && length > 0 && length <= buf_size) {
            uint8_t *dst = out + (size_t)frames * buf_size;
            memcpy(dst, bufs + (size_t)slot * buf_size, length);
            out_lengths[frames] = length;
            out_kinds[frames] = (uint8_t)arx_classify(dst, length);
            frames++;
        } else {
            (*errors)++;
        }
        d->iova = bufs_iova + (uint64_t)slot * buf_size;
        d->length = (uint16_t)buf_size;
        d->flags = 0;
        d->status = 0;
        d->reserved = 0;
    }
    return frames;
}

/* Copy one frame into the TX buffer of slot `prod` and write its descriptor. The
 * caller checked there is room and publishes `prod` afterwards. 0, or -1 if the frame
 * does not fit a buffer (nothing written). */
int arx_tx_post(struct arx_desc *descs, uint32_t mask, uint8_t *bufs, size_t bufs_len,
                uint64_t bufs_iova, uint32_t buf_size, uint32_t prod,
                const uint8_t *frame, size_t length) {
    if (length == 0 || length > buf_size || (size_t)mask + 1 > bufs_len / buf_size)
        return -1;
    uint32_t slot = prod & mask;
    memcpy(bufs + (size_t)slot * buf_size, frame, length);
    struct arx_desc *d = &descs[slot];
    d->iova = bufs_iova + (uint64_t)slot * buf_size;
    d->length = (uint16_t)length;
    d->flags = 0;
    d->status = 0;
    d->reserved = 0;
    return 0;
}

/* Ethernet (dst MAC, src MAC from `macs`) and IPv4 (src, dst from `ips`; DF, no options)
 * headers in front of `l4_len` bytes of protocol `proto`. */
static void eth_ip(uint8_t *out, const uint8_t *macs, const uint8_t *ips, uint8_t ttl,
                   uint16_t ident, uint8_t proto, size_t l4_len) {
    memcpy(out, macs, 12);
    put16(out + 12, 0x0800);
    uint8_t *ip = out + ETH_LEN;
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, (uint32_t)(IP_LEN + l4_len));
    put16(ip + 4, ident);
    put16(ip + 6, 0x4000);
    ip[8] = ttl;
    ip[9] = proto;
    put16(ip + 10, 0);
    memcpy(ip + 12, ips, 8);
    put16(ip + 10, arx_checksum(ip, IP_LEN, 0));
}

/* A whole Ethernet/IPv4/TCP frame into `out`: returns its length, or -1 if it would not
 * fit `cap` or a 1514-byte frame, or the options are not whole 32-bit words. */
long arx_tcp_frame(uint8_t *out, size_t cap, const uint8_t *macs, const uint8_t *ips,
                   uint8_t ttl, uint16_t ident, uint16_t src_port, uint16_t dst_port,
                   uint32_t seq, uint32_t ack, uint8_t flags, uint16_t window,
                   const uint8_t *options, size_t options_len,
                   const uint8_t *payload, size_t payload_len) {
    if (options_len > 40 || (options_len & 3) || payload_len > MAX_FRAME)
        return -1;
    size_t header = TCP_LEN + options_len;
    size_t l4_len = header + payload_len;
    size_t total = ETH_LEN + IP_LEN + l4_len;
    if (total > cap || total > MAX_FRAME)
        return -1;
    eth_ip(out, macs, ips, ttl, ident, IP_PROTO_TCP, l4_len);
    uint8_t *tcp = out + ETH_LEN + IP_LEN;
    put16(tcp, src_port);
    put16(tcp + 2, dst_port);
    put32(tcp + 4, seq);
    put32(tcp + 8, ack);
    tcp[12] = (uint8_t)((header / 4) << 4);
    tcp[13] = flags;
    put16(tcp + 14, window);
    put16(tcp + 16, 0);
    put16(tcp + 18, 0);
    if (options_len)
        memcpy(tcp + TCP_LEN, options, options_len);
    if (payload_len)
        memcpy(tcp + header, payload, payload_len);
    uint32_t pseudo = arx_sum(ips, 8, IP_PROTO_TCP + (uint32_t)l4_len);
    put16(tcp + 16, arx_checksum(tcp, l4_len, pseudo));
    return (long)total;
}

/* A whole Ethernet/IPv4/UDP frame; a computed checksum of 0 is sent as 0xffff (RFC 768). */
long arx_udp_frame(uint8_t *out, size_t cap, const uint8_t *macs, const uint8_t *ips,
                   uint8_t ttl, uint16_t ident, uint16_t src_port, uint16_t dst_port,
                   const uint8_t *payload, size_t payload_len) {
    if (payload_len > MAX_FRAME)
        return -1;
    size_t l4_len = UDP_LEN + payload_len;
    size_t total = ETH_LEN + IP_LEN + l4_len;
    if (total > cap || total > MAX_FRAME)
        return -1;
    eth_ip(out, macs, ips, ttl, ident, IP_PROTO_UDP, l4_len);
    uint8_t *udp = out + ETH_LEN + IP_LEN;
    put16(udp, src_port);
    put16(udp + 2, dst_port);
    put16(udp + 4, (uint32_t)l4_len);
    put16(udp + 6, 0);
    if (payload_len)
        memcpy(udp + UDP_LEN, payload, payload_len);
    uint32_t pseudo = arx_sum(ips, 8, IP_PROTO_UDP + (uint32_t)l4_len);
    uint16_t csum = arx_checksum(udp, l4_len, pseudo);
    put16(udp + 6, csum ? csum : 0xffffu);
    return (long)total;
}

/* A TCP segment built straight into the TX buffer of slot `prod`, its descriptor written:
 * the frame length, or -1 (nothing posted) if it does not fit. The caller checked room. */
long arx_tx_tcp(struct arx_desc *descs, uint32_t mask, uint8_t *bufs, size_t bufs_len,
                uint64_t bufs_iova, uint32_t buf_size, uint32_t prod,
                const uint8_t *macs, const uint8_t *ips, uint8_t ttl, uint16_t ident,
                uint16_t src_port, uint16_t dst_port, uint32_t seq, uint32_t ack,
                uint8_t flags, uint16_t window, const uint8_t *options, size_t options_len,
                const uint8_t *payload, size_t payload_len) {
    if ((size_t)mask + 1 > bufs_len / buf_size)
        return -1;
    uint32_t slot = prod & mask;
    long length = arx_tcp_frame(bufs + (size_t)slot * buf_size, buf_size, macs, ips, ttl, ident,
                                src_port, dst_port, seq, ack, flags, window, options,
                                options_len, payload, payload_len);
    if (length < 0)
        return -1;
    struct arx_desc *d = &descs[slot];
    d->iova = bufs_iova + (uint64_t)slot * buf_size;
    d->length = (uint16_t)length;
    d->flags = 0;
    d->status = 0;
    d->reserved = 0;
    return length;
}

/* Sequence space comparisons (RFC 9293 3.4, RFC 1982): a - b as a signed distance. */
static inline int32_t seq_diff(uint32_t a, uint32_t b) { return (int32_t)(a - b); }

#define TCP_FLAG_PSH 0x08u
#define TCP_FLAG_ACK 0x10u

/* The common case of an established connection, decided and done in C: a segment that is
 * the next in sequence, carries ACK (and maybe PSH) and nothing else, no options (this
 * stack negotiates no timestamps), does not change the peer's window, fits entirely in
 * the window we offered, and acknowledges nothing we did not send. For such a segment
 * every check of RFC 9293 3.10.7.4 has a known outcome: it is acceptable and needs no
 * trimming (first), has no RST or SYN (second, fourth), its ACK is in range (fifth, with
 * RFC 5961 5.2) and is not a duplicate ACK (it carries data or moves SND.UNA), its text
 * is in order (seventh) and there is no FIN (eighth).
 *
 * The caller has checked what only Python knows (nothing held for reassembly, no SACK
 * scoreboard or loss recovery, no FIN queued or pending) and that the frame is IPv4 TCP
 * addressed to this connection with valid checksums; the lengths are checked again here,
 * against `length`, so a wrong caller cannot make this read outside the frame.
 *
 * On success (1): RCV.NXT has moved past the text, the window-update variables are set as
 * the fifth check would, and `out` says where the text is and what was acknowledged; the
 * caller appends the text, moves SND.UNA and does the rest (timers, events, output). On 0
 * nothing was written anywhere: the segment takes the full Python path. */
int arx_tcp_predict(struct arx_tcb *tcb, const uint8_t *frame, size_t length,
                    struct arx_tcp_summary *out) {
    if (tcb->state != ARX_TCP_ESTABLISHED || length < ETH_LEN + IP_LEN + TCP_LEN)
        return 0;
    const uint8_t *ip = frame + ETH_LEN;
    if (ip[0] != 0x45)
        return 0;
    uint32_t total = be16(ip + 2);
    if (total < IP_LEN + TCP_LEN || total > length - ETH_LEN)
        return 0;
    const uint8_t *tcp = ip + IP_LEN;
    /* Data offset 5 with the reserved bits clear, and exactly ACK or ACK|PSH. */
    if (tcp[12] != 0x50 || (tcp[13] != TCP_FLAG_ACK && tcp[13] != (TCP_FLAG_ACK | TCP_FLAG_PSH)))
        return 0;
    uint32_t seq = be32(tcp + 4);
    uint32_t ack = be32(tcp + 8);
    uint32_t window = (uint32_t)be16(tcp + 14) << (tcb->snd_shift & 15u);
    uint32_t payload_len = total - IP_LEN - TCP_LEN;
    if (seq != tcb->rcv_nxt || window != tcb->snd_wnd)
        return 0;
    int32_t offered = seq_diff(tcb->rcv_adv, tcb->rcv_nxt);
    if (offered < 0)
        offered = 0;
    if (payload_len > (uint32_t)offered)
        return 0;
    int32_t acked = seq_diff(ack, tcb->snd_una);
    if (acked < 0 || seq_diff(ack, tcb->snd_max) > 0)
        return 0;
    if (acked == 0 && payload_len == 0)
        return 0; /* a duplicate ACK or a window probe: Python counts and answers those */
    uint32_t flags = 0;
    if (seq_diff(tcb->snd_wl1, seq) < 0 || (tcb->snd_wl1 == seq && seq_diff(ack, tcb->snd_wl2) >= 0)) {
        tcb->snd_wl1 = seq;
        tcb->snd_wl2 = ack;
        flags |= ARX_PREDICT_WINDOW_UPDATE;
    }
    tcb->rcv_nxt = seq + payload_len;
    out->payload_offset = ETH_LEN + IP_LEN + TCP_LEN;
    out->payload_len = payload_len;
    out->ack = ack;
    out->acked = (uint32_t)acked;
    out->flags = flags;
    return 1;
}
