/* Lookaside slabs (see lookaside.h). */
#include "lookaside.h"
#include "inject.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

enum { CHUNK_BYTES = CP__SLAB_CHUNK };

struct cp__chunk {
    cp__chunk *next;
    char *objs;      /* first object */
    size_t cap;      /* objects that fit */
    size_t carved;   /* objects handed out at least once */
    uint64_t live[]; /* bitmap: handed out now */
};

/* A chunk holding one object: its header and a one-word bitmap fit in the 64 bytes in
 * front of the object (see new_chunk). */
_Static_assert(sizeof(cp__chunk) + sizeof(uint64_t) <= CP__SLAB_CHUNK - CP__SLAB_MAX_OBJECT,
               "a chunk's header must leave room for its largest object");

int cp__slab_init(cp__slab *s, size_t size)
{
    memset(s, 0, sizeof(*s));
    cp__lock_init(&s->lock);
    /* Bigger objects would fit no chunk: new_chunk would carve one past its end. */
    if (size > CP__SLAB_MAX_OBJECT)
        return -EINVAL;
    s->size = size < 16 ? 16 : (size + 15) & ~(size_t)15;
    return 0;
}

void cp__slab_fini(cp__slab *s)
{
    cp__chunk *c = s->chunks;
    while (c) {
        cp__chunk *next = c->next;
        munmap(c, CHUNK_BYTES);
        c = next;
    }
    s->chunks = NULL;
    s->free = NULL;
}

/* Chunks are aligned to their size, so an object finds its chunk by masking. */
static cp__chunk *chunk_of(void *obj)
{
    return (cp__chunk *)((uintptr_t)obj & ~((uintptr_t)CHUNK_BYTES - 1));
}

static void mark(cp__chunk *c, size_t i, bool on)
{
    if (on)
        c->live[i / 64] |= (uint64_t)1 << (i % 64);
    else
        c->live[i / 64] &= ~((uint64_t)1 << (i % 64));
}

static cp__chunk *new_chunk(cp__slab *s)
{
    /* Map twice the size and keep the aligned middle. */
    char *m =
        mmap(NULL, 2 * CHUNK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    char *a = (char *)(((uintptr_t)m + CHUNK_BYTES - 1) & ~((uintptr_t)CHUNK_BYTES - 1));
    if (a > m)
        munmap(m, (size_t)(a - m));
    if (a + CHUNK_BYTES < m + 2 * CHUNK_BYTES)
        munmap(a + CHUNK_BYTES, (size_t)(m + 2 * CHUNK_BYTES - (a + CHUNK_BYTES)));
    cp__chunk *c = (cp__chunk *)a;
    /* Header plus bitmap, then objects from the next 64-byte boundary. */
    size_t cap = (CHUNK_BYTES - sizeof(*c)) / s->size;
    size_t head = (sizeof(*c) + (cap + 63) / 64 * 8 + 63) & ~(size_t)63;
    cap = (CHUNK_BYTES - head) / s->size;
    c->objs = (char *)c + head;
    c->cap = cap;
    c->carved = 0;
    c->next = s->chunks;
    s->chunks = c;
    __atomic_add_fetch(&s->allocations, 1, __ATOMIC_RELAXED);
    return c;
}

/* One object, or NULL (lock held). */
static void *alloc_locked(cp__slab *s)
{
    void *obj = s->free;
    cp__chunk *c;
    if (obj) {
        s->free = *(void **)obj;
        c = chunk_of(obj);
    } else {
        c = s->chunks;
        if (!c || c->carved == c->cap)
            c = CP__INJECT_FAIL("slab_grow") ? NULL : new_chunk(s); /* (not reserve's) */
        if (!c)
            return NULL;
        obj = c->objs + c->carved++ * s->size;
    }
    mark(c, (size_t)((char *)obj - c->objs) / s->size, true);
    __atomic_store_n(&s->live, s->live + 1, __ATOMIC_RELAXED);
    return obj;
}

static void free_locked(cp__slab *s, void *obj)
{
    cp__chunk *c = chunk_of(obj);
    mark(c, (size_t)((char *)obj - c->objs) / s->size, false);
    *(void **)obj = s->free;
    s->free = obj;
    __atomic_store_n(&s->live, s->live - 1, __ATOMIC_RELAXED);
}

int cp__slab_reserve(cp__slab *s)
{
    cp__lock_acquire(&s->lock);
    int r = s->chunks || new_chunk(s) ? 0 : -ENOMEM;
    cp__lock_release(&s->lock);
    return r;
}

void *cp__slab_alloc(cp__slab *s)
{
    cp__lock_acquire(&s->lock);
    void *obj = alloc_locked(s);
    cp__lock_release(&s->lock);
    return obj;
}

void cp__slab_free(cp__slab *s, void *obj)
{
    cp__lock_acquire(&s->lock);
    free_locked(s, obj);
    cp__lock_release(&s->lock);
}

unsigned cp__slab_alloc_many(cp__slab *s, void **objs, unsigned n)
{
    unsigned got = 0;
    cp__lock_acquire(&s->lock);
    /* Free objects only, beyond the first: filling a cache never makes the slab grow. */
    while (got < n && s->free)
        objs[got++] = alloc_locked(s);
    if (got == 0 && (objs[0] = alloc_locked(s)) != NULL)
        got = 1;
    cp__lock_release(&s->lock);
    return got;
}

void cp__slab_free_many(cp__slab *s, void *const *objs, unsigned n)
{
    cp__lock_acquire(&s->lock);
    for (unsigned i = 0; i < n; i++)
        free_locked(s, objs[i]);
    cp__lock_release(&s->lock);
}

void cp__slab_walk(cp__slab *s, void (*fn)(void *obj, void *arg), void *arg)
{
    cp__lock_acquire(&s->lock);
    for (cp__chunk *c = s->chunks; c; c = c->next)
        for (size_t w = 0; w * 64 < c->carved; w++) {
            uint64_t bits = c->live[w];
            while (bits) {
                size_t i = w * 64 + (size_t)__builtin_ctzll(bits);
                bits &= bits - 1;
                fn(c->objs + i * s->size, arg);
            }
        }
    cp__lock_release(&s->lock);
}
