/* probes/_ringdrain.c — take the socket probe's ring buffer records as one
 * packed batch, without a Python call or an object per record.
 *
 * BCC's ring buffer hands each record to a ctypes callback: per record, the
 * GIL is taken again, the arguments are converted, BCC's own Python wrapper
 * and the agent's callback run, and ctypes.string_at copies the bytes. That
 * cost as much as parsing the record. Here the per-record callback is C, and
 * it does not make a bytes object per record either (an allocation and a free
 * per record, on two threads, cost more than copying the bytes): it appends
 * the record to one bytes object, the batch, in the layout of
 * probes/socket_events.py's `pack` (a record's size as a little-endian u32,
 * then its bytes), with the GIL held by the one call that drains the whole
 * ring buffer.
 *
 *   callback_address() -> int
 *       the address of `int cb(void *ctx, void *data, size_t size)`, the
 *       record callback to register with BCC's bpf_new_ringbuf (ctx unused).
 *   consume(consume_fn, manager) -> (int, bytes)
 *       calls consume_fn(manager) (BCC's bpf_consume_ringbuf, by address)
 *       without releasing the GIL; returns the records taken (or its negative
 *       error) and the packed batch of them (b"" when none were); raises
 *       MemoryError if the batch could not grow (the records taken until then
 *       are lost: the drain counts an error, assembly the requests lost).
 *
 * The batch being built is this module's: one drain at a time (the GIL is
 * held throughout, and a drain started within a drain is refused).
 * probes/sockets.py packs the records itself when this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MIN_BATCH (64 * 1024) /* the first allocation of a drain, at least */

static PyObject *batch;      /* the batch being built, or NULL before the drain's first record */
static Py_ssize_t used;      /* its bytes written */
static long records;         /* the records in it */
static Py_ssize_t hint = MIN_BATCH; /* the last batch's size: the next drain's first allocation */
static int draining;

static int on_record(void *ctx, void *data, size_t size) {
    (void)ctx;
    if (size > UINT32_MAX)
        return -1;
    Py_ssize_t need = used + 4 + (Py_ssize_t)size;
    Py_ssize_t cap = batch ? PyBytes_GET_SIZE(batch) : 0;
    if (need > cap) {
        Py_ssize_t grow = cap ? 2 * cap : hint;
        if (grow < need)
            grow = need;
        if (!batch) {
            batch = PyBytes_FromStringAndSize(NULL, grow);
            if (!batch)
                return -1; /* stops the drain; consume() raises */
        } else if (_PyBytes_Resize(&batch, grow) < 0) {
            return -1; /* batch is NULL now (and the error set) */
        }
    }
    char *p = PyBytes_AS_STRING(batch) + used;
    uint32_t n = (uint32_t)size;
    memcpy(p, &n, 4); /* little-endian: the hosts BPF runs on here are (see probes/_recread.c) */
    memcpy(p + 4, data, size);
    used = need;
    records++;
    return 0;
}

static PyObject *callback_address(PyObject *self, PyObject *unused) {
    return PyLong_FromVoidPtr((void *)(uintptr_t)on_record);
}

typedef int (*consume_fn_t)(void *);

static PyObject *consume(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "consume() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    void *fn = PyLong_AsVoidPtr(args[0]);
    if (!fn && PyErr_Occurred())
        return NULL;
    void *manager = PyLong_AsVoidPtr(args[1]);
    if (!manager && PyErr_Occurred())
        return NULL;
    if (!fn || !manager) {
        PyErr_SetString(PyExc_ValueError, "consume() needs a function and a ring buffer manager");
        return NULL;
    }
    if (draining) {
        PyErr_SetString(PyExc_RuntimeError, "consume() called within a drain");
        return NULL;
    }
    draining = 1;
    batch = NULL;
    used = 0;
    records = 0;
    int rc = ((consume_fn_t)(uintptr_t)fn)(manager);
    draining = 0;
    PyObject *out = batch;
    batch = NULL;
    if (PyErr_Occurred()) {
        Py_XDECREF(out);
        return NULL;
    }
    long taken = rc < 0 ? rc : records;
    if (!out)
        return Py_BuildValue("(ly#)", taken, "", (Py_ssize_t)0);
    hint = used + used / 4 > MIN_BATCH ? used + used / 4 : MIN_BATCH;
    if (used != PyBytes_GET_SIZE(out) && _PyBytes_Resize(&out, used) < 0)
        return NULL;
    return Py_BuildValue("(lN)", taken, out);
}

static PyMethodDef methods[] = {
    {"callback_address", callback_address, METH_NOARGS, "callback_address() -> int"},
    {"consume", (PyCFunction)(void (*)(void))consume, METH_FASTCALL,
     "consume(consume_fn, manager) -> (int, bytes)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ringdrain",
    "Ring buffer records into one packed batch without a Python call per record.", -1, methods,
};

PyMODINIT_FUNC PyInit__ringdrain(void) { return PyModule_Create(&module); }
