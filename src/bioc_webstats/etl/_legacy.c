/* The per-row loop of legacy.read_unit in C: a unit's rows read through SQLite's C API, the
 * per-value caches, the counting per (day, package, client), and the records as PostgreSQL
 * binary COPY data. Every decision of the rule stays in Python (legacy.Rule): a value seen
 * for the first time (a day string, a method and status, an ips, a url) is handed to a Python
 * callback and the answer cached here. So the rule has one home, and this loop gives the same
 * bytes as legacy.read_unit_python, several times faster (Python's sqlite3 module alone costs
 * more per row than SQLite's own reading).
 *
 * SQLite is not linked: the Python side finds the library Python's sqlite3 module uses (ctypes)
 * and hands over the addresses of the few functions needed (set_api). No header, no link-time
 * dependency, nothing newer from glibc. Built against the stable ABI (abi3), like _scan.
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TABLE_FULL "legacy reader cache full"
#include "_common.h"

/* --- the SQLite functions (addresses from set_api) ------------------------------------------ */

typedef struct sqlite3 sqlite3;
typedef struct sqlite3_stmt sqlite3_stmt;
#define SQLITE_OK 0
#define SQLITE_ROW 100
#define SQLITE_DONE 101
#define SQLITE_TOOBIG 18       /* a value over the length limit: SQLite refuses to load it */
#define SQLITE_LIMIT_LENGTH 0
#define SQLITE_OPEN_READONLY 0x00000001
#define SQLITE_OPEN_URI 0x00000040
#define SQLITE_OPEN_NOMUTEX 0x00008000 /* one thread per connection: no locking per call */

static struct {
    int (*open_v2)(const char *, sqlite3 **, int, const char *);
    int (*prepare_v2)(sqlite3 *, const char *, int, sqlite3_stmt **, const char **);
    int (*bind_int64)(sqlite3_stmt *, int, long long);
    int (*step)(sqlite3_stmt *);
    const unsigned char *(*column_text)(sqlite3_stmt *, int);
    int (*column_bytes)(sqlite3_stmt *, int);
    int (*finalize)(sqlite3_stmt *);
    int (*close_v2)(sqlite3 *);
    const char *(*errmsg)(sqlite3 *);
    int (*busy_timeout)(sqlite3 *, int);
    int (*limit)(sqlite3 *, int, int);
    int (*reset)(sqlite3_stmt *);
    long long (*column_int64)(sqlite3_stmt *, int);
} api;
static int api_set;

static const char *const API_NAMES[] = {
    "sqlite3_open_v2", "sqlite3_prepare_v2", "sqlite3_bind_int64",  "sqlite3_step",
    "sqlite3_column_text", "sqlite3_column_bytes", "sqlite3_finalize", "sqlite3_close_v2",
    "sqlite3_errmsg", "sqlite3_busy_timeout", "sqlite3_limit", "sqlite3_reset",
    "sqlite3_column_int64", NULL,
};

/* Why a row is not a download (legacy.R_*, same order). */
enum { R_DATE, R_LONG, R_STATUS, R_IPS, R_UNTIL, R_OTHER, R_PATH, N_REASONS };
#define DAY_BAD (-1)
#define MS_DL 0
#define MS_OTHER 1
#define MS_BAD 2
#define KEY_MAX 1024 /* the largest cache_max accepted */

/* --- the counts of a unit: (day, hit, ip hash) → downloads, in first-seen order --------- */

typedef struct {
    int32_t day, hit;
    int64_t ip;
    int64_t n;
} Rec;

typedef struct {
    uint32_t *idx; /* 0: free, else index + 1 into recs */
    size_t cap;
    Rec *recs;
    size_t n, room;
} Counts;

static inline uint64_t rec_hash(int32_t day, int32_t hit, int64_t ip) {
    return mix(mix(((uint64_t)(uint32_t)day << 32 | (uint32_t)hit) ^ hash_seed) ^ (uint64_t)ip);
}

