/* agent/_httphead.c — the common HTTP/1.1 message head, read in one pass.
 *
 * Every request and every response the agent sees starts with a head: a
 * start line and header fields up to an empty line (RFC 9112 §2.1). Read
 * with regular expressions from Python, that head costs more than the rest
 * of the message. These two functions read the common case in C and say
 * nothing about anything else:
 *
 *   parse_request_head(buf, pos, limit)  -> (end, method, target, version, fields) | None
 *   parse_response_head(buf, pos, limit) -> (end, version, status, reason, fields) | None
 *
 * The head must start at buf[pos] and end (its empty line included) at or
 * before buf[limit]; `end` is the index just past it. `fields` is a tuple of
 * (lowercased name, value) pairs, the value with spaces, tabs and CR
 * stripped at both ends. None means "not the simple case": no complete head
 * yet, a start line that does not match, or a field line other than
 * `token ":" value` ending in CRLF or LF (obsolete folding, a bare CR, a bad
 * name). The caller then reads the head with its own, complete code
 * (agent/http1.py), which is also the reference these functions are tested
 * against: for every input where they return a head, it must be the same.
 * A field line seen lately (its bytes alike) gets the pair made for it then:
 * the same client and server send the same lines on every message.
 *
 * request_fields and response_fields (below) accept the same heads and return only
 * what frames the body and the one field the agent reads from each, making no pair at all.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* RFC 9110 §5.6.2 tchar */
static unsigned char TCHAR[256];

static PyObject *V10, *V11;         /* "1.0", "1.1" */
static PyObject *EMPTY;             /* "" */

/* Field names common enough to share one string object each. */
static const char *const COMMON[] = {
    "host", "user-agent", "accept", "accept-encoding", "accept-language", "connection",
    "content-type", "content-length", "transfer-encoding", "date", "server", "traceparent",
    "tracestate", "authorization", "cache-control", "keep-alive", "x-request-id",
    "content-encoding", "vary", "upgrade",
};
#define N_COMMON (sizeof(COMMON) / sizeof(COMMON[0]))
static PyObject *COMMON_OBJ[N_COMMON];
static Py_ssize_t COMMON_LEN[N_COMMON];

/* The common names whose lines come back unchanged from message to message (the same client,
 * server and content types): their (name, value) pairs are kept, by the line's bytes, and handed
 * out again (tuples and strs are immutable). Never credentials or per-request ids; a name
 * missing here (COMMON grown, this not) is not kept. */
static const unsigned char REPEATS[N_COMMON] = {
    1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 0,
    0, 0, 1, 1, 0,
    1, 1, 1,
};
#define LINE_CACHE_SETS 128 /* a power of 2; two lines each, the latest first */
#define LINE_CACHE_BYTES 96 /* longer lines are not kept */
typedef struct {
    Py_ssize_t n;
    unsigned char line[LINE_CACHE_BYTES];
    PyObject *pair;
} cached_line_t;
static cached_line_t line_cache[LINE_CACHE_SETS][2]; /* only read with the GIL */

