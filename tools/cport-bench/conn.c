/* cport-bench connrate and hold: connection setup rate, and many idle connections. */
#include "bench.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void die_oom(void)
{
    fprintf(stderr, "cport-bench: out of memory\n");
    exit(2);
}

static void report_errs(const struct errs *err)
{
    uint64_t nerr = errs_total(err);
    say("errors: %" PRIu64 " (connect %" PRIu64 ", resets %" PRIu64 ", eof %" PRIu64
        ", verify %" PRIu64 ", timeouts %" PRIu64 ")\n",
        nerr, err->connect_errors, err->resets, err->eof, err->verify_errors, err->timeouts);
    if (err->connect_errno)
        say("first connect error: %s\n", strerror(err->connect_errno));
    res_int("connect_errors", (int64_t)err->connect_errors);
    res_int("resets", (int64_t)err->resets);
    res_int("eof", (int64_t)err->eof);
    res_int("verify_errors", (int64_t)err->verify_errors);
    res_int("timeouts", (int64_t)err->timeouts);
    res_int("errors", (int64_t)nerr);
}

/* ---- connrate -------------------------------------------------------------------------------- */
static void *connrate_main(void *arg)
{
    jobrun_run(arg);
    return NULL;
}

struct cr_progress {
    struct jobrun *jr;
    int n;
};

static uint64_t connrate_progress(void *arg)
{
    struct cr_progress *p = arg;
    uint64_t s = 0;
    for (int i = 0; i < p->n; i++)
        s += atomic_load_explicit(&p->jr[i].progress, memory_order_relaxed);
    return s;
}

int run_connrate(struct opts *o)
{
    pool_init(o->size);
    if (o->threads > o->conns)
        o->threads = o->conns;
    int nt = o->threads;
    struct jobrun *jr = calloc((size_t)nt, sizeof *jr);
    pthread_t *th = calloc((size_t)nt, sizeof *th);
    if (!jr || !th)
        die_oom();

    struct window win = {0};
    win.t0 = now_ns();
    atomic_store(&win.start, INT64_MAX); /* published by window_run */
    atomic_store(&win.end, INT64_MAX);
    signals_block(true); /* only the main thread takes SIGINT */
    for (int t = 0; t < nt; t++) {
        struct jobrun *r = &jr[t];
        *r = (struct jobrun){.o = o,
                             .echo = true,
                             .keep = false,
                             .nslots = o->conns / nt + (t < o->conns % nt ? 1 : 0),
                             .id_base = (uint64_t)t << 40,
                             .src_base = (uint64_t)t << 20,
                             .win_start = &win.start,
                             .win_end = &win.end};
        if (jobrun_init(r) < 0)
            die_oom();
        if (pthread_create(&th[t], NULL, connrate_main, r) != 0) {
            fprintf(stderr, "cport-bench: pthread_create failed\n");
            exit(2);
        }
    }
    signals_block(false);
    struct cr_progress pa = {jr, nt};
    window_run(o, &win, connrate_progress, &pa, "conns");

    struct errs err = {0};
    struct hist *h = calloc(1, sizeof *h);
    if (!h)
        die_oom();
    uint64_t done = 0, total = 0;
    for (int t = 0; t < nt; t++) {
        pthread_join(th[t], NULL);
        errs_add(&err, &jr[t].err);
        hist_merge(h, &jr[t].hist);
        done += jr[t].win_done;
        total += jr[t].done;
        jobrun_free(&jr[t]);
    }
    double secs = win.secs;
    double rate = secs > 0 ? (double)done / secs : 0;
    say("cport-bench connrate: %s, %d concurrent, %zu B message, %d thread%s\n", o->target,
        o->conns, o->size, nt, nt == 1 ? "" : "s");
    say("measured %.2f s after %.2f s warm-up%s\n", secs, o->warmup,
        bench_stopped() ? " (interrupted)" : "");
    say("connections: %" PRIu64 " in window (%" PRIu64 " in all), %.0f conns/s\n", done, total,
        rate);
    res_num("secs", secs, 3);
    res_int("connections", (int64_t)done);
    res_num("conns_per_s", rate, 1);
    report_latency(h, "latency");
    res_int("total_connections", (int64_t)total);
    report_errs(&err);
    res_int("interrupted", bench_stopped() ? 1 : 0);
    report_server_cpu(o, &win, done, "conn");
    free(h);
    free(jr);
    free(th);
    return errs_total(&err) ? 1 : 0;
}