static int counts_init(Counts *c) {
    c->cap = 1 << 14;
    c->room = 1 << 13;
    c->idx = calloc(c->cap, sizeof(uint32_t));
    c->recs = malloc(c->room * sizeof(Rec));
    c->n = 0;
    return c->idx && c->recs ? 0 : -1;
}

static void counts_free(Counts *c) {
    free(c->idx);
    free(c->recs);
    c->idx = NULL;
    c->recs = NULL;
}

static int counts_add(Counts *c, int32_t day, int32_t hit, int64_t ip) {
    size_t mask = c->cap - 1, i = (size_t)rec_hash(day, hit, ip) & mask;
    for (;;) {
        uint32_t k = c->idx[i];
        if (!k) break;
        Rec *r = &c->recs[k - 1];
        if (r->ip == ip && r->day == day && r->hit == hit) {
            r->n++;
            return 0;
        }
        i = (i + 1) & mask;
    }
    if (c->n == c->room) {
        Rec *recs = realloc(c->recs, c->room * 2 * sizeof(Rec));
        if (!recs) return PyErr_NoMemory(), -1;
        c->recs = recs;
        c->room *= 2;
    }
    if (c->n + 1 >= UINT32_MAX) {
        PyErr_SetString(PyExc_MemoryError, "legacy reader: too many records in a unit");
        return -1;
    }
    c->recs[c->n] = (Rec){day, hit, ip, 1};
    c->idx[i] = (uint32_t)++c->n;
    if (c->n * 2 > c->cap) { /* grow: rehash the indexes */
        size_t cap = c->cap * 2;
        uint32_t *idx = calloc(cap, sizeof(uint32_t));
        if (!idx) return PyErr_NoMemory(), -1;
        for (size_t k = 0; k < c->n; k++) {
            Rec *r = &c->recs[k];
            size_t j = (size_t)rec_hash(r->day, r->hit, r->ip) & (cap - 1);
            while (idx[j]) j = (j + 1) & (cap - 1);
            idx[j] = (uint32_t)(k + 1);
        }
        free(c->idx);
        c->idx = idx;
        c->cap = cap;
    }
    return 0;
}

/* --- the reader -------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *day_cb, *ms_cb, *ip_cb, *url_cb, *pair_cb;
    Py_ssize_t max_value;
    size_t cache_max; /* longer values are decided every time, never cached */
    Table days, ms, ipok, ipbad, urls; /* answers of the callbacks, for the process */
} Reader;

/* "method\0status" would be one key for ("GET\0", "200") and ("GET", "\0200"): the key is
   the method's length (one byte), the method, the status. */
static void ms_key(char *key, const char *m, size_t ml, const char *st, size_t sl) {
    key[0] = (char)(unsigned char)ml;
    memcpy(key + 1, m, ml);
    memcpy(key + 1 + ml, st, sl);
}

/* method and status → MS_*, cached on ms_key. */
static int ask_ms(Reader *r, const char *m, size_t ml, const char *st, size_t sl, int64_t *out) {
    char key[KEY_MAX + 1];
    int cache = ml <= 255 && ml + sl <= r->cache_max;
    uint64_t h = 0;
    Slot *s = NULL;
    if (cache) {
        ms_key(key, m, ml, st, sl);
        h = hash_bytes(key, ml + 1 + sl);
        s = table_find(&r->ms, key, ml + 1 + sl, h);
        if (s->len != EMPTY) {
            *out = s->val;
            return 0;
        }
    }
    PyObject *res = PyObject_CallFunction(r->ms_cb, "y#y#", m, (Py_ssize_t)ml, st, (Py_ssize_t)sl);
    if (answer(res, out) < 0) return -1;
    return cache && !table_put(&r->ms, s, key, ml + 1 + sl, h, *out) ? -1 : 0;
}

