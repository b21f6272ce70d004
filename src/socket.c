/* Overlapped socket operations, backend-neutral: per-handle queues, the operation state
 * machine, cancel, close, pooled receives and per-operation timeouts.
 *
 * Every handle keeps two FIFO queues: receives (and accepts) and sends (and connects,
 * disconnects). Only the head of a queue is started in the kernel; when it finishes the
 * next one starts. That single rule gives in-order filling of several outstanding
 * receives, in-order and never-interleaved sends, and lets the library continue short
 * writes, on both backends. (A listener's send queue instead holds accepts that already
 * took their connection and wait for its first data; those run independently.)
 *
 * The backend runs one step of an operation at a time (backend.h: start); step_locked()
 * decides whether the op is finished or needs another step. An op finishes exactly once,
 * in finish_locked(), which queues its completion.
 *
 * Lock order: handle lock, then the port's timer lock or the port lock or the pool lock.
 * The port never takes a handle lock.
 */
#include "handle.h"
#include "inject.h"
#include "sys.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum {
    OPLIST_POOL_FREED = CP__OPLIST_POOL_FREED,
    MAX_EXPIRE_BATCH = 64,
};

static const cp__backend *be_of(const cp_handle *h)
{
    return h->cp__port->be;
}

/* Lock h; in a harvest, note where h's own completions will begin. */
static void lock_collect(cp_handle *h, cp__oplist *done)
{
    cp__h_lock(h);
    done->mark = done->tail;
    done->mark_n = done->n;
}

/* In the poller's harvest: whether h's completions must follow the late list (another
 * thread queued some of h's there during this harvest). */
static bool harvest_late(const cp_handle *h)
{
    return (h->cp__flags & CP__H_LATE) && h->cp__hgen == cp__port_harvest_gen(h->cp__port);
}

/* Queue the completions collected so far while h is still locked, so that completions of
 * one handle reach the port in the order they finished, whichever threads finish them
 * (lock order: handle, then port). The poller's harvest keeps them instead (it queues the
 * whole harvest at once) and stamps h, so that other threads queue h's later completions
 * after the harvest; once they have, h's further completions in this harvest follow
 * theirs. The pool flag stays for cp__io_deliver(). */
static void flush_locked(cp_handle *h, cp__oplist *done)
{
    if (!done->head)
        return;
    if (!(done->flags & CP__OPLIST_HARVEST)) {
        if (cp__port_complete_handle(h->cp__port, done, h->cp__hgen))
            h->cp__flags |= CP__H_LATE;
        done->head = done->tail = NULL;
        done->n = 0;
        return;
    }
    if (!harvest_late(h)) {
        h->cp__hgen = cp__port_harvest_gen(h->cp__port);
        h->cp__flags &= (uint16_t)~CP__H_LATE;
        return;
    }
    /* Split h's own completions (after the mark) off the harvest. */
    cp__oplist mine = {.head = done->mark ? done->mark->cp__next : done->head,
                       .tail = done->tail,
                       .n = done->n - done->mark_n};
    if (!mine.head)
        return;
    if (done->mark)
        done->mark->cp__next = NULL;
    else
        done->head = NULL;
    done->tail = done->mark;
    done->n = done->mark_n;
    cp__port_complete_late(h->cp__port, &mine);
}

static void unlock_flush_close(cp_handle *h, cp__oplist *done);

/* Unlock h after queueing what it finished. A close completion is queued only now: once
 * it is dequeued the handle's memory is the user's, so it must not be queued while this
 * thread still holds the handle's lock. Nothing of h can complete after it. */
static inline void unlock_flush(cp_handle *h, cp__oplist *done)
{
    flush_locked(h, done);
    if (done->close_op)
        unlock_flush_close(h, done);
    else
        cp__h_unlock(h);
}

/* unlock_flush() when the close finished: out of line, the common path does not carry it. */
static __attribute__((noinline)) void unlock_flush_close(cp_handle *h, cp__oplist *done)
{
    cp_op *cop = done->close_op;
    done->close_op = NULL;
    cp_port *p = h->cp__port;
    uint8_t hgen = h->cp__hgen;
    bool harvest = (done->flags & CP__OPLIST_HARVEST) != 0;
    bool late = harvest && harvest_late(h);
    cp__h_unlock(h);
    cp__oplist one = {0};
    cp__oplist_push(&one, cop);
    if (late)
        cp__port_complete_late(p, &one);
    else if (harvest)
        cp__oplist_push(done, cop);
    else
        cp__port_complete_handle(p, &one, hgen);
}

/* ---- queues ---------------------------------------------------------------------------
 *
 * A handle's queue (cp__rq, cp__sq) is a circular list through cp__next, and the handle
 * points at its LAST op, whose cp__next is the first: appending and taking the first op
 * are one step each however many ops wait (a listener may hold hundreds of accepts).
 * NULL is the empty queue. */

static inline cp_op *q_first(const cp_op *last)
{
    return last ? last->cp__next : NULL;
}

/* The op after `op` in the queue whose last op is `last`, or NULL. */
static inline cp_op *q_after(const cp_op *last, const cp_op *op)
{
    return op == last ? NULL : op->cp__next;
}

static void queue_append(cp_op **q, cp_op *op)
{
    if (*q) {
        op->cp__next = (*q)->cp__next;
        (*q)->cp__next = op;
    } else {
        op->cp__next = op;
    }
    *q = op;
}

/* Take the first op off a queue that has one. */
static inline void queue_pop_first(cp_op **q)
{
    cp_op *last = *q, *first = last->cp__next;
    if (first == last)
        *q = NULL;
    else
        last->cp__next = first->cp__next;
    first->cp__next = NULL;
}

static bool queue_remove(cp_op **q, cp_op *op)
{
    cp_op *last = *q;
    if (!last)
        return false;
    cp_op *prev = last;
    do {
        cp_op *cur = prev->cp__next;
        if (cur == op) {
            if (cur == prev) {
                *q = NULL; /* it was the only one */
            } else {
                prev->cp__next = cur->cp__next;
                if (cur == last)
                    *q = prev;
            }
            op->cp__next = NULL;
            return true;
        }
        prev = cur;
    } while (prev != last);
    return false;
}

static bool has_opcode(const cp_op *last, uint8_t opcode)
{
    for (const cp_op *op = q_first(last); op; op = q_after(last, op))
        if (op->opcode == opcode)
            return true;
    return false;
}

static bool queue_has(const cp_op *last, const cp_op *op)
{
    for (const cp_op *o = q_first(last); o; o = q_after(last, o))
        if (o == op)
            return true;
    return false;
}

static cp_accept_op *accept_of(cp_op *op)
{
    return CP_CONTAINER_OF(op, cp_accept_op, op);
}

/* ---- the state machine ---------------------------------------------------------------- */

static void maybe_finish_close_locked(cp_handle *h, cp__oplist *done);
static void kick_locked(cp_handle *h, cp_op **q, cp__oplist *done);
static void connect_settled_locked(cp_handle *h, cp_op *op, int res, cp_op *behind,
                                   cp__oplist *done);