static cached_line_t *line_set(const unsigned char *p, Py_ssize_t n) {
    uint32_t h = 2166136261u; /* FNV-1a, then mixed: its low bits alone collide often */
    for (Py_ssize_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    return line_cache[h & (LINE_CACHE_SETS - 1)];
}

static PyObject *cached_pair(cached_line_t *set, const unsigned char *p, Py_ssize_t n) {
    for (int w = 0; w < 2; w++)
        if (set[w].pair && set[w].n == n && memcmp(set[w].line, p, (size_t)n) == 0)
            return set[w].pair;
    return NULL;
}

static void keep_pair(cached_line_t *set, const unsigned char *p, Py_ssize_t n, PyObject *pair) {
    Py_XDECREF(set[1].pair); /* the older line leaves; the newer moves down */
    set[1] = set[0];
    set[0].n = n;
    memcpy(set[0].line, p, (size_t)n);
    set[0].pair = Py_NewRef(pair);
}

/* Methods, likewise. */
static const char *const METHODS[] = {"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"};
#define N_METHODS (sizeof(METHODS) / sizeof(METHODS[0]))
static PyObject *METHOD_OBJ[N_METHODS];
static Py_ssize_t METHOD_LEN[N_METHODS];

static inline int is_target(unsigned char c) { return c > 0x20 && c != 0x7f; }

static PyObject *method_str(const char *p, Py_ssize_t n) {
    for (size_t i = 0; i < N_METHODS; i++) {
        if (METHOD_LEN[i] == n && memcmp(METHODS[i], p, (size_t)n) == 0) {
            Py_INCREF(METHOD_OBJ[i]);
            return METHOD_OBJ[i];
        }
    }
    return PyUnicode_DecodeASCII(p, n, NULL);
}

/* name is all tchar (ASCII): lowercase it into a str; *common is set to its index in COMMON,
 * or -1 */
static PyObject *name_str(const unsigned char *p, Py_ssize_t n, int *common) {
    char small[64];
    *common = -1;
    if (n <= (Py_ssize_t)sizeof(small)) {
        for (Py_ssize_t i = 0; i < n; i++) {
            unsigned char c = p[i];
            small[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
        }
        for (size_t i = 0; i < N_COMMON; i++) {
            if (COMMON_LEN[i] == n && memcmp(COMMON[i], small, (size_t)n) == 0) {
                Py_INCREF(COMMON_OBJ[i]);
                *common = (int)i;
                return COMMON_OBJ[i];
            }
        }
        return PyUnicode_DecodeASCII(small, n, NULL);
    }
    PyObject *s = PyUnicode_New(n, 127);
    if (!s)
        return NULL;
    Py_UCS1 *d = PyUnicode_1BYTE_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        d[i] = (Py_UCS1)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    return s;
}

/* The first "\n\r?\n" at or after `from` that ends at or before `lim`: its start, or -1. */
static Py_ssize_t head_end(const unsigned char *p, Py_ssize_t from, Py_ssize_t lim, Py_ssize_t *end) {
    Py_ssize_t i = from;
    while (i < lim) {
        const unsigned char *q = memchr(p + i, '\n', (size_t)(lim - i));
        if (!q)
            return -1;
        i = q - p;
        if (i + 1 < lim && p[i + 1] == '\n') {
            *end = i + 2;
            return i;
        }
        if (i + 2 < lim && p[i + 1] == '\r' && p[i + 2] == '\n') {
            *end = i + 3;
            return i;
        }
        i += 1;
    }
    return -1;
}

/* One field line at p[i:e), ending in LF: its name is p[n0:n1), its value p[v0:v1) with
 * spaces and tabs stripped at both ends. */
typedef struct {
    Py_ssize_t n0, n1, v0, v1;
} field_t;

/* The field line at p[i:]: the index past it, or -1 when it is not the simple form
 * (`token ":" value`, ending in CRLF or LF, no CR inside). */
static Py_ssize_t field_line(const unsigned char *p, Py_ssize_t i, Py_ssize_t e, field_t *f) {
    f->n0 = i;
    while (i < e && TCHAR[p[i]])
        i++;
    if (i == f->n0 || i >= e || p[i] != ':')
        return -1;
    f->n1 = i;
    i++;
    Py_ssize_t v0 = i;
    while (i < e && p[i] != '\r' && p[i] != '\n')
        i++;
    Py_ssize_t v1 = i;
    if (i < e && p[i] == '\r')
        i++;
    if (i >= e || p[i] != '\n')
        return -1;
    while (v0 < v1 && (p[v0] == ' ' || p[v0] == '\t'))
        v0++;
    while (v1 > v0 && (p[v1 - 1] == ' ' || p[v1 - 1] == '\t'))
        v1--;
    f->v0 = v0;
    f->v1 = v1;
    return i + 1;
}

/* Field lines in p[s:e) (each ending in LF) to a tuple of pairs; NULL with no
 * exception set when a line is not the simple form. */
static PyObject *fields(const unsigned char *p, Py_ssize_t s, Py_ssize_t e) {
    Py_ssize_t count = 0;
    for (Py_ssize_t i = s; i < e; i++)
        count += p[i] == '\n';
    PyObject *out = PyTuple_New(count);
    if (!out)
        return NULL;
    Py_ssize_t k = 0, i = s;
    while (i < e) {
        field_t f;
        i = field_line(p, i, e, &f);
        if (i < 0)
            goto fail;
        /* the pair made for the same line lately, if its name is one whose lines repeat */
        Py_ssize_t line_n = f.v1 - f.n0;
        cached_line_t *set = line_n <= LINE_CACHE_BYTES ? line_set(p + f.n0, line_n) : NULL;
        PyObject *seen = set ? cached_pair(set, p + f.n0, line_n) : NULL;
        if (seen) {
            PyTuple_SET_ITEM(out, k, Py_NewRef(seen));
            k++;
            continue;
        }
        int common;
        PyObject *name = name_str(p + f.n0, f.n1 - f.n0, &common);
        if (!name)
            goto fail;
        PyObject *value = f.v1 > f.v0 ? PyUnicode_DecodeLatin1((const char *)p + f.v0, f.v1 - f.v0, NULL)
                                      : (Py_INCREF(EMPTY), EMPTY);
        if (!value) {
            Py_DECREF(name);
            goto fail;
        }
        PyObject *pair = PyTuple_New(2);
        if (!pair) {
            Py_DECREF(name);
            Py_DECREF(value);
            goto fail;
        }
        PyTuple_SET_ITEM(pair, 0, name);
        PyTuple_SET_ITEM(pair, 1, value);
        PyTuple_SET_ITEM(out, k, pair);
        k++;
        if (set && common >= 0 && REPEATS[common])
            keep_pair(set, p + f.n0, line_n, pair);
    }
    return out;
fail: /* not the simple form (no exception set), or an error (set) */
    Py_DECREF(out);
    return NULL;
}

typedef struct {
    const unsigned char *p;
    Py_ssize_t n, pos, lim;
    Py_buffer view;
    int has_view;
} input_t;

static int get_input(PyObject *const *args, Py_ssize_t nargs, const char *fname, input_t *in) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s() takes 3 arguments (%zd given)", fname, nargs);
        return -1;
    }
    in->has_view = 0;
    if (PyBytes_Check(args[0])) {
        in->p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
        in->n = PyBytes_GET_SIZE(args[0]);
    } else {
        if (PyObject_GetBuffer(args[0], &in->view, PyBUF_SIMPLE) < 0)
            return -1;
        in->has_view = 1;
        in->p = in->view.buf;
        in->n = in->view.len;
    }
    in->pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if ((in->pos == -1 || limit == -1) && PyErr_Occurred())
        goto bad;
    if (in->pos < 0 || limit < 0) {
        PyErr_SetString(PyExc_ValueError, "pos and limit must not be negative");
        goto bad;
    }
    in->lim = limit < in->n ? limit : in->n;
    return 0;
bad:
    if (in->has_view)
        PyBuffer_Release(&in->view);
    return -1;
}

