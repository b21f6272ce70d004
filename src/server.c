/* The server: listener and accept pool (S2), the timeout sweep (S3), lookaside buffers
 * (S4), graceful shutdown (S8) and stats. Connections themselves live in conn.c. */
#include "inject.h"
#include "pool_internal.h"
#include "server_internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum {
    ACCEPT_RETRY_MS = 100, /* pause after EMFILE/ENFILE/ENOBUFS/ENOMEM */
    QUIET_TICKS_TO_SHRINK = 10,
    BIG_BUFFER = 1,
};

static const uint32_t size_classes[CP__SIZE_CLASSES] = {4096, 16384, 65536};

const char *cp_close_reason_name(cp_close_reason r)
{
    static const char *const names[] = {
        "peer",         "error",     "local",    "handshake-timeout",
        "idle-timeout", "bad-frame", "shutdown", "deadline"};
    return (unsigned)r < sizeof(names) / sizeof(names[0]) ? names[r] : "unknown";
}

/* ---- buffers and workers ---------------------------------------------------------------- */

void *cp__server_buf_alloc(cp_server *sv, cp__worker *w, size_t size, uint32_t *got)
{
    for (int i = 0; i < CP__SIZE_CLASSES; i++) {
        if (size <= size_classes[i]) {
            *got = size_classes[i];
            return cp__cache_alloc(&w->bufs[i], &sv->bufs[i]);
        }
    }
    /* Bigger than any class: a plain allocation, counted (rare: sends over 64 KiB). */
    __atomic_add_fetch(&sv->big_allocations, 1, __ATOMIC_RELAXED);
    *got = (uint32_t)size;
    return malloc(size);
}

void cp__server_buf_free(cp_server *sv, cp__worker *w, void *buf, uint32_t size)
{
    /* By the class cp__server_buf_alloc took it from, the smallest that fits: callers may
     * give back by the size they asked for (a receive buffer of recv_buffer bytes, e.g.
     * 8 KiB, which is no class; freeing that with free() hit lookaside memory). */
    for (int i = 0; i < CP__SIZE_CLASSES; i++) {
        if (size <= size_classes[i]) {
            cp__cache_free(&w->bufs[i], &sv->bufs[i], buf);
            return;
        }
    }
    free(buf);
}

/* The frame decoder's assembly buffers come from the same size classes: a frame that
 * spans receives costs no malloc() in steady state. */
static void *frame_buf_alloc(void *ctx, size_t size)
{
    uint32_t got;
    return cp__server_buf_alloc(ctx, cp__server_worker(ctx), size, &got);
}

static void frame_buf_free(void *ctx, void *buf, size_t size)
{
    uint32_t cls = (uint32_t)size;
    for (int i = 0; i < CP__SIZE_CLASSES; i++) {
        if (size <= size_classes[i]) {
            cls = size_classes[i];
            break;
        }
    }
    cp__server_buf_free(ctx, cp__server_worker(ctx), buf, cls);
}

cp__worker *cp__server_worker_new(cp_server *sv)
{
    cp__worker *w;
    /* Once per pool thread, on its first completion: one of the records made at creation
     * (one per thread). Should there be none (not reached: the pool's threads are fixed),
     * wait for memory rather than share a record whose delivery fields this thread needs
     * to itself. */
    cp__lock_acquire(&sv->workers_lock);
    w = sv->spare_workers;
    if (w)
        sv->spare_workers = w->next;
    cp__lock_release(&sv->workers_lock);
    while (!w && !(w = CP__INJECT_FAIL("worker_record") ? NULL : calloc(1, sizeof(*w)))) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    if (pthread_setspecific(sv->wkey, w) != 0) {
        free(w);
        return &sv->foreign; /* (glibc only fails this for an invalid key) */
    }
    /* What a thread may keep aside: 64 contexts of each kind, and 32 x 4 KiB, 8 x 16 KiB
     * and 4 x 64 KiB buffers (512 KiB). Each buffer cache stays well below the slab's
     * 1 MiB chunk (a few workers together keep less than one chunk of a class aside), so
     * buffers that migrate between workers do not make the slab grow once traffic is
     * steady. */
    w->sends.cap = w->holds.cap = w->conns.cap = CP__CACHE_MAX;
    static const unsigned buf_cap[CP__SIZE_CLASSES] = {32, 8, 4};
    for (int i = 0; i < CP__SIZE_CLASSES; i++)
        w->bufs[i].cap = buf_cap[i];
    cp__lock_acquire(&sv->workers_lock);
    w->next = sv->workers;
    sv->workers = w;
    cp__lock_release(&sv->workers_lock);
    return w;
}

void cp__server_signal_done(cp_server *sv)
{
    pthread_mutex_lock(&sv->done_lock);
    pthread_cond_broadcast(&sv->done_cond);
    pthread_mutex_unlock(&sv->done_lock);
}

/* ---- the accept pool ---------------------------------------------------------------------- */

