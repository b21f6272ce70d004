/* The port's shared receive-buffer pool (zero-byte / pooled receives, I3).
 *
 * One anonymous mapping of `count` page-multiple buffers. Free buffers sit on a LIFO stack
 * so the hottest buffer is reused first and an idle server touches few pages; buffers
 * never handed out are never touched (they cost no RSS). The io_uring backend moves
 * buffers from this stack into its provided-buffer ring on demand.
 *
 * Free buffers that nobody took for a whole second (the bottom of the stack, below its low
 * watermark) give their pages back to the OS (MADV_DONTNEED), so RSS follows the load back
 * down after a burst, also when no traffic follows it (the poller then wakes for the
 * check); a trimmed buffer costs a page fault when it is next used. Buffers in steady
 * circulation are never trimmed, nor (io_uring) those sitting in the kernel's ring: the
 * kernel may write into any of them at any moment. The ring's target decays back to its
 * start (8 or 64 buffers) only as later refills find it has not run dry for 5 s, so after
 * a burst with no traffic following, the ring keeps what the burst grew it to (at most
 * half the pool) until traffic resumes. At most 256 buffers are trimmed per check, one
 * check a second.
 *
 * A buffer may hold several chunks of received data (io_uring fills its provided buffers
 * incrementally, one receive after the other, whatever the socket), so every buffer
 * counts references: one per chunk handed out and not released yet, plus the kernel's
 * hold (CP__REF_KERNEL, a bit of its own) while the kernel may still fill it. It goes back
 * to the free stack when the count drops to zero. Keeping the kernel's hold apart lets a
 * user's release that finds no chunk in the buffer be refused (a second release): counted
 * as one more reference, it would free a buffer that the kernel still fills.
 * A chunk is named by its byte offset in the mapping.
 *
 * Chunks a socket received but nobody has claimed yet (io_uring multishot) are chained per
 * socket through chunk records (offset, length, next), so a socket needs only one 32-bit
 * index for its backlog. The records come from blocks that are never moved or freed
 * before the pool is; a record is touched only under its socket's lock once allocated.
 * The free stack, the record free list and the starving list are guarded by the pool's
 * lock, the references are atomic.
 */
#ifndef CPORT_BUFPOOL_H
#define CPORT_BUFPOOL_H

#include "sync.h"
#include "cport/socket.h"

#include <stdbool.h>
#include <stdint.h>

#define CP__STASH_END 0xffffffffu
/* In a buffer's references: the kernel's hold (the low bits count chunks). */
#define CP__REF_KERNEL 0x80000000u
/* No chunk (an offset no chunk can have). */
#define CP__NO_CHUNK 0xffffffffu

/* A chunk waiting in a socket's backlog. */
typedef struct cp__chunk_rec {
    uint32_t off;  /* byte offset of the data in the pool's mapping */
    uint32_t len;  /* bytes */
    uint32_t next; /* next record of the socket's backlog, or CP__STASH_END */
    uint32_t tail; /* in the first record of a backlog: its last record */
    uint32_t n;    /* in the first record of a backlog: its records (the handle's
                      16-bit cp__nstash saturates; a backlog can hold more chunks) */
} cp__chunk_rec;

enum { CP__CHUNK_BLOCK = 4096, CP__CHUNK_BLOCKS = 256 };

typedef struct cp__bufpool {
    char *base;
    size_t map_len;
    uint32_t size;       /* bytes per buffer */
    uint32_t count;      /* buffers */
    uint32_t per_socket; /* most unclaimed chunks one socket may hold */
    bool packed;         /* the backend packs receives into shared buffers (set at init) */
    cp__lock lock;
    uint16_t *free_ids; /* LIFO stack of free buffer ids */
    uint32_t nfree;
    uint32_t trimmed;     /* free_ids[0..trimmed) hold no memory (given back to the OS) */
    uint32_t min_free;    /* lowest nfree since the last trim check */
    uint32_t puts;        /* puts since the last look at the clock */
    int64_t next_trim_ns; /* the next trim check (coarse monotonic clock) */
    int64_t trim_at;      /* atomic: next_trim_ns while resident free buffers beyond those
                             kept could be trimmed, else 0 (read by the poller) */
    uint32_t fresh;       /* ids >= fresh were never handed out */
    uint32_t *refs;       /* per buffer, atomic: references (see above) */
    uint32_t *filled;     /* per buffer: bytes the kernel has filled (io_uring backend only) */
    cp__chunk_rec *chunk_blocks[CP__CHUNK_BLOCKS]; /* records, CP__CHUNK_BLOCK a block */
    uint32_t chunk_free;                           /* free records (linked by `next`) */
    uint32_t chunk_cap;                            /* records in the blocks allocated */
    cp_handle **starving;                          /* handles waiting for a buffer, each pinned */
    uint32_t nstarving, cap_starving;
    uint64_t starved_total;
    uint32_t kick; /* atomic: waiting handles must be served by the next poll */
} cp__bufpool;

