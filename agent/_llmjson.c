/* agent/_llmjson.c — OpenAI-compatible JSON bodies read in one pass.
 *
 * Every streamed chunk of an OpenAI-compatible server (vLLM, SGLang, TGI's
 * Messages API, llama.cpp, Ollama's /v1) is one JSON object, and the agent
 * needs five things from it: whether it carries output, the model, finish
 * reasons and the two usage counts. Decoding the whole object into Python
 * dicts and strings to look at those costs more than the rest of the
 * chunk's reading. These functions validate the JSON and pick out the same
 * fields without building it:
 *
 *   openai_event(data, chat)  -> (output, model, finish_reasons, input_tokens, output_tokens) | None
 *   ollama_event(data, chat)  -> (output, done, model, finish_reasons, input_tokens, output_tokens) | None
 *   request_fields(data)      -> (model, stream) | None
 *   whole_event(fragment)     -> bytes | None
 *   sse_chunk_event(write)    -> bytes | None
 *   sse_named_event(write)    -> (name, object) | None
 *   ndjson_chunk_event(write) -> bytes | None
 *   ring_walk(raw, slots, lo, hi, sample, seen, output_seen, chat)
 *       -> (kept, first_index, first_ts, unseen_mid, outputs, first_output_ts,
 *           last_output_ts, model, finish_reasons, input_tokens, output_tokens) | None
 *
 * ring_walk reads a summary's tail ring as agent/assemble.py _walk_ring does
 * for the chat (chat=True) and completions APIs: `slots` holds six
 * little-endian 64-bit ints per slot (ts_ns, len, index, start, stop, split,
 * in write order, as probes/_recread.c summary_fields gives them), the bytes
 * lying in `raw`. It keeps the slots whose index is in [lo, hi), walks them
 * and returns what the walk found, with what the slots it read say merged in
 * the order read (the first model, the finish reasons in turn, the last
 * counts); -1 for the first index and 0 for the first time of an empty ring.
 * Walking back, the slots before the last one with output are not read: each
 * counts the SSE events that start in it, at least one (slot_events).
 * None when a slot it reads is not one whole event (or [DONE], or the
 * chunked terminator) this module decides: the Python walk then reads the
 * ring instead.
 *
 * `data` is what agent/llm.py would decode (ASCII whitespace around it is
 * stripped here, as there). The answer is the one agent/llm.py gives for
 * the decoded object: `_from_object(api, obj)` for the chat (chat=True) and
 * completions APIs, and for Ollama's own chat (chat=True) and generate APIs
 * (its NDJSON lines and bodies), the top-level "model" and boolean "stream"
 * for requests.
 * None means "not decided here": input that is not one whole, valid JSON
 * object, or one this reader leaves to Python: non-ASCII or escaped text
 * in a value it returns, an escaped key where keys matter, NaN or
 * Infinity, very long numbers, deep nesting, a top-level "error" (the
 * server's error in place of an event, rare). The caller then decodes it
 * with json, which is also the reference these functions are tested
 * against (tests/test_llm.py): wherever they answer, the answer must be
 * the same.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define MAX_JSON_BYTES 65536 /* agent/llm.py MAX_JSON_BYTES */
#define MAX_MODEL_CHARS 256  /* agent/llm.py _MAX_MODEL_CHARS */
#define MAX_REASONS 8        /* agent/llm.py _MAX_FINISH_REASONS */
#define MAX_REASON_CHARS 64  /* agent/llm.py _REASON_CHARS */
#define MAX_TOKENS ((uint64_t)1 << 40)
#define MAX_CHOICES 256 /* choices read per object, as agent/llm.py reads them */
#define MAX_DEPTH 100   /* deeper nesting is left to json (and its recursion limit) */
#define MAX_NUMBER 1000 /* longer numbers are left to json (its limit on int digits) */

typedef struct {
    const unsigned char *p, *end;
} Cur;

typedef struct {
    const unsigned char *s;
    Py_ssize_t n;
    int esc;      /* holds a backslash escape: its decoded text is not s */
    int nonascii; /* holds UTF-8 beyond ASCII */
} Str;

static unsigned char REASON_CHAR[256];
static unsigned char HEX[256];
static unsigned char EVENT_NAME_CHAR[256]; /* letters, digits, '_' and '.' */

static inline void ws(Cur *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static inline int at(Cur *c, unsigned char ch) { return c->p < c->end && *c->p == ch; }

/* the length of one UTF-8 sequence beyond ASCII, as Python's strict decoder accepts it; -1 if bad */
static int utf8_len(const unsigned char *p, const unsigned char *e) {
    unsigned char b = p[0], lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF)
        return (e - p >= 2 && (p[1] & 0xC0) == 0x80) ? 2 : -1;
    if (b >= 0xE0 && b <= 0xEF) {
        if (e - p < 3)
            return -1;
        if (b == 0xE0)
            lo = 0xA0;
        else if (b == 0xED)
            hi = 0x9F; /* no surrogates */
        return (p[1] >= lo && p[1] <= hi && (p[2] & 0xC0) == 0x80) ? 3 : -1;
    }
    if (b >= 0xF0 && b <= 0xF4) {
        if (e - p < 4)
            return -1;
        if (b == 0xF0)
            lo = 0x90;
        else if (b == 0xF4)
            hi = 0x8F;
        return (p[1] >= lo && p[1] <= hi && (p[2] & 0xC0) == 0x80 && (p[3] & 0xC0) == 0x80) ? 4 : -1;
    }
    return -1;
}

/* a string at '"' (RFC 8259 §7, json's strict mode: no raw control characters) */
static int string(Cur *c, Str *out) {
    const unsigned char *p = c->p + 1, *e = c->end;
    out->s = p;
    out->esc = out->nonascii = 0;
#ifdef __SSE2__
    /* sixteen bytes at a time up to the first that is not plain ASCII text: a quote, a
     * backslash, a control (< 0x20) or beyond ASCII (>= 0x80, negative as a signed byte) */
    const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\'), space = _mm_set1_epi8(0x20);
    while (e - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        int stop = _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                                                  _mm_cmplt_epi8(v, space)));
        if (stop) {
            p += __builtin_ctz((unsigned)stop);
            break;
        }
        p += 16;
    }
