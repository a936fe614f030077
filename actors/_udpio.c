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
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>

#define CACHE_SLOTS 4096 /* per Receiver; a power of two */
#define MAX_BATCH 1024
#define MAX_SLOT (1 << 20)

/* -- the route mirror ------------------------------------------------------------------------ */

/* A route key: an address (family tag, port, 16 address bytes) and a 16-bit number (the channel
 * for client -> peer, the allocation port for peer -> client), zero-padded so keys compare
 * with one memcmp. */
typedef struct {
    unsigned char b[24];
} route_key;

/* The table is hashed with SipHash-1-3 under a key drawn from the OS when the module loads:
 * route keys come from the network (a user picks its peers' addresses), and with an unkeyed
 * hash one user can put all of its routes in one probe run (a datagram on the deepest one
 * then costs a scan of the whole run). With a secret key nobody can aim at a bucket, and no
 * run of occupied slots may grow past CLUSTER_MAX anyway: a route that would make one longer
 * is refused (counted in `refused`), and its datagrams simply go through the core. That one
 * bound limits every probe of a lookup and every shift of a deletion. */
static uint64_t sip_key[2];

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                          \
    do {                                                                                  \
        v0 += v1;                                                                         \
        v1 = ROTL(v1, 13);                                                                \
        v1 ^= v0;                                                                         \
        v0 = ROTL(v0, 32);                                                                \
        v2 += v3;                                                                         \
        v3 = ROTL(v3, 16);                                                                \
        v3 ^= v2;                                                                         \
        v0 += v3;                                                                         \
        v3 = ROTL(v3, 21);                                                                \
        v3 ^= v0;                                                                         \
        v2 += v1;                                                                         \
        v1 = ROTL(v1, 17);                                                                \
        v1 ^= v2;                                                                         \
        v2 = ROTL(v2, 32);                                                                \
    } while (0)

