/*
 * pgformat._native: the hot page operations of redo, compiled.
 *
 * Each function here has a pure-Python twin that stays the reference (the
 * tests compare the two byte for byte): pgformat.page for the bufpage.c
 * operations, pgformat.pglz for pglz_decompress, pgredo.heap for the heap
 * tuple building of heap_xlog_insert / heap_xlog_multi_insert. Same
 * arguments, same results, same exceptions with the same messages; pages are
 * changed in place. Postgres sources mirrored: src/backend/storage/page/
 * bufpage.c, src/common/pg_lzcompress.c, src/backend/access/heap/heapam.c.
 *
 * Errors are raised as pgformat.page.PageError and pgformat.pglz.PglzError.
 *
 * Built by `make install` (setup.py, an optional extension); when it is
 * missing, pgformat.native says so once and everything runs in Python.
 *
 * Plain CPython C API, no other dependency. Page fields are read and written
 * byte by byte as little-endian, as Postgres stores them on the machines we
 * run on (the Python side packs with "<" formats too).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLCKSZ 8192
#define SIZE_OF_PAGE_HEADER 24
#define ITEM_ID_SIZE 4
#define MAX_LINP ((BLCKSZ - SIZE_OF_PAGE_HEADER) / ITEM_ID_SIZE) /* 2042 */
#define MAX_OFFSET_NUMBER (BLCKSZ / ITEM_ID_SIZE)                 /* 2048 */
#define MAXALIGN(x) (((x) + 7) & ~((Py_ssize_t) 7))
/* MaxHeapTuplesPerPage: (BLCKSZ - header) / (MAXALIGN(23) + sizeof(ItemIdData)) */
#define MAX_HEAP_TUPLES_PER_PAGE ((BLCKSZ - SIZE_OF_PAGE_HEADER) / (24 + ITEM_ID_SIZE))

#define OFF_FLAGS 10
#define OFF_LOWER 12
#define OFF_UPPER 14
#define OFF_SPECIAL 16
#define PD_HAS_FREE_LINES 0x0001

#define LP_NORMAL 1
#define LP_OFF_MASK 0x7FFF
#define LP_FLAGS_SHIFT 15
#define LP_LEN_SHIFT 17

#define PAI_OVERWRITE 1
#define PAI_IS_HEAP 2

#define SIZEOF_HEAP_TUPLE_HEADER 23
#define HEAP_COMBOCID 0x0020
#define SIZEOF_MULTI_INSERT_TUPLE 7 /* xl_multi_insert_tuple: datalen, infomask2, infomask, hoff */

/* pgformat.page.PageError and pgformat.pglz.PglzError, looked up when first raised. */
static PyObject *PageError = NULL;
static PyObject *PglzError = NULL;

/* The class `name` of `module` (imported by then: its functions are what call us), else ValueError. */
static PyObject *error_type(PyObject **cache, const char *module, const char *name)
{
    if (*cache == NULL) {
        PyObject *m = PyImport_ImportModule(module);
        if (m != NULL) {
            PyObject *cls = PyObject_GetAttrString(m, name);
            Py_DECREF(m);
            if (cls != NULL && PyExceptionClass_Check(cls))
                *cache = cls;
            else
                Py_XDECREF(cls);
        }
        PyErr_Clear();
    }
    return *cache != NULL ? *cache : PyExc_ValueError;
}

static inline unsigned rd16(const unsigned char *p) { return (unsigned) p[0] | ((unsigned) p[1] << 8); }

static inline uint32_t rd32(const unsigned char *p)
{
    return (uint32_t) p[0] | ((uint32_t) p[1] << 8) | ((uint32_t) p[2] << 16) | ((uint32_t) p[3] << 24);
}

static inline void wr16(unsigned char *p, unsigned v)
{
    p[0] = (unsigned char) (v & 0xFF);
    p[1] = (unsigned char) ((v >> 8) & 0xFF);
}

static inline void wr32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char) (v & 0xFF);
    p[1] = (unsigned char) ((v >> 8) & 0xFF);
    p[2] = (unsigned char) ((v >> 16) & 0xFF);
    p[3] = (unsigned char) ((v >> 24) & 0xFF);
}

static PyObject *page_error_type(void) { return error_type(&PageError, "pgformat.page", "PageError"); }

static PyObject *pglz_error_type(void) { return error_type(&PglzError, "pgformat.pglz", "PglzError"); }

/* A writable view of exactly one page, or an exception (PageError for a wrong size). */
static int get_page(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (view->len != BLCKSZ) {
        PyErr_Format(page_error_type(), "page is %zd bytes, expected %d", view->len, BLCKSZ);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* An int argument in [lo, hi]; anything else (including a huge int) goes to *out_of_range. */
static int get_long(PyObject *obj, long long *out, int *out_of_range, long long lo, long long hi)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out_of_range = overflow != 0 || v < lo || v > hi;
    *out = v;
    return 0;
}

static int get_u32(PyObject *obj, uint32_t *out, const char *what)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long) -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s %R is not a uint32", what, obj);
        return -1;
    }
    if (v > 0xFFFFFFFFULL) {
        PyErr_Format(PyExc_ValueError, "%s %R is not a uint32", what, obj);
        return -1;
    }
    *out = (uint32_t) v;
    return 0;
}

/*
 * PageAddItemExtended without the copy of the item: checks exactly as
 * pgformat.page.page_add_item_extended does, then allocates the line pointer
 * and the space. Returns the offset number (0 where Postgres warns and
 * refuses) and the item's offset in *item_off; -1 with PageError set where
 * Postgres PANICs. The caller writes `size` bytes at *item_off.
 */
