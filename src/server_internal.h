/* Internal view of the server layer, shared by server.c (the server: listener, accept
 * pool, timeout sweep, shutdown, stats) and conn.c (a connection's receive, send and close
 * paths). See cport/server.h for the behaviour. */
#ifndef CPORT_SERVER_INTERNAL_H
#define CPORT_SERVER_INTERNAL_H

#include "cport/frame.h"
#include "cport/pool.h"
#include "cport/server.h"
#include "cport/socket.h"
#include "handle.h"
#include "lookaside.h"
#include "sync.h"

#include <pthread.h>
#include <stdint.h>

/* ---- a connection --------------------------------------------------------------------- */

/* cp_conn.state, one atomic 64-bit word:
 *   bits  0-15  flags (CF_*)
 *   bits 16-31  server tick of the last data received (once closing: the close errno; in a
 *               graceful close (CF_DRAIN), the linger unit in which its replies last made
 *               progress: see sweep_step in conn.c)
 *   bits 32-51  operation references: each operation in flight (until its handler is done)
 *               plus one "life" reference dropped when the close completes. When they
 *               reach zero no callback can follow: on_close runs then. Sends are refused
 *               (-ENOBUFS) before they would pass CS_OPREF_SENDS_MAX.
 *   bits 52-63  user references (cp_conn_ref). Memory is freed when both counts are zero
 *               and on_close has run. */
enum {
    CF_OPEN = 1u << 0,         /* on_open accepted it: callbacks run, on_close will */
    CF_GOT_DATA = 1u << 1,     /* something arrived (the handshake timeout no longer applies) */
    CF_RX_OUT = 1u << 2,       /* c->rx is taken: the (single) receive is posted or being
                                  handled, or it carries a read-again to a worker */
    CF_PAUSED = 1u << 3,       /* receives held back: replies piled up (backpressure) */
    CF_CLOSING = 1u << 4,      /* closing: no new sends, no new receives */
    CF_DRAIN = 1u << 5,        /* ...after what is queued has been sent */
    CF_CLOSE_ISSUED = 1u << 6, /* cp_socket_close() called */
    CF_STOP_READ = 1u << 7,    /* the server is shutting down */
    CF_REASON_SHIFT = 8,       /* 3 bits: the cp_close_reason once CF_CLOSING is set */
    CF_REASON_MASK = 7u << 8,
    CF_ONCLOSE_DONE = 1u << 11, /* on_close has run (or will not) */
    CF_LINGER = 1u << 12,       /* graceful close: replies sent, FIN sent, reading until EOF */
    CF_RX_ENDED = 1u << 13,     /* a receive reported the end (EOF or an error) */
    CF_APP_PAUSED = 1u << 14,   /* cp_conn_pause_recv: no new receives until resumed */
    CF_SHUT_SEND = 1u << 15,    /* cp_conn_shutdown_send: no new sends; FIN once drained */
};
#define CS_FLAGS      0xffffull
#define CS_TICK_SHIFT 16
#define CS_TICK_MASK  (0xffffull << CS_TICK_SHIFT)
#define CS_OPREF      (1ull << 32)
#define CS_OPREF_MASK (0xfffffull << 32)
/* The most operation references sends may take (about a million sends queued on one
 * connection, some 400 MB of send contexts): the room above is left to the receives,
 * the close and callers racing past the check. */
#define CS_OPREF_SENDS_MAX (0xff000ull << 32)
#define CS_UREF            (1ull << 52)
#define CS_UREF_MASK       (0xfffull << 52)

/* 128 bytes with one receive in zero-byte mode, no framing, no user area. What follows
 * depends on the server's options (offsets in cp_server): receive slots when recvs > 1,
 * the frame decoder when framed, the user area. */
struct cp_conn {
    cp_socket s;
    cp_op rx;         /* the receive when recvs == 1 */
    cp__lock lock;    /* serialises callbacks and the receive side */
    uint32_t pending; /* atomic: bytes queued to send */
    uint64_t state;   /* atomic: see above */
};
#if UINTPTR_MAX == UINT64_MAX
/* The idle connection's whole cost in zero-byte mode (the README's and the benchmark's
 * 128 bytes): a field added here must make room elsewhere. */