/* SipHash-1-3 (one compression round, three finalization rounds) of in[0, len). */
static uint64_t
siphash13(const unsigned char *in, size_t len)
{
    uint64_t v0 = 0x736f6d6570736575ull ^ sip_key[0], v1 = 0x646f72616e646f6dull ^ sip_key[1];
    uint64_t v2 = 0x6c7967656e657261ull ^ sip_key[0], v3 = 0x7465646279746573ull ^ sip_key[1];
    size_t whole = len & ~(size_t)7;
    for (size_t i = 0; i < whole; i += 8) {
        uint64_t m;
        memcpy(&m, in + i, 8); /* little-endian hosts; the value only needs to be stable */
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t last = (uint64_t)len << 56;
    for (size_t i = 0; i < (len & 7); i++) {
        last |= (uint64_t)in[whole + i] << (8 * i);
    }
    v3 ^= last;
    SIPROUND;
    v0 ^= last;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static uint32_t
hash_key(const route_key *k)
{
    return (uint32_t)siphash13(k->b, sizeof k->b);
}

#define CLUSTER_MAX 128    /* no run of occupied slots is longer */
#define FD_LIMIT (1 << 22) /* routes and counters only for fds below this (RLIMIT_NOFILE's cap) */
#define OUT 0              /* a route's link in the list of its out_fd ... */
#define IN 1               /* ... and in the list of its in_fd */

typedef struct {
    route_key key;
    uint32_t hash;
    int used;
    int out_fd;             /* the socket it leaves through, recorded when it was set */
    int in_fd;              /* the socket it must arrive on, -1: any */
    unsigned short channel; /* peer -> client: the ChannelData header's channel */
    socklen_t dlen;
    struct sockaddr_in6 dst; /* where it goes (a sockaddr_in in its first bytes for v4) */
    uint32_t link[2][2];     /* [OUT|IN][prev, next]: refs (index + 1, 0: none) */
    Py_buffer counts;        /* the allocation's (datagrams, bytes) this way; obj NULL: none */
} route;

/* Count one relayed datagram of length bytes in its allocation's counters. */
static inline void
count_route(const route *r, size_t length)
{
    if (r->counts.obj != NULL) {
        unsigned long long *c = (unsigned long long *)r->counts.buf;
        c[0]++;
        c[1] += length;
    }
}

typedef struct {
    uint32_t hash;
    uint32_t ref; /* 1 + the route's index in `routes`; 0: empty */
} table_slot;

typedef struct {
    table_slot *slots; /* open addressing, linear probing, backward-shift deletion */
    size_t cap, len;
    route *routes; /* the routes themselves, at stable indices (free ones chained by link) */
    size_t routes_cap, routes_used;
    uint32_t free_ref;
    uint32_t *head[2]; /* fd -> first route through it, [OUT] and [IN] */
    size_t fd_cap;
    unsigned long long refused; /* routes not placed: their run would pass CLUSTER_MAX */
} route_table;

static inline route *
route_at(const route_table *t, uint32_t ref)
{
    return &t->routes[ref - 1];
}

/* The slot holding key k (whose hash is h), or -1. */
static Py_ssize_t
table_find_slot(const route_table *t, const route_key *k, uint32_t h)
{
    if (t->len == 0) {
        return -1;
    }
    size_t mask = t->cap - 1;
    size_t i = h & mask;
    for (size_t n = 0; n <= CLUSTER_MAX && n < t->cap; n++, i = (i + 1) & mask) {
        const table_slot *s = &t->slots[i];
        if (s->ref == 0) {
            return -1;
        }
        if (s->hash == h && memcmp(route_at(t, s->ref)->key.b, k->b, sizeof k->b) == 0) {
            return (Py_ssize_t)i;
        }
    }
    return -1;
}

static inline const route *
table_find(const route_table *t, const route_key *k, uint32_t h)
{
    Py_ssize_t i = table_find_slot(t, k, h);
    return i < 0 ? NULL : route_at(t, t->slots[i].ref);
}

/* Put ref (hash h) into slots[cap]: the first empty slot from its home, provided the run of
 * occupied slots it joins stays within CLUSTER_MAX. 0, or -1 when refused. */
static int
place(table_slot *slots, size_t cap, uint32_t h, uint32_t ref)
{
    size_t mask = cap - 1;
    size_t p = h & mask, n = 0;
    while (slots[p].ref != 0) {
        if (++n >= CLUSTER_MAX) {
            return -1;
        }
        p = (p + 1) & mask;
    }
    size_t run = 1; /* the run p would be part of: occupied slots before and after it */
    for (size_t i = (p - 1) & mask; slots[i].ref != 0 && run <= CLUSTER_MAX; i = (i - 1) & mask) {
        run++;
    }
    for (size_t i = (p + 1) & mask; slots[i].ref != 0 && run <= CLUSTER_MAX; i = (i + 1) & mask) {
        run++;
    }
    if (run > CLUSTER_MAX) {
        return -1;
    }
    slots[p].hash = h;
    slots[p].ref = ref;
    return 0;
}

static void
link_add(route_table *t, uint32_t ref, int which, int fd)
{
    route *r = route_at(t, ref);
    uint32_t first = t->head[which][fd];
    r->link[which][0] = 0;
    r->link[which][1] = first;
    if (first != 0) {
        route_at(t, first)->link[which][0] = ref;
    }
    t->head[which][fd] = ref;
}

static void
link_del(route_table *t, uint32_t ref, int which, int fd)
{
    route *r = route_at(t, ref);
    uint32_t prev = r->link[which][0], next = r->link[which][1];
    if (prev != 0) {
        route_at(t, prev)->link[which][1] = next;
    } else {
        t->head[which][fd] = next;
    }
    if (next != 0) {
        route_at(t, next)->link[which][0] = prev;
    }
}

static void
route_unlink(route_table *t, uint32_t ref)
{
    route *r = route_at(t, ref);
    link_del(t, ref, OUT, r->out_fd);
    if (r->in_fd >= 0) {
        link_del(t, ref, IN, r->in_fd);
    }
}

static void
route_link(route_table *t, uint32_t ref)
{
    route *r = route_at(t, ref);
    link_add(t, ref, OUT, r->out_fd);
    if (r->in_fd >= 0) {
        link_add(t, ref, IN, r->in_fd);
    }
}

static void
route_free(route_table *t, uint32_t ref)
{
    route *r = route_at(t, ref);
    if (r->counts.obj != NULL) {
        PyBuffer_Release(&r->counts);
    }
    r->used = 0;
    r->link[OUT][1] = t->free_ref;
    t->free_ref = ref;
    t->routes_used--;
}

/* A fresh route (unlinked, zeroed), or 0 when out of memory. */
static uint32_t
route_new(route_table *t)
{
    uint32_t ref = t->free_ref;
    if (ref != 0) {
        t->free_ref = route_at(t, ref)->link[OUT][1];
    } else {
        if (t->routes_used == t->routes_cap) {
            size_t cap = t->routes_cap ? t->routes_cap * 2 : 64;
            if (cap > UINT32_MAX - 1) {
                return 0;
            }
            route *routes = PyMem_Realloc(t->routes, cap * sizeof(route));
            if (routes == NULL) {
                return 0;
            }
            t->routes = routes;
            t->routes_cap = cap;
        }
        ref = (uint32_t)t->routes_used + 1; /* no free one: every index below is in use */
    }
    memset(route_at(t, ref), 0, sizeof(route));
    t->routes_used++;
    return ref;
}

/* Remove the route in slot i: unlink and free it, then shift the run after it back. No run
 * is longer than CLUSTER_MAX, so neither is this loop. */
static void
table_remove_at(route_table *t, size_t i)
{
    uint32_t ref = t->slots[i].ref;
    route_unlink(t, ref);
    route_free(t, ref);
    size_t mask = t->cap - 1;
    for (size_t j = (i + 1) & mask, n = 0; t->slots[j].ref != 0 && n < t->cap;
         j = (j + 1) & mask, n++) {
        size_t home = t->slots[j].hash & mask;
        /* move j back to the hole at i unless its home lies cyclically in (i, j] */
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            t->slots[i] = t->slots[j];
            i = j;
        }
    }
    t->slots[i].ref = 0;
    t->len--;
}

/* Double the slots (rehashing by the stored hashes). A route that no longer fits within
 * CLUSTER_MAX (possible, never likely, with a keyed hash) is dropped and counted refused. */
static int
table_grow(route_table *t)
{
    size_t cap = t->cap ? t->cap * 2 : 64;
    table_slot *slots = PyMem_Calloc(cap, sizeof(table_slot));
    if (slots == NULL) {
        return -1;
    }
    for (size_t i = 0; i < t->cap; i++) {
        table_slot s = t->slots[i];
        if (s.ref != 0 && place(slots, cap, s.hash, s.ref) < 0) {
            route_unlink(t, s.ref);
            route_free(t, s.ref);
            t->len--;
            t->refused++;
        }
    }
    PyMem_Free(t->slots);
    t->slots = slots;
    t->cap = cap;
    return 0;
}

static int
fd_heads_fit(route_table *t, int fd)
{
    if ((size_t)fd < t->fd_cap) {
        return 0;
    }
    size_t cap = t->fd_cap ? t->fd_cap : 1024;
    while (cap <= (size_t)fd) {
        cap *= 2;
    }
    for (int w = 0; w < 2; w++) {
        uint32_t *heads = PyMem_Realloc(t->head[w], cap * sizeof(uint32_t));
        if (heads == NULL) {
            return -1;
        }
        memset(heads + t->fd_cap, 0, (cap - t->fd_cap) * sizeof(uint32_t));
        t->head[w] = heads;
    }
    t->fd_cap = cap;
    return 0;
}

/* Set the route for k: 1 set (counts, when given, is the route's now), 0 refused (no room
 * within CLUSTER_MAX; nothing is left for k), -1 out of memory. out_fd and in_fd (or -1) are
 * below FD_LIMIT. */
static int
table_set_route(route_table *t, const route_key *k, int out_fd, int in_fd,
                const struct sockaddr_storage *dst, socklen_t dlen, unsigned int channel,
                Py_buffer *counts)
{
    if (fd_heads_fit(t, out_fd > in_fd ? out_fd : in_fd) < 0) {
        return -1;
    }
    uint32_t h = hash_key(k);
    Py_ssize_t at = table_find_slot(t, k, h);
    uint32_t ref;
    if (at >= 0) {
        ref = t->slots[at].ref;
        route_unlink(t, ref);
    } else {
        if ((t->len + 1) * 2 > t->cap && table_grow(t) < 0) {
            return -1;
        }
        ref = route_new(t);
        if (ref == 0) {
            return -1;
        }
        if (place(t->slots, t->cap, h, ref) < 0) {
            route_free(t, ref);
            t->refused++;
            return 0;
        }
        t->len++;
        route *r = route_at(t, ref);
        r->key = *k;
        r->hash = h;
        r->used = 1;
    }
    route *r = route_at(t, ref);
    r->out_fd = out_fd;
    r->in_fd = in_fd;
    r->channel = (unsigned short)channel;
    memset(&r->dst, 0, sizeof r->dst);
    memcpy(&r->dst, dst, dlen);
    r->dlen = dlen;
    if (r->counts.obj != NULL) {
        PyBuffer_Release(&r->counts);
    }
    r->counts = *counts;
    route_link(t, ref);
    return 1;
}

static void
table_remove(route_table *t, const route_key *k)
{
    Py_ssize_t at = table_find_slot(t, k, hash_key(k));
    if (at >= 0) {
        table_remove_at(t, (size_t)at);
    }
}

/* Remove every route leaving through fd or arriving on it: a walk of its lists, each removal
 * a bounded probe and shift, so O(its routes) whatever the table's size. */
static size_t
table_remove_fd(route_table *t, int fd)
{
    size_t removed = 0;
    if (fd < 0 || (size_t)fd >= t->fd_cap) {
        return 0;
    }
    for (int w = 0; w < 2; w++) {
        uint32_t ref;
        while ((ref = t->head[w][fd]) != 0) {
            const route *r = route_at(t, ref);
            Py_ssize_t at = table_find_slot(t, &r->key, r->hash);
            if (at < 0) { /* cannot be: every linked route is in the table */
                route_unlink(t, ref);
                continue;
            }
            table_remove_at(t, (size_t)at);
            removed++;
        }
    }
    return removed;
}

static void
table_clear(route_table *t)
{
    for (size_t i = 0; i < t->cap; i++) { /* every route in use has a slot */
        if (t->slots[i].ref != 0) {
            route *r = route_at(t, t->slots[i].ref);
            if (r->counts.obj != NULL) {
                PyBuffer_Release(&r->counts);
            }
        }
    }
    PyMem_Free(t->slots);
    PyMem_Free(t->routes);
    PyMem_Free(t->head[OUT]);
    PyMem_Free(t->head[IN]);
    unsigned long long refused = t->refused;
    memset(t, 0, sizeof *t);
    t->refused = refused;
}

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

static int parse_addr(PyObject *addr, struct sockaddr_storage *ss, socklen_t *len);

typedef struct {
    unsigned char key[18]; /* v4: 4-byte address + port; v6: 16-byte address + port */
    unsigned char len;     /* 0: empty */
    PyObject *addr;        /* (host, port) */
} cache_entry;

typedef struct {
    PyObject_HEAD
    Py_ssize_t count, slot, headroom;
    char *buf;         /* the bytes of `buffer`, exported to us for our whole life ... */
    Py_buffer export;  /* ... so that nothing can resize or free them under us */
    int exported;
    struct mmsghdr *msgs;
    struct iovec *iov;
    struct sockaddr_storage *names;
    PyObject *addrs; /* list[tuple[str, int]] of length count (checked: Python can resize it) */
    PyObject *lens;  /* list[int] of length count (likewise) */
    char *control;   /* per slot: room for the SO_RXQ_OVFL control message */
    PyObject *views; /* list[memoryview]: slot i from its headroom to its end */
    PyObject *slots; /* list[memoryview]: slot i, headroom included */
    PyObject *buffer; /* bytearray holding every slot */
    cache_entry *cache;
    /* the route mirror: (client, channel) -> allocation socket and peer; (allocation port,
     * peer) -> listen socket, client and channel */
    route_table to_peer, to_client;
    /* kernel receive-queue drops: the last SO_RXQ_OVFL count seen per fd, and their sum */
    uint32_t *ovfl;
    size_t ovfl_cap;
    unsigned long long kernel_drops;
    struct gso_limit *gso_limits; /* per destination: the smallest GSO segment it refused */
    /* the relayed batch being sent */
    struct mmsghdr *out_msgs;
    struct iovec *out_iov;
    int *out_fd;
    unsigned long long send_drops, send_errors, datagrams_in, gso_sends, gso_refused;
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

/* A socket's (or an int's) fd; -1 with an exception set when it has none (closed: ValueError,
 * out of an int's range: OverflowError, not a socket: TypeError). */
static int
fd_of(PyObject *obj)
{
    return PyObject_AsFileDescriptor(obj);
}

static void
Receiver_dealloc(Receiver *self)
{
    Py_XDECREF(self->addrs);
    Py_XDECREF(self->lens);
    Py_XDECREF(self->views);
    Py_XDECREF(self->slots);
    if (self->exported) {
        PyBuffer_Release(&self->export);
    }
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
    PyMem_Free(self->ovfl);
    PyMem_Free(self->gso_limits);
    PyMem_Free(self->control);
    PyMem_Free(self->out_msgs);
    PyMem_Free(self->out_iov);
    PyMem_Free(self->out_fd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Receiver_new(PyTypeObject *type, PyObject *args, PyObject *kwds);

#define CONTROL_BYTES 32 /* >= CMSG_SPACE(sizeof(uint32_t)) */

/* The kernel's count of datagrams it dropped on fd's full receive queue rose to `now`: add the
 * rise to kernel_drops. The count is per socket and only goes up; one lower than the last seen
 * is a new socket on a reused fd number (drop_fd forgets the old one's too). */
static void
count_kernel_drops(Receiver *self, int fd, uint32_t now)
{
    if (fd >= FD_LIMIT) {
        return;
    }
    if ((size_t)fd >= self->ovfl_cap) {
        size_t cap = self->ovfl_cap ? self->ovfl_cap : 1024;
        while (cap <= (size_t)fd) {
            cap *= 2;
        }
        uint32_t *seen = PyMem_Realloc(self->ovfl, cap * sizeof(uint32_t));
        if (seen == NULL) {
            return; /* uncounted, never an error on the data path */
        }
        memset(seen + self->ovfl_cap, 0, (cap - self->ovfl_cap) * sizeof(uint32_t));
        self->ovfl = seen;
        self->ovfl_cap = cap;
    }
    uint32_t last = self->ovfl[fd];
    self->kernel_drops += now >= last ? now - last : now;
    self->ovfl[fd] = now;
}

/* recvmmsg into the slots: n >= 0, -1 when nothing is ready, -2 with an exception set. The
 * socket's fd goes to *fdp. */
static int
receive(Receiver *self, PyObject *sock, int *fdp)
{
    int fd = fd_of(sock);
    if (fd < 0) { /* a closed socket: the same error recvfrom_into would raise */
        if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_ValueError) &&
            !PyErr_ExceptionMatches(PyExc_OSError)) {
            return -2; /* not a socket at all (TypeError ...): say so */
        }
        PyErr_Clear();
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -2;
    }
    *fdp = fd;
    for (Py_ssize_t i = 0; i < self->count; i++) {
        struct msghdr *h = &self->msgs[i].msg_hdr;
        h->msg_namelen = sizeof(struct sockaddr_storage);
        h->msg_flags = 0;
        h->msg_controllen = CONTROL_BYTES;
        self->names[i].ss_family = AF_UNSPEC; /* a socket without addresses leaves none */
    }
    int n = recvmmsg(fd, self->msgs, (unsigned int)self->count, MSG_DONTWAIT, NULL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return -1;
        }
        PyErr_SetFromErrno(PyExc_OSError);
        return -2;
    }
    if (n > 0) { /* the count travels with each datagram; the last one's is the newest */
        struct msghdr *h = &self->msgs[n - 1].msg_hdr;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL &&
                c->cmsg_len >= CMSG_LEN(sizeof(uint32_t))) {
                uint32_t dropped;
                memcpy(&dropped, CMSG_DATA(c), sizeof dropped);
                count_kernel_drops(self, fd, dropped);
            }
        }
    }
    return n;
}