/* Whether op is a connect still under way: what is queued behind it waits for it. */
static inline bool connect_pending(const cp_handle *h, const cp_op *op)
{
    return op->opcode == CP_OP_CONNECT && !(op->cp__flags & CP__OPF_CONNECTED) &&
           (h->cp__flags & CP__H_CONNECT);
}

void cp__stream_cut(cp_handle *h)
{
    /* Every send queued behind the one that failed fails in turn: cut once, not again
     * for each of them (two or three system calls). */
    if (h->cp__flags & CP__H_CUT)
        return;
    h->cp__flags |= CP__H_CUT;
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    struct sockaddr unspec = {.sa_family = AF_UNSPEC};
    setsockopt(h->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    connect(h->fd, &unspec, sizeof(unspec));
}

void cp__shutdown_sending(cp_handle *h)
{
    if (h->cp__flags & CP__H_DGRAM) { /* not TCP: maybe not a stream at all */
        int type = SOCK_STREAM;
        socklen_t len = sizeof(type);
        if (getsockopt(h->fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type != SOCK_STREAM &&
            type != SOCK_SEQPACKET)
            return;
    }
    shutdown(h->fd, SHUT_WR);
}

static void finish_locked(cp_handle *h, cp_op *op, int res, cp__oplist *done)
{
    /* The first op queued behind a connect (which waited for it), read before it leaves. */
    bool connect = connect_pending(h, op);
    cp_op *behind = connect ? q_after(h->cp__sq, op) : NULL;
    if (!queue_remove(&h->cp__rq, op))
        queue_remove(&h->cp__sq, op);
    if (op->timeout_ms) {
        cp_port *p = h->cp__port;
        cp__lock_acquire(&p->timer_lock);
        bool in_heap = op->cp__tidx != 0;
        cp__heap_remove(&p->timers, &op->cp__tidx);
        cp__lock_release(&p->timer_lock);
        if (in_heap)
            cp__h_unpin(h); /* else the expiry path took the entry and its pin */
    }
    if (op->opcode == CP_OP_TRANSMIT) {
        cp_transmit_op *t = CP_CONTAINER_OF(op, cp_transmit_op, op);
        /* Here, not in the engine: a transmit also fails in the backend's steps around it
         * (io_uring: no SQE to wait for writability). Cancelled and timed-out ones come as
         * -ECANCELED: a stream is left to the caller, a UDP datagram begun is discarded
         * (cp__transmit_cancelled); one that never started (queued behind a failed connect,
         * or cancelled in the queue) sent nothing. */
        if (res < 0 && op->cp__state != CP__OPS_QUEUED) {
            if (res != -ECANCELED)
                cp__transmit_failed(h, t);
            else
                cp__transmit_cancelled(h, t);
        }
        if (be_of(h)->transmit_done)
            be_of(h)->transmit_done(t);
    }
    if (res < 0) {
        /* A send (or connect_ex's data) that fails after part of it went out leaves a hole
         * in the stream, as a failed transmit does (cp__transmit_failed), and is cut the
         * same way: the sending side is shut down, so that the sends queued behind it fail
         * (-EPIPE) instead of following the hole, and the peer sees the end right after
         * the bytes that went out. Cancelled and timed-out ones come as -ECANCELED: their
         * caller decides (socket.h: cp_socket_cancel). */
        if (res != -ECANCELED && (op->cp__flags & CP__OPF_STREAM))
            cp__stream_cut(h); /* the server's: even before its first byte */
        else if (res != -ECANCELED && op->cp__done > 0 &&
                 (op->opcode == CP_OP_SEND || op->opcode == CP_OP_CONNECT))
            cp__shutdown_sending(h);
        if (res == -ECANCELED && (op->cp__flags & CP__OPF_TIMEDOUT))
            res = -ETIMEDOUT;
        if (op->opcode == CP_OP_ACCEPT) {
            cp_accept_op *aop = accept_of(op);
            if (aop->fd >= 0)
                close(aop->fd);
            aop->fd = -1;
        }
        /* The errno goes where the iovec count was (read only while the op runs): the
         * count of bytes moved stays, for cp_op_transferred(). */
        op->cp__aux = (uint16_t)(-res < 65536 ? -res : EIO);
        op->cp__flags |= CP__OPF_FAILED;
    }
    __atomic_store_n(&op->cp__state, CP__OPS_DONE, __ATOMIC_RELAXED);
    cp__oplist_push(done, op);
    /* After the connect's own completion, so that it comes before those of the
     * operations that waited for it. */
    if (connect)
        connect_settled_locked(h, op, res, behind, done);
}

/* Whether a connect other than `op` waits on h's send queue, not connected yet. */
static bool other_connect_locked(const cp_handle *h, const cp_op *op)
{
    const cp_op *last = h->cp__sq;
    for (const cp_op *o = q_first(last); o; o = q_after(last, o))
        if (o != op && o->opcode == CP_OP_CONNECT && !(o->cp__flags & CP__OPF_CONNECTED))
            return true;
    return false;
}

/* The connect op has connected (res 0; a connect_ex before its data) or failed (res < 0).
 * Receives queued while it ran waited for it (kick_locked), and so did the sends,
 * transmits and disconnects queued behind it on the send queue, from `behind` (the op
 * that followed it there, or NULL) up to the next connect. Now the receives start, in
 * order (the sends follow by the queue's own order), or, if it failed, each of them
 * completes with -ENOTCONN without ever reaching the kernel, where a receive would take
 * the socket's error from the connect (epoll) or read a false end of stream (io_uring),
 * and a send would fail with whatever the socket says (-EPIPE), or wait for good on a
 * connection still being made. -ENOTCONN, not the connect's errno: an op's -ETIMEDOUT or
 * -ECANCELED means that its own timeout expired or that it was cancelled; the reason is
 * the connect's result, queued just before. A further connect queued behind op keeps the
 * receives waiting for that one (the sends behind it wait for it by queue order). */
static void connect_settled_locked(cp_handle *h, cp_op *op, int res, cp_op *behind,
                                   cp__oplist *done)
{
    h->cp__flags &= (uint16_t)~CP__H_CONNECT;
    if (other_connect_locked(h, op)) {
        h->cp__flags |= CP__H_CONNECT;
    } else if (res >= 0) {
        kick_locked(h, &h->cp__rq, done);
    } else {
        for (cp_op *o = q_first(h->cp__rq); o;) {
            cp_op *next = q_after(h->cp__rq, o); /* o may leave the queue */
            if (o->cp__state == CP__OPS_QUEUED)
                finish_locked(h, o, -ENOTCONN, done);
            o = next;
        }
    }
    if (res < 0) {
        for (cp_op *o = behind; o && o->opcode != CP_OP_CONNECT;) {
            cp_op *next = q_after(h->cp__sq, o);
            if (o->cp__state == CP__OPS_QUEUED)
                finish_locked(h, o, -ENOTCONN, done);
            o = next;
        }
    }
}

/* Total bytes an op transfers (cp__len is the byte count for vector ops too). */
static uint32_t op_total(const cp_op *op)
{
    return op->cp__len;
}

/* Apply the result r of one step. Returns true when the op is finished (*res is its final
 * status), false when the backend must run another step. */
/* Count r more bytes of a transfer of `total` bytes. True (result in *res) once it is
 * complete, or when the kernel took nothing without an error (-EIO: do not spin). */
static bool transfer_step(cp_op *op, int r, uint32_t total, int *res)
{
    if (r == 0 && op->cp__done < total) {
        *res = -EIO;
        return true;
    }
    op->cp__done += (uint32_t)r;
    if (op->cp__done >= total) {
        *res = 0;
        return true;
    }
    return false;
}

static bool step_locked(cp_handle *h, cp_op *op, int r, int *res, cp__oplist *done)
{
    if (op->cp__flags & CP__OPF_POLLWAIT) {
        /* The result of a wait for writability (io_uring): an event mask, not bytes. */
        op->cp__flags &= (uint16_t)~CP__OPF_POLLWAIT;
        if (r >= 0) {
            if (op->cp__state == CP__OPS_CANCELING) {
                *res = -ECANCELED;
                return true;
            }
            return false;
        }
    }
    if (r < 0) {
        *res = r;
        return true;
    }
    switch (op->opcode) {
    case CP_OP_TRANSMIT:
        *res = 0; /* the engine returns 0 only when everything went out */
        return true;
    case CP_OP_WRITE:
        if (transfer_step(op, r, op->cp__len, res))
            return true;
        break;
    case CP_OP_CONNECT: {
        cp_connect_op *cop = CP_CONTAINER_OF(op, cp_connect_op, op);
        if (!(op->cp__flags & CP__OPF_CONNECTED)) {
            if (!(op->cp__flags & CP__OPF_WITHDATA) || cop->cp__data_len == 0) {
                op->cp__done = 0;
                *res = 0;
                return true;
            }
            op->cp__flags |= CP__OPF_CONNECTED; /* now send the first data */
            op->cp__done = 0;
            /* Receives need not wait for the data: a peer that answers before it has read
             * all of it would wait for us as we wait for it. */
            if (h->cp__flags & CP__H_CONNECT)
                connect_settled_locked(h, op, 0, NULL, done);
            break;
        }
        if (transfer_step(op, r, cop->cp__data_len, res))
            return true;
        break;
    }
    case CP_OP_SEND:
        if (transfer_step(op, r, op_total(op), res))
            return true;
        break;
    case CP_OP_ACCEPT:
        if (!(op->cp__flags & CP__OPF_FIRSTDATA)) {
            accept_of(op)->fd = r;
            if (op->cp__len == 0) {
                op->cp__done = 0;
                *res = 0;
                return true;
            }
            /* Connection taken; wait for its first data off the accept queue so later
             * accepts are not held up by a silent peer. */
            op->cp__flags |= CP__OPF_FIRSTDATA;
            queue_remove(&h->cp__rq, op);
            queue_append(&h->cp__sq, op);
            break;
        }
        op->cp__done = (uint32_t)r;
        *res = 0;
        return true;
    default:
        op->cp__done = (uint32_t)r;
        *res = 0;
        return true;
    }
    if (op->cp__state == CP__OPS_CANCELING) {
        *res = -ECANCELED;
        return true;
    }
    return false;
}

/* One step of an op: pooled receives are served from the socket's backlog first;
 * everything else goes to the backend. */
static inline __attribute__((always_inline)) int start_step_locked(cp_handle *h, cp_op *op)
{
    if (op->opcode == CP_OP_RECV_POOL) {
        cp__bufpool *bp = &h->cp__port->pool;
        uint32_t off, len;
        if (cp__stash_pop(bp, h, &off, &len)) {
            op->u.buf = bp->base + off;
            return (int)len;
        }
        if (h->cp__flags & CP__H_ERR)
            return -(int)h->cp__err; /* 0: the end */
    }
    return be_of(h)->start(op);
}

static void advance_locked(cp_handle *h, cp_op *op, int r, cp__oplist *done)
{
    for (;;) {
        if (r == CP__PENDING)
            return;
        int res;
        if (step_locked(h, op, r, &res, done)) {
            finish_locked(h, op, res, done);
            return;
        }
        r = start_step_locked(h, op);
    }
}

/* Start queued ops at the head of q until one is left pending in the kernel. A file's
 * operations all start at once: positional I/O has no stream order to keep. */
static void kick_locked(cp_handle *h, cp_op **q, cp__oplist *done)
{
    cp_op *op;
    if (h->cp__flags & CP__H_FILE) {
        for (bool again = true; again;) {
            again = false;
            for (op = q_first(*q); op; op = q_after(*q, op)) {
                if (op->cp__state == CP__OPS_QUEUED) {
                    __atomic_store_n(&op->cp__state, CP__OPS_STARTED, __ATOMIC_RELAXED);
                    advance_locked(h, op, start_step_locked(h, op), done);
                    again = true; /* the queue may have changed: walk it again */
                    break;
                }
            }
        }
        return;
    }
    while ((op = q_first(*q)) && op->cp__state == CP__OPS_QUEUED) {
        /* Receives wait for a connect under way (connect_settled_locked starts them). */
        if ((h->cp__flags & CP__H_CONNECT) && q == &h->cp__rq)
            return;
        __atomic_store_n(&op->cp__state, CP__OPS_STARTED, __ATOMIC_RELAXED);
        advance_locked(h, op, start_step_locked(h, op), done);
    }
}

/* Run another step of the started head of q (readiness changed or buffers came back),
 * then start what follows it. */
static void retry_locked(cp_handle *h, cp_op **q, cp__oplist *done)
{
    cp_op *op = q_first(*q);
    if (op && op->cp__state == CP__OPS_STARTED &&
        !(op->cp__flags & (CP__OPF_FIRSTDATA | CP__OPF_INKERNEL)))
        advance_locked(h, op, start_step_locked(h, op), done);
    kick_locked(h, q, done);
}

static int cancel_locked(cp_handle *h, cp_op *op, cp__oplist *done)
{
    switch (op->cp__state) {
    case CP__OPS_QUEUED:
        finish_locked(h, op, -ECANCELED, done);
        return 0;
    case CP__OPS_STARTED:
        if (be_of(h)->cancel(op) == CP__PENDING) {
            __atomic_store_n(&op->cp__state, CP__OPS_CANCELING, __ATOMIC_RELAXED);
            return 0;
        }
        finish_locked(h, op, -ECANCELED, done);
        return 0;
    case CP__OPS_CANCELING:
        return -EALREADY;
    default:
        return -ENOENT;
    }
}

/* Cancel every op of h that is not already being cancelled; returns how many. */
static int cancel_all_locked(cp_handle *h, cp__oplist *done)
{
    int n = 0;
    cp_op **queues[2] = {&h->cp__rq, &h->cp__sq};
    for (int i = 0; i < 2; i++) {
        cp_op *op = q_first(*queues[i]);
        while (op) {
            if (connect_pending(h, op) && op->cp__state != CP__OPS_CANCELING) {
                /* What waits for the connect is cancelled first, as the receives were:
                 * cancelled, it would fail them with -ENOTCONN (connect_settled_locked),
                 * and their end would take the walk's next op out from under it. */
                for (cp_op *o = q_after(*queues[i], op); o && o->opcode != CP_OP_CONNECT;) {
                    cp_op *next = q_after(*queues[i], o);
                    if (o->cp__state == CP__OPS_QUEUED && cancel_locked(h, o, done) == 0)
                        n++;
                    o = next;
                }
            }
            cp_op *next = q_after(*queues[i], op); /* op may leave the queue */
            if (op->cp__state != CP__OPS_CANCELING && cancel_locked(h, op, done) == 0)
                n++;
            op = next;
        }
    }
    return n;
}

static void maybe_finish_close_locked(cp_handle *h, cp__oplist *done)
{
    if ((h->cp__flags & (CP__H_CLOSING | CP__H_CLOSED)) != CP__H_CLOSING || h->cp__rq ||
        h->cp__sq || h->cp__inflight != 0)
        return;
    cp_port *p = h->cp__port;
    h->cp__flags |= CP__H_CLOSED;
    uint32_t off, len;
    while (cp__stash_pop(&p->pool, h, &off, &len))
        if (cp__bufpool_unref(&p->pool, (uint16_t)(off / p->pool.size)))
            done->flags |= OPLIST_POOL_FREED;
    /* Only now is no kernel request left that could name this fd. */
    cp__sys_close(h->fd);
    cp__port_handle_removed(p);
    cp_op *cop = h->cp__aux;
    cop->cp__done = 0;
    __atomic_store_n(&cop->cp__state, CP__OPS_DONE, __ATOMIC_RELAXED);
    done->close_op = cop;
}

/* ---- entry points for backends ---------------------------------------------------------- */

void cp__io_done(cp_op *op, int res, cp__oplist *done)
{
    cp_handle *h = op->cp__h;
    lock_collect(h, done);
    cp__h_unpin(h);
    op->cp__flags &= (uint16_t)~CP__OPF_INKERNEL;
    if (res == -ECANCELED && op->cp__state == CP__OPS_STARTED && !(h->cp__flags & CP__H_CLOSING)) {
        /* Nobody asked for this cancel: io_uring fails a waiting request whose submitting
         * thread has exited. Nothing was transferred (a partial transfer completes with
         * its count): start it again from this thread (the backend finds out how far a
         * connect got). */
        op->cp__flags &= (uint16_t)~CP__OPF_POLLWAIT;
        res = start_step_locked(h, op);
    }
    advance_locked(h, op, res, done);
    kick_locked(h, &h->cp__rq, done);
    kick_locked(h, &h->cp__sq, done);
    maybe_finish_close_locked(h, done);
    unlock_flush(h, done);
}

void cp__io_ready(cp_handle *h, bool readable, bool hup, bool writable, cp__oplist *done)
{
    lock_collect(h, done);
    if (hup)
        h->cp__flags |= CP__H_RD_HUP; /* sticky: that edge does not come again */
    if (readable) {
        h->cp__flags |= CP__H_RD_READY;
        cp_op *op = h->cp__rq;
        if (op && op->cp__next == op && op->opcode == CP_OP_RECV &&
            op->cp__state == CP__OPS_STARTED && !op->timeout_ms) {
            /* The common case written out: the one receive posted takes the data. */
            int r = be_of(h)->start(op);
            if (r >= 0) {
                h->cp__rq = NULL;
                op->cp__done = (uint32_t)r;
                __atomic_store_n(&op->cp__state, CP__OPS_DONE, __ATOMIC_RELAXED);
                cp__oplist_push(done, op);
            } else if (r != CP__PENDING) {
                advance_locked(h, op, r, done);
            }
        } else {
            retry_locked(h, &h->cp__rq, done);
        }
    }
    if (writable) {
        h->cp__flags |= CP__H_WR_READY;
        if (h->cp__sq) /* mostly empty: each ACK that frees room is an edge of its own */
            retry_locked(h, &h->cp__sq, done);
    }
    unlock_flush(h, done);
}

void cp__io_firstdata(cp_op *op, int res, cp__oplist *done)
{
    cp_handle *h = op->cp__h;
    lock_collect(h, done);
    if (res == CP__PENDING) {
        if (op->cp__state == CP__OPS_STARTED)
            advance_locked(h, op, be_of(h)->start(op), done);
    } else {
        cp__h_unpin(h);
        finish_locked(h, op, res, done);
    }
    maybe_finish_close_locked(h, done);
    unlock_flush(h, done);
}

void cp__io_chunk(cp_handle *h, int res, uint32_t chunk, bool more, cp__oplist *done)
{
    cp__bufpool *bp = &h->cp__port->pool;
    lock_collect(h, done);
    if (!more) {
        h->cp__flags &= (uint16_t) ~(CP__H_MSHOT | CP__H_MSHOT_STOP);
        cp__h_unpin(h);
    }
    if (chunk != CP__NO_CHUNK) {
        cp_op *op = q_first(h->cp__rq);
        /* After a chunk was lost (no record to keep it, CP__H_ERR), later ones go too: the
         * reader gets what came before the loss, then the error, never a stream with a
         * hole in it. */
        if (res <= 0 || (h->cp__flags & (CP__H_CLOSING | CP__H_ERR))) {
            if (cp__bufpool_unref(bp, (uint16_t)(chunk / bp->size)))
                done->flags |= OPLIST_POOL_FREED;
        } else if (!h->cp__nstash && op && op->opcode == CP_OP_RECV_POOL &&
                   op->cp__state == CP__OPS_STARTED && !op->timeout_ms) {
            /* The common case written out: a pooled receive waits, nothing is ahead of
             * this chunk: it takes it. */
            queue_pop_first(&h->cp__rq);
            op->u.buf = bp->base + chunk;
            op->cp__done = (uint32_t)res;
            __atomic_store_n(&op->cp__state, CP__OPS_DONE, __ATOMIC_RELAXED);
            cp__oplist_push(done, op);
        } else if (cp__stash_push(bp, h, chunk, (uint32_t)res) < 0) {
            /* No memory to keep it: the connection cannot go on without these bytes. */
            if (cp__bufpool_unref(bp, (uint16_t)(chunk / bp->size)))
                done->flags |= OPLIST_POOL_FREED;
            h->cp__flags |= CP__H_ERR;
            h->cp__err = ENOMEM;
            if ((h->cp__flags & CP__H_MSHOT) && !(h->cp__flags & CP__H_MSHOT_STOP)) {
                h->cp__flags |= CP__H_MSHOT_STOP;
                be_of(h)->pool_stop(h);
            }
        } else if (h->cp__nstash >= bp->per_socket && (h->cp__flags & CP__H_MSHOT) &&
                   !(h->cp__flags & CP__H_MSHOT_STOP)) {
            /* Backpressure and fairness: a socket whose data nobody claims stops reading
             * once it holds its share of the pool. */
            h->cp__flags |= CP__H_MSHOT_STOP;
            be_of(h)->pool_stop(h);
        }
    } else if (!more) {
        if (res == 0 && !(h->cp__flags & CP__H_ERR)) { /* a lost chunk's error wins */
            h->cp__flags |= CP__H_ERR;
            h->cp__err = 0;
        } else if (res < 0 && res != -ENOBUFS && res != -ECANCELED) {
            h->cp__flags |= CP__H_ERR;
            h->cp__err = (uint8_t)(-res > 255 ? EIO : -res);
        }
        /* -ENOBUFS (empty ring) and -ECANCELED (our own stop) are not the connection's
         * fault: the next pooled receive re-arms, or waits for buffers. */
    }
    if (!(h->cp__flags & CP__H_CLOSING))
        retry_locked(h, &h->cp__rq, done);
    maybe_finish_close_locked(h, done);
    unlock_flush(h, done);
}

void cp__io_unpin(cp_handle *h, cp__oplist *done)
{
    lock_collect(h, done);
    cp__h_unpin(h);
    maybe_finish_close_locked(h, done);
    unlock_flush(h, done);
}

void cp__io_resume(cp_handle *h, cp__oplist *done)
{
    lock_collect(h, done);
    h->cp__flags &= (uint16_t)~CP__H_STARVING;
    cp__h_unpin(h);
    if (!(h->cp__flags & CP__H_CLOSING))
        retry_locked(h, &h->cp__rq, done);
    maybe_finish_close_locked(h, done);
    unlock_flush(h, done);
}

void cp__io_serve_starving(cp_port *p)
{
    cp_handle *hs[16];
    uint32_t n;
    /* Buffers are counted again after each batch: a waiter served may take none (its
     * receive was cancelled or timed out, or, on io_uring, it arms and waits for data),
     * and the next waiter must then get the buffer it was counted for. */
    do {
        uint32_t in_kernel = p->be->pool_refill ? p->be->pool_refill(p) : 0;
        n = cp__bufpool_pop_starving(&p->pool, hs, 16, in_kernel);
        cp__oplist done = {0};
        for (uint32_t i = 0; i < n; i++)
            cp__io_resume(hs[i], &done);
    } while (n > 0);
}

void cp__io_deliver(cp_port *p, cp__oplist *done)
{
    if (done->flags & OPLIST_POOL_FREED)
        cp__io_serve_starving(p);
}

/* Park h until a pool buffer is free (the backend found none). Called with h locked.
 * Returns CP__PENDING, -EAGAIN if a buffer came back meanwhile (look again), -ENOMEM. */
int cp__io_starve_locked(cp_handle *h)
{
    if (h->cp__flags & CP__H_STARVING)
        return CP__PENDING;
    cp__h_pin(h);
    h->cp__flags |= CP__H_STARVING;
    int r = cp__bufpool_starve(&h->cp__port->pool, h);
    if (r < 0) {
        h->cp__flags &= (uint16_t)~CP__H_STARVING;
        cp__h_unpin(h);
        return r;
    }
    return CP__PENDING;
}

int cp__op_iov(const cp_op *op, struct iovec *tmp, const struct iovec **out)
{
    int cnt = op->cp__aux;
    if (op->cp__done == 0) {
        *out = op->u.iov;
        return cnt;
    }
    uint32_t skip = op->cp__done;
    int n = 0;
    for (int i = 0; i < cnt; i++) {
        const struct iovec *v = &op->u.iov[i];
        if (skip >= v->iov_len) {
            skip -= (uint32_t)v->iov_len;
            continue;
        }
        tmp[n].iov_base = (char *)v->iov_base + skip;
        tmp[n].iov_len = v->iov_len - skip;
        skip = 0;
        n++;
    }
    *out = tmp;
    return n;
}

long cp__op_sendmsg(const cp_op *op, int fd, int flags)
{
    struct iovec tmp[IOV_MAX];
    const struct iovec *iov;
    int cnt = cp__op_iov(op, tmp, &iov);
    struct msghdr msg = {.msg_iov = (struct iovec *)(uintptr_t)iov, .msg_iovlen = (size_t)cnt};
    return cp__sys_sendmsg(fd, &msg, flags);
}

long cp__op_recvmsg(const cp_op *op, int fd, int flags)
{
    struct iovec tmp[IOV_MAX];
    const struct iovec *iov;
    int cnt = cp__op_iov(op, tmp, &iov);
    struct msghdr msg = {.msg_iov = (struct iovec *)(uintptr_t)iov, .msg_iovlen = (size_t)cnt};
    return cp__sys_recvmsg(fd, &msg, flags);
}

/* ---- port hooks ----------------------------------------------------------------------- */

uint32_t cp_op_transferred(const cp_op *op)
{
    return op->cp__done;
}

int64_t cp__io_next_deadline(cp_port *p)
{
    cp__lock_acquire(&p->timer_lock);
    const cp__timer_entry *top = cp__heap_top(&p->timers);
    int64_t d = top ? top->deadline : -1;
    cp__lock_release(&p->timer_lock);
    return d;
}

void cp__io_expire(cp_port *p, int64_t now)
{
    for (;;) {
        struct {
            cp_handle *h;
            cp_op *op;
            uint16_t seq;
        } due[MAX_EXPIRE_BATCH];
        unsigned n = 0;
        cp__lock_acquire(&p->timer_lock);
        const cp__timer_entry *top;
        while (n < MAX_EXPIRE_BATCH && (top = cp__heap_top(&p->timers)) && top->deadline <= now) {
            cp_op *op = top->owner;
            /* The op is outstanding while it is in the heap (finishing removes it under
             * this lock), so op and its handle are alive here. The entry's pin on the
             * handle passes to us: it keeps the handle alive after we unlock even if the
             * op finishes meanwhile. */
            cp__heap_remove(&p->timers, &op->cp__tidx);
            due[n].h = op->cp__h;
            due[n].op = op;
            due[n].seq = op->cp__seq;
            n++;
        }
        cp__lock_release(&p->timer_lock);
        if (n == 0)
            return;
        /* Entries taken out, their handles not locked yet: the ops may finish, be handled
         * and start again meanwhile. */
        CP__INJECT_DELAY("expire_due");
        cp__oplist done = {0};
        for (unsigned i = 0; i < n; i++) {
            cp_handle *h = due[i].h;
            lock_collect(h, &done);
            /* Compare by address before touching the op: it may have finished and been
             * reused; the sequence number tells a reuse on the same handle apart, unless
             * exactly a multiple of 65 536 starts happened there meanwhile: then only the
             * entry does. The op whose entry we took is timed and out of the heap; a
             * restart of it is untimed or has an entry of its own. (Its slot is written by
             * other ops' heap moves: read it under the timer lock.) */
            cp_op *op = due[i].op;
            bool ours = (queue_has(h->cp__rq, op) || queue_has(h->cp__sq, op)) &&
                        op->cp__seq == due[i].seq && op->timeout_ms != 0;
            if (ours) {
                cp__lock_acquire(&p->timer_lock);
                ours = op->cp__tidx == 0;
                cp__lock_release(&p->timer_lock);
            }
            if (ours) {
                /* Already being cancelled (a cancel, cancel-all or close waiting for the
                 * kernel's answer): that cancel came first, and its -ECANCELED stands. */
                if (due[i].op->cp__state != CP__OPS_CANCELING) {
                    due[i].op->cp__flags |= CP__OPF_TIMEDOUT;
                    cancel_locked(h, due[i].op, &done);
                }
                kick_locked(h, &h->cp__rq, &done);
                kick_locked(h, &h->cp__sq, &done);
            }
            cp__h_unpin(h);
            maybe_finish_close_locked(h, &done);
            unlock_flush(h, &done);
        }
        cp__io_deliver(p, &done);
        if (n < MAX_EXPIRE_BATCH)
            return;
    }
}

/* ---- public API ------------------------------------------------------------------------- */

/* Whether the stream socket fd is TCP (or MPTCP), whose short read means drained. Not so
 * for every stream: a Unix stream ends a read after a segment that carried descriptors
 * (SCM_RIGHTS, discarded by a plain receive) or, with SO_PASSCRED, at a change of writer;
 * an SCTP one-to-one socket at a message's end. The bytes behind are queued already, and
 * no edge will come for them (epoll). */
static bool tcp_stream(int fd)
{
    int domain = 0, proto = 0;
    socklen_t dlen = sizeof(domain), plen = sizeof(proto);
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &dlen) < 0 ||
        getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &proto, &plen) < 0)
        return true; /* not a socket: its operations fail anyway */
    return (domain == AF_INET || domain == AF_INET6) &&
           (proto == IPPROTO_TCP || proto == 262 /* IPPROTO_MPTCP */);
}