static void release(input_t *in) {
    if (in->has_view)
        PyBuffer_Release(&in->view);
}

static PyObject *version(const unsigned char *v) {
    PyObject *o = v[0] == '0' ? V10 : V11;
    Py_INCREF(o);
    return o;
}

/* A request line in p[pos:line_end] (LF at line_end):
 * token{1,32} SP target SP "HTTP/1." [01] [CR] LF. Sets the spans of method,
 * target and version; 0 when it does not match. */
static int request_line(const unsigned char *p, Py_ssize_t pos, Py_ssize_t line_end, Py_ssize_t *m1,
                        Py_ssize_t *t0, Py_ssize_t *t1, Py_ssize_t *v) {
    Py_ssize_t i = pos;
    while (i < line_end && TCHAR[p[i]])
        i++;
    *m1 = i;
    if (i == pos || i - pos > 32 || p[i] != ' ')
        return 0;
    i++;
    *t0 = i;
    while (i < line_end && is_target(p[i]))
        i++;
    *t1 = i;
    if (*t1 == *t0 || p[i] != ' ')
        return 0;
    i++;
    if (line_end - i < 8 || memcmp(p + i, "HTTP/1.", 7) != 0 || (p[i + 7] != '0' && p[i + 7] != '1'))
        return 0;
    *v = i + 7;
    i += 8;
    return i == line_end || (p[i] == '\r' && i + 1 == line_end);
}