/* Fill addrs and lens for datagrams [from, n). Python code can resize both lists (they are
 * handed out as they are, for speed): check. */
static int
publish(Receiver *self, int from, int n)
{
    if (PyList_GET_SIZE(self->addrs) != self->count || PyList_GET_SIZE(self->lens) != self->count) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver.addrs or .lens was resized");
        return -1;
    }
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
    int fd;
    int n = receive(self, sock, &fd);
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

/* What a path takes: a GSO segment must fit the route's MTU (the kernel cannot fragment one),
 * and a send of a larger one fails (EMSGSIZE, or EINVAL from the UDP layer) on every attempt.
 * So the first failure is remembered for that destination, in a small keyed direct-mapped
 * cache: from then on segments of that size or more to it leave as plain datagrams (which the
 * kernel fragments where the path needs it, as it would without GSO); other sizes and other
 * destinations keep GSO. An evicted entry costs one more failed send, never a loop. */
#define GSO_LIMITS 1024 /* a power of two */

struct gso_limit {
    struct sockaddr_in6 dst; /* a sockaddr_in in its first bytes for v4 */
    socklen_t dlen;          /* 0: empty */
    size_t refused;          /* the smallest segment refused */
};

static struct gso_limit *
gso_limit_of(Receiver *self, const struct msghdr *m)
{
    socklen_t len = m->msg_namelen > sizeof(struct sockaddr_in6) ? sizeof(struct sockaddr_in6)
                                                                 : m->msg_namelen;
    return &self->gso_limits[siphash13(m->msg_name, len) & (GSO_LIMITS - 1)];
}