int cp__bufpool_init(cp__bufpool *bp, uint32_t count, uint32_t size, uint32_t per_socket);
void cp__bufpool_fini(cp__bufpool *bp);

static inline void *cp__bufpool_addr(const cp__bufpool *bp, uint16_t id)
{
    return bp->base + (size_t)id * bp->size;
}

/* Buffer id of an address inside the pool (anywhere in the buffer), or -1. */
int cp__bufpool_id(const cp__bufpool *bp, const void *addr);

/* Take a free buffer id (-1 if none); it comes with one chunk reference (the caller hands
 * the whole buffer over as one chunk). Thread-safe. */
int cp__bufpool_get(cp__bufpool *bp);
/* Give back a buffer that has no reference left (or the one a failed user of
 * cp__bufpool_get() holds). Returns true if handles are waiting for one (the caller then
 * serves them: cp__io_serve_starving). Thread-safe. */
bool cp__bufpool_put(cp__bufpool *bp, uint16_t id);
/* Take up to max free ids into ids[], each with the kernel's hold; returns how many. */
uint32_t cp__bufpool_get_many(cp__bufpool *bp, uint16_t *ids, uint32_t max);

/* One more chunk reference on a buffer that has a reference. Thread-safe. */
static inline void cp__bufpool_ref(cp__bufpool *bp, uint16_t id)
{
    __atomic_add_fetch(&bp->refs[id], 1, __ATOMIC_RELAXED);
}

/* The kernel's hold on a buffer becomes a chunk reference (its last chunk). */
static inline void cp__bufpool_pass(cp__bufpool *bp, uint16_t id)
{
    __atomic_sub_fetch(&bp->refs[id], CP__REF_KERNEL - 1, __ATOMIC_RELAXED);
}

/* Drop a chunk reference; the last reference gives the buffer back. Returns as
 * cp__bufpool_put() (false when references remain). Thread-safe. */
bool cp__bufpool_unref(cp__bufpool *bp, uint16_t id);
/* Drop the kernel's hold; as cp__bufpool_unref(). */
bool cp__bufpool_unhold(cp__bufpool *bp, uint16_t id);
/* A user's release of a chunk of buffer id: as cp__bufpool_unref(), or -EINVAL when the
 * buffer has no chunk handed out (a second release): nothing is changed then. Returns
 * 1 if handles are waiting for a buffer (see cp__bufpool_put()), else 0. */
int cp__bufpool_release(cp__bufpool *bp, uint16_t id);

/* When an idle port should look at the pool again (monotonic ns): the time of the next
 * trim check while free buffers that could be trimmed still hold memory, else 0. Releases
 * run the check themselves; a port that receives nothing runs it through its poller, which
 * waits at most until then (cp__bufpool_maintain). Lock-free. */
static inline int64_t cp__bufpool_trim_at(const cp__bufpool *bp)
{
    return __atomic_load_n(&bp->trim_at, __ATOMIC_RELAXED);
}
/* Run the trim check if it is due at `now` (cp__now_ns()). Thread-safe. */
void cp__bufpool_maintain(cp__bufpool *bp, int64_t now);

/* Register h as waiting for a buffer (the caller pinned it and set CP__H_STARVING).
 * Returns 0, -EAGAIN if a buffer is free after all (try again: a release that came
 * between the caller's look and this call saw nobody waiting), or -ENOMEM. */
int cp__bufpool_starve(cp__bufpool *bp, cp_handle *h);
/* Remove h from the waiting list; true if it was there (the caller then drops the pin). */
bool cp__bufpool_unstarve(cp__bufpool *bp, cp_handle *h);
/* Pop up to max waiting handles, as many as there are buffers to serve them: free ones
 * plus `elsewhere` (buffers the backend already handed to the kernel). Each stays pinned. */
uint32_t cp__bufpool_pop_starving(cp__bufpool *bp, cp_handle **out, uint32_t max,
                                  uint32_t elsewhere);

/* Per-socket backlog of received, unclaimed chunks (caller holds h's lock). A pushed chunk
 * keeps its buffer reference. Push returns 0, or -ENOMEM when no record can be had. */
int cp__stash_push(cp__bufpool *bp, cp_handle *h, uint32_t off, uint32_t len);
bool cp__stash_pop(cp__bufpool *bp, cp_handle *h, uint32_t *off, uint32_t *len);

#endif
