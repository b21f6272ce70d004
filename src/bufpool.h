/* The port's shared receive-buffer pool (zero-byte / pooled receives, I3).
 *
 * One anonymous mapping of `count` page-multiple buffers. Free buffers sit on a LIFO stack
 * so the hottest buffer is reused first and an idle server touches few pages; buffers
 * never handed out are never touched (they cost no RSS). The io_uring backend moves
 * buffers from this stack into its provided-buffer ring on demand.
 *
 * Free buffers that nobody took for a whole second (the bottom of the stack, below its low
 * watermark) give their pages back to the OS (MADV_DONTNEED), so RSS follows the load back
 * down after a burst; a trimmed buffer costs a page fault when it is next used. Buffers in
 * steady circulation are never trimmed.
 *
 * Buffers a socket received but nobody has claimed yet (io_uring multishot) are chained
 * per socket through chunk_next/chunk_len, indexed by buffer id, so a socket needs only
 * two 16-bit ids for its backlog. Those arrays are guarded by the owning handle's lock;
 * the free stack and the starving list by the pool's lock.
 */
#ifndef CPORT_BUFPOOL_H
#define CPORT_BUFPOOL_H

#include "sync.h"
#include "cport/socket.h"

#include <stdbool.h>
#include <stdint.h>

#define CP__STASH_END 0xffffu

typedef struct cp__bufpool {
    char *base;
    size_t map_len;
    uint32_t size;       /* bytes per buffer */
    uint32_t count;      /* buffers */
    uint32_t per_socket; /* most unclaimed buffers one socket may hold */
    cp__lock lock;
    uint16_t *free_ids; /* LIFO stack of free buffer ids */
    uint32_t nfree;
    uint32_t trimmed; /* free_ids[0..trimmed) hold no memory (given back to the OS) */
    uint32_t min_free;   /* lowest nfree since the last trim check */
    uint32_t puts;       /* puts since the last look at the clock */
    int64_t next_trim_ns; /* the next trim check (coarse monotonic clock) */
    uint32_t fresh;   /* ids >= fresh were never handed out */
    uint16_t *chunk_next;
    uint32_t *chunk_len;
    cp_handle **starving; /* handles waiting for a buffer, each pinned */
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

/* Buffer id of an address inside the pool, or -1. */
int cp__bufpool_id(const cp__bufpool *bp, const void *addr);

/* Take a free buffer id (-1 if none). Thread-safe. */
int cp__bufpool_get(cp__bufpool *bp);
/* Give a buffer back. Returns true if handles are waiting for one (the caller then serves
 * them: cp__io_serve_starving). Thread-safe. */
bool cp__bufpool_put(cp__bufpool *bp, uint16_t id);
/* Take up to max free ids into ids[]; returns how many. Thread-safe. */
uint32_t cp__bufpool_get_many(cp__bufpool *bp, uint16_t *ids, uint32_t max);

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

/* Per-socket backlog of received, unclaimed buffers (caller holds h's lock). */
void cp__stash_push(cp__bufpool *bp, cp_handle *h, uint16_t id, uint32_t len);
bool cp__stash_pop(cp__bufpool *bp, cp_handle *h, uint16_t *id, uint32_t *len);

#endif