/* The smallest segment size that destination refused, or SIZE_MAX. */
static size_t
gso_refused_size(Receiver *self, const struct msghdr *m)
{
    const struct gso_limit *e = gso_limit_of(self, m);
    if (e->dlen != 0 && e->dlen == m->msg_namelen && memcmp(&e->dst, m->msg_name, e->dlen) == 0) {
        return e->refused;
    }
    return SIZE_MAX;
}

static void
gso_refuse(Receiver *self, const struct msghdr *m, size_t size)
{
    struct gso_limit *e = gso_limit_of(self, m);
    socklen_t len = m->msg_namelen > sizeof e->dst ? sizeof e->dst : m->msg_namelen;
    if (e->dlen == len && memcmp(&e->dst, m->msg_name, len) == 0) {
        if (size < e->refused) {
            e->refused = size;
        }
        return;
    }
    memset(&e->dst, 0, sizeof e->dst);
    memcpy(&e->dst, m->msg_name, len);
    e->dlen = len;
    e->refused = size;
}

/* How many of out_msgs[from, to) from `from` on go to the same place with the same size. */
static int
gso_run(Receiver *self, int from, int to)
{
    const struct msghdr *first = &self->out_msgs[from].msg_hdr;
    size_t size = first->msg_iov->iov_len;
    if (size == 0 || size > GSO_MAX_SEGMENT || from + 1 >= to) {
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
    if (count >= 2 && size >= gso_refused_size(self, first)) {
        return 1; /* this path refused segments this big: never again */
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
        } else if (errno == EMSGSIZE || errno == EINVAL) {
            gso_refuse(self, first, first->msg_iov->iov_len); /* too big for this path */
            self->gso_refused++;
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
    self->out_fd[at] = r->out_fd;
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
    PyObject *item = Py_NewRef(PyList_GET_ITEM(list, i)); /* __add__ may change the list */
    PyObject *inc = PyLong_FromLongLong(v);
    PyObject *sum = inc == NULL ? NULL : PyNumber_Add(item, inc);
    Py_DECREF(item);
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
    int fd = -1;
    int n = receive(self, sock, &fd);
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
            if (r == NULL || (r->in_fd >= 0 && r->in_fd != fd)) {
                break;
            }
            queue_out(self, k, r, (char *)d + 4, length);
            count_route(r, length);
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
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "relay_peers: port out of range");
        return -1;
    }
    int fd = -1;
    int n = receive(self, sock, &fd);
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
            size_t length = self->msgs[k].msg_len;
            if (r == NULL || (r->in_fd >= 0 && r->in_fd != fd) || length > 0xFFFF) {
                break;
            }
            unsigned char *h = (unsigned char *)self->buf + k * self->slot + self->headroom - 4;
            h[0] = (unsigned char)(r->channel >> 8);
            h[1] = (unsigned char)r->channel;
            h[2] = (unsigned char)(length >> 8);
            h[3] = (unsigned char)length;
            queue_out(self, k, r, (char *)h, length + 4);
            count_route(r, length);
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

/* An fd a route may record: open, and below FD_LIMIT (so per-fd arrays stay bounded). */
static int
usable_fd(int fd)
{
    return fd >= 0 && fd < FD_LIMIT && fcntl(fd, F_GETFD) != -1;
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

/* counts (None or NULL: none) as a writable buffer of two unsigned 64-bit counters. */
static int
counts_view(PyObject *counts, Py_buffer *view)
{
    memset(view, 0, sizeof *view);
    if (counts == NULL || counts == Py_None) {
        return 0;
    }
    if (PyObject_GetBuffer(counts, view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_ND) < 0) {
        return -1;
    }
    if (view->len < 2 * (Py_ssize_t)sizeof(unsigned long long) ||
        view->itemsize != (Py_ssize_t)sizeof(unsigned long long) || view->format == NULL ||
        strcmp(view->format, "Q") != 0 || !PyBuffer_IsContiguous(view, 'C')) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "counts: two contiguous unsigned 64-bit integers ('Q')");
        return -1;
    }
    return 0;
}

