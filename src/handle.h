/* Internal state of handles and operations, shared by the socket layer (socket.c) and
 * the backends. Every field named here is guarded by the handle's lock unless noted. */
#ifndef CPORT_HANDLE_H
#define CPORT_HANDLE_H

#include "port_internal.h"

/* cp_handle.cp__flags */
enum {
    CP__H_CLOSING = 1u << 0,    /* cp_socket_close() was called */
    CP__H_CLOSED = 1u << 1,     /* the close finished; the handle is the caller's again */
    CP__H_RD_READY = 1u << 2,   /* epoll: readable as far as we know */
    CP__H_WR_READY = 1u << 3,   /* epoll: writable as far as we know */
    CP__H_MSHOT = 1u << 4,      /* io_uring: a multishot pool receive is armed */
    CP__H_MSHOT_STOP = 1u << 5, /* io_uring: ...and we asked the kernel to cancel it */
    CP__H_CUT = 1u << 6,        /* the stream was reset (cp__stream_cut): once is enough */
    CP__H_ERR = 1u << 7,        /* pool receive ended: errno in cp__err, 0 = end of stream */
    CP__H_STARVING = 1u << 8,   /* waiting for a free pool buffer (pinned, on the list) */
    CP__H_ATTACHED = 1u << 9,   /* the backend registered the fd */
    CP__H_FILE = 1u << 10,      /* a regular file: operations run at once, in parallel */
    CP__H_RD_HUP = 1u << 11,    /* epoll: a short read does not mean the socket is drained:
                                   the peer's FIN (or an error) or TCP urgent data was
                                   reported, or a datagram socket */
    CP__H_LATE = 1u << 12,      /* another thread queued completions after the poller's
                                   harvest of generation cp__hgen (see cp_port.late) */
    CP__H_SEALED = 1u << 13,    /* no more sends (cp__socket_seal_if_idle) */
    CP__H_DGRAM = 1u << 14,     /* not a TCP stream (see associate()): RD_HUP for good */
    CP__H_CONNECT = 1u << 15,   /* a connect is under way: receives queued meanwhile wait
                                   for it, not started (connect_settled_locked) */
};

/* cp_op.cp__state */
enum {
    CP__OPS_IDLE = 0,
    CP__OPS_QUEUED,    /* in its handle's queue, not started */
    CP__OPS_STARTED,   /* started: in the kernel, or waiting for readiness (epoll) */
    CP__OPS_CANCELING, /* cancel requested from the kernel */
    CP__OPS_DONE,      /* completion queued on the port */
};

/* cp_op.cp__flags */
enum {
    CP__OPF_TIMEDOUT = 1u << 0,     /* its timeout expired: report -ETIMEDOUT */
    CP__OPF_VEC = 1u << 1,          /* u.iov / cp__len is an iovec array / count */
    CP__OPF_FIRSTDATA = 1u << 2,    /* accept: connection taken, waiting for first data */
    CP__OPF_PHASE = 1u << 3,        /* backend-private step marker (connect) */
    CP__OPF_FAILED = 1u << 4,       /* finished with an error: cp__aux holds the errno */
    CP__OPF_POLLWAIT = 1u << 5,     /* io_uring: waiting for writability; a result = retry */
    CP__OPF_CONNECTED = 1u << 6,    /* connect_ex: connected, sending the first data */
    CP__OPF_DISCONNECTED = 1u << 7, /* transmit: the final shutdown was done */
    CP__OPF_WITHDATA = 1u << 8,     /* connect_ex: data follows the connect */
    CP__OPF_INKERNEL = 1u << 9,     /* a kernel request of it is in flight (io_uring) */
    CP__OPF_SKIP = 1u << 10,        /* CP_SEND_SKIP_ON_SUCCESS: done at once = no completion */
    CP__OPF_TRYNOW = 1u << 11,      /* io_uring: try a plain send(2) before an SQE */
    CP__OPF_STREAM = 1u << 12,      /* a send of the server's: failing resets (cp__stream_cut) */
};

static inline cp_port *cp__h_port(const cp_handle *h)
{
    return h->cp__port;
}

static inline void cp__h_lock(cp_handle *h)
{
    cp__lock_acquire(&h->cp__lock);
}

static inline void cp__h_unlock(cp_handle *h)
{
    cp__lock_release(&h->cp__lock);
}

/* Pins keep a closing handle alive (its close does not complete) while the kernel, a
 * timeout or a background path may still touch it. Plain counter: the handle's lock is
 * held for every change (a timeout's pin is taken when the op enters the deadline heap
 * and handed to the expiry path if it fires). */
static inline void cp__h_pin(cp_handle *h)
{
    h->cp__inflight++;
}

static inline void cp__h_unpin(cp_handle *h)
{
    h->cp__inflight--;
}

/* Fill a completion for a finished operation; called by the port under its lock, once per
 * completion (inline). */
