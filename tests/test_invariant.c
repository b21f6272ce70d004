/* P4, the completion invariant, under random load: "an operation that fails at submission
 * returns the error at once and queues nothing; an operation that was accepted always
 * queues exactly one completion - also when it is cancelled, times out, or its socket is
 * closed."
 *
 * A seeded random mix over many loopback TCP connections (server ends associated with
 * plain client fds as peers, associated connectors and what a listener accepts from them,
 * plus listeners with accepts outstanding): receives (plain, vector, pooled), sends (plain,
 * vector, and both with CP_SEND_SKIP_ON_SUCCESS: a CP_DONE_NOW send must never complete),
 * TransmitFile and TransmitPackets from small memfds (memory and file ranges mixed, "to the
 * end of the file", CP_TF_DISCONNECT), accepts (with and without first data), connects and
 * ConnectEx with first data, disconnects, per-operation
 * timeouts (some tiny, so they fire), cancel of one operation, cancel-all, close with
 * operations outstanding, the peer writing, reading, half-closing, closing and resetting,
 * and deliberately failing starts; now and then an operation on the wrong kind of socket
 * (an accept on a connection, a receive or send on a listener), which must complete (or be
 * refused) like any other, with an error. Contexts are reused (not zeroed again) for other
 * operations on other sockets once they are the caller's again. Every operation is tracked in its
 * own record; every completion is checked:
 *   - it belongs to an operation whose start returned 0, that had not completed yet
 *     (exactly once), with the socket's key and the opcode it was started with;
 *   - its result is plausible: a send moves its full length or fails, a receive 0..len
 *     bytes, -ECANCELED only after a cancel / cancel-all / close, -ETIMEDOUT only with a
 *     timeout and never early, other errors only ones the network can produce;
 *   - with one consumer thread: a socket's close completion is its last one, received
 *     bytes are exactly the peer's stream in order (no byte lost, duplicated or moved),
 *     successful operations of one queue complete in the order they were started;
 *   - in every mode: what a pair's plain peer reads is the socket's outgoing stream, in start
 *     order, each send and transmit whole and never interleaved, up to the first send that
 *     failed (cancelled, timed out, reset: its prefix may be out);
 * and at the end, with everything closed: completions == accepted starts per kind, and the
 * port is silent, and the process has as many descriptors open as before the run. Operation records
 * and their buffers are freed as soon as the completion is handled and sockets once nothing refers
 * to them (per-socket reference counts, as cport/socket.h asks), so ASan sees cport touching
 * anything it no longer owns.
 *
 * Variants: one thread doing everything (exact: every start result is predictable);
 * three workers dequeuing (batch 1 and batch 16) with actions from their handlers and from
 * acting threads that come and go (an operation must not care that the thread that started
 * it has exited); one worker plus the acting threads (one consumer, so ordering is still
 * observable while other threads start, cancel and close). The seed also picks the port's
 * shape: default, a tiny receive pool (starvation), small io_uring rings (full submission
 * queue, completion-queue overflow).
 *
 * CPORT_TEST_SEED=n replays a run (the random choices; thread timing is not replayed);
 * CPORT_TEST_INV_TRACE=id prints socket id's events as they happen.
 * CPORT_TEST_INV_SKIP (development aid) may name probes to leave out, comma-separated:
 * "busy" (starting an op still in use), "order" (one-consumer ordering and stream checks),
 * "mixrecv" (plain and pooled receives on one socket), "threadexit" (acting threads that exit:
 * one acting thread runs for the whole phase instead), "reuse" (contexts given back to cport
 * without zeroing them again, for any kind of operation on any socket, once their completion
 * was handled, their start failed or the send finished at once).
 */
#include "harness.h"

#include "cport.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <dirent.h>
#include <time.h>
#include <unistd.h>

enum {
    MAX_SOCKS = 1024,      /* table capacity */
    SOFT_SOCKS = 140,      /* above this many sockets, nothing new is associated */
    MAX_PEND = 32,         /* plain clients dialled, not yet accepted */
    MAX_GHOSTS = 64,       /* pending clients closed before they were accepted */
    MAX_HELD = 24,         /* pool buffers the test keeps a while before releasing */
    MAX_OUT_PER_SOCK = 8,  /* outstanding operations per socket */
    MAX_OUTSTANDING = 500, /* outstanding operations overall */
    MAX_SIDS = 1 << 18,    /* socket ids (keys) per run */
    SCRATCH = 256 * 1024,
    RECV_MAX = 64 * 1024,
    SEND_MAX = 256 * 1024,
    FIRST_MAX = 512,
    ACTION_PHASE_MS = 20000, /* the random phase stops here even if actions are left */
    DRAIN_MS = 30000,        /* after it, everything must have completed within this */
};

/* ---- random numbers ------------------------------------------------------------------- */

typedef struct rng {
    uint64_t s;
} rng;

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rng_next(rng *r)
{
    r->s += 0x9E3779B97F4A7C15ull;
    return mix64(r->s);
}

static uint32_t rng_below(rng *r, uint32_t n)
{
    return (uint32_t)(((rng_next(r) >> 32) * n) >> 32);
}

static bool rng_pct(rng *r, unsigned pct)
{
    return rng_below(r, 100) < pct;
}

/* 1..max, log-uniform: mostly small, now and then large. */
static size_t rng_size(rng *r, size_t max)
{
    unsigned bits = 0;
    while (((size_t)1 << bits) < max)
        bits++;
    size_t hi = (size_t)1 << rng_below(r, bits + 1);
    if (hi > max)
        hi = max;
    return 1 + rng_below(r, (uint32_t)hi);
}

/* Per-operation timeouts: most none, many tiny (they fire), some that may or may not. */
static uint32_t pick_timeout(rng *r)
{
    unsigned x = rng_below(r, 100);
    if (x < 60)
        return 0;
    if (x < 82)
        return 1 + rng_below(r, 3);
    if (x < 94)
        return 5 + rng_below(r, 30);
    return 50 + rng_below(r, 200);
}

/* The byte at offset `off` of the stream a peer with `seed` writes. */
static uint8_t stream_byte(uint32_t seed, uint64_t off)
{
    uint64_t x = mix64((off >> 3) * 0x9E3779B97F4A7C15ull ^ ((uint64_t)seed << 20));
    return (uint8_t)(x >> ((off & 7) * 8));
}

static void stream_fill(uint32_t seed, uint64_t off, uint8_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = stream_byte(seed, off + i);
}

/* ---- operation and socket records ----------------------------------------------------- */

enum kind {
    K_RECV,
    K_RECVV,
    K_POOL,
    K_SEND,
    K_SENDV,
    K_ACCEPT,
    K_CONNECT,
    K_DISC,
    K_CLOSE,
    K_SENDX, /* send_ex / sendv_ex with CP_SEND_SKIP_ON_SUCCESS */
    K_CONNX, /* connect_ex with first data */
    K_XMIT,  /* transmit_file / transmit_packets from a small memfd */
    K__N
};

static const char *const kind_name[K__N] = {"recv",  "recvv",     "recv_pooled", "send",
                                            "sendv", "accept",    "connect",     "disconnect",
                                            "close", "send_skip", "connect_ex",  "transmit"};
static const uint8_t kind_opcode[K__N] = {
    CP_OP_RECV,    CP_OP_RECV,       CP_OP_RECV_POOL, CP_OP_SEND, CP_OP_SEND,    CP_OP_ACCEPT,
    CP_OP_CONNECT, CP_OP_DISCONNECT, CP_OP_CLOSE,     CP_OP_SEND, CP_OP_CONNECT, CP_OP_TRANSMIT};
/* Which of a socket's queues an operation runs on (0 receive, 1 send). */
static const int kind_queue[K__N] = {0, 0, 0, 1, 1, 0, 1, 1, -1, 1, 1, 1};

/* Kinds that put bytes of the socket's outgoing stream on the wire. */
static bool kind_tx(int kind)
{
    return kind == K_SEND || kind == K_SENDV || kind == K_SENDX || kind == K_XMIT;
}

enum { ST_STARTING = 1, ST_OUT, ST_DONE, ST_REJECTED };
enum {
    MAGIC_LIVE = 0x4c495645,
    MAGIC_DEAD = 0x44454144,
    MAGIC_REJECTED = 0x52454a44,
    MAGIC_DONENOW = 0x4e4f5721
};
enum { SID_FREE = 0, SID_LIVE, SID_CLOSED };

typedef struct sock sock;

/* One entry of a socket's recent history (printed when a check fails). */
typedef struct hist_ent {
    char what; /* 's'tart, 'r'efused, 'c'ompleted, 'x' cancel, 'a' cancel-all, 'K' close called,
                  'C' close completed, peer: 'w'rote (value: total), 'h' shut, 'z' closed */
    int8_t kind;
    uint32_t serial;
    int64_t value; /* completion: result; cancel: return value */
    uint64_t rx_off;
    const void *op;
} hist_ent;

/* What cport gets to see of an operation: the cp_op, its buffer, iovecs, connect address.
 * Freed by whichever thread handles the completion - possibly while the starting thread is
 * still inside the start call, which socket.h allows - so that ASan catches cport touching
 * any of it after handing the completion over. */
typedef struct opmem {
    union {
        cp_accept_op aop; /* aop.op is the cp_op (first member of each) */
        cp_connect_op cop;
        cp_transmit_op top;
    };
    int memfd;       /* a transmit's file, closed once its completion is handled */
    cp_packet pk[4]; /* a transmit's elements */
    uint32_t magic;
    struct opblk *rec;
    struct iovec iov[4];
    struct sockaddr_in addr; /* connect target */
    size_t cap;              /* room in data */
    uint8_t data[];          /* the operation's buffer */
} opmem;

/* The test's own record of an operation (reference counted; outlives the opmem). */
typedef struct opblk {
    opmem *m;  /* until the completion is handled */
    cp_op *op; /* &m->aop.op: the address cport knows the operation by */
    uint32_t magic;
    int kind;
    sock *s;
    uint64_t sid;
    uint64_t qserial; /* start order within the socket's queue (one-consumer checks) */
    int64_t t0;       /* ns, taken before the start call */
    uint32_t timeout_ms;
    size_t len;
    uint8_t *buf;      /* m->data */
    void *expect_ubuf; /* what op.u must hold while in use */
    int iovcnt;
    uint64_t out_start;     /* tx kinds: offset of its first byte in the socket's outgoing stream */
    uint64_t expect_res;    /* connect_ex, transmit: the result of a success */
    bool tx_tracked;        /* out_start is valid (an R_PAIR socket) */
    bool short_file;        /* a transmit whose file ends inside its range: -EIO */
    uint64_t cancels_done0; /* s->cancels_done when the start began */
    atomic_int cancel_req;  /* cp_socket_cancel() was called on it */
    atomic_int dequeued;    /* its completion is in a batch being handled */
    atomic_int state;       /* ST_* */
    atomic_int refs;        /* the completion's and the starter's; freed at 0 */
    struct opblk *prev, *next; /* s->ops while outstanding; the graveyard once rejected */
} opblk;

enum role { R_PAIR, R_CONN, R_ACC, R_LISTEN };
static const char *const role_name[] = {"pair", "connector", "accepted", "listener"};