/* Register fd; nonblocking says whether it is known to be non-blocking already. */
static int associate(cp_socket *s, cp_port *port, int fd, uintptr_t key, bool nonblocking)
{
    /* Misaligned: its pooled receive's tag (io_uring) would name another address. */
    if (!s || !port || fd < 0 || ((uintptr_t)s & (_Alignof(cp_socket) - 1)) != 0)
        return -EINVAL;
    int fl = 0;
    if (!nonblocking && (fl = fcntl(fd, F_GETFL)) < 0)
        return -errno;
    memset(s, 0, sizeof(*s));
    s->fd = fd;
    s->key = key;
    s->cp__port = port;
    s->cp__stash_head = CP__STASH_END;
    cp__lock_init(&s->cp__lock);
    if (!nonblocking) {
        /* A receive of a datagram socket (UDP, SOCK_SEQPACKET) takes one message: short of
         * its buffer says nothing about the next one, so there a short read never means
         * the socket is drained (epoll). The server's accepted sockets (nonblocking) are
         * TCP streams: no system call for them. */
        int type = SOCK_STREAM;
        socklen_t tlen = sizeof(type);
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) == 0 &&
            (type != SOCK_STREAM || !tcp_stream(fd)))
            s->cp__flags |= CP__H_RD_HUP | CP__H_DGRAM;
    }
    int r = port->be->attach(s);
    if (r < 0) {
        s->cp__port = NULL;
        return r;
    }
    if (!nonblocking && !(fl & O_NONBLOCK))
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    cp__port_handle_added(port);
    return 0;
}