static long add_item_prepare(unsigned char *p, Py_ssize_t size, long offnum, int flags, Py_ssize_t *item_off)
{
    long lower0 = (long) rd16(p + OFF_LOWER), upper0 = (long) rd16(p + OFF_UPPER);
    long special = (long) rd16(p + OFF_SPECIAL);
    if (lower0 < SIZE_OF_PAGE_HEADER || lower0 > upper0 || upper0 > special || special > BLCKSZ) {
        PyErr_Format(page_error_type(), "corrupted page pointers: lower = %ld, upper = %ld, special = %ld",
                     lower0, upper0, special);
        return -1;
    }
    long limit = (lower0 <= SIZE_OF_PAGE_HEADER ? 0 : (lower0 - SIZE_OF_PAGE_HEADER) / ITEM_ID_SIZE) + 1;
    int needshuffle = 0;
    if (offnum != 0 && offnum <= MAX_OFFSET_NUMBER) {
        if (flags & PAI_OVERWRITE) {
            if (offnum < limit) {
                /* offnum < limit <= MAX_LINP + 1: the line pointer lies inside the page */
                uint32_t lp = rd32(p + SIZE_OF_PAGE_HEADER + (offnum - 1) * ITEM_ID_SIZE);
                if (((lp >> LP_FLAGS_SHIFT) & 3) || (lp >> LP_LEN_SHIFT))
                    return 0; /* "will not overwrite a used ItemId" */
            }
        }
        else if (offnum < limit)
            needshuffle = 1;
    }
    else {
        if (rd16(p + OFF_FLAGS) & PD_HAS_FREE_LINES) {
            offnum = limit;
            for (long idx = 0; idx < limit - 1; idx++) {
                if ((rd32(p + SIZE_OF_PAGE_HEADER + idx * ITEM_ID_SIZE) & 0xFFFF8000u) == 0) {
                    offnum = idx + 1;
                    break;
                }
            }
            if (offnum >= limit) /* the hint is wrong, so reset it */
                wr16(p + OFF_FLAGS, rd16(p + OFF_FLAGS) & ~PD_HAS_FREE_LINES);
        }
        else
            offnum = limit;
    }
    if (offnum > limit)
        return 0; /* "specified item offset is too large" */
    if ((flags & PAI_IS_HEAP) && offnum > MAX_HEAP_TUPLES_PER_PAGE)
        return 0; /* "can't put more than MaxHeapTuplesPerPage items in a heap page" */
    long lower = (offnum == limit || needshuffle) ? lower0 + ITEM_ID_SIZE : lower0;
    Py_ssize_t upper = (Py_ssize_t) upper0 - MAXALIGN(size);
    if (lower > upper)
        return 0;
    if (offnum < 1 || offnum > MAX_LINP) {
        PyErr_Format(page_error_type(), "offset number %ld is outside the page", offnum);
        return -1;
    }
    unsigned char *lp = p + SIZE_OF_PAGE_HEADER + (offnum - 1) * ITEM_ID_SIZE;
    if (needshuffle)
        memmove(lp + ITEM_ID_SIZE, lp, (size_t) (limit - offnum) * ITEM_ID_SIZE);
    wr32(lp, ((uint32_t) upper & LP_OFF_MASK) | ((uint32_t) LP_NORMAL << LP_FLAGS_SHIFT) |
                 (((uint32_t) size & LP_OFF_MASK) << LP_LEN_SHIFT));
    wr16(p + OFF_LOWER, (unsigned) lower);
    wr16(p + OFF_UPPER, (unsigned) upper);
    *item_off = upper;
    return offnum;
}

PyDoc_STRVAR(page_add_item_extended_doc,
"page_add_item_extended(page, item, offset_number, flags) -> int\n\n"
"PageAddItemExtended (bufpage.c); see pgformat.page.page_add_item_extended.");

static PyObject *native_page_add_item_extended(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "page_add_item_extended takes 4 arguments");
        return NULL;
    }
    Py_buffer page, item;
    if (get_page(args[0], &page) < 0)
        return NULL;
    long long offnum;
    int bad;
    if (get_long(args[2], &offnum, &bad, 0, 0xFFFF) < 0)
        goto fail_page;
    if (bad) {
        PyErr_Format(page_error_type(), "offset number %R is not an OffsetNumber", args[2]);
        goto fail_page;
    }
    long flags = PyLong_AsLong(args[3]);
    if (flags == -1 && PyErr_Occurred())
        goto fail_page;
    if (PyObject_GetBuffer(args[1], &item, PyBUF_SIMPLE) < 0)
        goto fail_page;
    Py_ssize_t at = 0;
    long result = add_item_prepare((unsigned char *) page.buf, item.len, (long) offnum, (int) flags, &at);
    if (result > 0)
        memmove((unsigned char *) page.buf + at, item.buf, (size_t) item.len);
    PyBuffer_Release(&item);
    PyBuffer_Release(&page);
    return result < 0 ? NULL : PyLong_FromLong(result);
fail_page:
    PyBuffer_Release(&page);
    return NULL;
}

/*
 * The tuple heap_xlog_insert / heap_xlog_multi_insert build in tbuf, written
 * straight into the page at `at`: header fields from the record, t_cid =
 * FirstCommandId (HeapTupleHeaderSetCmin drops HEAP_COMBOCID), then `body`.
 */
static void write_heap_tuple(unsigned char *at, uint32_t xmin, uint32_t xmax, uint32_t blkno, unsigned offnum,
                             unsigned infomask2, unsigned infomask, unsigned hoff, const unsigned char *body,
                             Py_ssize_t bodylen)
{
    wr32(at + 0, xmin);
    wr32(at + 4, xmax);
    wr32(at + 8, 0);
    wr16(at + 12, (blkno >> 16) & 0xFFFF);
    wr16(at + 14, blkno & 0xFFFF);
    wr16(at + 16, offnum);
    wr16(at + 18, infomask2);
    wr16(at + 20, infomask & ~HEAP_COMBOCID & 0xFFFF);
    at[22] = (unsigned char) hoff;
    memmove(at + SIZEOF_HEAP_TUPLE_HEADER, body, (size_t) bodylen);
}

PyDoc_STRVAR(heap_add_tuple_doc,
"heap_add_tuple(page, offnum, xmin, xmax, blkno, infomask2, infomask, hoff, body) -> int\n\n"
"Build the tuple heap_xlog_insert/update build (23-byte header, t_cid 0, no\n"
"HEAP_COMBOCID, then body) and PageAddItem it with PAI_OVERWRITE | PAI_IS_HEAP.\n"
"Returns the offset number, 0 if Postgres would refuse the item.");

static PyObject *native_heap_add_tuple(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "heap_add_tuple takes 9 arguments");
        return NULL;
    }
    Py_buffer page, body;
    if (get_page(args[0], &page) < 0)
        return NULL;
    long long offnum;
    int bad;
    uint32_t xmin, xmax, blkno, infomask2, infomask, hoff;
    if (get_long(args[1], &offnum, &bad, 0, 0xFFFF) < 0)
        goto fail_page;
    if (bad) {
        PyErr_Format(page_error_type(), "offset number %R is not an OffsetNumber", args[1]);
        goto fail_page;
    }
    if (get_u32(args[2], &xmin, "xmin") < 0 || get_u32(args[3], &xmax, "xmax") < 0 ||
        get_u32(args[4], &blkno, "block number") < 0 || get_u32(args[5], &infomask2, "t_infomask2") < 0 ||
        get_u32(args[6], &infomask, "t_infomask") < 0 || get_u32(args[7], &hoff, "t_hoff") < 0)
        goto fail_page;
    if (infomask2 > 0xFFFF || infomask > 0xFFFF || hoff > 0xFF) {
        PyErr_SetString(PyExc_ValueError, "tuple header field out of range");
        goto fail_page;
    }
    if (PyObject_GetBuffer(args[8], &body, PyBUF_SIMPLE) < 0)
        goto fail_page;
    unsigned char *p = (unsigned char *) page.buf;
    Py_ssize_t at = 0;
    long result = add_item_prepare(p, SIZEOF_HEAP_TUPLE_HEADER + body.len, (long) offnum,
                                   PAI_OVERWRITE | PAI_IS_HEAP, &at);
    if (result > 0)
        write_heap_tuple(p + at, xmin, xmax, blkno, (unsigned) offnum, infomask2, infomask, hoff,
                         (const unsigned char *) body.buf, body.len);
    PyBuffer_Release(&body);
    PyBuffer_Release(&page);
    return result < 0 ? NULL : PyLong_FromLong(result);
fail_page:
    PyBuffer_Release(&page);
    return NULL;
}

PyDoc_STRVAR(heap_multi_insert_doc,
"heap_multi_insert(page, data, offsets, ntuples, xid, blkno) -> None\n\n"
"The tuple loop of heap_xlog_multi_insert over block 0's data: offsets is\n"
"None for an INIT record (tuples at 1..ntuples) or the offsets array (at least\n"
"2 * ntuples bytes, little-endian uint16). Raises PageError with the\n"
"messages of pgredo.heap's Python loop.");

