/* Batched UDP I/O for the relay's userspace data path: recvmmsg into preallocated slots and
 * sendmmsg for runs of datagrams that leave through the same socket, and a mirror of the core's
 * channel routes that relays bound-channel traffic without entering Python.
 *
 * Why: on the userspace path a datagram costs two syscalls and the Python socket module's
 * argument parsing and address building. This module reads up to N datagrams per syscall and
 * hands back the senders as (host, port) tuples from a small bounded cache (no string building
 * for a sender seen before), and sends a whole batch in one call.
 *
 * The route mirror: even batched, the Python loop over a batch costs more than the syscalls.
 * Receiver.relay_clients / relay_peers route every datagram of a batch that the mirror knows
 * (ChannelData on a bound channel; peer traffic for a bound channel), count it as the core
 * would, send it, and hand back the rest of the batch, from the first datagram the mirror does
 * not know, for the core to handle in order. The mirror is a cache of the core's routes, kept
 * in step by the data plane on every CreateChannelBinding / DeleteChannelBinding: policy stays
 * in the core, and whatever the mirror lacks goes there. actors/udpio.py has the pure-Python
 * fallback with the same API (its mirror routes nothing).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <stdint.h>
#include <sys/socket.h>

#define CACHE_SLOTS 4096 /* per Receiver; a power of two */
#define MAX_BATCH 1024

/* -- the route mirror ------------------------------------------------------------------------ */

/* A route key: an address (family tag, port, 16 address bytes) and a 16-bit number (the channel
 * for client -> peer, the allocation port for peer -> client), zero-padded so keys compare
 * with one memcmp. */
typedef struct {
    unsigned char b[24];
} route_key;

typedef struct {
    route_key key;
    uint32_t hash;
    int used;
    int fd;                    /* the socket it leaves through */
    unsigned short channel;    /* peer -> client: the ChannelData header's channel */
    socklen_t dlen;
    struct sockaddr_in6 dst;   /* where it goes (a sockaddr_in in its first bytes for v4) */
} route;

typedef struct {
    route *slots; /* open addressing, linear probing, backward-shift deletion */
    size_t cap, len;
} route_table;

static int
key_of(route_key *k, const struct sockaddr_storage *ss, unsigned int number)
{
    memset(k, 0, sizeof *k);
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        k->b[0] = 4;
        memcpy(k->b + 1, &a->sin_port, 2);
        memcpy(k->b + 3, &a->sin_addr, 4);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        k->b[0] = 6;
        memcpy(k->b + 1, &a->sin6_port, 2);
        memcpy(k->b + 3, &a->sin6_addr, 16);
    } else {
        return -1;
    }
    k->b[19] = (unsigned char)(number >> 8);
    k->b[20] = (unsigned char)number;
    return 0;
}

static uint32_t
hash_key(const route_key *k)
{
    uint64_t w[3];
    memcpy(w, k->b, sizeof w);
    uint64_t h = w[0] * 0x9E3779B97F4A7C15ull ^ w[1] * 0xC2B2AE3D27D4EB4Full ^
                 w[2] * 0x165667B19E3779F9ull;
    h ^= h >> 32;
    h *= 0xD6E8FEB86659FD93ull;
    return (uint32_t)(h ^ (h >> 32));
}

static route *
table_find(const route_table *t, const route_key *k, uint32_t h)
{
    if (t->len == 0) {
        return NULL;
    }
    size_t mask = t->cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        route *r = &t->slots[i];
        if (!r->used) {
            return NULL;
        }
        if (r->hash == h && memcmp(r->key.b, k->b, sizeof k->b) == 0) {
            return r;
        }
    }
}

static int
table_grow(route_table *t)
{
    size_t cap = t->cap ? t->cap * 2 : 64;
    route *slots = PyMem_Calloc(cap, sizeof(route));
    if (slots == NULL) {
        return -1;
    }
    for (size_t i = 0; i < t->cap; i++) {
        if (t->slots[i].used) {
            size_t j = t->slots[i].hash & (cap - 1);
            while (slots[j].used) {
                j = (j + 1) & (cap - 1);
            }
            slots[j] = t->slots[i];
        }
    }
    PyMem_Free(t->slots);
    t->slots = slots;
    t->cap = cap;
    return 0;
}

/* The entry for k, added (unused fields zero) if it was not there; NULL: out of memory. */
static route *
table_put(route_table *t, const route_key *k)
{
    uint32_t h = hash_key(k);
    route *r = table_find(t, k, h);
    if (r != NULL) {
        return r;
    }
    if ((t->len + 1) * 2 > t->cap && table_grow(t) < 0) {
        return NULL;
    }
    size_t mask = t->cap - 1, i = h & mask;
    while (t->slots[i].used) {
        i = (i + 1) & mask;
    }
    r = &t->slots[i];
    memset(r, 0, sizeof *r);
    r->key = *k;
    r->hash = h;
    r->used = 1;
    r->fd = -1;
    t->len++;
    return r;
}

static void
table_remove_at(route_table *t, size_t i)
{
    size_t mask = t->cap - 1;
    for (size_t j = (i + 1) & mask; t->slots[j].used; j = (j + 1) & mask) {
        size_t home = t->slots[j].hash & mask;
        /* move j back to the hole at i unless its home lies cyclically in (i, j] */
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            t->slots[i] = t->slots[j];
            i = j;
        }
    }
    t->slots[i].used = 0;
    t->len--;
}

/* The fd of the removed entry, or -1 if there was none. */
static int
table_remove(route_table *t, const route_key *k)
{
    route *r = table_find(t, k, hash_key(k));
    if (r == NULL) {
        return -1;
    }
    int fd = r->fd;
    table_remove_at(t, (size_t)(r - t->slots));
    return fd;
}

/* Remove every entry through fd; returns how many. */
static size_t
table_remove_fd(route_table *t, int fd)
{
    size_t removed = 0;
    size_t i = 0;
    while (i < t->cap) {
        if (t->slots[i].used && t->slots[i].fd == fd) {
            table_remove_at(t, i); /* may shift a later entry into i: look at i again */
            removed++;
        } else {
            i++;
        }
    }
    return removed;
}

static void
table_clear(route_table *t)
{
    PyMem_Free(t->slots);
    t->slots = NULL;
    t->cap = t->len = 0;
}