/* ---- hold -------------------------------------------------------------------------------------
 */

/* Whether the server is still the process `id` sampled: one that exited may have left its pid
 * to another process, whose figures must not pass for the server's. */
static bool still_server(int pid, const struct cpu_sample *id)
{
    struct cpu_sample now = cpu_sample_take(pid);
    return id->ok && now.ok && now.start == id->start;
}

/* sample(pid) if the server is still the process `id` sampled, else -1. */
static long server_sample(int pid, const struct cpu_sample *id, long (*sample)(int))
{
    if (pid <= 0 || !id->ok)
        return -1;
    long v = sample(pid);
    return still_server(pid, id) ? v : -1;
}

/* The server's RSS once it has settled: sampled every 200 ms until it has not changed for
 * 2.5 s (a server trimming what a burst left behind changes it every second or two: cport
 * looks once a second and trims what was not used since the look before), or
 * after `max` seconds. Without --server-pid (or a server gone), -1; with max 0, a sample at
 * once. */
static long settled_rss_kb(int pid, const struct cpu_sample *id, double max)
{
    if (pid <= 0)
        return -1;
    long rss = proc_rss_kb(pid);
    int64_t end = now_ns() + (int64_t)(max * 1e9), since = now_ns();
    while (now_ns() < end && now_ns() - since < 2500000000LL && !bench_stopped()) {
        sleep_until(now_ns() + 200000000LL);
        long r = proc_rss_kb(pid);
        if (r != rss) {
            rss = r;
            since = now_ns();
        }
    }
    return still_server(pid, id) ? rss : -1;
}

