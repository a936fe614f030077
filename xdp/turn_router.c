/* In-kernel TURN ChannelData router (XDP, compiled by bcc; see xdp/loader.py).
 *
 * Relays the data plane of bound TURN channels without waking userspace:
 *   client ChannelData -> peer UDP        (strip the 4-byte header)
 *   peer UDP           -> client ChannelData (prepend it)
 *   client ChannelData -> client ChannelData (relay loop: the peer is an allocation on this relay)
 * for IPv4 and IPv6 on either side. Everything it does not own, or cannot relay exactly as the
 * userspace relay would, goes to XDP_PASS, including packets without a map entry: userspace
 * decides about those (permissions, Data indications).
 *
 * Addresses are kept as 16 raw bytes; IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d). Ports and
 * channel numbers in map keys and values are in network byte order, config ports in host order.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

#ifndef MAX_BINDINGS
#define MAX_BINDINGS 65536
#endif
/* Time one candidate TURN packet (UDP to the listen port or the allocation range) in
 * TIMING_SAMPLE (a power of two; 1 = all). Reading the clock costs about 30-50 ns per call on
 * the project's VMs, about as much as the rest of the relaying work: one in 16 still cost ~6 ns
 * per packet on average, one in 256 costs well under 1 ns and still gives thousands of samples a
 * second at the rates where the figure matters. Other traffic (ARP, IPv6 neighbour discovery,
 * unrelated UDP) never advances the sample counter, so it cannot steal the sample. */
#ifndef TIMING_SAMPLE
#define TIMING_SAMPLE 256
#endif

#define ETH_LEN 14
#define IP4_LEN 20
#define IP6_LEN 40
#define UDP_LEN 8
#define CHAN_LEN 4
#define IP_DF 0x4000
#define IP_MF_OFFSET 0x3fff

/* Paths (index into packets/bytes). */
#define PATH_CHAN_TO_UDP 0
#define PATH_UDP_TO_CHAN 1
#define PATH_CHAN_TO_CHAN 2
#define NUM_PATHS 3

/* Reasons for XDP_PASS (index into passed); keep in sync with xdp/maps.py PASS_REASONS. */
#define PASS_DISABLED 0
#define PASS_NOT_IP 1
#define PASS_NOT_UDP 2
#define PASS_IP_OPTIONS 3
#define PASS_FRAGMENT 4
#define PASS_MALFORMED 5
#define PASS_DNS 6
#define PASS_NOT_TURN_PORT 7
#define PASS_NOT_CHANNEL_DATA 8
#define PASS_BAD_LENGTH 9
#define PASS_NO_ENTRY 10
#define PASS_CHECKSUM 11
#define PASS_NO_SOURCE_ADDR 12
#define PASS_MTU 13
#define PASS_ADJUST_FAILED 14
#define NUM_PASS 16

#define NUM_SIZE_BUCKETS 16
#define NUM_NS_BUCKETS 16

/* (client address, client port, channel): key of chan_to_peer, value of peer_to_chan. */
struct chan_key {
    __u32 addr[4];
    __be16 port;
    __be16 channel;
};

/* (peer address, allocation port, peer port): key of peer_to_chan, value of chan_to_peer. */
struct peer_key {
    __u32 addr[4];
    __be16 alloc_port;
    __be16 peer_port;
};

struct relay_config {
    __u32 public4[4];   /* the relay's public addresses (relay-loop detection); 0 = unset */
    __u32 public6[4];
    __u32 int4[4];      /* interface addresses: source of cross-family output; 0 = unset */
    __u32 int6[4];
    __u16 listen_port;
    __u16 lowest_port;
    __u16 highest_port;
    __u8 ttl;           /* TTL / hop limit of relayed packets, as a userspace sender would use */
    __u8 enabled;       /* 0: pass everything (not configured yet) */
};