/* ips → its client's hash (*ok 1) or no client (*ok 0). */
static int ask_ip(Reader *r, const char *p, size_t n, int64_t *hash, int *ok) {
    uint64_t h = hash_bytes(p, n);
    Slot *s = table_find(&r->ipok, p, n, h);
    if (s->len != EMPTY) {
        *hash = s->val;
        *ok = 1;
        return 0;
    }
    Slot *b = table_find(&r->ipbad, p, n, h);
    if (b->len != EMPTY) {
        *ok = 0;
        return 0;
    }
    PyObject *res = call_bytes(r->ip_cb, p, n);
    int cache = n <= r->cache_max;
    if (res == Py_None) {
        Py_DECREF(res);
        *ok = 0;
        return cache && !table_put(&r->ipbad, b, p, n, h, 0) ? -1 : 0;
    }
    if (answer(res, hash) < 0) return -1;
    *ok = 1;
    return cache && !table_put(&r->ipok, s, p, n, h, *hash) ? -1 : 0;
}

static void reader_clear_caches(Reader *r) {
    table_clear(&r->days);
    table_clear(&r->ms);
    table_clear(&r->ipok);
    table_clear(&r->ipbad);
    table_clear(&r->urls);
}

static PyObject *Reader_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *day_cb, *ms_cb, *ip_cb, *url_cb, *pair_cb;
    Py_ssize_t max_value, cache_max;
    if (kwds && PyDict_Size(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Reader takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOOOnn", &day_cb, &ms_cb, &ip_cb, &url_cb, &pair_cb,
                          &max_value, &cache_max))
        return NULL;
    if (cache_max < 0 || cache_max > KEY_MAX) {
        PyErr_SetString(PyExc_ValueError, "cache_max: 0 to 1024");
        return NULL;
    }
    if (!api_set) {
        PyErr_SetString(PyExc_RuntimeError, "set_api() first");
        return NULL;
    }
    allocfunc tp_alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Reader *r = (Reader *)tp_alloc(type, 0);
    if (!r) return NULL;
    PyObject *cbs[] = {day_cb, ms_cb, ip_cb, url_cb, pair_cb};
    for (int i = 0; i < 5; i++) Py_INCREF(cbs[i]);
    r->day_cb = day_cb;
    r->ms_cb = ms_cb;
    r->ip_cb = ip_cb;
    r->url_cb = url_cb;
    r->pair_cb = pair_cb;
    r->max_value = max_value;
    r->cache_max = (size_t)cache_max;
    /* no bound on entries: cache_bytes() lets the Python side empty them */
    if (table_init(&r->days, 1024, 0) < 0 || table_init(&r->ms, 64, 0) < 0 ||
        table_init(&r->ipok, 1 << 14, 0) < 0 || table_init(&r->ipbad, 64, 0) < 0 ||
        table_init(&r->urls, 1 << 12, 0) < 0) {
        Py_DECREF(r);
        return PyErr_NoMemory();
    }
    return (PyObject *)r;
}

static void Reader_dealloc(Reader *r) {
    PyTypeObject *tp = Py_TYPE((PyObject *)r);
    Py_XDECREF(r->day_cb);
    Py_XDECREF(r->ms_cb);
    Py_XDECREF(r->ip_cb);
    Py_XDECREF(r->url_cb);
    Py_XDECREF(r->pair_cb);
    table_free(&r->days);
    table_free(&r->ms);
    table_free(&r->ipok);
    table_free(&r->ipbad);
    table_free(&r->urls);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(r);
    Py_DECREF(tp);
}

/* A column's text (NULL → empty); its bytes in *n. */
static inline const char *col(sqlite3_stmt *st, int i, size_t *n) {
    const char *p = (const char *)api.column_text(st, i);
    *n = p ? (size_t)api.column_bytes(st, i) : 0;
    return p ? p : "";
}

static PyObject *sqlite_error(sqlite3 *db, const char *what, int rc) {
    PyObject *mod = PyImport_ImportModule("sqlite3");
    PyObject *exc = mod ? PyObject_GetAttrString(mod, "DatabaseError") : NULL;
    Py_XDECREF(mod);
    if (!exc) return NULL;
    PyErr_Format(exc, "%s: %s (SQLite error %d)", what, db ? api.errmsg(db) : "out of memory",
                 rc);
    Py_DECREF(exc);
    return NULL;
}

