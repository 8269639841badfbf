/* probes/_ringdrain.c — take the socket probe's ring buffer records without a
 * Python call per record.
 *
 * BCC's ring buffer hands each record to a ctypes callback: per record, the
 * GIL is taken again, the arguments are converted, BCC's own Python wrapper
 * and the agent's callback run, and ctypes.string_at copies the bytes. That
 * cost as much as parsing the record. Here the per-record callback is C: it
 * copies the record into a bytes object and appends it to a list, with the
 * GIL held by the one call that drains the whole ring buffer.
 *
 *   callback_address() -> int
 *       the address of `int cb(void *ctx, void *data, size_t size)`, the
 *       record callback to register with BCC's bpf_new_ringbuf; `ctx` must be
 *       a Python list that outlives the ring buffer.
 *   consume(consume_fn, manager) -> int
 *       calls consume_fn(manager) (BCC's bpf_consume_ringbuf, by address)
 *       without releasing the GIL and returns its result (records taken, or a
 *       negative error); raises if a record could not be appended.
 *
 * probes/sockets.py uses the ctypes callback when this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static int on_record(void *ctx, void *data, size_t size) {
    PyObject *b = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)size);
    if (!b)
        return -1;  /* stops the drain; consume() raises */
    int rc = PyList_Append((PyObject *)ctx, b);
    Py_DECREF(b);
    return rc;
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
    int rc = ((consume_fn_t)(uintptr_t)fn)(manager);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"callback_address", callback_address, METH_NOARGS, "callback_address() -> int"},
    {"consume", (PyCFunction)(void (*)(void))consume, METH_FASTCALL, "consume(consume_fn, manager) -> int"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ringdrain",
    "Ring buffer records into a list without a Python call per record.", -1, methods,
};

PyMODINIT_FUNC PyInit__ringdrain(void) { return PyModule_Create(&module); }
