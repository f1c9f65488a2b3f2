/* What the two C loops share: _scan.c (the per-line loop of the log ETL) and _legacy.c (the
 * per-row loop of the legacy import) both include this header, so a fix here is a fix in both.
 * It holds the keyed hash of byte strings, the cache of byte strings → int64 (open addressing,
 * keys in one arena), the cached Python callbacks, the last-value shortcut, and the pieces of
 * PostgreSQL's binary COPY data both write: the growing buffer, the header, one record row,
 * the trailer.
 *
 * Everything is static: each extension has its own copy (and its own seed). Include it after
 * Python.h (with Py_LIMITED_API), with TABLE_FULL defined: what the MemoryError of a table
 * whose keys pass 4 GB says (each module names itself).
 */
#ifndef BIOC_WEBSTATS_ETL_COMMON_H
#define BIOC_WEBSTATS_ETL_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef TABLE_FULL
#error "define TABLE_FULL (the text of a full table's MemoryError) before including _common.h"
#endif

/* --- the keyed hash ------------------------------------------------------------------------ */

static uint64_t hash_seed;

static inline uint64_t mix(uint64_t h) {
    h ^= h >> 31;
    h *= 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
    return h;
}

static uint64_t hash_bytes(const char *p, size_t n) {
    uint64_t h = hash_seed ^ (n * 0xBF58476D1CE4E5B9ull);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = mix(h ^ w) * 0x94D049BB133111EBull;
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, n);
    return mix(mix(h ^ w) ^ hash_seed);
}

/* A random seed per process (from the module's exec): the keys come from the logs and the
 * legacy rows, i.e. from anyone on the web. */
static int seed_hash(void) {
    PyObject *os = PyImport_ImportModule("os");
    if (!os) return -1;
    PyObject *rnd = PyObject_CallMethod(os, "urandom", "i", 8);
    Py_DECREF(os);
    if (!rnd) return -1;
    char *p;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(rnd, &p, &n) < 0 || n != 8) {
        Py_DECREF(rnd);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "os.urandom");
        return -1;
    }
    memcpy(&hash_seed, p, 8);
    Py_DECREF(rnd);
    return 0;
}

/* --- a hash table of byte strings → int64 (keys copied into one arena) ------------------- */

#define EMPTY UINT32_MAX

typedef struct { /* 24 bytes: the slots are where the cache misses are */
    uint64_t hash;
    uint32_t off; /* of the key in the arena */
    uint32_t len; /* EMPTY: free slot */
    int64_t val;
} Slot;

typedef struct {
    Slot *slots;
    size_t cap; /* a power of two */
    size_t n;
    char *arena;
    size_t used, room;
    size_t max; /* entries kept at most (0: no bound); past it answers are not cached */
} Table;

static int table_init(Table *t, size_t cap, size_t max) {
    t->max = max;
    t->slots = malloc(cap * sizeof(Slot));
    t->arena = malloc(4096);
    if (!t->slots || !t->arena) {
        free(t->slots);
        free(t->arena);
        t->slots = NULL;
        t->arena = NULL;
        return -1;
    }
    for (size_t i = 0; i < cap; i++) t->slots[i].len = EMPTY;
    t->cap = cap;
    t->n = 0;
    t->used = 0;
    t->room = 4096;
    return 0;
}

/* Forget every entry (keeps the memory). */
static void table_clear(Table *t) {
    for (size_t i = 0; i < t->cap; i++) t->slots[i].len = EMPTY;
    t->n = 0;
    t->used = 0;
}

static void table_free(Table *t) {
    free(t->slots);
    free(t->arena);
    t->slots = NULL;
    t->arena = NULL;
}

/* The slot holding KEY, or the free slot where it belongs. */
static inline Slot *table_find(const Table *t, const char *key, size_t len, uint64_t h) {
    size_t mask = t->cap - 1, i = (size_t)h & mask;
    for (;;) {
        Slot *s = &t->slots[i];
        if (s->len == EMPTY) return s;
        if (s->hash == h && s->len == len && memcmp(t->arena + s->off, key, len) == 0) return s;
        i = (i + 1) & mask;
    }
}