/* The records of COUNTS as binary COPY data (in first-seen order), and the distinct (day, hit)
 * pairs. */
static PyObject *records(Reader *r, Counts *c, PyObject **day_hits) {
    Buf b = {0};
    PyObject *pairs = PyDict_New(), *list = PyList_New(0), *text = NULL;
    Counts seen = {0};
    if (!pairs || !list || counts_init(&seen) < 0) goto fail;
    if (buf_add(&b, COPY_HEADER, COPY_HEADER_LEN) < 0) goto fail;
    for (size_t k = 0; k < c->n; k++) {
        Rec *rec = &c->recs[k];
        PyObject *pair = pair_text(pairs, r->pair_cb, rec->hit); /* borrowed */
        if (!pair || copy_record(&b, pair, rec->day, rec->ip, rec->n) < 0) goto fail;
        size_t before = seen.n;
        if (counts_add(&seen, rec->day, rec->hit, 0) < 0) goto fail;
        if (seen.n > before) {
            PyObject *dh = Py_BuildValue("(ii)", (int)rec->day, (int)rec->hit);
            if (!dh) goto fail;
            int rc = PyList_Append(list, dh);
            Py_DECREF(dh);
            if (rc < 0) goto fail;
        }
    }
    text = copy_end(&b);
    if (!text) goto fail;
    counts_free(&seen);
    Py_DECREF(pairs);
    *day_hits = list;
    return text;
fail:
    free(b.p);
    counts_free(&seen);
    Py_XDECREF(pairs);
    Py_XDECREF(list);
    return NULL;
}

#define DAY_MAX 64 /* bytes of a day string (17/Sep/2023) past which it is malformed unread */

/* The loop over one unit's rows (the Python twin: legacy_rows.read_unit_python). */
static int scan_rows(Reader *r, sqlite3_stmt *st, Counts *c, long long *rows,
                     long long reasons[N_REASONS], int *rc_out) {
    int rc;
    size_t maxv = (size_t)r->max_value;
    Last lday = {.len = SIZE_MAX}, lms = {.len = SIZE_MAX};
    while ((rc = api.step(st)) == SQLITE_ROW) {
        (*rows)++;
        size_t dl, ml, sl, il, ul;
        const char *d = col(st, 0, &dl);
        int64_t day;
        if (dl > DAY_MAX) { /* no day is that long: not handed to Python (a copy of each) */
            reasons[R_DATE]++;
            continue;
        }
        if (last_is(&lday, d, dl)) {
            day = lday.answer;
        } else {
            if (cached_call(&r->days, r->day_cb, d, dl, r->cache_max, &day) < 0) return -1;
            last_set(&lday, d, dl, day);
        }
        if (day < 0) {
            reasons[day == DAY_BAD ? R_DATE : R_UNTIL]++;
            continue;
        }
        const char *m = col(st, 1, &ml);
        const char *s = col(st, 2, &sl);
        const char *ips = col(st, 3, &il);
        const char *url = col(st, 4, &ul);
        if (ul > maxv || il > maxv) {
            reasons[R_LONG]++;
            continue;
        }
        int64_t ms;
        char mskey[sizeof lms.v];
        size_t mkl = ml + 1 + sl;
        int keyed = ml <= 255 && mkl <= sizeof mskey;
        if (keyed) ms_key(mskey, m, ml, s, sl); /* compared with the last row's */
        if (keyed && last_is(&lms, mskey, mkl)) {
            ms = lms.answer;
        } else {
            if (ask_ms(r, m, ml, s, sl, &ms) < 0) return -1;
            if (keyed) last_set(&lms, mskey, mkl, ms);
        }
        if (ms == MS_BAD) {
            reasons[R_STATUS]++;
            continue;
        }
        int64_t ip;
        int ok;
        if (ask_ip(r, ips, il, &ip, &ok) < 0) return -1;
        if (!ok) {
            reasons[R_IPS]++;
            continue;
        }
        if (ms != MS_DL) {
            reasons[R_OTHER]++;
            continue;
        }
        int64_t hit;
        if (cached_call(&r->urls, r->url_cb, url, ul, r->cache_max, &hit) < 0) return -1;
        if (!hit) {
            reasons[R_PATH]++;
            continue;
        }
        if (counts_add(c, (int32_t)day, (int32_t)hit, ip) < 0) return -1;
    }
    *rc_out = rc;
    return 0;
}

