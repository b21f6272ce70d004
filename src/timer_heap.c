/* Binary min-heap of deadlines (see timer_heap.h). */
#include "timer_heap.h"

#include <errno.h>
#include <stdlib.h>

static void place(cp__timer_heap *h, uint32_t i, cp__timer_entry e)
{
    h->v[i] = e;
    *e.slot = i + 1;
}

static void sift_up(cp__timer_heap *h, uint32_t i)
{
    cp__timer_entry e = h->v[i];
    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (h->v[parent].deadline <= e.deadline)
            break;
        place(h, i, h->v[parent]);
        i = parent;
    }
    place(h, i, e);
}

static void sift_down(cp__timer_heap *h, uint32_t i)
{
    cp__timer_entry e = h->v[i];
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= h->n)
            break;
        if (c + 1 < h->n && h->v[c + 1].deadline < h->v[c].deadline)
            c++;
        if (e.deadline <= h->v[c].deadline)
            break;
        place(h, i, h->v[c]);
        i = c;
    }
    place(h, i, e);
}

int cp__heap_push(cp__timer_heap *h, void *owner, uint32_t *slot, int64_t deadline)
{
    if (h->n == h->cap) {
        /* Positions are kept as index + 1 in 32 bits: 2^31 entries is as far as doubling
         * goes (once more would wrap to 0, and realloc(v, 0) would free the array). */
        if (h->cap >= UINT32_C(1) << 31)
            return -ENOMEM;
        uint32_t cap = h->cap ? h->cap * 2 : 64;
        cp__timer_entry *v = realloc(h->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        h->v = v;
        h->cap = cap;
    }
    h->v[h->n] = (cp__timer_entry){deadline, owner, slot};
    sift_up(h, h->n++);
    return 0;
}

void cp__heap_remove(cp__timer_heap *h, uint32_t *slot)
{
    if (*slot == 0)
        return;
    uint32_t i = *slot - 1;
    *slot = 0;
    if (--h->n == i)
        return;
    h->v[i] = h->v[h->n];
    if (i > 0 && h->v[i].deadline < h->v[(i - 1) / 2].deadline)
        sift_up(h, i);
    else
        sift_down(h, i);
}

void cp__heap_free(cp__timer_heap *h)
{
    free(h->v);
    h->v = NULL;
    h->n = h->cap = 0;
}