static int parse_addr(PyObject *addr, struct sockaddr_storage *ss, socklen_t *len);

typedef struct {
    unsigned char key[18]; /* v4: 4-byte address + port; v6: 16-byte address + port */
    unsigned char len;     /* 0: empty */
    PyObject *addr;        /* (host, port) */
} cache_entry;

typedef struct {
    PyObject_HEAD
    Py_ssize_t count, slot, headroom;
    char *buf; /* the bytes of `buffer` */
    struct mmsghdr *msgs;
    struct iovec *iov;
    struct sockaddr_storage *names;
    PyObject *addrs; /* list[tuple[str, int]] of length count */
    PyObject *lens;  /* list[int] of length count */
    PyObject *views; /* list[memoryview]: slot i from its headroom to its end */
    PyObject *slots; /* list[memoryview]: slot i, headroom included */
    PyObject *buffer; /* bytearray holding every slot */
    cache_entry *cache;
    /* the route mirror: (client, channel) -> allocation socket and peer; (allocation port,
     * peer) -> listen socket, client and channel */
    route_table to_peer, to_client;
    int *fd_refs; /* fd -> how many routes leave through it (so drop_fd rarely scans) */
    size_t fd_cap;
    /* the relayed batch being sent */
    struct mmsghdr *out_msgs;
    struct iovec *out_iov;
    int *out_fd;
    unsigned long long send_drops, send_errors, datagrams_in, gso_sends;
    int gso; /* send runs to one destination with UDP GSO (off once the kernel refuses) */
} Receiver;

static PyObject *
make_addr(const struct sockaddr_storage *ss)
{
    char host[INET6_ADDRSTRLEN];
    int port;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        port = ntohs(a->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        port = ntohs(a->sin6_port);
    } else {
        host[0] = 0;
        port = 0;
    }
    return Py_BuildValue("(si)", host, port);
}

static PyObject *
cached_addr(cache_entry *cache, const struct sockaddr_storage *ss)
{
    unsigned char key[18];
    unsigned char len;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        memcpy(key, &a->sin_addr, 4);
        memcpy(key + 4, &a->sin_port, 2);
        len = 6;
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        memcpy(key, &a->sin6_addr, 16);
        memcpy(key + 16, &a->sin6_port, 2);
        len = 18;
    } else {
        return make_addr(ss);
    }
    /* FNV-1a over the key */
    unsigned int h = 2166136261u;
    for (int i = 0; i < len; i++) {
        h = (h ^ key[i]) * 16777619u;
    }
    cache_entry *e = &cache[h & (CACHE_SLOTS - 1)];
    if (e->len == len && memcmp(e->key, key, len) == 0) {
        Py_INCREF(e->addr);
        return e->addr;
    }
    PyObject *addr = make_addr(ss);
    if (addr == NULL) {
        return NULL;
    }
    Py_XSETREF(e->addr, Py_NewRef(addr));
    memcpy(e->key, key, len);
    e->len = len;
    return addr;
}

static int
fd_of(PyObject *obj)
{
    if (PyLong_CheckExact(obj)) {
        return (int)PyLong_AsLong(obj);
    }
    return PyObject_AsFileDescriptor(obj);
}

static void
Receiver_dealloc(Receiver *self)
{
    Py_XDECREF(self->addrs);
    Py_XDECREF(self->lens);
    Py_XDECREF(self->views);
    Py_XDECREF(self->slots);
    Py_XDECREF(self->buffer);
    if (self->cache != NULL) {
        for (int i = 0; i < CACHE_SLOTS; i++) {
            Py_XDECREF(self->cache[i].addr);
        }
        PyMem_Free(self->cache);
    }
    PyMem_Free(self->msgs);
    PyMem_Free(self->iov);
    PyMem_Free(self->names);
    table_clear(&self->to_peer);
    table_clear(&self->to_client);
    PyMem_Free(self->fd_refs);
    PyMem_Free(self->out_msgs);
    PyMem_Free(self->out_iov);
    PyMem_Free(self->out_fd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Receiver_new(PyTypeObject *type, PyObject *args, PyObject *kwds);

/* recvmmsg into the slots: n >= 0, -1 when nothing is ready, -2 with an exception set. */
static int
receive(Receiver *self, PyObject *sock)
{
    int fd = fd_of(sock);
    if (fd < 0) { /* a closed socket: the same error recvfrom_into would raise */
        PyErr_Clear();
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -2;
    }
    for (Py_ssize_t i = 0; i < self->count; i++) {
        self->msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage);
        self->msgs[i].msg_hdr.msg_flags = 0;
    }
    int n = recvmmsg(fd, self->msgs, (unsigned int)self->count, MSG_DONTWAIT, NULL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return -1;
        }
        PyErr_SetFromErrno(PyExc_OSError);
        return -2;
    }
    return n;
}

/* Fill addrs and lens for datagrams [from, n). */
static int
publish(Receiver *self, int from, int n)
{
    for (int i = from; i < n; i++) {
        PyObject *addr = cached_addr(self->cache, &self->names[i]);
        if (addr == NULL) {
            return -1;
        }
        PyObject *old_addr = PyList_GET_ITEM(self->addrs, i);
        PyList_SET_ITEM(self->addrs, i, addr);
        Py_XDECREF(old_addr);
        PyObject *len = PyLong_FromUnsignedLong(self->msgs[i].msg_len);
        if (len == NULL) {
            return -1;
        }
        PyObject *old = PyList_GET_ITEM(self->lens, i);
        PyList_SET_ITEM(self->lens, i, len);
        Py_XDECREF(old);
    }
    return 0;
}

static PyObject *
Receiver_recv(Receiver *self, PyObject *sock)
{
    int n = receive(self, sock);
    if (n == -2 || (n > 0 && publish(self, 0, n) < 0)) {
        return NULL;
    }
    return PyLong_FromLong(n);
}

/* UDP GSO: a run of datagrams of one size to one destination through one socket leaves as
 * one sendmsg with UDP_SEGMENT, which the kernel splits; it costs a fraction of a sendmmsg of
 * the same datagrams (one route lookup, one pass down the stack). Peer traffic relayed to a
 * client comes in such runs. Limits: at most GSO_SEGMENTS datagrams and GSO_BYTES in all, and
 * datagrams that fit an Ethernet MTU (a larger segment than the path MTU is refused). */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#define GSO_SEGMENTS 64