int cp_socket_associate(cp_socket *s, cp_port *port, int fd, uintptr_t key)
{
    return associate(s, port, fd, key, false);
}

int cp__socket_associate_nonblocking(cp_socket *s, cp_port *port, int fd, uintptr_t key)
{
    return associate(s, port, fd, key, true);
}

/* The rest of a submission (h locked): queue op, start what can start, queue what
 * finished, unlock. `r` is the result of starting op already (it was the head of an idle
 * queue), or CP__PENDING with op not queued yet. */
static int submit_finish(cp_handle *h, cp_op *op, cp_op **q, int r, bool started)
{
    cp_port *p = h->cp__port;
    cp__oplist done = {0};
    /* Read now: once its completion is queued the op may be another thread's. */
    bool timed = op->timeout_ms != 0;
    if (started) {
        advance_locked(h, op, r, &done);
    } else {
        __atomic_store_n(&op->cp__state, CP__OPS_QUEUED, __ATOMIC_RELAXED);
        queue_append(q, op);
    }
    kick_locked(h, q, &done);
    op->cp__flags &= (uint16_t)~CP__OPF_TRYNOW;
    /* Finished while starting, successfully, and the caller takes that as the result:
     * it never reaches the port (only this op can have finished: it was the last in its
     * queue, and a socket's queue starts nothing behind a pending head). */
    bool now = (op->cp__flags & CP__OPF_SKIP) && op->cp__state == CP__OPS_DONE &&
               !(op->cp__flags & CP__OPF_FAILED) && done.tail == op;
    if (now) {
        cp__oplist_pop_tail(&done);
        __atomic_store_n(&op->cp__state, CP__OPS_IDLE, __ATOMIC_RELAXED); /* the caller's */
    }
    unlock_flush(h, &done);
    cp__io_deliver(p, &done);
    /* A timed op may now be the earliest deadline: make sure the poller sees it. */
    if (timed && cp__port_polling(p))
        p->be->wake(p);
    return now ? CP_DONE_NOW : 0;
}