_Static_assert(sizeof(struct cp_conn) == 128, "cp_conn is 128 bytes on 64-bit targets");
#endif

/* One receive when recvs > 1: completions are delivered in `seq` order. */
typedef struct cp__rx_slot {
    cp_op op;
    uint32_t seq;
    int32_t len; /* a completed receive waiting for its turn; -1 = none */
} cp__rx_slot;

typedef struct cp__rx_multi {
    uint32_t next_post;    /* seq of the next receive posted */
    uint32_t next_deliver; /* seq of the next receive delivered */
} cp__rx_multi;

/* A buffer handed to on_data that sends (cp_conn_send_data) may keep alive. */
typedef enum cp__buf_kind {
    BUF_POOL = 1,  /* the port's receive pool */
    BUF_SLAB = 2,  /* a connection's receive buffer from the lookaside */
    BUF_FRAME = 3, /* a frame assembled by the decoder */
} cp__buf_kind;

typedef struct cp__hold {
    void *buf;
    uint32_t size;
    uint32_t refs; /* atomic: the delivery itself + each send still using it */
    uint8_t kind;
} cp__hold;

/* A send (or close) context from the lookaside. */
typedef enum cp__send_kind {
    SEND_COPY = 1,   /* data copied into `buf` */
    SEND_HOLD = 2,   /* part of a received buffer, kept by `hold` */
    SEND_REF = 3,    /* the caller's memory; on_sent(ctx) when done */
    SEND_CLOSE = 4,  /* the op closes the socket */
    SEND_INLINE = 5, /* a small copy, in `inl` */
} cp__send_kind;

/* Sends up to this size are copied into the send context itself: cheaper than keeping
 * the received buffer (a hold) or taking a buffer from a size class. Replies from a
 * delivered buffer (cp_conn_send_data) keep that buffer only above CP__SEND_HOLD_MIN
 * (the smallest size class); smaller ones are copied. */
enum { CP__SEND_INLINE = 256, CP__SEND_HOLD_MIN = 4096 };

/* A TransmitFile through a connection (its own lookaside: bigger than a send). */
typedef struct cp__xmit {
    cp_transmit_op t;
    void *head;         /* copy of the head, from a size class (or NULL) */
    uint32_t head_size; /* its allocation size */
    uint64_t len;       /* head + file bytes, counted in `pending` */
    void *ctx;
} cp__xmit;

typedef struct cp__send {
    cp_op op;
    uint32_t len;
    uint8_t kind;
    uint8_t hdr[4]; /* framed sends: the length header */
    void *buf;      /* SEND_COPY: the copy (from a size class or malloc) */
    uint32_t buf_size;
    cp__hold *hold; /* SEND_HOLD */
    void *ctx;      /* SEND_REF */
    struct iovec iov[2];
    char inl[CP__SEND_INLINE]; /* SEND_INLINE */
} cp__send;

/* ---- the server ------------------------------------------------------------------------ */

enum { CP__SIZE_CLASSES = 3 };  /* 4 KiB, 16 KiB, 64 KiB buffers */
enum { CP__CLOSE_SPARES = 16 }; /* at most 32: a bit each in close_spares_busy */

/* Per worker thread: what on_data is handing over right now, and counters. The pool's
 * threads each get one when they first handle a completion (cp__server_worker_own). Any
 * other thread (cp_conn_send and friends may be called from any thread) uses the server's
 * one shared record instead: its caches have no room (every object goes straight to the
 * slab, under its lock) and its counters are added atomically, so a thread that exits
 * strands nothing and costs nothing, however many come and go. */