#endif
    while (p < e) {
        unsigned char ch = *p;
        if (ch == '"') {
            out->n = p - out->s;
            c->p = p + 1;
            return 0;
        }
        if (ch == '\\') {
            out->esc = 1;
            if (e - p < 2)
                return -1;
            ch = p[1];
            if (ch == 'u') {
                if (e - p < 6 || !HEX[p[2]] || !HEX[p[3]] || !HEX[p[4]] || !HEX[p[5]])
                    return -1;
                p += 6;
            } else if (ch == '"' || ch == '\\' || ch == '/' || ch == 'b' || ch == 'f' || ch == 'n' ||
                       ch == 'r' || ch == 't') {
                p += 2;
            } else {
                return -1;
            }
        } else if (ch < 0x20) {
            return -1;
        } else if (ch < 0x80) {
            p++;
        } else {
            int k = utf8_len(p, e);
            if (k < 0)
                return -1;
            out->nonascii = 1;
            p += k;
        }
    }
    return -1;
}

static inline int is_digit(unsigned char ch) { return ch >= '0' && ch <= '9'; }

/* a number (json's grammar); *count is set to its value when it is an integer json
 * decodes to an int in [0, MAX_TOKENS), else to -1 */
static int number(Cur *c, int64_t *count) {
    const unsigned char *p = c->p, *e = c->end, *start = c->p;
    int neg = 0, integer = 1;
    uint64_t v = 0;
    int digits = 0;
    *count = -1;
    if (p < e && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= e || !is_digit(*p))
        return -1; /* also -Infinity, which json takes and this leaves to it */
    if (*p == '0') {
        p++;
        digits = 1;
    } else {
        while (p < e && is_digit(*p)) {
            if (digits < 19)
                v = v * 10 + (uint64_t)(*p - '0');
            digits++;
            p++;
        }
    }
    if (p < e && *p == '.') {
        if (e - p < 2 || !is_digit(p[1]))
            return -1; /* json stops the number before the dot, and then fails */
        p++;
        while (p < e && is_digit(*p))
            p++;
        integer = 0;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        const unsigned char *q = p + 1;
        if (q < e && (*q == '+' || *q == '-'))
            q++;
        if (q >= e || !is_digit(*q))
            return -1;
        while (q < e && is_digit(*q))
            q++;
        p = q;
        integer = 0;
    }
    if (p - start > MAX_NUMBER)
        return -1;
    c->p = p;
    if (integer && digits < 19 && (!neg || v == 0) && v < MAX_TOKENS)
        *count = (int64_t)v;
    return 0;
}

static int value(Cur *c, int depth);

static int literal(Cur *c, const char *word, size_t n) {
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0)
        return -1;
    c->p += n;
    return 0;
}

/* Containers, read a member at a time. open: at '{' or '[', sets *more unless it closes at
 * once. key: a member's name and colon, leaving the cursor at its value. next: after a value,
 * ',' (more) or the closing bracket. */
static int open_(Cur *c, unsigned char close, int *more) {
    c->p++;
    ws(c);
    *more = 1;
    if (at(c, close)) {
        c->p++;
        *more = 0;
    }
    return 0;
}

static int key(Cur *c, Str *k) {
    if (!at(c, '"') || string(c, k) < 0)
        return -1;
    ws(c);
    if (!at(c, ':'))
        return -1;
    c->p++;
    ws(c);
    return 0;
}

static int next(Cur *c, unsigned char close, int *more) {
    ws(c);
    if (at(c, ',')) {
        c->p++;
        ws(c);
        *more = 1;
        return 0;
    }
    if (at(c, close)) {
        c->p++;
        *more = 0;
        return 0;
    }
    return -1;
}

static int value(Cur *c, int depth) {
    int more;
    Str s;
    int64_t n;
    if (c->p >= c->end)
        return -1;
    switch (*c->p) {
    case '"':
        return string(c, &s);
    case '{':
        if (depth >= MAX_DEPTH)
            return -1;
        open_(c, '}', &more);
        while (more) {
            if (key(c, &s) < 0 || value(c, depth + 1) < 0 || next(c, '}', &more) < 0)
                return -1;
        }
        return 0;
    case '[':
        if (depth >= MAX_DEPTH)
            return -1;
        open_(c, ']', &more);
        while (more) {
            if (value(c, depth + 1) < 0 || next(c, ']', &more) < 0)
                return -1;
        }
        return 0;
    case 't':
        return literal(c, "true", 4);
    case 'f':
        return literal(c, "false", 5);
    case 'n':
        return literal(c, "null", 4);
    default:
        return number(c, &n);
    }
}

/* a key we look for: exact, unescaped; an escaped key at a level that matters is left to json */
static inline int is(const Str *k, const char *name) {
    size_t n = strlen(name);
    return (size_t)k->n == n && memcmp(k->s, name, n) == 0;
}

/* ---- values of the fields read ------------------------------------------------- */

/* "model": a str of 1..256 printable characters, else None (agent/llm.py _clean_model) */
static int model_value(Cur *c, int depth, Str *m, int *valid) {
    *valid = 0;
    if (!at(c, '"'))
        return value(c, depth);
    if (string(c, m) < 0 || m->esc || m->nonascii)
        return -1;
    if (m->n == 0 || m->n > MAX_MODEL_CHARS)
        return 0;
    for (Py_ssize_t i = 0; i < m->n; i++) {
        if (m->s[i] == 0x7F) /* raw controls below 0x20 are not valid JSON text */
            return 0;
    }
    *valid = 1;
    return 0;
}

/* a non-empty str */
static int text_value(Cur *c, int depth, int *nonempty) {
    Str s;
    *nonempty = 0;
    if (!at(c, '"'))
        return value(c, depth);
    if (string(c, &s) < 0)
        return -1;
    *nonempty = s.n > 0;
    return 0;
}

/* a non-empty list (open '[') or dict (open '{') */
static int container_value(Cur *c, int depth, unsigned char open, int *nonempty) {
    *nonempty = 0;
    if (at(c, open)) {
        Cur look = {c->p + 1, c->end};
        ws(&look);
        *nonempty = !at(&look, open == '[' ? ']' : '}');
    }
    return value(c, depth);
}

/* a token count (agent/llm.py _count): a JSON integer in [0, 2**40) */
static int count_value(Cur *c, int depth, int64_t *count) {
    *count = -1;
    if (c->p < c->end && (*c->p == '-' || is_digit(*c->p)))
        return number(c, count);
    return value(c, depth);
}