static int submit_locked_slow(cp_handle *h, cp_op *op, uint8_t opcode, int which);

/* Start op (set up, untimed) on h's idle queue q (h locked); unlocks h. */
static inline __attribute__((always_inline)) int submit_start(cp_handle *h, cp_op *op, cp_op **q)
{
    queue_append(q, op);
    __atomic_store_n(&op->cp__state, CP__OPS_STARTED, __ATOMIC_RELAXED);
    int r = start_step_locked(h, op);
    if (r == CP__PENDING) {
        op->cp__flags &= (uint16_t)~CP__OPF_TRYNOW;
        cp__h_unlock(h);
        return 0;
    }
    if ((op->cp__flags & CP__OPF_SKIP) && r > 0 && (uint32_t)r == op->cp__len) {
        /* A send taken whole (CP_SEND_SKIP_ON_SUCCESS): the caller's again, no completion;
         * nothing can be queued behind it while we hold the lock. */
        *q = NULL;
        __atomic_store_n(&op->cp__state, CP__OPS_IDLE, __ATOMIC_RELAXED);
        cp__h_unlock(h);
        return CP_DONE_NOW;
    }
    return submit_finish(h, op, q, r, true);
}

int cp__submit_locked(cp_handle *h, cp_op *op, uint8_t opcode, int which)
{
    /* The common case, straight through: an untimed operation on an idle queue of an open
     * socket starts at once, and usually waits in the kernel or finishes in full right
     * here. Anything else (refused, busy, timed, a connect, behind others, a file) takes
     * the general path. */
    cp_op **q = which ? &h->cp__sq : &h->cp__rq;
    uint16_t hf = h->cp__flags;
    if (*q || op->timeout_ms || opcode == CP_OP_CONNECT ||
        (hf & (CP__H_CLOSING | CP__H_SEALED | CP__H_FILE | CP__H_CONNECT)) ||
        (opcode == CP_OP_RECV && (h->cp__nstash || (hf & CP__H_MSHOT) || h->cp__rq)))
        return submit_locked_slow(h, op, opcode, which);
    op->opcode = opcode;
    op->cp__h = h;
    op->cp__done = 0;
    op->cp__tidx = 0;
    op->cp__seq = (uint16_t)++h->cp__opseq;
    return submit_start(h, op, q);
}