/* Set or replace the entry for key: leaves through out_fd to dst, arrives on in_fd (-1: any),
 * counted in counts (see counts_view). False (and no entry for key) when it cannot be
 * mirrored: a bad address or fd, or no room within the probe bound; those datagrams go to the
 * core. */
static PyObject *
mirror_set(route_table *t, const route_key *key, int out_fd, int in_fd, PyObject *dst,
           unsigned int channel, PyObject *counts)
{
    struct sockaddr_storage ss;
    socklen_t len = 0;
    int bad = parse_addr(dst, &ss, &len);
    if (bad < 0) {
        return NULL;
    }
    if (bad > 0 || !usable_fd(out_fd) || (in_fd != -1 && !usable_fd(in_fd)) ||
        len > sizeof(struct sockaddr_in6)) {
        table_remove(t, key);
        Py_RETURN_FALSE;
    }
    Py_buffer view;
    if (counts_view(counts, &view) < 0) {
        return NULL;
    }
    int rc = table_set_route(t, key, out_fd, in_fd, &ss, len, channel, &view);
    if (rc != 1 && view.obj != NULL) { /* not taken by a route */
        PyBuffer_Release(&view);
    }
    if (rc < 0) {
        return PyErr_NoMemory();
    }
    return PyBool_FromLong(rc);
}