#define GSO_BYTES 65000
#define GSO_MAX_SEGMENT 1452

/* How many of out_msgs[from, to) from `from` on go to the same place with the same size. */
static int
gso_run(Receiver *self, int from, int to)
{
    const struct msghdr *first = &self->out_msgs[from].msg_hdr;
    size_t size = first->msg_iov->iov_len;
    if (size == 0 || size > GSO_MAX_SEGMENT) {
        return 1;
    }
    int count = 1;
    size_t total = size;
    while (from + count < to && count < GSO_SEGMENTS && total + size <= GSO_BYTES) {
        const struct msghdr *h = &self->out_msgs[from + count].msg_hdr;
        if (h->msg_iov->iov_len != size || h->msg_namelen != first->msg_namelen ||
            (h->msg_name != first->msg_name &&
             memcmp(h->msg_name, first->msg_name, first->msg_namelen) != 0)) {
            break;
        }
        count++;
        total += size;
    }
    return count;
}

/* Send out_msgs[from, from + count) as one GSO send: 0 when sent, count when it would block
 * (counted as drops), -1 when GSO was not taken (the caller sends them one by one; a device
 * or kernel without it turns GSO off for this Receiver). */
static int
send_gso(Receiver *self, int fd, int from, int count)
{
    const struct msghdr *first = &self->out_msgs[from].msg_hdr;
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr h;
    memset(&h, 0, sizeof h);
    h.msg_name = first->msg_name;
    h.msg_namelen = first->msg_namelen;
    h.msg_iov = &self->out_iov[from]; /* the iovecs of consecutive messages are consecutive */
    h.msg_iovlen = (size_t)count;
    h.msg_control = control.buf;
    h.msg_controllen = sizeof control.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&h);
    c->cmsg_level = SOL_UDP;
    c->cmsg_type = UDP_SEGMENT;
    c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    uint16_t segment = (uint16_t)first->msg_iov->iov_len;
    memcpy(CMSG_DATA(c), &segment, sizeof segment);
    for (;;) {
        if (sendmsg(fd, &h, MSG_DONTWAIT) >= 0) {
            self->gso_sends++;
            return 0;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
            self->send_drops += (unsigned long long)count;
            return count;
        }
        if (errno == EIO || errno == ENOPROTOOPT || errno == EOPNOTSUPP) {
            self->gso = 0; /* no GSO here: never try again */
        }
        return -1;
    }
}

/* Send out_msgs[0, count) (out_fd[i]: the socket of message i), one sendmmsg per run with
 * the same socket; returns how many did not go out, and counts them as drops or errors. */
static int
send_out(Receiver *self, int count)
{
    int lost = 0;
    int i = 0;
    while (i < count) {
        int fd = self->out_fd[i];
        int run = 1;
        while (i + run < count && self->out_fd[i + run] == fd) {
            run++;
        }
        int done = 0;
        while (done < run) {
            struct mmsghdr *m = &self->out_msgs[i + done];
            int r;
            int same = self->gso ? gso_run(self, i + done, i + run) : 1;
            if (same >= 2) {
                int g = send_gso(self, fd, i + done, same);
                if (g >= 0) { /* sent, or dropped whole (would block) */
                    lost += g;
                    done += same;
                    continue;
                }
                /* not taken: the plain path below sends them */
            }
            if (run - done == 1) {
                ssize_t sent = sendto(fd, m->msg_hdr.msg_iov->iov_base,
                                      m->msg_hdr.msg_iov->iov_len, MSG_DONTWAIT,
                                      (struct sockaddr *)m->msg_hdr.msg_name,
                                      m->msg_hdr.msg_namelen);
                r = sent < 0 ? -1 : 1;
            } else {
                r = sendmmsg(fd, m, (unsigned int)(run - done), MSG_DONTWAIT);
            }
            if (r < 0) {
                if (errno == EINTR) {
                    continue;
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                    self->send_drops++;
                } else {
                    self->send_errors++;
                }
                lost++;
                done++; /* the first message of the rest failed: skip it */
            } else {
                done += r;
            }
        }
        i += run;
    }
    return lost;
}

static void
queue_out(Receiver *self, int at, const route *r, char *data, size_t len)
{
    self->out_iov[at].iov_base = data;
    self->out_iov[at].iov_len = len;
    self->out_msgs[at].msg_hdr.msg_name = (void *)&r->dst;
    self->out_msgs[at].msg_hdr.msg_namelen = r->dlen;
    self->out_fd[at] = r->fd;
}

static PyObject *str_packets, *str_bytes, *str_buckets;

/* obj.name += v */
static int
add_attr(PyObject *obj, PyObject *name, unsigned long long v)
{
    PyObject *old = PyObject_GetAttr(obj, name);
    if (old == NULL) {
        return -1;
    }
    PyObject *inc = PyLong_FromUnsignedLongLong(v);
    PyObject *sum = inc == NULL ? NULL : PyNumber_Add(old, inc);
    Py_DECREF(old);
    Py_XDECREF(inc);
    if (sum == NULL) {
        return -1;
    }
    int rc = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return rc;
}

/* list[i] += v */
static int
add_item(PyObject *list, Py_ssize_t i, long long v)
{
    if (!PyList_Check(list) || PyList_GET_SIZE(list) <= i) {
        PyErr_SetString(PyExc_TypeError, "expected a list of counters");
        return -1;
    }
    PyObject *inc = PyLong_FromLongLong(v);
    PyObject *sum = inc == NULL ? NULL : PyNumber_Add(PyList_GET_ITEM(list, i), inc);
    Py_XDECREF(inc);
    if (sum == NULL) {
        return -1;
    }
    return PyList_SetItem(list, i, sum);
}

#define SIZE_BUCKETS 16

/* What Stats.count_relayed does, once per batch: packets, payload bytes and relay.packet.size
 * buckets (100 bytes wide, the last one for 1500 and more, as the XDP program counts). */