typedef struct {
    int output;
    Str reasons[MAX_REASONS];
    int nreasons;
    Str model;
    int model_valid;
    int64_t input_tokens, output_tokens;
} Event;

/* agent/llm.py _add_reason: a plain token of 1..64 characters, once, at most 8 */
static void add_reason(Event *ev, const Str *r) {
    if (r->n < 1 || r->n > MAX_REASON_CHARS || ev->nreasons >= MAX_REASONS)
        return;
    for (Py_ssize_t i = 0; i < r->n; i++) {
        if (!REASON_CHAR[r->s[i]])
            return;
    }
    for (int i = 0; i < ev->nreasons; i++) {
        if (ev->reasons[i].n == r->n && memcmp(ev->reasons[i].s, r->s, (size_t)r->n) == 0)
            return;
    }
    ev->reasons[ev->nreasons++] = *r;
}

/* a finish or done reason: *is_str set when the value is a str (kept in *r, for add_reason);
 * an escaped one is left to json (-1) */
static int reason_value(Cur *c, int depth, Str *r, int *is_str) {
    *is_str = at(c, '"');
    if (!*is_str)
        return value(c, depth);
    if (string(c, r) < 0 || r->esc)
        return -1;
    return 0;
}

/* a chat delta or message (agent/llm.py _chat_output), at '{' */
static int chat_output(Cur *c, int depth, int *output) {
    enum { CONTENT, REASONING_CONTENT, REASONING, THINKING, REFUSAL, TOOL_CALLS, FUNCTION_CALL, N };
    int f[N] = {0};
    int more;
    Str k;
    open_(c, '}', &more);
    while (more) {
        if (key(c, &k) < 0 || k.esc)
            return -1;
        int r;
        if (is(&k, "content"))
            r = text_value(c, depth + 1, &f[CONTENT]);
        else if (is(&k, "reasoning_content"))
            r = text_value(c, depth + 1, &f[REASONING_CONTENT]);
        else if (is(&k, "reasoning"))
            r = text_value(c, depth + 1, &f[REASONING]);
        else if (is(&k, "thinking"))
            r = text_value(c, depth + 1, &f[THINKING]);
        else if (is(&k, "refusal"))
            r = text_value(c, depth + 1, &f[REFUSAL]);
        else if (is(&k, "tool_calls"))
            r = container_value(c, depth + 1, '[', &f[TOOL_CALLS]);
        else if (is(&k, "function_call"))
            r = container_value(c, depth + 1, '{', &f[FUNCTION_CALL]);
        else
            r = value(c, depth + 1);
        if (r < 0 || next(c, '}', &more) < 0)
            return -1;
    }
    *output = 0;
    for (int i = 0; i < N; i++)
        *output |= f[i];
    return 0;
}

/* one element of "choices", at '{' */
static int choice(Cur *c, int depth, int chat, Event *ev) {
    int delta_dict = 0, delta_out = 0, message_dict = 0, message_out = 0, text_out = 0, reason_str = 0;
    Str reason = {0};
    int more;
    Str k;
    open_(c, '}', &more);
    while (more) {
        if (key(c, &k) < 0 || k.esc)
            return -1;
        int r;
        if (chat && (is(&k, "delta") || is(&k, "message"))) {
            int *dict = k.n == 5 ? &delta_dict : &message_dict;
            int *out = k.n == 5 ? &delta_out : &message_out;
            *dict = at(c, '{');
            *out = 0;
            r = *dict ? (depth + 1 >= MAX_DEPTH ? -1 : chat_output(c, depth + 1, out)) : value(c, depth + 1);
        } else if (!chat && is(&k, "text")) {
            r = text_value(c, depth + 1, &text_out);
        } else if (is(&k, "finish_reason")) {
            r = reason_value(c, depth + 1, &reason, &reason_str);
        } else {
            r = value(c, depth + 1);
        }
        if (r < 0 || next(c, '}', &more) < 0)
            return -1;
    }
    if (chat ? (delta_dict ? delta_out : (message_dict && message_out)) : text_out)
        ev->output = 1;
    if (reason_str)
        add_reason(ev, &reason);
    return 0;
}

static int choices_value(Cur *c, int depth, int chat, Event *ev) {
    /* the last "choices" key is the one json keeps */
    ev->output = 0;
    ev->nreasons = 0;
    if (!at(c, '['))
        return value(c, depth);
    if (depth >= MAX_DEPTH)
        return -1;
    int more, i = 0;
    open_(c, ']', &more);
    while (more) {
        int r;
        if (i < MAX_CHOICES && at(c, '{'))
            r = depth + 1 >= MAX_DEPTH ? -1 : choice(c, depth + 1, chat, ev);
        else
            r = value(c, depth + 1);
        if (r < 0 || next(c, ']', &more) < 0)
            return -1;
        i++;
    }
    return 0;
}

static int usage_value(Cur *c, int depth, Event *ev) {
    ev->input_tokens = ev->output_tokens = -1;
    if (!at(c, '{'))
        return value(c, depth);
    if (depth >= MAX_DEPTH)
        return -1;
    int more;
    Str k;
    open_(c, '}', &more);
    while (more) {
        if (key(c, &k) < 0 || k.esc)
            return -1;
        int r;
        if (is(&k, "prompt_tokens"))
            r = count_value(c, depth + 1, &ev->input_tokens);
        else if (is(&k, "completion_tokens"))
            r = count_value(c, depth + 1, &ev->output_tokens);
        else
            r = value(c, depth + 1);
        if (r < 0 || next(c, '}', &more) < 0)
            return -1;
    }
    return 0;
}

/* ---- entry points -------------------------------------------------------------- */

static inline int space(unsigned char ch) { return ch == ' ' || (ch >= '\t' && ch <= '\r'); }

/* p[0:n] stripped as bytes.strip() does, in *c; 0 when it is not an object to read */
static int object_at(const unsigned char *p, Py_ssize_t n, Cur *c) {
    if (n > MAX_JSON_BYTES)
        return 0;
    const unsigned char *e = p + n;
    while (p < e && space(*p))
        p++;
    while (e > p && space(e[-1]))
        e--;
    if (p == e || *p != '{')
        return 0;
    c->p = p;
    c->end = e;
    return 1;
}