static PyObject *
Receiver_set_to_peer(Receiver *self, PyObject *args)
{
    PyObject *client, *peer, *counts = NULL;
    unsigned int channel;
    int fd, in_fd = -1;
    if (!PyArg_ParseTuple(args, "OIiO|iO", &client, &channel, &fd, &peer, &in_fd, &counts)) {
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
    return mirror_set(&self->to_peer, &key, fd, in_fd, peer, 0, counts);
}

static PyObject *
Receiver_set_to_client(Receiver *self, PyObject *args)
{
    PyObject *peer, *client, *counts = NULL;
    unsigned int port, channel;
    int fd, in_fd = -1;
    if (!PyArg_ParseTuple(args, "IOiOI|iO", &port, &peer, &fd, &client, &channel, &in_fd,
                          &counts)) {
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
    return mirror_set(&self->to_client, &key, fd, in_fd, client, channel & 0xFFFF, counts);
}

static PyObject *
drop_entry(route_table *t, PyObject *addr, unsigned int number)
{
    route_key key;
    struct sockaddr_storage ss;
    socklen_t len;
    int bad = key_of_addr(addr, number & 0xFFFF, &key, &ss, &len);
    if (bad < 0) {
        return NULL;
    }
    if (bad == 0) {
        table_remove(t, &key);
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
    return drop_entry(&self->to_peer, client, channel);
}

static PyObject *
Receiver_drop_to_client(Receiver *self, PyObject *args)
{
    PyObject *peer;
    unsigned int port;
    if (!PyArg_ParseTuple(args, "IO", &port, &peer)) {
        return NULL;
    }
    return drop_entry(&self->to_client, peer, port);
}

/* drop_fd(fd): the socket is about to be closed; every route recorded with it goes, and its
 * kernel-drop count is forgotten (the next socket on that number starts from zero). */
static PyObject *
Receiver_drop_fd(Receiver *self, PyObject *arg)
{
    if (!PyLong_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "drop_fd(fd): fd must be an int");
        return NULL;
    }
    int overflow;
    long fd = PyLong_AsLongAndOverflow(arg, &overflow);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow || fd < 0 || fd >= FD_LIMIT) {
        return PyLong_FromLong(0); /* no route can have recorded it */
    }
    size_t removed =
        table_remove_fd(&self->to_peer, (int)fd) + table_remove_fd(&self->to_client, (int)fd);
    if ((size_t)fd < self->ovfl_cap) {
        self->ovfl[fd] = 0;
    }
    return PyLong_FromSize_t(removed);
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
    struct sockaddr_storage dst;
    memset(&dst, 0, sizeof dst);
    memcpy(&dst, &r->dst, r->dlen);
    PyObject *to = make_addr(&dst);
    PyObject *t = NULL;
    if (from != NULL && to != NULL) {
        t = to_peer ? Py_BuildValue("(sOIiO)", "to_peer", from, number, r->out_fd, to)
                    : Py_BuildValue("(sIOiOI)", "to_client", number, from, r->out_fd, to,
                                    (unsigned int)r->channel);
    }
    Py_XDECREF(from);
    Py_XDECREF(to);
    return t;
}

static PyObject *
Receiver_debug_routes(Receiver *self, PyObject *Py_UNUSED(unused))
{
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        return NULL;
    }
    for (int which = 0; which < 2; which++) {
        const route_table *t = which == 0 ? &self->to_peer : &self->to_client;
        for (size_t i = 0; i < t->cap; i++) {
            if (t->slots[i].ref == 0) {
                continue;
            }
            PyObject *item = route_tuple(route_at(t, t->slots[i].ref), which == 0);
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
     "set_to_peer(client, channel, fd, peer[, in_fd[, counts]]) -> installed: ChannelData from\n"
     "client on channel (read from in_fd, if given) goes to peer through fd, counted in counts\n"
     "(two 'Q' items: datagrams, bytes; held until the route goes). False: not mirrored."},
    {"set_to_client", (PyCFunction)Receiver_set_to_client, METH_VARARGS,
     "set_to_client(port, peer, fd, client, channel[, in_fd[, counts]]) -> installed: what peer sends\n"
     "to the allocation port (its socket: in_fd, if given) goes to client through fd as\n"
     "ChannelData on channel. False: not mirrored (bad address or fd, or refused)."},
    {"drop_to_peer", (PyCFunction)Receiver_drop_to_peer, METH_VARARGS,
     "drop_to_peer(client, channel)"},
    {"drop_to_client", (PyCFunction)Receiver_drop_to_client, METH_VARARGS,
     "drop_to_client(port, peer)"},
    {"drop_fd", (PyCFunction)Receiver_drop_fd, METH_O,
     "drop_fd(fd) -> n: remove every route recorded with fd, leaving through it or arriving\n"
     "on it (it is about to be closed), in O(its routes)."},
    {"debug_routes", (PyCFunction)Receiver_debug_routes, METH_NOARGS, DEBUG_ROUTES_DOC},
    {NULL}};

static PyObject *
Receiver_get_routes(Receiver *self, void *Py_UNUSED(c))
{
    return Py_BuildValue("(nn)", (Py_ssize_t)self->to_peer.len, (Py_ssize_t)self->to_client.len);
}
static PyObject *
Receiver_get_send_drops(Receiver *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->send_drops);
}
static PyObject *
Receiver_get_gso(Receiver *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->gso);
}
static int
Receiver_set_gso(Receiver *self, PyObject *value, void *Py_UNUSED(c))
{
    int on = value == NULL ? 0 : PyObject_IsTrue(value);
    if (on < 0) {
        return -1;
    }
    self->gso = on;
    return 0;
}
static PyObject *
Receiver_get_gso_sends(Receiver *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->gso_sends);
}
static PyObject *
Receiver_get_datagrams_in(Receiver *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->datagrams_in);
}
static PyObject *
Receiver_get_send_errors(Receiver *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->send_errors);
}
static PyObject *
Receiver_get_refused(Receiver *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->to_peer.refused + self->to_client.refused);
}
static PyObject *
Receiver_get_kernel_drops(Receiver *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->kernel_drops);
}
static PyObject *
Receiver_get_gso_refused(Receiver *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->gso_refused);
}
/* The longest run of occupied slots in either table: what a lookup or a deletion can cost. */
static PyObject *
Receiver_get_longest_run(Receiver *self, void *Py_UNUSED(c))
{
    size_t longest = 0;
    for (int which = 0; which < 2; which++) {
        const route_table *t = which == 0 ? &self->to_peer : &self->to_client;
        size_t run = 0;
        for (size_t i = 0; i < 2 * t->cap; i++) { /* twice round: a run may wrap */
            run = t->slots[i & (t->cap - 1)].ref != 0 ? run + 1 : 0;
            if (run > longest) {
                longest = run;
            }
        }
    }
    return PyLong_FromSize_t(longest > CLUSTER_MAX ? CLUSTER_MAX + 1 : longest);
}