static int
count_relayed(PyObject *stats, int packets, unsigned long long bytes, const long *buckets)
{
    if (packets == 0) {
        return 0;
    }
    if (add_attr(stats, str_packets, (unsigned long long)packets) < 0 ||
        add_attr(stats, str_bytes, bytes) < 0) {
        return -1;
    }
    PyObject *list = PyObject_GetAttr(stats, str_buckets);
    if (list == NULL) {
        return -1;
    }
    int rc = 0;
    for (int b = 0; b < SIZE_BUCKETS && rc == 0; b++) {
        if (buckets[b]) {
            rc = add_item(list, b, buckets[b]);
        }
    }
    Py_DECREF(list);
    return rc;
}

static inline int
size_bucket(size_t length)
{
    return length < 1500 ? (int)(length / 100) : SIZE_BUCKETS - 1;
}

static PyObject *
relay_result(int n, int k)
{
    return Py_BuildValue("(ii)", n, k);
}

/* The end of a relay batch: send datagrams [0, k), count them, and publish [k, n) (their
 * senders and lengths) for the core. */
static int
finish_batch(Receiver *self, PyObject *stats, int n, int k, unsigned long long bytes,
             const long *buckets, int *np, int *kp)
{
    send_out(self, k);
    if (count_relayed(stats, k, bytes, buckets) < 0) {
        return -1;
    }
    if (n > 0 && publish(self, k, n) < 0) {
        return -1;
    }
    *np = n;
    *kp = k;
    return 0;
}

/* relay_clients(sock, stats) -> (n, k): read a batch from a listen socket; relay datagrams
 * [0, k) (ChannelData on channels the mirror knows) to their peers, counting them in stats;
 * datagrams [k, n) are left, in addrs/lens, for the core. n is -1 when nothing was ready. */
static int
relay_clients_batch(Receiver *self, PyObject *sock, PyObject *stats, int *np, int *kp)
{
    int n = receive(self, sock);
    if (n == -2) {
        return -1;
    }
    int k = 0;
    unsigned long long bytes = 0;
    long buckets[SIZE_BUCKETS] = {0};
    if (self->to_peer.len > 0) {
        for (; k < n; k++) {
            unsigned char *d = (unsigned char *)self->buf + k * self->slot + self->headroom;
            size_t size = self->msgs[k].msg_len;
            if (size < 4 || d[0] < 0x40 || d[0] > 0x4F) {
                break;
            }
            unsigned int channel = (unsigned int)d[0] << 8 | d[1];
            size_t length = (size_t)d[2] << 8 | d[3];
            route_key key;
            if (4 + length > size || key_of(&key, &self->names[k], channel) < 0) {
                break;
            }
            const route *r = table_find(&self->to_peer, &key, hash_key(&key));
            if (r == NULL) {
                break;
            }
            queue_out(self, k, r, (char *)d + 4, length);
            bytes += length;
            buckets[size_bucket(length)]++;
        }
    }
    return finish_batch(self, stats, n, k, bytes, buckets, np, kp);
}

static PyObject *
Receiver_relay_clients(Receiver *self, PyObject *const *args, Py_ssize_t nargs)
{
    int n, k;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "relay_clients(sock, stats)");
        return NULL;
    }
    if (relay_clients_batch(self, args[0], args[1], &n, &k) < 0) {
        return NULL;
    }
    return relay_result(n, k);
}

/* relay_peers(sock, port, stats) -> (n, k): read a batch from the allocation socket on port;
 * relay datagrams [0, k) (from peers of channels the mirror knows) to their clients as
 * ChannelData, with the header written in the headroom, counting them in stats; datagrams
 * [k, n) are left for the core. */
static int
relay_peers_batch(Receiver *self, PyObject *sock, long port, PyObject *stats, int *np,
                  int *kp)
{
    if (self->headroom < 4) {
        PyErr_SetString(PyExc_ValueError, "relay_peers needs 4 bytes of headroom");
        return -1;
    }
    int n = receive(self, sock);
    if (n == -2) {
        return -1;
    }
    int k = 0;
    unsigned long long bytes = 0;
    long buckets[SIZE_BUCKETS] = {0};
    if (self->to_client.len > 0) {
        for (; k < n; k++) {
            route_key key;
            if (key_of(&key, &self->names[k], (unsigned int)port) < 0) {
                break;
            }
            const route *r = table_find(&self->to_client, &key, hash_key(&key));
            if (r == NULL) {
                break;
            }
            size_t length = self->msgs[k].msg_len;
            unsigned char *h = (unsigned char *)self->buf + k * self->slot + self->headroom - 4;
            h[0] = (unsigned char)(r->channel >> 8);
            h[1] = (unsigned char)r->channel;
            h[2] = (unsigned char)(length >> 8);
            h[3] = (unsigned char)length;
            queue_out(self, k, r, (char *)h, length + 4);
            bytes += length;
            buckets[size_bucket(length)]++;
        }
    }
    return finish_batch(self, stats, n, k, bytes, buckets, np, kp);
}

static PyObject *
Receiver_relay_peers(Receiver *self, PyObject *const *args, Py_ssize_t nargs)
{
    int n, k;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "relay_peers(sock, port, stats)");
        return NULL;
    }
    long port = PyLong_AsLong(args[1]);
    if ((port == -1 && PyErr_Occurred()) ||
        relay_peers_batch(self, args[0], port, args[2], &n, &k) < 0) {
        return NULL;
    }
    return relay_result(n, k);
}

/* The reader callbacks: up to READ_BATCHES batches from one ready socket (then back to the
 * loop, so one busy socket cannot starve the others or the timers). What the mirror does not
 * route is handed to handoff(sock, ..., n, k) for the core. A receive error (e.g. a queued
 * ICMP error) skips to the next batch: the socket stays usable. No Python frame runs for a
 * batch the mirror routes whole. */
#define READ_BATCHES 4

