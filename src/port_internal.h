/* Internal view of the completion port, shared by port.c, the socket layer and the
 * backends. See cport/port.h for the semantics. */
#ifndef CPORT_PORT_INTERNAL_H
#define CPORT_PORT_INTERNAL_H

#include "backend.h"
#include "bufpool.h"
#include "ring.h"
#include "sync.h"
#include "timer_heap.h"

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
    /* Completions this thread produced itself while running (e.g. an epoll send that
     * finished inside the call): it takes them on its next dequeue without the port's
     * lock. Only its own thread touches them; they move to the shared queue whenever the
     * thread stops running (blocks, yields its slot, exits). */
    cp_op *lhead, *ltail;
    uint64_t dequeued; /* completions handed to this thread (atomic, for stats) */
    bool blocked;      /* between cp_port_block_begin() and _end() */
    bool parked;       /* on the parked stack */
    unsigned want;     /* capacity of hand[] while parked */
    unsigned nhand;    /* completions handed over while parked */
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

    pthread_key_t tkey;
    cp__thread *threads;

    uint32_t io_handles;       /* atomic: associated handles; with none, no thread polls */
    uint64_t completed;        /* I/O completions queued, ever */
    uint64_t wakeups;          /* parked threads woken, ever */
    uint64_t polls;            /* backend polls, ever */
    uint64_t cq_overflows;     /* atomic: times the kernel's completion queue overflowed */
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

/* Queue completed operations (from a backend or the socket layer) and release waiters or
 * wake the poller as the concurrency limit allows. Any thread; takes the port lock. */
void cp__port_complete(cp_port *port, cp_op *op);
void cp__port_complete_list(cp_port *port, cp__oplist *list);
/* The same, but completions produced by a thread that is running work from this port
 * stay with that thread (see cp__thread.lhead). */
void cp__port_complete_from_caller(cp_port *port, cp__oplist *list);

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
 * after the wait returns): from now on nobody needs to wake it, since it looks at the
 * queues before it polls again. Without this, the completions it harvests itself would
 * each ask to wake it: a write to the wake-up eventfd and, on io_uring, one more
 * completion to reap, on every poll. */
static inline void cp__port_poller_awake(cp_port *port)
{
    __atomic_store_n(&port->wake_sent, true, __ATOMIC_SEQ_CST);
}

/* A handle was associated with / released from the port. */
void cp__port_handle_added(cp_port *port);
void cp__port_handle_removed(cp_port *port);

/* Socket layer hooks called by the port (socket.c). */
/* Fill a completion for a finished operation; called under the port lock. */
void cp__op_to_completion(cp_op *op, cp_completion *c);
/* Earliest per-operation deadline (absolute ns), or -1. */
int64_t cp__io_next_deadline(cp_port *port);
/* Cancel every operation whose deadline is <= now. */
void cp__io_expire(cp_port *port, int64_t now);
/* Pool buffers came back: refill the backend and resume handles waiting for one. */
void cp__io_serve_starving(cp_port *port);

#endif