static PyObject *native_heap_multi_insert(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "heap_multi_insert takes 6 arguments");
        return NULL;
    }
    Py_buffer page, data, offs;
    int have_offs = args[2] != Py_None;
    long long ntuples;
    int bad;
    uint32_t xid, blkno;
    if (get_long(args[3], &ntuples, &bad, 0, 0xFFFF) < 0)
        return NULL;
    if (bad) {
        PyErr_Format(PyExc_ValueError, "ntuples %R is not a uint16", args[3]);
        return NULL;
    }
    if (get_u32(args[4], &xid, "xid") < 0 || get_u32(args[5], &blkno, "block number") < 0)
        return NULL;
    if (get_page(args[0], &page) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&page);
        return NULL;
    }
    if (have_offs) {
        if (PyObject_GetBuffer(args[2], &offs, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&data);
            PyBuffer_Release(&page);
            return NULL;
        }
        if (offs.len < 2 * ntuples) {
            PyErr_Format(page_error_type(), "%lld offsets do not fit in %zd bytes", ntuples, offs.len);
            goto fail;
        }
    }
    unsigned char *p = (unsigned char *) page.buf;
    const unsigned char *d = (const unsigned char *) data.buf;
    Py_ssize_t end = data.len, pos = 0;
    for (long long i = 0; i < ntuples; i++) {
        long offnum = have_offs ? (long) rd16((const unsigned char *) offs.buf + 2 * i) : (long) (i + 1);
        unsigned lower = rd16(p + OFF_LOWER);
        long maxoff = lower <= SIZE_OF_PAGE_HEADER ? 0 : (long) ((lower - SIZE_OF_PAGE_HEADER) >> 2);
        if (maxoff + 1 < offnum) {
            PyErr_Format(page_error_type(), "invalid max offset number: adding %ld after %ld", offnum, maxoff);
            goto fail;
        }
        pos += pos & 1; /* SHORTALIGN */
        if (pos + SIZEOF_MULTI_INSERT_TUPLE > end) {
            PyErr_SetString(page_error_type(), "total tuple length mismatch");
            goto fail;
        }
        unsigned datalen = rd16(d + pos), infomask2 = rd16(d + pos + 2), infomask = rd16(d + pos + 4);
        unsigned hoff = d[pos + 6];
        pos += SIZEOF_MULTI_INSERT_TUPLE;
        if (pos + (Py_ssize_t) datalen > end) {
            PyErr_SetString(page_error_type(), "total tuple length mismatch");
            goto fail;
        }
        Py_ssize_t at = 0;
        long added = add_item_prepare(p, SIZEOF_HEAP_TUPLE_HEADER + (Py_ssize_t) datalen, offnum,
                                      PAI_OVERWRITE | PAI_IS_HEAP, &at);
        if (added < 0)
            goto fail;
        if (added == 0) {
            PyErr_Format(page_error_type(), "failed to add tuple at offset %ld", offnum);
            goto fail;
        }
        write_heap_tuple(p + at, xid, 0, blkno, (unsigned) offnum, infomask2, infomask, hoff, d + pos, datalen);
        pos += datalen;
    }
    if (pos != end) {
        PyErr_SetString(page_error_type(), "total tuple length mismatch");
        goto fail;
    }
    if (have_offs)
        PyBuffer_Release(&offs);
    PyBuffer_Release(&data);
    PyBuffer_Release(&page);
    Py_RETURN_NONE;
fail:
    if (have_offs)
        PyBuffer_Release(&offs);
    PyBuffer_Release(&data);
    PyBuffer_Release(&page);
    return NULL;
}

/* -- heap tuple header edits (heap_xlog_delete / update / lock) -------------------------- */

#define HEAP_XMAX_KEYSHR_LOCK 0x0010
#define HEAP_XMAX_EXCL_LOCK 0x0040
#define HEAP_XMAX_LOCK_ONLY 0x0080
#define HEAP_LOCK_MASK 0x0050
#define HEAP_XMAX_IS_MULTI 0x1000
#define HEAP_XMAX_BITS (0x0400 | 0x0800 | HEAP_XMAX_IS_MULTI | HEAP_LOCK_MASK | HEAP_XMAX_LOCK_ONLY)
#define HEAP_MOVED 0xC000
#define HEAP_KEYS_UPDATED 0x2000
#define HEAP_HOT_UPDATED 0x4000
#define PD_ALL_VISIBLE 0x0004
#define OFF_PRUNE_XID 20

/*
 * _normal_tuple of pgredo.heap: 1 with the LP_NORMAL item's offset and length, -1 with
 * PageError set (same messages), 0 when the line pointer itself lies past the page (a
 * page whose pd_lower is corrupt): the caller then runs the Python code, whose error
 * for that case is Python's own.
 */
static int normal_tuple(const unsigned char *p, long offnum, long *lp_off, long *lp_len)
{
    unsigned lower = rd16(p + OFF_LOWER);
    long maxoff = lower <= SIZE_OF_PAGE_HEADER ? 0 : (long) ((lower - SIZE_OF_PAGE_HEADER) >> 2);
    if (offnum < 1 || maxoff < offnum) {
        PyErr_Format(page_error_type(), "invalid lp: offset %ld beyond the line pointer array", offnum);
        return -1;
    }
    if (offnum > MAX_LINP)
        return 0;
    uint32_t raw = rd32(p + SIZE_OF_PAGE_HEADER + (offnum - 1) * ITEM_ID_SIZE);
    if (((raw >> LP_FLAGS_SHIFT) & 3) != LP_NORMAL) {
        PyErr_Format(page_error_type(), "invalid lp: item %ld is not LP_NORMAL", offnum);
        return -1;
    }
    *lp_off = (long) (raw & LP_OFF_MASK);
    *lp_len = (long) (raw >> LP_LEN_SHIFT);
    if (*lp_off < SIZE_OF_PAGE_HEADER ||
        *lp_off + (*lp_len > SIZEOF_HEAP_TUPLE_HEADER ? *lp_len : SIZEOF_HEAP_TUPLE_HEADER) > BLCKSZ) {
        PyErr_Format(page_error_type(), "item %ld (offset %ld, length %ld) lies outside the page", offnum, *lp_off,
                     *lp_len);
        return -1;
    }
    return 1;
}

/* fix_infomask_from_infobits (heapam.c). */
static void fix_infomask(unsigned infobits, unsigned *infomask, unsigned *infomask2)
{
    *infomask &= ~(unsigned) (HEAP_XMAX_IS_MULTI | HEAP_XMAX_LOCK_ONLY | HEAP_XMAX_KEYSHR_LOCK | HEAP_XMAX_EXCL_LOCK);
    *infomask2 &= ~(unsigned) HEAP_KEYS_UPDATED;
    if (infobits & 0x01)
        *infomask |= HEAP_XMAX_IS_MULTI;
    if (infobits & 0x02)
        *infomask |= HEAP_XMAX_LOCK_ONLY;
    if (infobits & 0x04)
        *infomask |= HEAP_XMAX_EXCL_LOCK;
    if (infobits & 0x08)
        *infomask |= HEAP_XMAX_KEYSHR_LOCK;
    if (infobits & 0x10)
        *infomask2 |= HEAP_KEYS_UPDATED;
}

