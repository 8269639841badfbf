/* probes/_recread.c — read the socket probe's data and summary records in one pass.
 *
 * Decoding a record with struct makes a Python int of every header field and
 * then slices the payload in Python: about 0.5 µs for a data record, and 2.7 µs
 * for a summary, whose tail ring adds five fields per slot. These two functions
 * read the same little-endian layout (probes/sockets.h) straight from the bytes
 * and return what probes/socket_events.py builds its events from, in the order
 * and with the slicing of its Python reading, which is their reference (tests
 * compare the two on generated records) and runs when this module is not built.
 *
 * Both read the record buf[off:off + size] (a record of a drained batch, see
 * probes/_ringdrain.c, or a record on its own at offset 0):
 *
 *   data_fields(buf, off, size, head_cap) -> (dir, flags, role, tgid, conn_id,
 *           ts_ns, fd, seq, len, index, head, tail, lost)
 *   summary_fields(buf, off, size, tail_slots, tail_cap, ring_head) -> (the
 *           summary header's 20 fields as struct unpacks them, its gap buckets
 *           up to the last counted one as one tuple, then the ring slots read
 *           as one bytes object: per slot six little-endian 64-bit ints (ts_ns
 *           unsigned, then len, index, start, stop, split signed; start and
 *           stop index buf, stop at most the record's end), in write order (by
 *           index, a stable sort of the ring order they are packed in); in the
 *           record the slots are packed, each header followed by the cap bytes
 *           it holds)
 *
 * Both raise ValueError for a record too short for its header (or, for a data
 * record, for its head; for a summary, for its slots' headers) and for a
 * record that does not lie within buf.
 *
 *   read_batch(batch, off, count, head_cap, tail_slots, tail_cap, ring_head)
 *           -> (list, next_off)
 *       up to `count` records of a drained batch (probes/socket_events.py
 *       pack) from its offset `off`, record by record: data_fields' tuple for
 *       a data record, summary_fields' for a summary, (kind, off, size) for
 *       any other record, and for a record refused the message of the
 *       ValueError refusing it (a str); and the offset after them. One call
 *       for a few records: per record, a call with its arguments made and
 *       read cost more than the reading (and the few records' objects, made
 *       at once, are still in cache when assembly reads them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the probe's records are read as little-endian"
#endif

/* offsets of struct data_event_t and summary_event_t (probes/sockets.h) */
#define EV_DATA 1
#define EV_SUMMARY 2
#define DF_TAIL_ONLY 1
#define DATA_HEADER_SIZE 56
#define SUMMARY_HEADER_SIZE 232
#define TAIL_SLOT_HEADER_SIZE 24
#define GAP_BUCKETS 32
#define SUMMARY_FIELDS 21 /* the header's 20 fields, then the gap buckets as one tuple */
#define GAPS_AT (SUMMARY_HEADER_SIZE - 4 * GAP_BUCKETS) /* summary_event_t.gaps, the header's last field */
#define SLOT_FIELDS 6

static inline uint32_t u32_at(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline uint64_t u64_at(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* buf[start:stop], both ends clamped to the record's end */
static PyObject *slice(const char *p, Py_ssize_t end, Py_ssize_t start, Py_ssize_t stop) {
    if (start > end)
        start = end;
    if (stop > end)
        stop = end;
    if (stop < start)
        stop = start;
    return PyBytes_FromStringAndSize(p + start, stop - start);
}

/* buf, off, size, then want - 3 more sizes; checks that the record lies within buf */
static int read_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name,
                     Py_ssize_t *ints) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s() needs bytes", name);
        return -1;
    }
    for (Py_ssize_t i = 1; i < want; i++) {
        ints[i - 1] = PyLong_AsSsize_t(args[i]);
        if (ints[i - 1] == -1 && PyErr_Occurred())
            return -1;
        if (ints[i - 1] < 0) {
            PyErr_Format(PyExc_ValueError, "%s(): a negative offset or size", name);
            return -1;
        }
    }
    if (ints[0] > PyBytes_GET_SIZE(args[0]) || ints[1] > PyBytes_GET_SIZE(args[0]) - ints[0]) {
        PyErr_Format(PyExc_ValueError, "%s(): a record past its batch's end", name);
        return -1;
    }
    return 0;
}