/* Post idle accepts until `accepts_target` are out (accept_lock held). */
static void fill_accepts_locked(cp_server *sv)
{
    if (sv->accept_paused || !sv->listener_open || __atomic_load_n(&sv->stopping, __ATOMIC_SEQ_CST))
        return;
    while (sv->accepts_posted < sv->accepts_target && sv->naccept_idle) {
        uint32_t i = sv->accept_idle[sv->naccept_idle - 1];
        memset(&sv->accepts[i], 0, sizeof(sv->accepts[i]));
        if (cp_socket_accept(&sv->listener, &sv->accepts[i], NULL, 0) < 0)
            break;
        sv->naccept_idle--;
        sv->accept_busy[i] = 1;
        sv->accepts_posted++;
    }
}

static void retry_accepts(void *arg)
{
    cp_server *sv = arg;
    cp__lock_acquire(&sv->accept_lock);
    cp_timer *t = sv->accept_retry;
    sv->accept_retry = NULL;
    sv->accept_paused = false;
    fill_accepts_locked(sv);
    cp__lock_release(&sv->accept_lock);
    if (t)
        cp_timer_cancel(t, false); /* release the fired one-shot */
}

/* An error of the connection being accepted, not of accepting: the next accept does not
 * meet it (accept(2) passes a new connection's pending network error on). */
static bool connection_error(int64_t res)
{
    switch (-res) {
    case ECONNABORTED:
    case EPROTO:
    case ENETDOWN:
    case ENOPROTOOPT:
    case EHOSTDOWN:
    case ENONET:
    case EHOSTUNREACH:
    case EOPNOTSUPP:
    case ENETUNREACH:
        return true;
    default:
        return false;
    }
}

/* Whether connections wait in the listener's backlog: accepts posted in the kernel take
 * each as it arrives, so one waiting found them all taken (accept_lock held; a system call,
 * made only when the pool would grow). */
static bool connections_waiting(cp_server *sv)
{
    int fd = cp__socket_fd_hold(&sv->listener);
    if (fd < 0)
        return false;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    bool waiting = poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
    cp__socket_fd_release(&sv->listener);
    return waiting;
}

static void on_listener(cp_socket *s, cp_op *op, int64_t res, void *user)
{
    (void)s;
    cp_server *sv = user;
    cp__server_worker_own(sv); /* a pool thread: its own record from now on */
    if (op->opcode == CP_OP_CLOSE) {
        cp__lock_acquire(&sv->accept_lock);
        sv->listener_open = false;
        cp__lock_release(&sv->accept_lock);
        cp__server_signal_done(sv);
        return;
    }
    cp_accept_op *aop = CP_CONTAINER_OF(op, cp_accept_op, op);
    int fd = aop->fd; /* before the refill below reuses this very op */
    cp__lock_acquire(&sv->accept_lock);
    sv->accept_busy[aop - sv->accepts] = 0;
    sv->accept_idle[sv->naccept_idle++] = (uint32_t)(aop - sv->accepts);
    bool drained = sv->accepts_posted-- == 1 && res >= 0;
    /* Not the surplus the tick cancelled when shrinking: counted as arrivals, they made the
     * next connection look like a burst and the pool grew straight back. */
    if (res != -ECANCELED)
        sv->accepts_since_tick++;
    if (res >= 0 || connection_error(res)) {
        /* A burst: connections wait in the backlog, having found every accept taken (the
         * seeds' FD_ACCEPT signal), when the last posted one completed or more completed
         * within one tick than are posted (a burst the immediate re-posting hides): post
         * more of them. Not on those conditions alone: with one accept posted each
         * connection drains the pool, and a steady trickle passes any count per tick, one
         * connection at a time, which one accept serves; the pool grew to accepts_max. */
        bool busy_tick = sv->accepts_since_tick >= sv->accepts_target &&
                         sv->accepts_since_tick >= sv->backlog_next_look;
        if ((drained || busy_tick) && sv->accepts_target < sv->o.accepts_max) {
            if (connections_waiting(sv)) {
                sv->accepts_target *= 2;
                if (sv->accepts_target > sv->o.accepts_max)
                    sv->accepts_target = sv->o.accepts_max;
            } else if (!drained) {
                /* Busy, not a burst (yet): the re-posted accepts keep up. Looked at again
                 * after as many arrivals as accepts are posted, not at every one (a
                 * system call each: 0.8 per connection at 25 000 a second); a burst
                 * beginning meanwhile fills the backlog by then. */
                sv->backlog_next_look = sv->accepts_since_tick + sv->accepts_target;
            }
        }
        fill_accepts_locked(sv);
    } else if (res != -ECANCELED) {
        /* Out of descriptors or memory, or an error that stays (EPERM from a seccomp filter
         * or an LSM, which the kernel checks before taking a connection; a listener that no
         * longer listens): accepting again at once would fail again at once, and the
         * workers would spin. Pause, retry on a timer. The failed accept is not posted
         * again until then: it may have been the last one. Without a timer the pause
         * stays, and the tick resumes it (accept_upkeep), so accepting neither stops for
         * good nor spins. */
        if (!sv->accept_paused) {
            sv->accept_paused = true;
            __atomic_add_fetch(&sv->accept_pauses, 1, __ATOMIC_RELAXED);
            if (!CP__INJECT_FAIL("accept_retry_timer"))
                cp_timer_start(sv->pool, &sv->accept_retry, ACCEPT_RETRY_MS, 0, retry_accepts, sv);
        }
    }
    cp__lock_release(&sv->accept_lock);
    if (res >= 0)
        cp__conn_start(sv, fd);
}