/* the bytes argument, as object_at reads it; -1 with an exception set for bad arguments */
static int object_bytes(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, Cur *c) {
    if (nargs != want || !PyBytes_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, the first bytes", want);
        return -1;
    }
    return object_at((const unsigned char *)PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]), c);
}

/* The strings returned lately, by their bytes: a stream names the same model and finish reason
 * in every event, and finding the str made for the last one costs less than making another.
 * STR_CACHE_SLOTS entries of at most STR_CACHE_CHARS ASCII characters, replaced on a miss;
 * strs are immutable, so the one object is handed to every caller. Only read with the GIL. */
#define STR_CACHE_SLOTS 64 /* a power of 2 */
#define STR_CACHE_CHARS 64
static PyObject *str_cache[STR_CACHE_SLOTS];

static PyObject *ascii_str(const unsigned char *p, Py_ssize_t n) {
    if (n <= 0 || n > STR_CACHE_CHARS)
        return PyUnicode_DecodeASCII((const char *)p, n, NULL);
    uint32_t h = 2166136261u; /* FNV-1a */
    for (Py_ssize_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    PyObject **slot = &str_cache[h & (STR_CACHE_SLOTS - 1)];
    PyObject *o = *slot;
    if (o && PyUnicode_GET_LENGTH(o) == n && memcmp(PyUnicode_1BYTE_DATA(o), p, (size_t)n) == 0)
        return Py_NewRef(o);
    o = PyUnicode_DecodeASCII((const char *)p, n, NULL);
    if (o && PyUnicode_IS_COMPACT_ASCII(o))
        Py_XSETREF(*slot, Py_NewRef(o));
    return o;
}

static PyObject *str_or_none(const Str *s, int valid) {
    if (!valid)
        Py_RETURN_NONE;
    return ascii_str(s->s, s->n);
}

static PyObject *count_or_none(int64_t v) {
    if (v < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(v);
}

/* The (data, chat) arguments of an event reader: 1 with *c at the object, *chat set and *ev
 * cleared; 0 when data is not an object to read; -1 with an exception set. */
static int event_args(PyObject *const *args, Py_ssize_t nargs, Cur *c, int *chat, Event *ev) {
    int ok = object_bytes(args, nargs, 2, c);
    if (ok <= 0)
        return ok;
    *chat = PyObject_IsTrue(args[1]);
    if (*chat < 0)
        return -1;
    memset(ev, 0, sizeof *ev);
    ev->input_tokens = ev->output_tokens = -1;
    return 1;
}

/* (output, model, finish_reasons, input_tokens, output_tokens), with `done` after output
 * unless it is -1 */
static PyObject *event_tuple(const Event *ev, int done) {
    PyObject *reasons = PyTuple_New(ev->nreasons);
    if (!reasons)
        return NULL;
    for (int i = 0; i < ev->nreasons; i++) {
        PyObject *s = ascii_str(ev->reasons[i].s, ev->reasons[i].n);
        if (!s) {
            Py_DECREF(reasons);
            return NULL;
        }
        PyTuple_SET_ITEM(reasons, i, s);
    }
    PyObject *model = str_or_none(&ev->model, ev->model_valid);
    PyObject *in = count_or_none(ev->input_tokens);
    PyObject *out = count_or_none(ev->output_tokens);
    if (!model || !in || !out) {
        Py_XDECREF(model);
        Py_XDECREF(in);
        Py_XDECREF(out);
        Py_DECREF(reasons);
        return NULL;
    }
    /* the tuple filled directly: Py_BuildValue parses its format on every call */
    PyObject *t = PyTuple_New(done < 0 ? 5 : 6);
    if (!t) {
        Py_DECREF(model);
        Py_DECREF(in);
        Py_DECREF(out);
        Py_DECREF(reasons);
        return NULL;
    }
    Py_ssize_t i = done < 0 ? 1 : 2; /* where model goes */
    PyTuple_SET_ITEM(t, 0, Py_NewRef(ev->output ? Py_True : Py_False));
    if (done >= 0)
        PyTuple_SET_ITEM(t, 1, Py_NewRef(done ? Py_True : Py_False));
    PyTuple_SET_ITEM(t, i, model);
    PyTuple_SET_ITEM(t, i + 1, reasons);
    PyTuple_SET_ITEM(t, i + 2, in);
    PyTuple_SET_ITEM(t, i + 3, out);
    return t;
}

/* An OpenAI-compatible object in p[0:n] (stripped here, as bytes.strip() does) read into *ev:
 * 1 when read, 0 when not decided here. */
static int openai_read(const unsigned char *p, Py_ssize_t n, int chat, Event *ev) {
    Cur c;
    if (!object_at(p, n, &c))
        return 0;
    memset(ev, 0, sizeof *ev);
    ev->input_tokens = ev->output_tokens = -1;
    int more;
    Str k;
    open_(&c, '}', &more);
    while (more) {
        if (key(&c, &k) < 0 || k.esc)
            return 0;
        int r;
        if (is(&k, "model"))
            r = model_value(&c, 1, &ev->model, &ev->model_valid);
        else if (is(&k, "choices"))
            r = choices_value(&c, 1, chat, ev);
        else if (is(&k, "usage"))
            r = usage_value(&c, 1, ev);
        else if (is(&k, "error"))
            return 0; /* an error in place of an event: agent/llm.py reads it */
        else
            r = value(&c, 1);
        if (r < 0 || next(&c, '}', &more) < 0)
            return 0;
    }
    return c.p == c.end;
}

static PyObject *openai_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Cur c;
    Event ev;
    int chat;
    int ok = event_args(args, nargs, &c, &chat, &ev);
    if (ok < 0)
        return NULL;
    if (ok == 0 || !openai_read(c.p, c.end - c.p, chat, &ev))
        Py_RETURN_NONE;
    return event_tuple(&ev, -1);
}

/* Ollama's own objects (/api/chat: chat=True, /api/generate), as agent/llm.py
 * _from_object reads them: output in "message" (chat) or a non-empty "response"
 * or "thinking" (generate), "done" true, "done_reason", and the two eval counts. */
static PyObject *ollama_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Cur c;
    Event ev;
    int chat;
    int ok = event_args(args, nargs, &c, &chat, &ev);
    if (ok < 0)
        return NULL;
    if (ok == 0)
        Py_RETURN_NONE;
    /* json keeps a repeated key's last value: each field is reset where its key is read */
    int response = 0, thinking = 0, message = 0, done = 0, reason_str = 0, more;
    Str reason = {0};
    Str k;
    open_(&c, '}', &more);
    while (more) {
        if (key(&c, &k) < 0 || k.esc)
            Py_RETURN_NONE;
        int r;
        if (is(&k, "model")) {
            r = model_value(&c, 1, &ev.model, &ev.model_valid);
        } else if (!chat && is(&k, "response")) {
            r = text_value(&c, 1, &response);
        } else if (!chat && is(&k, "thinking")) {
            r = text_value(&c, 1, &thinking);
        } else if (chat && is(&k, "message")) {
            message = 0;
            r = at(&c, '{') ? chat_output(&c, 1, &message) : value(&c, 1);
        } else if (is(&k, "done")) {
            done = at(&c, 't');
            r = value(&c, 1);
        } else if (is(&k, "done_reason")) {
            r = reason_value(&c, 1, &reason, &reason_str);
        } else if (is(&k, "prompt_eval_count")) {
            r = count_value(&c, 1, &ev.input_tokens);
        } else if (is(&k, "eval_count")) {
            r = count_value(&c, 1, &ev.output_tokens);
        } else if (is(&k, "error")) {
            Py_RETURN_NONE; /* an error in place of a line: agent/llm.py reads it */
        } else {
            r = value(&c, 1);
        }
        if (r < 0 || next(&c, '}', &more) < 0)
            Py_RETURN_NONE;
    }
    if (c.p != c.end)
        Py_RETURN_NONE;
    ev.output = chat ? message : (response || thinking);
    if (reason_str)
        add_reason(&ev, &reason);
    return event_tuple(&ev, done);
}

