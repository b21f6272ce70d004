/* cport-bench echo: pipelined echo load with full verification, closed or open loop.
 *
 * Closed loop (the default): each connection keeps up to `depth` messages in flight and
 * sends the next one as soon as one comes back. Latency of a message runs from just before
 * the write that carries its first byte until the read that completes its echo.
 *
 * Open loop (--rate R): messages follow a fixed schedule, whatever the server does. Message
 * seq of connection id (0 .. conns-1) is due at t0 + (seq * conns + id) / R, t0 being the
 * start of the warm-up: each connection sends R / conns per second, the connections' phases
 * staggered evenly, so that the run's messages are due one every 1/R s. A thread runs the
 * merged schedule of its connections (their ids are consecutive: its k-th message goes to
 * its connection k mod n), releasing each message at its due time; a released message goes
 * out at once if its connection has fewer than `depth` in flight and its socket takes it,
 * else as soon as it can, after those released before it. Its latency runs from its due
 * time to the read that completes its echo: a server that stalls delays every message due
 * meanwhile, and that shows (no coordinated omission). Counted: messages due in the window
 * whose first byte went out more than LATE_NS after their due time (late_sends), and those
 * due over LATE_NS before the window's end that had not gone out by then (backlog). Nothing
 * new goes out from the window's end on.
 *
 * In both modes message (conn, seq) has bytes that depend only on (conn, seq) (a slice of
 * the payload pool), so every byte coming back is compared with what must come back at that
 * position of the stream: corruption, loss, duplication and reordering all show up as a
 * mismatch.
 *
 * After the window no new messages are sent; once a connection has all its echoes back it
 * half-closes and reads on until the server's end of stream, so that a byte the server sends
 * after the echo (a reply sent twice, however late) is a verification error too. In-flight
 * echoes and those ends get --drain seconds from the window's end, all of it after the
 * window: neither its messages nor the server's CPU see it. */
#include "bench.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { RXBUF = 256 * 1024, IOV_BATCH = 64, MAX_EVENTS = 512 };
enum { WAIT_CAP_MS = 20 };  /* the longest wait for events, both modes */
enum { LATE_NS = 1000000 }; /* open loop: a send this long after its due time is late */

struct econn {
    int fd;
    bool dead, want_out;
    bool half_closed; /* the client's end of stream is sent; waiting for the server's */
    uint64_t id;
    uint64_t tx_seq, rx_seq; /* next message to (finish) writing / reading */
    size_t tx_off, rx_off;   /* bytes of it written / read */
    const uint8_t *rx_msg;   /* expected bytes of message rx_seq */
    int64_t *t_sent;         /* [depth] first-byte write time of messages in flight (open
                              * loop: their due time) */
    uint64_t released;       /* open loop: messages 0 .. released-1 are due (may be sent) */
};

struct eworker {
    const struct opts *o;
    struct window *win;
    pthread_t th;
    uint64_t first_id;
    int n;
    struct econn *conns;
    uint64_t *win_counts; /* messages per connection in the measured window */
    int *fds;
    int64_t *tsbuf;
    int epfd;
    uint8_t *rxbuf;
    bool ending;
    int open;          /* connections not yet closed (by the server's end, an error or a verdict) */
    uint64_t unclosed; /* connections whose server did not end its stream within the drain */
    uint64_t inflight, msgs_total, win_msgs;
    _Atomic uint64_t progress;
    struct errs err;
    struct hist hist;
    int established;
    /* open loop (o->rate > 0) */
    bool open_loop, no_pwait2;
    int64_t t0;          /* when the schedule began (the warm-up's start) */
    double ns_per_slot;  /* 1e9 / rate */
    uint64_t next_k;     /* the thread's next message to release (k-th of its schedule) */
    int64_t next_due;    /* its due time */
    int64_t ws, we;      /* the window's edges as last loaded by this thread */
    uint64_t late_sends; /* messages due in the window sent more than LATE_NS late */
    uint64_t backlog;    /* due over LATE_NS before the window's end, not sent by then */
};