/* The tick's care of the accept pool: end a pause whose retry timer could not be started,
 * post the accepts that are missing (a pause's failed accept, an accept that could not be
 * posted; nothing else would post them once none is left to complete), and, when quiet for
 * a while, shrink the pool back toward accepts_min (cancel the surplus). */
static void accept_upkeep(cp_server *sv)
{
    cp__lock_acquire(&sv->accept_lock);
    if (sv->accept_paused && !sv->accept_retry)
        sv->accept_paused = false;
    fill_accepts_locked(sv); /* nothing to do when the pool is full */
    if (sv->accepts_since_tick) {
        sv->quiet_ticks = 0;
    } else if (++sv->quiet_ticks >= QUIET_TICKS_TO_SHRINK &&
               sv->accepts_target > sv->o.accepts_min) {
        sv->quiet_ticks = 0;
        sv->accepts_target /= 2;
        if (sv->accepts_target < sv->o.accepts_min)
            sv->accepts_target = sv->o.accepts_min;
        unsigned surplus =
            sv->accepts_posted > sv->accepts_target ? sv->accepts_posted - sv->accepts_target : 0;
        for (unsigned i = 0; i < sv->o.accepts_max && surplus; i++) {
            if (sv->accept_busy[i] && cp_socket_cancel(&sv->listener, &sv->accepts[i].op) == 0)
                surplus--;
        }
    }
    sv->accepts_since_tick = 0;
    sv->backlog_next_look = 0;
    cp__lock_release(&sv->accept_lock);
}

/* ---- walking the connections ----------------------------------------------------------- */

/* Connections are looked at under the slab's lock, and acted on after the walk, without
 * it: acting can finish a connection and free it into the slab. In between, each one the
 * walk will act on is pinned (one more operation reference, see cp__conn_sweep_pin), so
 * that it cannot finish and be reused by a new connection before the act. */
typedef enum walk_kind { WALK_SWEEP, WALK_STOP, WALK_ABORT } walk_kind;

enum { PIN_INLINE = 64 };

typedef struct pin_walk {
    cp_server *sv;
    walk_kind kind;
    uint32_t now;     /* WALK_SWEEP: the tick */
    bool missed;      /* out of memory for the list: a connection was left out */
    cp_conn **pinned; /* inline_pinned, or on the heap once that is full */
    size_t n, cap;
    cp_conn *inline_pinned[PIN_INLINE]; /* so that a quiet tick allocates nothing */
} pin_walk;

static void pin_one(void *obj, void *arg)
{
    pin_walk *x = arg;
    if (x->n == x->cap) {
        size_t cap = x->cap * 2;
        cp_conn **d = x->pinned == x->inline_pinned ? malloc(cap * sizeof(*d))
                                                    : realloc(x->pinned, cap * sizeof(*d));
        if (!d) {
            x->missed = true;
            return;
        }
        if (x->pinned == x->inline_pinned)
            memcpy(d, x->inline_pinned, sizeof(x->inline_pinned));
        x->pinned = d;
        x->cap = cap;
    }
    bool pinned = x->kind == WALK_SWEEP ? cp__conn_sweep_pin(x->sv, obj, x->now)
                                        : cp__conn_stop_pin(obj, x->kind == WALK_ABORT);
    if (pinned)
        x->pinned[x->n++] = obj;
}

/* One walk over every connection. Returns true if some connection was left out for want
 * of memory; the first PIN_INLINE never are, so repeating the walk makes progress. */
static bool walk_conns(cp_server *sv, walk_kind kind, uint32_t now)
{
    pin_walk x = {.sv = sv, .kind = kind, .now = now, .cap = PIN_INLINE};
    x.pinned = x.inline_pinned;
    cp__slab_walk(&sv->conns, pin_one, &x);
    for (size_t i = 0; i < x.n; i++) {
        if (kind == WALK_SWEEP)
            cp__conn_sweep(sv, x.pinned[i], now);
        else
            cp__conn_stop(sv, x.pinned[i], kind == WALK_ABORT);
    }
    if (x.pinned != x.inline_pinned)
        free(x.pinned);
    return x.missed;
}

/* ---- the tick: timeouts and accept-pool upkeep ----------------------------------------- */

static void on_tick(void *arg)
{
    cp_server *sv = arg;
    /* One pass over every connection: memory reads, no syscall, no per-connection timer
     * (a connection keeps a 16-bit tick of its last data in its state word). It also
     * retries closes that could not get an op when memory ran out. What it misses for
     * want of memory waits for the next tick. */
    uint32_t now = cp__server_tick(sv);
    CP__INJECT_DELAY("sweep_walk"); /* connections accepted meanwhile get later stamps */
    walk_conns(sv, WALK_SWEEP, now);
    accept_upkeep(sv);
}

/* ---- life cycle ----------------------------------------------------------------------------- */

/* The largest connection record (64 receives, framed, deadlines) with the largest user
 * area fits a lookaside chunk, so that the conns slab never refuses a valid size. */
