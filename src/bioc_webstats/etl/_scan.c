/* The per-line loop of logs.count_object in C: line and column splitting, the per-value
 * caches, the counting, and an object's records as COPY text. Every decision of the download
 * rule stays in Python: a value seen for the first time (a #Fields line, a date, a status, a
 * URI) is handed to a Python callback and its answer cached here (dates for the object,
 * statuses and URIs for the process). So the rules have one home (logs.py), and this loop
 * does what the pure-Python loop does, faster. Only the mechanical checks are here: the
 * column count, HH:MM:SS, the 48 h window given by begin(), the missing c-ip values and the
 * method given by the constructor.
 *
 * Built against the stable ABI (abi3), so one build serves every Python >= 3.11 of the same
 * platform. Optional: without it logs.py runs its own loop, with the same results.
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TABLE_FULL "scanner table full (4 GB of keys)"
#include "_common.h"

/* Reject reasons by code; the Python side names them (rule.REASONS, same order). */
#define R_COLUMNS 0
#define R_STATUS 1
#define R_CIP 2
#define R_DATETIME 3
#define R_SKEW 4
#define R_LONG 5
#define R_BEFORE 6 /* dated before the cut-over day (etl/logs_since) */
#define N_REASONS 7

/* Byte bounds (the same in rule.py, checked by the tests through the module's constants): a
 * value longer than its field can be is malformed before it reaches any cache, and no cache
 * keeps a key longer than KEY_CACHE_MAX, so memory never grows with hostile values. */
#define MAX_URI 8192
#define MAX_IP 64
#define KEY_CACHE_MAX 256

/* --- the scanner ------------------------------------------------------------------------- */

enum { F_DATE, F_TIME, F_IP, F_METHOD, F_URI, F_STATUS, N_FIELDS };

#define DIST 8 /* candidates between the stages of the lookup pipeline */
#define RING_MASK 31 /* ring buffers of 32 > 2 * DIST candidates */

typedef struct { /* a line that is a download if its URI is a package's */
    const char *uri, *ip;
    size_t ulen, iplen;
    int32_t day, hit;
    uint64_t hash; /* of the URI, then of the count key */
} Cand;

/* One per parse process: the caches of answers that do not depend on the object (status,
 * time of day, URI) live as long as it does; begin() starts an object. */
typedef struct {
    PyObject_HEAD
    PyObject *header_cb, *date_cb, *status_cb, *uri_cb;
    char get[16];
    Py_ssize_t get_len;
    char bad_ip[4][8];
    Py_ssize_t bad_ip_len[4];
    int n_bad_ip;
    /* the object being read */
    int active;
    int64_t lo, hi; /* the window of valid timestamps (seconds since the epoch) */
    int64_t floor;  /* lines before it are not counted (the cut-over day's midnight) */
    long nf; /* columns of the #Fields line; -1 before it */
    int idx[N_FIELDS];
    int last_needed; /* the largest of idx */
    const char **start, **end; /* per line: where the columns up to last_needed begin, end */
    char *carry; /* the start of a line whose end is in a later piece */
    size_t carry_len, carry_room;
    size_t max_line; /* longer lines are malformed; the carry keeps max_line + 2 bytes */
    Table dates, counts; /* date → day index or -1; (day, hit, ip) → downloads */
    int64_t *day_epoch; /* per day index: its midnight, seconds since the epoch */
    char (*day_text)[16]; /* per day index: the date as logged (YYYY-MM-DD) */
    size_t n_days, days_room;
    Last last_date; /* the last line's date and its day index */
    long long lines_read, accepted;
    long long rejects[N_REASONS];
    Cand c1[RING_MASK + 1], c2[RING_MASK + 1]; /* URI stage, count stage */
    uint64_t h1, a1, t1, h2, a2, t2; /* pushed, key prefetched, done */
    /* for the life of the process */
    Table st, uri; /* status → class; URI → hit id */
    Table iph; /* client address → its keyed hash (records mode) */
    size_t iph_max;
    PyObject *pairs; /* hit id → b"category\tpackage" (records mode) */
    PyObject *hash_cb; /* the hash function iph holds answers of */
    char *key; /* scratch for composite keys */
    size_t key_room;
} Scanner;

#define DAY_INVALID -1 /* not a date */
#define DAY_OUTSIDE -2 /* a date none of whose seconds is in the object's window */
#define DATES_MAX 4096 /* dates an object's cache keeps (a day has one; garbage has many) */

/* A date column → its day index, DAY_INVALID or DAY_OUTSIDE; asks date_cb, which answers
 * (index, midnight in epoch seconds), (DAY_OUTSIDE, 0) or None. Only dates in the window get
 * an index (a handful), so neither the day arrays nor the cache grow with garbage dates. */