static pthread_barrier_t barrier;
static _Atomic int verify_reports;

static void die_oom(void)
{
    fprintf(stderr, "cport-bench: out of memory\n");
    exit(2);
}

static void set_events(struct eworker *w, struct econn *c, uint32_t events, int op)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(w->epfd, op, c->fd, &ev) < 0) {
        fprintf(stderr, "cport-bench: epoll_ctl: %s\n", strerror(errno));
        exit(1);
    }
}

static uint64_t conn_inflight(const struct econn *c)
{
    return c->tx_seq - c->rx_seq + (c->tx_off ? 1 : 0);
}

/* Open loop: the due time of message seq of connection id (see the top). */
static int64_t due_of(const struct eworker *w, uint64_t id, uint64_t seq)
{
    uint64_t slot = seq * (uint64_t)w->o->conns + id;
    return w->t0 + (int64_t)((double)slot * w->ns_per_slot);
}

/* How many messages of connection id are due before t. */
static uint64_t due_before(const struct eworker *w, uint64_t id, int64_t t)
{
    if (t <= w->t0)
        return 0;
    double x = ((double)(t - w->t0) / w->ns_per_slot - (double)id) / (double)w->o->conns;
    uint64_t n = x > 0 ? (uint64_t)ceil(x) : 0;
    while (n > 0 && due_of(w, id, n - 1) >= t) /* (rounding: at most a step or two) */
        n--;
    while (due_of(w, id, n) < t)
        n++;
    return n;
}

/* The due time of the thread's k-th message: message k / n of its connection k mod n. */
static int64_t due_of_k(const struct eworker *w, uint64_t k)
{
    return due_of(w, w->first_id + k % (uint64_t)w->n, k / (uint64_t)w->n);
}

static void kill_conn(struct eworker *w, struct econn *c, uint64_t *counter)
{
    (*counter)++;
    w->inflight -= conn_inflight(c);
    close(c->fd);
    c->fd = -1;
    c->dead = true;
    w->open--;
}

/* After the window: once everything sent is back, ends the client's stream, so that the
 * server's end of stream tells when it has sent everything it will. */
static void half_close_if_done(struct eworker *w, struct econn *c)
{
    if (c->dead || c->half_closed || conn_inflight(c) != 0)
        return;
    if (shutdown(c->fd, SHUT_WR) < 0) {
        kill_conn(w, c, &w->err.resets);
        return;
    }
    c->half_closed = true;
}

static void report_mismatch(const struct eworker *w, const struct econn *c, const char *what,
                            const uint8_t *got, size_t n)
{
    if (atomic_fetch_add(&verify_reports, 1) >= 5)
        return;
    size_t at = c->rx_off;
    for (size_t i = 0; i < n; i++) {
        if (got[i] != c->rx_msg[c->rx_off + i]) {
            at = c->rx_off + i;
            break;
        }
    }
    fprintf(stderr,
            "cport-bench: verification failed on connection %" PRIu64 ": %s at message %" PRIu64
            " byte %zu (message size %zu)\n",
            c->id, what, c->rx_seq, at, w->o->size);
}

/* Writes the rest of a partly written message and, if allowed, new messages up to the
 * depth, in as few writev calls as possible. */