/* A status line in p[pos:line_end]: "HTTP/1." [01] SP 3DIGIT [SP reason] [CR] LF,
 * the reason without CR or LF. Sets the status, the version's span and the
 * reason's (empty when absent); 0 when it does not match. */
static int status_line(const unsigned char *p, Py_ssize_t pos, Py_ssize_t line_end, int *status, Py_ssize_t *v,
                       Py_ssize_t *r0, Py_ssize_t *r1) {
    Py_ssize_t i = pos;
    if (line_end - i < 12 || memcmp(p + i, "HTTP/1.", 7) != 0 || (p[i + 7] != '0' && p[i + 7] != '1')
        || p[i + 8] != ' ')
        return 0;
    *v = i + 7;
    i += 9;
    *status = 0;
    for (int k = 0; k < 3; k++, i++) {
        if (p[i] < '0' || p[i] > '9')
            return 0;
        *status = *status * 10 + (p[i] - '0');
    }
    *r0 = *r1 = i;
    if (i == line_end || (p[i] == '\r' && i + 1 == line_end))
        return 1;   /* no reason phrase */
    if (p[i] != ' ')
        return 0;
    Py_ssize_t r = i + 1;
    *r0 = r;
    while (r < line_end && p[r] != '\r')
        r++;
    *r1 = r;
    return r == line_end || r + 1 == line_end;
}

/* Where a head's parts lie: its start line's (method, target and version, or version, status
 * and reason) and its field lines, p[line_end + 1:at + 1); `end` is just past its empty line. */
typedef struct {
    Py_ssize_t line_end, m1, t0, t1, v, r0, r1, at, end;
    int status;
} head_t;

/* The head at in->p[in->pos:], of either kind: 1 with *h filled when its start line is the
 * simple form and it ends within the limit, else 0. */
static int find_head(const input_t *in, int request, head_t *h) {
    const unsigned char *p = in->p;
    const unsigned char *nl = in->pos < in->lim ? memchr(p + in->pos, '\n', (size_t)(in->lim - in->pos)) : NULL;
    if (!nl)
        return 0;
    memset(h, 0, sizeof *h);
    h->line_end = nl - p;
    if (request ? !request_line(p, in->pos, h->line_end, &h->m1, &h->t0, &h->t1, &h->v)
                : !status_line(p, in->pos, h->line_end, &h->status, &h->v, &h->r0, &h->r1))
        return 0;
    h->at = head_end(p, h->line_end, in->lim, &h->end);
    return h->at >= 0;
}

/* A tuple of the n items, which it takes; NULL, and every item released, when one is NULL
 * (its error set) or the tuple cannot be made. */
static PyObject *tuple_of(PyObject **item, int n) {
    int ok = 1;
    for (int k = 0; k < n; k++)
        ok = ok && item[k] != NULL;
    PyObject *t = ok ? PyTuple_New(n) : NULL;
    for (int k = 0; k < n; k++) {
        if (t)
            PyTuple_SET_ITEM(t, k, item[k]);
        else
            Py_XDECREF(item[k]);
    }
    return t;
}

/* One head at buf[pos:], either kind: the tuple, None when not the simple case,
 * NULL with an exception set on error. */
static PyObject *parse_head(PyObject *const *args, Py_ssize_t nargs, const char *fname, int request) {
    input_t in;
    if (get_input(args, nargs, fname, &in) < 0)
        return NULL;
    const unsigned char *p = in.p;
    PyObject *result = NULL;
    head_t h;
    if (!find_head(&in, request, &h))
        goto none;
    PyObject *fl = fields(p, h.line_end + 1, h.at + 1);
    if (!fl) {
        if (PyErr_Occurred())
            goto out;
        goto none;     /* a field line not of the simple form */
    }
    /* request: (end, method, target, version, fields); response: (end, version, status, reason, fields) */
    PyObject *item[5] = {PyLong_FromSsize_t(h.end), NULL, NULL, NULL, fl};
    if (request) {
        item[1] = method_str((const char *)p + in.pos, h.m1 - in.pos);
        item[2] = PyUnicode_DecodeUTF8((const char *)p + h.t0, h.t1 - h.t0, "replace");
        item[3] = version(p + h.v);
    } else {
        item[1] = version(p + h.v);
        item[2] = PyLong_FromLong(h.status);
        item[3] = h.r1 > h.r0 ? PyUnicode_DecodeLatin1((const char *)p + h.r0, h.r1 - h.r0, NULL)
                              : (Py_INCREF(EMPTY), EMPTY);
    }
    result = tuple_of(item, 5);
    goto out;
none:
    result = Py_None;
    Py_INCREF(result);
out:
    release(&in);
    return result;
}