static int date_lookup(Scanner *s, const char *p, size_t n, int64_t *out) {
    uint64_t h = hash_bytes(p, n);
    Slot *slot = table_find(&s->dates, p, n, h);
    if (slot->len != EMPTY) {
        *out = slot->val;
        return 0;
    }
    PyObject *res = call_bytes(s->date_cb, p, n);
    if (!res) return -1;
    int64_t v = DAY_INVALID;
    if (res != Py_None) {
        long long idx, epoch;
        int ok = PyArg_ParseTuple(res, "LL", &idx, &epoch);
        Py_DECREF(res);
        if (!ok) return -1;
        if (idx == DAY_OUTSIDE) {
            v = DAY_OUTSIDE;
        } else if (idx < 0 || (size_t)idx > s->n_days || idx > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "date callback: day indexes must count up from 0");
            return -1;
        } else {
            if ((size_t)idx == s->n_days) {
                if (s->n_days == s->days_room) {
                    size_t room = s->days_room ? s->days_room * 2 : 16;
                    int64_t *d = realloc(s->day_epoch, room * sizeof *d);
                    if (!d) return PyErr_NoMemory(), -1;
                    s->day_epoch = d;
                    char(*dt)[16] = realloc(s->day_text, room * sizeof *dt);
                    if (!dt) return PyErr_NoMemory(), -1;
                    s->day_text = dt;
                    s->days_room = room;
                }
                s->n_days++;
            }
            s->day_epoch[idx] = epoch;
            memset(s->day_text[idx], 0, 16);
            memcpy(s->day_text[idx], p, n < 15 ? n : 15);
            v = idx;
        }
    } else {
        Py_DECREF(res);
    }
    if (s->dates.n < DATES_MAX && !table_put(&s->dates, slot, p, n, h, v)) return -1;
    *out = v;
    return 0;
}

/* HH:MM:SS (00:00:00 ... 23:59:59) → seconds of the day, else -1: exactly the values of
 * logs._time_secs (tests/test_scan.py compares the two loops on the edges of the range). */
static inline int64_t time_secs(const char *p, size_t n) {
    if (n != 8 || p[2] != ':' || p[5] != ':') return -1;
    int d[6];
    static const int at[6] = {0, 1, 3, 4, 6, 7};
    for (int i = 0; i < 6; i++) {
        d[i] = p[at[i]] - '0';
        if (d[i] < 0 || d[i] > 9) return -1;
    }
    int h = d[0] * 10 + d[1], m = d[2] * 10 + d[3], sec = d[4] * 10 + d[5];
    if (h > 23 || m > 59 || sec > 59) return -1;
    return h * 3600 + m * 60 + sec;
}

/* Tabs in [p, p + n), eight bytes at a time. */
static size_t count_tabs(const char *p, size_t n) {
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    const uint64_t tabs = ones * '\t';
    size_t c = 0;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        uint64_t x = w ^ tabs; /* a zero byte where a tab was */
        /* exactly the zero bytes get their high bit set (no carries between bytes) */
        uint64_t z = ~(((x & ~highs) + ~highs) | x | ~highs);
        c += (size_t)(((z >> 7) * ones) >> 56);
        p += 8;
        n -= 8;
    }
    while (n--) c += (*p++ == '\t');
    return c;
}

static int is_blank(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        switch (p[i]) {
        case ' ': case '\t': case '\n': case '\r': case '\v': case '\f':
            continue;
        default:
            return 0;
        }
    }
    return 1;
}

static int set_layout(Scanner *s, PyObject *res) {
    long v[1 + N_FIELDS];
    if (!PyTuple_Check(res) || PyTuple_Size(res) != 1 + N_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "header callback: expected a 7-tuple");
        return -1;
    }
    for (int i = 0; i <= N_FIELDS; i++) {
        v[i] = PyLong_AsLong(PyTuple_GetItem(res, i));
        if (v[i] == -1 && PyErr_Occurred()) return -1;
    }
    if (v[0] < 1 || v[0] > 100000) {
        PyErr_SetString(PyExc_ValueError, "header callback: bad column count");
        return -1;
    }
    int last = 0;
    for (int i = 0; i < N_FIELDS; i++) {
        if (v[1 + i] < 0 || v[1 + i] >= v[0]) {
            PyErr_SetString(PyExc_ValueError, "header callback: bad column index");
            return -1;
        }
        if (v[1 + i] > last) last = (int)v[1 + i];
    }
    const char **st = realloc(s->start, (size_t)(last + 1) * sizeof *st);
    if (!st) return PyErr_NoMemory(), -1;
    s->start = st;
    const char **en = realloc(s->end, (size_t)(last + 1) * sizeof *en);
    if (!en) return PyErr_NoMemory(), -1;
    s->end = en;
    s->nf = v[0];
    s->last_needed = last;
    for (int i = 0; i < N_FIELDS; i++) s->idx[i] = (int)v[1 + i];
    return 0;
}