static PyObject *request_fields(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Cur c;
    int ok = object_bytes(args, nargs, 1, &c);
    if (ok < 0)
        return NULL;
    if (ok == 0)
        Py_RETURN_NONE;
    Str model = {0};
    int model_valid = 0, stream = -1, more;
    Str k;
    open_(&c, '}', &more);
    while (more) {
        if (key(&c, &k) < 0 || k.esc)
            Py_RETURN_NONE;
        int r;
        if (is(&k, "model")) {
            r = model_value(&c, 1, &model, &model_valid);
        } else if (is(&k, "stream")) {
            stream = at(&c, 't') ? 1 : at(&c, 'f') ? 0 : -1;
            r = value(&c, 1);
        } else {
            r = value(&c, 1);
        }
        if (r < 0 || next(&c, '}', &more) < 0)
            Py_RETURN_NONE;
    }
    if (c.p != c.end)
        Py_RETURN_NONE;
    PyObject *m = str_or_none(&model, model_valid);
    if (!m)
        return NULL;
    PyObject *s = stream < 0 ? Py_None : stream ? Py_True : Py_False;
    Py_INCREF(s);
    return Py_BuildValue("(NN)", m, s);
}

/* agent/llm.py _whole_event (its reference): the JSON object of a write holding exactly one
 * event, whole: an optional chunk-size line, "data:" and an optional space (or nothing, for
 * NDJSON), the object ending its line with "}", then one or two line ends and, with a chunk
 * size, the chunk's CRLF, which the size must match. After the object, one of these endings
 * (its line-end bytes, and whether it closes the chunk), as agent/llm.py _ENDINGS has them. */
static const struct {
    const char *s;
    Py_ssize_t n, ends;
    int crlf;
} ENDINGS[] = {
    {"\r\n\r\n", 4, 2, 1},    {"\r\n", 2, 2, 0},       {"\n\r\n", 3, 1, 1},   {"\n", 1, 1, 0},
    {"\r\n\r\n\r\n", 6, 4, 1}, {"\r\n\n\r\n", 5, 3, 1}, {"\r\n\n", 3, 3, 0},  {"\n\r\n\r\n", 5, 3, 1},
    {"\n\n\r\n", 4, 2, 1},    {"\n\n", 2, 2, 0},
};

/* A chunk-size line at the start of f: 1-8 hex digits and CRLF. Its length, with *size set;
 * 0 when there is none. */
static Py_ssize_t size_line(const unsigned char *f, Py_ssize_t n, long long *size) {
    Py_ssize_t i = 0;
    long long v = 0;
    while (i < n && i < 9 && HEX[f[i]]) {
        v = v * 16 + (f[i] <= '9' ? f[i] - '0' : (f[i] | 0x20) - 'a' + 10);
        i++;
    }
    if (i < 1 || i > 8 || n - i < 2 || f[i] != '\r' || f[i + 1] != '\n')
        return 0;
    *size = v;
    return i + 2;
}

/* Where the object of a fragment holding exactly one whole event starts, *len set to its
 * length; -1 for anything else (whole_event's reading). */
static Py_ssize_t whole_event_at(const unsigned char *f, Py_ssize_t n, Py_ssize_t *len) {
    if (n > MAX_JSON_BYTES)
        return -1;
    long long size = -1;
    Py_ssize_t pos = size_line(f, n, &size), body = pos;
    if (n - pos >= 5 && memcmp(f + pos, "data:", 5) == 0) {
        pos += 5;
        if (pos < n && f[pos] == ' ')
            pos++;
    }
    if (pos >= n || f[pos] != '{')
        return -1;
    const unsigned char *lf = memchr(f + pos, '\n', (size_t)(n - pos));
    if (!lf)
        return -1;
    const unsigned char *cr = memchr(f + pos, '\r', (size_t)(lf - (f + pos)));
    Py_ssize_t end = (cr ? cr : lf) - f;
    if (end - pos < 2 || f[end - 1] != '}')
        return -1;
    for (size_t i = 0; i < sizeof(ENDINGS) / sizeof(ENDINGS[0]); i++) {
        if (ENDINGS[i].n == n - end && memcmp(f + end, ENDINGS[i].s, (size_t)ENDINGS[i].n) == 0) {
            int whole = size < 0 ? !ENDINGS[i].crlf : ENDINGS[i].crlf && size == end + ENDINGS[i].ends - body;
            if (!whole)
                return -1;
            *len = end - pos;
            return pos;
        }
    }
    return -1;
}

static PyObject *whole_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 1 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "expected one bytes argument");
        return NULL;
    }
    const unsigned char *f = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t len, at = whole_event_at(f, PyBytes_GET_SIZE(args[0]), &len);
    if (at < 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)f + at, len);
}