/* the data record raw[0:n] */
static PyObject *data_read(const char *raw, Py_ssize_t n, Py_ssize_t head_cap) {
    const unsigned char *p = (const unsigned char *)raw;
    if (n < DATA_HEADER_SIZE)
        return PyErr_Format(PyExc_ValueError, "short record of type %d: %zd bytes", EV_DATA, n);
    unsigned flags = p[2];
    Py_ssize_t head_len = (Py_ssize_t)u32_at(p + 40), tail_len = (Py_ssize_t)u32_at(p + 44);
    PyObject *head, *tail;
    if (flags & DF_TAIL_ONLY) {
        head = PyBytes_FromStringAndSize(NULL, 0);
        tail = slice(raw, n, DATA_HEADER_SIZE, DATA_HEADER_SIZE + tail_len);
    } else {
        if (n - DATA_HEADER_SIZE < head_len)
            return PyErr_Format(PyExc_ValueError, "data record shorter than its head_len");
        head = PyBytes_FromStringAndSize(raw + DATA_HEADER_SIZE, head_len);
        tail = tail_len ? slice(raw, n, DATA_HEADER_SIZE + head_cap, DATA_HEADER_SIZE + head_cap + tail_len)
                        : PyBytes_FromStringAndSize(NULL, 0);
    }
    PyObject *t = PyTuple_New(13);
    if (!head || !tail || !t) {
        Py_XDECREF(head);
        Py_XDECREF(tail);
        Py_XDECREF(t);
        return NULL;
    }
    PyObject *v[13] = {
        PyLong_FromLong(p[1]),                  /* dir */
        PyLong_FromLong(flags),                 /* flags */
        PyLong_FromLong(p[3]),                  /* role */
        PyLong_FromUnsignedLong(u32_at(p + 4)), /* tgid */
        PyLong_FromUnsignedLongLong(u64_at(p + 8)),  /* conn_id */
        PyLong_FromUnsignedLongLong(u64_at(p + 16)), /* ts_ns */
        PyLong_FromUnsignedLong(u32_at(p + 24)),     /* fd */
        PyLong_FromUnsignedLong(u32_at(p + 28)),     /* seq */
        PyLong_FromUnsignedLong(u32_at(p + 32)),     /* len */
        PyLong_FromUnsignedLong(u32_at(p + 36)),     /* index */
        head,
        tail,
        PyLong_FromUnsignedLong(u32_at(p + 48)), /* lost */
    };
    int ok = 1;
    for (int i = 0; i < 13; i++) {
        if (!v[i])
            ok = 0;
        PyTuple_SET_ITEM(t, i, v[i]); /* a NULL item is left to the tuple's dealloc */
    }
    if (!ok) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

/* the summary record buf[base:base + n] (its slots' offsets index buf) */
static PyObject *summary_read(const char *buf, Py_ssize_t base, Py_ssize_t n, Py_ssize_t tail_slots,
                              Py_ssize_t tail_cap, Py_ssize_t ring_head) {
    const unsigned char *p = (const unsigned char *)buf + base; /* the record */
    if (n < SUMMARY_HEADER_SIZE)
        return PyErr_Format(PyExc_ValueError, "short record of type %d: %zd bytes", EV_SUMMARY, n);
    Py_ssize_t ring_count = (Py_ssize_t)u32_at(p + 100);
    Py_ssize_t count = ring_count < tail_slots ? ring_count : tail_slots;
    /* the slots are packed: each header, then the cap bytes it holds; where each header lies,
     * then put in write order (by index; the kernel packs them in ring order, which a ring
     * that has wrapped rotates), equal indices kept in packed order */
    if (count > (n - SUMMARY_HEADER_SIZE) / TAIL_SLOT_HEADER_SIZE) /* more slots than fit: cut short */
        return PyErr_Format(PyExc_ValueError, "short record of type %d: %zd bytes", EV_SUMMARY, n);
    Py_ssize_t on_stack[16];
    Py_ssize_t *at = on_stack;
    if (count > 16 && !(at = PyMem_New(Py_ssize_t, count)))
        return PyErr_NoMemory();
    Py_ssize_t off = SUMMARY_HEADER_SIZE;
    for (Py_ssize_t s = 0; s < count; s++) {
        if (n - off < TAIL_SLOT_HEADER_SIZE) {
            if (at != on_stack)
                PyMem_Free(at);
            return PyErr_Format(PyExc_ValueError, "short record of type %d: %zd bytes", EV_SUMMARY, n);
        }
        Py_ssize_t cap = (Py_ssize_t)u32_at(p + off + 16), j = s;
        uint32_t index = u32_at(p + off + 12);
        for (; j > 0 && u32_at(p + at[j - 1] + 12) > index; j--)
            at[j] = at[j - 1];
        at[j] = off;
        off += TAIL_SLOT_HEADER_SIZE + (cap < tail_cap ? cap : tail_cap);
    }
    PyObject *t = PyTuple_New(SUMMARY_FIELDS + 1);
    if (!t) {
        if (at != on_stack)
            PyMem_Free(at);
        return NULL;
    }
    Py_ssize_t k = 0;
#define PUT(expr)                          \
    do {                                   \
        PyObject *o_ = (expr);             \
        if (!o_) {                         \
            Py_DECREF(t);                  \
            if (at != on_stack)            \
                PyMem_Free(at);            \
            return NULL;                   \
        }                                  \
        PyTuple_SET_ITEM(t, k++, o_);      \
    } while (0)
    for (int i = 0; i < 4; i++) /* type, reason, flags, role */
        PUT(PyLong_FromLong(p[i]));
    PUT(PyLong_FromUnsignedLong(u32_at(p + 4)));      /* tgid */
    PUT(PyLong_FromUnsignedLongLong(u64_at(p + 8)));  /* conn_id */
    PUT(PyLong_FromUnsignedLongLong(u64_at(p + 16))); /* ts_ns */
    PUT(PyLong_FromUnsignedLong(u32_at(p + 24)));     /* fd */
    PUT(PyLong_FromUnsignedLong(u32_at(p + 28)));     /* seq */
    for (int off = 32; off < 88; off += 8)            /* req_start .. bytes_out */
        PUT(PyLong_FromUnsignedLongLong(u64_at(p + off)));
    for (int off = 88; off < GAPS_AT; off += 4) /* reads, writes, lost, ring_count */
        PUT(PyLong_FromUnsignedLong(u32_at(p + off)));
    int used = GAP_BUCKETS; /* the gap buckets up to the last one counted */
    while (used > 0 && !u32_at(p + GAPS_AT + 4 * (used - 1)))
        used--;
    PyObject *gaps = PyTuple_New(used);
    if (gaps) {
        for (int i = 0; i < used; i++) {
            PyObject *o = PyLong_FromUnsignedLong(u32_at(p + GAPS_AT + 4 * i));
            if (!o) {
                Py_CLEAR(gaps);
                break;
            }
            PyTuple_SET_ITEM(gaps, i, o);
        }
    }
    PUT(gaps);
    /* the slots: six little-endian 64-bit ints each, in one bytes object (no int object per field) */
    PyObject *slots = PyBytes_FromStringAndSize(NULL, SLOT_FIELDS * 8 * count);
    if (slots) {
        int64_t *v = (int64_t *)PyBytes_AS_STRING(slots);
        for (Py_ssize_t s = 0; s < count; s++, v += SLOT_FIELDS) {
            const unsigned char *h = p + at[s];
            uint32_t len = u32_at(h + 8);
            Py_ssize_t cap = (Py_ssize_t)u32_at(h + 16), start = at[s] + TAIL_SLOT_HEADER_SIZE;
            Py_ssize_t stop = start + (cap < tail_cap ? cap : tail_cap);
            int64_t f[SLOT_FIELDS] = {
                0, /* ts_ns, unsigned: copied below */
                len,
                u32_at(h + 12), /* index */
                base + start,
                base + (stop < n ? stop : n), /* a cut record's last slot: to its end */
                (Py_ssize_t)len > tail_cap ? ring_head : -1,
            };
            memcpy(f, h, 8);
            memcpy(v, f, sizeof f);
        }
    }
    PUT(slots);
#undef PUT
    if (at != on_stack)
        PyMem_Free(at);
    return t;
}

static PyObject *data_fields(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t sizes[3]; /* off, size, head_cap */
    if (read_args(args, nargs, 4, "data_fields", sizes) < 0)
        return NULL;
    return data_read(PyBytes_AS_STRING(args[0]) + sizes[0], sizes[1], sizes[2]);
}

static PyObject *summary_fields(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t sizes[5]; /* off, size, tail_slots, tail_cap, ring_head */
    if (read_args(args, nargs, 6, "summary_fields", sizes) < 0)
        return NULL;
    return summary_read(PyBytes_AS_STRING(args[0]), sizes[0], sizes[1], sizes[2], sizes[3], sizes[4]);
}

/* A record refused: the reader's ValueError, as its message (any other error stays raised). */
static PyObject *refusal(void) {
    if (!PyErr_ExceptionMatches(PyExc_ValueError))
        return NULL;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *msg = value ? PyObject_Str(value) : NULL;
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return msg;
}

static PyObject *read_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t v[6]; /* off, count, head_cap, tail_slots, tail_cap, ring_head */
    if (nargs != 7 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "read_batch(batch, off, count, head_cap, tail_slots, tail_cap, ring_head)");
        return NULL;
    }
    for (int i = 0; i < 6; i++) {
        v[i] = PyLong_AsSsize_t(args[1 + i]);
        if (v[i] == -1 && PyErr_Occurred())
            return NULL;
        if (v[i] < 0)
            return PyErr_Format(PyExc_ValueError, "read_batch(): a negative offset, count or size");
    }
    const char *buf = PyBytes_AS_STRING(args[0]);
    Py_ssize_t end = PyBytes_GET_SIZE(args[0]), off = v[0] < end ? v[0] : end;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (Py_ssize_t k = 0; k < v[1] && off < end; k++) {
        PyObject *item;
        if (end - off < 4) {
            item = PyUnicode_FromString("a record's size cut short");
            off = end;
        } else {
            Py_ssize_t size = (Py_ssize_t)u32_at((const unsigned char *)buf + off);
            off += 4;
            if (size == 0) {
                item = PyUnicode_FromString("empty record");
            } else if (size > end - off) {
                item = PyUnicode_FromString("record past its batch's end");
            } else {
                int kind = (unsigned char)buf[off];
                if (kind == EV_DATA)
                    item = data_read(buf + off, size, v[2]);
                else if (kind == EV_SUMMARY)
                    item = summary_read(buf, off, size, v[3], v[4], v[5]);
                else
                    item = Py_BuildValue("(inn)", kind, off, size);
                if (!item)
                    item = refusal();
            }
            off = size > end - off ? end : off + size;
        }
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return Py_BuildValue("(Nn)", out, off);
}

static PyMethodDef methods[] = {
    {"read_batch", (PyCFunction)(void (*)(void))read_batch, METH_FASTCALL,
     "read_batch(batch, off, count, head_cap, tail_slots, tail_cap, ring_head) -> (list, int)"},
    {"data_fields", (PyCFunction)(void (*)(void))data_fields, METH_FASTCALL,
     "data_fields(buf, off, size, head_cap) -> tuple"},
    {"summary_fields", (PyCFunction)(void (*)(void))summary_fields, METH_FASTCALL,
     "summary_fields(buf, off, size, tail_slots, tail_cap, ring_head) -> tuple"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_recread",
    "The socket probe's data and summary records read in one pass.", -1, methods,
};

PyMODINIT_FUNC PyInit__recread(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    /* the layout this reading assumes; probes/socket_events.py uses it only where they agree */
    if (PyModule_AddIntConstant(m, "DATA_HEADER_SIZE", DATA_HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "SUMMARY_HEADER_SIZE", SUMMARY_HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "TAIL_SLOT_HEADER_SIZE", TAIL_SLOT_HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "DF_TAIL_ONLY", DF_TAIL_ONLY) < 0 ||
        PyModule_AddIntConstant(m, "GAP_BUCKETS", GAP_BUCKETS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