/* A line that is not a data line of the current layout (or comes before any #Fields). */
static int slow_line(Scanner *s, const char *p, size_t n) {
    if (is_blank(p, n)) return 0;
    if (p[0] == '#') {
        if (n < 8 || memcmp(p, "#Fields:", 8) != 0) return 0;
        PyObject *res = call_bytes(s->header_cb, p, n);
        if (!res) return -1;
        int rc = set_layout(s, res);
        Py_DECREF(res);
        return rc;
    }
    if (s->nf < 0) { /* the callback raises the format error */
        PyObject *res = PyObject_CallFunctionObjArgs(s->header_cb, Py_None, NULL);
        Py_XDECREF(res);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "header callback did not raise");
        return -1;
    }
    s->lines_read++;
    s->rejects[R_COLUMNS]++;
    return 0;
}

#define SAME(buf, len, p, n) ((n) == (len) && memcmp((buf), (p), (n)) == 0)

/* --- the lookups of download candidates, pipelined ---------------------------------------
 * The URI and count tables outgrow the CPU caches: each lookup would wait for memory twice
 * (the slot, then its key in the arena). So a candidate's slot is prefetched when the line
 * is scanned, its key DIST candidates later, and it is looked up 2 * DIST candidates later,
 * by which time both are in cache; the same again for its count. Every stage is drained at
 * the end of each piece (the candidates point into it) and of the object. */

/* Stage 2 of a lookup: the home slot is (likely) in cache now; fetch the key it points to. */
static inline void prefetch_key(const Table *t, uint64_t h) {
    const Slot *slot = &t->slots[h & (t->cap - 1)];
    if (slot->len != EMPTY && slot->hash == h) __builtin_prefetch(t->arena + slot->off);
}

/* The key of a count in s->key: day index, hit id (4 bytes each), the client address. */
static int count_key(Scanner *s, const Cand *c, int32_t hit, size_t *len) {
    *len = 8 + c->iplen;
    if (reserve(&s->key, &s->key_room, *len, 256) < 0) return -1;
    memcpy(s->key, &c->day, 4);
    memcpy(s->key + 4, &hit, 4);
    memcpy(s->key + 8, c->ip, c->iplen);
    return 0;
}

/* The object's counts one by one: the next used slot of s->counts from *AT on (NULL past the
 * last), its key (as count_key made it: the client address at KEY + 8), day index and hit id. */
static const Slot *next_count(const Scanner *s, size_t *at, const char **key, int32_t *day,
                              int32_t *hit) {
    const Table *t = &s->counts;
    while (*at < t->cap) {
        const Slot *slot = &t->slots[(*at)++];
        if (slot->len == EMPTY) continue;
        *key = t->arena + slot->off;
        memcpy(day, *key, 4);
        memcpy(hit, *key + 4, 4);
        return slot;
    }
    return NULL;
}

/* The URI of the oldest candidate → its hit id; a download goes on to the count stage. */
static int uri_stage(Scanner *s) {
    Cand *c = &s->c1[s->t1 & RING_MASK];
    s->t1++;
    int64_t hit;
    Slot *slot = table_find(&s->uri, c->uri, c->ulen, c->hash);
    if (slot->len != EMPTY) {
        hit = slot->val;
    } else {
        if (answer(call_bytes(s->uri_cb, c->uri, c->ulen), &hit) < 0) return -1;
        if (c->ulen <= KEY_CACHE_MAX && s->uri.n < s->uri.max &&
            !table_put(&s->uri, slot, c->uri, c->ulen, c->hash, hit))
            return -1;
    }
    if (hit <= 0) return 0;
    if (hit > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "uri callback: hit id too large");
        return -1;
    }
    Cand *d = &s->c2[s->h2 & RING_MASK];
    *d = *c;
    d->hit = (int32_t)hit;
    size_t len;
    if (count_key(s, d, d->hit, &len) < 0) return -1;
    d->hash = hash_bytes(s->key, len);
    __builtin_prefetch(&s->counts.slots[d->hash & (s->counts.cap - 1)]);
    s->h2++;
    return 0;
}

/* The oldest counted candidate: one more download of (day, hit, client). */
static int count_stage(Scanner *s) {
    Cand *d = &s->c2[s->t2 & RING_MASK];
    s->t2++;
    size_t len;
    if (count_key(s, d, d->hit, &len) < 0) return -1;
    Slot *slot = table_find(&s->counts, s->key, len, d->hash);
    s->accepted++;
    if (slot->len != EMPTY) {
        slot->val++;
        return 0;
    }
    return table_put(&s->counts, slot, s->key, len, d->hash, 1) ? 0 : -1;
}

/* One step of a stage whose candidates are RING[*TAIL .. HEAD) looked up in T: prefetch the
 * key of the one DIST behind the newest, look up (LOOKUP) the oldest once it is 2 * DIST
 * behind (DRAIN: whatever is there). 1 if it moved, 0 if not, -1 on error. */