/* PageSetPrunable: lower pd_prune_xid to xid if unset or later (TransactionIdPrecedes). */
static void set_prunable(unsigned char *p, uint32_t xid)
{
    uint32_t cur = rd32(p + OFF_PRUNE_XID);
    int precedes = (xid < 3 || cur < 3) ? xid < cur : (int32_t) (xid - cur) < 0;
    if (cur == 0 || precedes)
        wr32(p + OFF_PRUNE_XID, xid);
}

static void set_ctid(unsigned char *htup, uint32_t blkno, unsigned offnum)
{
    wr16(htup + 12, (blkno >> 16) & 0xFFFF);
    wr16(htup + 14, blkno & 0xFFFF);
    wr16(htup + 16, offnum & 0xFFFF);
}

static void clear_all_visible(unsigned char *p) { wr16(p + OFF_FLAGS, rd16(p + OFF_FLAGS) & ~(unsigned) PD_ALL_VISIBLE); }

/* Arguments: page, then `n` ints (each must fit in a uint32). */
static int heap_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t n, Py_buffer *page, uint32_t *v,
                     const char *name)
{
    if (nargs != n + 1) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, n + 1);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (get_u32(args[i + 1], &v[i], name) < 0)
            return -1;
    return get_page(args[0], page);
}

PyDoc_STRVAR(heap_delete_doc,
"heap_delete(page, offnum, xmax, infobits, flags, xid, blkno) -> bool\n\n"
"heap_xlog_delete's change to the tuple (pgredo.heap.heap_delete_redo). False: the\n"
"line pointer array is corrupt past the page; nothing was changed, run the Python code.");