static __attribute__((noinline)) int submit_locked_slow(cp_handle *h, cp_op *op, uint8_t opcode,
                                                        int which)
{
    op->opcode = opcode;
    op->cp__h = h;
    op->cp__next = NULL;
    op->cp__done = 0;
    op->cp__tidx = 0;
    uint16_t hf = h->cp__flags;
    if (hf & (which ? CP__H_CLOSING | CP__H_SEALED : CP__H_CLOSING)) {
        cp__h_unlock(h);
        return -EBADF;
    }
    if (opcode == CP_OP_RECV &&
        (h->cp__nstash || (hf & CP__H_MSHOT) ||
         (be_of(h)->pool_background && has_opcode(h->cp__rq, CP_OP_RECV_POOL)))) {
        cp__h_unlock(h);
        return -EBUSY; /* data already flows into pool buffers for this socket */
    }
    op->cp__seq = (uint16_t)++h->cp__opseq;
    cp_op **q = which ? &h->cp__sq : &h->cp__rq;
    if (opcode == CP_OP_CONNECT)
        h->cp__flags |= CP__H_CONNECT; /* receives wait for it */
    if (op->timeout_ms) {
        cp_port *p = h->cp__port;
        cp__lock_acquire(&p->timer_lock);
        int r = cp__heap_push(&p->timers, op, &op->cp__tidx,
                              cp__now_ns() + (int64_t)op->timeout_ms * 1000000);
        cp__lock_release(&p->timer_lock);
        if (r < 0) {
            /* Not started: as it was (nothing can have queued behind it meanwhile). */
            h->cp__flags = (uint16_t)((h->cp__flags & ~CP__H_CONNECT) | (hf & CP__H_CONNECT));
            cp__h_unlock(h);
            return r;
        }
        cp__h_pin(h); /* the heap entry's */
        return submit_finish(h, op, q, CP__PENDING, false);
    }
    /* (A receive while a connect is under way is queued behind it: hf is from before
     * this op, so a connect itself still goes straight through.) */
    if (*q || (hf & (CP__H_FILE | CP__H_CONNECT)))
        return submit_finish(h, op, q, CP__PENDING, false);
    return submit_start(h, op, q);
}