static inline int stage(Scanner *s, const Table *t, const Cand *ring, uint64_t head,
                        uint64_t *ahead, const uint64_t *tail, int (*lookup)(Scanner *),
                        int drain) {
    int moved = 0;
    if (head - *ahead > (drain ? 0 : DIST)) {
        prefetch_key(t, ring[*ahead & RING_MASK].hash);
        (*ahead)++;
        moved = 1;
    }
    if (head - *tail > (drain ? 0 : 2 * DIST) && *tail < *ahead) {
        if (lookup(s) < 0) return -1; /* moves *tail on */
        moved = 1;
    }
    return moved;
}

/* Move the pipeline on; DRAIN: until it is empty. */
static int pump(Scanner *s, int drain) {
    for (;;) {
        int m1 = stage(s, &s->uri, s->c1, s->h1, &s->a1, &s->t1, uri_stage, drain);
        if (m1 < 0) return -1;
        int m2 = stage(s, &s->counts, s->c2, s->h2, &s->a2, &s->t2, count_stage, drain);
        if (m2 < 0) return -1;
        if (!m1 && !m2) return 0;
    }
}

static int one_line(Scanner *s, const char *p, size_t n) {
    if (n && p[n - 1] == '\r') n--; /* CRLF */
    if (n > s->max_line) return slow_line(s, "\0", 1); /* as logs._OVERLONG: malformed */
    if (s->nf < 0) return slow_line(s, p, n);

    const char **start = s->start, **end = s->end;
    const char *q = p, *e = p + n;
    int k = 0, last = s->last_needed;
    size_t tabs = 0;
    for (;;) {
        const char *t = memchr(q, '\t', (size_t)(e - q));
        start[k] = q;
        end[k] = t ? t : e;
        if (k == last) break;
        if (!t) return slow_line(s, p, n);
        tabs++;
        q = t + 1;
        k++;
    }
    if (end[last] < e) tabs += 1 + count_tabs(end[last] + 1, (size_t)(e - end[last] - 1));
    if ((long)tabs != s->nf - 1) return slow_line(s, p, n);
    s->lines_read++;

#define COL(f) start[s->idx[f]]
#define LEN(f) ((size_t)(end[s->idx[f]] - start[s->idx[f]]))
    /* the timestamp: a valid date, a valid time, within the window */
    int64_t day, secs;
    if (LEN(F_DATE) != 10) { /* not YYYY-MM-DD: never cached */
        s->rejects[R_DATETIME]++;
        return 0;
    }
    if (last_is(&s->last_date, COL(F_DATE), LEN(F_DATE))) {
        day = s->last_date.answer;
    } else {
        if (date_lookup(s, COL(F_DATE), LEN(F_DATE), &day) < 0) return -1;
        last_set(&s->last_date, COL(F_DATE), LEN(F_DATE), day);
    }
    secs = time_secs(COL(F_TIME), LEN(F_TIME));
    if (day == DAY_INVALID || secs < 0) {
        s->rejects[R_DATETIME]++;
        return 0;
    }
    int64_t ts = day == DAY_OUTSIDE ? INT64_MIN : s->day_epoch[day] + secs;
    if (ts < s->lo || ts > s->hi) {
        s->rejects[R_SKEW]++;
        return 0;
    }
    if (ts < s->floor) {
        s->rejects[R_BEFORE]++;
        return 0;
    }

    int64_t st;
    if (cached_call(&s->st, s->status_cb, COL(F_STATUS), LEN(F_STATUS), KEY_CACHE_MAX, &st) < 0)
        return -1;
    if (st == 0) {
        s->rejects[R_STATUS]++;
        return 0;
    }

    const char *ip = COL(F_IP);
    size_t il = LEN(F_IP);
    for (int i = 0; i < s->n_bad_ip; i++) {
        if (SAME(s->bad_ip[i], (size_t)s->bad_ip_len[i], ip, il)) {
            s->rejects[R_CIP]++;
            return 0;
        }
    }
    if (il > MAX_IP) {
        s->rejects[R_CIP]++;
        return 0;
    }
    if (LEN(F_URI) > MAX_URI) {
        s->rejects[R_LONG]++;
        return 0;
    }

    if (st != 2 || !SAME(s->get, (size_t)s->get_len, COL(F_METHOD), LEN(F_METHOD))) return 0;
    /* a download candidate: its URI and count lookups go through the pipeline below */
    Cand *c = &s->c1[s->h1 & RING_MASK];
    c->uri = COL(F_URI);
    c->ulen = LEN(F_URI);
    c->ip = ip;
    c->iplen = il;
    c->day = (int32_t)day;
    c->hash = hash_bytes(c->uri, c->ulen);
    __builtin_prefetch(&s->uri.slots[c->hash & (s->uri.cap - 1)]);
    s->h1++;
    return pump(s, 0);
#undef COL
#undef LEN
}

static int carry_append(Scanner *s, const char *p, size_t n) {
    if (s->carry_len + n > s->max_line + 2) { /* enough to know it is too long, CR or not */
        n = s->carry_len < s->max_line + 2 ? s->max_line + 2 - s->carry_len : 0;
    }
    if (reserve(&s->carry, &s->carry_room, s->carry_len + n, 4096) < 0) return -1;
    memcpy(s->carry + s->carry_len, p, n);
    s->carry_len += n;
    return 0;
}