static int table_grow(Table *t) {
    size_t cap = t->cap * 2;
    Slot *slots = malloc(cap * sizeof(Slot));
    if (!slots) return -1;
    for (size_t i = 0; i < cap; i++) slots[i].len = EMPTY;
    for (size_t i = 0; i < t->cap; i++) {
        Slot *s = &t->slots[i];
        if (s->len == EMPTY) continue;
        size_t j = (size_t)s->hash & (cap - 1);
        while (slots[j].len != EMPTY) j = (j + 1) & (cap - 1);
        slots[j] = *s;
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    return 0;
}

/* Fill the free slot S with KEY → VAL. Returns the slot (it moves when the table grows), or
 * NULL with a MemoryError set. */
static Slot *table_put(Table *t, Slot *s, const char *key, size_t len, uint64_t h, int64_t val) {
    if (len >= EMPTY || t->used + len >= UINT32_MAX) { /* the offsets are 32-bit */
        PyErr_SetString(PyExc_MemoryError, TABLE_FULL);
        return NULL;
    }
    if (t->used + len > t->room) {
        size_t room = t->room * 2;
        while (t->used + len > room) room *= 2;
        char *arena = realloc(t->arena, room);
        if (!arena) {
            PyErr_NoMemory();
            return NULL;
        }
        t->arena = arena;
        t->room = room;
    }
    memcpy(t->arena + t->used, key, len);
    s->hash = h;
    s->off = (uint32_t)t->used;
    s->len = (uint32_t)len;
    s->val = val;
    t->used += len;
    t->n++;
    if (t->n * 2 > t->cap) {
        if (table_grow(t) < 0) {
            PyErr_NoMemory();
            return NULL;
        }
        s = table_find(t, key, len, h);
    }
    return s;
}

/* --- the Python callbacks that decide, their answers cached ---------------------------------- */

static PyObject *call_bytes(PyObject *cb, const char *p, size_t n) {
    PyObject *arg = PyBytes_FromStringAndSize(p, (Py_ssize_t)n);
    if (!arg) return NULL;
    PyObject *res = PyObject_CallFunctionObjArgs(cb, arg, NULL);
    Py_DECREF(arg);
    return res;
}

/* The callback's answer RES (a new reference, consumed) as an int64; -1 with an exception set
 * on failure (RES NULL: the call failed). */
static int answer(PyObject *res, int64_t *out) {
    if (!res) return -1;
    long long v = PyLong_AsLongLong(res);
    Py_DECREF(res);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

/* The value of KEY in T, asking CB on a miss; the answer is kept if KEY is at most KEY_MAX
 * bytes and T has room (T->max). */
static int cached_call(Table *t, PyObject *cb, const char *key, size_t len, size_t key_max,
                       int64_t *out) {
    uint64_t h = hash_bytes(key, len);
    Slot *s = table_find(t, key, len, h);
    if (s->len != EMPTY) {
        *out = s->val;
        return 0;
    }
    int64_t v;
    if (answer(call_bytes(cb, key, len), &v) < 0) return -1;
    if (len <= key_max && (t->max == 0 || t->n < t->max) && !table_put(t, s, key, len, h, v))
        return -1;
    *out = v;
    return 0;
}

/* The last value of a column and its answer: consecutive lines and rows mostly share their
 * day (and method and status), and a comparison costs less than a lookup. */
typedef struct {
    char v[40];
    size_t len; /* SIZE_MAX: none */
    int64_t answer;
} Last;

static inline int last_is(const Last *l, const char *p, size_t n) {
    return n == l->len && memcmp(p, l->v, n) == 0;
}

/* Remember P → ANSWER (a value longer than the buffer is not remembered). */
static inline void last_set(Last *l, const char *p, size_t n, int64_t answer) {
    if (n <= sizeof l->v) {
        memcpy(l->v, p, n);
        l->len = n;
        l->answer = answer;
    }
}

/* b"category\tpackage" of a hit id: from PAIRS (hit id → text), else asked of PAIR_CB and
 * kept in PAIRS. Borrowed reference; NULL with an exception set. */
static PyObject *pair_text(PyObject *pairs, PyObject *pair_cb, int32_t hit) {
    PyObject *key = PyLong_FromLong(hit);
    if (!key) return NULL;
    PyObject *v = PyDict_GetItemWithError(pairs, key);
    if (!v && !PyErr_Occurred()) {
        v = PyObject_CallFunctionObjArgs(pair_cb, key, NULL);
        if (v && !PyBytes_Check(v)) {
            Py_DECREF(v);
            v = NULL;
            PyErr_SetString(PyExc_TypeError, "pair callback: expected bytes");
        }
        if (v) {
            int rc = PyDict_SetItem(pairs, key, v);
            Py_DECREF(v); /* the dict holds it */
            if (rc < 0) v = NULL;
        }
    }
    Py_DECREF(key);
    return v;
}

/* --- the records as PostgreSQL's binary COPY data -------------------------------------------- */

/* Room for NEED bytes at *P (*ROOM of them now): FIRST, doubled until enough. -1 with a
 * MemoryError set. */
static int reserve(char **p, size_t *room, size_t need, size_t first) {
    if (need <= *room) return 0;
    size_t r = *room ? *room : first;
    while (r < need) r *= 2;
    char *q = realloc(*p, r);
    if (!q) return PyErr_NoMemory(), -1;
    *p = q;
    *room = r;
    return 0;
}

typedef struct {
    char *p;
    size_t len, room;
} Buf;

static int buf_add(Buf *b, const void *data, size_t n) {
    if (reserve(&b->p, &b->room, b->len + n, 1 << 16) < 0) return -1;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

/* the signature, flags and header extension length */
static const char COPY_HEADER[] = "PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
#define COPY_HEADER_LEN 19
_Static_assert(sizeof COPY_HEADER - 1 == COPY_HEADER_LEN, "COPY_HEADER_LEN");

/* V as N bytes, big-endian, at Q; returns the end. */
static char *put_be(char *q, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--) {
        q[i] = (char)(v & 0xff);
        v >>= 8;
    }
    return q + n;
}

/* One row at the end of B: (category, package, day, ip_hash, downloads, object_id) from PAIR
 * (b"category\tpackage"), DAY (PostgreSQL's day number), IP_HASH and N, the object id left 0
 * (_scan.with_object_id sets it). -1 with an exception set. */
static int copy_record(Buf *b, PyObject *pair, int64_t day, int64_t ip_hash, int64_t n) {
    char *pp;
    Py_ssize_t pl;
    if (PyBytes_AsStringAndSize(pair, &pp, &pl) < 0) return -1;
    const char *tab = memchr(pp, '\t', (size_t)pl);
    if (!tab) {
        PyErr_SetString(PyExc_ValueError, "pair callback: expected b'category\\tpackage'");
        return -1;
    }
    size_t cl = (size_t)(tab - pp), kl = (size_t)pl - cl - 1;
    char row[2 + 4 + 4 + 4 + 4 + 4 + 8 + 4 + 4 + 4 + 8];
    char *q = row;
    q = put_be(q, 6, 2);
    q = put_be(q, (uint64_t)cl, 4);
    if (buf_add(b, row, (size_t)(q - row)) < 0 || buf_add(b, pp, cl) < 0) return -1;
    q = put_be(row, (uint64_t)kl, 4);
    if (buf_add(b, row, 4) < 0 || buf_add(b, tab + 1, kl) < 0) return -1;
    q = put_be(row, 4, 4);
    q = put_be(q, (uint64_t)day, 4);
    q = put_be(q, 8, 4);
    q = put_be(q, (uint64_t)ip_hash, 8);
    q = put_be(q, 4, 4);
    q = put_be(q, (uint64_t)n, 4);
    q = put_be(q, 8, 4);
    q = put_be(q, 0, 8);
    return buf_add(b, row, (size_t)(q - row));
}

/* The trailer, then B's data as bytes (NULL with an exception set); B is freed either way. */
static PyObject *copy_end(Buf *b) {
    PyObject *text = buf_add(b, "\xff\xff", 2) < 0
                         ? NULL
                         : PyBytes_FromStringAndSize(b->p, (Py_ssize_t)b->len);
    free(b->p);
    *b = (Buf){0};
    return text;
}

#endif /* BIOC_WEBSTATS_ETL_COMMON_H */