int cp__submit(cp_handle *h, cp_op *op, uint8_t opcode, int which)
{
    if (!h || !op || !h->cp__port)
        return -EINVAL;
    cp__h_lock(h);
    /* A file takes reads and writes only. (The flag never changes, but other bits of the
     * word do, under the lock.) */
    if ((h->cp__flags & CP__H_FILE) && opcode != CP_OP_READ && opcode != CP_OP_WRITE) {
        cp__h_unlock(h);
        return -EINVAL;
    }
    return cp__submit_locked(h, op, opcode, which);
}

bool cp__socket_seal_if_idle(cp_handle *h, const uint32_t *pending)
{
    cp__h_lock(h);
    bool idle = __atomic_load_n(pending, __ATOMIC_SEQ_CST) == 0;
    if (idle)
        h->cp__flags |= CP__H_SEALED;
    cp__h_unlock(h);
    return idle;
}

void cp__socket_pool_park(cp_handle *h)
{
    cp_port *p = h->cp__port;
    cp__oplist done = {0};
    lock_collect(h, &done);
    if ((h->cp__flags & (CP__H_MSHOT | CP__H_MSHOT_STOP | CP__H_CLOSING)) == CP__H_MSHOT &&
        !has_opcode(h->cp__rq, CP_OP_RECV_POOL)) {
        h->cp__flags |= CP__H_MSHOT_STOP;
        be_of(h)->pool_stop(h);
    }
    maybe_finish_close_locked(h, &done);
    unlock_flush(h, &done);
    cp__io_deliver(p, &done);
}

int cp__socket_fd_hold(cp_handle *h)
{
    cp__h_lock(h);
    if (h->cp__flags & CP__H_CLOSING) {
        cp__h_unlock(h);
        return -EBADF;
    }
    return h->fd;
}

void cp__socket_fd_release(cp_handle *h)
{
    cp__h_unlock(h);
}

int cp_socket_accept(cp_socket *listener, cp_accept_op *aop, void *buf, size_t len)
{
    if (!aop || len > UINT32_MAX || (len && !buf))
        return -EINVAL;
    if (cp__op_misaligned(aop))
        return -EINVAL;
    if (cp__op_in_use(&aop->op))
        return -EBUSY;
    aop->fd = -1;
    aop->addrlen = sizeof(aop->addr);
    aop->op.u.buf = buf;
    aop->op.cp__len = (uint32_t)len;
    aop->op.cp__flags = 0;
    return cp__submit(listener, &aop->op, CP_OP_ACCEPT, 0);
}

int cp_socket_connect(cp_socket *s, cp_op *op, const struct sockaddr *addr, socklen_t addrlen)
{
    if (!op || !addr || addrlen == 0)
        return -EINVAL;
    if (cp__op_misaligned(op))
        return -EINVAL;
    if (cp__op_in_use(op))
        return -EBUSY;
    op->u.buf = (void *)(uintptr_t)addr;
    op->cp__len = addrlen;
    op->cp__flags = 0;
    return cp__submit(s, op, CP_OP_CONNECT, 1);
}

int cp_socket_connect_ex(cp_socket *s, cp_connect_op *cop, const struct sockaddr *addr,
                         socklen_t addrlen, const void *data, size_t len)
{
    if (!cop || !addr || addrlen == 0 || (len && !data) || len > UINT32_MAX)
        return -EINVAL;
    if (cp__op_misaligned(cop))
        return -EINVAL;
    if (cp__op_in_use(&cop->op))
        return -EBUSY;
    cop->op.u.buf = (void *)(uintptr_t)addr;
    cop->op.cp__len = addrlen;
    cop->op.cp__flags = CP__OPF_WITHDATA;
    cop->cp__data = data;
    cop->cp__data_len = (uint32_t)len;
    return cp__submit(s, &cop->op, CP_OP_CONNECT, 1);
}

int cp_socket_recv(cp_socket *s, cp_op *op, void *buf, size_t len)
{
    if (!op || !buf || len == 0 || len > UINT32_MAX)
        return -EINVAL;
    if (cp__op_misaligned(op))
        return -EINVAL;
    if (cp__op_in_use(op))
        return -EBUSY;
    op->u.buf = buf;
    op->cp__len = (uint32_t)len;
    op->cp__flags = 0;
    return cp__submit(s, op, CP_OP_RECV, 0);
}

static int iov_total(const struct iovec *iov, int iovcnt, uint32_t *total)
{
    if (!iov || iovcnt <= 0 || iovcnt > IOV_MAX)
        return -EINVAL;
    uint64_t sum = 0;
    for (int i = 0; i < iovcnt; i++) {
        if (iov[i].iov_len && !iov[i].iov_base)
            return -EINVAL;
        if (iov[i].iov_len > UINT32_MAX - sum) /* checked before adding: no wrap */
            return -EINVAL;
        sum += iov[i].iov_len;
    }
    if (sum == 0 || sum > UINT32_MAX)
        return -EINVAL;
    *total = (uint32_t)sum;
    return 0;
}