int run_hold(struct opts *o)
{
    if (o->echo)
        pool_init(o->size);
    int n = o->conns;
    int *fds = malloc((size_t)n * sizeof *fds);
    if (!fds)
        die_oom();
    for (int i = 0; i < n; i++)
        fds[i] = -1;
    struct cpu_sample server = cpu_sample_take(o->server_pid); /* which process it is */
    long rss0 = server_sample(o->server_pid, &server, proc_rss_kb);
    long fds0 = server_sample(o->server_pid, &server, proc_fd_count);

    /* Set up in two halves, sampling the server's RSS between them: what the second half
     * adds is the server's memory per connection proper. The average over all of them
     * (the growth from before the first connect) also carries fixed costs that the first
     * connections trigger (buffer-pool pages touched by the set-up burst, lazily grown
     * tables). */
    int half = n / 2;
    struct jobrun jr = {.o = o,
                        .echo = o->echo,
                        .keep = true,
                        .nslots = o->batch < half ? o->batch : half,
                        .njobs = (uint64_t)half,
                        .fds = fds};
    struct jobrun jr2 = {.o = o,
                         .echo = o->echo,
                         .keep = true,
                         .nslots = o->batch < n - half ? o->batch : n - half,
                         .njobs = (uint64_t)(n - half),
                         .id_base = (uint64_t)half,
                         .src_base = (uint64_t)half,
                         .fds = fds + half};
    if ((half > 0 && jobrun_init(&jr) < 0) || jobrun_init(&jr2) < 0)
        die_oom();
    if (half == 0)
        jr.hist.min = UINT64_MAX; /* (not initialised: it holds no jobs) */
    struct window est = {0};
    est.cpu0 = cpu_sample_take(o->server_pid);
    int64_t t0 = now_ns();
    mark_write("connect");
    if (half > 0)
        jobrun_run(&jr);
    /* --settle: the RSS samples find the server at rest (waiting at most that long); the
     * pause is left out of the set-up time and of its CPU. */
    struct cpu_sample pause0 = cpu_sample_take(o->server_pid);
    int64_t p0 = now_ns();
    long rss_half = settled_rss_kb(o->server_pid, &server, o->settle);
    struct cpu_sample pause1 = cpu_sample_take(o->server_pid);
    int64_t paused = now_ns() - p0;
    uint64_t established_half = jr.done;
    if (!bench_stopped())
        jobrun_run(&jr2);
    int64_t t1 = now_ns();
    est.cpu1 = cpu_sample_take(o->server_pid);
    if (pause0.ok && pause1.ok) {
        est.cpu1.user_us -= pause1.user_us - pause0.user_us;
        est.cpu1.sys_us -= pause1.sys_us - pause0.sys_us;
    }
    est.secs = (double)(t1 - t0 - paused) / 1e9;
    long rss1 = settled_rss_kb(o->server_pid, &server, o->settle);
    uint64_t established = jr.done + jr2.done;
    errs_add(&jr.err, &jr2.err);
    hist_merge(&jr.hist, &jr2.hist);
    if (jr2.done)
        jr.last_ns = jr2.last_ns;
    int inflight = jr.nslots > jr2.nslots ? jr.nslots : jr2.nslots;
    double est_secs = established ? (double)(jr.last_ns - t0 - (jr2.done ? paused : 0)) / 1e9 : 0;
    say("cport-bench hold: %s, %d connections%s, %d connects in flight at most\n", o->target, n,
        o->echo ? " with one echo each" : "", inflight);
    say("established %" PRIu64 " in %.3f s (%.0f conns/s)\n", established, est_secs,
        est_secs > 0 ? (double)established / est_secs : 0);
    /* Hold them idle. */
    mark_write("start");
    sleep_until(t1 + (int64_t)(o->secs * 1e9));
    mark_write("end");
    double held_secs = (double)(now_ns() - t1) / 1e9;
    long rss2 = server_sample(o->server_pid, &server, proc_rss_kb);
    long fds2 = server_sample(o->server_pid, &server, proc_fd_count);

    /* Every connection must still be open: no EOF, no error, no unexpected data. */
    uint64_t open_ok = 0, closed = 0, broken = 0, unexpected = 0;
    for (int i = 0; i < n; i++) {
        if (fds[i] < 0)
            continue;
        char b;
        ssize_t r = recv(fds[i], &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            open_ok++;
        else if (r == 0)
            closed++;
        else if (r > 0)
            unexpected++;
        else
            broken++;
        close(fds[i]);
    }
    uint64_t lost = closed + broken + unexpected;
    say("held %.2f s%s: %" PRIu64 " still open, %" PRIu64 " lost (%" PRIu64
        " closed by peer, %" PRIu64 " reset, %" PRIu64 " with unexpected data)\n",
        held_secs, bench_stopped() ? " (interrupted)" : "", open_ok, lost, closed, broken,
        unexpected);
    res_num("secs", held_secs, 3);
    res_int("established", (int64_t)established);
    res_num("establish_s", est_secs, 3);
    res_num("conns_per_s", est_secs > 0 ? (double)established / est_secs : 0, 1);
    say("setup ");
    report_latency(&jr.hist, "latency");
    res_int("held", (int64_t)open_ok);
    res_int("lost", (int64_t)lost);
    res_int("lost_closed", (int64_t)closed);
    res_int("lost_reset", (int64_t)broken);
    res_int("lost_data", (int64_t)unexpected);
    report_errs(&jr.err);
    res_int("interrupted", bench_stopped() ? 1 : 0);
    if (o->server_pid > 0) {
        if (server.ok && !still_server(o->server_pid, &server))
            say("server: process %d exited during the run; what was sampled after is not "
                "reported (-1)\n",
                o->server_pid);
        double per = (rss2 >= 0 && rss0 >= 0 && established)
                         ? (double)(rss2 - rss0) * 1024.0 / (double)established
                         : 0;
        uint64_t second = established - established_half;
        double marginal = (rss1 >= 0 && rss_half >= 0 && second && established_half)
                              ? (double)(rss1 - rss_half) * 1024.0 / (double)second
                              : 0;
        say("server RSS: %ld KiB before, %ld KiB with half of them, %ld KiB established%s, "
            "%ld KiB after idling (%.0f bytes per connection on average; the second half added "
            "%.0f bytes each)\n",
            rss0, rss_half, rss1, o->settle > 0 ? " (each once settled)" : "", rss2, per, marginal);
        res_int("server_rss_before_kb", rss0);
        res_int("server_rss_half_kb", rss_half);
        res_int("server_rss_established_kb", rss1);
        res_int("server_rss_idle_kb", rss2);
        res_num("server_rss_per_conn_b", per, 0);
        res_num("server_rss_marginal_b", marginal, 0);
        /* Without --echo a connection counts as established once the kernel completed the
         * handshake, accepted by the server or not; its descriptor count tells. */
        say("server descriptors: %ld before, %ld after idling\n", fds0, fds2);
        res_int("server_fds_before", fds0);
        res_int("server_fds_idle", fds2);
        report_server_cpu(o, &est, established, "conn");
    }
    if (half > 0)
        jobrun_free(&jr);
    jobrun_free(&jr2);
    free(fds);
    return (lost || errs_total(&jr.err)) ? 1 : 0;
}