struct relay_stats {
    __u64 packets[NUM_PATHS];
    __u64 bytes[NUM_PATHS];                 /* relayed application data (ChannelData payload) */
    __u64 passed[NUM_PASS];
    __u64 size_buckets[NUM_SIZE_BUCKETS];   /* payload size: [100*i, 100*(i+1)), last >= 1500 */
    __u64 ns_total;
    __u64 ns_count;
    __u64 ns_buckets[NUM_NS_BUCKETS];       /* 0: 0 ns, i: [2^(i-1), 2^i) ns, last open */
    __u64 seq;                              /* candidate TURN packets, drives samples */
};

/* Relayed datagrams and payload bytes per allocation (its port) and direction, for the
 * operator's `sessions` and `top`: slot port counts client -> peer, slot PORT_IN + port
 * peer -> client. One array shared by every CPU, so added to atomically; memory-mapped by the
 * relay (BPF_F_MMAPABLE), which reads it without a system call. */
#define PORT_IN 65536
struct port_count {
    __u64 packets;
    __u64 bytes;
};
BPF_F_TABLE("array", __u32, struct port_count, port_counts, 2 * PORT_IN, BPF_F_MMAPABLE);

BPF_HASH(chan_to_peer, struct chan_key, struct peer_key, MAX_BINDINGS);
BPF_HASH(peer_to_chan, struct peer_key, struct chan_key, MAX_BINDINGS);
BPF_ARRAY(config, struct relay_config, 1);
BPF_PERCPU_ARRAY(stats, struct relay_stats, 1);

/* What was parsed from the incoming packet. */
struct in_pkt {
    __u32 src[4];
    __u32 dst[4];
    __be16 sport;
    __be16 dport;
    __be16 ulen;
    __be16 check;
    __be16 ip_id;
    __be16 frag_off;
    __u32 chan_word;    /* raw ChannelData header, 0 if none */
    __u32 pad_word;     /* ChannelData padding bytes at their checksum positions */
    __u16 payload_len;  /* relayed data length */
    __u8 tos;
    __u8 v6;
    __u8 has_chan;
};

/* What the relayed packet must look like. */
struct out_pkt {
    __u32 src[4];
    __u32 dst[4];
    __be16 sport;
    __be16 dport;
    __be16 channel;
    __u8 v6;
    __u8 has_chan;
};

static __always_inline int pass(struct relay_stats *st, int reason)
{
    st->passed[reason]++;
    return XDP_PASS;
}