int cp_socket_recvv(cp_socket *s, cp_op *op, const struct iovec *iov, int iovcnt)
{
    uint32_t total;
    int r = op ? iov_total(iov, iovcnt, &total) : -EINVAL;
    if (r < 0)
        return r;
    if (cp__op_misaligned(op))
        return -EINVAL;
    if (cp__op_in_use(op))
        return -EBUSY;
    op->u.iov = iov;
    op->cp__len = total;
    op->cp__aux = (uint16_t)iovcnt;
    op->cp__flags = CP__OPF_VEC;
    return cp__submit(s, op, CP_OP_RECV, 0);
}

int cp_socket_recv_pooled(cp_socket *s, cp_op *op)
{
    if (!op)
        return -EINVAL;
    if (cp__op_misaligned(op))
        return -EINVAL;
    if (cp__op_in_use(op))
        return -EBUSY;
    op->u.buf = NULL;
    op->cp__len = s && s->cp__port ? s->cp__port->pool.size : 0;
    op->cp__flags = 0;
    return cp__submit(s, op, CP_OP_RECV_POOL, 0);
}

static uint16_t send_flags(unsigned flags)
{
    return (flags & CP_SEND_SKIP_ON_SUCCESS) ? CP__OPF_SKIP | CP__OPF_TRYNOW : 0;
}

int cp_socket_send_ex(cp_socket *s, cp_op *op, const void *buf, size_t len, unsigned flags)
{
    if (!op || !buf || len == 0 || len > UINT32_MAX || (flags & ~CP_SEND_SKIP_ON_SUCCESS))
        return -EINVAL;
    if (cp__op_misaligned(op))
        return -EINVAL;
    if (cp__op_in_use(op))
        return -EBUSY;
    op->u.buf = (void *)(uintptr_t)buf;
    op->cp__len = (uint32_t)len;
    op->cp__flags = send_flags(flags);
    return cp__submit(s, op, CP_OP_SEND, 1);
}

int cp_socket_send(cp_socket *s, cp_op *op, const void *buf, size_t len)
{
    return cp_socket_send_ex(s, op, buf, len, 0);
}

int cp_socket_sendv_ex(cp_socket *s, cp_op *op, const struct iovec *iov, int iovcnt, unsigned flags)
{
    uint32_t total;
    int r = op && !(flags & ~CP_SEND_SKIP_ON_SUCCESS) ? iov_total(iov, iovcnt, &total) : -EINVAL;
    if (r < 0)
        return r;
    if (cp__op_misaligned(op))
        return -EINVAL;
    if (cp__op_in_use(op))
        return -EBUSY;
    op->u.iov = iov;
    op->cp__len = total;
    op->cp__aux = (uint16_t)iovcnt;
    op->cp__flags = CP__OPF_VEC | send_flags(flags);
    return cp__submit(s, op, CP_OP_SEND, 1);
}

int cp_socket_sendv(cp_socket *s, cp_op *op, const struct iovec *iov, int iovcnt)
{
    return cp_socket_sendv_ex(s, op, iov, iovcnt, 0);
}

int cp_socket_disconnect(cp_socket *s, cp_op *op)
{
    if (!op)
        return -EINVAL;
    if (cp__op_misaligned(op))
        return -EINVAL;
    if (cp__op_in_use(op))
        return -EBUSY;
    op->u.buf = NULL;
    op->cp__len = 0;
    op->cp__flags = 0;
    return cp__submit(s, op, CP_OP_DISCONNECT, 1);
}

int cp_socket_cancel(cp_socket *h, cp_op *op)
{
    if (!h || !op || !h->cp__port)
        return -EINVAL;
    cp_port *p = h->cp__port; /* once h is unlocked it may be closed and freed */
    cp__oplist done = {0};
    int r;
    cp__h_lock(h);
    if (!queue_has(h->cp__rq, op) && !queue_has(h->cp__sq, op)) {
        r = -ENOENT;
    } else {
        r = cancel_locked(h, op, &done);
        kick_locked(h, &h->cp__rq, &done);
        kick_locked(h, &h->cp__sq, &done);
    }
    unlock_flush(h, &done);
    /* From here on h may be closed and freed by the handler of what it queued. */
    CP__INJECT_DELAY("cancel_queued");
    cp__io_deliver(p, &done);
    return r;
}

int cp_socket_cancel_all(cp_socket *h)
{
    if (!h || !h->cp__port)
        return -EINVAL;
    cp_port *p = h->cp__port;
    cp__oplist done = {0};
    cp__h_lock(h);
    int n = cancel_all_locked(h, &done);
    unlock_flush(h, &done);
    cp__io_deliver(p, &done);
    return n;
}

static int close_socket(cp_socket *h, cp_op *op, bool done_now_ok)
{
    if (!h || !op || !h->cp__port)
        return -EINVAL;
    if (cp__op_misaligned(op))
        return -EINVAL;
    if (cp__op_in_use(op))
        return -EBUSY;
    cp_port *p = h->cp__port;
    cp__oplist done = {0};
    cp__h_lock(h);
    if (h->cp__flags & CP__H_CLOSING) {
        cp__h_unlock(h);
        return -EBADF;
    }
    h->cp__flags |= CP__H_CLOSING;
    op->opcode = CP_OP_CLOSE;
    op->cp__h = h;
    op->cp__next = NULL;
    op->cp__flags = 0;
    __atomic_store_n(&op->cp__state, CP__OPS_STARTED, __ATOMIC_RELAXED);
    h->cp__aux = op;
    cancel_all_locked(h, &done);
    if ((h->cp__flags & CP__H_STARVING) && cp__bufpool_unstarve(&p->pool, h)) {
        h->cp__flags &= (uint16_t)~CP__H_STARVING;
        cp__h_unpin(h);
    }
    be_of(h)->detach(h);
    maybe_finish_close_locked(h, &done);
    bool now = done_now_ok && done.close_op == op;
    if (now) {
        done.close_op = NULL;
        __atomic_store_n(&op->cp__state, CP__OPS_IDLE, __ATOMIC_RELAXED); /* the caller's */
    }
    unlock_flush(h, &done);
    cp__io_deliver(p, &done);
    return now ? CP_DONE_NOW : 0;
}

int cp_socket_close(cp_socket *h, cp_op *op)
{
    return close_socket(h, op, false);
}

int cp__socket_close_now(cp_socket *h, cp_op *op)
{
    return close_socket(h, op, true);
}

void cp_buffer_release(cp_port *p, void *buf)
{
    if (!p || !buf)
        return;
    int id = cp__bufpool_id(&p->pool, buf);
    if (id < 0)
        return;
    /* Whole buffers are handed out at their start: anything else was never handed out. */
    if (!p->pool.packed && (size_t)((char *)buf - p->pool.base) % p->pool.size != 0)
        return;
    if (cp__bufpool_release(&p->pool, (uint16_t)id) > 0)
        cp__io_serve_starving(p);
}

size_t cp_buffer_size(const cp_port *p)
{
    return p ? p->pool.size : 0;
}
