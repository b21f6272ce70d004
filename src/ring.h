/* A bounded multi-producer multi-consumer ring of posted completions, lock-free.
 *
 * Each slot carries a sequence word that says whether it is free or full for the current
 * lap of the ring (after Vyukov's bounded queue). The word is stored relative to the
 * slot's index, so that all-zero memory means "every slot free for lap 0": the ring is an
 * anonymous mapping that costs nothing until slots are first used.
 *
 *   slot free for the lap starting at position L:  seq == L
 *   slot full, written at position L + i:          seq == L + 1
 *
 * Producers claim a position with a CAS on `tail`, consumers with a CAS on `head`; head
 * and tail live on their own cache lines. A batch pop claims several positions with one
 * CAS.
 */
#ifndef CPORT_RING_H
#define CPORT_RING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cp__ring_slot {
    uint64_t seq;
    uintptr_t key;
    int64_t result;
    void *op;
} cp__ring_slot;

typedef struct cp__ring {
    cp__ring_slot *slots;
    uint64_t mask;
    size_t map_len;
    _Alignas(64) uint64_t tail; /* next position to write, total ever pushed; | CP__RING_SEALED */
    _Alignas(64) uint64_t head; /* next position to read; total ever popped */
} cp__ring;

/* Set in `tail` by cp__ring_seal(): no push succeeds after it. Positions never reach it
 * (2^63 pushes). */
#define CP__RING_SEALED (UINT64_C(1) << 63)

/* capacity must be a power of two, at least 2 (with 1, "full" and "free for the next
 * lap" are the same sequence value). Returns 0 or -ENOMEM. */
int cp__ring_init(cp__ring *r, uint32_t capacity);
void cp__ring_fini(cp__ring *r);

/* Append one entry. Returns 0, -EAGAIN if the ring is full, or -ESHUTDOWN once the ring
 * is sealed. */
int cp__ring_push(cp__ring *r, uintptr_t key, int64_t result, void *op);

/* Refuse every later push. A push either claimed its position before the seal (and is
 * counted by cp__ring_count() from now on, even while its slot is still being written) or
 * fails with -ESHUTDOWN: the port's close uses this so that no post can succeed after
 * its waiters have been told that nothing is left. */
void cp__ring_seal(cp__ring *r);

/* Remove up to max entries in FIFO order into keys/results/ops via the callback-free
 * layout below. Returns how many (0 if empty). */
struct cp_completion;
unsigned cp__ring_pop(cp__ring *r, struct cp_completion *out, unsigned max);

/* Entries pushed and not yet popped (a snapshot; may be stale at once). */
static inline uint64_t cp__ring_count(cp__ring *r)
{
    uint64_t head = __atomic_load_n(&r->head, __ATOMIC_SEQ_CST);
    uint64_t tail = __atomic_load_n(&r->tail, __ATOMIC_SEQ_CST) & ~CP__RING_SEALED;
    return tail - head;
}

#endif