static PyObject *native_heap_delete(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer page;
    uint32_t v[6];
    if (heap_args(args, nargs, 6, &page, v, "heap_delete") < 0)
        return NULL;
    uint32_t offnum = v[0], xmax = v[1], infobits = v[2], flags = v[3], xid = v[4], blkno = v[5];
    unsigned char *p = (unsigned char *) page.buf;
    long off, len;
    int found = normal_tuple(p, (long) offnum, &off, &len);
    if (found <= 0) {
        PyBuffer_Release(&page);
        if (found < 0)
            return NULL;
        Py_RETURN_FALSE;
    }
    unsigned char *htup = p + off;
    unsigned infomask = rd16(htup + 20) & ~(unsigned) (HEAP_XMAX_BITS | HEAP_MOVED);
    unsigned infomask2 = rd16(htup + 18) & ~(unsigned) (HEAP_KEYS_UPDATED | HEAP_HOT_UPDATED);
    fix_infomask(infobits, &infomask, &infomask2);
    if (!(flags & 0x08)) /* XLH_DELETE_IS_SUPER */
        wr32(htup + 4, xmax);
    else
        wr32(htup + 0, 0);
    wr32(htup + 8, 0); /* HeapTupleHeaderSetCmax(FirstCommandId) */
    infomask &= ~(unsigned) HEAP_COMBOCID;
    wr16(htup + 20, infomask);
    wr16(htup + 18, infomask2);
    set_prunable(p, xid);
    if (flags & 0x01) /* XLH_DELETE_ALL_VISIBLE_CLEARED */
        clear_all_visible(p);
    if (flags & 0x10) /* XLH_DELETE_IS_PARTITION_MOVE: ItemPointerSetMovedPartitions */
        set_ctid(htup, 0xFFFFFFFFu, 0xFFFD);
    else
        set_ctid(htup, blkno, offnum);
    PyBuffer_Release(&page);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(heap_update_old_doc,
"heap_update_old(page, old_offnum, old_xmax, old_infobits, flags, hot, newblk, new_offnum, xid)\n"
"    -> (lp_off, lp_len) | None\n\n"
"The old-tuple half of heap_xlog_update (pgredo.heap._update_old_tuple). None: the line\n"
"pointer array is corrupt past the page; nothing was changed, run the Python code.");

static PyObject *native_heap_update_old(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer page;
    uint32_t v[8];
    if (heap_args(args, nargs, 8, &page, v, "heap_update_old") < 0)
        return NULL;
    uint32_t offnum = v[0], xmax = v[1], infobits = v[2], flags = v[3], hot = v[4], newblk = v[5],
             new_offnum = v[6], xid = v[7];
    unsigned char *p = (unsigned char *) page.buf;
    long off, len;
    int found = normal_tuple(p, (long) offnum, &off, &len);
    if (found <= 0) {
        PyBuffer_Release(&page);
        if (found < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    unsigned char *htup = p + off;
    unsigned infomask = rd16(htup + 20) & ~(unsigned) (HEAP_XMAX_BITS | HEAP_MOVED);
    unsigned infomask2 = rd16(htup + 18) & ~(unsigned) HEAP_KEYS_UPDATED;
    if (hot)
        infomask2 |= HEAP_HOT_UPDATED;
    else
        infomask2 &= ~(unsigned) HEAP_HOT_UPDATED;
    fix_infomask(infobits, &infomask, &infomask2);
    wr32(htup + 4, xmax);
    wr32(htup + 8, 0);
    infomask &= ~(unsigned) HEAP_COMBOCID;
    wr16(htup + 20, infomask);
    wr16(htup + 18, infomask2);
    set_ctid(htup, newblk, new_offnum);
    set_prunable(p, xid);
    if (flags & 0x01) /* XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED */
        clear_all_visible(p);
    PyBuffer_Release(&page);
    return Py_BuildValue("(ll)", off, len);
}

PyDoc_STRVAR(heap_lock_doc,
"heap_lock(page, offnum, locking_xid, infobits, blkno) -> bool\n\n"
"heap_xlog_lock's change to the tuple (pgredo.heap.heap_lock_redo). False: the line\n"
"pointer array is corrupt past the page; nothing was changed, run the Python code.");

static PyObject *native_heap_lock(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer page;
    uint32_t v[4];
    if (heap_args(args, nargs, 4, &page, v, "heap_lock") < 0)
        return NULL;
    uint32_t offnum = v[0], xid = v[1], infobits = v[2], blkno = v[3];
    unsigned char *p = (unsigned char *) page.buf;
    long off, len;
    int found = normal_tuple(p, (long) offnum, &off, &len);
    if (found <= 0) {
        PyBuffer_Release(&page);
        if (found < 0)
            return NULL;
        Py_RETURN_FALSE;
    }
    unsigned char *htup = p + off;
    unsigned infomask = rd16(htup + 20) & ~(unsigned) (HEAP_XMAX_BITS | HEAP_MOVED);
    unsigned infomask2 = rd16(htup + 18) & ~(unsigned) HEAP_KEYS_UPDATED;
    fix_infomask(infobits, &infomask, &infomask2);
    /* HEAP_XMAX_IS_LOCKED_ONLY: no update, so no HOT link or forward ctid. */
    if ((infomask & HEAP_XMAX_LOCK_ONLY) ||
        (infomask & (HEAP_XMAX_IS_MULTI | HEAP_LOCK_MASK)) == HEAP_XMAX_EXCL_LOCK) {
        infomask2 &= ~(unsigned) HEAP_HOT_UPDATED;
        set_ctid(htup, blkno, offnum);
    }
    wr32(htup + 4, xid);
    wr32(htup + 8, 0);
    infomask &= ~(unsigned) HEAP_COMBOCID;
    wr16(htup + 20, infomask);
    wr16(htup + 18, infomask2);
    PyBuffer_Release(&page);
    Py_RETURN_TRUE;
}

/* -- PageRepairFragmentation ---------------------------------------------------------- */

typedef struct
{
    int offsetindex; /* line pointer index (0-based) */
    int itemoff;
    int alignedlen;
} CompactItem;

/* `page[dst:dst+n] = src[from:from+n]` of the Python twin, refusing what would leave the page. */
static int move_bytes(unsigned char *page, long dst, const unsigned char *src, long from, long to)
{
    long n = to - from;
    if (n <= 0)
        return 0;
    if (dst < 0 || dst + n > BLCKSZ || from < 0 || to > BLCKSZ) {
        PyErr_SetString(page_error_type(), "corrupted line pointers: overlapping items");
        return -1;
    }
    memmove(page + dst, src + from, (size_t) n);
    return 0;
}

/* compactify_tuples (bufpage.c), as pgformat.page._compactify_tuples. */
static int compactify_tuples(unsigned char *p, const CompactItem *items, int nitems, int presorted)
{
    long upper = (long) rd16(p + OFF_SPECIAL);
    unsigned char scratch[BLCKSZ];
    const unsigned char *src = p;
    int i = 0;
    if (!presorted) {
        memcpy(scratch, p, BLCKSZ);
        src = scratch;
        long lower = (long) rd16(p + OFF_LOWER);
        long maxoff = lower <= SIZE_OF_PAGE_HEADER ? 0 : (lower - SIZE_OF_PAGE_HEADER) / ITEM_ID_SIZE;
        if (nitems < maxoff / 4)
            goto copy; /* many tuples removed: C copies each tuple */
    }
    /* Skip tuples already in place at the end of the page. */
    while (i < nitems && upper == items[i].itemoff + items[i].alignedlen) {
        upper -= items[i].alignedlen;
        i++;
    }
copy:;
    const CompactItem *first = &items[i < nitems - 1 ? i : nitems - 1];
    long copy_tail = first->itemoff + first->alignedlen, copy_head = copy_tail;
    for (; i < nitems; i++) {
        const CompactItem *it = &items[i];
        if (copy_head != it->itemoff + it->alignedlen) {
            if (move_bytes(p, upper, src, copy_head, copy_tail) < 0)
                return -1;
            copy_tail = it->itemoff + it->alignedlen;
        }
        upper -= it->alignedlen;
        copy_head = it->itemoff;
        unsigned char *lp = p + SIZE_OF_PAGE_HEADER + it->offsetindex * ITEM_ID_SIZE;
        wr32(lp, (rd32(lp) & ~(uint32_t) LP_OFF_MASK) | ((uint32_t) upper & LP_OFF_MASK));
    }
    if (move_bytes(p, upper, src, copy_head, copy_tail) < 0)
        return -1;
    wr16(p + OFF_UPPER, (unsigned) upper);
    return 0;
}

PyDoc_STRVAR(page_repair_fragmentation_doc,
"page_repair_fragmentation(page) -> None\n\n"
"PageRepairFragmentation (bufpage.c); see pgformat.page.page_repair_fragmentation.");

static PyObject *native_page_repair_fragmentation(PyObject *self, PyObject *page_obj)
{
    Py_buffer page;
    if (get_page(page_obj, &page) < 0)
        return NULL;
    unsigned char *p = (unsigned char *) page.buf;
    long lower = (long) rd16(p + OFF_LOWER), upper = (long) rd16(p + OFF_UPPER);
    long special = (long) rd16(p + OFF_SPECIAL);
    if (lower < SIZE_OF_PAGE_HEADER || lower > upper || upper > special || special > BLCKSZ ||
        special != MAXALIGN(special)) {
        PyErr_Format(page_error_type(), "corrupted page pointers: lower = %ld, upper = %ld, special = %ld",
                     lower, upper, special);
        goto fail;
    }
    int nline = (int) ((lower - SIZE_OF_PAGE_HEADER) / ITEM_ID_SIZE); /* <= MAX_LINP: lower <= BLCKSZ */
    CompactItem items[MAX_LINP];
    int unused[MAX_LINP];
    int nitems = 0, nunused = 0, finalusedlp = 0, presorted = 1;
    long totallen = 0, last_offset = special;
    for (int idx = 0; idx < nline; idx++) {
        uint32_t raw = rd32(p + SIZE_OF_PAGE_HEADER + idx * ITEM_ID_SIZE);
        if (!((raw >> LP_FLAGS_SHIFT) & 3)) {
            unused[nunused++] = idx;
            continue;
        }
        long lp_len = (long) (raw >> LP_LEN_SHIFT);
        if (lp_len) {
            long itemoff = (long) (raw & LP_OFF_MASK);
            if (last_offset > itemoff)
                last_offset = itemoff;
            else
                presorted = 0;
            if (itemoff < upper || itemoff >= special) {
                PyErr_Format(page_error_type(), "corrupted line pointer: %ld", itemoff);
                goto fail;
            }
            long alignedlen = MAXALIGN(lp_len);
            if (itemoff + alignedlen > BLCKSZ) {
                PyErr_Format(page_error_type(), "corrupted line pointer: offset = %ld, size = %ld", itemoff, lp_len);
                goto fail;
            }
            totallen += alignedlen;
            items[nitems].offsetindex = idx;
            items[nitems].itemoff = (int) itemoff;
            items[nitems].alignedlen = (int) alignedlen;
            nitems++;
        }
        finalusedlp = idx + 1;
    }
    if (nitems && totallen > special - lower) {
        PyErr_Format(page_error_type(), "corrupted item lengths: total %ld, available space %ld", totallen,
                     special - lower);
        goto fail;
    }
    for (int k = 0; k < nunused; k++)
        wr32(p + SIZE_OF_PAGE_HEADER + unused[k] * ITEM_ID_SIZE, 0); /* ItemIdSetUnused */
    if (nitems == 0)
        wr16(p + OFF_UPPER, (unsigned) special);
    else if (compactify_tuples(p, items, nitems, presorted) < 0)
        goto fail;
    if (finalusedlp != nline) {
        int nunusedend = nline - finalusedlp;
        nunused -= nunusedend;
        wr16(p + OFF_LOWER, (unsigned) (lower - ITEM_ID_SIZE * nunusedend));
    }
    unsigned flags = rd16(p + OFF_FLAGS);
    wr16(p + OFF_FLAGS, nunused > 0 ? (flags | PD_HAS_FREE_LINES) : (flags & ~PD_HAS_FREE_LINES));
    PyBuffer_Release(&page);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&page);
    return NULL;
}

/* -- DecodeXLogRecord ------------------------------------------------------------------ */

#define SIZE_OF_XLOG_RECORD 24
#define XLR_MAX_BLOCK_ID 32
#define XLR_BLOCK_ID_DATA_SHORT 255
#define XLR_BLOCK_ID_DATA_LONG 254
#define XLR_BLOCK_ID_ORIGIN 253
#define XLR_BLOCK_ID_TOPLEVEL_XID 252
#define BKPBLOCK_HAS_IMAGE 0x10
#define BKPBLOCK_HAS_DATA 0x20
#define BKPBLOCK_SAME_REL 0x80
#define BKPIMAGE_HAS_HOLE 0x01
#define BKPIMAGE_COMPRESSED (0x04 | 0x08 | 0x10)

typedef struct
{
    unsigned block_id, fork_flags, data_len, bimg_len, hole_offset, bimg_info;
    long hole_length; /* BLCKSZ - bimg_len for an uncompressed image with a hole: may be negative */
    uint32_t spc, db, rel, blkno;
} BlockRef;

/* The error of a record whose body is bad: a str the Python side raises as WalRecordError. */
#define DECODE_FAIL(...)                                   \
    do {                                                   \
        snprintf(msg, sizeof msg, __VA_ARGS__);            \
        result = PyUnicode_FromString(msg);                \
        goto done;                                         \
    } while (0)
#define TRUNCATED() DECODE_FAIL("record body truncated: a header runs past the end of the record")

PyDoc_STRVAR(decode_body_doc,
"decode_body(raw) -> (blocks, main_data, origin, toplevel_xid) | str\n\n"
"The DecodeXLogRecord walk of pgformat.xlogrecord._decode_body over a whole\n"
"record (header not checked here). blocks: one tuple per block reference,\n"
"(block_id, spc, db, rel, fork_flags, blkno, image, data) with image None or\n"
"(bytes, hole_offset, hole_length, bimg_info). A str is the reason the\n"
"record is invalid, worded as the Python walk words it.");

static PyObject *decode_body(const unsigned char *r, Py_ssize_t end);
static uint32_t crc32c_update(uint32_t crc, const unsigned char *p, size_t n);

static PyObject *native_decode_body(PyObject *self, PyObject *raw_obj)
{
    Py_buffer view;
    if (PyObject_GetBuffer(raw_obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = decode_body((const unsigned char *) view.buf, view.len);
    PyBuffer_Release(&view);
    return result;
}

/* The walk itself over r[0:end]: the parts tuple, a str (invalid record) or NULL (exception set). */
static PyObject *decode_body(const unsigned char *r, Py_ssize_t end)
{
    Py_ssize_t pos = SIZE_OF_XLOG_RECORD, datatotal = 0, main_len = 0;
    long origin = -1, toplevel = -1;
    uint32_t toplevel_xid = 0;
    BlockRef refs[XLR_MAX_BLOCK_ID + 1];
    int nrefs = 0, have_rel = 0;
    long last_block_id = -1;
    uint32_t spc = 0, db = 0, rel = 0;
    PyObject *result = NULL, *blocks = NULL;
    char msg[200];

    if (end < SIZE_OF_XLOG_RECORD)
        TRUNCATED();
    while (end - pos > datatotal) {
        unsigned block_id = r[pos++];
        if (block_id > XLR_MAX_BLOCK_ID) {
            if (block_id == XLR_BLOCK_ID_DATA_SHORT) {
                if (pos + 1 > end)
                    TRUNCATED();
                main_len = r[pos++];
                datatotal += main_len;
                break; /* main data length is always last */
            }
            if (block_id == XLR_BLOCK_ID_DATA_LONG) {
                if (pos + 4 > end)
                    TRUNCATED();
                main_len = (Py_ssize_t) rd32(r + pos);
                pos += 4;
                datatotal += main_len;
                break;
            }
            if (block_id == XLR_BLOCK_ID_ORIGIN) {
                if (pos + 2 > end)
                    TRUNCATED();
                origin = (long) rd16(r + pos);
                pos += 2;
                continue;
            }
            if (block_id == XLR_BLOCK_ID_TOPLEVEL_XID) {
                if (pos + 4 > end)
                    TRUNCATED();
                toplevel_xid = rd32(r + pos);
                toplevel = 1;
                pos += 4;
                continue;
            }
            DECODE_FAIL("invalid block_id %u", block_id);
        }
        if ((long) block_id <= last_block_id)
            DECODE_FAIL("out-of-order block_id %u", block_id);
        last_block_id = block_id;
        BlockRef *b = &refs[nrefs];
        b->block_id = block_id;
        if (pos + 3 > end)
            TRUNCATED();
        b->fork_flags = r[pos];
        b->data_len = rd16(r + pos + 1);
        pos += 3;
        if ((b->fork_flags & BKPBLOCK_HAS_DATA) && !b->data_len)
            DECODE_FAIL("BKPBLOCK_HAS_DATA set, but no data included");
        if (b->data_len && !(b->fork_flags & BKPBLOCK_HAS_DATA))
            DECODE_FAIL("BKPBLOCK_HAS_DATA not set, but data length is %u", b->data_len);
        datatotal += b->data_len;
        b->bimg_len = b->hole_offset = b->hole_length = b->bimg_info = 0;
        if (b->fork_flags & BKPBLOCK_HAS_IMAGE) {
            if (pos + 5 > end)
                TRUNCATED();
            b->bimg_len = rd16(r + pos);
            b->hole_offset = rd16(r + pos + 2);
            b->bimg_info = r[pos + 4];
            pos += 5;
            if (b->bimg_info & BKPIMAGE_HAS_HOLE) {
                if (b->bimg_info & BKPIMAGE_COMPRESSED) {
                    if (pos + 2 > end)
                        TRUNCATED();
                    b->hole_length = (long) rd16(r + pos);
                    pos += 2;
                }
                else
                    b->hole_length = (long) BLCKSZ - (long) b->bimg_len;
            }
            datatotal += b->bimg_len;
            /* _check_image_header */
            long hole_length = b->hole_length;
            if (b->bimg_info & BKPIMAGE_HAS_HOLE) {
                if (b->hole_offset == 0 || hole_length == 0 || b->bimg_len == BLCKSZ)
                    DECODE_FAIL("block image %u: BKPIMAGE_HAS_HOLE set, but hole offset %u length %ld", block_id,
                                b->hole_offset, hole_length);
            }
            else if (b->hole_offset != 0 || hole_length != 0)
                DECODE_FAIL("block image %u: BKPIMAGE_HAS_HOLE not set, but hole offset %u", block_id, b->hole_offset);
            if (b->bimg_info & BKPIMAGE_COMPRESSED) {
                if (b->bimg_len == BLCKSZ)
                    DECODE_FAIL("block image %u: compressed image length %u", block_id, b->bimg_len);
                unsigned methods = b->bimg_info & BKPIMAGE_COMPRESSED;
                if (methods & (methods - 1))
                    DECODE_FAIL("block image %u: more than one compression method in %#x", block_id, b->bimg_info);
            }
            else if (!(b->bimg_info & BKPIMAGE_HAS_HOLE) && b->bimg_len != BLCKSZ)
                DECODE_FAIL("block image %u: image length %u without hole or compression", block_id, b->bimg_len);
            if ((long) b->hole_offset + hole_length > BLCKSZ)
                DECODE_FAIL("block image %u: hole %u+%ld beyond the page", block_id, b->hole_offset, hole_length);
        }
        if (b->fork_flags & BKPBLOCK_SAME_REL) {
            if (!have_rel)
                DECODE_FAIL("BKPBLOCK_SAME_REL set but no previous rel");
        }
        else {
            if (pos + 12 > end)
                TRUNCATED();
            spc = rd32(r + pos);
            db = rd32(r + pos + 4);
            rel = rd32(r + pos + 8);
            have_rel = 1;
            pos += 12;
        }
        b->spc = spc;
        b->db = db;
        b->rel = rel;
        if (pos + 4 > end)
            TRUNCATED();
        b->blkno = rd32(r + pos);
        pos += 4;
        nrefs++;
    }
    if (end - pos != datatotal)
        DECODE_FAIL("record lengths disagree: %zd bytes after the headers, %zd announced", end - pos, datatotal);

    blocks = PyList_New(nrefs);
    if (blocks == NULL)
        goto done;
    for (int i = 0; i < nrefs; i++) {
        BlockRef *b = &refs[i];
        PyObject *image;
        if (b->fork_flags & BKPBLOCK_HAS_IMAGE) {
            image = Py_BuildValue("(y#IlI)", (const char *) r + pos, (Py_ssize_t) b->bimg_len, b->hole_offset,
                                  b->hole_length, b->bimg_info);
            pos += b->bimg_len;
        }
        else {
            image = Py_None;
            Py_INCREF(image);
        }
        if (image == NULL)
            goto done;
        PyObject *item = Py_BuildValue("(IIIIIINy#)", b->block_id, b->spc, b->db, b->rel, b->fork_flags, b->blkno,
                                       image, (const char *) r + pos, (Py_ssize_t) b->data_len);
        pos += b->data_len;
        if (item == NULL)
            goto done;
        PyList_SET_ITEM(blocks, i, item);
    }
    PyObject *origin_obj = origin >= 0 ? PyLong_FromLong(origin) : (Py_INCREF(Py_None), Py_None);
    PyObject *toplevel_obj = toplevel >= 0 ? PyLong_FromUnsignedLong(toplevel_xid) : (Py_INCREF(Py_None), Py_None);
    if (origin_obj == NULL || toplevel_obj == NULL) {
        Py_XDECREF(origin_obj);
        Py_XDECREF(toplevel_obj);
        goto done;
    }
    result = Py_BuildValue("(Oy#NN)", blocks, (const char *) r + pos, main_len, origin_obj, toplevel_obj);
done:
    Py_XDECREF(blocks);
    return result;
}

#define MAX_RECORD_LENGTH (1024L * 1024 * 1024)

PyDoc_STRVAR(decode_record_doc,
"decode_record(raw, verify_crc) -> (header, blocks, main_data, origin, toplevel_xid) | (None, crc_error, str)\n\n"
"parse_record_header, the length check, check_record_crc and decode_body in one call\n"
"(pgformat.xlogrecord.decode_record). header: (tot_len, xid, prev, info, rmid, crc). An\n"
"invalid record gives None, whether it is a checksum mismatch, and the reason, worded as\n"
"the Python functions word it.");

static PyObject *native_decode_record(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "decode_record takes 2 arguments");
        return NULL;
    }
    int verify_crc = PyObject_IsTrue(args[1]);
    if (verify_crc < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *r = (const unsigned char *) view.buf;
    Py_ssize_t len = view.len;
    PyObject *result = NULL, *parts = NULL;
    char msg[160];
    int crc_error = 0;
    if (len < SIZE_OF_XLOG_RECORD) {
        snprintf(msg, sizeof msg, "record header truncated: %zd of %d bytes", len, SIZE_OF_XLOG_RECORD);
        goto invalid;
    }
    uint32_t tot_len = rd32(r), xid = rd32(r + 4), crc = rd32(r + 20);
    uint64_t prev = (uint64_t) rd32(r + 8) | ((uint64_t) rd32(r + 12) << 32);
    unsigned info = r[16], rmid = r[17];
    if (tot_len < SIZE_OF_XLOG_RECORD) {
        snprintf(msg, sizeof msg, "invalid record length: wanted %d, got %u", SIZE_OF_XLOG_RECORD, tot_len);
        goto invalid;
    }
    if (tot_len > MAX_RECORD_LENGTH) {
        snprintf(msg, sizeof msg, "record length %u exceeds the maximum %ld", tot_len, MAX_RECORD_LENGTH);
        goto invalid;
    }
    if (21 < rmid && rmid < 128) {
        snprintf(msg, sizeof msg, "invalid resource manager ID %u", rmid);
        goto invalid;
    }
    if ((Py_ssize_t) tot_len != len) {
        snprintf(msg, sizeof msg, "record is %zd bytes but its header says %u", len, tot_len);
        goto invalid;
    }
    if (verify_crc) {
        uint32_t actual = 0xFFFFFFFFu;
        actual = crc32c_update(actual, r + SIZE_OF_XLOG_RECORD, (size_t) (len - SIZE_OF_XLOG_RECORD));
        actual = crc32c_update(actual, r, 20) ^ 0xFFFFFFFFu;
        if (actual != crc) {
            snprintf(msg, sizeof msg, "incorrect resource manager data checksum: %08X, expected %08X", actual, crc);
            crc_error = 1;
            goto invalid;
        }
    }
    parts = decode_body(r, len);
    if (parts == NULL)
        goto done;
    if (PyUnicode_Check(parts)) {
        result = Py_BuildValue("(OOO)", Py_None, Py_False, parts);
        goto done;
    }
    PyObject *header = Py_BuildValue("(IIKIII)", tot_len, xid, (unsigned long long) prev, info, rmid, crc);
    if (header == NULL)
        goto done;
    result = Py_BuildValue("(NOOOO)", header, PyTuple_GET_ITEM(parts, 0), PyTuple_GET_ITEM(parts, 1),
                           PyTuple_GET_ITEM(parts, 2), PyTuple_GET_ITEM(parts, 3));
    goto done;
invalid:
    result = Py_BuildValue("(OOs)", Py_None, crc_error ? Py_True : Py_False, msg);
done:
    Py_XDECREF(parts);
    PyBuffer_Release(&view);
    return result;
}

/* -- CRC-32C of a WAL record (XLogRecord.xl_crc) ---------------------------------------- */

/* Castagnoli polynomial, reflected (the CRC Postgres's COMP_CRC32C computes). */
static uint32_t crc32c_table[8][256];

static void crc32c_init_tables(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc32c_table[t][i] = (crc32c_table[t - 1][i] >> 8) ^ crc32c_table[0][crc32c_table[t - 1][i] & 0xFF];
}

/* Slice-by-8: eight table lookups per 8 bytes. */
static uint32_t crc32c_sw(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n >= 8) {
        uint32_t lo = crc ^ ((uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24);
        crc = crc32c_table[7][lo & 0xFF] ^ crc32c_table[6][(lo >> 8) & 0xFF] ^ crc32c_table[5][(lo >> 16) & 0xFF] ^
              crc32c_table[4][lo >> 24] ^ crc32c_table[3][p[4]] ^ crc32c_table[2][p[5]] ^ crc32c_table[1][p[6]] ^
              crc32c_table[0][p[7]];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ crc32c_table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

#if defined(__GNUC__) && defined(__x86_64__)
/* The SSE 4.2 crc32 instruction, where the CPU has it (checked at run time). */
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t) c;
    while (n--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
static int have_sse42 = 0;
#endif

static uint32_t crc32c_update(uint32_t crc, const unsigned char *p, size_t n)
{
#if defined(__GNUC__) && defined(__x86_64__)
    if (have_sse42)
        return crc32c_hw(crc, p, n);
#endif
    return crc32c_sw(crc, p, n);
}

PyDoc_STRVAR(record_crc_doc,
"record_crc(raw) -> int\n\n"
"CRC-32C over the record after its 24-byte header, then the header up to xl_crc\n"
"(pgformat.xlogrecord.record_crc).");

static PyObject *native_record_crc(PyObject *self, PyObject *raw_obj)
{
    Py_buffer view;
    if (PyObject_GetBuffer(raw_obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *r = (const unsigned char *) view.buf;
    uint32_t crc = 0xFFFFFFFFu;
    if (view.len > SIZE_OF_XLOG_RECORD)
        crc = crc32c_update(crc, r + SIZE_OF_XLOG_RECORD, (size_t) (view.len - SIZE_OF_XLOG_RECORD));
    crc = crc32c_update(crc, r, (size_t) (view.len < 20 ? view.len : 20));
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc ^ 0xFFFFFFFFu);
}

/* -- pglz ------------------------------------------------------------------------------ */

static void pglz_error(const char *message, Py_ssize_t offset)
{
    PyObject *type = pglz_error_type();
    PyObject *exc = PyObject_CallFunction(type, "sn", message, offset);
    if (exc != NULL) {
        PyErr_SetObject(type, exc);
        Py_DECREF(exc);
    }
}

PyDoc_STRVAR(pglz_decompress_doc,
"pglz_decompress(source, rawsize, check_complete=True) -> bytes\n\n"
"pglz_decompress (pg_lzcompress.c); see pgformat.pglz.pglz_decompress.");

static PyObject *native_pglz_decompress(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "pglz_decompress takes 2 or 3 arguments");
        return NULL;
    }
    int check_complete = 1;
    if (nargs == 3 && (check_complete = PyObject_IsTrue(args[2])) < 0)
        return NULL;
    Py_ssize_t rawsize = PyLong_AsSsize_t(args[1]);
    if (rawsize == -1 && PyErr_Occurred())
        return NULL;
    if (rawsize < 0) {
        char msg[64];
        snprintf(msg, sizeof msg, "pglz: negative raw size %zd", rawsize);
        PyErr_SetString(pglz_error_type(), msg);
        return NULL;
    }
    Py_buffer src;
    if (PyObject_GetBuffer(args[0], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *s = (const unsigned char *) src.buf;
    Py_ssize_t srcend = src.len;
    /* A 3-byte tag writes at most 273 bytes: no stream of srcend bytes decodes to more. */
    Py_ssize_t cap = srcend <= PY_SSIZE_T_MAX / 273 ? srcend * 273 : PY_SSIZE_T_MAX;
    if (cap > rawsize)
        cap = rawsize;
    PyObject *out = PyBytes_FromStringAndSize(NULL, cap);
    if (out == NULL) {
        PyBuffer_Release(&src);
        return NULL;
    }
    unsigned char *o = (unsigned char *) PyBytes_AS_STRING(out);
    Py_ssize_t sp = 0, dp = 0;
    char msg[160];
    while (sp < srcend && dp < rawsize) {
        unsigned ctrl = s[sp++];
        for (int bit = 0; bit < 8; bit++, ctrl >>= 1) {
            if (sp >= srcend || dp >= rawsize)
                break;
            if (!(ctrl & 1)) {
                o[dp++] = s[sp++];
                continue;
            }
            if (sp + 2 > srcend) {
                pglz_error("pglz: truncated tag", sp);
                goto fail;
            }
            Py_ssize_t len = (s[sp] & 0x0F) + 3;
            Py_ssize_t off = ((Py_ssize_t) (s[sp] & 0xF0) << 4) | s[sp + 1];
            if (len == 18) {
                if (sp + 3 > srcend) {
                    pglz_error("pglz: truncated tag (missing length byte)", sp);
                    goto fail;
                }
                len += s[sp + 2];
            }
            if (off == 0) {
                pglz_error("pglz: tag with offset 0", sp);
                goto fail;
            }
            if (off > dp) {
                snprintf(msg, sizeof msg,
                         "pglz: tag offset %zd points before the start of the output (output position %zd)", off, dp);
                pglz_error(msg, sp);
                goto fail;
            }
            sp += len >= 18 ? 3 : 2;
            if (len > rawsize - dp) /* don't emit more than requested */
                len = rawsize - dp;
            /* Byte by byte, as PG: an overlapping copy repeats the last `off` bytes. */
            unsigned char *from = o + dp - off, *to = o + dp;
            if (off >= len)
                memcpy(to, from, (size_t) len);
            else
                for (Py_ssize_t k = 0; k < len; k++)
                    to[k] = from[k];
            dp += len;
        }
    }
    if (check_complete) {
        if (dp != rawsize) {
            snprintf(msg, sizeof msg, "pglz: decompressed %zd bytes, expected %zd", dp, rawsize);
            pglz_error(msg, sp);
            goto fail;
        }
        if (sp != srcend) {
            snprintf(msg, sizeof msg, "pglz: %zd trailing input bytes after %zd output bytes", srcend - sp, rawsize);
            pglz_error(msg, sp);
            goto fail;
        }
    }
    PyBuffer_Release(&src);
    if (dp != cap && _PyBytes_Resize(&out, dp) < 0)
        return NULL;
    return out;
fail:
    PyBuffer_Release(&src);
    Py_DECREF(out);
    return NULL;
}

/* -- module ----------------------------------------------------------------------------- */

static PyMethodDef native_methods[] = {
    {"page_add_item_extended", (PyCFunction) (void (*)(void)) native_page_add_item_extended, METH_FASTCALL,
     page_add_item_extended_doc},
    {"heap_add_tuple", (PyCFunction) (void (*)(void)) native_heap_add_tuple, METH_FASTCALL, heap_add_tuple_doc},
    {"heap_multi_insert", (PyCFunction) (void (*)(void)) native_heap_multi_insert, METH_FASTCALL,
     heap_multi_insert_doc},
    {"heap_delete", (PyCFunction) (void (*)(void)) native_heap_delete, METH_FASTCALL, heap_delete_doc},
    {"heap_update_old", (PyCFunction) (void (*)(void)) native_heap_update_old, METH_FASTCALL, heap_update_old_doc},
    {"heap_lock", (PyCFunction) (void (*)(void)) native_heap_lock, METH_FASTCALL, heap_lock_doc},
    {"page_repair_fragmentation", (PyCFunction) native_page_repair_fragmentation, METH_O,
     page_repair_fragmentation_doc},
    {"record_crc", (PyCFunction) native_record_crc, METH_O, record_crc_doc},
    {"decode_body", (PyCFunction) native_decode_body, METH_O, decode_body_doc},
    {"decode_record", (PyCFunction) (void (*)(void)) native_decode_record, METH_FASTCALL, decode_record_doc},
    {"pglz_decompress", (PyCFunction) (void (*)(void)) native_pglz_decompress, METH_FASTCALL, pglz_decompress_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "pgformat._native",
    "Compiled twins of the hot page operations of redo (see _native.c).", -1, native_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    crc32c_init_tables();
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
#endif
    return PyModule_Create(&native_module);
}
