/* Internal view of the completion port, shared by port.c, the socket layer and the
 * backends. See cport/port.h for the semantics. */
#ifndef CPORT_PORT_INTERNAL_H
#define CPORT_PORT_INTERNAL_H

#include "backend.h"
#include "bufpool.h"
#include "ring.h"
#include "sync.h"
#include "timer_heap.h"

#include <assert.h>
#include <pthread.h>
#include <stdbool.h>

/* One record per thread that ever dequeued from the port. */
typedef struct cp__thread {
    struct cp__thread *next_parked; /* LIFO stack of parked threads */
    struct cp__thread *next_wake;   /* list of threads to wake after unlocking */
    struct cp__thread *prev, *next; /* every record of the port */
    cp_port *port;
    uint32_t futex;      /* 0 while parked, 1 once woken */
    bool running;        /* counted in port->running */
    unsigned since_poll; /* completions taken since this thread last polled the backend */
    uint64_t dequeued;   /* completions handed to this thread (atomic, for stats) */
    bool blocked;        /* between cp_port_block_begin() and _end() */
    bool parked;         /* on the parked stack */
    unsigned want;       /* capacity of hand[] while parked */
    unsigned nhand;      /* completions handed over while parked */
    cp_completion *hand;
} cp__thread;

struct cp_port {
    /* Read on every post and dequeue, written rarely. */
    unsigned concurrency;
    bool closed;   /* atomic */
    cp__ring ring; /* posted completions: lock-free */

    /* Everything below is written under `lock` (some fields are also read without it,
     * atomically, by the lock-free paths). */
    _Alignas(64) cp__lock lock;
    unsigned running;     /* atomic: threads released and not back in dequeue */
    unsigned nparked;     /* atomic: threads on the parked stack */
    unsigned nwaiting;    /* threads inside dequeue: parked or polling */
    bool polling;         /* atomic: a thread holds the poller role */
    bool wake_sent;       /* atomic: the current poll has already been woken */
    cp__thread *poller;   /* ...and this is its record (atomic) */
    cp__thread *parked;   /* top of the LIFO stack */
    cp_op *qhead, *qtail; /* FIFO of completed I/O operations */
    uint64_t io_queued;   /* atomic: length of that FIFO */
    /* The poller's harvest: from the moment its wait in the kernel returns until it has
     * collected what completed, the completions stay in the poller's own list and reach the
     * FIFO in one go, so a batch costs one lock, not one per handle. Each handle with
     * completions in the harvest is stamped with harvest_gen (cp_handle.cp__hgen); another
     * thread that completes an operation of a stamped handle meanwhile queues it on `late`,
     * which follows the harvest, so that a handle's completions still reach the FIFO in
     * the order they finished. The harvest never spans a wait: a completion put on `late`
     * waits only for the poller to finish collecting. */
    uint32_t harvest_gen; /* atomic; bumped when a harvest begins */
    bool harvesting;      /* atomic: set by the poller when its wait returns, cleared under
                             the lock when the harvest is queued */
    cp__oplist late;

    pthread_key_t tkey;
    cp__thread *threads;

    uint32_t io_handles;       /* atomic: associated handles; with none, no thread polls */
    uint64_t completed;        /* I/O completions queued, ever */
    uint64_t wakeups;          /* parked threads woken, ever */
    uint64_t polls;            /* backend polls, ever */
    uint64_t cq_overflows;     /* atomic: times the kernel's completion queue overflowed */
    bool cq_dropped;           /* atomic: the kernel dropped completions (-EBADR) */
    uint64_t dequeued_by_gone; /* dequeued by threads whose records were freed */

    /* Per-operation timeouts: a heap of (deadline, op) guarded by its own lock, taken
     * after a handle's lock, never before. */
    _Alignas(64) cp__lock timer_lock;
    cp__timer_heap timers;

    cp__bufpool pool;     /* shared receive buffers (pooled receives) */
    cp_port_options opts; /* resolved: every default filled in */

    const cp__backend *be;
    void *be_data;
};

/* Queue completed operations of one handle whose cp__hgen is `hgen` (read under the
 * handle's lock), and release waiters or wake the poller as the concurrency limit allows.
 * Any thread except the poller during its harvest (which keeps them in its list); takes
 * the port lock. Returns true if they went on the late list (the handle has completions
 * in the running harvest): the caller marks the handle CP__H_LATE. */
bool cp__port_complete_handle(cp_port *port, cp__oplist *list, uint8_t hgen);

/* The poller, during its harvest: queue a handle's completions on the late list (they
 * follow completions of the same handle that other threads put there). */
void cp__port_complete_late(cp_port *port, cp__oplist *list);

/* Queue op (op->cp__h set) at the end of the completed I/O operations, outside its
 * handle's order: for an op whose handle has nothing else in flight. Any thread; cannot
 * fail (the op is the queue's node: no allocation, no bounded ring), so a caller whose
 * work must reach a worker never has to run it itself. */
void cp__port_complete_op(cp_port *port, cp_op *op);

/* The generation of the poller's current harvest (only the poller calls this while
 * harvesting, so the value is stable for it). */
static inline uint8_t cp__port_harvest_gen(cp_port *port)
{
    return (uint8_t)__atomic_load_n(&port->harvest_gen, __ATOMIC_RELAXED);
}

/* Take up to max completions queued on a closed port without a thread record, for the
 * one thread left using it (cp_pool_destroy() once its workers are joined, when that
 * thread's record cannot be made: cp_port_dequeue() says -ENOMEM). Returns how many. */
unsigned cp__port_take_closed(cp_port *port, cp_completion *out, unsigned max);

/* True if work the calling thread defers (io_uring submissions) will be flushed without
 * help: the thread is running work it dequeued from `port` (it will come back to dequeue)
 * or it is the port's poller right now. Lock-free. */
bool cp__port_caller_defers(cp_port *port);

/* True if a thread holds the poller role right now (it may be blocked in the kernel). */
static inline bool cp__port_polling(cp_port *port)
{
    return __atomic_load_n(&port->polling, __ATOMIC_ACQUIRE);
}

/* The poller is back from its wait in the kernel (called by the backend's poll() right
 * after the wait returns, before it completes anything):
 *   - nobody needs to wake it any more, since it looks at the queues before it polls
 *     again (without this, the completions it harvests itself would each ask to wake it:
 *     a write to the wake-up eventfd and, on io_uring, one more completion to reap);
 *   - its harvest begins (see cp_port.harvesting). */
static inline void cp__port_poller_awake(cp_port *port)
{
    /* One generation per harvest, from its start to its end (see cp_port.late): a harvest
     * begins only after the previous one was queued. */
    assert(!__atomic_load_n(&port->harvesting, __ATOMIC_RELAXED));
    __atomic_store_n(&port->wake_sent, true, __ATOMIC_SEQ_CST);
    __atomic_store_n(&port->harvest_gen, port->harvest_gen + 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&port->harvesting, true, __ATOMIC_SEQ_CST);
}

/* A handle was associated with / released from the port. */
void cp__port_handle_added(cp_port *port);
void cp__port_handle_removed(cp_port *port);

/* Socket layer hooks called by the port (socket.c; the one that fills a completion,
 * cp__op_to_completion(), is inline in handle.h). */
/* Earliest per-operation deadline (absolute ns), or -1. */
int64_t cp__io_next_deadline(cp_port *port);
/* Cancel every operation whose deadline is <= now. */
void cp__io_expire(cp_port *port, int64_t now);
/* Pool buffers came back: refill the backend and resume handles waiting for one. */
void cp__io_serve_starving(cp_port *port);

#endif