typedef struct cp__worker {
    struct cp__worker *next;
    bool shared;      /* the server's record for threads that are not its workers */
    bool pool_thread; /* taken by a worker as it started (other threads' records: false) */
    cp_conn *cur_conn;
    cp_conn *rx_conn;    /* whose receive completion this thread handles (holding its ref) */
    const char *cur_buf; /* the delivery's buffer and its extent */
    size_t cur_len;
    bool cur_copy; /* cur_buf is a frame assembled by the decoder: sends copy it */
    uint8_t cur_kind;
    void *cur_base;
    uint32_t cur_size;
    cp__hold *cur_hold;   /* created by the first cp_conn_send_data of this delivery */
    uint64_t completions; /* atomic (stores only by the owner) */
    uint64_t bytes_in;
    uint64_t bytes_out;
    /* This thread's lookaside caches: a message's send context, hold and receive buffer
     * are freed by the worker that allocates the next ones, without a lock. */
    cp__slab_cache sends, holds, bufs[CP__SIZE_CLASSES];
    /* Connections too: a free one in a cache is still walked by the sweep and shutdown,
     * which skip it (its state word says it holds no reference). */
    cp__slab_cache conns;
} cp__worker;

struct cp_server {
    cp_server_options o;
    cp_server_callbacks cb;
    cp_pool *pool;
    cp_port *port;
    cp_io_binding conn_binding;
    cp_io_binding listener_binding;
    cp_frame_config frame_cfg;

    /* Connection layout (see struct cp_conn). */
    size_t off_multi, off_frame, off_deadline, off_user, conn_size;

    cp__slab conns;
    cp__slab sends;
    cp__slab xmits;
    cp__slab holds;
    cp__slab bufs[CP__SIZE_CLASSES];
    uint64_t big_allocations; /* atomic: copies too big for a size class */

    /* The listener and its accept pool. */
    int listen_fd;
    /* Whether accepted sockets inherit the listener's TCP_NODELAY (atomic; 0 = not known
     * yet, 1 = they do, -1 = each needs its own setsockopt). */
    int nodelay_inherited;
    uint16_t listen_port;
    cp_socket listener;
    cp_op listener_close;
    cp__lock accept_lock;  /* guards the fields below */
    cp_accept_op *accepts; /* accepts_max of them */
    uint8_t *accept_busy;  /* 1 while posted */
    uint32_t *accept_idle; /* stack of the slots not posted */
    unsigned naccept_idle;
    unsigned accepts_posted;
    unsigned accepts_target;
    unsigned accepts_since_tick;
    unsigned backlog_next_look; /* a busy tick's look at the backlog found it empty:
                                   the next once accepts_since_tick reaches this */
    unsigned quiet_ticks;
    bool accept_paused;
    bool listener_open;
    cp_timer *accept_retry;

    /* Timeouts. */
    /* The tick is read off the monotonic clock, not counted in timer firings: a late or
     * bunched firing then never makes a connection look older than it is (a timeout never
     * fires early), and stamps taken between firings are exact. */
    int64_t tick_epoch_ns; /* the clock when the server started */
    int64_t tick_ns;
    int64_t coarse_ns; /* resolution of the coarse clock (cp__server_tick_late) */
    unsigned tick_ms;
    uint32_t hs_ticks, idle_ticks;
    uint32_t linger_units; /* linger_ms in units of 2^linger_shift ticks (see create) */
    unsigned linger_shift;
    /* TCP_USER_TIMEOUT of a graceful close with replies queued: the kernel's own bound,
     * past the sweep's (linger_ms), which resets the connection; the kernel's ends it
     * silently. */
    unsigned linger_backstop_ms;
    cp_timer *ticker;

    /* Spare close contexts, for when the sends slab has none to give (out of memory): closing
     * is what gives memory back, so it must not need any. A close completes promptly, and
     * the sweep retries the closes that found none spare. Bit i of close_spares_busy
     * (atomic): close_spares[i] is in use. */
    cp_op close_spares[CP__CLOSE_SPARES];
    uint32_t close_spares_busy;

    /* Shutdown. */
    int stopping; /* atomic */
    /* cp_server_shutdown: 0 not begun, 1 running, 2 finished (done_lock; a second caller
     * waits for the first). */
    int shutdown_state;
    pthread_t shutdown_thread; /* the first caller, while state is 1 (an on_close may run
                                  on it) */
    pthread_mutex_t done_lock;
    pthread_cond_t done_cond;