static inline void cp__op_to_completion(cp_op *op, cp_completion *c)
{
    c->op = op;
    c->key = op->cp__h->key;
    if (op->cp__flags & CP__OPF_FAILED)
        c->result = -(int64_t)op->cp__aux;
    else if (op->opcode == CP_OP_TRANSMIT)
        c->result = (int64_t)CP_CONTAINER_OF(op, cp_transmit_op, op)->sent;
    else
        c->result = (int64_t)op->cp__done;
    __atomic_store_n(&op->cp__state, CP__OPS_IDLE, __ATOMIC_RELAXED);
}

/* ---- entry points of the socket layer for backends (socket.c) ---- */

/* A kernel request for `op` finished with `res` (io_uring CQE): drops the pin the request
 * held, advances or completes the op, starts the next one. Takes the handle lock. */
void cp__io_done(cp_op *op, int res, cp__oplist *done);

/* The handle became ready (epoll): retry the started head operation of the receive and/or
 * send queue. Takes the handle lock. */
void cp__io_ready(cp_handle *h, bool readable, bool hup, bool writable, cp__oplist *done);

/* An accept waiting for its first data (epoll phase 2): with res == CP__PENDING its new
 * socket became readable, so run its step again (unless it is being cancelled); with
 * res < 0 the backend finished the deferred cancel: drop the backend's pin and complete
 * it. Takes the listener's lock. */
void cp__io_firstdata(cp_op *op, int res, cp__oplist *done);

/* No free pool buffer for h: pin it and put it on the pool's waiting list (once).
 * Returns CP__PENDING, -EAGAIN if a buffer became free meanwhile (look again), or
 * -ENOMEM. Called with h locked. */
int cp__io_starve_locked(cp_handle *h);

/* One completion of a multishot pool receive (io_uring): res bytes at byte offset `chunk`
 * of the pool (CP__NO_CHUNK if no buffer came with it; a chunk carries one reference on its
 * buffer); `more` false when the multishot has ended. Takes the lock. */
void cp__io_chunk(cp_handle *h, int res, uint32_t chunk, bool more, cp__oplist *done);

/* Drop a pin taken by a backend (e.g. a deferred epoll detach). Takes the handle lock. */
void cp__io_unpin(cp_handle *h, cp__oplist *done);

/* Pool buffers may be available again for a starving handle. Takes the handle lock. */
void cp__io_resume(cp_handle *h, cp__oplist *done);

/* The part of a vector op's iovec array not yet transferred: the caller's own array when
 * nothing moved yet, else a trimmed copy in tmp (IOV_MAX entries). Returns the count. */
int cp__op_iov(const cp_op *op, struct iovec *tmp, const struct iovec **out);

/* sendmsg(2) / recvmsg(2) on fd of what a vector op has left (cp__op_iov): bytes moved,
 * or a negative errno (cp__sys_sendmsg). Out of line, so that callers' common paths do not
 * carry the IOV_MAX-entry scratch array (16 KiB) in their stack frames. */
long cp__op_sendmsg(const cp_op *op, int fd, int flags);
long cp__op_recvmsg(const cp_op *op, int fd, int flags);

/* cp_socket_associate() for a descriptor known to be non-blocking already (an accepted
 * socket): saves the fcntl calls. */
int cp__socket_associate_nonblocking(cp_socket *s, cp_port *port, int fd, uintptr_t key);

/* cp_socket_close() that, when nothing of the socket is outstanding any more, finishes
 * the close right away: returns CP_DONE_NOW and queues no completion (completions of the
 * socket's other operations may still be queued, not yet handled: the caller must be able
 * to tell, as the server does by counting references). */
int cp__socket_close_now(cp_socket *h, cp_op *op);

/* Validate, set up and queue op on queue `which` of h (0 = receive, 1 = send). */
int cp__submit(cp_handle *h, cp_op *op, uint8_t opcode, int which);
/* The same with h already locked by the caller; unlocks it. */
int cp__submit_locked(cp_handle *h, cp_op *op, uint8_t opcode, int which);

/* The server's send (cport/server.h): with `attempt`, send iov[0..iovcnt-1] (len bytes
 * in all) right now if nothing is queued ahead on h and the kernel takes it. Returns
 *   len          everything went out; h is unlocked; nothing is left to do;
 *   0 .. len-1   that many bytes went out (0 also without `attempt`) and h is still
 *                locked: the caller queues the rest with cp__submit_locked(), which
 *                unlocks h, so that nothing can overtake it;
 *   -EBADF       h is closing (unlocked).
 * A failed attempt counts as 0 bytes: the queued send meets the error and reports it
 * through the port. Inline: once per reply. */
static inline long cp__send_try(cp_handle *h, const struct iovec *iov, int iovcnt, size_t len,
                                bool attempt)
{
    cp__h_lock(h);
    if (h->cp__flags & (CP__H_CLOSING | CP__H_SEALED)) {
        cp__h_unlock(h);
        return -EBADF;
    }
    const cp__backend *be = h->cp__port->be;
    if (!attempt || h->cp__sq || !be->try_send)
        return 0;
    long n = be->try_send(h, iov, iovcnt, len);
    if (n == (long)len) {
        cp__h_unlock(h);
        return n;
    }
    /* Full, or failed: the queued send finds out again (and reports a failure through the
     * port, as a send always does). */
    return n > 0 ? n : 0;
}