enum {
    CONN_RECORD_MAX = (sizeof(cp_conn) + sizeof(cp__rx_multi) + 64 * sizeof(cp__rx_slot) +
                       sizeof(cp_frame_decoder) + sizeof(uint32_t) + 15) &
                      ~(size_t)15
};
_Static_assert(CONN_RECORD_MAX + CP_CONN_USER_MAX <= CP__SLAB_MAX_OBJECT,
               "CP_CONN_USER_MAX must leave room for a connection's own fields");

_Static_assert(CP_SERVER_THREADS_MAX <= CP_POOL_THREADS_MAX, "a server's threads are its pool's");

static uint32_t ms_to_ticks(unsigned ms, unsigned tick_ms)
{
    /* In 64 bits: ms within tick_ms of UINT_MAX wrapped to 0 ticks (off). */
    return (uint32_t)(((uint64_t)ms + tick_ms - 1) / tick_ms);
}

static int reserve_slabs(cp_server *sv)
{
    int r = cp__slab_reserve(&sv->conns) | cp__slab_reserve(&sv->sends) |
            cp__slab_reserve(&sv->xmits) | cp__slab_reserve(&sv->holds);
    for (int i = 0; i < CP__SIZE_CLASSES; i++)
        r |= cp__slab_reserve(&sv->bufs[i]);
    return r;
}

static void free_worker_list(cp__worker *w)
{
    while (w) {
        cp__worker *next = w->next;
        free(w);
        w = next;
    }
}

static void fini_slabs(cp_server *sv)
{
    cp__slab_fini(&sv->conns);
    cp__slab_fini(&sv->sends);
    cp__slab_fini(&sv->xmits);
    cp__slab_fini(&sv->holds);
    for (int i = 0; i < CP__SIZE_CLASSES; i++)
        cp__slab_fini(&sv->bufs[i]);
}

/* Each worker, as it starts: its record, marked (see in_callback). */
static void mark_worker(void *server)
{
    cp_server *sv = server;
    cp__worker *w = cp__server_worker_own(sv);
    if (w != &sv->foreign)
        w->pool_thread = true;
}