static int
handed_off(PyObject *handoff, PyObject *const *args, size_t nargs, int n, int k)
{
    PyObject *call[7];
    for (size_t i = 0; i < nargs; i++) {
        call[i] = args[i];
    }
    PyObject *pn = PyLong_FromLong(n), *pk = PyLong_FromLong(k);
    PyObject *r = NULL;
    if (pn != NULL && pk != NULL) {
        call[nargs] = pn;
        call[nargs + 1] = pk;
        r = PyObject_Vectorcall(handoff, call, nargs + 2, NULL);
    }
    Py_XDECREF(pn);
    Py_XDECREF(pk);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* The loop shared by both readers: args are (stats, handoff, sock[, port]); port < 0 reads a
 * listen socket (client traffic), otherwise the allocation socket on port (peer traffic). The
 * handoff gets the reader's arguments after handoff, then n and k. */
static PyObject *
drain(Receiver *self, PyObject *const *args, size_t handed, long port)
{
    for (int b = 0; b < READ_BATCHES; b++) {
        int n, k;
        int rc = port < 0 ? relay_clients_batch(self, args[2], args[0], &n, &k)
                          : relay_peers_batch(self, args[2], port, args[0], &n, &k);
        if (rc < 0) {
            if (!PyErr_ExceptionMatches(PyExc_OSError)) {
                return NULL;
            }
            PyErr_Clear();
            continue;
        }
        if (n < 0) {
            break;
        }
        self->datagrams_in += (unsigned long long)n;
        if (k < n && handed_off(args[1], args + 2, handed, n, k) < 0) {
            return NULL;
        }
        if (n < self->count) {
            break;
        }
    }
    Py_RETURN_NONE;
}

/* drain_clients(stats, handoff, sock): the listen socket's reader; handoff(sock, n, k). */
static PyObject *
Receiver_drain_clients(Receiver *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "drain_clients(stats, handoff, sock)");
        return NULL;
    }
    return drain(self, args, 1, -1);
}

/* drain_peers(stats, handoff, sock, port): an allocation socket's reader;
 * handoff(sock, port, n, k). */
static PyObject *
Receiver_drain_peers(Receiver *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "drain_peers(stats, handoff, sock, port)");
        return NULL;
    }
    long port = PyLong_AsLong(args[3]);
    if (port == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "drain_peers: port out of range");
        return NULL;
    }
    return drain(self, args, 2, port);
}

/* -- keeping the mirror ---------------------------------------------------------------------- */