/* The server's graceful close: if *pending (bytes the caller has queued to send on h,
 * raised only with h locked or before a send is submitted) is 0, refuse every later send
 * on h (cp__send_try and sends submitted fail with -EBADF) and return true; else false.
 * Deciding "nothing is left to send" under h's lock means no send can be accepted
 * between that decision and the close (it would be cancelled by the close: a reply that
 * was accepted and never sent). Any thread. */
bool cp__socket_seal_if_idle(cp_handle *h, const uint32_t *pending);

/* The server paused reading h (cp_conn_pause_recv): if no pooled receive waits on h,
 * stop its background pooled receive (io_uring multishot), so that the peer's data stays
 * in the kernel's socket buffer, where TCP's window stops the peer, instead of taking the
 * shared pool's buffers. Chunks already taken stay for the next pooled receive, which
 * re-arms it. Nothing on epoll (it reads only for a waiting receive). Any thread. */
void cp__socket_pool_park(cp_handle *h);

/* True if an op (or the struct it begins) at p is misaligned: the backends tag the low
 * bits of an op's address (io_uring user_data, epoll's first-data wait), so one at an odd
 * address (inside a packed structure) would be taken for another when it completes.
 * Checked before anything reads the op. */
static inline bool cp__op_misaligned(const void *p)
{
    return ((uintptr_t)p & (_Alignof(cp_op) - 1)) != 0;
}

/* True if op is in use (started and not yet dequeued): it must not be touched. */
static inline bool cp__op_in_use(const cp_op *op)
{
    return __atomic_load_n(&op->cp__state, __ATOMIC_RELAXED) != CP__OPS_IDLE;
}

/* The descriptor of h for a system call of the caller's own (ioctl, shutdown,
 * getpeername), with h locked; or -EBADF, h not locked, once h's close has begun: from
 * then on the descriptor may be closed at any moment (under this lock) and its number
 * given to a socket accepted since, which the call would hit instead. Pair a
 * non-negative result with cp__socket_fd_release(). Any thread. */
int cp__socket_fd_hold(cp_handle *h);
void cp__socket_fd_release(cp_handle *h);

/* Run a transmit as far as the socket takes it, with the backend's file leg. Returns 0
 * when everything (and the requested disconnect) is done, CP__AGAIN when the socket is
 * full, or a negative errno. Handle lock held. (transmit.c) */
int cp__transmit_run(cp_handle *h, cp_transmit_op *t);

/* A transmit that was started finished with an error other than a cancel or timeout, in
 * whichever step (the engine, or the backend's wait for writability): shut down the
 * sending side if part of it went out, or reset a CP__TF_STREAM connection, so that
 * nothing queued behind it follows its hole; on a UDP socket, discard the datagram it had
 * begun, so that the next send does not complete it. Handle lock held. (transmit.c) */
void cp__transmit_failed(cp_handle *h, cp_transmit_op *t);

/* A transmit that was started finished cancelled or timed out (-ECANCELED, before it
 * becomes -ETIMEDOUT): on a UDP socket, discard the datagram it had begun, so that the
 * next send does not complete it; anything else stays as it is (the caller decides).
 * Handle lock held. (transmit.c) */
void cp__transmit_cancelled(cp_handle *h, cp_transmit_op *t);

/* A send or transmit failed after part of it went out: shut down h's sending side, so
 * that the sends behind it fail instead of following the hole. Not a datagram socket's
 * (UDP, AF_UNIX SOCK_DGRAM): it has no stream to cut (the datagrams that went out are
 * whole), its peer would not be told, and the shutdown would only refuse every later send
 * for good. Handle lock held; failure paths only (it may ask the socket's type). (socket.c) */
void cp__shutdown_sending(cp_handle *h);

/* A send or transmit that continues a stream whose earlier bytes expect it (the server's
 * connections: CP__OPF_STREAM, CP__TF_STREAM) failed, other than by a cancel or timeout,
 * before or after its first byte: reset the connection now (SO_LINGER {1, 0} and a
 * disconnect). A shutdown would send a FIN after the bytes before the hole, and the peer
 * would take the cut stream for a whole one; the disconnect makes the sends queued behind
 * it fail as well (those failures find it cut: CP__H_CUT). Its owner aborts it. Handle
 * lock held. (socket.c) */
void cp__stream_cut(cp_handle *h);

/* Internal transmit flag (cp_transmit_op.cp__flags): the transmit continues a stream whose
 * earlier bytes expect it, so a failure resets the connection, even before its first byte
 * went out (else the sends queued behind it would follow its hole), and never sends a FIN
 * (the peer would take the cut stream for a whole one). */
#define CP__TF_STREAM 0x80000000u

/* cp_socket_transmit_file (no tail, no flags) with CP__TF_STREAM: the server's
 * cp_conn_send_file. (transmit.c) */
int cp__transmit_file_stream(cp_socket *s, cp_transmit_op *t, int fd, int64_t offset, uint64_t len,
                             const void *head, size_t head_len);

/* After a non-harvest list was collected (and queued by unlock_flush): serve starving
 * handles if pool buffers were freed meanwhile. */
void cp__io_deliver(cp_port *port, cp__oplist *done);

#endif
