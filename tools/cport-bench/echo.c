/* cport-bench echo: closed-loop pipelined echo load with full verification.
 *
 * Each connection keeps up to `depth` messages in flight. Message (conn, seq) has bytes
 * that depend only on (conn, seq) (a slice of the payload pool), so every byte coming back
 * is compared with what must come back at that position of the stream: corruption, loss,
 * duplication and reordering all show up as a mismatch. Latency of a message runs from just
 * before the write that carries its first byte until the read that completes its echo.
 *
 * After the window no new messages are sent; once a connection has all its echoes back it
 * half-closes and reads on until the server's end of stream, so that a byte the server sends
 * after the echo (a reply sent twice, however late) is a verification error too. In-flight
 * echoes and those ends get --drain seconds from the window's end, all of it after the
 * window: neither its messages nor the server's CPU see it. */
#include "bench.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

enum { RXBUF = 256 * 1024, IOV_BATCH = 64, MAX_EVENTS = 512 };

struct econn {
    int fd;
    bool dead, want_out;
    bool half_closed; /* the client's end of stream is sent; waiting for the server's */
    uint64_t id;
    uint64_t tx_seq, rx_seq; /* next message to (finish) writing / reading */
    size_t tx_off, rx_off;   /* bytes of it written / read */
    const uint8_t *rx_msg;   /* expected bytes of message rx_seq */
    int64_t *t_sent;         /* [depth] first-byte write time of messages in flight */
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
    for (;;) {
        struct iovec iov[IOV_BATCH];
        int niov = 0;
        size_t total = 0;
        uint64_t next = c->tx_seq;
        if (c->tx_off) {
            iov[0].iov_base = (void *)(msg_bytes(c->id, next) + c->tx_off);
            iov[0].iov_len = size - c->tx_off;
            total = iov[0].iov_len;
            niov = 1;
            next++;
        }
        if (allow_new) {
            while (niov < IOV_BATCH && next - c->rx_seq < depth) {
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
        int64_t now = now_ns();
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
                c->t_sent[seq % depth] = now;
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

    for (int i = 0; i < w->n; i++)
        if (!w->conns[i].dead && !bench_stopped())
            pump_tx(w, &w->conns[i], true);

    struct epoll_event evs[MAX_EVENTS];
    int64_t drain_deadline = 0;
    for (;;) {
        int64_t now = now_ns();
        /* The main thread publishes the end (also when interrupted): it alone says when
         * to stop sending. */
        int64_t we = atomic_load_explicit(&w->win->end, memory_order_relaxed);
        if (!w->ending && now >= we) {
            w->ending = true;
            drain_deadline = now + (int64_t)(o->drain * 1e9);
            for (int i = 0; i < w->n; i++)
                half_close_if_done(w, &w->conns[i]);
        }
        /* (Every connection still open has its echoes or its server's end to wait for.) */
        if (w->ending && (w->open == 0 || now >= drain_deadline || bench_drain_cut()))
            break;
        int n = epoll_wait(w->epfd, evs, MAX_EVENTS, 20);
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
    uint64_t msgs = 0, total = 0, unclosed = 0;
    int established = 0;
    for (int t = 0; t < nt; t++) {
        pthread_join(ws[t].th, NULL);
        errs_add(&err, &ws[t].err);
        hist_merge(&h[0], &ws[t].hist);
        msgs += ws[t].win_msgs;
        total += ws[t].msgs_total;
        established += ws[t].established;
        unclosed += ws[t].unclosed;
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

    say("cport-bench echo: %s:%d, %d connections (%d established in %.1f ms), %zu B messages, "
        "depth %d, %d thread%s\n",
        o->host, o->port, o->conns, established, (double)(tc1 - tc0) / 1e6, o->size, o->depth, nt,
        nt == 1 ? "" : "s");
    say("measured %.2f s after %.2f s warm-up%s%s\n", secs, o->warmup,
        bench_stopped() ? " (interrupted)" : "",
        bench_drain_cut() ? "; drain cut short by a signal" : "");
    say("messages: %" PRIu64 " in window (%" PRIu64 " in all), %.0f msgs/s, %.2f MiB/s echoed\n",
        msgs, total, rate, mib);
    res_num("secs", secs, 3);
    res_int("msgs", (int64_t)msgs);
    res_num("msgs_per_s", rate, 1);
    res_num("mib_per_s", mib, 3);
    report_latency(h); /* prints, and adds p50_us .. mean_us to the result */
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