static int
fd_ref(Receiver *self, int fd, int delta)
{
    if (fd < 0) {
        return 0;
    }
    if ((size_t)fd >= self->fd_cap) {
        size_t cap = self->fd_cap ? self->fd_cap : 1024;
        while (cap <= (size_t)fd) {
            cap *= 2;
        }
        int *refs = PyMem_Realloc(self->fd_refs, cap * sizeof(int));
        if (refs == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memset(refs + self->fd_cap, 0, (cap - self->fd_cap) * sizeof(int));
        self->fd_refs = refs;
        self->fd_cap = cap;
    }
    self->fd_refs[fd] += delta;
    return 0;
}

/* Parse an (host, port) address into a key with number; 1: not an address, -1: exception. */
static int
key_of_addr(PyObject *addr, unsigned int number, route_key *key,
            struct sockaddr_storage *ss, socklen_t *len)
{
    int bad = parse_addr(addr, ss, len);
    if (bad != 0) {
        return bad;
    }
    return key_of(key, ss, number) < 0 ? 1 : 0;
}

static int
table_drop(Receiver *self, route_table *t, const route_key *key)
{
    int fd = table_remove(t, key);
    return fd >= 0 ? fd_ref(self, fd, -1) : 0;
}

/* Set or replace the entry for key: leaves through fd to dst (a parsed address). */
static PyObject *
table_set(Receiver *self, route_table *t, const route_key *key, int fd, PyObject *dst,
          unsigned int channel)
{
    struct sockaddr_storage ss;
    socklen_t len = 0;
    int bad = parse_addr(dst, &ss, &len);
    if (bad < 0) {
        return NULL;
    }
    if (bad > 0 || fd < 0 || len > sizeof(struct sockaddr_in6)) { /* cannot send there */
        if (table_drop(self, t, key) < 0) {
            return NULL;
        }
        Py_RETURN_FALSE;
    }
    if (fd_ref(self, fd, 1) < 0) {
        return NULL;
    }
    route *r = table_put(t, key);
    if (r == NULL) {
        fd_ref(self, fd, -1);
        return PyErr_NoMemory();
    }
    if (r->fd >= 0 && fd_ref(self, r->fd, -1) < 0) {
        return NULL;
    }
    r->fd = fd;
    r->channel = (unsigned short)channel;
    memcpy(&r->dst, &ss, len);
    r->dlen = len;
    Py_RETURN_TRUE;
}

static PyObject *
Receiver_set_to_peer(Receiver *self, PyObject *args)
{
    PyObject *client, *peer;
    unsigned int channel;
    int fd;
    if (!PyArg_ParseTuple(args, "OIiO", &client, &channel, &fd, &peer)) {
        return NULL;
    }
    route_key key;
    struct sockaddr_storage ss;
    socklen_t len;
    int bad = key_of_addr(client, channel & 0xFFFF, &key, &ss, &len);
    if (bad < 0) {
        return NULL;
    }
    if (bad > 0) {
        Py_RETURN_FALSE;
    }
    return table_set(self, &self->to_peer, &key, fd, peer, 0);
}

static PyObject *
Receiver_set_to_client(Receiver *self, PyObject *args)
{
    PyObject *peer, *client;
    unsigned int port, channel;
    int fd;
    if (!PyArg_ParseTuple(args, "IOiOI", &port, &peer, &fd, &client, &channel)) {
        return NULL;
    }
    route_key key;
    struct sockaddr_storage ss;
    socklen_t len;
    int bad = key_of_addr(peer, port & 0xFFFF, &key, &ss, &len);
    if (bad < 0) {
        return NULL;
    }
    if (bad > 0) {
        Py_RETURN_FALSE;
    }
    return table_set(self, &self->to_client, &key, fd, client, channel & 0xFFFF);
}

static PyObject *
drop_entry(Receiver *self, route_table *t, PyObject *addr, unsigned int number)
{
    route_key key;
    struct sockaddr_storage ss;
    socklen_t len;
    int bad = key_of_addr(addr, number & 0xFFFF, &key, &ss, &len);
    if (bad < 0) {
        return NULL;
    }
    if (bad == 0 && table_drop(self, t, &key) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Receiver_drop_to_peer(Receiver *self, PyObject *args)
{
    PyObject *client;
    unsigned int channel;
    if (!PyArg_ParseTuple(args, "OI", &client, &channel)) {
        return NULL;
    }
    return drop_entry(self, &self->to_peer, client, channel);
}

static PyObject *
Receiver_drop_to_client(Receiver *self, PyObject *args)
{
    PyObject *peer;
    unsigned int port;
    if (!PyArg_ParseTuple(args, "IO", &port, &peer)) {
        return NULL;
    }
    return drop_entry(self, &self->to_client, peer, port);
}

static PyObject *
Receiver_drop_fd(Receiver *self, PyObject *arg)
{
    int fd = (int)PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    size_t removed = 0;
    if (fd >= 0 && (size_t)fd < self->fd_cap && self->fd_refs[fd] > 0) {
        removed = table_remove_fd(&self->to_peer, fd) + table_remove_fd(&self->to_client, fd);
        self->fd_refs[fd] = 0;
    }
    return PyLong_FromSize_t(removed);
}

static PyObject *
Receiver_clear_routes(Receiver *self, PyObject *unused)
{
    table_clear(&self->to_peer);
    table_clear(&self->to_client);
    if (self->fd_refs != NULL) {
        memset(self->fd_refs, 0, self->fd_cap * sizeof(int));
    }
    Py_RETURN_NONE;
}

/* The address part of a route key, as (host, port). */
static PyObject *
key_addr(const route_key *k)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    if (k->b[0] == 4) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        memcpy(&a->sin_port, k->b + 1, 2);
        memcpy(&a->sin_addr, k->b + 3, 4);
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        memcpy(&a->sin6_port, k->b + 1, 2);
        memcpy(&a->sin6_addr, k->b + 3, 16);
    }
    return make_addr(&ss);
}

/* One route as a plain tuple (see Receiver_debug_routes). */
static PyObject *
route_tuple(const route *r, int to_peer)
{
    unsigned int number = (unsigned int)r->key.b[19] << 8 | r->key.b[20];
    PyObject *from = key_addr(&r->key);
    PyObject *to = make_addr((const struct sockaddr_storage *)&r->dst);
    PyObject *t = NULL;
    if (from != NULL && to != NULL) {
        t = to_peer ? Py_BuildValue("(sOIiO)", "to_peer", from, number, r->fd, to)
                    : Py_BuildValue("(sIOiOI)", "to_client", number, from, r->fd, to,
                                    (unsigned int)r->channel);
    }
    Py_XDECREF(from);
    Py_XDECREF(to);
    return t;
}

static PyObject *
Receiver_debug_routes(Receiver *self, PyObject *unused)
{
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        return NULL;
    }
    for (int which = 0; which < 2; which++) {
        const route_table *t = which == 0 ? &self->to_peer : &self->to_client;
        for (size_t i = 0; i < t->cap; i++) {
            if (!t->slots[i].used) {
                continue;
            }
            PyObject *item = route_tuple(&t->slots[i], which == 0);
            if (item == NULL || PyList_Append(list, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(item);
        }
    }
    if (PyList_Sort(list) < 0) {
        Py_DECREF(list);
        return NULL;
    }
    return list;
}

#define DEBUG_ROUTES_DOC                                                                     \
    "debug_routes() -> list: every route the mirror holds, sorted, as plain tuples (a method\n" \
    "of Receiver, for soaks and tests that compare the mirror with the core's routes):\n"      \
    "('to_client', port, (peer host, peer port), fd, (client host, client port), channel)\n"  \
    "and ('to_peer', (client host, client port), channel, fd, (peer host, peer port)).\n"     \
    "Costs a walk of the whole table: not for the data path."

static PyMethodDef Receiver_methods[] = {
    {"recv", (PyCFunction)Receiver_recv, METH_O,
     "recv(sock) -> n: read up to count datagrams without blocking; -1 when none is ready.\n"
     "Datagram i is views[i][:lens[i]], from addrs[i]."},
    {"relay_clients", (PyCFunction)(void (*)(void))Receiver_relay_clients, METH_FASTCALL,
     "relay_clients(sock, stats) -> (n, k): read a batch from a listen socket, relay [0, k)\n"
     "through the mirror; [k, n) is left in addrs/lens for the core."},
    {"relay_peers", (PyCFunction)(void (*)(void))Receiver_relay_peers, METH_FASTCALL,
     "relay_peers(sock, port, stats) -> (n, k): the same for an allocation socket."},
    {"drain_clients", (PyCFunction)(void (*)(void))Receiver_drain_clients, METH_FASTCALL,
     "drain_clients(stats, handoff, sock): a listen socket's reader callback; batches the\n"
     "mirror does not route whole go on with handoff(sock, n, k)."},
    {"drain_peers", (PyCFunction)(void (*)(void))Receiver_drain_peers, METH_FASTCALL,
     "drain_peers(stats, handoff, sock, port): an allocation socket's reader\n"
     "callback; the rest of a batch goes on with handoff(sock, port, n, k)."},
    {"set_to_peer", (PyCFunction)Receiver_set_to_peer, METH_VARARGS,
     "set_to_peer(client, channel, fd, peer) -> installed: ChannelData from client on channel\n"
     "goes to peer through fd."},
    {"set_to_client", (PyCFunction)Receiver_set_to_client, METH_VARARGS,
     "set_to_client(port, peer, fd, client, channel) -> installed: what peer sends to the\n"
     "allocation port goes to client through fd as ChannelData on channel."},
    {"drop_to_peer", (PyCFunction)Receiver_drop_to_peer, METH_VARARGS,
     "drop_to_peer(client, channel)"},
    {"drop_to_client", (PyCFunction)Receiver_drop_to_client, METH_VARARGS,
     "drop_to_client(port, peer)"},
    {"drop_fd", (PyCFunction)Receiver_drop_fd, METH_O,
     "drop_fd(fd) -> n: remove every route leaving through fd (it is being closed)."},
    {"clear_routes", (PyCFunction)Receiver_clear_routes, METH_NOARGS, "clear_routes()"},
    {"debug_routes", (PyCFunction)Receiver_debug_routes, METH_NOARGS, DEBUG_ROUTES_DOC},
    {NULL}};

static PyObject *
Receiver_get_routes(Receiver *self, void *c)
{
    return Py_BuildValue("(nn)", (Py_ssize_t)self->to_peer.len, (Py_ssize_t)self->to_client.len);
}
static PyObject *
Receiver_get_send_drops(Receiver *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->send_drops);
}
static PyObject *
Receiver_get_gso(Receiver *self, void *c)
{
    return PyBool_FromLong(self->gso);
}
static int
Receiver_set_gso(Receiver *self, PyObject *value, void *c)
{
    int on = value == NULL ? 0 : PyObject_IsTrue(value);
    if (on < 0) {
        return -1;
    }
    self->gso = on;
    return 0;
}
static PyObject *
Receiver_get_gso_sends(Receiver *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->gso_sends);
}
static PyObject *
Receiver_get_datagrams_in(Receiver *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->datagrams_in);
}
static PyObject *
Receiver_get_send_errors(Receiver *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->send_errors);
}