/* read(uri, sql, seek_sql, lo, hi, load_max): the rows lo..hi of SQL (in rowid order). SQLite
 * loads no value over load_max bytes (SQLITE_TOOBIG): that row is over-long, SEEK_SQL
 * (rowid range, offset) finds its rowid, and the scan goes on after it. */
static PyObject *Reader_read(Reader *r, PyObject *args) {
    const char *path, *sql, *seek_sql;
    long long lo, hi;
    int load_max;
    if (!PyArg_ParseTuple(args, "sssLLi", &path, &sql, &seek_sql, &lo, &hi, &load_max))
        return NULL;
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL, *seek = NULL;
    Counts c = {0};
    PyObject *res = NULL;
    long long rows = 0, reasons[N_REASONS] = {0};
    int flags = SQLITE_OPEN_READONLY | SQLITE_OPEN_URI | SQLITE_OPEN_NOMUTEX;
    int rc = api.open_v2(path, &db, flags, NULL);
    if (rc != SQLITE_OK) {
        sqlite_error(db, "cannot open", rc);
        goto done;
    }
    api.busy_timeout(db, 30000);
    api.limit(db, SQLITE_LIMIT_LENGTH, load_max);
    rc = api.prepare_v2(db, sql, -1, &st, NULL);
    if (rc == SQLITE_OK) rc = api.prepare_v2(db, seek_sql, -1, &seek, NULL);
    if (rc != SQLITE_OK) {
        sqlite_error(db, "cannot read access_log", rc);
        goto done;
    }
    if (counts_init(&c) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    for (long long from = lo;;) {
        long long before = rows;
        api.bind_int64(st, 1, from);
        api.bind_int64(st, 2, hi);
        if (scan_rows(r, st, &c, &rows, reasons, &rc) < 0) goto done;
        if (rc != SQLITE_TOOBIG) break;
        api.reset(st);
        api.bind_int64(seek, 1, from);
        api.bind_int64(seek, 2, hi);
        api.bind_int64(seek, 3, rows - before);
        rc = api.step(seek);
        if (rc != SQLITE_ROW) { /* the seek's error, or the row gone: reported below */
            if (rc == SQLITE_DONE) rc = SQLITE_TOOBIG;
            break;
        }
        long long bad = api.column_int64(seek, 0);
        api.reset(seek);
        rows++;
        reasons[R_LONG]++;
        rc = SQLITE_DONE;
        if (bad >= hi) break;
        from = bad + 1;
    }
    if (rc != SQLITE_DONE) {
        sqlite_error(db, "cannot read access_log", rc);
        goto done;
    }
    PyObject *day_hits = NULL;
    PyObject *text = records(r, &c, &day_hits);
    if (!text) goto done;
    res = Py_BuildValue("(L(LLLLLLL)NN)", rows, reasons[0], reasons[1], reasons[2], reasons[3],
                        reasons[4], reasons[5], reasons[6], text, day_hits);
done:
    counts_free(&c);
    if (st) api.finalize(st);
    if (seek) api.finalize(seek);
    if (db) api.close_v2(db);
    return res;
}

static PyObject *Reader_forget(Reader *r, PyObject *Py_UNUSED(ignored)) {
    reader_clear_caches(r);
    Py_RETURN_NONE;
}

static PyObject *Reader_cache_bytes(Reader *r, PyObject *Py_UNUSED(ignored)) {
    Table *ts[] = {&r->days, &r->ms, &r->ipok, &r->ipbad, &r->urls};
    size_t n = 0;
    for (int i = 0; i < 5; i++) n += ts[i]->room + ts[i]->cap * sizeof(Slot);
    return PyLong_FromSize_t(n);
}

static PyMethodDef Reader_methods[] = {
    {"read", (PyCFunction)Reader_read, METH_VARARGS,
     "read(path, sql, seek_sql, lo, hi, load_max) -> (rows, reasons per code, binary COPY "
     "data of the records (object id 0), [(day, hit id)]): run SQL (five columns: "
     "day_month_year, method, status, ips, url; ?1 and ?2 the rowid range, in rowid order) on "
     "the database PATH (a file: URI) and count; a row with a value over LOAD_MAX bytes is "
     "over-long, found by SEEK_SQL (?1, ?2 the range, ?3 the rows read in it)."},
    {"forget", (PyCFunction)Reader_forget, METH_NOARGS,
     "forget(): drop every cached answer (the Python side renumbered its hit ids)."},
    {"cache_bytes", (PyCFunction)Reader_cache_bytes, METH_NOARGS,
     "cache_bytes() -> memory held by the caches."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Reader_slots[] = {
    {Py_tp_doc, "Reader(day, method_status, client, url, pair, max_value, cache_max): the "
                "per-row loop of legacy_rows.read_unit, one unit at a time; the callbacks are "
                "legacy_rows.Rule's; a url or ips longer than MAX_VALUE is malformed, values "
                "longer than CACHE_MAX are never cached."},
    {Py_tp_new, Reader_new},
    {Py_tp_dealloc, Reader_dealloc},
    {Py_tp_methods, Reader_methods},
    {0, NULL},
};

static PyType_Spec Reader_spec = {
    "bioc_webstats._legacy.Reader", sizeof(Reader), 0, Py_TPFLAGS_DEFAULT, Reader_slots,
};

/* set_api(addresses): the SQLite functions named by API_NAMES, in that order. */
static PyObject *set_api(PyObject *Py_UNUSED(module), PyObject *arg) {
    Py_ssize_t n = PySequence_Size(arg), want = 0;
    if (n < 0) return NULL;
    while (API_NAMES[want]) want++;
    if (n != want) return PyErr_Format(PyExc_ValueError, "set_api: expected %zd addresses", want);
    void *fns[16];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_GetItem(arg, i);
        if (!item) return NULL;
        fns[i] = PyLong_AsVoidPtr(item);
        Py_DECREF(item);
        if (!fns[i]) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "set_api: NULL address");
            return NULL;
        }
    }
    memcpy(&api, fns, sizeof api);
    api_set = 1;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_api", set_api, METH_O,
     "set_api(addresses): the addresses of the SQLite functions in API_NAMES, in order."},
    {NULL, NULL, 0, NULL},
};