static void pump_tx(struct eworker *w, struct econn *c, bool allow_new)
{
    const size_t size = w->o->size;
    const uint64_t depth = (uint64_t)w->o->depth;
    const bool open_loop = w->open_loop;
    for (;;) {
        struct iovec iov[IOV_BATCH];
        int niov = 0;
        size_t total = 0;
        uint64_t next = c->tx_seq;
        /* Open loop: the clock is read first (a message is late or not when it goes out,
         * its latency is from its due time), and nothing new starts from the window's end
         * on (as last loaded by this thread). */
        int64_t now = 0;
        uint64_t limit = UINT64_MAX;
        if (open_loop) {
            now = now_ns();
            limit = now < w->we ? c->released : 0;
        }
        if (c->tx_off) {
            iov[0].iov_base = (void *)(msg_bytes(c->id, next) + c->tx_off);
            iov[0].iov_len = size - c->tx_off;
            total = iov[0].iov_len;
            niov = 1;
            next++;
        }
        if (allow_new) {
            while (niov < IOV_BATCH && next - c->rx_seq < depth && next < limit) {
                iov[niov].iov_base = (void *)msg_bytes(c->id, next);
                iov[niov].iov_len = size;
                total += size;
                niov++;
                next++;
            }
        }
        if (!niov) {
            if (c->want_out) {
                c->want_out = false;
                set_events(w, c, EPOLLIN, EPOLL_CTL_MOD);
            }
            return;
        }
        if (!open_loop)
            now = now_ns();
        ssize_t n = writev(c->fd, iov, niov);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN) {
                kill_conn(w, c, &w->err.resets);
                return;
            }
            n = 0;
        }
        /* Account the written bytes; a message whose first byte went out is in flight. */
        size_t left = (size_t)n;
        uint64_t seq = c->tx_seq;
        size_t off = c->tx_off;
        while (left) {
            if (off == 0) {
                int64_t t = now;
                if (open_loop) {
                    t = due_of(w, c->id, seq);
                    if (now - t > LATE_NS && t >= w->ws && t < w->we)
                        w->late_sends++;
                }
                c->t_sent[seq % depth] = t;
                w->inflight++;
            }
            size_t k = size - off;
            if (k > left)
                k = left;
            off += k;
            left -= k;
            if (off == size) {
                seq++;
                off = 0;
            }
        }
        c->tx_seq = seq;
        c->tx_off = off;
        if ((size_t)n < total) {
            if (!c->want_out) {
                c->want_out = true;
                set_events(w, c, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
            }
            return;
        }
        if (niov < IOV_BATCH) {
            if (c->want_out) {
                c->want_out = false;
                set_events(w, c, EPOLLIN, EPOLL_CTL_MOD);
            }
            return;
        }
    }
}

static void on_readable(struct eworker *w, struct econn *c)
{
    const size_t size = w->o->size;
    const uint64_t depth = (uint64_t)w->o->depth;
    uint64_t completed = 0;
    for (;;) {
        ssize_t n = read(c->fd, w->rxbuf, RXBUF);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            kill_conn(w, c, &w->err.resets);
            return;
        }
        if (n == 0) {
            /* After the client's end, with every echo back (nothing is sent after it and
             * any byte beyond the echo failed already), the server's end is the clean one. */
            if (c->half_closed) {
                close(c->fd);
                c->fd = -1;
                c->dead = true;
                w->open--;
            } else {
                kill_conn(w, c, &w->err.eof);
            }
            return;
        }
        /* The window is loaded after the clock is read (see publish_edge in util.c). */
        int64_t now = now_ns();
        int64_t ws = atomic_load_explicit(&w->win->start, memory_order_relaxed);
        int64_t we = atomic_load_explicit(&w->win->end, memory_order_relaxed);
        if (c->rx_seq * size + c->rx_off + (uint64_t)n > c->tx_seq * size + c->tx_off) {
            report_mismatch(w, c, "more bytes came back than were sent", NULL, 0);
            kill_conn(w, c, &w->err.verify_errors);
            return;
        }
        const uint8_t *p = w->rxbuf;
        size_t left = (size_t)n;
        while (left) {
            if (c->rx_off == 0)
                c->rx_msg = msg_bytes(c->id, c->rx_seq);
            size_t k = size - c->rx_off;
            if (k > left)
                k = left;
            if (memcmp(p, c->rx_msg + c->rx_off, k) != 0) {
                report_mismatch(w, c, "echoed bytes differ", p, k);
                kill_conn(w, c, &w->err.verify_errors);
                return;
            }
            p += k;
            left -= k;
            c->rx_off += k;
            if (c->rx_off == size) {
                uint64_t lat = (uint64_t)(now - c->t_sent[c->rx_seq % depth]);
                c->rx_off = 0;
                c->rx_seq++;
                completed++;
                w->inflight--;
                w->msgs_total++;
                if (now >= ws && now < we) {
                    hist_add(&w->hist, lat);
                    w->win_msgs++;
                    w->win_counts[c - w->conns]++;
                }
            }
        }
        if (n < RXBUF)
            break;
    }
    if (completed)
        pump_tx(w, c, !w->ending);
}