int cp_server_create(cp_server **serverp, const cp_server_options *opts,
                     const cp_server_callbacks *cb)
{
    if (!serverp || !opts || !cb || !cb->on_data || (opts->half_close && !cb->on_end))
        return -EINVAL;
    *serverp = NULL;
    cp_server_options o = *opts;
    long page = sysconf(_SC_PAGESIZE);
    if (o.threads > CP_SERVER_THREADS_MAX)
        return -EINVAL; /* a record each is made below: UINT_MAX of them would exhaust memory */
    if (o.threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        o.threads = n <= 0 ? 1 : n > CP_SERVER_THREADS_MAX ? CP_SERVER_THREADS_MAX : (unsigned)n;
    }
    if (o.accepts_min == 0)
        o.accepts_min = 4;
    if (o.accepts_max == 0)
        o.accepts_max = 256;
    if (o.accepts_max < o.accepts_min)
        o.accepts_max = o.accepts_min;
    if (o.backlog == 0)
        o.backlog = 4096;
    if (o.tick_ms == 0)
        o.tick_ms = 100;
    if (o.linger_ms == 0)
        o.linger_ms = 5000;
    if (o.max_pending_send == 0)
        o.max_pending_send = 1 << 20;
    if (o.recv_buffer == 0) /* (a page multiple also where pages are 64 KiB) */
        o.recv_buffer = page > 16384 ? (uint32_t)page : 16384;
    if (o.recvs == 0)
        o.recvs = 1;
    if (o.max_frame == 0)
        o.max_frame = CP_FRAME_DEFAULT_MAX;
    if (o.recv_buffer % (uint32_t)page || o.recv_buffer > size_classes[CP__SIZE_CLASSES - 1] ||
        o.recvs > 64 || o.accepts_max > 65536 || o.max_frame > CP_FRAME_MAX_LIMIT ||
        o.conn_user_size > CP_CONN_USER_MAX)
        return -EINVAL;

    cp_server *sv = calloc(1, sizeof(*sv));
    if (!sv)
        return -ENOMEM;
    sv->o = o;
    sv->cb = *cb;
    sv->listen_fd = -1;
    /* Timeouts are counted in 16-bit ticks: make a tick long enough that the longest
     * timeout stays under half their range. Not for linger_ms: a long linger would make
     * the tick, and with it the short timeouts' rounding, coarse (a 300 ms handshake
     * timeout with tick_ms 10 fired after 220 ms when linger_ms was half an hour). The
     * linger is counted in units of 2^linger_shift ticks instead. */
    unsigned longest =
        o.handshake_timeout_ms > o.idle_timeout_ms ? o.handshake_timeout_ms : o.idle_timeout_ms;
    sv->tick_ms = o.tick_ms;
    if (longest / sv->tick_ms >= 16384)
        sv->tick_ms = longest / 16384 + 1;
    sv->hs_ticks = ms_to_ticks(o.handshake_timeout_ms, sv->tick_ms);
    sv->idle_ticks = ms_to_ticks(o.idle_timeout_ms, sv->tick_ms);
    uint64_t linger = ms_to_ticks(o.linger_ms, sv->tick_ms);
    unsigned shift = 0;
    while (((linger + (1ull << shift) - 1) >> shift) >= 16383)
        shift++;
    sv->linger_shift = shift;
    /* One unit more when units are coarser than a tick: the stamp is rounded down. */
    sv->linger_units = (uint32_t)(((linger + (1ull << shift) - 1) >> shift) + (shift ? 1 : 0));
    /* The sweep resets a close whose replies made no progress for linger_units units; it
     * sees a stall from the first retransmission or window probe, which may come a
     * retransmission timeout after the kernel's clock started (retrans_stamp is the head's
     * first sending), and acts up to a unit for the stamp's rounding and a tick or two of
     * sweep lateness after that. The kernel gives up silently: it must come later. */
    uint64_t unit_ms = (uint64_t)sv->tick_ms << shift;
    uint64_t backstop = (uint64_t)sv->linger_units * unit_ms + 3 * unit_ms +
                        (o.linger_ms > 2000 ? o.linger_ms : 2000);
    sv->linger_backstop_ms = backstop > INT_MAX ? INT_MAX : (unsigned)backstop;
    sv->tick_ns = (int64_t)sv->tick_ms * 1000000;
    sv->tick_epoch_ns = cp__now_ns();
    struct timespec res;
    sv->coarse_ns = clock_getres(CLOCK_MONOTONIC_COARSE, &res) == 0
                        ? (int64_t)res.tv_sec * 1000000000 + res.tv_nsec
                        : 10000000;
    sv->frame_cfg = (cp_frame_config){.max_frame = o.max_frame,
                                      .alloc = frame_buf_alloc,
                                      .free = frame_buf_free,
                                      .alloc_ctx = sv};

    /* Connection layout: base, receive slots, frame decoder, user area. */
    size_t off = sizeof(cp_conn);
    sv->off_multi = off;
    if (o.recvs > 1)
        off += sizeof(cp__rx_multi) + o.recvs * sizeof(cp__rx_slot);
    sv->off_frame = off;
    if (o.framed)
        off += sizeof(cp_frame_decoder);
    sv->off_deadline = off;
    if (o.conn_deadlines)
        off += sizeof(uint32_t);
    off = (off + 15) & ~(size_t)15;
    sv->off_user = off;
    sv->conn_size = off + o.conn_user_size;
    /* Cannot fail: CP_CONN_USER_MAX leaves room for the largest record (asserted above). */
    int r = cp__slab_init(&sv->conns, sv->conn_size);
    r |= cp__slab_init(&sv->sends, sizeof(cp__send));
    r |= cp__slab_init(&sv->xmits, sizeof(cp__xmit));
    r |= cp__slab_init(&sv->holds, sizeof(cp__hold));
    for (int i = 0; i < CP__SIZE_CLASSES; i++)
        r |= cp__slab_init(&sv->bufs[i], size_classes[i]);
    if (r < 0) {
        free(sv);
        return -EINVAL;
    }
    /* Each slab's first chunk now: after a burst took all memory (lookaside chunks are
     * kept, never given back), a slab that never grew could not serve again (on io_uring
     * every reply needs a context, every close too), and the server would accept and
     * drop every connection until restarted. Touches one page per slab. */
    if (reserve_slabs(sv) < 0) {
        fini_slabs(sv);
        free(sv);
        return -ENOMEM;
    }
    cp__lock_init(&sv->accept_lock);
    cp__lock_init(&sv->workers_lock);
    sv->foreign.shared = true; /* its caches stay without room (cap 0) */
    pthread_mutex_init(&sv->done_lock, NULL);
    /* The shutdown's deadline is measured on the monotonic clock: on the wall clock a step
     * (NTP, an administrator) would move it, by hours back or forth. */
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&sv->done_cond, &ca);
    pthread_condattr_destroy(&ca);
    sv->accepts = calloc(o.accepts_max, sizeof(*sv->accepts));
    sv->accept_busy = calloc(o.accepts_max, 1);
    sv->accept_idle = calloc(o.accepts_max, sizeof(*sv->accept_idle));
    for (unsigned i = 0; sv->accept_idle && i < o.accepts_max; i++)
        sv->accept_idle[i] = o.accepts_max - 1 - i; /* slot 0 on top */
    sv->naccept_idle = o.accepts_max;
    bool spares = true;
    for (unsigned i = 0; spares && i < o.threads; i++) {
        cp__worker *w = calloc(1, sizeof(*w));
        if (w) {
            w->next = sv->spare_workers;
            sv->spare_workers = w;
        }
        spares = w != NULL;
    }
    r = pthread_key_create(&sv->wkey, NULL);
    if (!sv->accepts || !sv->accept_busy || !sv->accept_idle || !spares || r != 0) {
        free(sv->accepts);
        free(sv->accept_busy);
        free(sv->accept_idle);
        free_worker_list(sv->spare_workers);
        if (r == 0)
            pthread_key_delete(sv->wkey);
        fini_slabs(sv);
        free(sv);
        return -ENOMEM;
    }
    cp_pool_options po = {.concurrency = o.threads, .threads = o.threads, .batch = 64};
    po.port = o.port_options;
    po.port.backend = o.backend;
    r = cp__pool_create_marked(&sv->pool, &po, mark_worker, sv);
    if (r < 0) {
        pthread_key_delete(sv->wkey);
        free(sv->accepts);
        free(sv->accept_busy);
        free(sv->accept_idle);
        free_worker_list(sv->workers); /* (the threads that started took theirs) */
        free_worker_list(sv->spare_workers);
        fini_slabs(sv);
        free(sv);
        return r;
    }
    sv->port = cp_pool_port(sv->pool);
    sv->conn_binding = (cp_io_binding){cp__conn_io, sv};
    sv->listener_binding = (cp_io_binding){on_listener, sv};
    sv->accepts_target = o.accepts_min;
    *serverp = sv;
    return 0;
}

