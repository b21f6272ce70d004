/* Lock-free bounded MPMC ring of posted completions (see ring.h). */
#include "ring.h"

#include "cport/port.h"

#include <errno.h>
#include <sys/mman.h>

int cp__ring_init(cp__ring *r, uint32_t capacity)
{
    r->map_len = (size_t)capacity * sizeof(cp__ring_slot);
    /* Zero pages: every slot free for lap 0, and no RSS until a slot is first used. */
    void *m = mmap(NULL, r->map_len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED)
        return -ENOMEM;
    r->slots = m;
    r->mask = capacity - 1;
    r->head = r->tail = 0;
    return 0;
}

void cp__ring_fini(cp__ring *r)
{
    if (r->slots)
        munmap(r->slots, r->map_len);
    r->slots = NULL;
}

int cp__ring_push(cp__ring *r, uintptr_t key, int64_t result, void *op)
{
    uint64_t pos = __atomic_load_n(&r->tail, __ATOMIC_RELAXED);
    cp__ring_slot *s;
    for (;;) {
        if (pos & CP__RING_SEALED)
            return -ESHUTDOWN; /* a failed CAS below reloads pos, so a seal is always seen */
        s = &r->slots[pos & r->mask];
        uint64_t seq = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        uint64_t lap = pos & ~r->mask;
        int64_t diff = (int64_t)(seq - lap);
        if (diff == 0) {
            if (__atomic_compare_exchange_n(&r->tail, &pos, pos + 1, true, __ATOMIC_SEQ_CST,
                                            __ATOMIC_RELAXED))
                break;
        } else if (diff < 0) {
            return -EAGAIN; /* the slot still holds last lap's entry: full */
        } else {
            pos = __atomic_load_n(&r->tail, __ATOMIC_RELAXED);
        }
    }
    s->key = key;
    s->result = result;
    s->op = op;
    __atomic_store_n(&s->seq, (pos & ~r->mask) + 1, __ATOMIC_RELEASE);
    return 0;
}

void cp__ring_seal(cp__ring *r)
{
    __atomic_fetch_or(&r->tail, CP__RING_SEALED, __ATOMIC_SEQ_CST);
}

unsigned cp__ring_pop(cp__ring *r, cp_completion *out, unsigned max)
{
    uint64_t pos = __atomic_load_n(&r->head, __ATOMIC_RELAXED);
    unsigned n;
    for (;;) {
        /* Count the consecutive full slots from pos, up to max, then claim them at once. */
        n = 0;
        bool moved = false;
        while (n < max) {
            uint64_t p = pos + n;
            cp__ring_slot *s = &r->slots[p & r->mask];
            uint64_t seq = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
            int64_t diff = (int64_t)(seq - ((p & ~r->mask) + 1));
            if (diff == 0) {
                n++;
                continue;
            }
            if (diff > 0 && n == 0)
                moved = true; /* another consumer took it: reload head */
            break;
        }
        if (n == 0 && !moved)
            return 0;
        if (n > 0 && __atomic_compare_exchange_n(&r->head, &pos, pos + n, true, __ATOMIC_SEQ_CST,
                                                 __ATOMIC_RELAXED))
            break;
        if (moved)
            pos = __atomic_load_n(&r->head, __ATOMIC_RELAXED);
    }
    for (unsigned i = 0; i < n; i++) {
        uint64_t p = pos + i;
        cp__ring_slot *s = &r->slots[p & r->mask];
        out[i].key = s->key;
        out[i].result = s->result;
        out[i].op = s->op;
        /* Free for the next lap. */
        __atomic_store_n(&s->seq, (p & ~r->mask) + r->mask + 1, __ATOMIC_RELEASE);
    }
    return n;
}