/* Open loop: releases the thread's messages due by now (and before the window's end, we)
 * and starts writing them. A connection waiting for room in its socket
 * (want_out) goes on when it has some. */
static void release_due(struct eworker *w, int64_t now, int64_t we)
{
    uint64_t k0 = w->next_k;
    int64_t until = now < we ? now + 1 : we; /* release what is due before this */
    if (w->next_due < until && due_of_k(w, k0 + (uint64_t)w->n) < until) {
        /* A whole round or more is due (a rate beyond what the client or the server can
         * take): each connection's count at once, not one message at a time, which kept
         * the thread counting instead of sending. */
        uint64_t k = 0;
        for (int i = 0; i < w->n; i++) {
            struct econn *c = &w->conns[i];
            c->released = due_before(w, c->id, until);
            k += c->released;
        }
        w->next_k = k;
        w->next_due = due_of_k(w, k);
    }
    while (w->next_due < until) {
        w->conns[w->next_k % (uint64_t)w->n].released++;
        w->next_k++;
        w->next_due = due_of_k(w, w->next_k);
    }
    /* Each connection that got one once, in schedule order. */
    uint64_t k1 = w->next_k - k0 > (uint64_t)w->n ? k0 + (uint64_t)w->n : w->next_k;
    for (uint64_t k = k0; k < k1; k++) {
        struct econn *c = &w->conns[k % (uint64_t)w->n];
        if (!c->dead && !c->want_out)
            pump_tx(w, c, true);
    }
}

/* Waits for events at most timeout_ns (open loop: to the next due message; ns, with
 * epoll_pwait2 where there is one). */
static int wait_events(struct eworker *w, struct epoll_event *evs, int64_t timeout_ns)
{
    if (!w->no_pwait2) {
        struct timespec ts = {.tv_sec = (time_t)(timeout_ns / 1000000000),
                              .tv_nsec = (long)(timeout_ns % 1000000000)};
        int n = epoll_pwait2(w->epfd, evs, MAX_EVENTS, &ts, NULL);
        /* Missing (ENOSYS), or refused by a seccomp filter older than the call (EPERM, which
         * epoll_pwait2 itself never returns): whole milliseconds then, rounded up. */
        if (n >= 0 || (errno != ENOSYS && errno != EPERM))
            return n;
        w->no_pwait2 = true;
    }
    return epoll_wait(w->epfd, evs, MAX_EVENTS, (int)((timeout_ns + 999999) / 1000000));
}

