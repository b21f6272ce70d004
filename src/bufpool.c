/* The port's shared receive-buffer pool (see bufpool.h). */
#include "bufpool.h"
#include "inject.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

enum {
    /* Cold free buffers (unused for a whole check period) kept resident anyway. */
    KEEP_RESIDENT = 64,
    /* Most buffers trimmed per check (bounds the time the pool stays locked). */
    TRIM_MAX = 256,
    /* The clock is looked at every this many puts. */
    PUTS_PER_CHECK = 256,
};
#define TRIM_PERIOD_NS 1000000000LL

int cp__bufpool_init(cp__bufpool *bp, uint32_t count, uint32_t size, uint32_t per_socket)
{
    bp->size = size;
    bp->count = count;
    bp->per_socket = per_socket;
    bp->map_len = (size_t)count * size;
    cp__lock_init(&bp->lock);
    /* MAP_NORESERVE: pages cost nothing until a buffer is first used. */
    void *base = mmap(NULL, bp->map_len, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        return -errno;
    bp->base = base;
    bp->free_ids = malloc(count * sizeof(*bp->free_ids));
    bp->refs = calloc(count, sizeof(*bp->refs));
    bp->filled = calloc(count, sizeof(*bp->filled));
    bp->chunk_free = CP__STASH_END;
    if (!bp->free_ids || !bp->refs || !bp->filled) {
        cp__bufpool_fini(bp);
        return -ENOMEM;
    }
    return 0;
}

void cp__bufpool_fini(cp__bufpool *bp)
{
    if (bp->base)
        munmap(bp->base, bp->map_len);
    free(bp->free_ids);
    free(bp->refs);
    free(bp->filled);
    for (int i = 0; i < CP__CHUNK_BLOCKS; i++)
        free(bp->chunk_blocks[i]);
    free(bp->starving);
    *bp = (cp__bufpool){0};
}

int cp__bufpool_id(const cp__bufpool *bp, const void *addr)
{
    const char *a = addr;
    if (!bp->base || a < bp->base || a >= bp->base + bp->map_len)
        return -1;
    return (int)((size_t)(a - bp->base) / bp->size);
}

static int get_locked(cp__bufpool *bp, uint32_t ref)
{
    int id = -1;
    if (bp->nfree) {
        if (bp->trimmed == bp->nfree)
            bp->trimmed--; /* a trimmed one: it faults back in when used */
        id = bp->free_ids[--bp->nfree];
        if (bp->nfree < bp->min_free)
            bp->min_free = bp->nfree;
    } else if (bp->fresh < bp->count) {
        id = (int)bp->fresh++;
    }
    if (id >= 0)
        __atomic_store_n(&bp->refs[id], ref, __ATOMIC_RELAXED);
    return id;
}

int cp__bufpool_get(cp__bufpool *bp)
{
    cp__lock_acquire(&bp->lock);
    int id = get_locked(bp, 1);
    cp__lock_release(&bp->lock);
    return id;
}

uint32_t cp__bufpool_get_many(cp__bufpool *bp, uint16_t *ids, uint32_t max)
{
    uint32_t n = 0;
    cp__lock_acquire(&bp->lock);
    while (n < max) {
        int id = get_locked(bp, CP__REF_KERNEL);
        if (id < 0)
            break;
        ids[n++] = (uint16_t)id;
    }
    cp__lock_release(&bp->lock);
    return n;
}

/* Give the pages of cold free buffers back to the OS: those below the stack's low
 * watermark, which nobody took since the last check, beyond KEEP_RESIDENT of them. Under
 * the lock: a buffer being trimmed must not be handed out meanwhile. At most once per
 * TRIM_PERIOD_NS, so buffers in circulation are never trimmed and faulted back in. */
static void trim_cold_locked(cp__bufpool *bp, int64_t now)
{
    bp->next_trim_ns = now + TRIM_PERIOD_NS;
    uint32_t cold = bp->min_free > bp->trimmed ? bp->min_free - bp->trimmed : 0;
    uint32_t n = cold > KEEP_RESIDENT ? cold - KEEP_RESIDENT : 0;
    if (n > TRIM_MAX)
        n = TRIM_MAX;
    for (uint32_t i = 0; i < n; i++)
        madvise(cp__bufpool_addr(bp, bp->free_ids[bp->trimmed + i]), bp->size, MADV_DONTNEED);
    bp->trimmed += n;
    bp->min_free = bp->nfree;
}

/* Publish when an idle poller should run the check: while more free buffers than
 * KEEP_RESIDENT hold memory, the next check may trim some. */
static void publish_trim_at_locked(cp__bufpool *bp)
{
    int64_t at = 0;
    if (bp->nfree - bp->trimmed > KEEP_RESIDENT)
        at = bp->next_trim_ns ? bp->next_trim_ns : 1; /* (never checked yet: now) */
    if (at != bp->trim_at)
        __atomic_store_n(&bp->trim_at, at, __ATOMIC_RELAXED);
}

void cp__bufpool_maintain(cp__bufpool *bp, int64_t now)
{
    if (now < cp__bufpool_trim_at(bp))
        return;
    cp__lock_acquire(&bp->lock);
    if (now >= bp->next_trim_ns) {
        trim_cold_locked(bp, now);
        publish_trim_at_locked(bp);
    }
    cp__lock_release(&bp->lock);
}

bool cp__bufpool_put(cp__bufpool *bp, uint16_t id)
{
    /* No reference left (a failed user of cp__bufpool_get() gives back its own): a late
     * release must find the buffer holding nothing. */
    __atomic_store_n(&bp->refs[id], 0, __ATOMIC_RELAXED);
    cp__lock_acquire(&bp->lock);
    bp->free_ids[bp->nfree++] = id;
    if (++bp->puts >= PUTS_PER_CHECK) {
        bp->puts = 0;
        int64_t now = cp__now_coarse_ns();
        if (now >= bp->next_trim_ns)
            trim_cold_locked(bp, now);
    }
    publish_trim_at_locked(bp);
    bool waiting = bp->nstarving > 0;
    cp__lock_release(&bp->lock);
    return waiting;
}

bool cp__bufpool_unref(cp__bufpool *bp, uint16_t id)
{
    if (__atomic_sub_fetch(&bp->refs[id], 1, __ATOMIC_ACQ_REL) != 0)
        return false;
    return cp__bufpool_put(bp, id);
}

bool cp__bufpool_unhold(cp__bufpool *bp, uint16_t id)
{
    if (__atomic_sub_fetch(&bp->refs[id], CP__REF_KERNEL, __ATOMIC_ACQ_REL) != 0)
        return false;
    return cp__bufpool_put(bp, id);
}

int cp__bufpool_release(cp__bufpool *bp, uint16_t id)
{
    uint32_t v = __atomic_load_n(&bp->refs[id], __ATOMIC_RELAXED);
    do {
        if ((v & ~CP__REF_KERNEL) == 0)
            return -EINVAL; /* no chunk of it is out: free, or only the kernel's */
    } while (!__atomic_compare_exchange_n(&bp->refs[id], &v, v - 1, true, __ATOMIC_ACQ_REL,
                                          __ATOMIC_RELAXED));
    if (v - 1 != 0)
        return 0;
    return cp__bufpool_put(bp, id) ? 1 : 0;
}

int cp__bufpool_starve(cp__bufpool *bp, cp_handle *h)
{
    int r = 0;
    cp__lock_acquire(&bp->lock);
    if (bp->nfree || bp->fresh < bp->count) {
        r = -EAGAIN;
        goto out;
    }
    if (bp->nstarving == bp->cap_starving) {
        uint32_t cap = bp->cap_starving ? bp->cap_starving * 2 : 64;
        cp_handle **v = realloc(bp->starving, cap * sizeof(*v));
        if (!v) {
            r = -ENOMEM;
            goto out;
        }
        bp->starving = v;
        bp->cap_starving = cap;
    }
    bp->starving[bp->nstarving++] = h;
    bp->starved_total++;
out:
    cp__lock_release(&bp->lock);
    return r;
}

bool cp__bufpool_unstarve(cp__bufpool *bp, cp_handle *h)
{
    bool found = false;
    cp__lock_acquire(&bp->lock);
    for (uint32_t i = 0; i < bp->nstarving; i++) {
        if (bp->starving[i] == h) {
            bp->nstarving--;
            memmove(bp->starving + i, bp->starving + i + 1,
                    (bp->nstarving - i) * sizeof(*bp->starving));
            found = true;
            break;
        }
    }
    cp__lock_release(&bp->lock);
    return found;
}

uint32_t cp__bufpool_pop_starving(cp__bufpool *bp, cp_handle **out, uint32_t max,
                                  uint32_t elsewhere)
{
    uint32_t n = 0;
    cp__lock_acquire(&bp->lock);
    uint32_t avail = bp->nfree + (bp->count - bp->fresh) + elsewhere;
    /* Oldest waiter first, so no socket starves forever behind newer ones. */
    while (n < max && n < avail && n < bp->nstarving) {
        out[n] = bp->starving[n];
        n++;
    }
    if (n) {
        bp->nstarving -= n;
        memmove(bp->starving, bp->starving + n, bp->nstarving * sizeof(*bp->starving));
    }
    cp__lock_release(&bp->lock);
    return n;
}

static cp__chunk_rec *chunk_rec(const cp__bufpool *bp, uint32_t i)
{
    return &bp->chunk_blocks[i / CP__CHUNK_BLOCK][i % CP__CHUNK_BLOCK];
}

/* A free record index, or CP__STASH_END when out of memory. */
static uint32_t chunk_alloc(cp__bufpool *bp)
{
    cp__lock_acquire(&bp->lock);
    if (bp->chunk_free == CP__STASH_END && bp->chunk_cap < CP__CHUNK_BLOCK * CP__CHUNK_BLOCKS) {
        cp__chunk_rec *blk = malloc(CP__CHUNK_BLOCK * sizeof(*blk));
        if (blk) {
            uint32_t first = bp->chunk_cap;
            bp->chunk_blocks[first / CP__CHUNK_BLOCK] = blk;
            for (uint32_t i = 0; i < CP__CHUNK_BLOCK; i++)
                blk[i].next = i + 1 < CP__CHUNK_BLOCK ? first + i + 1 : CP__STASH_END;
            bp->chunk_free = first;
            bp->chunk_cap += CP__CHUNK_BLOCK;
        }
    }
    uint32_t i = bp->chunk_free;
    if (i != CP__STASH_END)
        bp->chunk_free = chunk_rec(bp, i)->next;
    cp__lock_release(&bp->lock);
    return i;
}

static void chunk_free(cp__bufpool *bp, uint32_t i)
{
    cp__lock_acquire(&bp->lock);
    chunk_rec(bp, i)->next = bp->chunk_free;
    bp->chunk_free = i;
    cp__lock_release(&bp->lock);
}

int cp__stash_push(cp__bufpool *bp, cp_handle *h, uint32_t off, uint32_t len)
{
    if (CP__INJECT_FAIL("stash_push"))
        return -ENOMEM;
    uint32_t i = chunk_alloc(bp);
    if (i == CP__STASH_END)
        return -ENOMEM;
    cp__chunk_rec *r = chunk_rec(bp, i);
    r->off = off;
    r->len = len;
    r->next = CP__STASH_END;
    uint32_t n = 1;
    if (h->cp__nstash == 0) {
        h->cp__stash_head = i;
    } else {
        cp__chunk_rec *first = chunk_rec(bp, h->cp__stash_head);
        chunk_rec(bp, first->tail)->next = i;
        n = first->n + 1;
    }
    cp__chunk_rec *first = chunk_rec(bp, h->cp__stash_head);
    first->tail = i;
    first->n = n;
    h->cp__nstash = n > UINT16_MAX ? UINT16_MAX : (uint16_t)n;
    return 0;
}

bool cp__stash_pop(cp__bufpool *bp, cp_handle *h, uint32_t *off, uint32_t *len)
{
    if (h->cp__nstash == 0)
        return false;
    uint32_t i = h->cp__stash_head;
    cp__chunk_rec *r = chunk_rec(bp, i);
    *off = r->off;
    *len = r->len;
    uint32_t n = r->n - 1;
    h->cp__nstash = n > UINT16_MAX ? UINT16_MAX : (uint16_t)n;
    if (n) {
        h->cp__stash_head = r->next;
        chunk_rec(bp, r->next)->tail = r->tail;
        chunk_rec(bp, r->next)->n = n;
    } else {
        h->cp__stash_head = CP__STASH_END;
    }
    chunk_free(bp, i);
    return true;
}
