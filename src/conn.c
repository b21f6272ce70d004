/* A server connection: receive, deliver in order, send, backpressure, close.
 *
 * Every completion of a connection arrives in cp__conn_io() on some worker. The receive
 * side (posting receives, delivering data, the frame decoder, on_data) runs under the
 * connection's lock, which also serialises every callback of the connection. Sends never
 * take that lock (a callback of one connection may send on another that is sending to
 * the first); they account bytes in `pending` and flags in `state` atomically.
 *
 * References (see server_internal.h): an operation reference is taken before anything is
 * started (its completion may be handled on another worker before the start call even
 * returns) and dropped at the very end of its handler. The close completion also drops
 * the connection's life reference, so the count reaches zero only when every completion of
 * the connection has been handled: on_close runs there, and nothing can follow it.
 */
#include "server_internal.h"
#include "inject.h"

#include <errno.h>
#include <netinet/in.h>
#include <linux/sockios.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

/* The most operation references sends may take (CS_OPREF_SENDS_MAX). With CPORT_INJECT,
 * fail point sends_max_16 lowers it to 16, so that a test can reach it (a million queued
 * sends it could not); elsewhere it is the constant. */
#define SENDS_LIMIT (CP__INJECT_FAIL("sends_max_16") ? 16 * CS_OPREF : CS_OPREF_SENDS_MAX)

/* Receive slot states (cp__rx_slot.len) when recvs > 1; otherwise its byte count. */
enum { SLOT_POSTED = INT32_MIN, SLOT_IDLE = INT32_MIN + 1 };

static int post_rx(cp_server *sv, cp__worker *w, cp_conn *c, cp_op *op);
static void post_idle_slots(cp_server *sv, cp__worker *w, cp_conn *c);
static bool drain_reading(cp_conn *c);
static void read_again(cp_server *sv, cp__worker *w, cp_conn *c);
static void reset_on_close(cp_conn *c);

/* ---- the state word ---------------------------------------------------------------------- */

static uint64_t st_load(cp_conn *c)
{
    return __atomic_load_n(&c->state, __ATOMIC_SEQ_CST);
}

static uint64_t st_or(cp_conn *c, uint64_t f)
{
    return __atomic_fetch_or(&c->state, f, __ATOMIC_SEQ_CST);
}

static void st_clear(cp_conn *c, uint64_t f)
{
    __atomic_fetch_and(&c->state, ~f, __ATOMIC_SEQ_CST);
}

static void op_ref(cp_conn *c)
{
    __atomic_add_fetch(&c->state, CS_OPREF, __ATOMIC_RELAXED);
}

/* Whether c takes new sends: while it is not closing, and while the close is the one the
 * peer's end began and has not been issued (nor the server's shutdown come): replies to
 * what arrived before the end may still be queued, from on_sent of an earlier reply for
 * one (which runs before that reply leaves `pending`, so before the close can be issued).
 * Once the last reply is out, the socket is sealed under its lock: later sends fail. */
static bool takes_sends(uint64_t st)
{
    if (st & CF_SHUT_SEND)
        return false;
    if (!(st & CF_CLOSING))
        return true;
    return (st & (CF_DRAIN | CF_CLOSE_ISSUED | CF_STOP_READ)) == CF_DRAIN &&
           (st & CF_REASON_MASK) >> CF_REASON_SHIFT == CP_CLOSE_PEER;
}

/* An operation reference for a send started from outside c's handlers (any thread, one
 * holding only a cp_conn_ref included), taken only while c takes sends: until the close
 * is issued the life reference is held, so the count is not zero. After that, it may
 * have reached zero already (on_close ran): a reference taken then would run on_close
 * again, and free c again, when dropped. */