/* The listener's address from options.bind: an IPv4 address, or an IPv6 one, bare or in
 * brackets ("[::1]"); NULL = "0.0.0.0". *v6only: what IPV6_V6ONLY must be (IPv6 only; -1
 * for IPv4): off for "::" (one listener for both families, IPv4 peers as v4-mapped
 * addresses) and for a v4-mapped address (which only IPv4 peers can reach: Linux refuses
 * to bind one with the option on), on for any other. -EINVAL for anything else. */
static int listen_addr(const char *spec, uint16_t port, struct sockaddr_storage *ss, socklen_t *len,
                       int *v6only)
{
    memset(ss, 0, sizeof(*ss));
    if (!spec)
        spec = "0.0.0.0";
    struct sockaddr_in *in = (struct sockaddr_in *)ss;
    if (inet_pton(AF_INET, spec, &in->sin_addr) == 1) {
        in->sin_family = AF_INET;
        in->sin_port = htons(port);
        *len = sizeof(*in);
        *v6only = -1;
        return 0;
    }
    char text[INET6_ADDRSTRLEN];
    size_t n = strlen(spec);
    if (n >= 2 && spec[0] == '[' && spec[n - 1] == ']') {
        if (n - 2 >= sizeof(text))
            return -EINVAL;
        memcpy(text, spec + 1, n - 2);
        text[n - 2] = 0;
        spec = text;
    }
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET6, spec, &in6->sin6_addr) != 1)
        return -EINVAL;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(port);
    *len = sizeof(*in6);
    *v6only =
        IN6_IS_ADDR_UNSPECIFIED(&in6->sin6_addr) || IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr) ? 0 : 1;
    return 0;
}

int cp_server_start(cp_server *sv)
{
    /* Once: a second start would associate a new listener over the live one (its accepts
     * outstanding) and leak it, bound and listening; after a shutdown the pool is gone. */
    if (!sv)
        return -EINVAL;
    if (sv->ticker || __atomic_load_n(&sv->shutdown_state, __ATOMIC_RELAXED) != 0)
        return -EALREADY;
    struct sockaddr_storage sa;
    socklen_t salen;
    int v6only = -1;
    if (listen_addr(sv->o.bind, sv->o.port, &sa, &salen, &v6only) < 0)
        return -EINVAL;
    int fd = socket(sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    /* Linux copies it to every accepted socket, which then needs no setsockopt of its own
     * (cp__conn_start checks that once). */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    /* Explicitly, not the system's default (net.ipv6.bindv6only): "::" must take IPv4 too,
     * whatever the machine says, and every other IPv6 address is IPv6 only (server.h). */
    if ((v6only >= 0 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only)) < 0) ||
        bind(fd, (struct sockaddr *)&sa, salen) < 0 || listen(fd, (int)sv->o.backlog) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    socklen_t len = sizeof(sa);
    getsockname(fd, (struct sockaddr *)&sa, &len);
    sv->listen_port = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port
                                                     : ((struct sockaddr_in *)&sa)->sin_port);
    /* The ticker first: it can be cancelled, while a listener associated with the port
     * could only be closed through it (a failed start left it open, listening, and its
     * descriptor leaked). Until the listener is open the tick has no accepts to tend. */
    int r = CP__INJECT_FAIL("server_ticker")
                ? -ENOMEM
                : cp_timer_start(sv->pool, &sv->ticker, sv->tick_ms, sv->tick_ms, on_tick, sv);
    if (r < 0) {
        close(fd);
        return r;
    }
    r = cp_pool_associate(sv->pool, &sv->listener, fd, &sv->listener_binding);
    if (r < 0) {
        cp_timer_cancel(sv->ticker, true);
        sv->ticker = NULL;
        close(fd);
        return r;
    }
    cp__lock_acquire(&sv->accept_lock);
    sv->listener_open = true;
    fill_accepts_locked(sv);
    cp__lock_release(&sv->accept_lock);
    return 0;
}

uint16_t cp_server_listen_port(const cp_server *sv)
{
    return sv->listen_port;
}

cp_port *cp_server_port(cp_server *sv)
{
    return sv->port;
}

void *cp_server_user(const cp_server *sv)
{
    return sv->o.user;
}

static void stop_all(void *arg)
{
    while (walk_conns(arg, WALK_STOP, 0))
        ;
}

static void abort_all(void *arg)
{
    while (walk_conns(arg, WALK_ABORT, 0))
        ;
}

/* Stop (or cut) every connection. On a worker, so that an on_close run by the walk's
 * dropping the last reference runs there, like every other callback; from the calling
 * thread only if the work item cannot be queued. */
static void stop_conns(cp_server *sv, bool abort)
{
    cp_work_fn fn = abort ? abort_all : stop_all;
    if (CP__INJECT_FAIL("stop_item") || cp_pool_submit(sv->pool, fn, sv) < 0)
        fn(sv);
}

