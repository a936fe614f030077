/* Batched UDP I/O for the relay's userspace data path: recvmmsg into preallocated slots and
 * sendmmsg for runs of datagrams that leave through the same socket.
 *
 * Why: on the userspace path a datagram costs two syscalls and the Python socket module's
 * argument parsing and address building. This module reads up to N datagrams per syscall and
 * hands back the senders as (host, port) tuples from a small bounded cache (no string building
 * for a sender seen before), and sends a whole batch in one call. Policy stays in Python: this
 * module knows nothing of TURN. actors/udpio.py has the pure-Python fallback with the same API.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#define CACHE_SLOTS 4096 /* per Receiver; a power of two */
#define MAX_BATCH 1024

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
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Receiver_new(PyTypeObject *type, PyObject *args, PyObject *kwds);

static PyObject *
Receiver_recv(Receiver *self, PyObject *sock)
{
    int fd = fd_of(sock);
    if (fd < 0) { /* a closed socket: the same error recvfrom_into would raise */
        PyErr_Clear();
        errno = EBADF;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    for (Py_ssize_t i = 0; i < self->count; i++) {
        self->msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage);
        self->msgs[i].msg_hdr.msg_flags = 0;
    }
    int n = recvmmsg(fd, self->msgs, (unsigned int)self->count, MSG_DONTWAIT, NULL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return PyLong_FromLong(-1);
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    for (int i = 0; i < n; i++) {
        PyObject *addr = cached_addr(self->cache, &self->names[i]);
        if (addr == NULL) {
            return NULL;
        }
        PyObject *old_addr = PyList_GET_ITEM(self->addrs, i);
        PyList_SET_ITEM(self->addrs, i, addr);
        Py_XDECREF(old_addr);
        PyObject *len = PyLong_FromUnsignedLong(self->msgs[i].msg_len);
        if (len == NULL) {
            return NULL;
        }
        PyObject *old = PyList_GET_ITEM(self->lens, i);
        PyList_SET_ITEM(self->lens, i, len);
        Py_XDECREF(old);
    }
    return PyLong_FromLong(n);
}

static PyMethodDef Receiver_methods[] = {
    {"recv", (PyCFunction)Receiver_recv, METH_O,
     "recv(sock) -> n: read up to count datagrams without blocking; -1 when none is ready.\n"
     "Datagram i is views[i][:lens[i]], from addrs[i]."},
    {NULL}};

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
    {NULL}};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_firezone_relay_udpio.Receiver",
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
    self->addrs = PyList_New(count);
    self->lens = PyList_New(count);
    self->views = PyList_New(count);
    self->slots = PyList_New(count);
    if (self->buffer == NULL || self->slots == NULL || self->msgs == NULL || self->iov == NULL || self->names == NULL ||
        self->cache == NULL || self->addrs == NULL || self->lens == NULL ||
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
    PyModuleDef_HEAD_INIT, "_firezone_relay_udpio",
    "recvmmsg/sendmmsg batches for the relay's userspace data path", -1, module_methods};

PyMODINIT_FUNC
PyInit__firezone_relay_udpio(void)
{
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