/* A write of one whole SSE [DONE] event, as agent/llm.py _DONE_WRITES lists them: "data:", an
 * optional space, "[DONE]" and one of ENDINGS; with the chunk's CRLF among them, after a
 * chunk-size line giving the event's size in hex (no leading zero, lower or upper case), and
 * with none without. */
static int done_write(const unsigned char *f, Py_ssize_t n) {
    if (n > 64)
        return 0;
    long long size = -1;
    Py_ssize_t pos = size_line(f, n, &size); /* "data:" is no size line: 't' follows "da" */
    if (pos) {
        /* the digits as %llx or %llX writes the size: no leading zero, letters in one case */
        Py_ssize_t digits = pos - 2;
        int lower = 0, upper = 0;
        for (Py_ssize_t i = 0; i < digits; i++) {
            lower |= f[i] >= 'a';
            upper |= f[i] >= 'A' && f[i] <= 'F';
        }
        if ((digits > 1 && f[0] == '0') || (lower && upper))
            return 0;
    } else {
        size = -1;
    }
    Py_ssize_t body = pos;
    if (n - pos < 5 || memcmp(f + pos, "data:", 5) != 0)
        return 0;
    pos += 5;
    if (pos < n && f[pos] == ' ')
        pos++;
    if (n - pos < 6 || memcmp(f + pos, "[DONE]", 6) != 0)
        return 0;
    pos += 6;
    for (size_t i = 0; i < sizeof(ENDINGS) / sizeof(ENDINGS[0]); i++) {
        if (ENDINGS[i].n == n - pos && memcmp(f + pos, ENDINGS[i].s, (size_t)ENDINGS[i].n) == 0)
            return size < 0 ? !ENDINGS[i].crlf : ENDINGS[i].crlf && size == n - 2 - body;
    }
    return 0;
}

/* ---- the tail ring of a streamed response ------------------------------------------ */

/* one slot as probes/_recread.c summary_fields packs it: six little-endian 64-bit ints */
typedef struct {
    uint64_t ts;
    int64_t len, index, start, stop, split;
} Slot;

/* What one ring slot shows, as agent/assemble.py _fragment reads it for the chat (chat=1) and
 * completions APIs: 1 output, 0 none, -1 not decided here; *ev filled when *read is set. */
/* Where a slot's bytes lie in a record of n bytes, [*start, *stop), cut to the record; 0 for
 * slots not from the record reader (a negative offset). */
static int slot_span(Py_ssize_t n, const Slot *t, Py_ssize_t *start, Py_ssize_t *stop) {
    if (t->start < 0 || t->stop < 0)
        return 0;
    *start = t->start < n ? (Py_ssize_t)t->start : n;
    *stop = t->stop < n ? (Py_ssize_t)t->stop : n;
    if (*stop < *start)
        *stop = *start;
    return 1;
}

static int slot_output(const unsigned char *raw, Py_ssize_t n, const Slot *t, int chat, Event *ev,
                       int *read) {
    *read = 0;
    Py_ssize_t start, stop;
    if (t->split >= 0 || !slot_span(n, t, &start, &stop))
        return -1; /* a long write's head and tail (or slots not from the record reader): left to Python */
    const unsigned char *f = raw + start;
    Py_ssize_t m = stop - start;
    if (t->len <= 7) { /* the chunked terminator alone ("0" once CR and LF are stripped), or its last CRLF */
        Py_ssize_t a = 0, b = m;
        while (a < b && (f[a] == '\r' || f[a] == '\n'))
            a++;
        while (b > a && (f[b - 1] == '\r' || f[b - 1] == '\n'))
            b--;
        if ((b - a == 1 && f[a] == '0') || b == a)
            return 0;
    }
    if (done_write(f, m)) {
        memset(ev, 0, sizeof *ev);
        ev->input_tokens = ev->output_tokens = -1;
        *read = 1;
        return 0; /* [DONE]: no output */
    }
    Py_ssize_t len, at = whole_event_at(f, m, &len);
    if (at < 0 || !openai_read(f + at, len, chat, ev))
        return -1;
    *read = 1;
    return ev->output ? 1 : 0;
}

/* The SSE events that start in f[0:m], as agent/llm.py write_events counts them: each line
 * that opens with "data:" and follows no other such line. */
static long long sse_events(const unsigned char *f, Py_ssize_t m) {
    long long count = 0;
    int prev_data = 0;
    Py_ssize_t pos = 0;
    while (pos < m) {
        const unsigned char *nl = memchr(f + pos, '\n', (size_t)(m - pos));
        Py_ssize_t end = nl ? nl - f : m;
        int is_data = m - pos >= 5 && memcmp(f + pos, "data:", 5) == 0;
        if (is_data && !prev_data)
            count++;
        prev_data = is_data;
        pos = end + 1;
    }
    return count;
}

/* The events of a ring slot the walk does not read, as agent/assemble.py _slot_events counts
 * them: those starting in its head and in its tail, at least one; -1 for a slot whose bytes
 * are not in the record. */
static long long slot_events(const unsigned char *raw, Py_ssize_t n, const Slot *t) {
    Py_ssize_t start, stop;
    if (!slot_span(n, t, &start, &stop))
        return -1;
    long long count;
    if (t->split >= 0) {
        Py_ssize_t cut = t->split < stop - start ? start + (Py_ssize_t)t->split : stop;
        count = sse_events(raw + start, cut - start) + sse_events(raw + cut, stop - cut);
    } else {
        count = sse_events(raw + start, stop - start);
    }
    return count > 1 ? count : 1;
}