/* ---- the framing fields alone, for a head whose other fields nobody reads ----
 *
 *   request_fields(buf, pos, limit)  -> (end, method, target, length, traceparent) | None
 *   response_fields(buf, pos, limit) -> (end, status, length, content_type) | None
 *
 * The same heads as parse_request_head and parse_response_head accept, read without making
 * a pair per field line: only what frames the body and the one field the caller reads (its
 * first value, stripped as in `fields`, or None). `length` is the body's Content-Length (0
 * for a request without one), or -1 for a response whose only Transfer-Encoding is
 * "chunked". None also when the framing is anything else, which the caller leaves to the
 * complete reading: a request with Transfer-Encoding, a response with neither field, any
 * other coding, both fields, Content-Length repeated or not 1 to 18 digits, a response with
 * a Content-Encoding. */
typedef struct {
    int n_length, n_te, n_ce;
    Py_ssize_t len0, len1, te0, te1; /* the last Content-Length and Transfer-Encoding values */
    Py_ssize_t want0, want1;         /* the wanted field's first value; want0 < 0: none */
} framing_t;

static int name_is(const unsigned char *p, Py_ssize_t n, const char *lower, Py_ssize_t ln) {
    if (n != ln)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if ((c >= 'A' && c <= 'Z' ? c + 32 : c) != (unsigned char)lower[i])
            return 0;
    }
    return 1;
}

/* Field lines in p[s:e), each ending in LF, accepted as `fields` accepts them; 0 when one is
 * not the simple form. */
static int scan_fields(const unsigned char *p, Py_ssize_t s, Py_ssize_t e, const char *want, framing_t *f) {
    Py_ssize_t want_n = (Py_ssize_t)strlen(want);
    memset(f, 0, sizeof *f);
    f->want0 = f->want1 = -1;
    for (Py_ssize_t i = s; i < e;) {
        field_t l;
        i = field_line(p, i, e, &l);
        if (i < 0)
            return 0;
        Py_ssize_t n = l.n1 - l.n0;
        if (name_is(p + l.n0, n, "content-length", 14)) {
            f->n_length++;
            f->len0 = l.v0;
            f->len1 = l.v1;
        } else if (name_is(p + l.n0, n, "transfer-encoding", 17)) {
            f->n_te++;
            f->te0 = l.v0;
            f->te1 = l.v1;
        } else if (name_is(p + l.n0, n, "content-encoding", 16)) {
            f->n_ce++;
        } else if (f->want0 < 0 && name_is(p + l.n0, n, want, want_n)) {
            f->want0 = l.v0;
            f->want1 = l.v1;
        }
    }
    return 1;
}

/* 1 to 18 ASCII digits in p[a:b) into *out; 0 otherwise */
static int digits(const unsigned char *p, Py_ssize_t a, Py_ssize_t b, Py_ssize_t *out) {
    if (b <= a || b - a > 18)
        return 0;
    long long v = 0;
    for (Py_ssize_t i = a; i < b; i++) {
        if (p[i] < '0' || p[i] > '9')
            return 0;
        v = v * 10 + (p[i] - '0');
    }
    *out = (Py_ssize_t)v;
    return 1;
}

static PyObject *wanted(const unsigned char *p, const framing_t *f) {
    if (f->want0 < 0)
        Py_RETURN_NONE;
    if (f->want1 == f->want0)
        return Py_NewRef(EMPTY);
    return PyUnicode_DecodeLatin1((const char *)p + f->want0, f->want1 - f->want0, NULL);
}