struct sock {
    cp_socket s;
    uint64_t id; /* also its key */
    int role;
    int slot; /* index in w->socks; -1 once removed */
    atomic_int refs;
    atomic_int closing; /* 0 open, 1 cp_socket_close() being called, 2 it returned */
    atomic_ulong cancels_started, cancels_done; /* cancel-all / close calls */
    atomic_int pool_used;
    int recv_style; /* without mix_recv: 1 plain receives only, 2 pooled only */
    atomic_int connect_started;
    pthread_mutex_t start_mu; /* one-consumer modes: start calls take it (queue order) */
    uint64_t next_serial[2];
    pthread_mutex_t mu; /* everything below */
    opblk *ops;
    int nout;
    int client; /* the plain peer fd, or -1 */
    bool client_wr_shut;
    bool verify; /* check received bytes against the peer's stream */
    uint32_t seed;
    uint64_t tx_off; /* bytes the peer wrote */
    uint64_t rx_off; /* bytes received and checked */
    bool rx_eof;
    uint64_t last_ok[2]; /* qserial of the last successful completion per queue */
    uint64_t last_ok_accept0;
    /* The outgoing stream (sends, transmits) as the plain peer reads it: start calls
     * take start_mu and reserve their bytes in start order; the peer checks what it reads.
     * A mismatch is a bug unless a send failed (cancelled, timed out, reset) at or before
     * that offset: checked once every completion of the socket has been handled. */
    uint32_t out_seed;
    uint64_t out_off;      /* bytes reserved by accepted (or starting) tx operations */
    uint64_t out_fail_off; /* lowest out_start of a failed tx operation, or UINT64_MAX */
    uint64_t peer_rx;      /* bytes the peer read */
    uint64_t peer_bad_off; /* the first offset where the peer read a wrong byte, or UINT64_MAX */
    hist_ent hist[48];
    unsigned nhist;
};

static uint64_t trace_sid; /* CPORT_TEST_INV_TRACE: print this socket's events as they happen */

/* Per-socket history for failure reports (under s->mu). */
static void hist_add_locked(sock *s, char what, int kind, uint64_t serial, int64_t value,
                            const void *op)
{
    if (trace_sid && s->id == trace_sid)
        fprintf(stderr, "TRACE %c %s #%u %p value=%" PRId64 " rx_off=%" PRIu64 "\n", what,
                kind >= 0 ? kind_name[kind] : "-", (unsigned)serial, op, value, s->rx_off);
    unsigned i = s->nhist++ % 48;
    s->hist[i].what = what;
    s->hist[i].kind = (int8_t)kind;
    s->hist[i].serial = (uint32_t)serial;
    s->hist[i].value = value;
    s->hist[i].rx_off = s->rx_off;
    s->hist[i].op = op;
}

static void hist_add(sock *s, char what, int kind, uint64_t serial, int64_t value, const void *op)
{
    pthread_mutex_lock(&s->mu);
    hist_add_locked(s, what, kind, serial, value, op);
    pthread_mutex_unlock(&s->mu);
}

typedef struct pend {
    int fd;
    int port;
    uint64_t lsid; /* the listener it dialled */
    uint32_t seed;
    uint64_t tx_off;
    uint64_t rx_off; /* bytes of it already received (first data of an accept) */
    bool wr_shut;
} pend;

typedef struct world {
    cp_port *port;
    uint64_t seed;
    bool exact;           /* one thread does everything */
    bool single_consumer; /* one thread dequeues */
    bool uring;
    bool probe_busy, check_order, mix_recv, actors_exit;
    const char *mode;
    pthread_mutex_t mu; /* table, listener, pending, held, graveyard */
    pthread_mutex_t pair_mu;
    sock *socks[MAX_SOCKS];
    int nsocks;
    _Atomic uint8_t *sid_state;
    atomic_ulong next_sid;
    sock *listener;
    struct sockaddr_in laddr;
    pend pending[MAX_PEND];
    int npend;
    /* A pending client closed before its accept completed may still be accepted (the
     * kernel queues it, data, FIN or RST included), and its port may be handed to a new
     * client: such an accept cannot be told from the new client's. So a closed pending
     * client leaves a ghost (port, listener), a dial that lands on a ghost's port is
     * abandoned, and an accept matching a ghost is a plain accepted socket. */
    struct ghost {
        uint16_t port;
        uint64_t lsid;
    } ghosts[MAX_GHOSTS];
    int nghosts;
    unsigned long ghosts_accepted, dials_haunted;
    /* Dialled clients take their ports from a range outside the kernel's ephemeral one, so
     * a port can never be shared with an associated socket of the port that was closed
     * before the listener accepted it (those are untracked ghosts). */
    int dial_lo, dial_hi, dial_next;
    void *held[MAX_HELD];
    int nheld;
    opblk *graveyard;
    int plain_lfd;
    struct sockaddr_in plain_addr;
    int target_pairs;
    atomic_int live_socks;
    atomic_long outstanding;
    atomic_ulong accepted[K__N], completed[K__N], rejected[K__N], done_now[K__N];
    atomic_ulong n_peer_checked, n_tx_broken, n_odd, n_short_file;
    atomic_ulong n_cancelled, n_timedout, n_neterr, n_ok, n_rx_bytes, n_actions, n_invalid;
    atomic_int quiesce, stop;
    unsigned long budget;
    int64_t action_deadline_ms;
} world;

typedef struct tctx {
    world *w;
    rng r;
    unsigned batch;   /* completions per dequeue (workers) */
    unsigned actions; /* actions before exiting (acting threads) */
    uint8_t *scratch;
    pthread_t th;
} tctx;

static void die_seed(const world *w)
{
    fprintf(stderr, "invariant: FAILED with CPORT_TEST_SEED=%" PRIu64 " (%s, %s)\n", w->seed,
            w->mode, cp_port_backend_name(w->port));
}

#define WCHECK(w, cond)                                                                            \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            die_seed(w);                                                                           \
            CHECK(cond);                                                                           \
        }                                                                                          \
    } while (0)

static void describe_op(const char *what, const opblk *b, int64_t res)
{
    fprintf(stderr,
            "%s: op %p kind=%s sock=%" PRIu64 " len=%zu timeout=%u cancel_req=%d "
            "state=%d result=%" PRId64 " (%s) age=%.1fms\n",
            what, (const void *)b->op, kind_name[b->kind], b->sid, b->len, b->timeout_ms,
            atomic_load(&b->cancel_req), atomic_load(&b->state), res,
            res < 0 ? cp_err_name((int)res) : "ok", (double)(cpt_now_ns() - b->t0) / 1e6);
}

/* Caller holds s->mu (or nothing else runs). */
static void hist_dump(const sock *s)
{
    unsigned n = s->nhist < 48 ? s->nhist : 48;
    fprintf(stderr, "history of socket %" PRIu64 " (%s), oldest first:\n", s->id,
            role_name[s->role]);
    for (unsigned k = s->nhist - n; k < s->nhist; k++) {
        const hist_ent *e = &s->hist[k % 48];
        fprintf(stderr, "  %c %-11s #%-4u %p value=%" PRId64 " (%s) rx_off=%" PRIu64 "\n", e->what,
                e->kind >= 0 ? kind_name[e->kind] : "-", e->serial, e->op, e->value,
                e->value < 0 ? cp_err_name((int)e->value) : "", e->rx_off);
    }
}

#define OPCHECK(w, b, res, cond)                                                                   \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            describe_op("offending completion", b, res);                                           \
            die_seed(w);                                                                           \
            CHECK(cond);                                                                           \
        }                                                                                          \
    } while (0)

/* ---- records ------------------------------------------------------------------------------ */

/* Contexts whose completion has been handled (or whose start failed, or that were sent at
 * once) are given back to cport as they are, not zeroed again, for any operation on any
 * socket ("after its completion is dequeued it is the caller's again and may be reused"):
 * about half of them go to this stack, the others are freed (ASan then sees cport touching
 * them). A leaf lock. */
enum { MAX_RECYCLED = 64 };
static pthread_mutex_t recycle_mu = PTHREAD_MUTEX_INITIALIZER;
static opmem *recycled[MAX_RECYCLED];
static int nrecycled;
static atomic_ulong recycle_turn;
static uint64_t recycle_seed;
static bool recycle_on = true; /* CPORT_TEST_INV_SKIP=reuse turns it off */
static atomic_ulong n_reused;

/* Free m, or keep it for reuse (marked dead until then). */
static void op_recycle(opmem *m)
{
    m->magic = MAGIC_DEAD;
    m->rec = NULL;
    if (recycle_on && (mix64(atomic_fetch_add(&recycle_turn, 1) ^ recycle_seed) & 1)) {
        pthread_mutex_lock(&recycle_mu);
        if (nrecycled < MAX_RECYCLED) {
            recycled[nrecycled++] = m;
            m = NULL;
        }
        pthread_mutex_unlock(&recycle_mu);
    }
    free(m);
}

/* A kept context with room for len bytes, or NULL. */
static opmem *op_reuse(size_t len)
{
    opmem *m = NULL;
    pthread_mutex_lock(&recycle_mu);
    for (int i = nrecycled - 1; i >= 0 && !m; i--) {
        if (recycled[i]->cap >= len) {
            m = recycled[i];
            recycled[i] = recycled[--nrecycled];
        }
    }
    pthread_mutex_unlock(&recycle_mu);
    if (m)
        atomic_fetch_add(&n_reused, 1);
    return m;
}

static void recycle_drain(void)
{
    pthread_mutex_lock(&recycle_mu);
    while (nrecycled)
        free(recycled[--nrecycled]);
    pthread_mutex_unlock(&recycle_mu);
}

static opblk *op_new(int kind, size_t len)
{
    opblk *b = calloc(1, sizeof(*b));
    opmem *m = op_reuse(len);
    if (!m) {
        m = calloc(1, sizeof(*m) + len); /* zeroed: "zero-initialise it once" */
        CHECK(m != NULL);
        m->cap = len;
    }
    CHECK(b != NULL);
    m->magic = MAGIC_LIVE;
    m->memfd = -1;
    m->rec = b;
    b->m = m;
    b->op = &m->aop.op;
    b->magic = MAGIC_LIVE;
    b->kind = kind;
    b->len = len;
    b->buf = m->data;
    atomic_init(&b->refs, 2); /* the completion's and the starter's */
    atomic_init(&b->state, ST_STARTING);
    return b;
}

/* The completion has been handled: cport must not touch any of this any more. */
static void op_free_mem(opblk *b)
{
    opmem *m = b->m;
    b->m = NULL;
    b->buf = NULL;
    if (m->memfd >= 0)
        close(m->memfd);
    m->memfd = -1;
    op_recycle(m);
}

static void op_put(opblk *b)
{
    if (atomic_fetch_sub(&b->refs, 1) != 1)
        return;
    CHECK(b->magic == MAGIC_LIVE && b->m == NULL);
    b->magic = MAGIC_DEAD;
    free(b);
}

/* A start failed: keep the record and its memory (never freed during the run) so that a
 * completion for it, which must never come, is recognised as such. */
/* Keep a rejected or done-at-once op's memory, marked `magic`, to recognise a completion
 * that would still come for it. */
static void op_bury(world *w, opblk *b, uint32_t magic)
{
    b->magic = magic;
    b->m->magic = magic;
    pthread_mutex_lock(&w->mu);
    b->next = w->graveyard;
    w->graveyard = b;
    pthread_mutex_unlock(&w->mu);
}

/* A refused or done-at-once op is the caller's again at once: half of them are kept (as
 * op_bury does), the others reused or freed. */
static void op_bury_or_reuse(world *w, opblk *b, uint32_t magic, rng *r)
{
    if (!recycle_on || rng_pct(r, 50)) {
        op_bury(w, b, magic);
        return;
    }
    opmem *m = b->m;
    b->m = NULL;
    op_recycle(m);
    free(b);
}

/* Take b off its socket's list of outstanding ops (s->mu held). */
static void sock_unlink_op_locked(sock *s, opblk *b)
{
    if (b->prev)
        b->prev->next = b->next;
    else
        s->ops = b->next;
    if (b->next)
        b->next->prev = b->prev;
    b->prev = b->next = NULL;
    s->nout--;
}

static void sock_get(sock *s)
{
    int prev = atomic_fetch_add(&s->refs, 1);
    CHECK(prev > 0);
}