static PyObject *
Receiver_get_addrs(Receiver *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->addrs);
}
static PyObject *
Receiver_get_lens(Receiver *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->lens);
}
static PyObject *
Receiver_get_views(Receiver *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->views);
}
static PyObject *
Receiver_get_slots(Receiver *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->slots);
}
static PyObject *
Receiver_get_buffer(Receiver *self, void *Py_UNUSED(c))
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
    {"gso_refused", (getter)Receiver_get_gso_refused, NULL,
     "GSO sends a path refused as too big (never retried at that size to that destination)",
     NULL},
    {"refused", (getter)Receiver_get_refused, NULL,
     "routes not mirrored: no room within the probe bound (they go through the core)", NULL},
    {"longest_run", (getter)Receiver_get_longest_run, NULL,
     "the longest run of occupied slots (bounds a probe or shift; a walk: tests only)", NULL},
    {"kernel_drops", (getter)Receiver_get_kernel_drops, NULL,
     "datagrams the kernel dropped on full receive queues (SO_RXQ_OVFL, where set)", NULL},
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
    /* bounded so that count * slot cannot overflow and each slot's length fits an int */
    if (count < 1 || count > MAX_BATCH || headroom < 0 || slot <= headroom || slot > MAX_SLOT) {
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
    self->control = PyMem_Calloc((size_t)count, CONTROL_BYTES);
    self->gso_limits = PyMem_Calloc(GSO_LIMITS, sizeof(struct gso_limit));
    self->gso = 1;
    self->addrs = PyList_New(count);
    self->lens = PyList_New(count);
    self->views = PyList_New(count);
    self->slots = PyList_New(count);
    if (self->buffer == NULL || self->slots == NULL || self->msgs == NULL || self->iov == NULL || self->names == NULL ||
        self->cache == NULL || self->out_msgs == NULL || self->out_iov == NULL ||
        self->out_fd == NULL || self->addrs == NULL || self->lens == NULL ||
        self->views == NULL || self->control == NULL || self->gso_limits == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    /* held until dealloc: the bytearray cannot be resized (BufferError) while it is exported */
    if (PyObject_GetBuffer(self->buffer, &self->export, PyBUF_WRITABLE) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->exported = 1;
    self->buf = self->export.buf;
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
        self->msgs[i].msg_hdr.msg_control = self->control + i * CONTROL_BYTES;
        self->msgs[i].msg_hdr.msg_controllen = CONTROL_BYTES;
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
static PyObject *send_items(PyObject *items);

static PyObject *
send_batch(PyObject *Py_UNUSED(module), PyObject *items)
{
    if (!PyList_CheckExact(items) || PyList_GET_SIZE(items) % 3 != 0) {
        PyErr_SetString(PyExc_TypeError, "items must be a flat list of (sock, data, addr)");
        return NULL;
    }
    /* a snapshot: fileno(), __index__ and the like may run Python code that changes the list */
    PyObject *snap = PyList_AsTuple(items);
    if (snap == NULL) {
        return NULL;
    }
    PyObject *r = send_items(snap);
    Py_DECREF(snap);
    return r;
}

static PyObject *
send_items(PyObject *items)
{
    Py_ssize_t total = PyTuple_GET_SIZE(items) / 3;
    long blocked = 0, failed = 0;
    struct mmsghdr msgs[64];
    struct iovec iov[64];
    struct sockaddr_storage names[64];
    Py_buffer views[64];
    Py_ssize_t i = 0;
    while (i < total) {
        PyObject *first_sock = PyTuple_GET_ITEM(items, 3 * i);
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
            if (consumed > 0 && PyTuple_GET_ITEM(items, at) != first_sock) {
                break;
            }
            socklen_t len = 0;
            int bad = parse_addr(PyTuple_GET_ITEM(items, at + 2), &names[n], &len);
            if (bad == 0 &&
                PyObject_GetBuffer(PyTuple_GET_ITEM(items, at + 1), &views[n], PyBUF_SIMPLE) < 0) {
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

/* The version of this module's Python surface: bump it with every change that
 * actors/udpio.py must follow (it has the same number, and falls back to pure Python on a
 * mismatch, e.g. a stale build left installed beside newer sources). */
#define UDPIO_API_VERSION 4

static struct PyModuleDef udpio_module = {
    PyModuleDef_HEAD_INIT, "firezone_relay.actors._udpio",
    "recvmmsg/sendmmsg batches for the relay's userspace data path", -1, module_methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC
PyInit__udpio(void)
{
    str_packets = PyUnicode_InternFromString("relayed_packets_userspace");
    str_bytes = PyUnicode_InternFromString("relayed_bytes_userspace");
    str_buckets = PyUnicode_InternFromString("packet_size_buckets");
    if (str_packets == NULL || str_bytes == NULL || str_buckets == NULL) {
        return NULL;
    }
    /* the route table's hash key: secret, per process */
    ssize_t got;
    do {
        got = getrandom(sip_key, sizeof sip_key, 0);
    } while (got < 0 && errno == EINTR);
    if (got != (ssize_t)sizeof sip_key) {
        PyErr_SetString(PyExc_ImportError, "getrandom() gave no key for the route table");
        return NULL;
    }
    if (PyType_Ready(&ReceiverType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&udpio_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Receiver", (PyObject *)&ReceiverType) < 0 ||
        PyModule_AddIntConstant(m, "API_VERSION", UDPIO_API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