static PyObject *framing_fields(PyObject *const *args, Py_ssize_t nargs, const char *fname, int request) {
    input_t in;
    if (get_input(args, nargs, fname, &in) < 0)
        return NULL;
    const unsigned char *p = in.p;
    PyObject *result = NULL;
    head_t h;
    framing_t f;
    if (!find_head(&in, request, &h)
        || !scan_fields(p, h.line_end + 1, h.at + 1, request ? "traceparent" : "content-type", &f))
        goto none;
    Py_ssize_t length = 0;
    if (!request && f.n_ce)
        goto none; /* a compressed body: the caller reads its coding from the complete head */
    if (f.n_te) {
        if (request || f.n_te != 1 || f.n_length || f.te1 - f.te0 != 7 || memcmp(p + f.te0, "chunked", 7) != 0)
            goto none;
        length = -1;
    } else if (f.n_length > 1 || (f.n_length == 1 && !digits(p, f.len0, f.len1, &length))) {
        goto none;
    } else if (!f.n_length && !request) {
        goto none; /* read to close */
    }
    if (request) {
        PyObject *item[5] = {
            PyLong_FromSsize_t(h.end), method_str((const char *)p + in.pos, h.m1 - in.pos),
            PyUnicode_DecodeUTF8((const char *)p + h.t0, h.t1 - h.t0, "replace"), PyLong_FromSsize_t(length),
            wanted(p, &f),
        };
        result = tuple_of(item, 5);
    } else {
        PyObject *item[4] = {PyLong_FromSsize_t(h.end), PyLong_FromLong(h.status), PyLong_FromSsize_t(length),
                             wanted(p, &f)};
        result = tuple_of(item, 4);
    }
    goto out;
none:
    result = Py_NewRef(Py_None);
out:
    release(&in);
    return result;
}

static PyObject *request_fields(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return framing_fields(args, nargs, "request_fields", 1);
}

static PyObject *response_fields(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return framing_fields(args, nargs, "response_fields", 0);
}

static PyObject *parse_request_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return parse_head(args, nargs, "parse_request_head", 1);
}

static PyObject *parse_response_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return parse_head(args, nargs, "parse_response_head", 0);
}

static PyMethodDef methods[] = {
    {"parse_request_head", (PyCFunction)(void (*)(void))parse_request_head, METH_FASTCALL,
     "parse_request_head(buf, pos, limit) -> (end, method, target, version, fields) | None"},
    {"parse_response_head", (PyCFunction)(void (*)(void))parse_response_head, METH_FASTCALL,
     "parse_response_head(buf, pos, limit) -> (end, version, status, reason, fields) | None"},
    {"request_fields", (PyCFunction)(void (*)(void))request_fields, METH_FASTCALL,
     "request_fields(buf, pos, limit) -> (end, method, target, length, traceparent) | None"},
    {"response_fields", (PyCFunction)(void (*)(void))response_fields, METH_FASTCALL,
     "response_fields(buf, pos, limit) -> (end, status, length, content_type) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_httphead",
    "The common HTTP/1.1 message head read in C (agent/http1.py is the reference).", -1, methods,
};

PyMODINIT_FUNC PyInit__httphead(void) {
    const char *t = "!#$%&'*+-.^_`|~";
    memset(TCHAR, 0, sizeof(TCHAR));
    for (int c = '0'; c <= '9'; c++)
        TCHAR[c] = 1;
    for (int c = 'a'; c <= 'z'; c++)
        TCHAR[c] = TCHAR[c - 32] = 1;
    for (; *t; t++)
        TCHAR[(unsigned char)*t] = 1;
    V10 = PyUnicode_InternFromString("1.0");
    V11 = PyUnicode_InternFromString("1.1");
    EMPTY = PyUnicode_InternFromString("");
    if (!V10 || !V11 || !EMPTY)
        return NULL;
    for (size_t i = 0; i < N_COMMON; i++) {
        COMMON_OBJ[i] = PyUnicode_InternFromString(COMMON[i]);
        COMMON_LEN[i] = (Py_ssize_t)strlen(COMMON[i]);
        if (!COMMON_OBJ[i])
            return NULL;
    }
    for (size_t i = 0; i < N_METHODS; i++) {
        METHOD_OBJ[i] = PyUnicode_InternFromString(METHODS[i]);
        METHOD_LEN[i] = (Py_ssize_t)strlen(METHODS[i]);
        if (!METHOD_OBJ[i])
            return NULL;
    }
    return PyModule_Create(&module);
}