/* ring_walk(raw, slots, lo, hi, sample, seen, output_seen, chat): see the module's header. */
static PyObject *ring_walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "ring_walk(raw, slots, lo, hi, sample, seen, output_seen, chat)");
        return NULL;
    }
    long long a[5];
    for (int i = 0; i < 5; i++) {
        a[i] = PyLong_AsLongLong(args[2 + i]);
        if (a[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    long long lo = a[0], hi = a[1], sample = a[2], seen = a[3];
    int output_seen = a[4] != 0;
    int chat = PyObject_IsTrue(args[7]);
    if (chat < 0)
        return NULL;
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t ns = PyBytes_GET_SIZE(args[1]);
    if (ns % (Py_ssize_t)sizeof(Slot))
        return PyErr_Format(PyExc_ValueError, "ring_walk(): %zd bytes of slots", ns);
    const char *sp = PyBytes_AS_STRING(args[1]);
    Slot ring[64];
    Py_ssize_t kept = 0;
    for (Py_ssize_t off = 0; off < ns; off += (Py_ssize_t)sizeof(Slot)) { /* the phase's last writes */
        Slot t;
        memcpy(&t, sp + off, sizeof t);
        if (t.index < lo || t.index >= hi)
            continue;
        if (kept == 64)
            Py_RETURN_NONE;
        ring[kept++] = t;
    }
    long long unseen_mid = 0;
    if (hi > sample) {
        long long first = kept ? ring[0].index : hi;
        long long from = sample > seen ? sample : seen;
        unseen_mid = first - from > 0 ? first - from : 0;
    }
    /* Walk as _finish does: back from the end to the last write with output once output was
     * seen (or writes went unseen), else forward over every slot. What each read slot says is
     * merged in the order read: the first model, finish reasons in turn, the last counts. */
    long long outputs = 0, in_tok = -1, out_tok = -1;
    uint64_t first_out = 0, last_out = 0;
    int any_out = 0;
    Str model = {0};
    int have_model = 0;
    Str reasons[64 * MAX_REASONS];
    int nreasons = 0;
    int backward = output_seen || unseen_mid;
    for (Py_ssize_t k = 0; k < kept; k++) {
        Py_ssize_t i = backward ? kept - 1 - k : k;
        Event ev;
        int read;
        int out = slot_output(raw, n, &ring[i], chat, &ev, &read);
        if (out < 0)
            Py_RETURN_NONE;
        if (read) {
            if (!have_model && ev.model_valid && ev.model.n > 0) {
                model = ev.model;
                have_model = 1;
            }
            for (int r = 0; r < ev.nreasons; r++)
                reasons[nreasons++] = ev.reasons[r];
            if (ev.input_tokens >= 0)
                in_tok = ev.input_tokens;
            if (ev.output_tokens >= 0)
                out_tok = ev.output_tokens;
        }
        if (out) {
            if (backward) {
                /* the writes before it: mid-stream, their events taken as output events */
                outputs = 1;
                for (Py_ssize_t j = 0; j < i; j++) {
                    long long e = slot_events(raw, n, &ring[j]);
                    if (e < 0)
                        Py_RETURN_NONE;
                    outputs += e;
                }
                last_out = ring[i].ts;
                first_out = ring[0].ts;
                any_out = 1;
                break;
            }
            outputs++;
            if (!any_out)
                first_out = ring[i].ts;
            last_out = ring[i].ts;
            any_out = 1;
        }
    }
    PyObject *t = PyTuple_New(11);
    if (!t)
        return NULL;
    PyObject *rs = PyTuple_New(nreasons);
    PyTuple_SET_ITEM(t, 8, rs);
    for (int r = 0; rs && r < nreasons; r++) {
        PyObject *o = ascii_str(reasons[r].s, reasons[r].n);
        if (!o) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(rs, r, o);
    }
    PyObject *items[] = {
        PyLong_FromSsize_t(kept),
        PyLong_FromLongLong(kept ? ring[0].index : -1),
        PyLong_FromUnsignedLongLong(kept ? ring[0].ts : 0),
        PyLong_FromLongLong(unseen_mid),
        PyLong_FromLongLong(outputs),
        any_out ? PyLong_FromUnsignedLongLong(first_out) : Py_NewRef(Py_None),
        any_out ? PyLong_FromUnsignedLongLong(last_out) : Py_NewRef(Py_None),
        have_model ? ascii_str(model.s, model.n) : Py_NewRef(Py_None),
    };
    int failed = !rs;
    for (int i = 0; i < 8; i++) {
        if (!items[i])
            failed = 1;
        PyTuple_SET_ITEM(t, i, items[i]); /* a NULL item is skipped by the tuple's dealloc */
    }
    PyObject *in = in_tok < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(in_tok);
    PyObject *out = out_tok < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(out_tok);
    PyTuple_SET_ITEM(t, 9, in);
    PyTuple_SET_ITEM(t, 10, out);
    if (failed || !in || !out) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

/* The JSON object of a response write that is exactly one chunk holding exactly one whole
 * event: a chunk-size line (1-8 hex digits, CRLF), then for SSE "data:" and an optional space,
 * the object ending its line with "}", a blank line (two line ends, each CRLF or LF) and the
 * chunk's CRLF; for NDJSON the object, one line end (LF or CRLF) and the chunk's CRLF; the
 * size matching. Servers stream this way, one flush per event; agent/assemble.py then skips
 * the HTTP/1 and SSE or NDJSON parsers, whose state such a write leaves as it found it. A
 * subset of what whole_event accepts (tests hold it to that, and to the parsers). */
typedef struct {
    const char *s;
    Py_ssize_t n;
} Ending;
static const Ending SSE_ENDINGS[] = {{"\n\n\r\n", 4}, {"\r\n\r\n\r\n", 6}, {"\r\n\n\r\n", 5}, {"\n\r\n\r\n", 5}, {NULL, 0}};
static const Ending NDJSON_ENDINGS[] = {{"\n\r\n", 3}, {"\r\n\r\n", 4}, {NULL, 0}};

/* From pos (just past the size line, or an SSE event's name line), what both one-step readings
 * take: for SSE "data:" and an optional space, then the object ending its line with "}", its
 * line ends and the chunk's CRLF, the chunk size (`size`, counted from `body`) matching. The
 * object's [start, end) in *start and *end; 0 for anything else. */
static int chunk_object(const unsigned char *f, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t body, long long size,
                        int sse, Py_ssize_t *start, Py_ssize_t *end) {
    if (sse) {
        if (n - pos < 6 || memcmp(f + pos, "data:", 5) != 0)
            return 0;
        pos += 5;
        if (f[pos] == ' ')
            pos++;
    }
    if (pos >= n || f[pos] != '{')
        return 0;
    /* the object's line ends at its first CR or LF (memchr: a byte-at-a-time scan cost as much
     * as reading the object) */
    const unsigned char *lf = memchr(f + pos, '\n', (size_t)(n - pos));
    const unsigned char *cr = memchr(f + pos, '\r', (size_t)((lf ? lf : f + n) - (f + pos)));
    Py_ssize_t e = cr ? cr - f : lf ? lf - f : n;
    if (e >= n || e - pos < 2 || f[e - 1] != '}')
        return 0;
    for (const Ending *x = sse ? SSE_ENDINGS : NDJSON_ENDINGS; x->s; x++) {
        if (x->n == n - e && memcmp(f + e, x->s, (size_t)(n - e)) == 0) {
            if (size != n - 2 - body)
                return 0;
            *start = pos;
            *end = e;
            return 1;
        }
    }
    return 0;
}

/* What both one-step readers open with: their one bytes argument (in *f and *n) and its
 * chunk-size line (the size in *size). The body's offset; 0 for a write too long or not
 * opening with a size line; -1 with TypeError set. */
static Py_ssize_t chunk_open(PyObject *const *args, Py_ssize_t nargs, const unsigned char **f, Py_ssize_t *n,
                             long long *size) {
    if (nargs != 1 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "expected one bytes argument");
        return -1;
    }
    *n = PyBytes_GET_SIZE(args[0]);
    *f = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    *size = 0;
    return *n > MAX_JSON_BYTES ? 0 : size_line(*f, *n, size);
}

static PyObject *chunk_event(PyObject *const *args, Py_ssize_t nargs, int sse) {
    const unsigned char *f;
    Py_ssize_t n;
    long long size;
    Py_ssize_t body = chunk_open(args, nargs, &f, &n, &size);
    if (body < 0)
        return NULL;
    Py_ssize_t start, end;
    if (body == 0 || !chunk_object(f, n, body, body, size, sse, &start, &end))
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)f + start, end - start);
}