static void *eworker_main(void *arg)
{
    struct eworker *w = arg;
    const struct opts *o = w->o;

    /* Establish this worker's connections. */
    int slots = o->batch / o->threads;
    if (slots < 1)
        slots = 1;
    if (slots > w->n)
        slots = w->n;
    struct jobrun jr = {.o = o,
                        .echo = false,
                        .keep = true,
                        .nslots = slots,
                        .njobs = (uint64_t)w->n,
                        .id_base = w->first_id,
                        .src_base = w->first_id,
                        .fds = w->fds};
    if (jobrun_init(&jr) < 0)
        die_oom();
    jobrun_run(&jr);
    errs_add(&w->err, &jr.err);
    jobrun_free(&jr);

    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (w->epfd < 0) {
        fprintf(stderr, "cport-bench: epoll_create1: %s\n", strerror(errno));
        exit(1);
    }
    for (int i = 0; i < w->n; i++) {
        struct econn *c = &w->conns[i];
        c->id = w->first_id + (uint64_t)i;
        c->t_sent = w->tsbuf + (size_t)i * (size_t)o->depth;
        c->fd = w->fds[i];
        c->dead = c->fd < 0;
        if (!c->dead) {
            set_events(w, c, EPOLLIN, EPOLL_CTL_ADD);
            w->established++;
            w->open++;
        }
    }
    pthread_barrier_wait(&barrier); /* all connected */
    pthread_barrier_wait(&barrier); /* the warm-up begins */

    w->ws = w->we = INT64_MAX;
    if (w->open_loop) {
        w->t0 = w->win->t0; /* (set before the barrier) */
        w->ns_per_slot = 1e9 / o->rate;
        w->next_due = due_of_k(w, 0);
    } else {
        for (int i = 0; i < w->n; i++)
            if (!w->conns[i].dead && !bench_stopped())
                pump_tx(w, &w->conns[i], true);
    }

    struct epoll_event evs[MAX_EVENTS];
    int64_t drain_deadline = 0;
    for (;;) {
        int64_t now = now_ns();
        /* The main thread publishes the end (also when interrupted): it alone says when
         * to stop sending. */
        int64_t we = atomic_load_explicit(&w->win->end, memory_order_relaxed);
        if (w->open_loop) {
            w->ws = atomic_load_explicit(&w->win->start, memory_order_relaxed);
            w->we = we;
        }
        if (!w->ending && now >= we) {
            w->ending = true;
            drain_deadline = now + (int64_t)(o->drain * 1e9);
            if (w->open_loop) {
                /* What was due over LATE_NS before the end and has not gone out stays
                 * unsent: the backlog (a message due just before the end is not behind). */
                for (int i = 0; i < w->n; i++) {
                    const struct econn *c = &w->conns[i];
                    uint64_t due = due_before(w, c->id, we - LATE_NS);
                    uint64_t started = c->tx_seq + (c->tx_off ? 1 : 0);
                    if (due > started)
                        w->backlog += due - started;
                }
            }
            for (int i = 0; i < w->n; i++)
                half_close_if_done(w, &w->conns[i]);
        }
        /* (Every connection still open has its echoes or its server's end to wait for.) */
        if (w->ending && (w->open == 0 || now >= drain_deadline || bench_drain_cut()))
            break;
        int n;
        if (w->open_loop) {
            int64_t timeout = (int64_t)WAIT_CAP_MS * 1000000;
            if (!w->ending && !bench_stopped()) {
                release_due(w, now, we);
                /* Up to the next message due, or to the window's end once none is left. */
                int64_t next = w->next_due < we ? w->next_due : we;
                now = now_ns();
                if (next - now < timeout)
                    timeout = next > now ? next - now : 0;
            }
            n = wait_events(w, evs, timeout);
        } else {
            n = epoll_wait(w->epfd, evs, MAX_EVENTS, WAIT_CAP_MS);
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "cport-bench: epoll_wait: %s\n", strerror(errno));
            exit(1);
        }
        for (int i = 0; i < n; i++) {
            struct econn *c = evs[i].data.ptr;
            if (c->dead)
                continue;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(w, c);
            if (!c->dead && c->want_out && (evs[i].events & EPOLLOUT))
                pump_tx(w, c, !w->ending);
            if (w->ending)
                half_close_if_done(w, c);
        }
        atomic_store_explicit(&w->progress, w->msgs_total, memory_order_relaxed);
    }
    /* Messages still unanswered after the drain time are lost. A connection that got back
     * everything it sent and whose server has not ended its stream must have nothing more
     * waiting (surplus fails the run too); that its server kept it open is no error (TCP
     * allows it; a byte it sends later goes unchecked), only counted. */
    w->err.timeouts += w->inflight;
    for (int i = 0; i < w->n; i++) {
        struct econn *c = &w->conns[i];
        if (c->dead)
            continue;
        char b;
        ssize_t r = conn_inflight(c) == 0 ? recv(c->fd, &b, 1, MSG_DONTWAIT | MSG_PEEK) : -1;
        if (r > 0) {
            report_mismatch(w, c, "more bytes came back than were sent", NULL, 0);
            kill_conn(w, c, &w->err.verify_errors);
            continue;
        }
        if (conn_inflight(c) == 0 && r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            w->unclosed++;
        close(c->fd);
    }
    close(w->epfd);
    return NULL;
}

