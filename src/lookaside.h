/* Lookaside lists (S4): fixed-size objects recycled through free lists instead of malloc.
 *
 * A cp__slab hands out objects of one size, carved lazily from 1 MiB anonymous chunks
 * (untouched pages cost no memory) and recycled LIFO. It can walk every object handed out
 * (the server's timeout sweep and shutdown use that): each chunk keeps a bitmap of its
 * live objects, so objects carry no header.
 *
 * Every chunk mapped or malloc'd counts in `allocations`, so a caller can prove that its
 * steady state allocates nothing.
 */
#ifndef CPORT_LOOKASIDE_H
#define CPORT_LOOKASIDE_H

#include "sync.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cp__chunk cp__chunk;

typedef struct cp__slab {
    cp__lock lock;
    size_t size; /* object size, a multiple of 16 */
    void *free;
    cp__chunk *chunks;
    uint64_t live;        /* objects handed out (atomic for readers) */
    uint64_t allocations; /* chunks mapped, ever (atomic for readers) */
} cp__slab;

/* The chunk every object is carved from, and the largest object that fits one beside the
 * chunk's header. */
enum { CP__SLAB_CHUNK = 1 << 20, CP__SLAB_MAX_OBJECT = CP__SLAB_CHUNK - 64 };

/* Objects of `size` bytes (rounded up to 16; at least 16). Returns 0, or -EINVAL when
 * size exceeds CP__SLAB_MAX_OBJECT (the slab is then unusable): an object must fit its
 * chunk. */
int cp__slab_init(cp__slab *s, size_t size);
void cp__slab_fini(cp__slab *s);

/* Map the slab's first chunk now, if it has none (touching only its header): a slab that
 * must keep working after memory ran out (the server's replies and closes) claims it
 * while memory is there. Returns 0 or -ENOMEM. Thread-safe. */
int cp__slab_reserve(cp__slab *s);

/* An object (contents unspecified), or NULL when out of memory. Thread-safe. */
void *cp__slab_alloc(cp__slab *s);
void cp__slab_free(cp__slab *s, void *obj);

/* A thread's private stack of free objects in front of a slab, like NT's per-processor
 * lookaside lists: while it has objects (or room) an allocation (or free) by its owning
 * thread touches no lock and no shared cache line. Objects in a cache count as handed out
 * (they show up in `live` and in cp__slab_walk: do not cache objects a walk looks for).
 * Only the owning thread may touch a cache; its objects go back to the slab's memory when
 * the slab is finalised. Zero-initialise, then set `cap` (at most CP__CACHE_MAX). A cache
 * with cap 0 keeps nothing and touches nothing of its own: any thread may use it. */
enum { CP__CACHE_MAX = 64 };

typedef struct cp__slab_cache {
    unsigned n, cap;
    void *objs[CP__CACHE_MAX];
} cp__slab_cache;

/* Move up to n objects into objs[] (one lock); returns how many (0 = out of memory).
 * Beyond the first, only objects already free are taken: the slab never grows for this. */
unsigned cp__slab_alloc_many(cp__slab *s, void **objs, unsigned n);
/* Give back objs[0..n-1] (one lock). */
void cp__slab_free_many(cp__slab *s, void *const *objs, unsigned n);

/* An empty cache refills half its capacity at once and a full one gives half back, so
 * that a worker which allocates a whole batch and frees it later still takes the slab's
 * lock once per half-cache, not once per object. */
/* How many objects move between a cache and its slab at once. */
static inline unsigned cp__cache_batch(const cp__slab_cache *c)
{
    return c->cap > 1 ? c->cap / 2 : 1;
}

static inline void *cp__cache_alloc(cp__slab_cache *c, cp__slab *s)
{
    if (c->cap == 0) /* a cache without room passes straight through (a shared one too) */
        return cp__slab_alloc(s);
    if (c->n == 0 && (c->n = cp__slab_alloc_many(s, c->objs, cp__cache_batch(c))) == 0)
        return NULL;
    return c->objs[--c->n];
}

static inline void cp__cache_free(cp__slab_cache *c, cp__slab *s, void *obj)
{
    if (c->cap == 0) { /* a cache without room passes straight through */
        cp__slab_free(s, obj);
        return;
    }
    if (c->n == c->cap) {
        unsigned b = cp__cache_batch(c);
        cp__slab_free_many(s, c->objs + (c->n - b), b);
        c->n -= b;
    }
    c->objs[c->n++] = obj;
}

/* Call fn(obj, arg) for every object handed out, with the slab locked (so none is freed
 * meanwhile; fn must not allocate from or free to this slab). */
void cp__slab_walk(cp__slab *s, void (*fn)(void *obj, void *arg), void *arg);

#endif