    pthread_key_t wkey; /* cp__worker of the calling thread */
    cp__lock workers_lock;
    cp__worker *workers;       /* the pool threads' records */
    cp__worker *spare_workers; /* records made at creation, one per pool thread, not yet
                                  taken (workers_lock): a thread's first completion then
                                  needs no memory */
    cp__worker foreign;        /* the record every other thread shares (see cp__worker) */

    /* Counters (atomic). */
    uint64_t conns_open, conns_total, conns_rejected, conns_reaped, accept_pauses,
        backpressure_events, frames_in, frames_rejected, sends_refused;
};

/* conn.c */
void cp__conn_start(cp_server *sv, int fd);
void cp__conn_io(cp_socket *s, cp_op *op, int64_t result, void *user);
/* The tick's sweep, in two steps. While walking the connection slab (its lock held):
 * true if c has a timeout due or a close to move on, and then it holds one more operation
 * reference, so that it cannot finish (and its memory be reused by a new connection)
 * before the second step. After the walk, without the lock: act, and drop that reference
 * (which may run on_close and free c). */
bool cp__conn_sweep_pin(cp_server *sv, cp_conn *c, uint32_t now);
void cp__conn_sweep(cp_server *sv, cp_conn *c, uint32_t now);
/* The shutdown's walk, in the same two steps: pin c if stopping it (abort: cutting it)
 * would change anything; then stop it and drop the pin. */
bool cp__conn_stop_pin(cp_conn *c, bool abort);
void cp__conn_stop(cp_server *sv, cp_conn *c, bool abort);
/* The calling thread's record: its own if it is one of the pool's threads that has
 * handled a completion, else the shared one. Never allocates. Inline, as the next one:
 * each is looked up once per message. */
static inline cp__worker *cp__server_worker(cp_server *sv)
{
    cp__worker *w = pthread_getspecific(sv->wkey);
    return w ? w : &sv->foreign;
}
/* Make the calling pool thread's record, on its first completion (it has none yet); it is
 * freed with the server. */
cp__worker *cp__server_worker_new(cp_server *sv);
/* The calling pool thread's own record, created on its first completion. */
static inline cp__worker *cp__server_worker_own(cp_server *sv)
{
    cp__worker *w = pthread_getspecific(sv->wkey);
    return w ? w : cp__server_worker_new(sv);
}

/* Add n to one of w's counters: a plain store by a record's own thread, an atomic add on
 * the shared record. */
static inline void cp__worker_count(const cp__worker *w, uint64_t *counter, uint64_t n)
{
    if (w->shared)
        __atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
    else
        __atomic_store_n(counter, *counter + n, __ATOMIC_RELAXED);
}
/* A buffer of at least `size` bytes from the size classes (its real size in *got), or
 * malloc'd above the largest class; w is the calling thread's record. */
void *cp__server_buf_alloc(cp_server *sv, cp__worker *w, size_t size, uint32_t *got);
void cp__server_buf_free(cp_server *sv, cp__worker *w, void *buf, uint32_t size);
void cp__server_signal_done(cp_server *sv);

/* Ticks since the server started, off the monotonic clock (any thread). */
static inline uint32_t cp__server_tick(const cp_server *sv)
{
    return (uint32_t)((cp__now_ns() - sv->tick_epoch_ns) / sv->tick_ns);
}

/* The tick to stamp arriving data with (every delivery does): read off the coarse clock,
 * which costs a fraction of the exact one, plus its resolution, so that the stamp is never
 * earlier than the exact clock would have made it (a timeout never fires early; it may
 * fire up to one clock resolution later). */
static inline uint32_t cp__server_tick_late(const cp_server *sv)
{
    return (uint32_t)((cp__now_coarse_ns() + sv->coarse_ns - sv->tick_epoch_ns) / sv->tick_ns);
}

static inline cp_server *cp__conn_server(const cp_conn *c)
{
    const cp_io_binding *b = (const cp_io_binding *)c->s.key;
    return b->user;
}

#endif