static void sock_put(world *w, sock *s)
{
    if (atomic_fetch_sub(&s->refs, 1) != 1)
        return;
    /* Nothing refers to it any more: its close completion and every other completion of
     * it have been handled. */
    WCHECK(w, atomic_load(&w->sid_state[s->id]) == SID_CLOSED);
    WCHECK(w, s->nout == 0 && s->ops == NULL);
    WCHECK(w, s->slot == -1);
    /* What the peer read of the outgoing stream: wrong bytes only after a failed send. */
    if (s->peer_bad_off != UINT64_MAX && s->peer_bad_off < s->out_fail_off) {
        fprintf(stderr,
                "outgoing stream of socket %" PRIu64 " (%s): the peer read a wrong byte at %" PRIu64
                " (reserved %" PRIu64 ", read %" PRIu64 "), the first failed send began at %" PRIu64
                "\n",
                s->id, role_name[s->role], s->peer_bad_off, s->out_off, s->peer_rx,
                s->out_fail_off);
        hist_dump(s);
        die_seed(w);
        CHECK(s->peer_bad_off >= s->out_fail_off);
    }
    if (s->peer_bad_off != UINT64_MAX)
        atomic_fetch_add(&w->n_tx_broken, 1);
    if (s->client >= 0)
        close(s->client);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->start_mu);
    memset(s, 0xa5, sizeof(*s));
    free(s);
    atomic_fetch_sub(&w->live_socks, 1);
}

/* Associate fd as a new socket; returns it with one reference for the caller, or NULL
 * (fd and client closed) when the run is winding down or too many sockets exist. */
static sock *sock_add(world *w, int fd, int role, int client, const pend *pd)
{
    pthread_mutex_lock(&w->mu);
    bool full = w->nsocks >= SOFT_SOCKS;
    pthread_mutex_unlock(&w->mu);
    uint64_t id = atomic_fetch_add(&w->next_sid, 1);
    if (full || atomic_load(&w->quiesce) || id >= MAX_SIDS) {
        close(fd);
        if (client >= 0)
            close(client);
        return NULL;
    }
    sock *s = calloc(1, sizeof(*s));
    CHECK(s != NULL);
    s->id = id;
    s->role = role;
    s->slot = -1;
    s->client = client;
    s->out_seed = (uint32_t)mix64(id * 0x9E3779B97F4A7C15ull ^ w->seed);
    s->out_fail_off = UINT64_MAX;
    s->peer_bad_off = UINT64_MAX;
    atomic_init(&s->refs, 2); /* the table's (until the close completion) + the caller's */
    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->start_mu, NULL);
    if (pd) {
        s->seed = pd->seed;
        s->tx_off = pd->tx_off;
        s->rx_off = pd->rx_off;
        s->client_wr_shut = pd->wr_shut;
    }
    s->verify = role == R_PAIR && w->single_consumer && w->check_order;
    s->recv_style = w->mix_recv ? 0 : 1 + (int)(id % 2);
    atomic_store(&w->sid_state[id], SID_LIVE);
    int r = cp_socket_associate(&s->s, w->port, fd, (uintptr_t)id);
    if (r < 0) {
        fprintf(stderr, "associate: %s\n", cp_strerror(r));
        die_seed(w);
        CHECK_OK(r);
    }
    WCHECK(w, s->s.fd == fd);
    atomic_fetch_add(&w->live_socks, 1);
    pthread_mutex_lock(&w->mu);
    CHECK(w->nsocks < MAX_SOCKS);
    s->slot = w->nsocks;
    w->socks[w->nsocks++] = s;
    pthread_mutex_unlock(&w->mu);
    return s;
}

static void table_remove_locked(world *w, sock *s)
{
    CHECK(s->slot >= 0 && s->slot < w->nsocks && w->socks[s->slot] == s);
    sock *last = w->socks[--w->nsocks];
    w->socks[s->slot] = last;
    last->slot = s->slot;
    s->slot = -1;
}

enum { PICK_DATA = 1u << R_PAIR | 1u << R_CONN | 1u << R_ACC, PICK_ANY = 0xfu };

/* A random socket whose role is in `roles`, referenced; open ones unless allow_closing. */
static sock *pick_sock(world *w, rng *r, unsigned roles, bool allow_closing)
{
    sock *found = NULL;
    pthread_mutex_lock(&w->mu);
    for (int tries = 0; tries < 8 && w->nsocks > 0 && !found; tries++) {
        sock *s = w->socks[rng_below(r, (uint32_t)w->nsocks)];
        if (!(roles & (1u << s->role)))
            continue;
        if (!allow_closing && atomic_load(&s->closing))
            continue;
        found = s;
    }
    if (found)
        sock_get(found);
    pthread_mutex_unlock(&w->mu);
    return found;
}

static bool phase_over(world *w)
{
    return atomic_load(&w->quiesce) || atomic_load(&w->n_actions) >= w->budget ||
           cpt_now_ms() > w->action_deadline_ms;
}

/* ---- sockets and peers -------------------------------------------------------------------- */

static struct sockaddr_in loopback_addr(int port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    return sa;
}

static int local_port(int fd)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof(sa);
    CHECK_OK(getsockname(fd, (struct sockaddr *)&sa, &len));
    return ntohs(sa.sin_port);
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int tcp_socket(bool nonblock)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    CHECK(fd >= 0);
    return fd;
}

