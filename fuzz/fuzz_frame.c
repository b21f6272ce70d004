/* libFuzzer target for the framing decoder (src/frame.c).
 *
 * Input: [max lo][max hi][mode][k][k control bytes][stream...]. The stream is fed to one
 * decoder in chunks whose sizes, stops (callback or iterator), takes and allocation
 * failures come from the control bytes, used cyclically. A one-shot reference parse of the
 * whole stream gives the expected frames, error and leftover; the decoder must match it
 * byte for byte, deliver in place whenever the payload starts in the current chunk, never
 * allocate more than max_frame or for a frame that does not straddle, and release every
 * allocation. */
#include "cport/frame.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FZ_CHECK(c)                                                                                \
    do {                                                                                           \
        if (!(c))                                                                                  \
            __builtin_trap();                                                                      \
    } while (0)

typedef struct fz_alloc {
    long allocs, frees;
    size_t live, largest;
    bool fail_next;
} fz_alloc;

static void *fz_alloc_fn(void *ctx, size_t size)
{
    fz_alloc *a = ctx;
    if (a->fail_next) {
        a->fail_next = false;
        return NULL;
    }
    uint8_t *p = malloc(size + sizeof(size_t));
    FZ_CHECK(p != NULL);
    memcpy(p, &size, sizeof size);
    a->allocs++;
    a->live += size;
    if (size > a->largest)
        a->largest = size;
    return p + sizeof(size_t);
}

static void fz_free_fn(void *ctx, void *ptr, size_t size)
{
    fz_alloc *a = ctx;
    uint8_t *p = (uint8_t *)ptr - sizeof(size_t);
    size_t stored;
    memcpy(&stored, p, sizeof stored);
    FZ_CHECK(stored == size);
    FZ_CHECK(a->live >= size);
    a->frees++;
    a->live -= size;
    free(p);
}

/* The reference: frames of the whole stream at once. */
typedef struct fz_ref {
    size_t n;
    size_t *off;    /* payload offsets */
    uint32_t *len;  /* payload lengths */
    int err;        /* 0, -EMSGSIZE or -EBADMSG */
    size_t err_end; /* stream offset just after the bad header */
    size_t tail;    /* bytes of an incomplete last frame (when err == 0) */
} fz_ref;

static void fz_reference(const uint8_t *s, size_t size, uint32_t max, bool reject_empty, fz_ref *r)
{
    memset(r, 0, sizeof *r);
    r->off = malloc((size / 4 + 1) * sizeof *r->off);
    r->len = malloc((size / 4 + 1) * sizeof *r->len);
    FZ_CHECK(r->off && r->len);
    size_t at = 0;
    while (size - at >= 4) {
        uint32_t l = (uint32_t)s[at] << 24 | (uint32_t)s[at + 1] << 16 | (uint32_t)s[at + 2] << 8 |
                     s[at + 3];
        if (l > max || (l == 0 && reject_empty)) {
            r->err = l ? -EMSGSIZE : -EBADMSG;
            r->err_end = at + 4;
            return;
        }
        if (size - at - 4 < l)
            break;
        r->off[r->n] = at + 4;
        r->len[r->n] = l;
        r->n++;
        at += 4 + (size_t)l;
    }
    r->tail = size - at;
}

typedef struct fz_run {
    const uint8_t *stream;
    const fz_ref *ref;
    size_t next;
    const uint8_t *chunk; /* private copy of the current chunk */
    size_t chunk_len, chunk_pos;
    const uint8_t *ctl;
    size_t nctl, ictl;
    uint8_t **taken;
    size_t *taken_len;
    size_t ntaken;
} fz_run;

static uint8_t fz_ctl(fz_run *r)
{
    if (r->nctl == 0)
        return 0;
    return r->ctl[r->ictl++ % r->nctl];
}

static void fz_check_frame(fz_run *r, const cp_frame *f)
{
    FZ_CHECK(r->next < r->ref->n);
    size_t i = r->next++;
    FZ_CHECK(f->len == r->ref->len[i]);
    FZ_CHECK(f->data != NULL);
    if (f->len == 0)
        return;
    FZ_CHECK(memcmp(f->data, r->stream + r->ref->off[i], f->len) == 0);
    if (r->ref->off[i] >= r->chunk_pos)
        FZ_CHECK(f->data == r->chunk + (r->ref->off[i] - r->chunk_pos));
}

static void fz_maybe_take(fz_run *r, cp_frame_decoder *d, const cp_frame *f)
{
    size_t i = r->next - 1;
    uint8_t *own = cp_frame_take(d, f);
    bool assembled = f->len > 0 && r->ref->off[i] < r->chunk_pos;
    FZ_CHECK((own != NULL) == assembled);
    if (!own)
        return;
    FZ_CHECK(own == f->data && cp_frame_held(d) == 0);
    r->taken = realloc(r->taken, (r->ntaken + 1) * sizeof *r->taken);
    r->taken_len = realloc(r->taken_len, (r->ntaken + 1) * sizeof *r->taken_len);
    FZ_CHECK(r->taken && r->taken_len);
    r->taken[r->ntaken] = own;
    r->taken_len[r->ntaken] = f->len;
    r->ntaken++;
}