static int check_active(Scanner *s) {
    if (!s->active) PyErr_SetString(PyExc_RuntimeError, "no object begun");
    return s->active ? 0 : -1;
}

/* Forget the object being read (after an error, or before the next one). */
static void reset_object(Scanner *s) {
    s->active = 0;
    s->nf = -1;
    s->carry_len = 0;
    table_clear(&s->dates);
    table_clear(&s->counts);
    s->n_days = 0;
    s->last_date.len = SIZE_MAX;
    s->lines_read = s->accepted = 0;
    memset(s->rejects, 0, sizeof s->rejects);
    s->h1 = s->a1 = s->t1 = s->h2 = s->a2 = s->t2 = 0;
}

static PyObject *Scanner_begin(Scanner *s, PyObject *args) {
    PyObject *date_cb;
    long long lo, hi, floor = INT64_MIN;
    if (!PyArg_ParseTuple(args, "OLL|L", &date_cb, &lo, &hi, &floor)) return NULL;
    reset_object(s);
    Py_INCREF(date_cb);
    Py_XDECREF(s->date_cb);
    s->date_cb = date_cb;
    s->lo = lo;
    s->hi = hi;
    s->floor = floor;
    s->active = 1;
    Py_RETURN_NONE;
}

static PyObject *Scanner_feed(Scanner *s, PyObject *arg) {
    char *buf;
    Py_ssize_t size;
    if (check_active(s) < 0 || PyBytes_AsStringAndSize(arg, &buf, &size) < 0) return NULL;
    const char *p = buf, *e = buf + size;
    if (s->carry_len) {
        const char *nl = memchr(p, '\n', (size_t)(e - p));
        if (!nl) {
            if (carry_append(s, p, (size_t)(e - p)) < 0) goto fail;
            Py_RETURN_NONE;
        }
        if (carry_append(s, p, (size_t)(nl - p)) < 0) goto fail;
        size_t n = s->carry_len;
        s->carry_len = 0; /* one_line does not touch the carry buffer */
        if (one_line(s, s->carry, n) < 0 || pump(s, 1) < 0) goto fail;
        p = nl + 1;
    }
    while (p < e) {
        const char *nl = memchr(p, '\n', (size_t)(e - p));
        if (!nl) {
            if (carry_append(s, p, (size_t)(e - p)) < 0) goto fail;
            break;
        }
        if (one_line(s, p, (size_t)(nl - p)) < 0) goto fail;
        p = nl + 1;
    }
    if (pump(s, 1) < 0) goto fail; /* the candidates point into this piece */
    Py_RETURN_NONE;
fail:
    reset_object(s);
    return NULL;
}