static __always_inline int addr_is_v4(const __u32 *a)
{
    return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline int addr_is_set(const __u32 *a)
{
    return (a[0] | a[1] | a[2] | a[3]) != 0;
}

/* Compared from the last word, where addresses of one prefix differ. */
static __always_inline int addr_eq(const __u32 *a, const __u32 *b)
{
    return a[3] == b[3] && a[2] == b[2] && a[1] == b[1] && a[0] == b[0];
}

static __always_inline void addr_copy(__u32 *d, const __u32 *s)
{
    d[0] = s[0];
    d[1] = s[1];
    d[2] = s[2];
    d[3] = s[3];
}

static __always_inline void addr_from_v4(__u32 *d, __be32 v4)
{
    d[0] = 0;
    d[1] = 0;
    d[2] = bpf_htonl(0xffff);
    d[3] = v4;
}

/* Fold a one's-complement sum of 16- and 32-bit words, accumulated in 64 bits, to 16 bits. */
static __always_inline __u16 fold16(__u64 s)
{
    s = (s & 0xffffffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (__u16)s;
}

/* Same-family output leaves from the address the packet arrived on; cross-family output from
 * the interface address of the other family. */
static __always_inline int choose_source(struct relay_config *cfg, struct in_pkt *in,
                                         struct out_pkt *out)
{
    if (out->v6 == in->v6) {
        addr_copy(out->src, in->dst);
        return 0;
    }
    __u32 *src = out->v6 ? cfg->int6 : cfg->int4;
    if (!addr_is_set(src))
        return -1;
    addr_copy(out->src, src);
    return 0;
}

static __always_inline void count_port(__u32 slot, __u32 plen)
{
    struct port_count *c = port_counts.lookup(&slot);
    if (c) {
        __sync_fetch_and_add(&c->packets, 1);
        __sync_fetch_and_add(&c->bytes, plen);
    }
}

/* Relay as `out` says; counted in port_counts slots out_slot and in_slot (-1: none). */
static __always_inline int relay(struct xdp_md *ctx, struct relay_config *cfg,
                                 struct relay_stats *st, struct in_pkt *in, struct out_pkt *out,
                                 int path, __u64 start, __u32 out_slot, __u32 in_slot)
{
    __u32 in_hdr = ETH_LEN + (in->v6 ? IP6_LEN : IP4_LEN) + UDP_LEN + (in->has_chan ? CHAN_LEN : 0);
    __u32 out_l3 = out->v6 ? IP6_LEN : IP4_LEN;
    __u32 out_hdr = ETH_LEN + out_l3 + UDP_LEN + (out->has_chan ? CHAN_LEN : 0);
    __u16 plen = in->payload_len;
    __u16 out_ulen = UDP_LEN + (out->has_chan ? CHAN_LEN : 0) + plen;
    __u32 out_total = out_l3 + out_ulen;   /* L3 length */

    /* An IPv4 sender may omit the UDP checksum; IPv6 requires one, which we cannot compute
     * here without summing the payload: let userspace (and its kernel) do it. */
    if (in->check == 0 && (in->v6 || out->v6))
        return pass(st, PASS_CHECKSUM);

    /* Never grow a packet beyond the MTU of the interface it leaves on (XDP_TX: this one).
     * An interface that carries IPv6 has an MTU of at least 1280 (RFC 8200 §5; Linux turns
     * IPv6 off below that), so IPv6 output up to 1280 bytes needs no helper call. */
    if (out_hdr > in_hdr && (!out->v6 || out_total > 1280)) {
        __u32 mtu_len = out_total;
        if (bpf_check_mtu(ctx, 0, &mtu_len, 0, 0) != 0)
            return pass(st, PASS_MTU);
    }

    /* Incremental UDP checksum (RFC 1624): the payload keeps an even offset, so only these
     * words change; each old word is added complemented, each new one as is. Summed inline:
     * a bpf_csum_diff call over buffers of the old and new words cost ~34 ns more. */
    __be16 check = 0;
    if (in->check != 0) {
        __u64 s = (__u16)~in->check;
        if (in->v6 | out->v6) {
#pragma unroll
            for (int i = 0; i < 3; i++)
                s += (__u64)(__u32)~in->src[i] + (__u32)~in->dst[i] + out->src[i] + out->dst[i];
        }
        s += (__u64)(__u32)~in->src[3] + (__u32)~in->dst[3] + out->src[3] + out->dst[3];
        s += (__u16)~in->sport + (__u16)~in->dport + out->sport + out->dport;
        s += 2 * ((__u16)~in->ulen + (__u32)bpf_htons(out_ulen));
        s += (__u64)(__u32)~in->chan_word + (__u32)~in->pad_word;
        if (out->has_chan) {
            __be16 hdr[2] = {out->channel, bpf_htons(plen)};
            __u32 w;
            __builtin_memcpy(&w, hdr, sizeof(w));
            s += w;
        }
        check = ~fold16(s);
        if (check == 0)
            check = 0xffff;
    }

    /* The hop the frame came from, to send it back there (one next hop assumed, as for
     * XDP_TX in general); read here, on the relaying paths only. */
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_ABORTED;
    __u8 macs[2 * ETH_ALEN];
    __builtin_memcpy(macs, eth, sizeof(macs));

    /* Move the start of the frame; the payload stays where it is. */
    int delta = (int)in_hdr - (int)out_hdr;
    if (delta != 0 && bpf_xdp_adjust_head(ctx, delta) != 0)
        return pass(st, PASS_ADJUST_FAILED);

    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    eth = data;
    struct udphdr *udp;
    if (out->v6) {
        if (data + ETH_LEN + IP6_LEN + UDP_LEN > data_end)
            return XDP_ABORTED;
        struct ipv6hdr *ip6 = data + ETH_LEN;
        eth->h_proto = bpf_htons(ETH_P_IPV6);
        /* version 6, traffic class from the input, flow label 0 */
        __u32 vtf = (6 << 28) | ((__u32)in->tos << 20);
        *(__be32 *)ip6 = bpf_htonl(vtf);
        ip6->payload_len = bpf_htons(out_ulen);
        ip6->nexthdr = IPPROTO_UDP;
        ip6->hop_limit = cfg->ttl;
        __builtin_memcpy(&ip6->saddr, out->src, 16);
        __builtin_memcpy(&ip6->daddr, out->dst, 16);
        udp = (void *)(ip6 + 1);
    } else {
        if (data + ETH_LEN + IP4_LEN + UDP_LEN > data_end)
            return XDP_ABORTED;
        /* A fresh header, its checksum summed from the fields written (no options). */
        struct iphdr *ip = data + ETH_LEN;
        __be16 vt = bpf_htons(0x4500 | in->tos);
        __be16 tot = bpf_htons(out_total);
        __be16 id = 0, frag = bpf_htons(IP_DF);
        if (!in->v6) {
            id = in->ip_id;
            frag = in->frag_off & bpf_htons(IP_DF);
        }
        __be16 tp = bpf_htons(((__u16)cfg->ttl << 8) | IPPROTO_UDP);
        __u64 s = (__u64)vt + tot + id + frag + tp + out->src[3] + out->dst[3];
        eth->h_proto = bpf_htons(ETH_P_IP);
        *(__be16 *)ip = vt;
        ip->tot_len = tot;
        ip->id = id;
        ip->frag_off = frag;
        *(__be16 *)&ip->ttl = tp;
        ip->check = ~fold16(s);
        ip->saddr = out->src[3];
        ip->daddr = out->dst[3];
        udp = (void *)(ip + 1);
    }
    __builtin_memcpy(eth->h_dest, macs + ETH_ALEN, ETH_ALEN);
    __builtin_memcpy(eth->h_source, macs, ETH_ALEN);
    udp->source = out->sport;
    udp->dest = out->dport;
    udp->len = bpf_htons(out_ulen);
    udp->check = check;
    if (out->has_chan) {
        __be16 *hdr = (void *)(udp + 1);
        if ((void *)(hdr + 2) > data_end)
            return XDP_ABORTED;
        hdr[0] = out->channel;
        hdr[1] = bpf_htons(plen);
    }

    /* Cut ChannelData padding and any link-layer trailer. */
    long excess = (long)(data_end - data) - (long)(out_hdr + plen);
    if (excess > 0)
        bpf_xdp_adjust_tail(ctx, (int)-excess);

    if (out_slot != (__u32)-1)
        count_port(out_slot, plen);
    if (in_slot != (__u32)-1)
        count_port(in_slot, plen);
    st->packets[path]++;
    st->bytes[path] += plen;
    __u32 sb = plen / 100;
    if (sb >= NUM_SIZE_BUCKETS)
        sb = NUM_SIZE_BUCKETS - 1;
    st->size_buckets[sb]++;
    if (start) {
        __u64 ns = bpf_ktime_get_ns() - start;
        __u32 nb = bpf_log2l(ns);
        if (nb >= NUM_NS_BUCKETS)
            nb = NUM_NS_BUCKETS - 1;
        st->ns_total += ns;
        st->ns_count++;
        st->ns_buckets[nb]++;
    }
    return XDP_TX;
}

int xdp_turn_router(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 zero = 0;

    struct relay_stats *st = stats.lookup(&zero);
    if (!st)
        return XDP_PASS;
    /* Peek, do not advance: only a candidate TURN packet below consumes the sample. */
    __u64 start = 0;
    if ((st->seq & (TIMING_SAMPLE - 1)) == 0)
        start = bpf_ktime_get_ns();
    struct relay_config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->enabled)
        return pass(st, PASS_DISABLED);

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return pass(st, PASS_NOT_IP);

    struct in_pkt in;
    in.chan_word = 0;
    in.pad_word = 0;
    in.has_chan = 0;
    struct udphdr *udp;
    __u32 l4_len;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            return pass(st, PASS_MALFORMED);
        if (ip->version != 4)
            return pass(st, PASS_MALFORMED);
        if (ip->ihl != 5)
            return pass(st, PASS_IP_OPTIONS);
        if (ip->frag_off & bpf_htons(IP_MF_OFFSET))
            return pass(st, PASS_FRAGMENT);
        if (ip->protocol != IPPROTO_UDP)
            return pass(st, PASS_NOT_UDP);
        __u32 tot = bpf_ntohs(ip->tot_len);
        if (tot < IP4_LEN + UDP_LEN)
            return pass(st, PASS_MALFORMED);
        l4_len = tot - IP4_LEN;
        addr_from_v4(in.src, ip->saddr);
        addr_from_v4(in.dst, ip->daddr);
        in.tos = ip->tos;
        in.ip_id = ip->id;
        in.frag_off = ip->frag_off;
        in.v6 = 0;
        udp = (void *)(ip + 1);
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return pass(st, PASS_MALFORMED);
        if (ip6->version != 6)
            return pass(st, PASS_MALFORMED);
        switch (ip6->nexthdr) {
        case IPPROTO_UDP:
            break;
        case IPPROTO_FRAGMENT:
            return pass(st, PASS_FRAGMENT);
        case IPPROTO_HOPOPTS:
        case IPPROTO_ROUTING:
        case IPPROTO_DSTOPTS:
        case IPPROTO_AH:
        case IPPROTO_ESP:
        case 135: /* mobility */
        case 139: /* HIP */
        case 140: /* shim6 */
        case 253:
        case 254:
            return pass(st, PASS_IP_OPTIONS);
        default:
            return pass(st, PASS_NOT_UDP);
        }
        l4_len = bpf_ntohs(ip6->payload_len);
        __builtin_memcpy(in.src, &ip6->saddr, 16);
        __builtin_memcpy(in.dst, &ip6->daddr, 16);
        in.tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
        in.v6 = 1;
        in.ip_id = 0;
        in.frag_off = 0;
        udp = (void *)(ip6 + 1);
    } else {
        return pass(st, PASS_NOT_IP);
    }

    if ((void *)(udp + 1) > data_end)
        return pass(st, PASS_MALFORMED);
    __u32 ulen = bpf_ntohs(udp->len);
    if (ulen < UDP_LEN || ulen != l4_len || (void *)udp + ulen > data_end)
        return pass(st, PASS_MALFORMED);
    __u16 sport = bpf_ntohs(udp->source);
    __u16 dport = bpf_ntohs(udp->dest);
    if (sport == 53)
        return pass(st, PASS_DNS);
    if (dport == cfg->listen_port || (dport >= cfg->lowest_port && dport <= cfg->highest_port))
        st->seq++;

    in.sport = udp->source;
    in.dport = udp->dest;
    in.ulen = udp->len;
    in.check = udp->check;

    struct out_pkt out;
    if (dport == cfg->listen_port) {
        /* ChannelData from a client (STUN and everything else goes to userspace). */
        __u8 *p = (void *)(udp + 1);
        if ((void *)(p + CHAN_LEN) > data_end || ulen < UDP_LEN + CHAN_LEN)
            return pass(st, PASS_MALFORMED);
        if ((p[0] & 0xf0) != 0x40)
            return pass(st, PASS_NOT_CHANNEL_DATA);
        __u32 room = ulen - UDP_LEN - CHAN_LEN;
        __u32 clen = ((__u32)p[2] << 8) | p[3];
        if (clen > room || room - clen > 3)
            return pass(st, PASS_BAD_LENGTH);
        __builtin_memcpy(&in.chan_word, p, CHAN_LEN);
        in.has_chan = 1;
        in.payload_len = clen;

        /* Padding (up to 3 bytes, any value) leaves the checksum with the payload's tail. */
        __u32 npad = room - clen;
        if (npad) {
            /* Bounded for the verifier; padded jumbo ChannelData goes to userspace. */
            if (clen > 0x3fff)
                return pass(st, PASS_BAD_LENGTH);
            __u8 *q = p + CHAN_LEN + clen;
            __u8 b[3] = {};
            if ((void *)(q + 1) > data_end)
                return pass(st, PASS_MALFORMED);
            b[0] = q[0];
            if (npad > 1) {
                if ((void *)(q + 2) > data_end)
                    return pass(st, PASS_MALFORMED);
                b[1] = q[1];
            }
            if (npad > 2) {
                if ((void *)(q + 3) > data_end)
                    return pass(st, PASS_MALFORMED);
                b[2] = q[2];
            }
            /* Place each byte at its position within a 16-bit checksum word. */
            __u8 pad[4] = {};
            if (clen & 1) {
                pad[1] = b[0];
                pad[2] = b[1];
                pad[3] = b[2];
            } else {
                pad[0] = b[0];
                pad[1] = b[1];
                pad[2] = b[2];
            }
            __builtin_memcpy(&in.pad_word, pad, 4);
        }

        struct chan_key ck = {};
        addr_copy(ck.addr, in.src);
        ck.port = in.sport;
        __builtin_memcpy(&ck.channel, p, 2);
        struct peer_key *peer = chan_to_peer.lookup(&ck);
        if (!peer)
            return pass(st, PASS_NO_ENTRY);

        /* Cheapest rejection first: the last word differs for almost every peer. */
        int loop = (addr_eq(peer->addr, cfg->public4) && addr_is_set(cfg->public4)) ||
                   (addr_eq(peer->addr, cfg->public6) && addr_is_set(cfg->public6));
        if (loop) {
            /* The peer is another allocation here: act as if the datagram had left our
             * allocation and arrived at the other one, then relay that to its client. */
            struct peer_key pk = {};
            addr_copy(pk.addr, peer->addr);
            pk.alloc_port = peer->peer_port;
            pk.peer_port = peer->alloc_port;
            struct chan_key *client = peer_to_chan.lookup(&pk);
            if (!client)
                return pass(st, PASS_NO_ENTRY);
            addr_copy(out.dst, client->addr);
            out.dport = client->port;
            out.channel = client->channel;
            out.sport = bpf_htons(cfg->listen_port);
            out.has_chan = 1;
            out.v6 = !addr_is_v4(client->addr);
            if (choose_source(cfg, &in, &out))
                return pass(st, PASS_NO_SOURCE_ADDR);
            return relay(ctx, cfg, st, &in, &out, PATH_CHAN_TO_CHAN, start,
                         bpf_ntohs(peer->alloc_port), PORT_IN + bpf_ntohs(peer->peer_port));
        }
        addr_copy(out.dst, peer->addr);
        out.dport = peer->peer_port;
        out.sport = peer->alloc_port;
        out.channel = 0;
        out.has_chan = 0;
        out.v6 = !addr_is_v4(peer->addr);
        if (choose_source(cfg, &in, &out))
            return pass(st, PASS_NO_SOURCE_ADDR);
        return relay(ctx, cfg, st, &in, &out, PATH_CHAN_TO_UDP, start,
                     bpf_ntohs(peer->alloc_port), (__u32)-1);
    }

    if (dport >= cfg->lowest_port && dport <= cfg->highest_port) {
        /* Plain UDP from a peer to an allocation. */
        struct peer_key pk = {};
        addr_copy(pk.addr, in.src);
        pk.alloc_port = in.dport;
        pk.peer_port = in.sport;
        struct chan_key *client = peer_to_chan.lookup(&pk);
        if (!client)
            return pass(st, PASS_NO_ENTRY);
        in.payload_len = ulen - UDP_LEN;
        addr_copy(out.dst, client->addr);
        out.dport = client->port;
        out.channel = client->channel;
        out.sport = bpf_htons(cfg->listen_port);
        out.has_chan = 1;
        out.v6 = !addr_is_v4(client->addr);
        if (choose_source(cfg, &in, &out))
            return pass(st, PASS_NO_SOURCE_ADDR);
        return relay(ctx, cfg, st, &in, &out, PATH_UDP_TO_CHAN, start, (__u32)-1,
                     PORT_IN + dport);
    }

    return pass(st, PASS_NOT_TURN_PORT);
}
