/* The port's shared receive-buffer pool (see bufpool.h). */
#include "bufpool.h"

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
    bp->chunk_next = malloc(count * sizeof(*bp->chunk_next));
    bp->chunk_len = malloc(count * sizeof(*bp->chunk_len));
    if (!bp->free_ids || !bp->chunk_next || !bp->chunk_len) {
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
    free(bp->chunk_next);
    free(bp->chunk_len);
    free(bp->starving);
    *bp = (cp__bufpool){0};
}

int cp__bufpool_id(const cp__bufpool *bp, const void *addr)
{
    const char *a = addr;
    if (!bp->base || a < bp->base || a >= bp->base + bp->map_len)
        return -1;
    size_t off = (size_t)(a - bp->base);
    if (off % bp->size)
        return -1;
    return (int)(off / bp->size);
}

static int get_locked(cp__bufpool *bp)
{
    if (bp->nfree) {
        if (bp->trimmed == bp->nfree)
            bp->trimmed--; /* a trimmed one: it faults back in when used */
        int id = bp->free_ids[--bp->nfree];
        if (bp->nfree < bp->min_free)
            bp->min_free = bp->nfree;
        return id;
    }
    if (bp->fresh < bp->count)
        return (int)bp->fresh++;
    return -1;
}

int cp__bufpool_get(cp__bufpool *bp)
{
    cp__lock_acquire(&bp->lock);
    int id = get_locked(bp);
    cp__lock_release(&bp->lock);
    return id;
}

uint32_t cp__bufpool_get_many(cp__bufpool *bp, uint16_t *ids, uint32_t max)
{
    uint32_t n = 0;
    cp__lock_acquire(&bp->lock);
    while (n < max) {
        int id = get_locked(bp);
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

bool cp__bufpool_put(cp__bufpool *bp, uint16_t id)
{
    cp__lock_acquire(&bp->lock);
    bp->free_ids[bp->nfree++] = id;
    if (++bp->puts >= PUTS_PER_CHECK) {
        bp->puts = 0;
        int64_t now = cp__now_coarse_ns();
        if (now >= bp->next_trim_ns)
            trim_cold_locked(bp, now);
    }
    bool waiting = bp->nstarving > 0;
    cp__lock_release(&bp->lock);
    return waiting;
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

void cp__stash_push(cp__bufpool *bp, cp_handle *h, uint16_t id, uint32_t len)
{
    bp->chunk_next[id] = CP__STASH_END;
    bp->chunk_len[id] = len;
    if (h->cp__nstash == 0)
        h->cp__stash_head = id;
    else
        bp->chunk_next[h->cp__stash_tail] = id;
    h->cp__stash_tail = id;
    h->cp__nstash++;
}

bool cp__stash_pop(cp__bufpool *bp, cp_handle *h, uint16_t *id, uint32_t *len)
{
    if (h->cp__nstash == 0)
        return false;
    *id = h->cp__stash_head;
    *len = bp->chunk_len[*id];
    h->cp__stash_head = bp->chunk_next[*id];
    h->cp__nstash--;
    return true;
}