/* Wait until every connection and the listener are closed, or the absolute deadline. */
static bool wait_closed(cp_server *sv, const struct timespec *deadline)
{
    bool done;
    pthread_mutex_lock(&sv->done_lock);
    for (;;) {
        cp__lock_acquire(&sv->accept_lock);
        bool listener = sv->listener_open;
        cp__lock_release(&sv->accept_lock);
        done = !listener && __atomic_load_n(&sv->conns_open, __ATOMIC_SEQ_CST) == 0;
        if (done)
            break;
        if (!deadline) {
            pthread_cond_wait(&sv->done_cond, &sv->done_lock);
        } else if (pthread_cond_timedwait(&sv->done_cond, &sv->done_lock, deadline) == ETIMEDOUT) {
            break;
        }
    }
    pthread_mutex_unlock(&sv->done_lock);
    return done;
}

/* Whether the caller is one of the server's callbacks, which the shutdown would wait for
 * (and whose worker it would join): a worker, marked as it started (by a thread-specific
 * record: thread ids are reused once the workers are joined, and a new thread could then
 * pass for one), or the thread running the shutdown, on which an on_close may run. */
static bool in_callback(cp_server *sv)
{
    cp__worker *w = pthread_getspecific(sv->wkey);
    if (w && w->pool_thread)
        return true;
    pthread_mutex_lock(&sv->done_lock);
    bool r = sv->shutdown_state == 1 && pthread_equal(sv->shutdown_thread, pthread_self());
    pthread_mutex_unlock(&sv->done_lock);
    return r;
}

int cp_server_shutdown(cp_server *sv, unsigned deadline_ms)
{
    if (!sv)
        return 0;
    if (in_callback(sv))
        return -EDEADLK;
    /* Once; a caller that comes while another shuts down waits until it has finished. */
    pthread_mutex_lock(&sv->done_lock);
    bool first = sv->shutdown_state == 0;
    if (first) {
        sv->shutdown_state = 1;
        sv->shutdown_thread = pthread_self();
    }
    while (sv->shutdown_state == 1 && !first)
        pthread_cond_wait(&sv->done_cond, &sv->done_lock);
    pthread_mutex_unlock(&sv->done_lock);
    if (!first)
        return 0;
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline); /* done_cond's clock */
    deadline.tv_sec += deadline_ms / 1000;
    deadline.tv_nsec += (long)(deadline_ms % 1000) * 1000000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000;
    }
    __atomic_store_n(&sv->stopping, 1, __ATOMIC_SEQ_CST);
    /* Stop accepting. */
    cp__lock_acquire(&sv->accept_lock);
    bool listening = sv->listener_open;
    cp_timer *retry = sv->accept_retry;
    sv->accept_retry = NULL;
    cp__lock_release(&sv->accept_lock);
    if (retry)
        cp_timer_cancel(retry, true);
    if (listening)
        cp_socket_close(&sv->listener, &sv->listener_close);
    /* Stop reading; each connection closes once its replies are out. */
    stop_conns(sv, false);
    int r = 0;
    if (!wait_closed(sv, &deadline)) {
        /* Deadline: cut what is left. Only connections make it -ETIMEDOUT: the listener's
         * close, still completing, cuts nothing (a zero deadline would otherwise always
         * report a cut). */
        if (__atomic_load_n(&sv->conns_open, __ATOMIC_SEQ_CST) != 0)
            r = -ETIMEDOUT;
        stop_conns(sv, true);
        wait_closed(sv, NULL);
    }
    if (sv->ticker) {
        cp_timer_cancel(sv->ticker, true);
        sv->ticker = NULL;
    }
    cp_pool_destroy(sv->pool, CP_POOL_DRAIN);
    sv->pool = NULL;
    pthread_mutex_lock(&sv->done_lock);
    sv->shutdown_state = 2;
    pthread_cond_broadcast(&sv->done_cond);
    pthread_mutex_unlock(&sv->done_lock);
    return r;
}

int cp_server_destroy(cp_server *sv)
{
    if (!sv)
        return 0;
    if (in_callback(sv))
        return -EDEADLK;
    pthread_mutex_lock(&sv->done_lock);
    int state = sv->shutdown_state;
    pthread_mutex_unlock(&sv->done_lock);
    if (state != 2) {
        if (state == 1 || sv->listener_open || __atomic_load_n(&sv->conns_open, __ATOMIC_RELAXED))
            cp_server_shutdown(sv, 0); /* (waits for one running on another thread) */
        else {
            if (sv->ticker)
                cp_timer_cancel(sv->ticker, true);
            cp_pool_destroy(sv->pool, CP_POOL_DRAIN);
        }
    }
    fini_slabs(sv);
    free_worker_list(sv->workers);
    free_worker_list(sv->spare_workers);
    pthread_key_delete(sv->wkey);
    pthread_mutex_destroy(&sv->done_lock);
    pthread_cond_destroy(&sv->done_cond);
    free(sv->accepts);
    free(sv->accept_busy);
    free(sv->accept_idle);
    free(sv);
    return 0;
}

/* ---- stats ------------------------------------------------------------------------------ */

