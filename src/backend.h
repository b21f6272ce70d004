/* The internal contract between the completion port (and the socket layer) and an I/O
 * backend. There are two implementations, one file each: backend_io_uring.c and
 * backend_epoll.c. Nothing above this contract knows which one runs.
 *
 * Threading: poll() is called by one thread at a time (the port's poller); every other
 * entry point may be called from any thread, concurrently with poll().
 */
#ifndef CPORT_BACKEND_H
#define CPORT_BACKEND_H

#include "cport/port.h"
#include "cport/socket.h"

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>

/* A FIFO of completed operations handed from a backend to the port. */
typedef struct cp__oplist {
    cp_op *head;
    cp_op *tail;
    unsigned n;
    unsigned flags;  /* socket layer bookkeeping (e.g. pool buffers were freed) */
    cp_op *close_op; /* socket layer: a close completion to queue once its handle is unlocked */
    /* Socket layer, harvest only: the tail and count when the current handle was locked,
     * so that its own completions can be told from the other handles' before them. */
    cp_op *mark;
    unsigned mark_n;
} cp__oplist;

static inline void cp__oplist_push(cp__oplist *l, cp_op *op)
{
    op->cp__next = NULL;
    if (l->tail)
        l->tail->cp__next = op;
    else
        l->head = op;
    l->tail = op;
    l->n++;
}

/* Take the last op off l (the list is short: walks it). */
static inline void cp__oplist_pop_tail(cp__oplist *l)
{
    cp_op *prev = NULL;
    for (cp_op *op = l->head; op != l->tail; op = op->cp__next)
        prev = op;
    if (prev)
        prev->cp__next = NULL;
    else
        l->head = NULL;
    l->tail = prev;
    l->n--;
}

/* cp__oplist.flags: pool buffers went back to the pool while collecting the list. */
#define CP__OPLIST_POOL_FREED 1u
/* cp__oplist.flags: the list is the poller's harvest (see cp_port.harvesting): the socket
 * layer leaves completions on it instead of queueing them on the port. */
#define CP__OPLIST_HARVEST 2u

/* Result of starting an operation in the kernel. */
/* A step could not go on because the socket is full (transmit engine). */
#define CP__AGAIN (INT_MIN + 1)

/* The backend will report the result later. Not a possible result: those are byte
 * counts (>= 0, at most INT_MAX per step) or negative errno values (> -4096). */
#define CP__PENDING INT_MIN

typedef struct cp__backend {
    const char *name;
    cp_backend_kind kind;
    /* Probe and set up the backend for `port`; store private state in port->be_data.
     * Returns 0 or a negative errno (-EPERM, -ENOSYS, -EOPNOTSUPP when unavailable). */
    int (*init)(cp_port *port, const cp_port_options *opts);
    /* Release everything init() acquired. */
    void (*fini)(cp_port *port);
    /* Wait until an I/O event arrives, the deadline passes (absolute CLOCK_MONOTONIC ns;
     * < 0 = none; 0 = do not block) or wake() is called. Then call cp__port_poller_awake()
     * (always, before completing anything) and push every operation that completed onto
     * *done. Returns 0 or a negative errno other than timeouts. */
    int (*poll)(cp_port *port, int64_t deadline_ns, cp__oplist *done);
    /* Make a concurrent poll() return soon. Async-signal-safe. */
    void (*wake)(cp_port *port);
    /* Hand work deferred by start() to the kernel now (io_uring batches submissions until
     * the next poll). NULL if the backend never defers. */
    void (*flush)(cp_port *port);
    /* Pool buffers were given back: refill whatever the kernel draws from. Returns how
     * many buffers the kernel can draw from now (0 if it draws from nothing). May be NULL. */
    uint32_t (*pool_refill)(cp_port *port);
    /* Pooled receives keep receiving in the background once armed (io_uring multishot): a
     * plain receive must not be queued behind one. */
    bool pool_background;
    /* TransmitFile's file leg: move up to len bytes of file fd from offset to the socket,
     * updating t->cp__off (file bytes consumed), t->sent (bytes handed to the socket) and
     * whatever state the leg keeps; returns 0 (progress made: call again), CP__AGAIN (the
     * socket is full) or a negative errno. Called with the handle's lock held. */
    int (*file_leg)(cp_handle *h, cp_transmit_op *t, int fd, int64_t offset, uint64_t len);
    /* A transmit ended (finished, failed or cancelled): release what the leg holds. */
    void (*transmit_done)(cp_transmit_op *t);
    /* Stop the handle's background pooled receive (io_uring multishot) because the socket
     * holds its share of buffers; its end is reported through cp__io_chunk(more=false).
     * Called with the handle's lock held. */
    void (*pool_stop)(cp_handle *h);

    /* Register a handle's fd (called from cp_socket_associate). */
    int (*attach)(cp_handle *h);
    /* The handle is closing: drop kernel registrations. Kernel requests still in flight
     * must be cancelled; each reports its result through cp__io_done() as usual. */
    void (*detach)(cp_handle *h);
    /* Start `op` (already at the head of its handle's queue) in the kernel. Returns
     * CP__PENDING, or the result (>= 0 bytes, or a negative errno) if it finished at once.
     * Called with the handle's lock held. */
    int (*start)(cp_op *op);
    /* The server's immediate send (cp__send_try): send iov[0..iovcnt-1] (len bytes) now
     * without blocking. Returns the bytes sent, or a negative errno (-EAGAIN: no room).
     * Called with the handle's lock held and nothing queued to send. May be NULL. */
    long (*try_send)(cp_handle *h, const struct iovec *iov, int iovcnt, size_t len);
    /* Abandon a started operation. Returns 0 if nothing in the kernel refers to it any
     * more (the caller completes it with -ECANCELED now), or CP__PENDING if the kernel
     * will report its end through cp__io_done()/cp__io_firstdata() (typically -ECANCELED).
     * Called with the handle's lock held. */
    int (*cancel)(cp_op *op);
} cp__backend;

extern const cp__backend cp__backend_io_uring;
extern const cp__backend cp__backend_epoll;

#endif