/* The name and JSON object of a response write that is exactly one chunk holding exactly one
 * whole named SSE event: a chunk-size line, "event:", an optional space and a name of 1-64
 * letters, digits, '_' or '.' ending its line (LF or CRLF), then what sse_chunk_event takes
 * after the size line ("data:", the object, the blank line, the chunk's CRLF), the size
 * matching. The OpenAI Responses and Anthropic Messages APIs stream this way; the HTTP/1 and
 * SSE parsers are left as feeding it would leave them (tests hold it to the parsers). */
static PyObject *sse_named_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const unsigned char *f;
    Py_ssize_t n;
    long long size;
    Py_ssize_t body = chunk_open(args, nargs, &f, &n, &size), pos = body;
    if (body < 0)
        return NULL;
    if (body == 0 || n - pos < 8 || memcmp(f + pos, "event:", 6) != 0)
        Py_RETURN_NONE;
    pos += 6;
    if (f[pos] == ' ')
        pos++;
    Py_ssize_t name = pos;
    while (pos < n && pos - name <= 64 && EVENT_NAME_CHAR[f[pos]])
        pos++;
    Py_ssize_t name_len = pos - name;
    if (name_len < 1 || name_len > 64 || pos >= n)
        Py_RETURN_NONE;
    if (f[pos] == '\r')
        pos++;
    if (pos >= n || f[pos] != '\n')
        Py_RETURN_NONE;
    pos++;
    Py_ssize_t start, end;
    if (!chunk_object(f, n, pos, body, size, 1, &start, &end))
        Py_RETURN_NONE;
    PyObject *nm = PyBytes_FromStringAndSize((const char *)f + name, name_len);
    if (!nm)
        return NULL;
    PyObject *obj = PyBytes_FromStringAndSize((const char *)f + start, end - start);
    if (!obj) {
        Py_DECREF(nm);
        return NULL;
    }
    PyObject *t = PyTuple_Pack(2, nm, obj);
    Py_DECREF(nm);
    Py_DECREF(obj);
    return t;
}

static PyObject *sse_chunk_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return chunk_event(args, nargs, 1);
}

static PyObject *ndjson_chunk_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return chunk_event(args, nargs, 0);
}

static PyMethodDef methods[] = {
    {"sse_chunk_event", (PyCFunction)(void (*)(void))sse_chunk_event, METH_FASTCALL,
     "sse_chunk_event(write) -> bytes | None"},
    {"sse_named_event", (PyCFunction)(void (*)(void))sse_named_event, METH_FASTCALL,
     "sse_named_event(write) -> (name, object) | None"},
    {"ndjson_chunk_event", (PyCFunction)(void (*)(void))ndjson_chunk_event, METH_FASTCALL,
     "ndjson_chunk_event(write) -> bytes | None"},
    {"whole_event", (PyCFunction)(void (*)(void))whole_event, METH_FASTCALL,
     "whole_event(fragment) -> bytes | None"},
    {"openai_event", (PyCFunction)(void (*)(void))openai_event, METH_FASTCALL,
     "openai_event(data, chat) -> (output, model, finish_reasons, input_tokens, output_tokens) | None"},
    {"ollama_event", (PyCFunction)(void (*)(void))ollama_event, METH_FASTCALL,
     "ollama_event(data, chat) -> (output, done, model, finish_reasons, input_tokens, output_tokens) | None"},
    {"request_fields", (PyCFunction)(void (*)(void))request_fields, METH_FASTCALL,
     "request_fields(data) -> (model, stream) | None"},
    {"ring_walk", (PyCFunction)(void (*)(void))ring_walk, METH_FASTCALL,
     "ring_walk(raw, slots, lo, hi, sample, seen, output_seen, chat) -> tuple | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_llmjson",
    "OpenAI-compatible and Ollama JSON bodies read in one pass (agent/llm.py is the reference).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__llmjson(void) {
    const char *extra = "_.:-";
    memset(REASON_CHAR, 0, sizeof(REASON_CHAR));
    memset(HEX, 0, sizeof(HEX));
    for (int ch = '0'; ch <= '9'; ch++)
        REASON_CHAR[ch] = HEX[ch] = 1;
    for (int ch = 'a'; ch <= 'z'; ch++)
        REASON_CHAR[ch] = REASON_CHAR[ch - 32] = 1;
    for (int ch = 'a'; ch <= 'f'; ch++)
        HEX[ch] = HEX[ch - 32] = 1;
    for (const char *p = extra; *p; p++)
        REASON_CHAR[(unsigned char)*p] = 1;
    memcpy(EVENT_NAME_CHAR, REASON_CHAR, sizeof(EVENT_NAME_CHAR));
    EVENT_NAME_CHAR[':'] = EVENT_NAME_CHAR['-'] = 0;
    return PyModule_Create(&module);
}