void cp_server_get_stats(cp_server *sv, cp_server_stats *st)
{
    if (!st)
        return;
    memset(st, 0, sizeof(*st));
    if (!sv)
        return;
    st->conns_open = __atomic_load_n(&sv->conns_open, __ATOMIC_RELAXED);
    st->conns_total = __atomic_load_n(&sv->conns_total, __ATOMIC_RELAXED);
    st->conns_rejected = __atomic_load_n(&sv->conns_rejected, __ATOMIC_RELAXED);
    st->conns_reaped = __atomic_load_n(&sv->conns_reaped, __ATOMIC_RELAXED);
    st->accept_pauses = __atomic_load_n(&sv->accept_pauses, __ATOMIC_RELAXED);
    st->backpressure_events = __atomic_load_n(&sv->backpressure_events, __ATOMIC_RELAXED);
    st->frames_in = __atomic_load_n(&sv->frames_in, __ATOMIC_RELAXED);
    st->frames_rejected = __atomic_load_n(&sv->frames_rejected, __ATOMIC_RELAXED);
    st->sends_refused = __atomic_load_n(&sv->sends_refused, __ATOMIC_RELAXED);
    cp__lock_acquire(&sv->accept_lock);
    st->accepts_outstanding = sv->accepts_posted;
    st->accepts_target = sv->accepts_target;
    cp__lock_release(&sv->accept_lock);
    st->completions = __atomic_load_n(&sv->foreign.completions, __ATOMIC_RELAXED);
    st->bytes_in = __atomic_load_n(&sv->foreign.bytes_in, __ATOMIC_RELAXED);
    st->bytes_out = __atomic_load_n(&sv->foreign.bytes_out, __ATOMIC_RELAXED);
    cp__lock_acquire(&sv->workers_lock);
    for (cp__worker *w = sv->workers; w; w = w->next) {
        st->completions += __atomic_load_n(&w->completions, __ATOMIC_RELAXED);
        st->bytes_in += __atomic_load_n(&w->bytes_in, __ATOMIC_RELAXED);
        st->bytes_out += __atomic_load_n(&w->bytes_out, __ATOMIC_RELAXED);
    }
    cp__lock_release(&sv->workers_lock);
    st->allocations = __atomic_load_n(&sv->big_allocations, __ATOMIC_RELAXED) +
                      __atomic_load_n(&sv->conns.allocations, __ATOMIC_RELAXED) +
                      __atomic_load_n(&sv->sends.allocations, __ATOMIC_RELAXED) +
                      __atomic_load_n(&sv->xmits.allocations, __ATOMIC_RELAXED) +
                      __atomic_load_n(&sv->holds.allocations, __ATOMIC_RELAXED);
    for (int i = 0; i < CP__SIZE_CLASSES; i++)
        st->allocations += __atomic_load_n(&sv->bufs[i].allocations, __ATOMIC_RELAXED);
}

int cp_server_stats_prometheus(cp_server *sv, const char *prefix, char *buf, size_t size)
{
    if (!sv || !prefix)
        return -EINVAL;
    cp_server_stats s;
    cp_server_get_stats(sv, &s);
    const struct {
        const char *name, *type, *help;
        uint64_t v;
    } m[] = {
        {"connections_open", "gauge", "Connections open now", s.conns_open},
        {"connections_total", "counter", "Connections accepted and kept", s.conns_total},
        {"connections_rejected_total", "counter", "Connections closed at accept (limit or refused)",
         s.conns_rejected},
        {"connections_reaped_total", "counter",
         "Connections closed by the handshake or idle timeout", s.conns_reaped},
        {"accepts_outstanding", "gauge", "Accepts posted now", s.accepts_outstanding},
        {"accepts_target", "gauge", "Accepts the pool aims to keep posted", s.accepts_target},
        {"accept_pauses_total", "counter", "Times accepting paused on a resource or lasting error",
         s.accept_pauses},
        {"bytes_received_total", "counter", "Bytes received", s.bytes_in},
        {"bytes_sent_total", "counter", "Bytes sent", s.bytes_out},
        {"completions_total", "counter", "Completions handled", s.completions},
        {"backpressure_events_total", "counter", "Times reading paused because replies piled up",
         s.backpressure_events},
        {"frames_received_total", "counter", "Frames delivered", s.frames_in},
        {"frames_rejected_total", "counter", "Connections closed for a bad frame",
         s.frames_rejected},
        {"sends_refused_total", "counter", "Sends refused by the send queue limit",
         s.sends_refused},
        {"allocations_total", "counter", "Lookaside chunks and large buffers allocated",
         s.allocations},
    };
    size_t used = 0;
    for (size_t i = 0; i < sizeof(m) / sizeof(m[0]); i++) {
        /* Counting only (no buffer, or it is full): format into a byte that stays empty. */
        char none[1];
        bool room = buf && used < size;
        int n =
            snprintf(room ? buf + used : none, room ? size - used : 0,
                     "# HELP %s%s %s\n# TYPE %s%s %s\n%s%s %llu\n", prefix, m[i].name, m[i].help,
                     prefix, m[i].name, m[i].type, prefix, m[i].name, (unsigned long long)m[i].v);
        if (n < 0)
            return n;
        used += (size_t)n;
    }
    return (int)used;
}