static int op_ref_unless_closing(cp_conn *c)
{
    uint64_t st = st_load(c);
    do {
        if (!takes_sends(st))
            return -EPIPE;
        if ((st & CS_OPREF_MASK) >= SENDS_LIMIT)
            return -ENOBUFS;
    } while (!__atomic_compare_exchange_n(&c->state, &st, st + CS_OPREF, true, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    return 0;
}

static uint16_t st_tick(uint64_t st)
{
    return (uint16_t)((st & CS_TICK_MASK) >> CS_TICK_SHIFT);
}

/* Record data at server tick `now` (a CAS only when the tick changed). */
static void touch(cp_conn *c, uint16_t now)
{
    uint64_t st = st_load(c);
    while (st_tick(st) != now || !(st & CF_GOT_DATA)) {
        if (st & CF_CLOSING)
            return; /* the tick bits hold the close errno now */
        uint64_t want = (st & ~CS_TICK_MASK) | ((uint64_t)now << CS_TICK_SHIFT) | CF_GOT_DATA;
        if (__atomic_compare_exchange_n(&c->state, &st, want, true, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            return;
    }
}

static cp__rx_multi *multi_of(cp_server *sv, cp_conn *c)
{
    return (cp__rx_multi *)((char *)c + sv->off_multi);
}

static cp__rx_slot *slot_of(cp_server *sv, cp_conn *c, unsigned i)
{
    return (cp__rx_slot *)((char *)c + sv->off_multi + sizeof(cp__rx_multi)) + i;
}

static cp_frame_decoder *decoder_of(cp_server *sv, cp_conn *c)
{
    return (cp_frame_decoder *)((char *)c + sv->off_frame);
}

/* The tick a delivery stamps its connection with (see cp__server_tick_late). */
static uint16_t data_tick(cp_server *sv)
{
    return (uint16_t)cp__server_tick_late(sv);
}

/* ---- freeing --------------------------------------------------------------------------- */

static void free_conn(cp_server *sv, cp_conn *c)
{
    cp__worker *w = cp__server_worker(sv);
    /* Receive buffers a connection owns (buffer mode); pool buffers were given back as
     * each delivery ended. */
    if (!sv->o.zero_byte) {
        if (sv->o.recvs <= 1) {
            if (c->rx.u.buf)
                cp__server_buf_free(sv, w, c->rx.u.buf, sv->o.recv_buffer);
        } else {
            for (unsigned i = 0; i < sv->o.recvs; i++)
                if (slot_of(sv, c, i)->op.u.buf)
                    cp__server_buf_free(sv, w, slot_of(sv, c, i)->op.u.buf, sv->o.recv_buffer);
        }
    }
    if (sv->o.framed)
        cp_frame_decoder_free(decoder_of(sv, c), &sv->frame_cfg);
    cp__cache_free(&w->conns, &sv->conns, c);
    /* Only cp_server_shutdown() waits for connections to go (pairs with its store of
     * `stopping` and read of conns_open). */
    if (__atomic_load_n(&sv->stopping, __ATOMIC_SEQ_CST))
        cp__server_signal_done(sv);
}

/* One connection less. cp_server_shutdown() waits for the count to reach zero, so wake it
 * here: freeing is too late a signal, a connection the application still references is
 * not freed (pairs with its store of `stopping` and read of conns_open). */
static void conns_open_drop(cp_server *sv)
{
    __atomic_sub_fetch(&sv->conns_open, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&sv->stopping, __ATOMIC_SEQ_CST))
        cp__server_signal_done(sv);
}

static void run_on_close(cp_server *sv, cp_conn *c)
{
    uint64_t st = st_load(c);
    if ((st & CF_OPEN) && sv->cb.on_close) {
        cp_close_reason reason = (cp_close_reason)((st & CF_REASON_MASK) >> CF_REASON_SHIFT);
        int err = reason == CP_CLOSE_ERROR ? -(int)st_tick(st) : 0;
        cp__lock_acquire(&c->lock);
        sv->cb.on_close(c, reason, err);
        cp__lock_release(&c->lock);
    }
    conns_open_drop(sv);
    uint64_t after = st_or(c, CF_ONCLOSE_DONE) | CF_ONCLOSE_DONE;
    if ((after & CS_UREF_MASK) == 0)
        free_conn(sv, c);
}

/* Drop n operation references; the last one runs on_close. */
static void op_unref(cp_server *sv, cp_conn *c, uint64_t n)
{
    uint64_t st = __atomic_sub_fetch(&c->state, n * CS_OPREF, __ATOMIC_ACQ_REL);
    if ((st & CS_OPREF_MASK) == 0)
        run_on_close(sv, c);
}

/* Opcodes of the completions a caller hands to a worker on c->rx (complete_on_rx). */
enum {
    OP_LAST_UNREF = CP_OP__COUNT, /* op_unref_caller()'s last reference */
    OP_READ_AGAIN,                /* read_again_anywhere(): read again under c's lock */
};

/* Queue c->rx on the port as an I/O completion of c with `opcode`, for a worker to handle
 * in cp__conn_io(): unlike a work item (the port's ring may be full, memory may run out)
 * this cannot fail. The caller must own c->rx while it is idle, and hand over an
 * operation reference, dropped by the handler. Its buffer (u.buf) is left alone. */
static void complete_on_rx(cp_server *sv, cp_conn *c, uint8_t opcode)
{
    c->rx.cp__h = &c->s;
    c->rx.opcode = opcode;
    c->rx.cp__flags = 0;
    c->rx.cp__done = 0;
    cp__port_complete_op(sv->port, &c->rx);
}

/* Drop an operation reference taken by a call from any thread (cp_conn_send_file) whose
 * operation was not started. If it is the last one (the connection closed meanwhile),
 * on_close must not run here, on the caller's thread and inside its call (callbacks run on
 * the server's workers; a caller holding a lock that on_close takes would deadlock, and a
 * shutdown from that on_close would not be refused): a worker drops it, as a completion
 * carried by c->rx. c->rx is idle: every receive, and every read-again it carries, holds
 * an operation reference until its handler is done, and none is posted once the close is
 * done (it is unused by receives when recvs > 1). The pool outlives the reference
 * (shutdown waits for on_close). */
static void op_unref_caller(cp_server *sv, cp_conn *c)
{
    uint64_t st = st_load(c);
    while ((st & CS_OPREF_MASK) != CS_OPREF) {
        if (__atomic_compare_exchange_n(&c->state, &st, st - CS_OPREF, true, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            return;
    }
    complete_on_rx(sv, c, OP_LAST_UNREF);
}

void cp_conn_ref(cp_conn *c)
{
    __atomic_add_fetch(&c->state, CS_UREF, __ATOMIC_RELAXED);
}

void cp_conn_unref(cp_conn *c)
{
    cp_server *sv = cp__conn_server(c);
    uint64_t st = __atomic_sub_fetch(&c->state, CS_UREF, __ATOMIC_ACQ_REL);
    if ((st & CS_UREF_MASK) == 0 && (st & CF_ONCLOSE_DONE))
        free_conn(sv, c);
}

/* ---- buffers handed to on_data ------------------------------------------------------ */

/* w: the calling thread's record. */
static void hold_release(cp_server *sv, cp__worker *w, cp__hold *h)
{
    if (__atomic_sub_fetch(&h->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    if (h->kind == BUF_POOL)
        cp_buffer_release(sv->port, h->buf);
    else
        cp__server_buf_free(sv, w, h->buf, h->size);
    cp__cache_free(&w->holds, &sv->holds, h);
}

/* ---- close ----------------------------------------------------------------------------- */

/* A close context: from the sends slab or, when that has none (out of memory), one of the
 * server's spares. NULL if those are all in use too. */
static cp_op *close_op_take(cp_server *sv, cp__worker *w)
{
    cp__send *x = CP__INJECT_FAIL("close_ctx") ? NULL : cp__cache_alloc(&w->sends, &sv->sends);
    if (x) {
        memset(&x->op, 0, sizeof(x->op));
        x->kind = SEND_CLOSE;
        return &x->op;
    }
    const uint32_t all = CP__CLOSE_SPARES == 32 ? UINT32_MAX : (1u << CP__CLOSE_SPARES) - 1;
    uint32_t busy = __atomic_load_n(&sv->close_spares_busy, __ATOMIC_RELAXED);
    for (;;) {
        uint32_t idle = ~busy & all;
        if (!idle)
            return NULL;
        uint32_t bit = idle & -idle;
        if (__atomic_compare_exchange_n(&sv->close_spares_busy, &busy, busy | bit, true,
                                        __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
            cp_op *op = &sv->close_spares[__builtin_ctz(bit)];
            memset(op, 0, sizeof(*op));
            return op;
        }
    }
}

static void close_op_give(cp_server *sv, cp__worker *w, cp_op *op)
{
    uintptr_t off = (uintptr_t)op - (uintptr_t)sv->close_spares; /* (wraps if below) */
    if (off < sizeof(sv->close_spares))
        __atomic_and_fetch(&sv->close_spares_busy, ~(1u << (off / sizeof(cp_op))),
                           __ATOMIC_RELEASE);
    else
        cp__cache_free(&w->sends, &sv->sends, CP_CONTAINER_OF(op, cp__send, op));
}

static void issue_close(cp_server *sv, cp_conn *c)
{
    if (st_or(c, CF_CLOSE_ISSUED) & CF_CLOSE_ISSUED)
        return;
    cp__worker *w = cp__server_worker(sv);
    cp_op *op = close_op_take(sv, w);
    if (!op) {
        st_clear(c, CF_CLOSE_ISSUED); /* every spare in use: the sweep retries */
        return;
    }
    op_ref(c);
    /* Inside c's receive handler (which holds an operation reference, so the count cannot
     * reach zero here, under c's lock) a close that completes at once is handled right
     * away, without a trip through the port. */
    int r = w->rx_conn == c ? cp__socket_close_now(&c->s, op) : cp_socket_close(&c->s, op);
    if (r < 0) {
        close_op_give(sv, w, op);
        op_unref(sv, c, 1);
    } else if (r == CP_DONE_NOW) {
        close_op_give(sv, w, op);
        op_unref(sv, c, 2); /* its own and the connection's life reference */
    }
}

/* What the kernel still holds of a graceful close's stream. */
typedef enum wire {
    WIRE_DONE,    /* every byte sent is acknowledged (the FIN too, once sent) and no input
                     waits unread, or the connection is gone (reset, or given up): closing
                     loses nothing (closing with unread input answers with a reset) */
    WIRE_INPUT,   /* every byte sent is acknowledged; the peer's input waits unread */
    WIRE_MOVING,  /* bytes unacknowledged, and the kernel is getting them through */
    WIRE_STALLED, /* bytes unacknowledged, and the kernel is retransmitting them, or
                     probing a window too small for its next segment, with no progress
                     since it began: what TCP_USER_TIMEOUT measures (tcpi_retransmits is
                     reset when the peer acknowledges new data, tcpi_backoff at a round-trip
                     sample or when the window opens) */
} wire;

/* The kernel's view of c's stream. With `queued` (replies still wait in the server, so the
 * kernel holds bytes of them) only whether it is stalled. Once a receive has reported the
 * end, input is not asked about (one system call fewer for most closes, those the client
 * begins): none can wait after the peer's FIN or a reset, and after a local error none
 * would be read anyway, so waiting for it would only delay the same close. */
static wire wire_state(cp_conn *c, bool queued)
{
    int fd = cp__socket_fd_hold(&c->s);
    if (fd < 0)
        return WIRE_DONE; /* another thread issued the close already: issue_close() is a no-op */
    int out = 1, in = 0;
    bool ended = (st_load(c) & CF_RX_ENDED) != 0;
    wire w;
    if (!queued &&
        (ioctl(fd, SIOCOUTQ, &out) < 0 || (out == 0 && !ended && ioctl(fd, SIOCINQ, &in) < 0))) {
        w = WIRE_DONE;
    } else if (out == 0) {
        w = in ? WIRE_INPUT : WIRE_DONE;
    } else {
        struct tcp_info ti;
        socklen_t len = sizeof ti;
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
            w = WIRE_STALLED; /* progress cannot be told: linger_ms bounds the close */
        else if (ti.tcpi_state == TCP_CLOSE)
            w = WIRE_DONE;
        else
            w = ti.tcpi_retransmits || ti.tcpi_backoff ? WIRE_STALLED : WIRE_MOVING;
    }
    cp__socket_fd_release(&c->s);
    return w;
}

/* FIN to the peer, unless the close was issued meanwhile (by another thread: the sweep and
 * the send completions move a graceful close on too). Then the descriptor may be closed
 * and its number taken by a connection accepted since: that one would get the FIN. */
static void shutdown_write(cp_conn *c)
{
    int fd = cp__socket_fd_hold(&c->s);
    if (fd >= 0) {
        shutdown(fd, SHUT_WR);
        cp__socket_fd_release(&c->s);
    }
}

/* cp_conn_shutdown_send: FIN once nothing is queued (any thread; again at the last send's
 * completion). The decision is made under the socket's lock, as the close's is: a send
 * that found the connection taking sends either counted its bytes before (then this
 * waits for them) or is refused after. */
static void fin_step(cp_conn *c)
{
    uint64_t st = st_load(c);
    if ((st & (CF_SHUT_SEND | CF_CLOSE_ISSUED)) != CF_SHUT_SEND ||
        __atomic_load_n(&c->pending, __ATOMIC_SEQ_CST) != 0)
        return;
    if (cp__socket_seal_if_idle(&c->s, &c->pending))
        shutdown_write(c);
}

int cp_conn_shutdown_send(cp_conn *c)
{
    if (!c)
        return -EINVAL;
    uint64_t st = st_load(c);
    do {
        if (st & CF_SHUT_SEND)
            return 0;
        if (st & CF_CLOSING)
            return -EPIPE;
    } while (!__atomic_compare_exchange_n(&c->state, &st, st | CF_SHUT_SEND, true, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    /* Pairs with the send completion: it lowers `pending`, then reads the flags. */
    fin_step(c);
    return 0;
}

/* A graceful close moves on (any thread). Once every reply is in the kernel: close if the
 * peer has acknowledged everything and sent nothing unread; else send FIN and linger,
 * reading and dropping what the peer still sends (until it ends), until that holds
 * (checked at each tick, see sweep_step), or until the replies have made no progress for
 * linger_ms (then with a reset). Closing a socket with unread input makes the kernel
 * answer with a reset, which destroys replies still on their way to the peer. Closing one
 * with replies unacknowledged, also after the peer's end, leaves them to an orphaned
 * socket, which the kernel gives up silently if the peer stops taking them: the peer,
 * waiting to read, would never learn that its stream was cut. */
static void drain_step(cp_server *sv, cp_conn *c)
{
    uint64_t st = st_load(c);
    if ((st & (CF_CLOSING | CF_DRAIN | CF_CLOSE_ISSUED)) != (CF_CLOSING | CF_DRAIN) ||
        __atomic_load_n(&c->pending, __ATOMIC_SEQ_CST) != 0)
        return;
    /* Nothing queued: from here on sends fail with -EPIPE. Decided under the socket's lock,
     * so that a send that saw no CF_CLOSING cannot queue a reply the close would cancel
     * (conn_send raises `pending` under that lock). */
    if (!cp__socket_seal_if_idle(&c->s, &c->pending))
        return;
    CP__INJECT_DELAY("drain_sealed"); /* another thread may issue the close meanwhile */
    if (wire_state(c, false) == WIRE_DONE) {
        /* FIN first: input arriving between the check and the close then draws a reset
         * only after the peer has its FIN, and it reads the end, not the reset. (None can
         * come once the peer has ended.) */
        if (!(st & CF_RX_ENDED))
            shutdown_write(c);
        issue_close(sv, c);
        return;
    }
    while (!(st & (CF_LINGER | CF_CLOSE_ISSUED))) {
        uint16_t unit = (uint16_t)(cp__server_tick(sv) >> sv->linger_shift);
        uint64_t want =
            (st & ~CS_TICK_MASK) | CF_LINGER | ((uint64_t)unit << CS_TICK_SHIFT & CS_TICK_MASK);
        if (__atomic_compare_exchange_n(&c->state, &st, want, true, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
            shutdown_write(c);
            break;
        }
    }
}

/* The kernel's bound on a graceful close, behind the sweep's (TCP_USER_TIMEOUT, which also
 * covers a zero window: linger_backstop_ms): should the sweep not reset the connection (the
 * server stalled), the connection fails with ETIMEDOUT, and its sends with it, which aborts
 * the close, but without a reset (tcp_write_err), so the sweep must come first. The kernel
 * counts from when its stall began (the first retransmission or window probe), the sweep
 * from the close: set while the replies are stalled already, perhaps for seconds (a peer
 * that vanished, or stopped reading, before the close), the backstop would fire at the
 * kernel's next retransmission or probe, before the sweep. So it is set only while they
 * are seen moving, when the kernel's clock has not started: at the close, or at a tick.
 * (The server listens on TCP only.) */
static void arm_backstop(cp_server *sv, cp_conn *c)
{
    unsigned ms = sv->linger_backstop_ms;
    cp_conn_setsockopt(c, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof(ms));
}

/* Replies are still queued when a graceful close begins. A peer that has stopped reading
 * would keep them, and the connection, forever (zero-window probes keep TCP alive). The
 * sweep resets the connection once they have made no progress for linger_ms (sweep_step);
 * the backstop comes later (arm_backstop). */
static void bound_drain(cp_server *sv, cp_conn *c)
{
    if (wire_state(c, true) == WIRE_MOVING)
        arm_backstop(sv, c);
}

/* A send was queued after its check that c is not closing. If a graceful close began in
 * between, the close may have looked at `pending` before these bytes were counted, and not
 * bounded them: a peer that never reads would keep the connection for good. Pairs with
 * start_close (it sets CF_CLOSING, then reads `pending`; the send raised `pending`, then
 * reads the flags): one of the two sees the other and bounds it. */
static void bound_late_send(cp_server *sv, cp_conn *c)
{
    if (st_load(c) & CF_DRAIN)
        bound_drain(sv, c);
}

/* Begin closing (any thread). With drain, the close waits for queued sends; without, they
 * are cancelled. The first caller's reason and errno stick. */
/* Close at once: the replies still queued are cancelled. If there are some, the stream is
 * cut, and a plain close would end it with a FIN after the part the kernel held, a cut
 * stream passing for a whole one: the peer gets a reset, as from cp_conn_abort(). With
 * nothing queued the stream is whole (a quiet connection reaped, a refused one): a FIN.
 * Decided under the socket's lock, where sends count what they queue, sealing an idle
 * socket: a send racing the abort from another thread (holding a cp_conn_ref) is refused
 * (-EPIPE) or counted, never queued behind a FIN for the close to cancel. */
static void abort_now(cp_server *sv, cp_conn *c)
{
    if (!cp__socket_seal_if_idle(&c->s, &c->pending))
        reset_on_close(c);
    cp_socket_cancel_all(&c->s);
    issue_close(sv, c);
}

static void start_close(cp_server *sv, cp_conn *c, cp_close_reason reason, int err, bool drain)
{
    /* The tick bits: the errno, or for a graceful close (never CP_CLOSE_ERROR) the linger
     * unit its replies last made progress in: now. */
    uint64_t tick_bits = drain ? (uint16_t)(cp__server_tick(sv) >> sv->linger_shift)
                               : (uint16_t)(err < 0 ? -err : 0);
    uint64_t st = st_load(c);
    for (;;) {
        if (st & CF_CLOSING) {
            if (!drain && (st & CF_DRAIN)) {
                /* An abort overrides a graceful close in progress. */
                st_clear(c, CF_DRAIN);
                abort_now(sv, c);
            }
            return;
        }
        uint64_t want = (st & ~(CS_TICK_MASK | CF_REASON_MASK)) | CF_CLOSING |
                        ((uint64_t)reason << CF_REASON_SHIFT) | tick_bits << CS_TICK_SHIFT |
                        (drain ? CF_DRAIN : 0);
        if (__atomic_compare_exchange_n(&c->state, &st, want, true, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            break;
    }
    /* Ticks may overlap (two workers each sweeping): only the close that wins counts, and
     * before the peer can see it. */
    if (reason == CP_CLOSE_HANDSHAKE_TIMEOUT || reason == CP_CLOSE_IDLE_TIMEOUT)
        __atomic_add_fetch(&sv->conns_reaped, 1, __ATOMIC_RELAXED);
    if (!drain) {
        abort_now(sv, c);
        return;
    }
    /* Receives go on (dropping data) so that the peer's input is consumed; the close
     * follows the last reply (drain_step). Pairs with the send completion: it lowers
     * `pending`, then reads the flags. */
    if (__atomic_load_n(&c->pending, __ATOMIC_SEQ_CST) != 0)
        bound_drain(sv, c);
    CP__INJECT_DELAY("close_looked"); /* a send that saw no CF_CLOSING may queue meanwhile */
    drain_step(sv, c);
}

void cp_conn_close(cp_conn *c)
{
    start_close(cp__conn_server(c), c, CP_CLOSE_LOCAL, 0, true);
}

/* An abortive close resets the connection (SO_LINGER {1, 0}): what the kernel still holds
 * unsent is discarded at once, instead of being sent by an orphaned socket for minutes to
 * a peer that may never read it, and the peer sees a reset, not an end of stream that would
 * pass the cut stream for a whole one. Set before the close is issued; a no-op (-EBADF)
 * once it has been (the descriptor is no longer this connection's). */
static void reset_on_close(cp_conn *c)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    cp_conn_setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

void cp_conn_abort(cp_conn *c)
{
    reset_on_close(c);
    start_close(cp__conn_server(c), c, CP_CLOSE_LOCAL, 0, false);
}

/* Take one more operation reference on c, the walks' pin, only if its state word still
 * holds st, what the walk looked at: then this is the same live connection, and it stays
 * so until the reference is dropped. */
static bool pin_if_unchanged(cp_conn *c, uint64_t st)
{
    return __atomic_compare_exchange_n(&c->state, &st, st + CS_OPREF, false, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

bool cp__conn_stop_pin(cp_conn *c, bool abort)
{
    uint64_t st = st_load(c);
    CP__INJECT_DELAY("stop_pin"); /* the state word may change meanwhile */
    /* Retried until the word holds still: it changes all the time (data in a new tick, a
     * send queued or done, a cp_conn_ref), and a connection the walk leaves out is never
     * stopped (nothing else tells it). Whatever connection the word belongs to by then,
     * one with a reference is live, and stopping it is right. */
    for (;;) {
        if (!(st & CS_OPREF_MASK))
            return false; /* being set up (it sees `stopping` itself), or finished */
        /* What cp__conn_stop would still change: so that a walk repeated after running out
         * of memory pins only the connections it missed. */
        bool todo = abort ? !(st & CF_CLOSING) || (st & CF_DRAIN) : !(st & CF_STOP_READ);
        if (!todo)
            return false;
        if (__atomic_compare_exchange_n(&c->state, &st, st + CS_OPREF, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            return true;
    }
}

void cp__conn_stop(cp_server *sv, cp_conn *c, bool abort)
{
    st_or(c, CF_STOP_READ);
    if (abort)
        reset_on_close(c); /* the shutdown's deadline cut */
    start_close(sv, c, CP_CLOSE_SHUTDOWN, 0, !abort);
    op_unref(sv, c, 1); /* the pin */
}

static uint32_t *deadline_of(cp_server *sv, cp_conn *c)
{
    return (uint32_t *)((char *)c + sv->off_deadline);
}

int cp_conn_set_deadline(cp_conn *c, unsigned ms)
{
    if (!c)
        return -EINVAL;
    cp_server *sv = cp__conn_server(c);
    if (!sv->o.conn_deadlines)
        return -EINVAL;
    uint32_t at = 0;
    if (ms) {
        /* The first tick that begins at or after the deadline: the sweep fires it at a tick
         * >= at, so never before the deadline, and at most one tick after it. (Rounding up
         * from the tick the call falls in fired up to a tick early.) In 64 bits: ms near
         * UINT_MAX wrapped to a deadline at the next tick. The sweep compares ticks modulo
         * 2^32: a deadline 2^31 ticks away or more (beyond 24 days with tick_ms 1) does not
         * fit and is refused. */
        int64_t now = cp__now_ns() - sv->tick_epoch_ns;
        int64_t due = (now + (int64_t)ms * 1000000 + sv->tick_ns - 1) / sv->tick_ns;
        if (due - now / sv->tick_ns >= INT32_MAX)
            return -EINVAL;
        at = (uint32_t)due;
        if (at == 0)
            at = 1; /* 0 means "none" */
    }
    __atomic_store_n(deadline_of(sv, c), at, __ATOMIC_RELAXED);
    return 0;
}

static int timeout_due(cp_server *sv, cp_conn *c, uint64_t st, uint32_t now);
static uint16_t ticks_since(uint32_t now, uint16_t stamp);
enum { STAMP_MAX_AGE = 1 << 14 }; /* ticks; timeouts are at most this long (cp_server_create) */

/* A handshake or idle timeout left standing stays due: its 16-bit stamp is kept at most
 * 2^14 ticks old (every timeout is shorter), else at 2^15 ticks it would look ahead of the
 * tick, and the timeout would stop firing for the next 2^15 ticks. Data arriving meanwhile
 * wins (the CAS fails). */
static void age_standing(cp_conn *c, uint32_t now)
{
    uint64_t st = st_load(c);
    if ((st & CF_CLOSING) || ticks_since(now, st_tick(st)) < STAMP_MAX_AGE)
        return;
    uint64_t stamp = (uint16_t)(now - STAMP_MAX_AGE);
    uint64_t want = (st & ~CS_TICK_MASK) | (stamp << CS_TICK_SHIFT);
    __atomic_compare_exchange_n(&c->state, &st, want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* Whether c's deadline is set and due at tick `now`. */
static bool timeout_due_deadline(cp_server *sv, cp_conn *c, uint32_t now)
{
    if (!sv->o.conn_deadlines)
        return false;
    uint32_t at = __atomic_load_n(deadline_of(sv, c), __ATOMIC_RELAXED);
    return at && (int32_t)(now - at) >= 0;
}

/* Use up c's deadline (clear it) if it is still the one that was found due (lock held);
 * false if it was replaced or cleared meanwhile. */
static bool take_deadline(cp_server *sv, cp_conn *c)
{
    uint32_t at = __atomic_load_n(deadline_of(sv, c), __ATOMIC_RELAXED);
    return at && __atomic_compare_exchange_n(deadline_of(sv, c), &at, 0, false, __ATOMIC_RELAXED,
                                             __ATOMIC_RELAXED);
}

/* A timeout fired: the application decides (on_timeout), or the connection is aborted.
 * The sweep found it due before taking c's lock, which a callback of c may have held
 * meanwhile for as long as it ran: data may have arrived, the deadline may have been
 * replaced or cleared. So it is decided again under the lock, on the state as it is now;
 * a deadline is used up (cleared) only if it is still the one that is due, so that one
 * set meanwhile (by another thread holding a reference) stands. */
static void timed_out(cp_server *sv, cp_conn *c, uint32_t now)
{
    cp__lock_acquire(&c->lock);
    uint64_t st = st_load(c);
    int reason = (st & CF_CLOSING) ? -1 : timeout_due(sv, c, st, now);
    if (reason == CP_CLOSE_DEADLINE && !take_deadline(sv, c))
        reason = -1;
    if (reason < 0) {
        cp__lock_release(&c->lock);
        return;
    }
    /* conns_reaped counts connections a handshake or idle timeout closed (start_close
     * counts those it closes itself). */
    bool reap = reason != CP_CLOSE_DEADLINE;
    if (sv->cb.on_timeout && (st & CF_OPEN)) {
        sv->cb.on_timeout(c, (cp_close_reason)reason);
        /* Only if the application closed it: a timeout left standing fires again at
         * every tick. */
        uint64_t after = st_load(c);
        if (reap && (after & CF_CLOSING) &&
            (after & CF_REASON_MASK) >> CF_REASON_SHIFT == CP_CLOSE_LOCAL)
            __atomic_add_fetch(&sv->conns_reaped, 1, __ATOMIC_RELAXED);
        /* A standing handshake or idle timeout is found due first at every tick: a deadline
         * due as well would never fire. It fires now, once. */
        if (reap && !(after & CF_CLOSING) && timeout_due_deadline(sv, c, now) &&
            take_deadline(sv, c))
            sv->cb.on_timeout(c, CP_CLOSE_DEADLINE);
        if (reap)
            age_standing(c, now);
        cp__lock_release(&c->lock);
    } else {
        /* Under the lock (as cp_conn_abort from a callback), so that none of c's
         * callbacks runs between the decision and the close. Aborted: queued replies are
         * cancelled, and the peer gets a reset if some were (abort_now). */
        CP__INJECT_DELAY("timed_out"); /* a send, or the next tick's sweep, may come */
        start_close(sv, c, (cp_close_reason)reason, 0, false); /* counts it (once) */
        cp__lock_release(&c->lock);
    }
}

/* The timeout of an open connection (state st) that is due at tick `now`, or -1. */
/* Ticks from a 16-bit stamp to now. A stamp ahead of now is no idleness at all: the sweep
 * reads its tick once, before a walk that may take a while, while connections accepted or
 * fed meanwhile are stamped with later ticks (and data with a late one: see
 * cp__server_tick_late). Taken modulo 2^16 such a stamp looked 65 535 ticks old, and a
 * connection accepted during the walk was reaped at once. Timeouts stay below 2^15 ticks
 * (see cp_server_create), so the sign tells. */
static uint16_t ticks_since(uint32_t now, uint16_t stamp)
{
    int16_t d = (int16_t)(uint16_t)((uint16_t)now - stamp);
    return d < 0 ? 0 : (uint16_t)d;
}

static int timeout_due(cp_server *sv, cp_conn *c, uint64_t st, uint32_t now)
{
    /* The application stopped reading (cp_conn_pause_recv): silence is its doing, not the
     * peer's. The stamp is renewed when it resumes. */
    if (st & (CF_APP_PAUSED | CF_RX_ENDED))
        return timeout_due_deadline(sv, c, now) ? CP_CLOSE_DEADLINE : -1;
    uint16_t idle = ticks_since(now, st_tick(st));
    if (sv->hs_ticks && !(st & CF_GOT_DATA) && idle >= sv->hs_ticks)
        return CP_CLOSE_HANDSHAKE_TIMEOUT;
    if (sv->idle_ticks && idle >= sv->idle_ticks)
        return CP_CLOSE_IDLE_TIMEOUT;
    return timeout_due_deadline(sv, c, now) ? CP_CLOSE_DEADLINE : -1;
}

bool cp__conn_sweep_pin(cp_server *sv, cp_conn *c, uint32_t now)
{
    uint64_t st = st_load(c);
    if (!(st & CS_OPREF_MASK))
        return false; /* being set up, or finished */
    bool due = (st & CF_CLOSING) ? !(st & CF_CLOSE_ISSUED) : timeout_due(sv, c, st, now) >= 0;
    return due && pin_if_unchanged(c, st); /* cp__conn_sweep drops it */
}

static void sweep_step(cp_server *sv, cp_conn *c, uint32_t now);

void cp__conn_sweep(cp_server *sv, cp_conn *c, uint32_t now)
{
    sweep_step(sv, c, now);
    op_unref(sv, c, 1);
}

/* A graceful close keeps reading (and dropping) what the peer sends, also where
 * backpressure paused reading. */
static void read_on(cp_server *sv, cp_conn *c)
{
    cp__lock_acquire(&c->lock);
    if (drain_reading(c)) {
        if (sv->o.recvs > 1) {
            post_idle_slots(sv, cp__server_worker(sv), c);
        } else if (!(st_or(c, CF_RX_OUT) & CF_RX_OUT)) {
            if (post_rx(sv, cp__server_worker(sv), c, &c->rx) < 0)
                st_clear(c, CF_RX_OUT);
        }
    }
    cp__lock_release(&c->lock);
}

/* A graceful close's replies made progress: its linger counts from the current unit. */
static void linger_progress(cp_server *sv, cp_conn *c)
{
    uint64_t unit = (uint16_t)(cp__server_tick(sv) >> sv->linger_shift);
    uint64_t st = st_load(c);
    while ((st & (CF_DRAIN | CF_CLOSE_ISSUED)) == CF_DRAIN && st_tick(st) != unit) {
        uint64_t want = (st & ~CS_TICK_MASK) | unit << CS_TICK_SHIFT;
        if (__atomic_compare_exchange_n(&c->state, &st, want, true, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            return;
    }
}

/* A graceful close at a tick. It ends when the peer has every reply (and the FIN), and has
 * sent nothing unread. Else it is bounded by progress: the tick bits hold the linger unit in
 * which the replies were last seen moving (in the server's queue, or in the kernel's), and
 * once linger_ms pass without, the connection is reset, while the kernel still holds it.
 * Left to the kernel (TCP_USER_TIMEOUT, an orphaned socket) a stalled connection is dropped
 * without a word, and a peer that has taken all it was given waits for the rest forever.
 * With every reply acknowledged, what the peer still sends is read and dropped for at most
 * linger_ms, and the close then resets it (unread input) after the peer's FIN. */
static void sweep_step(cp_server *sv, cp_conn *c, uint32_t now)
{
    uint64_t st = st_load(c);
    if (!(st & CF_CLOSING)) {
        if (timeout_due(sv, c, st, now) >= 0)
            timed_out(sv, c, now);
        return;
    }
    if (st & CF_CLOSE_ISSUED)
        return;
    if (!(st & CF_DRAIN)) {
        issue_close(sv, c); /* it could not get its op (out of memory): retry */
        return;
    }
    if (!(st & CF_LINGER))
        drain_step(sv, c);
    st = st_load(c);
    if ((st & (CF_DRAIN | CF_CLOSE_ISSUED)) != CF_DRAIN)
        return; /* closed meanwhile, or aborted */
    bool queued = !(st & CF_LINGER);
    wire w = wire_state(c, queued);
    if (!queued && w == WIRE_DONE) {
        issue_close(sv, c); /* the peer has every reply */
        return;
    }
    if (w == WIRE_MOVING || (queued && w != WIRE_STALLED)) {
        linger_progress(sv, c);
        if (w == WIRE_MOVING)
            arm_backstop(sv, c); /* the kernel's clock starts afresh: not stalled */
    } else if (ticks_since(now >> sv->linger_shift, st_tick(st)) >= sv->linger_units) {
        if (w != WIRE_INPUT)
            reset_on_close(c); /* replies cut: the peer must not wait for them */
        start_close(sv, c, (cp_close_reason)((st & CF_REASON_MASK) >> CF_REASON_SHIFT), 0, false);
        return;
    }
    /* Replies still going out: a peer blocked writing reads them only once its input is
     * taken, which backpressure may have paused. */
    read_on(sv, c);
}

/* ---- receiving ------------------------------------------------------------------------- */

/* cp_socket_recv() (buf != NULL) or cp_socket_recv_pooled() (buf NULL, len the pool's
 * buffer size) of a connection's own receive op, less the checks that cannot fail there
 * (an associated socket, not a file; an aligned op; a buffer of recv_buffer bytes): once
 * or twice per message. The op being idle is still checked. */
static int submit_rx(cp_conn *c, cp_op *op, void *buf, uint32_t len)
{
    if (cp__op_in_use(op))
        return -EBUSY;
    op->u.buf = buf;
    op->cp__len = len;
    op->cp__flags = 0;
    cp__h_lock(&c->s);
    return cp__submit_locked(&c->s, op, buf ? CP_OP_RECV : CP_OP_RECV_POOL, 0);
}

/* Start a receive on op (lock held). Returns 0 or a negative errno. With have_ref the
 * caller's operation reference passes to the receive (on success). Inlined: the receive
 * handler posts the next receive with it once per message. */
static inline __attribute__((always_inline)) int post_rx_ref(cp_server *sv, cp__worker *w,
                                                             cp_conn *c, cp_op *op, bool have_ref)
{
    int r;
    if (!have_ref)
        op_ref(c);
    if (sv->o.zero_byte) {
        r = submit_rx(c, op, NULL, (uint32_t)cp_buffer_size(sv->port));
    } else {
        if (!op->u.buf) {
            uint32_t got;
            op->u.buf = cp__server_buf_alloc(sv, w, sv->o.recv_buffer, &got);
        }
        r = op->u.buf ? submit_rx(c, op, op->u.buf, sv->o.recv_buffer) : -ENOMEM;
    }
    if (r < 0 && !have_ref)
        __atomic_sub_fetch(&c->state, CS_OPREF, __ATOMIC_RELAXED); /* we hold another */
    return r;
}

static int post_rx(cp_server *sv, cp__worker *w, cp_conn *c, cp_op *op)
{
    return post_rx_ref(sv, w, c, op, false);
}

/* Whether receiving should go on (lock held): not closing, not ended, not paused by the
 * application; sets PAUSED when replies piled up. */
static bool may_read(cp_server *sv, cp_conn *c)
{
    uint64_t st = st_load(c);
    if (st & (CF_CLOSING | CF_STOP_READ | CF_APP_PAUSED | CF_RX_ENDED))
        return false;
    if (__atomic_load_n(&c->pending, __ATOMIC_SEQ_CST) > sv->o.max_pending_send) {
        if (!(st_or(c, CF_PAUSED) & CF_PAUSED))
            __atomic_add_fetch(&sv->backpressure_events, 1, __ATOMIC_RELAXED);
        /* A send that drained meanwhile saw no PAUSED and resumed nothing: look again. */
        if (__atomic_load_n(&c->pending, __ATOMIC_SEQ_CST) > sv->o.max_pending_send / 2)
            return false;
        st_clear(c, CF_PAUSED);
    }
    return true;
}

static void deliver_frames(cp_server *sv, cp_conn *c, cp__worker *w, char *buf, size_t len);

/* Hand one received chunk to the application: as is (stream mode) or frame by frame. */
static inline __attribute__((always_inline)) void
deliver(cp_server *sv, cp_conn *c, cp__worker *w, char *buf, size_t len, uint8_t kind, void *base)
{
    w->cur_conn = c;
    w->cur_kind = kind;
    w->cur_base = base;
    w->cur_size = kind == BUF_POOL ? (uint32_t)cp_buffer_size(sv->port) : sv->o.recv_buffer;
    w->cur_hold = NULL;
    cp__worker_count(w, &w->bytes_in, len); /* read by stats */
    if (!sv->o.framed) {
        w->cur_buf = buf;
        w->cur_len = len;
        w->cur_copy = false;
        sv->cb.on_data(c, buf, len);
    } else {
        deliver_frames(sv, c, w, buf, len);
    }
    w->cur_conn = NULL;
}

/* deliver() in framed mode: frame by frame. Out of line, away from the stream's path. */
static __attribute__((noinline)) void deliver_frames(cp_server *sv, cp_conn *c, cp__worker *w,
                                                     char *buf, size_t len)
{
    cp_frame_decoder *d = decoder_of(sv, c);
    const void *p = buf;
    size_t n = len;
    cp_frame f;
    int r;
    while ((r = cp_frame_next(d, &sv->frame_cfg, &p, &n, &f)) == 1) {
        __atomic_add_fetch(&sv->frames_in, 1, __ATOMIC_RELAXED);
        bool inside = (const char *)f.data >= buf && (const char *)f.data + f.len <= buf + len;
        /* A frame assembled across receives lives in the decoder: sends copy it. */
        w->cur_buf = (const char *)f.data;
        w->cur_len = f.len;
        w->cur_copy = !inside;
        sv->cb.on_data(c, f.data, f.len);
        if (st_load(c) & CF_CLOSING)
            break;
    }
    if (r < 0 && r != -ENOMEM) {
        __atomic_add_fetch(&sv->frames_rejected, 1, __ATOMIC_RELAXED);
        /* Gracefully: the replies to the good frames before it are queued, and must
         * not be cancelled (nor destroyed by a reset); the rest of the input is read
         * and dropped while they go out (bounded by linger_ms). */
        start_close(sv, c, CP_CLOSE_BAD_FRAME, 0, true);
    } else if (r == -ENOMEM) {
        start_close(sv, c, CP_CLOSE_ERROR, -ENOMEM, false);
    }
}

/* After delivering from op's buffer: give the buffer back or leave it to the sends that
 * kept it (lock held). */
static inline __attribute__((always_inline)) void end_delivery(cp_server *sv, cp__worker *w,
                                                               cp_op *op)
{
    cp__hold *h = w->cur_hold;
    if (h && h->kind == BUF_SLAB && h->buf == op->u.buf &&
        __atomic_load_n(&h->refs, __ATOMIC_ACQUIRE) == 1) {
        /* Every send that used the buffer is done already (they went out at once): the
         * buffer stays with the receive. Nothing else can take a reference any more. */
        cp__cache_free(&w->holds, &sv->holds, h);
        w->cur_hold = NULL;
    } else if (h) {
        if (!sv->o.zero_byte)
            op->u.buf = NULL; /* the hold owns it; the next receive gets a fresh one */
        hold_release(sv, w, h);
        w->cur_hold = NULL;
    } else if (sv->o.zero_byte && op->u.buf) {
        cp_buffer_release(sv->port, op->u.buf);
    }
    if (sv->o.zero_byte)
        op->u.buf = NULL;
}

/* Whether a graceful close is reading (and dropping) what the peer still sends. */
static bool drain_reading(cp_conn *c)
{
    uint64_t st = st_load(c);
    return (st & (CF_CLOSING | CF_DRAIN | CF_CLOSE_ISSUED | CF_RX_ENDED)) ==
           (CF_CLOSING | CF_DRAIN);
}

/* What a finished receive means for the connection (lock held): data was delivered by the
 * caller; 0 = the peer closed; < 0 = failed. Returns true if receiving may go on. */
static bool after_receive(cp_server *sv, cp_conn *c, int64_t res)
{
    if (res > 0)
        return drain_reading(c) || may_read(sv, c);
    uint64_t prev = st_or(c, CF_RX_ENDED);
    if (res == 0 && sv->o.framed && !(prev & CF_CLOSING) &&
        cp_frame_partial(decoder_of(sv, c)) != 0) {
        /* The stream ended inside a frame: its last message is cut, a protocol error like a
         * bad header, not an end (on_end, or CP_CLOSE_PEER, would let the application
         * believe it got everything). Gracefully: the replies to the whole frames before
         * it still go out. cp_conn_frame_state() tells how much of the frame came. */
        __atomic_add_fetch(&sv->frames_rejected, 1, __ATOMIC_RELAXED);
        start_close(sv, c, CP_CLOSE_BAD_FRAME, 0, true);
        drain_step(sv, c);
        return false;
    }
    if (res == 0 && sv->o.half_close && !(prev & CF_CLOSING)) {
        /* Half-close: the connection stays; the application closes it. Once, also when
         * several receives report the end. */
        if (!(prev & CF_RX_ENDED))
            sv->cb.on_end(c);
        drain_step(sv, c); /* on_end may have closed it */
        return false;
    }
    if (res == 0)
        start_close(sv, c, CP_CLOSE_PEER, 0, true); /* reply to what came, then close */
    else if (!(st_load(c) & CF_CLOSING))
        start_close(sv, c, CP_CLOSE_ERROR, (int)res, false);
    drain_step(sv, c);
    return false;
}

/* The peer's end reported by a receive that was outstanding when the application paused
 * reading (lock held): it is not acted on now (the application may still hold data whose
 * replies must go before the close, or on_end), but dropped; the resume posts a receive
 * again, which finds the end anew (a TCP socket reports it to every read). */
static bool end_held_by_pause(cp_conn *c, int64_t res)
{
    return res == 0 && (st_load(c) & (CF_APP_PAUSED | CF_CLOSING)) == CF_APP_PAUSED;
}

/* A receive was not posted again because the application paused reading: stop the
 * socket's background pooled receive too (io_uring), unless another receive still waits.
 * (Backpressure pauses do not: they end as soon as replies drain.) */
static void park_if_paused(cp_server *sv, cp_conn *c)
{
    if (sv->o.zero_byte && (st_load(c) & (CF_APP_PAUSED | CF_CLOSING)) == CF_APP_PAUSED)
        cp__socket_pool_park(&c->s);
}

/* The single receive completed. Returns true if its operation reference went on to the
 * next receive (posted again on the same op); false if the caller must drop it. RX_OUT
 * stays set while a receive is posted or its completion is being handled: everyone else
 * takes it under the lock, which this holds throughout, except a resume that finds the
 * lock taken (read_again_anywhere), which leaves the read to this when it is set. */
static bool rx_single(cp_server *sv, cp__worker *w, cp_conn *c, cp_op *op, int64_t res)
{
    cp__lock_acquire(&c->lock);
    w->rx_conn = c;
    if (res > 0 && !(st_load(c) & CF_CLOSING)) {
        touch(c, data_tick(sv));
        deliver(sv, c, w, op->u.buf, (size_t)res, sv->o.zero_byte ? BUF_POOL : BUF_SLAB, op->u.buf);
        end_delivery(sv, w, op);
    } else if (sv->o.zero_byte) {
        /* A closing connection drops data that still arrives: its replies could not go. */
        if (res > 0 && op->u.buf)
            cp_buffer_release(sv->port, op->u.buf);
        op->u.buf = NULL;
    }
    bool reposted = false;
    if (!end_held_by_pause(c, res) && after_receive(sv, c, res)) {
        int r = post_rx_ref(sv, w, c, op, true);
        if (r < 0)
            start_close(sv, c, CP_CLOSE_ERROR, r, false);
        else
            reposted = true;
    }
    if (!reposted) {
        CP__INJECT_DELAY("rx_stopping"); /* a resume may come after the look above */
        /* A resume that came after the look above found RX_OUT set and left the read to
         * this: look again once it is clear. (Not per message: only when reading stops,
         * and with the atomic that clears RX_OUT anyway.) */
        uint64_t was = __atomic_fetch_and(&c->state, ~(uint64_t)CF_RX_OUT, __ATOMIC_SEQ_CST);
        if (!(was & (CF_APP_PAUSED | CF_CLOSING | CF_STOP_READ | CF_RX_ENDED)))
            read_again(sv, w, c);
        park_if_paused(sv, c); /* also if a pause came after that look */
    }
    w->rx_conn = NULL;
    cp__lock_release(&c->lock);
    return reposted;
}

/* Post every idle slot, in sequence order (lock held). */
static void post_idle_slots(cp_server *sv, cp__worker *w, cp_conn *c)
{
    cp__rx_multi *m = multi_of(sv, c);
    for (unsigned i = 0; i < sv->o.recvs; i++) {
        cp__rx_slot *s = slot_of(sv, c, i);
        if (s->len != SLOT_IDLE)
            continue;
        s->seq = m->next_post++;
        s->len = SLOT_POSTED;
        int r = post_rx(sv, w, c, &s->op);
        if (r < 0) {
            s->len = SLOT_IDLE;
            start_close(sv, c, CP_CLOSE_ERROR, r, false);
            return;
        }
    }
}

static void rx_multi(cp_server *sv, cp__worker *w, cp_conn *c, cp_op *op, int64_t res)
{
    cp__rx_multi *m = multi_of(sv, c);
    cp__lock_acquire(&c->lock);
    cp__rx_slot *done = CP_CONTAINER_OF(op, cp__rx_slot, op);
    done->len = res < INT32_MIN + 2 ? -EIO : (int32_t)res;
    /* Deliver every completed receive whose turn has come, in the order posted. Data the
     * kernel already handed over is delivered even when backpressure pauses reading;
     * only a closing connection drops it (its replies could not be sent). */
    for (;;) {
        cp__rx_slot *s = NULL;
        for (unsigned i = 0; i < sv->o.recvs && !s; i++) {
            cp__rx_slot *t = slot_of(sv, c, i);
            if (t->len != SLOT_POSTED && t->len != SLOT_IDLE && t->seq == m->next_deliver)
                s = t;
        }
        if (!s)
            break;
        m->next_deliver++;
        int32_t len = s->len;
        s->len = SLOT_IDLE;
        if (len > 0 && !(st_load(c) & CF_CLOSING)) {
            touch(c, data_tick(sv));
            deliver(sv, c, w, s->op.u.buf, (size_t)len, sv->o.zero_byte ? BUF_POOL : BUF_SLAB,
                    s->op.u.buf);
            end_delivery(sv, w, &s->op);
        } else if (sv->o.zero_byte && s->op.u.buf) {
            cp_buffer_release(sv->port, s->op.u.buf);
            s->op.u.buf = NULL;
        }
        if (len <= 0 && !end_held_by_pause(c, len))
            after_receive(sv, c, len);
    }
    if (drain_reading(c) || may_read(sv, c))
        post_idle_slots(sv, w, c);
    else
        park_if_paused(sv, c);
    cp__lock_release(&c->lock);
}

/* Post the receives that are not outstanding, if reading may run (lock held). While
 * backpressure holds (PAUSED) it waits for maybe_resume: the replies must drain below half
 * the cap first, also when the application resumes meanwhile. */
static void read_again(cp_server *sv, cp__worker *w, cp_conn *c)
{
    if (st_load(c) & CF_PAUSED) {
        if (__atomic_load_n(&c->pending, __ATOMIC_SEQ_CST) > sv->o.max_pending_send / 2)
            return;
        /* Drained already: bytes a send counted and then took back (it failed to start)
         * left the flag with no completion to come and clear it. */
        st_clear(c, CF_PAUSED);
    }
    if (!may_read(sv, c))
        return;
    if (sv->o.recvs > 1) {
        post_idle_slots(sv, w, c);
    } else if (!(st_or(c, CF_RX_OUT) & CF_RX_OUT)) {
        int r = post_rx(sv, w, c, &c->rx);
        if (r < 0) {
            st_clear(c, CF_RX_OUT);
            start_close(sv, c, CP_CLOSE_ERROR, r, false);
        }
    }
}

/* Replies drained below half the cap: read again (any worker), unless the application
 * paused reading too (its resume reads again then). */
static void maybe_resume(cp_server *sv, cp_conn *c)
{
    if (!(st_load(c) & CF_PAUSED) ||
        __atomic_load_n(&c->pending, __ATOMIC_SEQ_CST) > sv->o.max_pending_send / 2)
        return;
    cp__lock_acquire(&c->lock);
    uint64_t st = st_load(c);
    /* Look at `pending` again: a delivery may have paused the connection anew meanwhile. */
    if ((st & CF_PAUSED) && !(st & (CF_CLOSING | CF_STOP_READ)) &&
        __atomic_load_n(&c->pending, __ATOMIC_SEQ_CST) <= sv->o.max_pending_send / 2) {
        st_clear(c, CF_PAUSED);
        read_again(sv, cp__server_worker(sv), c);
    }
    cp__lock_release(&c->lock);
}

/* ---- pausing ------------------------------------------------------------------------------ */

int cp_conn_pause_recv(cp_conn *c)
{
    if (!c)
        return -EINVAL;
    cp_server *sv = cp__conn_server(c);
    uint64_t st = st_load(c);
    do {
        if (st & CF_CLOSING)
            return -EPIPE;
        if (st & CF_APP_PAUSED)
            return 0;
    } while (!__atomic_compare_exchange_n(&c->state, &st, st | CF_APP_PAUSED, true,
                                          __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    /* Receives outstanding complete (and deliver) as usual and are not posted again. With
     * none outstanding (backpressure had paused reading, or the receive side is between a
     * completion and its next post, which then sees the flag), stop the background
     * receive now: it would go on filling pool buffers. */
    if (sv->o.zero_byte)
        cp__socket_pool_park(&c->s);
    return 0;
}

/* A read-again handed to a worker (read_again_anywhere): c->rx is free again, then read
 * again, looking at the state as it is now, so that a resume that found c->rx taken
 * meanwhile (and left the read to this) is seen. */
static void read_again_handed(cp_server *sv, cp__worker *w, cp_conn *c)
{
    cp__lock_acquire(&c->lock);
    st_clear(c, CF_RX_OUT);
    read_again(sv, w, c);
    cp__lock_release(&c->lock);
}

/* Read again from any thread, for an operation reference the caller took (passed on or
 * dropped here); cannot fail. c's lock is held by its callbacks (the caller may be one: a
 * resume from on_data) and its receive path; waiting for it here could deadlock two
 * connections whose callbacks resume each other. Taken only if free, else a worker reads:
 * the caller takes c->rx (CF_RX_OUT) and queues it to the port as a completion
 * (OP_READ_AGAIN). If c->rx is taken already, its holder (a receive posted or being
 * handled, with recvs == 1; a read-again queued) looks at the state again when it lets
 * c->rx go, which comes after this look: that read is left to it. */
static void read_again_anywhere(cp_server *sv, cp_conn *c)
{
    if (cp__lock_try(&c->lock)) {
        read_again(sv, cp__server_worker(sv), c);
        cp__lock_release(&c->lock);
        op_unref_caller(sv, c);
        return;
    }
    uint64_t st = st_load(c);
    do {
        if (st & CF_RX_OUT) {
            op_unref_caller(sv, c);
            return;
        }
    } while (!__atomic_compare_exchange_n(&c->state, &st, st | CF_RX_OUT, true, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    complete_on_rx(sv, c, OP_READ_AGAIN);
}

/* Bytes counted in `pending` for a send that then did not start came off again: if a
 * delivery meanwhile paused reading on their account (backpressure), no completion will
 * come to resume it, so read again here (the caller may hold c's lock: a callback of c
 * sending on c). */
static void unqueued(cp_server *sv, cp_conn *c)
{
    if (!(st_load(c) & CF_PAUSED) ||
        __atomic_load_n(&c->pending, __ATOMIC_SEQ_CST) > sv->o.max_pending_send / 2)
        return;
    /* Only while not closing (the life reference is held then): a closing connection
     * reads on regardless, and a sender holding only a cp_conn_ref has no reference. */
    uint64_t st = st_load(c);
    do {
        if (st & CF_CLOSING)
            return;
    } while (!__atomic_compare_exchange_n(&c->state, &st, st + CS_OPREF, true, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    read_again_anywhere(sv, c);
}

int cp_conn_resume_recv(cp_conn *c)
{
    if (!c)
        return -EINVAL;
    cp_server *sv = cp__conn_server(c);
    uint64_t stamp = (uint64_t)data_tick(sv) << CS_TICK_SHIFT;
    uint64_t st = st_load(c);
    /* Unpaused, with the idle (handshake) timeout counting from now, and an operation
     * reference for what follows, in one step: while not closing, the life reference is
     * held, so the count is not zero. */
    do {
        if (st & CF_CLOSING)
            return -EPIPE;
        if (!(st & CF_APP_PAUSED))
            return 0;
    } while (!__atomic_compare_exchange_n(
        &c->state, &st, ((st & ~(uint64_t)CF_APP_PAUSED & ~CS_TICK_MASK) | stamp) + CS_OPREF, true,
        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    read_again_anywhere(sv, c);
    return 0;
}

/* ---- sending --------------------------------------------------------------------------- */

/* Give back what a send that was not queued holds: its copy, or its share of a hold. */
static void drop_send(cp_server *sv, cp__worker *w, cp__send *x)
{
    if (x->kind == SEND_COPY)
        cp__server_buf_free(sv, w, x->buf, x->buf_size);
    else if (x->kind == SEND_HOLD)
        hold_release(sv, w, x->hold);
    cp__cache_free(&w->sends, &sv->sends, x);
}

static cp__send *new_send(cp_server *sv, cp__worker *w, uint8_t kind, size_t len)
{
    cp__send *x = cp__cache_alloc(&w->sends, &sv->sends);
    if (!x)
        return NULL;
    memset(&x->op, 0, sizeof(x->op));
    x->kind = kind;
    x->len = (uint32_t)len;
    x->buf = NULL;
    x->hold = NULL;
    x->ctx = NULL;
    return x;
}

/* What a send keeps of bytes the kernel did not take at once. */
typedef enum tail_mode {
    TAIL_COPY, /* a copy (the caller's memory is free when the call returns) */
    TAIL_HOLD, /* a reference on the buffer being delivered (cp_conn_send_data) */
    TAIL_REF,  /* the caller's memory itself; on_sent(ctx) when done */
} tail_mode;

/* Copy `n` bytes of iov[0..cnt-1], after skipping `skip`, to `to`. */
static void gather(char *to, const struct iovec *iov, int cnt, size_t skip, size_t n)
{
    for (int i = 0; i < cnt && n; i++) {
        size_t l = iov[i].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        size_t take = l - skip < n ? l - skip : n;
        memcpy(to, (const char *)iov[i].iov_base + skip, take);
        to += take;
        n -= take;
        skip = 0;
    }
}

/* Build the send context for the `rest` bytes after `skip` of iov (c's socket is locked).
 * Returns it, or NULL when out of memory. */
static cp__send *tail_send(cp_server *sv, cp__worker *w, const struct iovec *iov, int cnt,
                           size_t skip, size_t rest, tail_mode mode, void *ctx)
{
    if (mode == TAIL_REF) {
        cp__send *x = new_send(sv, w, SEND_REF, rest);
        if (x) {
            x->ctx = ctx;
            x->iov[0] = iov[0];
        }
        return x;
    }
    /* Not when the reply is a small part of the buffer, either: a peer that does not read
     * would make reading pause only when max_pending_send bytes of replies are queued, and
     * each reply of a little over 4 KiB kept a whole buffer (16 times as much memory as the
     * cap counts with 64 KiB buffers). At a quarter of a buffer or more, what is kept stays
     * within 4 times what is counted (as a copy does, rounded up to its size class), and
     * a 16 KiB echo from a 64 KiB buffer still goes out without a copy. */
    if (mode == TAIL_HOLD && rest > CP__SEND_HOLD_MIN && (uint64_t)rest * 4 >= w->cur_size) {
        /* Keep the delivered buffer alive rather than copying a large reply. Not for a
         * small one: a copy into a small buffer is cheaper than keeping a whole receive
         * buffer (and taking a fresh one for the next receive); and a pool buffer may
         * hold other sockets' data too: a reply of at least CP__SEND_HOLD_MIN keeps at
         * most pool_buffer_size / CP__SEND_HOLD_MIN times its own size from the pool
         * (bounded by max_pending_send for a peer that does not read). */
        cp__hold *h = w->cur_hold;
        if (!h && (h = cp__cache_alloc(&w->holds, &sv->holds)) != NULL) {
            h->buf = w->cur_base;
            h->size = w->cur_size;
            h->kind = w->cur_kind;
            h->refs = 1; /* the delivery's own, dropped when on_data returns */
            w->cur_hold = h;
        }
        if (h) {
            cp__send *x = new_send(sv, w, SEND_HOLD, rest);
            if (x) {
                __atomic_add_fetch(&h->refs, 1, __ATOMIC_RELAXED);
                x->hold = h;
                x->iov[0] = (struct iovec){(char *)iov[0].iov_base + skip, rest};
            }
            return x;
        }
    }
    bool small = rest <= CP__SEND_INLINE;
    cp__send *x = new_send(sv, w, small ? SEND_INLINE : SEND_COPY, rest);
    if (!x)
        return NULL;
    char *to = x->inl;
    if (!small) {
        to = x->buf = cp__server_buf_alloc(sv, w, rest, &x->buf_size);
        if (!to) {
            cp__cache_free(&w->sends, &sv->sends, x);
            return NULL;
        }
    }
    gather(to, iov, cnt, skip, rest);
    x->iov[0] = (struct iovec){to, rest};
    return x;
}

/* Account n more bytes queued to send, unless that would pass the 32-bit counter's range
 * (4 GiB queued on one connection): a wrapped count would read as "nothing queued", and a
 * graceful close would then send its FIN ahead of the data. */
static bool pending_add(cp_conn *c, uint32_t n)
{
    uint32_t cur = __atomic_load_n(&c->pending, __ATOMIC_RELAXED);
    do {
        if (n > UINT32_MAX - cur)
            return false;
    } while (!__atomic_compare_exchange_n(&c->pending, &cur, cur + n, true, __ATOMIC_SEQ_CST,
                                          __ATOMIC_RELAXED));
    return true;
}

/* Send iov[0..cnt-1] (len bytes in all) on c; w is the calling thread's record.
 *
 * The bytes go to the kernel right here when nothing is queued ahead of them and the
 * socket has room: such a send needs no context, no copy, no accounting and no
 * completion (IOCP's skip-completion-on-success), from any thread. Whatever the kernel
 * does not take is queued, in order (the socket stays locked in between), with a context
 * that keeps it, is accounted in `pending` and an operation reference, and completes
 * through the port. Sends with a caller's on_sent (TAIL_REF) always take that way, so
 * that their callbacks come in order. */
static int queue_send(cp_server *sv, cp__worker *w, cp_conn *c, const struct iovec *iov, int cnt,
                      size_t len, size_t sent_now, tail_mode mode, void *ctx);

static inline __attribute__((always_inline)) int conn_send(cp_server *sv, cp__worker *w, cp_conn *c,
                                                           const struct iovec *iov, int cnt,
                                                           size_t len, tail_mode mode, void *ctx)
{
    if (len == 0 || len > UINT32_MAX - 8)
        return -EINVAL;
    uint64_t st = st_load(c);
    if (!takes_sends(st))
        return -EPIPE;
    if ((st & CS_OPREF_MASK) >= SENDS_LIMIT)
        return -ENOBUFS; /* about a million sends queued: the reference count is full */
    if (sv->o.send_queue_limit &&
        __atomic_load_n(&c->pending, __ATOMIC_RELAXED) + (uint64_t)len > sv->o.send_queue_limit) {
        __atomic_add_fetch(&sv->sends_refused, 1, __ATOMIC_RELAXED);
        return -ENOBUFS;
    }
    CP__INJECT_DELAY("send_checked"); /* a graceful close may begin meanwhile */
    long n = cp__send_try(&c->s, iov, cnt, len, mode != TAIL_REF);
    if (n == (long)len) {
        cp__worker_count(w, &w->bytes_out, len);
        return 0;
    }
    if (n < 0)
        return -EPIPE; /* closing */
    return queue_send(sv, w, c, iov, cnt, len, (size_t)n, mode, ctx);
}

/* The rest of conn_send(): the kernel took sent_now of the len bytes, and c's socket is
 * locked: queue the rest behind nothing. Out of line: the common path sends all at once. */
static __attribute__((noinline)) int queue_send(cp_server *sv, cp__worker *w, cp_conn *c,
                                                const struct iovec *iov, int cnt, size_t len,
                                                size_t sent_now, tail_mode mode, void *ctx)
{
    long n = (long)sent_now;
    size_t rest = len - (size_t)n;
    int err = -ENOBUFS;
    cp__send *x = NULL;
    if (pending_add(c, (uint32_t)rest)) {
        err = -ENOMEM;
        x = tail_send(sv, w, iov, cnt, (size_t)n, rest, mode, ctx);
        if (!x)
            __atomic_sub_fetch(&c->pending, (uint32_t)rest, __ATOMIC_SEQ_CST);
    }
    if (!x) {
        cp__h_unlock(&c->s);
        if (n > 0) {
            /* Part of it went out: the stream cannot go on without the rest. Aborted, with
             * a reset: a plain close would send what the kernel holds and then a FIN, and
             * the peer would take the cut stream for a whole one. */
            reset_on_close(c);
            start_close(sv, c, CP_CLOSE_ERROR, err, false);
        } else {
            unqueued(sv, c);
        }
        return err;
    }
    if (n > 0)
        cp__worker_count(w, &w->bytes_out, (uint64_t)n);
    op_ref(c);
    x->op.u.buf = x->iov[0].iov_base;
    x->op.cp__len = x->len;
    /* A failure resets at once: a reply queued behind it must not follow its hole. */
    x->op.cp__flags = CP__OPF_STREAM;
    int r = cp__submit_locked(&c->s, &x->op, CP_OP_SEND, 1);
    if (r < 0) { /* not reached: the socket was not closing, and sends never get -EBUSY */
        __atomic_sub_fetch(&c->pending, x->len, __ATOMIC_SEQ_CST);
        drop_send(sv, w, x);
        op_unref_caller(sv, c); /* (any thread) */
        return -EPIPE;
    }
    bound_late_send(sv, c);
    return 0;
}

int cp_conn_send(cp_conn *c, const void *data, size_t len)
{
    if (!c || !data || len == 0)
        return -EINVAL;
    cp_server *sv = cp__conn_server(c);
    struct iovec iov = {(void *)(uintptr_t)data, len};
    return conn_send(sv, cp__server_worker(sv), c, &iov, 1, len, TAIL_COPY, NULL);
}

int cp_conn_send_frame(cp_conn *c, const void *payload, size_t len)
{
    if (!c || (!payload && len) || len > CP_FRAME_MAX_LIMIT)
        return -EINVAL;
    cp_server *sv = cp__conn_server(c);
    /* A frame on a stream server is the application's mistake (the server was meant to be
     * framed, and reads the peer's frames as a stream): say so, as cp_conn_frame_state(). */
    if (!sv->o.framed)
        return -EINVAL;
    uint8_t hdr[4];
    cp_frame_header(hdr, (uint32_t)len);
    struct iovec iov[2] = {{hdr, 4}, {(void *)(uintptr_t)payload, len}};
    return conn_send(sv, cp__server_worker(sv), c, iov, len ? 2 : 1, 4 + len, TAIL_COPY, NULL);
}

int cp_conn_send_data(cp_conn *c, const void *data, size_t len)
{
    if (!c || !data || len == 0)
        return -EINVAL;
    cp_server *sv = cp__conn_server(c);
    cp__worker *w = cp__server_worker(sv);
    if (w->cur_conn != c)
        return -EINVAL; /* not inside this connection's on_data */
    const char *d = data;
    struct iovec iov = {(void *)(uintptr_t)data, len};
    if (d < w->cur_buf || len > w->cur_len || (size_t)(d - w->cur_buf) > w->cur_len - len)
        return -EINVAL;
    /* A frame assembled by the decoder does not stay: copied. */
    return conn_send(sv, w, c, &iov, 1, len, w->cur_copy ? TAIL_COPY : TAIL_HOLD, NULL);
}

/* What a transmit counts in `pending` (a 32-bit counter): its bytes, capped at half the
 * range so that a huge file cannot wrap it. */
static uint32_t xmit_pending(const cp__xmit *x)
{
    return (uint32_t)(x->len > UINT32_MAX / 2 ? UINT32_MAX / 2 : x->len);
}

int cp_conn_send_file(cp_conn *c, const void *head, size_t head_len, int fd, int64_t offset,
                      uint64_t len, void *ctx)
{
    if (!c || !ctx || fd < 0 || offset < 0 || len == 0 || (head_len && !head) ||
        head_len > UINT32_MAX)
        return -EINVAL;
    cp_server *sv = cp__conn_server(c);
    int refd = op_ref_unless_closing(c);
    if (refd < 0)
        return refd;
    CP__INJECT_DELAY("send_file_ref"); /* the connection may start closing meanwhile */
    cp__xmit *x = cp__slab_alloc(&sv->xmits);
    if (!x) {
        op_unref_caller(sv, c);
        return -ENOMEM;
    }
    memset(&x->t, 0, sizeof(x->t));
    x->head = NULL;
    x->head_size = 0;
    cp__worker *w = cp__server_worker(sv);
    if (head_len) {
        x->head = cp__server_buf_alloc(sv, w, head_len, &x->head_size);
        if (!x->head) {
            cp__slab_free(&sv->xmits, x);
            op_unref_caller(sv, c);
            return -ENOMEM;
        }
        memcpy(x->head, head, head_len);
    }
    x->len = head_len + len;
    x->ctx = ctx;
    if (!pending_add(c, xmit_pending(x))) {
        if (x->head)
            cp__server_buf_free(sv, w, x->head, x->head_size);
        cp__slab_free(&sv->xmits, x);
        op_unref_caller(sv, c);
        return -ENOBUFS;
    }
    CP__INJECT_DELAY("send_file_counted"); /* a delivery may see these bytes meanwhile */
    /* A transmit that fails (a file shorter than its range) aborts the connection: the
     * replies queued behind it must not go out first, into its hole (CP__TF_STREAM). */
    int r = cp__transmit_file_stream(&c->s, &x->t, fd, offset, len, x->head, head_len);
    if (r < 0) {
        /* A graceful close that looked meanwhile saw these bytes pending and left the
         * close to their completion: there is none, so look again. */
        if (__atomic_sub_fetch(&c->pending, xmit_pending(x), __ATOMIC_SEQ_CST) == 0) {
            uint64_t st = st_load(c);
            if (st & CF_DRAIN)
                drain_step(sv, c);
            else if (st & CF_SHUT_SEND)
                fin_step(c);
        }
        unqueued(sv, c);
        if (x->head)
            cp__server_buf_free(sv, w, x->head, x->head_size);
        cp__slab_free(&sv->xmits, x);
        op_unref_caller(sv, c);
        return r == -EBADF ? -EPIPE : r;
    }
    bound_late_send(sv, c);
    return 0;
}

int cp_conn_send_ref(cp_conn *c, const void *data, size_t len, void *ctx)
{
    if (!c || !data || len == 0 || !ctx || len > UINT32_MAX)
        return -EINVAL;
    cp_server *sv = cp__conn_server(c);
    struct iovec iov = {(void *)(uintptr_t)data, len};
    return conn_send(sv, cp__server_worker(sv), c, &iov, 1, len, TAIL_REF, ctx);
}

/* A send of `len` bytes left the queue: close if draining and empty, else resume. Its
 * bytes stop counting before its on_sent (ctx), so that a send made there, the next
 * chunk of a stream the application feeds from on_sent, finds the room this one freed
 * (under send_queue_limit it was refused, and no later on_sent came to try again). */
static void sent(cp_server *sv, cp_conn *c, uint32_t len, int64_t res, void *ctx)
{
    if (res < 0 && res != -ECANCELED)
        start_close(sv, c, CP_CLOSE_ERROR, (int)res, false);
    /* Pairs with start_close: it sets DRAIN, then reads `pending`. */
    uint32_t left = __atomic_sub_fetch(&c->pending, len, __ATOMIC_SEQ_CST);
    if (ctx) {
        cp__lock_acquire(&c->lock);
        sv->cb.on_sent(c, ctx, res);
        cp__lock_release(&c->lock);
        left = __atomic_load_n(&c->pending, __ATOMIC_SEQ_CST); /* it may have sent more */
    }
    uint64_t st = left == 0 ? st_load(c) : 0;
    if (st & CF_DRAIN) {
        drain_step(sv, c);
    } else {
        if (st & CF_SHUT_SEND)
            fin_step(c);
        maybe_resume(sv, c);
    }
}

static void xmit_done(cp_server *sv, cp__worker *w, cp_conn *c, cp__xmit *x, int64_t res)
{
    /* A failed or cancelled transmit counts what it handed to the kernel before. */
    uint64_t out = res >= 0 ? (uint64_t)res : x->t.sent;
    if (out)
        cp__worker_count(w, &w->bytes_out, out);
    if (x->head)
        cp__server_buf_free(sv, w, x->head, x->head_size);
    uint32_t len = xmit_pending(x);
    void *ctx = sv->cb.on_sent ? x->ctx : NULL;
    cp__slab_free(&sv->xmits, x);
    sent(sv, c, len, res, ctx);
}

static void send_done(cp_server *sv, cp__worker *w, cp_conn *c, cp__send *x, int64_t res)
{
    /* A failed or cancelled send counts the part the kernel took before (cp__done). */
    uint64_t out = res >= 0 ? (uint64_t)res : cp_op_transferred(&x->op);
    if (out)
        cp__worker_count(w, &w->bytes_out, out);
    void *ctx = NULL;
    if (x->kind == SEND_COPY)
        cp__server_buf_free(sv, w, x->buf, x->buf_size);
    else if (x->kind == SEND_HOLD)
        hold_release(sv, w, x->hold);
    else if (x->kind == SEND_REF && sv->cb.on_sent)
        ctx = x->ctx;
    uint32_t len = x->len;
    cp__cache_free(&w->sends, &sv->sends, x);
    sent(sv, c, len, res, ctx);
}

/* ---- dispatch and set-up ---------------------------------------------------------------- */

void cp__conn_io(cp_socket *s, cp_op *op, int64_t result, void *user)
{
    cp_server *sv = user;
    cp_conn *c = CP_CONTAINER_OF(s, cp_conn, s);
    cp__worker *w = cp__server_worker_own(sv);
    cp__worker_count(w, &w->completions, 1);
    switch (op->opcode) {
    case CP_OP_RECV:
    case CP_OP_RECV_POOL:
        if (sv->o.recvs <= 1) {
            if (rx_single(sv, w, c, op, result))
                return; /* its reference went on to the next receive */
        } else {
            rx_multi(sv, w, c, op, result);
        }
        op_unref(sv, c, 1);
        return;
    case CP_OP_SEND:
        send_done(sv, w, c, CP_CONTAINER_OF(op, cp__send, op), result);
        op_unref(sv, c, 1);
        return;
    case CP_OP_TRANSMIT:
        xmit_done(sv, w, c, CP_CONTAINER_OF(op, cp__xmit, t.op), result);
        op_unref(sv, c, 1);
        return;
    case CP_OP_CLOSE:
        close_op_give(sv, w, op);
        op_unref(sv, c, 2); /* its own and the connection's life reference */
        return;
    case OP_READ_AGAIN:
        read_again_handed(sv, w, c);
        op_unref(sv, c, 1);
        return;
    case OP_LAST_UNREF: /* op_unref_caller() */
    default:
        op_unref(sv, c, 1);
        return;
    }
}

/* An accepted socket is not kept: count it rejected, take back its place in conns_open if
 * it took one (`counted`: admit() gave it one), close it. Counted before the close: the
 * peer sees the close, and must then see the count. */
static void refuse(cp_server *sv, int fd, bool counted)
{
    __atomic_add_fetch(&sv->conns_rejected, 1, __ATOMIC_SEQ_CST);
    CP__INJECT_DELAY("refuse_count"); /* others connect, close, shut down meanwhile */
    if (counted)
        conns_open_drop(sv);
    close(fd);
}

/* Take a place in conns_open, unless max_conns are open. Checked and taken in one step:
 * several workers accept at once, and a check-then-add would let each of them pass the
 * limit. A connection refused here is never counted: counted first and taken back after,
 * it filled a place meanwhile, and a connection arriving then on another worker was
 * refused although fewer than max_conns were open. */
static bool admit(cp_server *sv)
{
    uint64_t open = __atomic_load_n(&sv->conns_open, __ATOMIC_SEQ_CST);
    do {
        if (sv->o.max_conns && open >= sv->o.max_conns)
            return false;
    } while (!__atomic_compare_exchange_n(&sv->conns_open, &open, open + 1, true, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    return true;
}

/* Replies go out at once (no Nagle delay). The listener has TCP_NODELAY set, and Linux
 * copies it to accepted sockets: the first connection checks that, and only where it does
 * not hold does every connection pay a setsockopt (a system call per connection). */
static void set_nodelay(cp_server *sv, int fd)
{
    int inherited = __atomic_load_n(&sv->nodelay_inherited, __ATOMIC_RELAXED);
    if (inherited == 0) {
        int on = 0;
        socklen_t len = sizeof(on);
        inherited = getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, &len) == 0 && on ? 1 : -1;
        __atomic_store_n(&sv->nodelay_inherited, inherited, __ATOMIC_RELAXED);
    }
    if (inherited < 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
}

void cp__conn_start(cp_server *sv, int fd)
{
    if (!admit(sv)) {
        refuse(sv, fd, false); /* at the limit: refused at once, the others keep service */
        return;
    }
    cp__worker *w = cp__server_worker(sv);
    cp_conn *c = cp__cache_alloc(&w->conns, &sv->conns);
    if (!c) {
        refuse(sv, fd, true);
        return;
    }
    /* Everything but the state word, which the sweep and shutdown read while walking the
     * slab: it keeps saying "no references" (skipped) until the set-up is published. The
     * deadline is cleared atomically: the sweep reads it (before its pin fails on the new
     * state) of a record that may be set up again meanwhile. */
    size_t st_off = offsetof(cp_conn, state), st_end = st_off + sizeof(c->state);
    size_t dl_end = sv->off_deadline + (sv->o.conn_deadlines ? sizeof(uint32_t) : 0);
    memset(c, 0, st_off);
    memset((char *)c + st_end, 0, sv->off_deadline - st_end);
    if (sv->o.conn_deadlines)
        __atomic_store_n(deadline_of(sv, c), 0, __ATOMIC_RELAXED);
    memset((char *)c + dl_end, 0, sv->off_user + sv->o.conn_user_size - dl_end);
    set_nodelay(sv, fd);
    /* Accepted with SOCK_NONBLOCK. */
    if (cp__socket_associate_nonblocking(&c->s, sv->port, fd, (uintptr_t)&sv->conn_binding) < 0) {
        cp__cache_free(&w->conns, &sv->conns, c);
        refuse(sv, fd, true);
        return;
    }
    /* The life reference, plus one for this set-up; the handshake timeout counts from a
     * late stamp, like data's (never early, and the exact clock costs more per connection). */
    __atomic_store_n(&c->state, 2 * CS_OPREF | ((uint64_t)data_tick(sv) << CS_TICK_SHIFT),
                     __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&sv->stopping, __ATOMIC_SEQ_CST)) {
        start_close(sv, c, CP_CLOSE_SHUTDOWN, 0, false);
        op_unref(sv, c, 1);
        return;
    }
    cp__lock_acquire(&c->lock);
    if (sv->cb.on_open && sv->cb.on_open(c) < 0) {
        __atomic_add_fetch(&sv->conns_rejected, 1, __ATOMIC_RELAXED);
        cp__lock_release(&c->lock);
        start_close(sv, c, CP_CLOSE_LOCAL, 0, false);
        op_unref(sv, c, 1);
        return;
    }
    __atomic_add_fetch(&sv->conns_total, 1, __ATOMIC_RELAXED);
    st_or(c, CF_OPEN);
    if (sv->o.recvs > 1)
        for (unsigned i = 0; i < sv->o.recvs; i++)
            slot_of(sv, c, i)->len = SLOT_IDLE;
    read_again(sv, w, c); /* unless on_open paused reading */
    cp__lock_release(&c->lock);
    op_unref(sv, c, 1);
}

void *cp_conn_user(cp_conn *c)
{
    cp_server *sv = cp__conn_server(c);
    return sv->o.conn_user_size ? (char *)c + sv->off_user : NULL;
}

cp_server *cp_conn_server(cp_conn *c)
{
    return cp__conn_server(c);
}

int cp_conn_frame_state(cp_conn *c, char *buf, size_t size)
{
    if (!c)
        return -EINVAL;
    cp_server *sv = cp__conn_server(c);
    if (!sv->o.framed)
        return -EINVAL;
    return cp_frame_describe(decoder_of(sv, c), &sv->frame_cfg, buf, size);
}

int cp_conn_peer(cp_conn *c, struct sockaddr_storage *addr, socklen_t *len)
{
    if (!c || !addr || !len)
        return -EINVAL;
    *len = sizeof(*addr);
    int fd = cp__socket_fd_hold(&c->s);
    if (fd < 0)
        return fd;
    int r = getpeername(fd, (struct sockaddr *)addr, len) == 0 ? 0 : -errno;
    cp__socket_fd_release(&c->s);
    return r;
}

int cp_conn_setsockopt(cp_conn *c, int level, int name, const void *val, socklen_t len)
{
    if (!c)
        return -EINVAL;
    int fd = cp__socket_fd_hold(&c->s);
    if (fd < 0)
        return fd;
    int r = setsockopt(fd, level, name, val, len) == 0 ? 0 : -errno;
    cp__socket_fd_release(&c->s);
    return r;
}

int cp_conn_getsockopt(cp_conn *c, int level, int name, void *val, socklen_t *len)
{
    if (!c)
        return -EINVAL;
    int fd = cp__socket_fd_hold(&c->s);
    if (fd < 0)
        return fd;
    int r = getsockopt(fd, level, name, val, len) == 0 ? 0 : -errno;
    cp__socket_fd_release(&c->s);
    return r;
}

size_t cp_conn_pending(const cp_conn *c)
{
    return __atomic_load_n(&c->pending, __ATOMIC_RELAXED);
}

int cp_conn_fd(const cp_conn *c)
{
    return c->s.fd;
}