static PyObject *
Receiver_get_addrs(Receiver *self, void *c)
{
    return Py_NewRef(self->addrs);
}
static PyObject *
Receiver_get_lens(Receiver *self, void *c)
{
    return Py_NewRef(self->lens);
}
static PyObject *
Receiver_get_views(Receiver *self, void *c)
{
    return Py_NewRef(self->views);
}
static PyObject *
Receiver_get_slots(Receiver *self, void *c)
{
    return Py_NewRef(self->slots);
}
static PyObject *
Receiver_get_buffer(Receiver *self, void *c)
{
    return Py_NewRef(self->buffer);
}

static PyGetSetDef Receiver_getset[] = {
    {"addrs", (getter)Receiver_get_addrs, NULL, "senders, by slot", NULL},
    {"lens", (getter)Receiver_get_lens, NULL, "datagram lengths, by slot", NULL},
    {"views", (getter)Receiver_get_views, NULL, "slot i's bytes after the headroom", NULL},
    {"slots", (getter)Receiver_get_slots, NULL, "slot i, headroom included", NULL},
    {"buffer", (getter)Receiver_get_buffer, NULL, "the bytearray behind every slot", NULL},
    {"routes", (getter)Receiver_get_routes, NULL, "(client->peer, peer->client) routes", NULL},
    {"send_drops", (getter)Receiver_get_send_drops, NULL, "relayed sends that would block",
     NULL},
    {"send_errors", (getter)Receiver_get_send_errors, NULL, "relayed sends that failed", NULL},
    {"datagrams_in", (getter)Receiver_get_datagrams_in, NULL, "datagrams read by drain_*", NULL},
    {"gso", (getter)Receiver_get_gso, (setter)Receiver_set_gso,
     "whether runs to one destination are sent with UDP GSO", NULL},
    {"gso_sends", (getter)Receiver_get_gso_sends, NULL, "GSO sends made", NULL},
    {NULL}};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "firezone_relay.actors._udpio.Receiver",
    .tp_basicsize = sizeof(Receiver),
    .tp_dealloc = (destructor)Receiver_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Receiver(count, slot, headroom): recvmmsg into count slots of slot bytes.",
    .tp_methods = Receiver_methods,
    .tp_getset = Receiver_getset,
    .tp_new = Receiver_new,
};

static PyObject *
slice_of(PyObject *view, Py_ssize_t lo, Py_ssize_t hi)
{
    PyObject *a = PyLong_FromSsize_t(lo), *b = PyLong_FromSsize_t(hi);
    PyObject *s = (a == NULL || b == NULL) ? NULL : PySlice_New(a, b, NULL);
    Py_XDECREF(a);
    Py_XDECREF(b);
    PyObject *v = s == NULL ? NULL : PyObject_GetItem(view, s);
    Py_XDECREF(s);
    return v;
}