/* {day index: {hit id: {ip: downloads}}} of the object. */
static PyObject *nested_counts(const Scanner *s) {
    PyObject *out = PyDict_New();
    if (!out) return NULL;
    const Slot *slot;
    const char *k;
    int32_t d32, h32;
    for (size_t i = 0; (slot = next_count(s, &i, &k, &d32, &h32));) {
        PyObject *dk = PyLong_FromLong(d32), *hk = PyLong_FromLong(h32);
        PyObject *ip = PyBytes_FromStringAndSize(k + 8, (Py_ssize_t)(slot->len - 8));
        PyObject *n = PyLong_FromLongLong(slot->val);
        PyObject *per_day = NULL, *per_hit = NULL;
        int ok = dk && hk && ip && n;
        if (ok) {
            per_day = PyDict_GetItemWithError(out, dk); /* borrowed */
            if (!per_day && !PyErr_Occurred() && (per_day = PyDict_New())) {
                ok = PyDict_SetItem(out, dk, per_day) == 0;
                Py_DECREF(per_day); /* the dict holds it */
            }
            ok = ok && per_day;
        }
        if (ok) {
            per_hit = PyDict_GetItemWithError(per_day, hk);
            if (!per_hit && !PyErr_Occurred() && (per_hit = PyDict_New())) {
                ok = PyDict_SetItem(per_day, hk, per_hit) == 0;
                Py_DECREF(per_hit);
            }
            ok = ok && per_hit && PyDict_SetItem(per_hit, ip, n) == 0;
        }
        Py_XDECREF(dk);
        Py_XDECREF(hk);
        Py_XDECREF(ip);
        Py_XDECREF(n);
        if (!ok) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/* The last line of the object (if it has no line end) and the pipeline's last candidates;
 * then the rejects per reason code, as a new tuple (NULL with an exception on failure). */
static PyObject *end_object(Scanner *s) {
    if (s->carry_len) { /* a last line without a line end */
        size_t n = s->carry_len;
        s->carry_len = 0;
        if (one_line(s, s->carry, n) < 0 || pump(s, 1) < 0) return NULL;
    }
    PyObject *rejects = PyTuple_New(N_REASONS);
    for (int i = 0; rejects && i < N_REASONS; i++) {
        PyObject *v = PyLong_FromLongLong(s->rejects[i]);
        if (!v) {
            Py_CLEAR(rejects);
            break;
        }
        PyTuple_SetItem(rejects, i, v);
    }
    return rejects;
}

static PyObject *Scanner_finish(Scanner *s, PyObject *Py_UNUSED(ignored)) {
    PyObject *rejects = NULL, *counts = NULL, *res = NULL;
    if (check_active(s) < 0) return NULL;
    if (!(rejects = end_object(s))) goto done;
    if (!(counts = nested_counts(s))) goto done;
    res = Py_BuildValue("(LLOOO)", s->lines_read, s->accepted, rejects, counts,
                        s->nf >= 0 ? Py_True : Py_False);
done:
    Py_XDECREF(rejects);
    Py_XDECREF(counts);
    reset_object(s);
    return res;
}

static PyObject *Scanner_forget_uris(Scanner *s, PyObject *Py_UNUSED(ignored)) {
    table_clear(&s->uri);
    if (s->pairs) PyDict_Clear(s->pairs);
    Py_RETURN_NONE;
}

#define PG_EPOCH_DAYS 10957 /* 2000-01-01, PostgreSQL's day 0, in days since 1970-01-01 */

/* The hash of a client address: cached, else asked of HASH_CB (a signed 64-bit int). */
static int ip_hash(Scanner *s, PyObject *hash_cb, const char *ip, size_t n, int64_t *out) {
    uint64_t h = hash_bytes(ip, n);
    Slot *slot = table_find(&s->iph, ip, n, h);
    if (slot->len != EMPTY) {
        *out = slot->val;
        return 0;
    }
    if (answer(call_bytes(hash_cb, ip, n), out) < 0) return -1;
    if (s->iph.n >= s->iph_max) { /* bounded: start again */
        table_clear(&s->iph);
        slot = table_find(&s->iph, ip, n, h);
    }
    return table_put(&s->iph, slot, ip, n, h, *out) ? 0 : -1;
}

/* The object's records as PostgreSQL binary COPY data, one row per (day, hit, client), the
 * object id 0 (see with_object_id), and the distinct (day index, hit id) pairs. */
static int records(Scanner *s, PyObject *hash_cb, PyObject *pair_cb, PyObject **text,
                   PyObject **day_hits) {
    Buf b = {0};
    Table seen;
    *text = *day_hits = NULL;
    if (hash_cb != s->hash_cb) { /* another key: the cached hashes are not its answers */
        table_clear(&s->iph);
        Py_INCREF(hash_cb);
        Py_XDECREF(s->hash_cb);
        s->hash_cb = hash_cb;
    }
    if (table_init(&seen, 256, 0) < 0) return PyErr_NoMemory(), -1;
    PyObject *list = PyList_New(0);
    if (!list || buf_add(&b, COPY_HEADER, COPY_HEADER_LEN) < 0) goto fail;
    const Slot *slot;
    const char *k;
    int32_t d32, h32;
    for (size_t i = 0; (slot = next_count(s, &i, &k, &d32, &h32));) {
        int64_t hash;
        if (ip_hash(s, hash_cb, k + 8, slot->len - 8, &hash) < 0) goto fail;
        PyObject *pair = pair_text(s->pairs, pair_cb, h32); /* borrowed */
        int64_t day = s->day_epoch[d32] / 86400 - PG_EPOCH_DAYS;
        if (!pair || copy_record(&b, pair, day, hash, slot->val) < 0) goto fail;
        uint64_t h = hash_bytes(k, 8);
        Slot *ss = table_find(&seen, k, 8, h);
        if (ss->len == EMPTY) {
            if (!table_put(&seen, ss, k, 8, h, 0)) goto fail;
            PyObject *pairv = Py_BuildValue("(ii)", (int)d32, (int)h32);
            if (!pairv) goto fail;
            int rc = PyList_Append(list, pairv);
            Py_DECREF(pairv);
            if (rc < 0) goto fail;
        }
    }
    *text = copy_end(&b);
    if (!*text) goto fail;
    table_free(&seen);
    *day_hits = list;
    return 0;
fail:
    free(b.p);
    table_free(&seen);
    Py_XDECREF(list);
    return -1;
}

static PyObject *Scanner_finish_records(Scanner *s, PyObject *args) {
    PyObject *hash_cb, *pair_cb, *rejects = NULL, *text = NULL, *day_hits = NULL, *res = NULL;
    if (!PyArg_ParseTuple(args, "OO", &hash_cb, &pair_cb) || check_active(s) < 0) return NULL;
    if (!(rejects = end_object(s))) goto done;
    if (records(s, hash_cb, pair_cb, &text, &day_hits) < 0) goto done;
    res = Py_BuildValue("(LLOOOO)", s->lines_read, s->accepted, rejects, text, day_hits,
                        s->nf >= 0 ? Py_True : Py_False);
done:
    Py_XDECREF(rejects);
    Py_XDECREF(text);
    Py_XDECREF(day_hits);
    reset_object(s);
    return res;
}

/* The records counted so far (as finish_records gives them), then forgotten: the object goes
 * on. parse.py calls it when held() passes its bound, so an object's counts never outgrow it. */
static PyObject *Scanner_take_records(Scanner *s, PyObject *args) {
    PyObject *hash_cb, *pair_cb, *text = NULL, *day_hits = NULL;
    if (!PyArg_ParseTuple(args, "OO", &hash_cb, &pair_cb) || check_active(s) < 0) return NULL;
    if (records(s, hash_cb, pair_cb, &text, &day_hits) < 0) {
        reset_object(s);
        return NULL;
    }
    table_clear(&s->counts);
    return Py_BuildValue("(NN)", text, day_hits);
}

/* (bytes, entries) of the object's counts: their keys, and their slots at the table's lowest
 * load (the slots a cleared table keeps are not counted: they are reused). */
static PyObject *Scanner_held(Scanner *s, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("(nn)", (Py_ssize_t)(s->counts.used + 2 * s->counts.n * sizeof(Slot)),
                         (Py_ssize_t)s->counts.n);
}

static int copy_small(PyObject *obj, char *dst, size_t room, Py_ssize_t *len) {
    char *p;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(obj, &p, &n) < 0) return -1;
    if ((size_t)n > room) {
        PyErr_SetString(PyExc_ValueError, "value too long");
        return -1;
    }
    memcpy(dst, p, (size_t)n);
    *len = n;
    return 0;
}

static void Scanner_dealloc(Scanner *s) {
    Py_XDECREF(s->header_cb);
    Py_XDECREF(s->date_cb);
    Py_XDECREF(s->status_cb);
    Py_XDECREF(s->uri_cb);
    table_free(&s->dates);
    table_free(&s->counts);
    table_free(&s->st);
    table_free(&s->uri);
    free(s->day_epoch);
    free(s->day_text);
    table_free(&s->iph);
    Py_XDECREF(s->pairs);
    Py_XDECREF(s->hash_cb);
    free(s->carry);
    free(s->key);
    free(s->start);
    free(s->end);
    PyTypeObject *tp = Py_TYPE((PyObject *)s);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(s);
    Py_DECREF(tp);
}

static PyObject *Scanner_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"header", "status", "uri", "get", "bad_ips", "cache_max",
                             "ip_cache_max", "max_line", NULL};
    PyObject *header, *status, *uri, *get, *bad_ips;
    Py_ssize_t cache_max, ip_cache_max, max_line;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOSOnnn", kwlist, &header, &status, &uri,
                                     &get, &bad_ips, &cache_max, &ip_cache_max, &max_line))
        return NULL;
    if (cache_max < 1 || ip_cache_max < 1 || max_line < 1) {
        PyErr_SetString(PyExc_ValueError, "cache_max must be positive");
        return NULL;
    }
    allocfunc tp_alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Scanner *s = (Scanner *)tp_alloc(type, 0);
    if (!s) return NULL;
    /* tp_alloc zeroes the object: every pointer is NULL, every count 0 */
    s->nf = -1;
    s->last_date.len = SIZE_MAX;
    Py_INCREF(header);
    s->header_cb = header;
    Py_INCREF(status);
    s->status_cb = status;
    Py_INCREF(uri);
    s->uri_cb = uri;
    if (copy_small(get, s->get, sizeof s->get, &s->get_len) < 0) goto fail;
    PyObject *seq = PySequence_Fast(bad_ips, "bad_ips: a sequence of bytes");
    if (!seq) goto fail;
    Py_ssize_t nb = PySequence_Size(seq);
    if (nb > 4) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "bad_ips: at most 4 values");
        goto fail;
    }
    for (Py_ssize_t i = 0; i < nb; i++) {
        PyObject *item = PySequence_GetItem(seq, i);
        int rc = item ? copy_small(item, s->bad_ip[i], sizeof s->bad_ip[i], &s->bad_ip_len[i])
                      : -1;
        Py_XDECREF(item);
        if (rc < 0) {
            Py_DECREF(seq);
            goto fail;
        }
    }
    Py_DECREF(seq);
    s->n_bad_ip = (int)nb;
    s->iph_max = (size_t)ip_cache_max;
    s->max_line = (size_t)max_line;
    if (table_init(&s->dates, 64, 0) < 0 || table_init(&s->counts, 16384, 0) < 0 ||
        table_init(&s->st, 64, (size_t)cache_max) < 0 ||
        table_init(&s->uri, 4096, (size_t)cache_max) < 0 || table_init(&s->iph, 4096, 0) < 0 ||
        !(s->pairs = PyDict_New())) {
        PyErr_NoMemory();
        goto fail;
    }
    return (PyObject *)s;