static int legacy_exec(PyObject *m) {
#define N_API 13
    _Static_assert(sizeof api == N_API * sizeof(void *), "api: one pointer per name");
    _Static_assert(sizeof API_NAMES == (N_API + 1) * sizeof(char *), "API_NAMES: one per name");
    if (seed_hash() < 0) return -1;
    PyObject *names = PyTuple_New(N_API);
    if (!names) return -1;
    for (Py_ssize_t i = 0; API_NAMES[i]; i++) {
        PyObject *s = PyUnicode_FromString(API_NAMES[i]);
        if (!s) {
            Py_DECREF(names);
            return -1;
        }
        PyTuple_SetItem(names, i, s);
    }
    if (PyModule_AddObject(m, "API_NAMES", names) < 0) {
        Py_DECREF(names);
        return -1;
    }
    PyObject *t = PyType_FromSpec(&Reader_spec);
    if (!t) return -1;
    if (PyModule_AddObject(m, "Reader", t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot legacy_slots[] = {
    {Py_mod_exec, legacy_exec},
    {0, NULL},
};

static struct PyModuleDef legacy_module = {
    PyModuleDef_HEAD_INIT, "bioc_webstats.etl._legacy",
    "The per-row loop of the legacy import (legacy.read_unit) in C.", 0, module_methods,
    legacy_slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__legacy(void) { return PyModuleDef_Init(&legacy_module); }
