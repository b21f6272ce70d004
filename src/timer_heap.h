/* A binary min-heap of deadlines. Each entry points at the slot where its owner keeps its
 * position (index + 1; 0 = not in the heap), so an owner can be removed in O(log n) when
 * it finishes before its deadline. Used for per-operation timeouts (owner: cp_op, slot:
 * cp__tidx) and for the thread pool's timers. Not thread-safe: owners guard it with a
 * lock. The array only grows, so steady state allocates nothing. */
#ifndef CPORT_TIMER_HEAP_H
#define CPORT_TIMER_HEAP_H

#include <stdint.h>

typedef struct cp__timer_entry {
    int64_t deadline;
    void *owner;
    uint32_t *slot;
} cp__timer_entry;

typedef struct cp__timer_heap {
    cp__timer_entry *v;
    uint32_t n;
    uint32_t cap;
} cp__timer_heap;

/* Insert owner (position kept in *slot) with the given deadline. Returns 0 or -ENOMEM. */
int cp__heap_push(cp__timer_heap *h, void *owner, uint32_t *slot, int64_t deadline);
/* Remove the entry whose position is kept in *slot, if it is in the heap. */
void cp__heap_remove(cp__timer_heap *h, uint32_t *slot);
/* The entry with the smallest deadline, or NULL. */
static inline const cp__timer_entry *cp__heap_top(const cp__timer_heap *h)
{
    return h->n ? &h->v[0] : (const cp__timer_entry *)0;
}
void cp__heap_free(cp__timer_heap *h);

#endif
