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

/* Objects of `size` bytes (rounded up to 16; at least 16). */
void cp__slab_init(cp__slab *s, size_t size);
void cp__slab_fini(cp__slab *s);

/* An object (contents unspecified), or NULL when out of memory. Thread-safe. */
void *cp__slab_alloc(cp__slab *s);
void cp__slab_free(cp__slab *s, void *obj);

/* Call fn(obj, arg) for every object handed out, with the slab locked (so none is freed
 * meanwhile; fn must not allocate from or free to this slab). */
void cp__slab_walk(cp__slab *s, void (*fn)(void *obj, void *arg), void *arg);

#endif
