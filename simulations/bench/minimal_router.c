/* A minimal Firezone-style IPv4 ChannelData router: the floor that simulations/bench/xdp.py
 * measures xdp/turn_router.c against, in the same process and run. Not a product: IPv4 only,
 * no counters, no MTU check, no padding, no relay loop, no IPv6, no configuration.
 *
 *   UDP to port 3478 carrying ChannelData, (src, sport, channel) in c2p -> strip the 4-byte header
 *   UDP to 49152..65535, (src, sport, dport) in p2c                  -> prepend it
 *
 * Addresses and ports are rewritten in place, the IPv4 and UDP checksums updated incrementally
 * (RFC 1624), the MAC addresses swapped, and the frame sent back out with XDP_TX. The new source
 * address is the old destination (the relay's own address).
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>

#define LISTEN_PORT 3478
#define LOWEST_PORT 49152

struct ckey {
    __be32 addr;
    __be16 port;
    __be16 chan;
};

struct pkey {
    __be32 addr;
    __be16 port;       /* the peer's port */
    __be16 alloc_port; /* ours */
};

/* c2p: ckey -> pkey (where to send, from which allocation port); p2c: pkey -> ckey. */
BPF_HASH(c2p, struct ckey, struct pkey, 1024);
BPF_HASH(p2c, struct pkey, struct ckey, 1024);

struct hdrs {
    struct ethhdr eth;
    struct iphdr ip;
    struct udphdr udp;
} __attribute__((packed));

/* One's-complement sum of the 32-bit word difference old -> new, added to an unfolded sum. */
static __always_inline __u32 diff32(__u32 sum, __be32 old, __be32 new)
{
    sum += (~old & 0xffff) + (~old >> 16);
    sum += (new & 0xffff) + (new >> 16);
    return sum;
}

static __always_inline __u32 diff16(__u32 sum, __be16 old, __be16 new)
{
    return sum + (__u16)~old + new;
}

static __always_inline __be16 finish(__u32 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__be16)~sum;
}

int xdp_minimal(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct hdrs *h = data;
    if ((void *)(h + 1) > data_end)
        return XDP_PASS;
    if (h->eth.h_proto != bpf_htons(ETH_P_IP) || h->ip.ihl != 5 || h->ip.protocol != IPPROTO_UDP)
        return XDP_PASS;
    __u16 dport = bpf_ntohs(h->udp.dest);
    struct hdrs o = *h;
    __u32 ipsum = (__u16)~h->ip.check;
    __u32 usum = (__u16)~h->udp.check;
    __be16 new_len;
    __be16 hdr[2] = {0, 0}; /* the ChannelData header to prepend */

    if (dport == LISTEN_PORT) {
        __be16 *ch = (void *)(h + 1);
        if ((void *)(ch + 2) > data_end)
            return XDP_PASS;
        struct ckey k = {h->ip.saddr, h->udp.source, ch[0]};
        struct pkey *v = c2p.lookup(&k);
        if (!v)
            return XDP_PASS;
        o.ip.saddr = h->ip.daddr;
        o.ip.daddr = v->addr;
        o.udp.source = v->alloc_port;
        o.udp.dest = v->port;
        new_len = bpf_htons(bpf_ntohs(h->udp.len) - 4);
        usum = diff16(usum, ch[0], 0);
        usum = diff16(usum, ch[1], 0);
        o.ip.tot_len = bpf_htons(bpf_ntohs(h->ip.tot_len) - 4);
    } else if (dport >= LOWEST_PORT) {
        struct pkey k = {h->ip.saddr, h->udp.source, h->udp.dest};
        struct ckey *v = p2c.lookup(&k);
        if (!v)
            return XDP_PASS;
        o.ip.saddr = h->ip.daddr;
        o.ip.daddr = v->addr;
        o.udp.source = bpf_htons(LISTEN_PORT);
        o.udp.dest = v->port;
        new_len = bpf_htons(bpf_ntohs(h->udp.len) + 4);
        hdr[0] = v->chan;
        hdr[1] = bpf_htons(bpf_ntohs(h->udp.len) - 8);
        usum = diff16(usum, 0, hdr[0]);
        usum = diff16(usum, 0, hdr[1]);
        o.ip.tot_len = bpf_htons(bpf_ntohs(h->ip.tot_len) + 4);
    } else {
        return XDP_PASS;
    }
    o.udp.len = new_len;
    __builtin_memcpy(o.eth.h_dest, h->eth.h_source, ETH_ALEN);
    __builtin_memcpy(o.eth.h_source, h->eth.h_dest, ETH_ALEN);

    ipsum = diff32(ipsum, h->ip.saddr, o.ip.saddr);
    ipsum = diff32(ipsum, h->ip.daddr, o.ip.daddr);
    ipsum = diff16(ipsum, h->ip.tot_len, o.ip.tot_len);
    o.ip.check = finish(ipsum);
    if (h->udp.check) {
        usum = diff32(usum, h->ip.saddr, o.ip.saddr);
        usum = diff32(usum, h->ip.daddr, o.ip.daddr);
        usum = diff16(usum, h->udp.source, o.udp.source);
        usum = diff16(usum, h->udp.dest, o.udp.dest);
        usum = diff16(usum, h->udp.len, new_len); /* pseudo-header */
        usum = diff16(usum, h->udp.len, new_len); /* UDP header */
        o.udp.check = finish(usum) ?: 0xffff;
    }

    int delta = dport == LISTEN_PORT ? 4 : -4;
    if (bpf_xdp_adjust_head(ctx, delta))
        return XDP_PASS;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    h = data;
    if ((void *)(h + 1) > data_end)
        return XDP_ABORTED;
    *h = o;
    if (delta < 0) {
        __be16 *ch = (void *)(h + 1);
        if ((void *)(ch + 2) > data_end)
            return XDP_ABORTED;
        ch[0] = hdr[0];
        ch[1] = hdr[1];
    }
    return XDP_TX;
}