static int fz_on_frame(cp_frame_decoder *d, const cp_frame *f, void *user)
{
    fz_run *r = user;
    fz_check_frame(r, f);
    uint8_t c = fz_ctl(r);
    if (c & 0x40)
        fz_maybe_take(r, d, f);
    return (c & 0x80) != 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 4)
        return 0;
    uint32_t max = 1 + (((uint32_t)data[0] | (uint32_t)data[1] << 8) % 4096);
    uint8_t mode = data[2];
    if (mode & 0x10)
        max = CP_FRAME_MAX_LIMIT; /* the largest legal limit (frames stay small here) */
    size_t k = data[3];
    if (k > size - 4)
        k = size - 4;
    const uint8_t *ctl = data + 4;
    const uint8_t *stream = data + 4 + k;
    size_t ssize = size - 4 - k;
    bool reject_empty = mode & 1;

    fz_alloc a = {0};
    cp_frame_config cfg = {.max_frame = max,
                           .flags = reject_empty ? CP_FRAME_REJECT_EMPTY : 0,
                           .alloc = fz_alloc_fn,
                           .free = fz_free_fn,
                           .alloc_ctx = &a};
    FZ_CHECK(cp_frame_config_check(&cfg) == 0);
    fz_ref ref;
    fz_reference(stream, ssize, max, reject_empty, &ref);

    cp_frame_decoder d;
    cp_frame_decoder_init(&d);
    fz_run r = {.stream = stream, .ref = &ref, .ctl = ctl, .nctl = k};
    size_t pos = 0;
    int err = 0;
    bool failed_last = false;
    while (pos < ssize && err == 0) {
        uint8_t c = fz_ctl(&r);
        size_t clen = (c & 0x80) ? (size_t)(c & 0x7f) * 61 + 1 : (size_t)(c & 0x1f) + 1;
        if (clen > ssize - pos)
            clen = ssize - pos;
        uint8_t *chunk = malloc(clen);
        FZ_CHECK(chunk != NULL);
        memcpy(chunk, stream + pos, clen);
        r.chunk = chunk;
        r.chunk_len = clen;
        r.chunk_pos = pos;
        size_t done = 0;
        bool via_next = c & 0x20;
        while (done < clen) {
            uint8_t c2 = fz_ctl(&r);
            a.fail_next = !failed_last && (c2 & 0x0f) == 0x0f;
            size_t used;
            int ret;
            if (!via_next) {
                ret = cp_frame_feed(&d, &cfg, chunk + done, clen - done, fz_on_frame, &r, &used);
            } else {
                const void *p = chunk + done;
                size_t n = clen - done;
                cp_frame f;
                while ((ret = cp_frame_next(&d, &cfg, &p, &n, &f)) == 1) {
                    fz_check_frame(&r, &f);
                    uint8_t c3 = fz_ctl(&r);
                    if (c3 & 0x40)
                        fz_maybe_take(&r, &d, &f);
                    if (c3 & 0x80) {
                        ret = CP_FRAME_STOPPED;
                        break;
                    }
                }
                used = clen - done - n;
            }
            failed_last = ret == -ENOMEM;
            a.fail_next = false;
            done += used;
            if (ret == 0) {
                FZ_CHECK(done == clen);
            } else if (ret == CP_FRAME_STOPPED || ret == -ENOMEM) {
                FZ_CHECK(cp_frame_error(&d) == 0);
                /* cp_frame_feed() stops right after a frame, holding nothing */
                if (ret == CP_FRAME_STOPPED && !via_next)
                    FZ_CHECK(cp_frame_partial(&d) == 0 && cp_frame_held(&d) == 0);
                if (ret == -ENOMEM)
                    FZ_CHECK(cp_frame_partial(&d) == 4 && cp_frame_held(&d) == 0);
            } else {
                FZ_CHECK(ret == ref.err);
                FZ_CHECK(pos + done == ref.err_end);
                FZ_CHECK(cp_frame_error(&d) == ret && cp_frame_held(&d) == 0);
                /* sticky: refuses the rest without consuming */
                size_t u2 = 1;
                FZ_CHECK(cp_frame_feed(&d, &cfg, chunk + done, clen - done, fz_on_frame, &r, &u2) ==
                         ret);
                FZ_CHECK(u2 == 0);
                err = ret;
                break;
            }
        }
        free(chunk);
        r.chunk = NULL;
        if (err == 0)
            pos += clen;
    }
    char text[64];
    FZ_CHECK(cp_frame_describe(&d, &cfg, text, sizeof text) > 0);
    FZ_CHECK(r.next == ref.n);
    FZ_CHECK(err == ref.err);
    if (err == 0) {
        /* release a frame the iterator may still hold, then compare the leftover */
        const void *p = NULL;
        size_t n = 0;
        cp_frame f;
        FZ_CHECK(cp_frame_next(&d, &cfg, &p, &n, &f) == 0);
        FZ_CHECK(cp_frame_partial(&d) == ref.tail);
    }
    FZ_CHECK(a.largest <= max);
    FZ_CHECK((size_t)a.allocs <= ref.n + 1);
    for (size_t i = 0; i < r.ntaken; i++)
        cp_frame_buffer_free(&cfg, r.taken[i], r.taken_len[i]);
    free(r.taken);
    free(r.taken_len);
    cp_frame_decoder_free(&d, &cfg);
    FZ_CHECK(a.live == 0 && a.allocs == a.frees);
    free(ref.off);
    free(ref.len);
    return 0;
}
