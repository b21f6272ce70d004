/* Internal view of the completion port, shared by port.c, the socket layer and the
 * backends. See cport/port.h for the semantics. */
#ifndef CPORT_PORT_INTERNAL_H
#define CPORT_PORT_INTERNAL_H

#include "backend.h"
#include "bufpool.h"
#include "sync.h"
#include "timer_heap.h"

#include <pthread.h>
#include <stdbool.h>

/* Internal opcode marking a posted packet in the queue (never visible to callers). */
#define CP__OP_PACKET 0xff

/* A posted completion: a cp_op header (so it can sit in the same queue as I/O
 * operations) plus the posted key and result; the posted pointer lives in op.u.buf. */
typedef struct cp__packet {
    cp_op op;
    uintptr_t key;
    int64_t result;
} cp__packet;

/* One record per thread that ever dequeued from the port. */
typedef struct cp__thread {
    struct cp__thread *next_parked; /* LIFO stack of parked threads */
    struct cp__thread *next_wake;   /* list of threads to wake after unlocking */
    struct cp__thread *prev, *next; /* every record of the port */
    cp_port *port;
    uint32_t futex;     /* 0 while parked, 1 once woken */
    bool running;       /* counted in port->running */
    bool blocked;       /* between cp_port_block_begin() and _end() */
    bool parked;        /* on the parked stack */
    unsigned want;      /* capacity of hand[] while parked */
    unsigned nhand;     /* completions handed over while parked */
    cp_completion *hand;
} cp__thread;

struct cp_port {
    cp__lock lock; /* protects everything below that is not marked otherwise */
    unsigned concurrency;
    unsigned running;
    unsigned nparked;
    unsigned nwaiting; /* threads inside dequeue: parked or polling */
    bool closed;
    bool polling;   /* a thread holds the poller role */
    cp__thread *poller; /* ...and this is its record (atomic) */
    bool wake_sent; /* the current poll has already been woken */

    cp_op *qhead, *qtail; /* FIFO of completed operations and packets */
    uint64_t queued;      /* read without the lock by spinners (atomic) */
    unsigned since_poll;  /* completions taken since the backend was last polled */
    cp__thread *parked;   /* top of the LIFO stack */

    cp__packet *free_packets;
    void *packet_blocks; /* singly linked blocks of packets, for destroy */
    uint32_t posted_queued;
    uint32_t max_posted;

    pthread_key_t tkey;
    cp__thread *threads;

    uint32_t io_handles; /* associated handles (atomic); with none, no thread polls */

    /* Per-operation timeouts: a heap of (deadline, op) guarded by its own lock, taken
     * after a handle's lock, never before. */
    cp__lock timer_lock;
    cp__timer_heap timers;

    cp__bufpool pool; /* shared receive buffers (pooled receives) */

    cp_port_stats stats;
    cp_port_options opts; /* resolved: every default filled in */

    const cp__backend *be;
    void *be_data;
};

/* Queue completed operations (from a backend or the socket layer) and release waiters or
 * wake the poller as the concurrency limit allows. Any thread; takes the port lock. */
void cp__port_complete(cp_port *port, cp_op *op);
void cp__port_complete_list(cp_port *port, cp__oplist *list);

/* True if work the calling thread defers (io_uring submissions) will be flushed without
 * help: the thread is running work it dequeued from `port` (it will come back to dequeue)
 * or it is the port's poller right now. Lock-free. */
bool cp__port_caller_defers(cp_port *port);

/* True if a thread holds the poller role right now (it may be blocked in the kernel). */
static inline bool cp__port_polling(cp_port *port)
{
    return __atomic_load_n(&port->polling, __ATOMIC_ACQUIRE);
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