fail:
    Py_DECREF(s);
    return NULL;
}

static PyMethodDef Scanner_methods[] = {
    {"begin", (PyCFunction)Scanner_begin, METH_VARARGS,
     "begin(date, lo, hi[, floor]): start an object; DATE(raw) answers (day index, midnight in "
     "epoch seconds) or None; timestamps outside [LO, HI] are rejected, then those before "
     "FLOOR."},
    {"feed", (PyCFunction)Scanner_feed, METH_O,
     "feed(text: bytes): scan the complete lines of TEXT; a last partial line waits for the "
     "next piece."},
    {"finish", (PyCFunction)Scanner_finish, METH_NOARGS,
     "finish() -> (lines_read, accepted, rejects per reason code, "
     "{day index: {hit id: {ip: n}}}, fields_seen); ends the object."},
    {"finish_records", (PyCFunction)Scanner_finish_records, METH_VARARGS,
     "finish_records(hash, pair) -> (lines_read, accepted, rejects per reason code, binary "
     "COPY data (category, package, day, HASH(ip), n, object id 0 per row), "
     "[(day index, hit id)], fields_seen); "
     "PAIR(hit id) answers b'category\\tpackage'. Ends the object."},
    {"take_records", (PyCFunction)Scanner_take_records, METH_VARARGS,
     "take_records(hash, pair) -> (binary COPY data, [(day index, hit id)]) of the counts so "
     "far, as finish_records gives them, which are then forgotten; the object goes on."},
    {"held", (PyCFunction)Scanner_held, METH_NOARGS,
     "held() -> (bytes, entries) of the object's counts (keys and slots)."},
    {"forget_uris", (PyCFunction)Scanner_forget_uris, METH_NOARGS,
     "forget_uris(): drop the cached hit ids (the Python side renumbered them)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Scanner_slots[] = {
    {Py_tp_doc, "Scanner(header, status, uri, get, bad_ips, cache_max, ip_cache_max, max_line): the per-line "
                "loop of logs.count_object, one object at a time."},
    {Py_tp_new, Scanner_new},
    {Py_tp_dealloc, Scanner_dealloc},
    {Py_tp_methods, Scanner_methods},
    {0, NULL},
};

static PyType_Spec Scanner_spec = {
    "bioc_webstats._scan.Scanner", sizeof(Scanner), 0, Py_TPFLAGS_DEFAULT, Scanner_slots,
};

static int scan_exec(PyObject *m) {
    if (seed_hash() < 0) return -1;
    PyObject *t = PyType_FromSpec(&Scanner_spec);
    if (!t) return -1;
    if (PyModule_AddObject(m, "Scanner", t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    if (PyModule_AddIntConstant(m, "MAX_URI", MAX_URI) < 0 ||
        PyModule_AddIntConstant(m, "MAX_IP", MAX_IP) < 0 ||
        PyModule_AddIntConstant(m, "KEY_CACHE_MAX", KEY_CACHE_MAX) < 0 ||
        PyModule_AddIntConstant(m, "N_REASONS", N_REASONS) < 0)
        return -1;
    return 0;
}

static uint64_t get_be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* with_object_id(data, object_id): a copy of records from finish_records with OBJECT_ID in
 * every row's last field. */
static PyObject *with_object_id(PyObject *Py_UNUSED(module), PyObject *args) {
    const char *data;
    Py_ssize_t n;
    long long oid;
    if (!PyArg_ParseTuple(args, "y#L", &data, &n, &oid)) return NULL;
    if (n < COPY_HEADER_LEN + 2 || memcmp(data, COPY_HEADER, COPY_HEADER_LEN) != 0) {
        PyErr_SetString(PyExc_ValueError, "not binary COPY data");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(data, n);
    if (!out) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AsString(out), *e = p + n;
    p += COPY_HEADER_LEN;
    for (;;) {
        if (e - p < 2) goto bad;
        int fields = (int16_t)get_be(p, 2);
        p += 2;
        if (fields == -1) break;
        if (fields != 6) goto bad;
        for (int f = 0; f < fields; f++) {
            if (e - p < 4) goto bad;
            uint64_t len = get_be(p, 4);
            p += 4;
            if (len > (uint64_t)(e - p)) goto bad;
            if (f == fields - 1) {
                if (len != 8) goto bad;
                put_be((char *)p, (uint64_t)oid, 8);
            }
            p += len;
        }
    }
    if (p != e) goto bad;
    return out;
bad:
    Py_DECREF(out);
    PyErr_SetString(PyExc_ValueError, "malformed binary COPY data");
    return NULL;
}

static PyMethodDef scan_functions[] = {
    {"with_object_id", with_object_id, METH_VARARGS,
     "with_object_id(data: bytes, object_id: int) -> bytes: the records of finish_records "
     "with their object id."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot scan_slots[] = {
    {Py_mod_exec, scan_exec},
    {0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT, "bioc_webstats.etl._scan",
    "The per-line loop of logs.count_object in C (optional; see logs.py).", 0, scan_functions,
    scan_slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void) { return PyModuleDef_Init(&scan_module); }