static PyObject *
Receiver_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"count", "slot", "headroom", NULL};
    Py_ssize_t count, slot, headroom;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nnn", kwlist, &count, &slot, &headroom)) {
        return NULL;
    }
    if (count < 1 || count > MAX_BATCH || headroom < 0 || slot <= headroom) {
        PyErr_SetString(PyExc_ValueError, "bad Receiver geometry");
        return NULL;
    }
    Receiver *self = (Receiver *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->count = count;
    self->slot = slot;
    self->headroom = headroom;
    self->buffer = PyByteArray_FromStringAndSize(NULL, count * slot);
    self->msgs = PyMem_Calloc((size_t)count, sizeof(struct mmsghdr));
    self->iov = PyMem_Calloc((size_t)count, sizeof(struct iovec));
    self->names = PyMem_Calloc((size_t)count, sizeof(struct sockaddr_storage));
    self->cache = PyMem_Calloc(CACHE_SLOTS, sizeof(cache_entry));
    self->out_msgs = PyMem_Calloc((size_t)count, sizeof(struct mmsghdr));
    self->out_iov = PyMem_Calloc((size_t)count, sizeof(struct iovec));
    self->out_fd = PyMem_Calloc((size_t)count, sizeof(int));
    self->gso = 1;
    self->addrs = PyList_New(count);
    self->lens = PyList_New(count);
    self->views = PyList_New(count);
    self->slots = PyList_New(count);
    if (self->buffer == NULL || self->slots == NULL || self->msgs == NULL || self->iov == NULL || self->names == NULL ||
        self->cache == NULL || self->out_msgs == NULL || self->out_iov == NULL ||
        self->out_fd == NULL || self->addrs == NULL || self->lens == NULL ||
        self->views == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->buf = PyByteArray_AS_STRING(self->buffer);
    memset(self->buf, 0, (size_t)(count * slot));
    PyObject *whole = PyMemoryView_FromObject(self->buffer);
    if (whole == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    PyObject *empty = Py_BuildValue("(si)", "", 0);
    if (empty == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        self->iov[i].iov_base = self->buf + i * slot + headroom;
        self->iov[i].iov_len = (size_t)(slot - headroom);
        self->msgs[i].msg_hdr.msg_iov = &self->iov[i];
        self->msgs[i].msg_hdr.msg_iovlen = 1;
        self->msgs[i].msg_hdr.msg_name = &self->names[i];
        self->out_msgs[i].msg_hdr.msg_iov = &self->out_iov[i];
        self->out_msgs[i].msg_hdr.msg_iovlen = 1;
        PyList_SET_ITEM(self->addrs, i, Py_NewRef(empty));
        PyList_SET_ITEM(self->lens, i, PyLong_FromLong(0));
        PyObject *v = slice_of(whole, i * slot + headroom, (i + 1) * slot);
        PyObject *f = slice_of(whole, i * slot, (i + 1) * slot);
        if (v == NULL || f == NULL) {
            Py_XDECREF(v);
            Py_XDECREF(f);
            Py_DECREF(whole);
            Py_DECREF(empty);
            Py_DECREF(self);
            return NULL;
        }
        PyList_SET_ITEM(self->views, i, v);
        PyList_SET_ITEM(self->slots, i, f);
    }
    Py_DECREF(whole);
    Py_DECREF(empty);
    return (PyObject *)self;
}

/* -- sending ------------------------------------------------------------------------------ */

static int
parse_addr(PyObject *addr, struct sockaddr_storage *ss, socklen_t *len)
{
    const char *host;
    int port;
    if (!PyTuple_Check(addr) || PyTuple_GET_SIZE(addr) < 2) {
        PyErr_SetString(PyExc_TypeError, "address must be (host, port)");
        return -1;
    }
    host = PyUnicode_AsUTF8(PyTuple_GET_ITEM(addr, 0));
    if (host == NULL) {
        return -1;
    }
    port = (int)PyLong_AsLong(PyTuple_GET_ITEM(addr, 1));
    if (port == -1 && PyErr_Occurred()) {
        return -1;
    }
    memset(ss, 0, sizeof *ss);
    if (strchr(host, ':') != NULL) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((unsigned short)port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) {
            return 1;
        }
        *len = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((unsigned short)port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1) {
            return 1;
        }
        *len = sizeof *a;
    }
    if (port <= 0 || port > 65535) {
        return 1;
    }
    return 0;
}

/* send_batch(items) -> (dropped, failed): items is a flat list [sock, data, addr, ...].
 * Consecutive items with the same socket go out in one sendmmsg. A send that would block, or an
 * item whose socket is None, counts as dropped; any other failure as failed. */
static PyObject *
send_batch(PyObject *module, PyObject *items)
{
    if (!PyList_CheckExact(items) || PyList_GET_SIZE(items) % 3 != 0) {
        PyErr_SetString(PyExc_TypeError, "items must be a flat list of (sock, data, addr)");
        return NULL;
    }
    Py_ssize_t total = PyList_GET_SIZE(items) / 3;
    long blocked = 0, failed = 0;
    struct mmsghdr msgs[64];
    struct iovec iov[64];
    struct sockaddr_storage names[64];
    Py_buffer views[64];
    Py_ssize_t i = 0;
    while (i < total) {
        PyObject *first_sock = PyList_GET_ITEM(items, 3 * i);
        if (first_sock == Py_None) { /* no socket for that family or port: a drop */
            blocked++;
            i++;
            continue;
        }
        int fd = fd_of(first_sock);
        if (fd < 0) { /* closed meanwhile: a failed send, never an exception */
            PyErr_Clear();
            failed++;
            i++;
            continue;
        }
        Py_ssize_t consumed = 0;
        int n = 0;
        while (i + consumed < total && n < 64) {
            Py_ssize_t at = 3 * (i + consumed);
            if (consumed > 0 && PyList_GET_ITEM(items, at) != first_sock) {
                break;
            }
            socklen_t len = 0;
            int bad = parse_addr(PyList_GET_ITEM(items, at + 2), &names[n], &len);
            if (bad == 0 &&
                PyObject_GetBuffer(PyList_GET_ITEM(items, at + 1), &views[n], PyBUF_SIMPLE) < 0) {
                bad = -1;
            }
            if (bad < 0) {
                for (int k = 0; k < n; k++) {
                    PyBuffer_Release(&views[k]);
                }
                return NULL;
            }
            consumed++;
            if (bad > 0) {
                failed++; /* an address no socket can send to: count it, skip it */
                continue;
            }
            iov[n].iov_base = views[n].buf;
            iov[n].iov_len = (size_t)views[n].len;
            memset(&msgs[n], 0, sizeof msgs[n]);
            msgs[n].msg_hdr.msg_iov = &iov[n];
            msgs[n].msg_hdr.msg_iovlen = 1;
            msgs[n].msg_hdr.msg_name = &names[n];
            msgs[n].msg_hdr.msg_namelen = len;
            n++;
        }
        int done = 0;
        while (done < n) {
            int r;
            if (n - done == 1) { /* a run of one: sendto skips sendmmsg's msghdr copies */
                ssize_t sent = sendto(fd, iov[done].iov_base, iov[done].iov_len, MSG_DONTWAIT,
                                      (struct sockaddr *)&names[done],
                                      msgs[done].msg_hdr.msg_namelen);
                r = sent < 0 ? -1 : 1;
            } else {
                r = sendmmsg(fd, msgs + done, (unsigned int)(n - done), MSG_DONTWAIT);
            }
            if (r < 0) {
                if (errno == EINTR) {
                    continue;
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                    blocked++;
                } else {
                    failed++;
                }
                done++; /* the first message of the rest failed: skip it */
            } else {
                done += r;
            }
        }
        for (int k = 0; k < n; k++) {
            PyBuffer_Release(&views[k]);
        }
        i += consumed;
    }
    return Py_BuildValue("(ll)", blocked, failed);
}

static PyMethodDef module_methods[] = {
    {"send_batch", send_batch, METH_O,
     "send_batch(items) -> (dropped, failed): items is a flat list [sock, data, addr, ...]."},
    {NULL}};

static struct PyModuleDef udpio_module = {
    PyModuleDef_HEAD_INIT, "firezone_relay.actors._udpio",
    "recvmmsg/sendmmsg batches for the relay's userspace data path", -1, module_methods};

PyMODINIT_FUNC
PyInit__udpio(void)
{
    str_packets = PyUnicode_InternFromString("relayed_packets_userspace");
    str_bytes = PyUnicode_InternFromString("relayed_bytes_userspace");
    str_buckets = PyUnicode_InternFromString("packet_size_buckets");
    if (str_packets == NULL || str_bytes == NULL || str_buckets == NULL) {
        return NULL;
    }
    if (PyType_Ready(&ReceiverType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&udpio_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Receiver", (PyObject *)&ReceiverType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