struct progress_arg {
    struct eworker *ws;
    int n;
};

static uint64_t echo_progress(void *arg)
{
    struct progress_arg *p = arg;
    uint64_t s = 0;
    for (int i = 0; i < p->n; i++)
        s += atomic_load_explicit(&p->ws[i].progress, memory_order_relaxed);
    return s;
}

int run_echo(struct opts *o)
{
    pool_init(o->size);
    if (o->threads > o->conns)
        o->threads = o->conns;
    int nt = o->threads;
    struct eworker *ws = calloc((size_t)nt, sizeof *ws);
    struct econn *conns = calloc((size_t)o->conns, sizeof *conns);
    uint64_t *counts = calloc((size_t)o->conns, sizeof *counts);
    int *fds = malloc((size_t)o->conns * sizeof *fds);
    int64_t *ts = calloc((size_t)o->conns * (size_t)o->depth, sizeof *ts);
    if (!ws || !conns || !counts || !fds || !ts)
        die_oom();
    for (int i = 0; i < o->conns; i++)
        fds[i] = -1;

    struct window win = {0};
    atomic_store(&win.start, INT64_MAX); /* published by window_run */
    atomic_store(&win.end, INT64_MAX);
    pthread_barrier_init(&barrier, NULL, (unsigned)nt + 1);

    int64_t tc0 = now_ns();
    signals_block(true); /* only the main thread takes SIGINT */
    for (int t = 0, first = 0; t < nt; t++) {
        struct eworker *w = &ws[t];
        int n = o->conns / nt + (t < o->conns % nt ? 1 : 0);
        w->o = o;
        w->open_loop = o->rate > 0;
        w->win = &win;
        w->first_id = (uint64_t)first;
        w->n = n;
        w->conns = conns + first;
        w->win_counts = counts + first;
        w->fds = fds + first;
        w->tsbuf = ts + (size_t)first * (size_t)o->depth;
        w->rxbuf = malloc(RXBUF);
        if (!w->rxbuf)
            die_oom();
        first += n;
        if (pthread_create(&w->th, NULL, eworker_main, w) != 0) {
            fprintf(stderr, "cport-bench: pthread_create failed\n");
            exit(2);
        }
    }
    signals_block(false);
    pthread_barrier_wait(&barrier);
    int64_t tc1 = now_ns();
    win.t0 = tc1;
    pthread_barrier_wait(&barrier);

    struct progress_arg pa = {ws, nt};
    window_run(o, &win, echo_progress, &pa, "msgs");

    struct errs err = {0};
    struct hist *h = calloc(1, sizeof *h);
    if (!h)
        die_oom();
    uint64_t msgs = 0, total = 0, unclosed = 0, late = 0, backlog = 0;
    int established = 0;
    for (int t = 0; t < nt; t++) {
        pthread_join(ws[t].th, NULL);
        errs_add(&err, &ws[t].err);
        hist_merge(&h[0], &ws[t].hist);
        msgs += ws[t].win_msgs;
        total += ws[t].msgs_total;
        established += ws[t].established;
        unclosed += ws[t].unclosed;
        late += ws[t].late_sends;
        backlog += ws[t].backlog;
        free(ws[t].rxbuf);
    }
    pthread_barrier_destroy(&barrier);

    /* Fairness over the connections that were established. */
    size_t nest = 0;
    uint64_t cmin = UINT64_MAX, cmax = 0;
    for (int i = 0; i < o->conns; i++) {
        if (fds[i] < 0)
            continue;
        counts[nest++] = counts[i];
        if (counts[i] < cmin)
            cmin = counts[i];
        if (counts[i] > cmax)
            cmax = counts[i];
    }
    if (!nest)
        cmin = 0;
    double jain = jain_index(counts, nest);
    double secs = win.secs;
    double rate = secs > 0 ? (double)msgs / secs : 0;
    double mib = secs > 0 ? (double)msgs * (double)o->size / secs / 1048576.0 : 0;
    uint64_t nerr = errs_total(&err);

    say("cport-bench echo: %s, %d connections (%d established in %.1f ms), %zu B messages, "
        "depth %d, %d thread%s%s\n",
        o->target, o->conns, established, (double)(tc1 - tc0) / 1e6, o->size, o->depth, nt,
        nt == 1 ? "" : "s", o->rate > 0 ? ", open loop" : "");
    say("measured %.2f s after %.2f s warm-up%s%s\n", secs, o->warmup,
        bench_stopped() ? " (interrupted)" : "",
        bench_drain_cut() ? "; drain cut short by a signal" : "");
    say("messages: %" PRIu64 " in window (%" PRIu64 " in all), %.0f msgs/s, %.2f MiB/s echoed\n",
        msgs, total, rate, mib);
    res_num("secs", secs, 3);
    res_int("msgs", (int64_t)msgs);
    res_num("msgs_per_s", rate, 1);
    res_num("mib_per_s", mib, 3);
    if (o->rate > 0) {
        /* The achieved rate is msgs_per_s. (A window that never began, interrupted in the
         * warm-up, kept up with nothing; the summary says it was interrupted.) */
        double pct = rate / o->rate * 100;
        bool kept_up = secs > 0 && pct >= 95;
        say("open loop: target %.10g msgs/s (%.10g per connection), achieved %.1f msgs/s (%.1f%%); "
            "%" PRIu64 " due in the window sent > 1 ms late, %" PRIu64
            " due over 1 ms before its end not sent by then (backlog)\n",
            o->rate, o->rate / o->conns, rate, pct, late, backlog);
        if (!kept_up && secs > 0)
            say("did not keep up: %.1f msgs/s is %.1f%% of the %.10g msgs/s asked for; the client "
                "or the server could not sustain the rate (latency counts the wait)\n",
                rate, pct, o->rate);
        res_num("rate_target", o->rate, 3);
        res_int("late_sends", (int64_t)late);
        res_int("backlog", (int64_t)backlog);
        res_int("kept_up", kept_up ? 1 : 0);
    }
    /* prints, and adds p50_us .. mean_us to the result */
    report_latency(h, o->rate > 0 ? "latency from due time" : "latency");
    say("fairness: Jain index %.4f over %zu connections (per-connection msgs min %" PRIu64
        " max %" PRIu64 ")\n",
        jain, nest, cmin, cmax);
    say("errors: %" PRIu64 " (connect %" PRIu64 ", resets %" PRIu64 ", eof %" PRIu64
        ", verify %" PRIu64 ", unanswered %" PRIu64 ")\n",
        nerr, err.connect_errors, err.resets, err.eof, err.verify_errors, err.timeouts);

    res_num("jain", jain, 4);
    res_int("conn_msgs_min", (int64_t)cmin);
    res_int("conn_msgs_max", (int64_t)cmax);
    res_int("established", established);
    res_num("connect_ms", (double)(tc1 - tc0) / 1e6, 1);
    res_int("total_msgs", (int64_t)total);
    if (err.connect_errno)
        say("first connect error: %s\n", strerror(err.connect_errno));
    if (unclosed)
        say("not closed: %" PRIu64 " connection%s whose server had not ended its stream %.3g s "
            "after the window (--drain) although the client had ended its own; not an error, "
            "but bytes it sent later went unchecked\n",
            unclosed, unclosed == 1 ? "" : "s", o->drain);
    res_int("connect_errors", (int64_t)err.connect_errors);
    res_int("resets", (int64_t)err.resets);
    res_int("eof", (int64_t)err.eof);
    res_int("verify_errors", (int64_t)err.verify_errors);
    res_int("timeouts", (int64_t)err.timeouts);
    res_int("errors", (int64_t)nerr);
    res_int("unclosed", (int64_t)unclosed);
    res_int("interrupted", bench_stopped() ? 1 : 0);
    res_int("drain_cut", bench_drain_cut() ? 1 : 0);
    report_server_cpu(o, &win, msgs, "msg");

    free(h);
    free(ws);
    free(conns);
    free(counts);
    free(fds);
    free(ts);
    return nerr ? 1 : 0;
}