/* A connected pair: the server end associated, the client end a plain non-blocking fd. */
static void make_pair(world *w, tctx *t)
{
    pthread_mutex_lock(&w->pair_mu);
    int c = tcp_socket(false);
    CHECK_OK(connect(c, (struct sockaddr *)&w->plain_addr, sizeof(w->plain_addr)));
    int fd = accept4(w->plain_lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK(fd >= 0);
    pthread_mutex_unlock(&w->pair_mu);
    CHECK_OK(fcntl(c, F_SETFL, O_NONBLOCK));
    set_nodelay(c);
    set_nodelay(fd);
    pend pd = {.seed = (uint32_t)rng_next(&t->r)};
    sock *s = sock_add(w, fd, R_PAIR, c, &pd);
    if (s)
        sock_put(w, s);
}

static void replenish(world *w, tctx *t)
{
    int open_pairs = 0;
    pthread_mutex_lock(&w->mu);
    for (int i = 0; i < w->nsocks; i++)
        if (w->socks[i]->role == R_PAIR && !atomic_load(&w->socks[i]->closing))
            open_pairs++;
    pthread_mutex_unlock(&w->mu);
    for (int i = open_pairs; i < w->target_pairs && i < open_pairs + 2; i++)
        make_pair(w, t);
}

static void ensure_listener(world *w)
{
    pthread_mutex_lock(&w->mu);
    bool have = w->listener != NULL;
    pthread_mutex_unlock(&w->mu);
    if (have || atomic_load(&w->quiesce))
        return;
    int fd = tcp_socket(false);
    struct sockaddr_in sa = loopback_addr(0);
    CHECK_OK(bind(fd, (struct sockaddr *)&sa, sizeof(sa)));
    CHECK_OK(listen(fd, 256));
    sa = loopback_addr(local_port(fd));
    sock *s = sock_add(w, fd, R_LISTEN, -1, NULL);
    if (!s)
        return;
    pthread_mutex_lock(&w->mu);
    if (!w->listener && !atomic_load(&s->closing)) {
        w->listener = s;
        w->laddr = sa;
    }
    pthread_mutex_unlock(&w->mu);
    sock_put(w, s);
}

/* Close the pending clients that dialled listener lsid (it is gone: they will never be
 * accepted), or all of them (lsid == 0). Caller holds w->mu. */
static void drop_pending_locked(world *w, uint64_t lsid)
{
    for (int i = 0; i < w->npend;) {
        if (lsid == 0 || w->pending[i].lsid == lsid) {
            close(w->pending[i].fd);
            w->pending[i] = w->pending[--w->npend];
        } else {
            i++;
        }
    }
    for (int i = 0; i < w->nghosts;) {
        if (lsid == 0 || w->ghosts[i].lsid == lsid)
            w->ghosts[i] = w->ghosts[--w->nghosts];
        else
            i++;
    }
}

/* The index of the ghost (port, lsid), or -1. Caller holds w->mu. */
static int ghost_find_locked(world *w, int port, uint64_t lsid)
{
    for (int i = 0; i < w->nghosts; i++)
        if (w->ghosts[i].port == port && w->ghosts[i].lsid == lsid)
            return i;
    return -1;
}

/* Close pending client i and leave its ghost. Caller holds w->mu and made room. */
static void pending_close_locked(world *w, int i)
{
    close(w->pending[i].fd);
    w->ghosts[w->nghosts++] = (struct ghost){(uint16_t)w->pending[i].port, w->pending[i].lsid};
    w->pending[i] = w->pending[--w->npend];
}

static void dial(world *w, tctx *t)
{
    ensure_listener(w);
    pthread_mutex_lock(&w->mu);
    if (!w->listener || w->npend >= MAX_PEND) {
        pthread_mutex_unlock(&w->mu);
        return;
    }
    struct sockaddr_in sa = w->laddr;
    uint64_t lsid = w->listener->id;
    pthread_mutex_unlock(&w->mu);
    int fd = tcp_socket(true);
    /* Take the port first, from the dial range, and not one a ghost holds (the accept would
     * be ambiguous). A port in use (by anyone) is skipped. */
    pthread_mutex_lock(&w->mu);
    int tries = 0, port = -1;
    while (port < 0 && tries++ < 16) {
        int p = w->dial_next;
        w->dial_next = p + 1 < w->dial_hi ? p + 1 : w->dial_lo;
        if (ghost_find_locked(w, p, lsid) >= 0) {
            w->dials_haunted++;
            continue;
        }
        struct sockaddr_in me = loopback_addr((uint16_t)p);
        if (bind(fd, (struct sockaddr *)&me, sizeof(me)) == 0)
            port = p;
    }
    pthread_mutex_unlock(&w->mu);
    if (port < 0) {
        close(fd); /* never connected: no ghost */
        return;
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 && errno != EINPROGRESS) {
        close(fd);
        return;
    }
    set_nodelay(fd);
    pend pd = {.fd = fd, .port = local_port(fd), .lsid = lsid, .seed = (uint32_t)rng_next(&t->r)};
    pthread_mutex_lock(&w->mu);
    if (w->npend < MAX_PEND)
        w->pending[w->npend++] = pd;
    else
        close(fd);
    pthread_mutex_unlock(&w->mu);
}

/* Write the next chunk of a peer's stream (non-blocking; what the kernel takes counts). */
static void stream_write(int fd, uint32_t seed, uint64_t *tx_off, size_t n, uint8_t *scratch)
{
    stream_fill(seed, *tx_off, scratch, n);
    ssize_t k = send(fd, scratch, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k > 0)
        *tx_off += (uint64_t)k;
}

static void pending_action(world *w, tctx *t, bool close_it)
{
    pthread_mutex_lock(&w->mu);
    if (w->npend) {
        int i = (int)rng_below(&t->r, (uint32_t)w->npend);
        pend *pd = &w->pending[i];
        if (close_it && w->nghosts < MAX_GHOSTS) {
            if (rng_pct(&t->r, 50)) {
                struct linger lg = {1, 0};
                setsockopt(pd->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
            }
            pending_close_locked(w, i);
        } else if (rng_pct(&t->r, 8)) {
            shutdown(pd->fd, SHUT_WR);
            pd->wr_shut = true;
        } else if (!pd->wr_shut) {
            stream_write(pd->fd, pd->seed, &pd->tx_off, rng_size(&t->r, 2048), t->scratch);
        }
    }
    pthread_mutex_unlock(&w->mu);
}

enum peer_act { P_WRITE, P_READ, P_SHUT, P_CLOSE, P_RESET };

static void peer_action(world *w, tctx *t, int what)
{
    sock *s = pick_sock(w, &t->r, 1u << R_PAIR, true);
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    if (s->client >= 0) {
        switch (what) {
        case P_WRITE:
            if (!s->client_wr_shut)
                stream_write(s->client, s->seed, &s->tx_off, rng_size(&t->r, 64 * 1024),
                             t->scratch);
            hist_add_locked(s, 'w', -1, 0, (int64_t)s->tx_off, NULL);
            break;
        case P_READ:
            for (int i = 0; i < 4; i++) {
                ssize_t k = recv(s->client, t->scratch, SCRATCH, MSG_DONTWAIT);
                if (k <= 0)
                    break;
                for (ssize_t j = 0; j < k && s->peer_bad_off == UINT64_MAX; j++)
                    if (s->peer_rx + (uint64_t)j >= s->out_off ||
                        t->scratch[j] != stream_byte(s->out_seed, s->peer_rx + (uint64_t)j))
                        s->peer_bad_off = s->peer_rx + (uint64_t)j;
                s->peer_rx += (uint64_t)k;
                atomic_fetch_add(&w->n_peer_checked, (unsigned long)k);
            }
            break;
        case P_SHUT:
            shutdown(s->client, SHUT_WR);
            s->client_wr_shut = true;
            hist_add_locked(s, 'h', -1, 0, 0, NULL);
            break;
        case P_RESET: {
            struct linger lg = {1, 0};
            setsockopt(s->client, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
            close(s->client);
            s->client = -1;
            hist_add_locked(s, 'z', -1, 0, 1, NULL);
            break;
        }
        default:
            close(s->client);
            s->client = -1;
            hist_add_locked(s, 'z', -1, 0, 0, NULL);
            break;
        }
    }
    pthread_mutex_unlock(&s->mu);
    sock_put(w, s);
}

/* ---- starting operations ------------------------------------------------------------------ */

static bool plausible_errno(int e)
{
    switch (e) {
    case ECONNRESET:
    case EPIPE:
    case ENOTCONN:
    case ECONNREFUSED:
    case ECONNABORTED:
    case EISCONN:
    case EALREADY:
    case EHOSTUNREACH:
    case ENETUNREACH:
        return true;
    default:
        return false;
    }
}

/* An operation started on the wrong kind of socket (see start_random). */
static bool odd_op(const opblk *b)
{
    return b->kind != K_CLOSE && (b->kind == K_ACCEPT) != (b->s->role == R_LISTEN);
}

static void split_iov(opblk *b, rng *r)
{
    int cnt = 1 + (int)rng_below(r, 4);
    size_t left = b->len;
    for (int i = 0; i < cnt; i++) {
        size_t part = i == cnt - 1 ? left : rng_below(r, (uint32_t)left + 1);
        b->m->iov[i].iov_base = b->buf + (b->len - left);
        b->m->iov[i].iov_len = part;
        left -= part;
    }
    b->iovcnt = cnt;
}

/* A transmit of len bytes of the outgoing stream from b->out_start: memory and ranges of a
 * memfd that holds the same bytes after a random prefix, as TransmitFile or as packets. */
static void prepare_transmit(world *w, opblk *b, rng *r, unsigned *flags, bool *as_file,
                             size_t *head, size_t *flen, size_t *tail, int64_t *foff)
{
    opmem *m = b->m;
    size_t len = b->len;
    size_t pre = rng_below(r, 3) == 0 ? 0 : rng_size(r, 8192);
    m->memfd = memfd_create("inv-xmit", MFD_CLOEXEC);
    WCHECK(w, m->memfd >= 0);
    uint8_t *tmp = malloc(pre + len);
    CHECK(tmp != NULL);
    memset(tmp, 0xee, pre);
    memcpy(tmp + pre, b->buf, len);
    WCHECK(w, pwrite(m->memfd, tmp, pre + len, 0) == (ssize_t)(pre + len));
    free(tmp);
    *flags = rng_pct(r, 4) ? CP_TF_DISCONNECT : 0;
    *as_file = rng_pct(r, 50);
    *foff = (int64_t)pre;
    if (*as_file) {
        *head = rng_pct(r, 50) ? rng_below(r, (uint32_t)len + 1) : 0;
        *tail = rng_pct(r, 50) ? rng_below(r, (uint32_t)(len - *head) + 1) : 0;
        *flen = len - *head - *tail;
        if (*flen == 0) { /* the file part must hold a byte: len 0 would mean "to the end" */
            if (*tail)
                (*tail)--;
            else
                (*head)--;
            *flen = 1;
        }
        return;
    }
    /* Packets: 1..4 slices, each from memory or from the file. */
    int n = 1 + (int)rng_below(r, 4);
    size_t pos = 0;
    for (int i = 0; i < n; i++) {
        size_t part = i == n - 1 ? len - pos : rng_below(r, (uint32_t)(len - pos) + 1);
        if (part == 0 && i != n - 1)
            part = len - pos > 1 ? 1 : len - pos;
        if (part == 0)
            break;
        bool file = rng_pct(r, 50);
        if (file)
            m->pk[i] = (cp_packet){.fd = m->memfd,
                                   .offset = (int64_t)(pre + pos),
                                   /* the last one may say "to the end of the file" */
                                   .len = (i == n - 1 && rng_pct(r, 50)) ? 0 : part};
        else
            m->pk[i] = (cp_packet){.buf = b->buf + pos, .len = part, .fd = -1};
        pos += part;
        b->iovcnt = i + 1;
        if (pos == len)
            break;
    }
    CHECK(pos == len);
}

/* Start an operation of `kind` on s (the caller holds a reference). */
static void start_op(world *w, tctx *t, sock *s, int kind)
{
    rng *r = &t->r;
    if (atomic_load(&w->outstanding) >= MAX_OUTSTANDING)
        return;
    if (s->recv_style == 1 && kind == K_POOL)
        kind = K_RECV;
    else if (s->recv_style == 2 && (kind == K_RECV || kind == K_RECVV))
        kind = K_POOL;
    if (kind == K_CONNX && s->role != R_CONN)
        kind = K_SENDX;
    size_t len = 0;
    switch (kind) {
    case K_RECV:
    case K_RECVV:
        len = rng_size(r, RECV_MAX);
        break;
    case K_SEND:
    case K_SENDV:
    case K_SENDX:
        len = rng_pct(r, 85) ? rng_size(r, 4096) : rng_size(r, SEND_MAX);
        break;
    case K_XMIT:
        len = rng_pct(r, 85) ? rng_size(r, 8192) : rng_size(r, SEND_MAX);
        break;
    case K_ACCEPT:
        len = rng_pct(r, 50) ? 0 : rng_size(r, FIRST_MAX);
        break;
    case K_CONNX:
        len = rng_pct(r, 20) ? 0 : rng_size(r, FIRST_MAX);
        break;
    default:
        break;
    }
    if (kind == K_CONNECT || kind == K_CONNX) {
        int zero = 0;
        if (!atomic_compare_exchange_strong(&s->connect_started, &zero, 1))
            return; /* one connect per connector */
    }
    opblk *b = op_new(kind, len);
    b->s = s;
    b->sid = s->id;
    b->timeout_ms = pick_timeout(r);
    b->op->timeout_ms = b->timeout_ms;
    if (kind == K_SEND || kind == K_SENDV || kind == K_SENDX || kind == K_XMIT || kind == K_CONNX)
        memset(b->buf, 0x5a, len);
    bool vec = kind == K_RECVV || kind == K_SENDV || (kind == K_SENDX && rng_pct(r, 50));
    if (vec)
        split_iov(b, r);
    if (kind == K_CONNECT || kind == K_CONNX) {
        pthread_mutex_lock(&w->mu);
        b->m->addr = w->laddr;
        pthread_mutex_unlock(&w->mu);
        if (rng_pct(r, 10))
            b->m->addr.sin_port = 0; /* nobody listens on port 0: refused */
    }
    b->expect_res = len;

    /* One-consumer modes: starts on a socket are serialised, so the test knows the order of
     * its queues. Sends of a socket whose peer checks the stream are serialised in every
     * mode: the order of the start calls is the order of the bytes. */
    bool track = kind_tx(kind) && s->role == R_PAIR;
    bool ordered = w->single_consumer || track;
    if (ordered)
        pthread_mutex_lock(&s->start_mu);
    /* Fill in the record, then publish it on the socket's list (cancellers look there). */
    pthread_mutex_lock(&s->mu);
    if (s->nout >= MAX_OUT_PER_SOCK) {
        pthread_mutex_unlock(&s->mu);
        if (ordered)
            pthread_mutex_unlock(&s->start_mu);
        op_recycle(b->m);
        free(b);
        if (kind == K_CONNECT || kind == K_CONNX)
            atomic_store(&s->connect_started, 0);
        return;
    }
    if (w->single_consumer)
        b->qserial = ++s->next_serial[kind_queue[kind]];
    if (track) {
        b->tx_tracked = true;
        b->out_start = s->out_off;
        s->out_off += len;
    }
    int closing_before = atomic_load(&s->closing);
    b->cancels_done0 = atomic_load(&s->cancels_done);
    b->t0 = cpt_now_ns();
    b->next = s->ops;
    if (s->ops)
        s->ops->prev = b;
    s->ops = b;
    s->nout++;
    hist_add_locked(s, 's', kind, b->qserial, (int64_t)b->timeout_ms, b->op);
    pthread_mutex_unlock(&s->mu);
    if (track)
        stream_fill(s->out_seed, b->out_start, b->buf, len);
    unsigned xflags = 0;
    bool xfile = false;
    size_t xhead = 0, xflen = 0, xtail = 0;
    int64_t xfoff = 0;
    if (kind == K_XMIT) {
        prepare_transmit(w, b, r, &xflags, &xfile, &xhead, &xflen, &xtail, &xfoff);
        if (xfile && rng_pct(r, 3)) {
            /* The file ends inside the range: the transmit fails (-EIO) once it gets there. */
            b->short_file = true;
            WCHECK(w, ftruncate(b->m->memfd, xfoff + (int64_t)xhead +
                                                 (int64_t)rng_below(r, (uint32_t)xflen)) == 0);
        }
    }
    sock_get(s); /* the operation's reference, dropped once its completion is handled */
    atomic_fetch_add(&w->outstanding, 1);
    if (kind == K_POOL)
        atomic_store(&s->pool_used, 1);
    /* From the start call on, b->m may be freed by another thread at any moment. */
    opmem *m = b->m;
    cp_op *op = b->op;
    int memfd = m->memfd;
    int ret;
    switch (kind) {
    case K_RECV:
        b->expect_ubuf = b->buf;
        ret = cp_socket_recv(&s->s, op, b->buf, len);
        break;
    case K_RECVV:
        b->expect_ubuf = m->iov;
        ret = cp_socket_recvv(&s->s, op, m->iov, b->iovcnt);
        break;
    case K_POOL:
        ret = cp_socket_recv_pooled(&s->s, op);
        break;
    case K_SEND:
        b->expect_ubuf = b->buf;
        ret = cp_socket_send(&s->s, op, b->buf, len);
        break;
    case K_SENDV:
        b->expect_ubuf = m->iov;
        ret = cp_socket_sendv(&s->s, op, m->iov, b->iovcnt);
        break;
    case K_SENDX:
        if (vec) {
            b->expect_ubuf = m->iov;
            ret = cp_socket_sendv_ex(&s->s, op, m->iov, b->iovcnt, CP_SEND_SKIP_ON_SUCCESS);
        } else {
            b->expect_ubuf = b->buf;
            ret = cp_socket_send_ex(&s->s, op, b->buf, len, CP_SEND_SKIP_ON_SUCCESS);
        }
        break;
    case K_XMIT:
        b->expect_ubuf = NULL;
        if (xfile)
            ret = cp_socket_transmit_file(&s->s, &m->top, memfd, xfoff + (int64_t)xhead, xflen,
                                          b->buf, xhead, b->buf + xhead + xflen, xtail, xflags);
        else
            ret = cp_socket_transmit_packets(&s->s, &m->top, m->pk, (unsigned)b->iovcnt, xflags);
        break;
    case K_ACCEPT:
        b->expect_ubuf = b->buf;
        ret = cp_socket_accept(&s->s, &m->aop, b->buf, len);
        break;
    case K_CONNECT:
        b->expect_ubuf = &m->addr;
        ret = cp_socket_connect(&s->s, op, (struct sockaddr *)&m->addr, sizeof(m->addr));
        break;
    case K_CONNX:
        b->expect_ubuf = &m->addr;
        ret = cp_socket_connect_ex(&s->s, &m->cop, (struct sockaddr *)&m->addr, sizeof(m->addr),
                                   len ? b->buf : NULL, len);
        break;
    default:
        ret = cp_socket_disconnect(&s->s, op);
        break;
    }
    /* A tracked send that was refused puts nothing on the wire: give its bytes back while
     * no later send can have reserved any (start_mu is still held). */
    if (track && ret < 0) {
        pthread_mutex_lock(&s->mu);
        WCHECK(w, s->out_off == b->out_start + len);
        s->out_off = b->out_start;
        pthread_mutex_unlock(&s->mu);
    }
    if (ordered)
        pthread_mutex_unlock(&s->start_mu);

    if (ret == CP_DONE_NOW) {
        /* Sent whole inside the call: the op is ours again and nothing may ever complete
         * for it (its memory is kept, poisoned, to recognise one that would). */
        if (kind != K_SENDX) {
            fprintf(stderr, "%s returned CP_DONE_NOW\n", kind_name[kind]);
            die_seed(w);
            CHECK(kind == K_SENDX);
        }
        atomic_fetch_add(&w->done_now[kind], 1);
        int st = ST_STARTING;
        if (!atomic_compare_exchange_strong(&b->state, &st, ST_REJECTED)) {
            fprintf(stderr, "send returned CP_DONE_NOW but the op completed as well\n");
            die_seed(w);
            CHECK(st == ST_STARTING);
        }
        hist_add(s, 'n', kind, b->qserial, (int64_t)len, b->op);
        pthread_mutex_lock(&s->mu);
        sock_unlink_op_locked(s, b);
        pthread_mutex_unlock(&s->mu);
        atomic_fetch_sub(&w->outstanding, 1);
        op_bury_or_reuse(w, b, MAGIC_DONENOW, r);
        sock_put(w, s);
        return;
    }

    if (ret == 0) {
        atomic_fetch_add(&w->accepted[kind], 1);
        if (closing_before == 2) {
            fprintf(stderr, "%s started on socket %" PRIu64 " after its close returned\n",
                    kind_name[kind], s->id);
            die_seed(w);
            CHECK(closing_before != 2);
        }
        int st = ST_STARTING;
        if (!atomic_compare_exchange_strong(&b->state, &st, ST_OUT))
            WCHECK(w, !w->exact && st == ST_DONE); /* completed on another thread already */
        op_put(b);
        return;
    }

    /* Refused at submission: nothing may ever complete for it. */
    if (memfd >= 0) {
        close(memfd);
        b->m->memfd = -1;
    }
    atomic_fetch_add(&w->rejected[kind], 1);
    hist_add(s, 'r', kind, b->qserial, ret, b->op);
    int st = ST_STARTING;
    if (!atomic_compare_exchange_strong(&b->state, &st, ST_REJECTED)) {
        fprintf(stderr, "%s start returned %d (%s) but the op completed\n", kind_name[kind], ret,
                cp_err_name(ret));
        die_seed(w);
        CHECK(st == ST_STARTING);
    }
    bool ok = false;
    if (odd_op(b) && ret != -EBADF)
        ok = true; /* the wrong kind of socket may be refused at once, as long as for good */
    else if (ret == -EBADF)
        ok = atomic_load(&s->closing) >= 1; /* only a closing socket refuses with EBADF */
    else if (ret == -EBUSY)
        ok = (kind == K_RECV || kind == K_RECVV) && w->uring && atomic_load(&s->pool_used);
    if (!ok || (closing_before == 2 && ret != -EBADF)) {
        fprintf(stderr,
                "%s on %s socket %" PRIu64 " (closing=%d): unexpected start error %d (%s)\n",
                kind_name[kind], role_name[s->role], s->id, atomic_load(&s->closing), ret,
                cp_err_name(ret));
        die_seed(w);
        CHECK(ok);
    }
    pthread_mutex_lock(&s->mu);
    sock_unlink_op_locked(s, b);
    pthread_mutex_unlock(&s->mu);
    if (kind == K_CONNECT || kind == K_CONNX)
        atomic_store(&s->connect_started, 0);
    atomic_fetch_sub(&w->outstanding, 1);
    op_bury_or_reuse(w, b, MAGIC_REJECTED, r);
    sock_put(w, s); /* the operation's reference */
}

static void close_sock(world *w, tctx *t, sock *s)
{
    int zero = 0;
    if (!atomic_compare_exchange_strong(&s->closing, &zero, 1)) {
        if (zero == 2 && rng_pct(&t->r, 30)) {
            /* Closing twice fails at once and queues nothing. */
            opblk *b = op_new(K_CLOSE, 0);
            b->s = s;
            b->sid = s->id;
            int r = cp_socket_close(&s->s, b->op);
            WCHECK(w, r == -EBADF);
            atomic_fetch_add(&w->n_invalid, 1);
            atomic_store(&b->state, ST_REJECTED);
            op_bury(w, b, MAGIC_REJECTED);
        }
        return;
    }
    pthread_mutex_lock(&w->mu);
    if (w->listener == s)
        w->listener = NULL; /* no more dialling it */
    pthread_mutex_unlock(&w->mu);
    atomic_fetch_add(&s->cancels_started, 1);
    opblk *b = op_new(K_CLOSE, 0);
    b->s = s;
    b->sid = s->id;
    b->t0 = cpt_now_ns();
    sock_get(s);
    atomic_fetch_add(&w->outstanding, 1);
    int r = cp_socket_close(&s->s, b->op);
    hist_add(s, 'K', K_CLOSE, 0, r, b->op);
    if (r != 0) {
        fprintf(stderr, "close of socket %" PRIu64 ": %d (%s)\n", s->id, r, cp_err_name(r));
        die_seed(w);
        CHECK_EQ(r, 0);
    }
    atomic_fetch_add(&w->accepted[K_CLOSE], 1);
    atomic_store(&s->closing, 2);
    atomic_fetch_add(&s->cancels_done, 1);
    int st = ST_STARTING;
    if (!atomic_compare_exchange_strong(&b->state, &st, ST_OUT))
        WCHECK(w, !w->exact && st == ST_DONE);
    op_put(b);
}

/* A referenced random outstanding op of s, or NULL. */
/* A random outstanding op of s, or NULL. The caller holds s->mu, which keeps the op's memory
 * alive: the completion handler takes it before freeing that. */
static opblk *pick_op_locked(sock *s, rng *r, bool only_out)
{
    if (s->nout == 0)
        return NULL;
    int k = (int)rng_below(r, (uint32_t)s->nout);
    for (opblk *b = s->ops; b; b = b->next)
        if (k-- <= 0 &&
            (!only_out || (atomic_load(&b->state) == ST_OUT && !atomic_load(&b->dequeued))))
            return b;
    return NULL;
}

static void cancel_one(world *w, tctx *t)
{
    sock *s = pick_sock(w, &t->r, PICK_ANY, true);
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    opblk *b = pick_op_locked(s, &t->r, false);
    if (b) {
        int before = atomic_exchange(&b->cancel_req, 1);
        int r = cp_socket_cancel(&s->s, b->op);
        hist_add_locked(s, 'x', b->kind, b->qserial, r, b->op);
        /* -EALREADY only for an op already being cancelled: by us, a cancel-all, a close or
         * its timeout. */
        if (!(r == 0 || r == -ENOENT || r == -EALREADY) ||
            (w->exact && r == -EALREADY && !before && !b->timeout_ms &&
             atomic_load(&s->cancels_started) == b->cancels_done0)) {
            fprintf(stderr, "cancel returned %d (%s)\n", r, cp_err_name(r));
            describe_op("cancelled op", b, 0);
            die_seed(w);
            CHECK(r == 0 || r == -ENOENT);
        }
    }
    pthread_mutex_unlock(&s->mu);
    sock_put(w, s);
}

static void cancel_all(world *w, tctx *t)
{
    sock *s = pick_sock(w, &t->r, PICK_ANY, true);
    if (!s)
        return;
    atomic_fetch_add(&s->cancels_started, 1);
    int r = cp_socket_cancel_all(&s->s);
    hist_add(s, 'a', -1, 0, r, NULL);
    WCHECK(w, r >= 0);
    if (w->exact) {
        pthread_mutex_lock(&s->mu);
        WCHECK(w, r <= s->nout);
        pthread_mutex_unlock(&s->mu);
    }
    atomic_fetch_add(&s->cancels_done, 1);
    sock_put(w, s);
}

/* Starts that must fail at once and queue nothing. */
static void invalid_starts(world *w, tctx *t)
{
    sock *s = pick_sock(w, &t->r, PICK_ANY, false);
    if (!s)
        return;
    atomic_fetch_add(&w->n_invalid, 1);
    opblk *b = op_new(K_RECV, 16);
    b->s = s;
    b->sid = s->id;
    cp_op *op = b->op;
    struct iovec none[2] = {{b->buf, 0}, {b->buf, 0}};
    switch (rng_below(&t->r, 7)) {
    case 6: {
        /* The newer starts refuse bad input too, and queue nothing. */
        cp_transmit_op *top = &b->m->top;
        cp_packet none_pk = {.buf = NULL, .len = 4, .fd = -1};
        WCHECK(w, cp_socket_send_ex(&s->s, op, b->buf, 4, 0x80) == -EINVAL);
        WCHECK(w, cp_socket_sendv_ex(&s->s, op, none, 0, CP_SEND_SKIP_ON_SUCCESS) == -EINVAL);
        WCHECK(w, cp_socket_transmit_packets(&s->s, top, &none_pk, 0, 0) == -EINVAL);
        WCHECK(w, cp_socket_transmit_packets(&s->s, top, &none_pk, 1, 0) == -EINVAL);
        WCHECK(w, cp_socket_transmit_file(&s->s, top, -1, 0, 0, NULL, 0, NULL, 0, 0) == -EINVAL);
        WCHECK(w, cp_socket_connect_ex(&s->s, &b->m->cop, (struct sockaddr *)&b->m->addr,
                                       sizeof(b->m->addr), NULL, 8) == -EINVAL);
        break;
    }
    case 0:
        WCHECK(w, cp_socket_recv(&s->s, op, b->buf, 0) == -EINVAL);
        break;
    case 1:
        WCHECK(w, cp_socket_send(&s->s, op, b->buf, 0) == -EINVAL);
        break;
    case 2:
        WCHECK(w, cp_socket_recvv(&s->s, op, none, 0) == -EINVAL);
        WCHECK(w, cp_socket_sendv(&s->s, op, none, 2) == -EINVAL);
        break;
    case 3:
        WCHECK(w, cp_socket_accept(&s->s, &b->m->aop, NULL, 8) == -EINVAL);
        WCHECK(w, cp_socket_connect(&s->s, op, (struct sockaddr *)&b->m->addr, 0) == -EINVAL);
        break;
    case 4:
        /* Cancelling an op that is not outstanding (here: never started). */
        WCHECK(w, cp_socket_cancel(&s->s, op) == -ENOENT);
        break;
    default: {
        /* Cancelling another socket's outstanding op through this one. */
        sock *o = pick_sock(w, &t->r, PICK_ANY, true);
        if (o && o != s) {
            pthread_mutex_lock(&o->mu);
            opblk *ob = pick_op_locked(o, &t->r, false);
            if (ob)
                WCHECK(w, cp_socket_cancel(&s->s, ob->op) == -ENOENT);
            pthread_mutex_unlock(&o->mu);
        }
        if (o)
            sock_put(w, o);
        break;
    }
    }
    atomic_store(&b->state, ST_REJECTED);
    op_bury(w, b, MAGIC_REJECTED);

    /* Starting an op that is still in use fails with -EBUSY and must leave the op as it
     * was. Only on one thread: there "outstanding" cannot turn into "dequeued" meanwhile. */
    if (w->exact && w->probe_busy && s->role != R_LISTEN) {
        pthread_mutex_lock(&s->mu);
        opblk *ob = pick_op_locked(s, &t->r, true);
        pthread_mutex_unlock(&s->mu);
        if (ob) {
            char other[8];
            cp_op *iop = ob->op;
            void *u_before = iop->u.buf;
            int r;
            switch (rng_below(&t->r, 3)) {
            case 0:
                r = cp_socket_recv(&s->s, iop, other, sizeof(other));
                break;
            case 1:
                r = cp_socket_send(&s->s, iop, other, sizeof(other));
                break;
            default:
                r = cp_socket_recv_pooled(&s->s, iop);
                break;
            }
            if (r != -EBUSY || iop->u.buf != u_before) {
                fprintf(stderr,
                        "starting an op still in use: returned %d (%s); op.u.buf %p -> %p "
                        "(a failed start must not touch the op)\n",
                        r, cp_err_name(r), u_before, iop->u.buf);
                describe_op("op in use", ob, 0);
                die_seed(w);
                CHECK(r == -EBUSY && iop->u.buf == u_before);
            }
        }
    }
    sock_put(w, s);
}

static void release_held(world *w, tctx *t, bool all)
{
    void *bufs[MAX_HELD];
    int n = 0;
    pthread_mutex_lock(&w->mu);
    while (w->nheld > 0 && (all || n == 0 || rng_pct(&t->r, 50))) {
        int i = (int)rng_below(&t->r, (uint32_t)w->nheld);
        bufs[n++] = w->held[i];
        w->held[i] = w->held[--w->nheld];
    }
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < n; i++)
        cp_buffer_release(w->port, bufs[i]);
}

/* A new associated socket connecting to the listener through the port. */
static void connector(world *w, tctx *t)
{
    ensure_listener(w);
    int fd = tcp_socket(false);
    struct sockaddr_in sa = loopback_addr(0);
    CHECK_OK(bind(fd, (struct sockaddr *)&sa, sizeof(sa)));
    sock *s = sock_add(w, fd, R_CONN, -1, NULL);
    if (!s)
        return;
    start_op(w, t, s, rng_pct(&t->r, 50) ? K_CONNX : K_CONNECT);
    sock_put(w, s);
}

static void start_random(world *w, tctx *t, int kind)
{
    sock *s;
    /* Now and then on the wrong kind of socket: an accept on a connection, a receive or a
     * send on a listener. Accepted or refused, each is an operation like any other. */
    bool odd = rng_pct(&t->r, 3);
    if ((kind == K_ACCEPT) != odd) {
        ensure_listener(w);
        s = pick_sock(w, &t->r, 1u << R_LISTEN, rng_pct(&t->r, 5));
    } else {
        s = pick_sock(w, &t->r, PICK_DATA, rng_pct(&t->r, 5));
    }
    if (!s)
        return;
    start_op(w, t, s, kind);
    sock_put(w, s);
}

/* ---- completions ---------------------------------------------------------------------------- */

static void verify_stream(world *w, sock *s, const opblk *b, const uint8_t *data, int64_t n)
{
    pthread_mutex_lock(&s->mu);
    if (s->verify) {
        if (n == 0) {
            /* End of stream only once the peer stopped sending. */
            if (!(s->client_wr_shut || s->client < 0)) {
                describe_op("end of stream while the peer is open", b, n);
                die_seed(w);
                CHECK(s->client_wr_shut || s->client < 0);
            }
            s->rx_eof = true;
        } else {
            bool bad = s->rx_eof || s->rx_off + (uint64_t)n > s->tx_off;
            int64_t at = -1;
            for (int64_t i = 0; !bad && i < n; i++)
                if (data[i] != stream_byte(s->seed, s->rx_off + (uint64_t)i)) {
                    bad = true;
                    at = i;
                }
            if (bad) {
                fprintf(stderr,
                        "stream of socket %" PRIu64 ": %" PRId64 " bytes at offset %" PRIu64
                        " (peer wrote %" PRIu64 ", eof %d): first wrong byte at %" PRId64 "\n",
                        s->id, n, s->rx_off, s->tx_off, s->rx_eof, at);
                int64_t probe = n < 16 ? n : 16;
                int shown = 0;
                for (uint64_t o = 0; probe >= 6 && shown < 4 && o + (uint64_t)probe <= s->tx_off;
                     o++) {
                    int64_t i = 0;
                    while (i < probe && data[i] == stream_byte(s->seed, o + (uint64_t)i))
                        i++;
                    if (i == probe && ++shown)
                        fprintf(stderr,
                                "  those bytes are the peer's stream at offset %" PRIu64 "\n", o);
                }
                hist_dump(s);
                describe_op("offending receive", b, n);
                die_seed(w);
                CHECK(!bad);
            }
            s->rx_off += (uint64_t)n;
        }
    }
    pthread_mutex_unlock(&s->mu);
}

static void do_action(world *w, tctx *t, bool may_dequeue);

static void handle_accepted(world *w, tctx *t, opblk *b, int64_t res)
{
    int fd = b->m->aop.fd;
    const struct sockaddr_in *peer = (const struct sockaddr_in *)&b->m->aop.addr;
    OPCHECK(w, b, res, fd >= 0 && peer->sin_family == AF_INET);
    int port = ntohs(peer->sin_port);
    pend pd = {.fd = -1};
    pthread_mutex_lock(&w->mu);
    /* Clients of different listeners may share a local port: match both. A ghost's port is
     * never given to a pending client of the same listener (dial checks). */
    int g = ghost_find_locked(w, port, b->sid);
    if (g >= 0) {
        w->ghosts[g] = w->ghosts[--w->nghosts];
        w->ghosts_accepted++;
    } else {
        for (int i = 0; i < w->npend; i++)
            if (w->pending[i].port == port && w->pending[i].lsid == b->sid) {
                pd = w->pending[i];
                w->pending[i] = w->pending[--w->npend];
                break;
            }
    }
    pthread_mutex_unlock(&w->mu);
    if (pd.fd >= 0 && w->single_consumer && w->check_order) {
        /* The first data is the start of the dialler's stream. */
        bool bad = (uint64_t)res > pd.tx_off || (res == 0 && b->len > 0 && !pd.wr_shut);
        for (int64_t i = 0; !bad && i < res; i++)
            bad = b->buf[i] != stream_byte(pd.seed, (uint64_t)i);
        if (bad)
            fprintf(stderr, "first data of a dialled client: wrote %" PRIu64 ", shut %d\n",
                    pd.tx_off, pd.wr_shut);
        OPCHECK(w, b, res, !bad);
    }
    sock *s;
    if (pd.fd >= 0) {
        pd.rx_off = (uint64_t)res;
        s = sock_add(w, fd, R_PAIR, pd.fd, &pd);
    } else {
        s = sock_add(w, fd, R_ACC, -1, NULL);
    }
    if (s) {
        if (!phase_over(w) && rng_pct(&t->r, 50))
            start_op(w, t, s, rng_pct(&t->r, 50) ? K_RECV : K_POOL);
        sock_put(w, s);
    }
}

static void handle(world *w, tctx *t, const cp_completion *c)
{
    opmem *m = CP_CONTAINER_OF(c->op, opmem, aop.op);
    int64_t res = c->result;
    if (m->magic != MAGIC_LIVE) {
        fprintf(
            stderr, "completion (key %" PRIuPTR ", result %" PRId64 ") for %s op %p\n", c->key, res,
            m->magic == MAGIC_REJECTED ? "a REJECTED (start failed)" : "a dead (already completed)",
            c->op);
        die_seed(w);
        CHECK(m->magic == MAGIC_LIVE);
    }
    opblk *b = m->rec;
    CHECK(b->magic == MAGIC_LIVE && b->m == m);
    int prev = atomic_exchange(&b->state, ST_DONE);
    if (prev != ST_OUT && !(prev == ST_STARTING && !w->exact)) {
        describe_op(prev == ST_DONE ? "completed twice" : "completion in a bad state", b, res);
        die_seed(w);
        CHECK(prev == ST_OUT);
    }
    sock *s = b->s;
    OPCHECK(w, b, res, c->key == (uintptr_t)b->sid);
    OPCHECK(w, b, res, m->aop.op.opcode == kind_opcode[b->kind]);
    uint8_t sid_state = atomic_load(&w->sid_state[b->sid]);
    if (w->single_consumer && sid_state != SID_LIVE) {
        describe_op("completion after its socket's close completion", b, res);
        die_seed(w);
        CHECK(sid_state == SID_LIVE);
    }

    bool cancelled =
        atomic_load(&b->cancel_req) || atomic_load(&s->cancels_started) > b->cancels_done0;
    int q = kind_queue[b->kind];
    if (res < 0) {
        OPCHECK(w, b, res, res > -4096);
        if (res == -ECANCELED) {
            OPCHECK(w, b, res, cancelled);
            atomic_fetch_add(&w->n_cancelled, 1);
        } else if (res == -ETIMEDOUT) {
            OPCHECK(w, b, res, b->timeout_ms > 0);
            /* never early */
            OPCHECK(w, b, res, cpt_now_ns() - b->t0 >= (int64_t)b->timeout_ms * 1000000);
            atomic_fetch_add(&w->n_timedout, 1);
        } else {
            OPCHECK(w, b, res,
                    (plausible_errno((int)-res) || odd_op(b) || (b->short_file && res == -EIO)) &&
                        b->kind != K_CLOSE);
            if (b->short_file && res == -EIO)
                atomic_fetch_add(&w->n_short_file, 1);
            if (odd_op(b))
                atomic_fetch_add(&w->n_odd, 1);
            atomic_fetch_add(&w->n_neterr, 1);
        }
        if (b->kind == K_ACCEPT)
            OPCHECK(w, b, res, m->aop.fd == -1);
        if (b->kind == K_POOL)
            OPCHECK(w, b, res, m->aop.op.u.buf == NULL);
        if (b->tx_tracked) {
            pthread_mutex_lock(&s->mu);
            if (b->out_start < s->out_fail_off)
                s->out_fail_off = b->out_start;
            pthread_mutex_unlock(&s->mu);
        }
    } else {
        atomic_fetch_add(&w->n_ok, 1);
        /* Only a disconnect may succeed on the wrong kind of socket (a listener). */
        OPCHECK(w, b, res, !odd_op(b) || b->kind == K_DISC);
        if (odd_op(b))
            atomic_fetch_add(&w->n_odd, 1);
        switch (b->kind) {
        case K_RECV:
        case K_RECVV:
            OPCHECK(w, b, res, (uint64_t)res <= b->len && m->aop.op.u.buf == b->expect_ubuf);
            verify_stream(w, s, b, b->buf, res); /* iovecs: consecutive slices of buf */
            break;
        case K_POOL:
            OPCHECK(w, b, res, (size_t)res <= cp_buffer_size(w->port));
            OPCHECK(w, b, res, (res > 0) == (m->aop.op.u.buf != NULL));
            verify_stream(w, s, b, m->aop.op.u.buf, res);
            if (res > 0) {
                bool hold = false;
                if (!atomic_load(&w->quiesce) && rng_pct(&t->r, 30)) {
                    pthread_mutex_lock(&w->mu);
                    if (w->nheld < MAX_HELD) {
                        w->held[w->nheld++] = m->aop.op.u.buf;
                        hold = true;
                    }
                    pthread_mutex_unlock(&w->mu);
                }
                if (!hold)
                    cp_buffer_release(w->port, m->aop.op.u.buf);
            }
            break;
        case K_SEND:
        case K_SENDV:
        case K_SENDX:
        case K_CONNX:
            OPCHECK(w, b, res, (uint64_t)res == b->len);
            break;
        case K_XMIT:
            OPCHECK(w, b, res, !b->short_file); /* it cannot send what the file lacks */
            OPCHECK(w, b, res, (uint64_t)res == b->expect_res && m->top.sent == (uint64_t)res);
            break;
        case K_ACCEPT:
            OPCHECK(w, b, res, (uint64_t)res <= b->len);
            handle_accepted(w, t, b, res);
            break;
        default:
            OPCHECK(w, b, res, res == 0);
            break;
        }
        if (b->kind == K_RECV || b->kind == K_RECVV || b->kind == K_POOL)
            atomic_fetch_add(&w->n_rx_bytes, (unsigned long)res);
    }

    pthread_mutex_lock(&s->mu);
    hist_add_locked(s, b->kind == K_CLOSE ? 'C' : 'c', b->kind, b->qserial, res, b->op);
    if (b->kind == K_CLOSE) {
        /* The close completes last: nothing of the socket is outstanding any more (with
         * one consumer; a start racing with the close may still be on its way to fail -
         * were it accepted, its completion would come after this one and be caught). */
        bool bad = false;
        if (w->single_consumer)
            for (opblk *o = s->ops; o; o = o->next)
                if (w->exact || atomic_load(&o->state) == ST_OUT) {
                    describe_op("still outstanding at the close completion", o, 0);
                    bad = true;
                }
        if (bad) {
            hist_dump(s);
            pthread_mutex_unlock(&s->mu);
            die_seed(w);
            CHECK(!bad);
        }
    } else {
        if (w->single_consumer && w->check_order && q >= 0 && res >= 0) {
            /* Successful operations of one queue complete in start order (first-data
             * accepts excepted: they wait for their data apart). */
            bool skip = b->kind == K_ACCEPT && b->len > 0;
            uint64_t *last = b->kind == K_ACCEPT ? &s->last_ok_accept0 : &s->last_ok[q];
            if (!skip) {
                if (b->qserial <= *last) {
                    fprintf(stderr,
                            "socket %" PRIu64 ": started #%" PRIu64
                            " completed (ok) after #%" PRIu64 " of the same queue\n",
                            s->id, b->qserial, *last);
                    describe_op("out of order", b, res);
                    hist_dump(s);
                    pthread_mutex_unlock(&s->mu);
                    die_seed(w);
                    CHECK(b->qserial > *last);
                }
                *last = b->qserial;
            }
        }
        sock_unlink_op_locked(s, b);
    }
    op_free_mem(b); /* under s->mu: a canceller holding it may still name the op */
    pthread_mutex_unlock(&s->mu);

    if (b->kind == K_CLOSE) {
        uint8_t live = SID_LIVE;
        WCHECK(w, atomic_compare_exchange_strong(&w->sid_state[b->sid], &live, SID_CLOSED));
        pthread_mutex_lock(&w->mu);
        table_remove_locked(w, s);
        if (w->listener == s)
            w->listener = NULL;
        if (s->role == R_LISTEN)
            drop_pending_locked(w, s->id); /* never accepted now */
        pthread_mutex_unlock(&w->mu);
    }
    int kind = b->kind;
    atomic_fetch_add(&w->completed[kind], 1);
    atomic_fetch_sub(&w->outstanding, 1);

    /* Follow-ups, as a server would: the same operation again, or something random. */
    bool again = !phase_over(w) && kind != K_CLOSE && kind != K_CONNECT && kind != K_CONNX &&
                 !atomic_load(&s->closing) && rng_pct(&t->r, 45);
    if (again && !(kind == K_POOL && res < 0))
        start_op(w, t, s, kind);
    op_put(b);
    if (kind == K_CLOSE)
        sock_put(w, s); /* the table's reference */
    sock_put(w, s);     /* the operation's */
    if (!phase_over(w) && rng_pct(&t->r, 25))
        do_action(w, t, false);
}

/* Dequeue up to max completions (waiting up to timeout_ms) and handle them. */
static int pump(world *w, tctx *t, unsigned max, int timeout_ms)
{
    cp_completion cs[16];
    int n = cp_port_dequeue(w->port, cs, max, timeout_ms);
    if (n == -ETIMEDOUT)
        return 0;
    if (n < 1 || n > (int)max) {
        fprintf(stderr, "dequeue returned %d (%s)\n", n, cp_err_name(n));
        die_seed(w);
        CHECK(n >= 1 && n <= (int)max);
    }
    if (trace_sid) {
        fprintf(stderr, "TRACE dequeue(max %u) -> %d:", max, n);
        for (int i = 0; i < n; i++)
            fprintf(stderr, " %p/%" PRIuPTR, cs[i].op, cs[i].key);
        fprintf(stderr, "\n");
    }
    /* The whole batch is cport's no more, though handled one by one. */
    for (int i = 0; i < n; i++) {
        opmem *m = CP_CONTAINER_OF(cs[i].op, opmem, aop.op);
        if (m->magic == MAGIC_LIVE)
            atomic_store(&m->rec->dequeued, 1);
    }
    for (int i = 0; i < n; i++)
        handle(w, t, &cs[i]);
    return n;
}

/* ---- the random mix -------------------------------------------------------------------------- */

enum act {
    A_RECV,
    A_RECVV,
    A_POOL,
    A_SEND,
    A_SENDV,
    A_DISC,
    A_ACCEPT,
    A_CONNECTOR,
    A_DIAL,
    A_CANCEL,
    A_CANCEL_ALL,
    A_CLOSE,
    A_PEER_WRITE,
    A_PEER_READ,
    A_PEER_SHUT,
    A_PEER_CLOSE,
    A_PEER_RESET,
    A_PEND_WRITE,
    A_PEND_CLOSE,
    A_RELEASE,
    A_INVALID,
    A_DEQUEUE,
    A_SENDX,
    A_XMIT,
    A__N
};

static const unsigned act_weight[A__N] = {
    [A_RECV] = 90,        [A_RECVV] = 45,      [A_POOL] = 90,       [A_SEND] = 80,
    [A_SENDV] = 40,       [A_DISC] = 8,        [A_ACCEPT] = 55,     [A_CONNECTOR] = 18,
    [A_DIAL] = 30,        [A_CANCEL] = 90,     [A_CANCEL_ALL] = 20, [A_CLOSE] = 28,
    [A_PEER_WRITE] = 120, [A_PEER_READ] = 100, [A_PEER_SHUT] = 6,   [A_PEER_CLOSE] = 5,
    [A_PEER_RESET] = 5,   [A_PEND_WRITE] = 30, [A_PEND_CLOSE] = 4,  [A_RELEASE] = 30,
    [A_INVALID] = 15,     [A_DEQUEUE] = 120,   [A_SENDX] = 60,      [A_XMIT] = 25,
};

static void do_action(world *w, tctx *t, bool may_dequeue)
{
    if (atomic_fetch_add(&w->n_actions, 1) >= w->budget)
        return;
    unsigned total = 0;
    for (int i = 0; i < A__N; i++)
        total += (i == A_DEQUEUE && !may_dequeue) ? 0 : act_weight[i];
    unsigned x = rng_below(&t->r, total);
    int a = 0;
    for (; a < A__N; a++) {
        unsigned wt = (a == A_DEQUEUE && !may_dequeue) ? 0 : act_weight[a];
        if (x < wt)
            break;
        x -= wt;
    }
    switch (a) {
    case A_RECV:
        start_random(w, t, K_RECV);
        break;
    case A_RECVV:
        start_random(w, t, K_RECVV);
        break;
    case A_POOL:
        start_random(w, t, K_POOL);
        break;
    case A_SEND:
        start_random(w, t, K_SEND);
        break;
    case A_SENDV:
        start_random(w, t, K_SENDV);
        break;
    case A_DISC:
        start_random(w, t, K_DISC);
        break;
    case A_ACCEPT:
        start_random(w, t, K_ACCEPT);
        break;
    case A_CONNECTOR:
        connector(w, t);
        break;
    case A_DIAL:
        dial(w, t);
        break;
    case A_CANCEL:
        cancel_one(w, t);
        break;
    case A_CANCEL_ALL:
        cancel_all(w, t);
        break;
    case A_CLOSE: {
        sock *s = pick_sock(w, &t->r, PICK_ANY, rng_pct(&t->r, 20));
        if (s) {
            if (s->role != R_LISTEN || rng_pct(&t->r, 25))
                close_sock(w, t, s);
            sock_put(w, s);
        }
        break;
    }
    case A_PEER_WRITE:
        peer_action(w, t, P_WRITE);
        break;
    case A_PEER_READ:
        peer_action(w, t, P_READ);
        break;
    case A_PEER_SHUT:
        peer_action(w, t, P_SHUT);
        break;
    case A_PEER_CLOSE:
        peer_action(w, t, P_CLOSE);
        break;
    case A_PEER_RESET:
        peer_action(w, t, P_RESET);
        break;
    case A_PEND_WRITE:
        pending_action(w, t, false);
        break;
    case A_PEND_CLOSE:
        pending_action(w, t, true);
        break;
    case A_RELEASE:
        release_held(w, t, false);
        break;
    case A_SENDX:
        start_random(w, t, K_SENDX);
        break;
    case A_XMIT:
        start_random(w, t, K_XMIT);
        break;
    case A_INVALID:
        invalid_starts(w, t);
        break;
    default:
        pump(w, t, 1 + rng_below(&t->r, 16), rng_pct(&t->r, 80) ? 0 : (int)rng_below(&t->r, 3));
        break;
    }
}

/* ---- set-up, wind-down, checks ------------------------------------------------------------- */

static uint64_t pick_seed(void)
{
    const char *e = getenv("CPORT_TEST_SEED");
    if (e && *e)
        return strtoull(e, NULL, 0);
    return mix64((uint64_t)cpt_now_ns() ^ ((uint64_t)getpid() << 32));
}

static bool skipped(const char *what)
{
    const char *e = getenv("CPORT_TEST_INV_SKIP");
    return e && strstr(e, what) != NULL;
}

static world *world_new(const char *mode, bool exact, bool single_consumer, unsigned workers,
                        long budget)
{
    world *w = calloc(1, sizeof(*w));
    CHECK(w != NULL);
    w->mode = mode;
    w->seed = pick_seed();
    w->exact = exact;
    w->single_consumer = single_consumer;
    w->probe_busy = !skipped("busy");
    if (getenv("CPORT_TEST_INV_TRACE"))
        trace_sid = strtoull(getenv("CPORT_TEST_INV_TRACE"), NULL, 0);
    w->check_order = !skipped("order");
    w->mix_recv = !skipped("mixrecv");
    w->actors_exit = !skipped("threadexit");
    recycle_on = !skipped("reuse");
    recycle_seed = w->seed;
    rng r = {w->seed ^ 0x1234};
    cp_port_options o = {.concurrency = workers, .flags = CP_PORT_QUIET};
    const char *cfg;
    switch (rng_below(&r, 4)) {
    case 0:
        cfg = "defaults";
        break;
    case 1:
        o.pool_buffers = 16;
        o.pool_per_socket = 2;
        cfg = "pool 16x(2/socket)";
        break;
    case 2:
        o.pool_buffers = 64;
        o.pool_per_socket = 4;
        o.ring_entries = 16;
        o.cq_entries = 32;
        cfg = "pool 64x(4/socket), ring 16, cq 32";
        break;
    default:
        o.ring_entries = 8;
        o.cq_entries = 16;
        o.pool_per_socket = 8;
        cfg = "ring 8, cq 16, pool 4096x(8/socket)";
        break;
    }
    if (workers > 1 && rng_pct(&r, 40))
        o.concurrency = 2;
    CHECK_OK(cp_port_create_ex(&w->port, &o));
    w->uring = cp_port_backend(w->port) == CP_BACKEND_IO_URING;
    w->target_pairs = 16 + (int)rng_below(&r, 32);
    w->budget = (unsigned long)budget;
    pthread_mutex_init(&w->mu, NULL);
    pthread_mutex_init(&w->pair_mu, NULL);
    w->sid_state = calloc(MAX_SIDS, sizeof(*w->sid_state));
    CHECK(w->sid_state != NULL);
    atomic_init(&w->next_sid, 1);
    int eph_lo = 32768, eph_hi = 60999;
    FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
    if (f) {
        if (fscanf(f, "%d %d", &eph_lo, &eph_hi) != 2)
            eph_lo = 32768, eph_hi = 60999;
        fclose(f);
    }
    if (eph_lo - 1024 >= 4096) {
        w->dial_lo = eph_lo - 12000 > 1024 ? eph_lo - 12000 : 1024;
        w->dial_hi = eph_lo;
    } else {
        CHECK(65536 - eph_hi > 4096);
        w->dial_lo = eph_hi + 1;
        w->dial_hi = 65536;
    }
    w->dial_next = w->dial_lo + (int)rng_below(&r, (uint32_t)(w->dial_hi - w->dial_lo));
    w->plain_lfd = tcp_socket(false);
    struct sockaddr_in sa = loopback_addr(0);
    CHECK_OK(bind(w->plain_lfd, (struct sockaddr *)&sa, sizeof(sa)));
    CHECK_OK(listen(w->plain_lfd, 64));
    w->plain_addr = loopback_addr(local_port(w->plain_lfd));
    fprintf(stderr,
            "invariant: seed=%" PRIu64 " (replay: CPORT_TEST_SEED=%" PRIu64
            ") mode=%s backend=%s port: %s, concurrency %u; %d pairs; %lu actions\n",
            w->seed, w->seed, mode, cp_port_backend_name(w->port), cfg, o.concurrency,
            w->target_pairs, w->budget);
    return w;
}

static void tctx_init(tctx *t, world *w, uint64_t salt, unsigned batch)
{
    t->w = w;
    t->r.s = mix64(w->seed + salt * 0x51ED27);
    t->batch = batch;
    t->scratch = malloc(SCRATCH);
    CHECK(t->scratch != NULL);
}

/* Close every socket not closing yet (new ones may have appeared). */
static void close_everything(world *w, tctx *t)
{
    sock *list[MAX_SOCKS];
    int n = 0;
    pthread_mutex_lock(&w->mu);
    for (int i = 0; i < w->nsocks; i++)
        if (!atomic_load(&w->socks[i]->closing)) {
            list[n++] = w->socks[i];
            sock_get(w->socks[i]);
        }
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < n; i++) {
        close_sock(w, t, list[i]);
        sock_put(w, list[i]);
    }
}

static bool all_done(world *w)
{
    return atomic_load(&w->live_socks) == 0 && atomic_load(&w->outstanding) == 0;
}

static void dump_state(world *w)
{
    pthread_mutex_lock(&w->mu);
    fprintf(stderr, "%d sockets left, %d alive, %ld ops outstanding:\n", w->nsocks,
            atomic_load(&w->live_socks), atomic_load(&w->outstanding));
    for (int i = 0; i < w->nsocks; i++) {
        sock *s = w->socks[i];
        fprintf(stderr, "  socket %" PRIu64 " (%s) closing=%d nout=%d refs=%d\n", s->id,
                role_name[s->role], atomic_load(&s->closing), s->nout, atomic_load(&s->refs));
        for (opblk *b = s->ops; b; b = b->next)
            describe_op("    outstanding", b, 0);
    }
    pthread_mutex_unlock(&w->mu);
}

static void final_checks(world *w, int64_t t0)
{
    unsigned long acc = 0, done = 0, rej = 0;
    for (int k = 0; k < K__N; k++) {
        unsigned long a = atomic_load(&w->accepted[k]), c = atomic_load(&w->completed[k]);
        if (a != c) {
            fprintf(stderr, "%s: %lu accepted, %lu completed\n", kind_name[k], a, c);
            die_seed(w);
            CHECK_EQ(a, c);
        }
        acc += a;
        done += c;
        rej += atomic_load(&w->rejected[k]);
    }
    /* Nothing more comes out of the port. */
    cp_completion c;
    int r = cp_port_dequeue(w->port, &c, 1, 50);
    if (r != -ETIMEDOUT) {
        fprintf(stderr, "after the end: dequeue returned %d, op %p result %" PRId64 "\n", r, c.op,
                c.result);
        die_seed(w);
        CHECK_EQ(r, -ETIMEDOUT);
    }
    cp_port_stats st;
    cp_port_get_stats(w->port, &st);
    WCHECK(w, st.queued == 0);
    WCHECK(w, st.completed == done && st.dequeued == done);
    fprintf(stderr,
            "invariant: %lu actions, %lu ops accepted = %lu completed (%lu rejected at start, "
            "%lu deliberately invalid); %lu ok, %lu cancelled, %lu timed out, %lu network "
            "errors; %lu bytes received; %.2f s\n",
            atomic_load(&w->n_actions), acc, done, rej, atomic_load(&w->n_invalid),
            atomic_load(&w->n_ok), atomic_load(&w->n_cancelled), atomic_load(&w->n_timedout),
            atomic_load(&w->n_neterr), atomic_load(&w->n_rx_bytes),
            (double)(cpt_now_ns() - t0) / 1e9);
    for (int k = 0; k < K__N; k++)
        fprintf(stderr, "  %-12s %7lu accepted %7lu rejected %7lu done at once\n", kind_name[k],
                atomic_load(&w->accepted[k]), atomic_load(&w->rejected[k]),
                atomic_load(&w->done_now[k]));
    fprintf(stderr,
            "  outgoing bytes the peers read and checked: %lu; streams broken by a failed "
            "send: %lu\n",
            atomic_load(&w->n_peer_checked), atomic_load(&w->n_tx_broken));
    fprintf(stderr,
            "  contexts reused without zeroing: %lu; operations on the wrong kind of socket "
            "completed: %lu; transmits short of file (-EIO): %lu\n",
            atomic_load(&n_reused), atomic_load(&w->n_odd), atomic_load(&w->n_short_file));
    pthread_mutex_lock(&w->mu);
    fprintf(stderr, "  closed pending clients accepted later: %lu; dials that met one: %lu\n",
            w->ghosts_accepted, w->dials_haunted);
    pthread_mutex_unlock(&w->mu);
}

static void world_free(world *w)
{
    cp_port_destroy(w->port);
    pthread_mutex_lock(&w->mu);
    drop_pending_locked(w, 0);
    while (w->graveyard) {
        opblk *b = w->graveyard;
        w->graveyard = b->next;
        free(b->m);
        free(b);
    }
    pthread_mutex_unlock(&w->mu);
    recycle_drain();
    close(w->plain_lfd);
    free((void *)w->sid_state);
    pthread_mutex_destroy(&w->mu);
    pthread_mutex_destroy(&w->pair_mu);
    free(w);
}

static void check_fds(int before)
{
    int after = cpt_count_fds();
    if (after != before) {
        fprintf(stderr, "descriptors: %d before the run, %d after it\n", before, after);
        char cmd[64];
        snprintf(cmd, sizeof(cmd), "ls -l /proc/%d/fd >&2", (int)getpid());
        if (system(cmd) != 0)
            fprintf(stderr, "(could not list them)\n");
    }
    CHECK_EQ(after, before);
}

static void seed_initial(world *w, tctx *t)
{
    ensure_listener(w);
    replenish(w, t);
    while (atomic_load(&w->live_socks) < w->target_pairs / 2)
        replenish(w, t);
}

/* ---- variant 1: one thread does everything ------------------------------------------------- */

TEST(mix_single_thread)
{
    int64_t t0 = cpt_now_ns();
    int fds0 = cpt_count_fds();
    world *w = world_new("single thread", true, true, 1, (long)cpt_scaled(400000, 20000));
    w->action_deadline_ms = cpt_now_ms() + ACTION_PHASE_MS;
    tctx t;
    tctx_init(&t, w, 1, 16);
    seed_initial(w, &t);
    while (!phase_over(w)) {
        do_action(w, &t, true);
        if (rng_pct(&t.r, 5)) {
            replenish(w, &t);
            ensure_listener(w);
        }
        if (atomic_load(&w->outstanding) > MAX_OUTSTANDING - 50)
            pump(w, &t, 16, 2);
    }
    atomic_store(&w->quiesce, 1);
    release_held(w, &t, true);
    int64_t deadline = cpt_now_ms() + DRAIN_MS;
    while (!all_done(w)) {
        if (cpt_now_ms() > deadline) {
            dump_state(w);
            die_seed(w);
            CHECK(!"every accepted operation completes once its socket is closed");
        }
        close_everything(w, &t);
        release_held(w, &t, true);
        pump(w, &t, 16, 20);
    }
    final_checks(w, t0);
    free(t.scratch);
    world_free(w);
    check_fds(fds0);
}

/* ---- variants 2 and 3: worker threads plus an acting thread -------------------------------- */

static void *worker_main(void *arg)
{
    tctx *t = arg;
    world *w = t->w;
    while (!atomic_load(&w->stop))
        pump(w, t, t->batch, 10);
    return NULL;
}

/* A short-lived acting thread: some actions, then it exits (the next one takes over).
 * Operations it started must not care that their starter is gone. */
static void *actor_main(void *arg)
{
    tctx *t = arg;
    world *w = t->w;
    for (unsigned k = 0; k < t->actions && !phase_over(w); k++) {
        do_action(w, t, false);
        if (rng_pct(&t->r, 3)) {
            replenish(w, t);
            ensure_listener(w);
        }
        if (rng_pct(&t->r, 2))
            sched_yield();
    }
    /* Without "threadexit" the one acting thread lives until the workers stop. */
    while (!w->actors_exit && !atomic_load(&w->stop)) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void run_threads(const char *mode, unsigned nworkers, unsigned batch, long budget)
{
    int64_t t0 = cpt_now_ns();
    int fds0 = cpt_count_fds();
    bool single = nworkers == 1;
    world *w = world_new(mode, false, single, nworkers, budget);
    w->action_deadline_ms = cpt_now_ms() + ACTION_PHASE_MS;
    tctx main_t;
    tctx_init(&main_t, w, 99, batch);
    seed_initial(w, &main_t);
    tctx workers[3];
    CHECK(nworkers <= 3);
    for (unsigned i = 0; i < nworkers; i++) {
        tctx_init(&workers[i], w, 10 + i, batch);
        CHECK_OK(-pthread_create(&workers[i].th, NULL, worker_main, &workers[i]));
    }
    /* The acting threads, one after the other, each for a random number of actions. */
    tctx actor;
    for (uint64_t gen = 0; w->actors_exit && !phase_over(w); gen++) {
        tctx_init(&actor, w, 1000 + gen, 0);
        actor.actions = 200 + rng_below(&main_t.r, 4000);
        CHECK_OK(-pthread_create(&actor.th, NULL, actor_main, &actor));
        pthread_join(actor.th, NULL);
        free(actor.scratch);
    }
    if (!w->actors_exit) {
        tctx_init(&actor, w, 1000, 0);
        actor.actions = UINT32_MAX;
        CHECK_OK(-pthread_create(&actor.th, NULL, actor_main, &actor));
        while (!phase_over(w)) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
    }

    /* Wind down: no new sockets or random actions; close everything until all is done. */
    atomic_store(&w->quiesce, 1);
    int64_t deadline = cpt_now_ms() + DRAIN_MS;
    while (!all_done(w)) {
        if (cpt_now_ms() > deadline) {
            dump_state(w);
            die_seed(w);
            CHECK(!"every accepted operation completes once its socket is closed");
        }
        close_everything(w, &main_t);
        release_held(w, &main_t, true);
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    atomic_store(&w->stop, 1);
    for (unsigned i = 0; i < nworkers; i++) {
        pthread_join(workers[i].th, NULL);
        free(workers[i].scratch);
    }
    if (!w->actors_exit) {
        pthread_join(actor.th, NULL);
        free(actor.scratch);
    }
    final_checks(w, t0);
    free(main_t.scratch);
    world_free(w);
    check_fds(fds0);
}

TEST(mix_three_workers_batch1)
{
    run_threads("3 workers, batch 1", 3, 1, (long)cpt_scaled(250000, 20000));
}

TEST(mix_three_workers_batch16)
{
    run_threads("3 workers, batch 16", 3, 16, (long)cpt_scaled(250000, 20000));
}

TEST(mix_one_worker_and_actor)
{
    run_threads("1 worker + acting threads", 1, 8, (long)cpt_scaled(250000, 20000));
}
