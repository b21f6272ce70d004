/* cport-echo: the seeds' echo server (S1, S9) on cport's server layer.
 *
 * Everything a real server needs comes from cport/server.h: accept pool, handshake and
 * idle timeouts, connection limit, backpressure, ordering with several workers and
 * receives, length-prefixed framing, graceful shutdown, counters. This file is the echo
 * itself (send back what arrives, without copying it) and the command line.
 *
 * Signals: SIGINT/SIGTERM/SIGHUP shut down gracefully (stop accepting and reading, let
 * replies to what was received go out, close; exit 0); a second one during that shutdown
 * exits at once (status 1); SIGUSR1 prints the counters on stderr.
 * With --stats-port, GET / on that port answers the counters in Prometheus text format.
 */
#include "common/address.h"
#include "cport.h"

#include "../../src/inject.h" /* delay and failure points in -DCPORT_INJECT=ON builds only */

#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct config {
    cp_server_options so;
    int stats_port; /* -1 = off */
    unsigned shutdown_ms;
    /* Bad-frame log lines (atomic): the second of the last one, and how many were left
     * out since. */
    int64_t bad_frame_sec;
    uint64_t bad_frames_unlogged;
#ifdef CPORT_INJECT
    uint64_t bad_frames_seen; /* atomic: for delay point echo_bad_frame_first */
#endif
} config;

/* ---- the echo ----------------------------------------------------------------------------- */

/* One callback per mode, chosen at start: a message costs no look at the configuration. */
static void on_data(cp_conn *c, const void *data, size_t len)
{
    int r = cp_conn_send_data(c, data, len);
    if (r < 0 && r != -EPIPE)
        cp_conn_abort(c);
}

static void on_data_framed(cp_conn *c, const void *data, size_t len)
{
    int r = cp_conn_send_frame(c, data, len);
    if (r < 0 && r != -EPIPE)
        cp_conn_abort(c);
}

/* Framed mode: a connection closed for a bad frame is logged with its peer and the reason,
 * at most one line a second: peers sending garbage must not flood the log (the counter
 * frames_rejected has them all). The peer is noted at open, in the connection's user area
 * (framed mode only: the stream echo keeps its connections at 128 bytes and skips the
 * call); at close its socket is gone. */
static int on_open_framed(cp_conn *c)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    if (cp_conn_peer(c, &ss, &sl) == 0 && (ss.ss_family == AF_INET || ss.ss_family == AF_INET6))
        memcpy(cp_conn_user(c), &ss,
               ss.ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6));
    return 0;
}

static void on_close(cp_conn *c, cp_close_reason reason, int err)
{
    (void)err;
    if (reason != CP_CLOSE_BAD_FRAME)
        return;
    config *cfg = cp_server_user(cp_conn_server(c));
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
#ifdef CPORT_INJECT
    /* The first bad-frame close only, between its clock read and its look at the second
     * logged last, while later ones (on other workers) log a later second. */
    if (__atomic_fetch_add(&cfg->bad_frames_seen, 1, __ATOMIC_RELAXED) == 0)
        CP__INJECT_DELAY("echo_bad_frame_first");
#endif
    int64_t last = __atomic_load_n(&cfg->bad_frame_sec, __ATOMIC_RELAXED);
    /* (<=: a worker whose clock read came before another's later second must neither
     * log nor set the second back, or the later second logs twice.) */
    if (now.tv_sec <= last ||
        !__atomic_compare_exchange_n(&cfg->bad_frame_sec, &last, (int64_t)now.tv_sec, false,
                                     __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        __atomic_add_fetch(&cfg->bad_frames_unlogged, 1, __ATOMIC_RELAXED);
        return;
    }
    char why[160], ip[INET6_ADDRSTRLEN] = "?", peer[INET6_ADDRSTRLEN + 8];
    cp_conn_frame_state(c, why, sizeof why);
    union {
        struct sockaddr_in in;
        struct sockaddr_in6 in6;
    } sa;
    memcpy(&sa, cp_conn_user(c), sizeof sa);
    unsigned peer_port = 0;
    if (sa.in.sin_family == AF_INET) {
        inet_ntop(AF_INET, &sa.in.sin_addr, ip, sizeof ip);
        peer_port = ntohs(sa.in.sin_port);
    } else if (sa.in6.sin6_family == AF_INET6) {
        inet_ntop(AF_INET6, &sa.in6.sin6_addr, ip, sizeof ip);
        peer_port = ntohs(sa.in6.sin6_port);
    }
    address_port_text(peer, sizeof peer, ip, peer_port);
    uint64_t unlogged = __atomic_exchange_n(&cfg->bad_frames_unlogged, 0, __ATOMIC_RELAXED);
    if (unlogged)
        fprintf(stderr, "cport-echo: closed %s: %s (and %llu more bad-frame closes not logged)\n",
                peer, why, (unsigned long long)unlogged);
    else
        fprintf(stderr, "cport-echo: closed %s: %s\n", peer, why);
}

/* ---- counters ----------------------------------------------------------------------------- */

static void print_stats(cp_server *sv, FILE *f)
{
    cp_server_stats s;
    cp_server_get_stats(sv, &s);
    fprintf(f,
            "cport-echo: conns_open=%llu conns_total=%llu conns_rejected=%llu conns_reaped=%llu "
            "accepts_outstanding=%llu accepts_target=%llu accept_pauses=%llu bytes_in=%llu "
            "bytes_out=%llu completions=%llu backpressure_events=%llu frames_in=%llu "
            "frames_rejected=%llu allocations=%llu\n",
            (unsigned long long)s.conns_open, (unsigned long long)s.conns_total,
            (unsigned long long)s.conns_rejected, (unsigned long long)s.conns_reaped,
            (unsigned long long)s.accepts_outstanding, (unsigned long long)s.accepts_target,
            (unsigned long long)s.accept_pauses, (unsigned long long)s.bytes_in,
            (unsigned long long)s.bytes_out, (unsigned long long)s.completions,
            (unsigned long long)s.backpressure_events, (unsigned long long)s.frames_in,
            (unsigned long long)s.frames_rejected, (unsigned long long)s.allocations);
    fflush(f);
}

/* The counters over HTTP: a second, small cp_server (one worker) on the stats port. Each
 * connection's first data is taken as the request (what it asks does not matter) and
 * answered with the Prometheus text, then the connection is closed gracefully. Being a
 * cp_server, it serves many scrapers at once: a client that connects and says nothing
 * delays nobody (it is reaped after STATS_TIMEOUT_MS), a flood is capped at
 * STATS_MAX_CONNS, and running out of descriptors pauses its accepting instead of ending
 * it. The echo path never sees any of it. */
enum { STATS_MAX_CONNS = 64, STATS_TIMEOUT_MS = 5000 };

/* The Prometheus text: in `small` when it fits, else in a heap buffer (*body != small, for
 * the caller to free). The counters move between two calls (a value that gains digits
 * makes the text longer), so the heap buffer has room to spare and the text is made again
 * until it fits. Returns its length, or -1 without memory. */
static int stats_text(cp_server *echo, char *small, size_t small_size, char **body)
{
    /* Failure point echo_stats_small: the stack buffer takes no text, as if it were long. */
    size_t size = CP__INJECT_FAIL("echo_stats_small") ? 1 : small_size;
    char *buf = small;
    for (;;) {
        int n = cp_server_stats_prometheus(echo, "cport_echo_", buf, size);
        if (n < 0)
            n = 0;
        if ((size_t)n < size) {
            *body = buf;
            return n;
        }
        CP__INJECT_DELAY("echo_stats_retry"); /* the counters may move meanwhile */
        if (buf != small)
            free(buf);
        size = (size_t)n + (size_t)n / 4 + 64;
        buf = malloc(size);
        if (!buf)
            return -1;
    }
}

static void on_stats_request(cp_conn *c, const void *data, size_t len)
{
    (void)data;
    (void)len;
    bool *answered = cp_conn_user(c);
    if (*answered)
        return; /* the rest of a request that came in several pieces */
    *answered = true;
    cp_server *echo = cp_server_user(cp_conn_server(c));
    char small[4096], *body;
    int blen = stats_text(echo, small, sizeof(small), &body);
    if (blen < 0) {
        cp_conn_abort(c);
        return;
    }
    char head[160];
    int hl = snprintf(head, sizeof(head),
                      "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                      "Content-Length: %d\r\nConnection: close\r\n\r\n",
                      blen);
    /* (cp_conn_send copies what the kernel does not take at once) */
    if (cp_conn_send(c, head, (size_t)hl) < 0 || cp_conn_send(c, body, (size_t)blen) < 0)
        cp_conn_abort(c);
    else
        cp_conn_close(c);
    if (body != small)
        free(body);
}

static int stats_start(cp_server **statsp, cp_server *echo, const cp_server_options *eo, int port)
{
    static const cp_server_callbacks cb = {.on_data = on_stats_request};
    cp_server_options o = {.bind = eo->bind,
                           .port = (uint16_t)port,
                           .threads = 1,
                           .backend = eo->backend,
                           .accepts_max = 16,
                           .max_conns = STATS_MAX_CONNS,
                           .handshake_timeout_ms = STATS_TIMEOUT_MS,
                           .idle_timeout_ms = STATS_TIMEOUT_MS,
                           .linger_ms = 1000,
                           .conn_user_size = sizeof(bool),
                           .user = echo,
                           .port_options = {.flags = CP_PORT_QUIET}};
    long page = sysconf(_SC_PAGESIZE); /* (a receive buffer is a page multiple) */
    o.recv_buffer = page > 4096 ? (uint32_t)page : 4096;
    int r = cp_server_create(statsp, &o, &cb);
    if (r < 0)
        return r;
    if ((r = cp_server_start(*statsp)) < 0) {
        cp_server_destroy(*statsp);
        *statsp = NULL;
        return r;
    }
    char at[INET6_ADDRSTRLEN + 16];
    printf("stats on %s\n",
           address_port_text(at, sizeof at, eo->bind, cp_server_listen_port(*statsp)));
    return 0;
}

static void stats_stop(cp_server *stats)
{
    cp_server_shutdown(stats, 1000);
    cp_server_destroy(stats);
}

/* ---- command line ---------------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f, "usage: cport-echo [options]\n"
               "  --port N              TCP port (default 5050; 0 = any, printed at start)\n"
               "  --bind ADDR           IPv4 or IPv6 address to listen on (default 0.0.0.0; :: is\n"
               "                        every address of both families; the stats port too)\n"
               "  --threads N           worker threads (default: online CPUs)\n"
               "  --backend B           io_uring or epoll (default: io_uring if allowed)\n"
               "  --accepts N           accepts kept posted at least (= --accepts-min)\n"
               "  --accepts-min N       accept pool lower bound (default 4)\n"
               "  --accepts-max N       accept pool upper bound (default 256)\n"
               "  --max-conns N         connections beyond N are closed at once (default: none)\n"
               "  --handshake-timeout MS  close a connection silent this long after accept\n"
               "  --idle-timeout MS     close a connection silent this long\n"
               "  --max-pending BYTES   replies queued per connection before reading pauses\n"
               "                        (default 1048576)\n"
               "  --zero-byte           idle connections hold no receive buffer (pooled receives)\n"
               "  --recvs N             receives outstanding per connection (default 1)\n"
               "  --buffer BYTES        receive buffer size (rounded up to a page multiple): per\n"
               "                        receive (default 16384), or with --zero-byte per shared\n"
               "                        pool buffer (default 4096); defaults are at least a page\n"
               "  --framed              4-byte big-endian length-prefixed messages, echoed whole\n"
               "  --max-frame BYTES     largest frame accepted (default 1048576)\n"
               "  --stats-port N        serve the counters in Prometheus format on this port\n"
               "  --shutdown-deadline MS  how long SIGTERM lets replies drain (default 5000)\n"
               "  --help                this text\n"
               "SIGINT/SIGTERM/SIGHUP shut down gracefully and exit 0 (a second one during\n"
               "that shutdown exits at once with status 1); SIGUSR1 prints the counters.\n");
}

static int parse_uint(const char *s, unsigned long max, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *s == 0 || *end || v > max)
        return -1;
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->so.port = 5050;
    cfg->so.bind = "0.0.0.0";
    cfg->stats_port = -1;
    cfg->shutdown_ms = 5000;
    enum {
        O_PORT = 1,
        O_BIND,
        O_THREADS,
        O_BACKEND,
        O_ACCEPTS,
        O_AMIN,
        O_AMAX,
        O_MAXCONNS,
        O_HS,
        O_IDLE,
        O_PENDING,
        O_ZERO,
        O_RECVS,
        O_BUFFER,
        O_FRAMED,
        O_MAXFRAME,
        O_STATS,
        O_SHUTDOWN,
        O_HELP
    };
    static const struct option opts[] = {{"port", required_argument, 0, O_PORT},
                                         {"bind", required_argument, 0, O_BIND},
                                         {"threads", required_argument, 0, O_THREADS},
                                         {"backend", required_argument, 0, O_BACKEND},
                                         {"accepts", required_argument, 0, O_ACCEPTS},
                                         {"accepts-min", required_argument, 0, O_AMIN},
                                         {"accepts-max", required_argument, 0, O_AMAX},
                                         {"max-conns", required_argument, 0, O_MAXCONNS},
                                         {"handshake-timeout", required_argument, 0, O_HS},
                                         {"idle-timeout", required_argument, 0, O_IDLE},
                                         {"max-pending", required_argument, 0, O_PENDING},
                                         {"zero-byte", no_argument, 0, O_ZERO},
                                         {"recvs", required_argument, 0, O_RECVS},
                                         {"buffer", required_argument, 0, O_BUFFER},
                                         {"framed", no_argument, 0, O_FRAMED},
                                         {"max-frame", required_argument, 0, O_MAXFRAME},
                                         {"stats-port", required_argument, 0, O_STATS},
                                         {"shutdown-deadline", required_argument, 0, O_SHUTDOWN},
                                         {"help", no_argument, 0, O_HELP},
                                         {0, 0, 0, 0}};
    int ch;
    unsigned long v;
    cp_server_options *o = &cfg->so;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        bool ok = true;
        switch (ch) {
        case O_PORT:
            ok = parse_uint(optarg, 65535, &v) == 0;
            o->port = (uint16_t)v;
            break;
        case O_BIND:
            ok = bind_address_ok(optarg); /* not a name */
            o->bind = optarg;
            if (!ok)
                bind_address_refused("cport-echo", optarg);
            break;
        case O_THREADS:
            ok = parse_uint(optarg, 1024, &v) == 0 && v > 0;
            o->threads = (unsigned)v;
            break;
        case O_BACKEND:
            if (strcmp(optarg, "io_uring") == 0)
                o->backend = CP_BACKEND_IO_URING;
            else if (strcmp(optarg, "epoll") == 0)
                o->backend = CP_BACKEND_EPOLL;
            else
                ok = false;
            break;
        case O_ACCEPTS:
        case O_AMIN:
            ok = parse_uint(optarg, 65536, &v) == 0 && v > 0;
            o->accepts_min = (unsigned)v;
            break;
        case O_AMAX:
            ok = parse_uint(optarg, 65536, &v) == 0 && v > 0;
            o->accepts_max = (unsigned)v;
            break;
        case O_MAXCONNS:
            ok = parse_uint(optarg, 100000000, &v) == 0;
            o->max_conns = (unsigned)v;
            break;
        case O_HS:
            ok = parse_uint(optarg, 86400000, &v) == 0;
            o->handshake_timeout_ms = (unsigned)v;
            break;
        case O_IDLE:
            ok = parse_uint(optarg, 86400000, &v) == 0;
            o->idle_timeout_ms = (unsigned)v;
            break;
        case O_PENDING:
            ok = parse_uint(optarg, UINT32_MAX / 2, &v) == 0 && v > 0;
            o->max_pending_send = (uint32_t)v;
            break;
        case O_ZERO:
            o->zero_byte = true;
            break;
        case O_RECVS:
            ok = parse_uint(optarg, 64, &v) == 0 && v > 0;
            o->recvs = (unsigned)v;
            break;
        case O_BUFFER:
            ok = parse_uint(optarg, 65536, &v) == 0 && v > 0;
            o->recv_buffer = (uint32_t)v;
            break;
        case O_FRAMED:
            o->framed = true;
            break;
        case O_MAXFRAME:
            ok = parse_uint(optarg, CP_FRAME_MAX_LIMIT, &v) == 0 && v > 0;
            o->max_frame = (uint32_t)v;
            break;
        case O_STATS:
            ok = parse_uint(optarg, 65535, &v) == 0;
            cfg->stats_port = (int)v;
            break;
        case O_SHUTDOWN:
            ok = parse_uint(optarg, 3600000, &v) == 0;
            cfg->shutdown_ms = (unsigned)v;
            break;
        case O_HELP:
            usage(stdout);
            exit(0);
        default:
            ok = false;
        }
        if (!ok) {
            if (ch != '?')
                fprintf(stderr, "cport-echo: bad value for --%s: %s\n", opts[ch - 1].name,
                        optarg ? optarg : "");
            return -1;
        }
    }
    if (o->recv_buffer && o->recv_buffer % (uint32_t)sysconf(_SC_PAGESIZE)) {
        /* The server's buffers are page multiples (lookaside lists): round up. */
        long page = sysconf(_SC_PAGESIZE);
        o->recv_buffer =
            (uint32_t)((o->recv_buffer + (uint32_t)page - 1) / (uint32_t)page * (uint32_t)page);
    }
    if (o->accepts_min && o->accepts_max && o->accepts_max < o->accepts_min) {
        fprintf(stderr, "cport-echo: --accepts-max %u is below --accepts-min %u\n", o->accepts_max,
                o->accepts_min);
        return -1;
    }
    if (o->zero_byte && o->recv_buffer) {
        /* Pooled receives draw from the port's pool: --buffer sizes its buffers. */
        o->port_options.pool_buffer_size = o->recv_buffer;
        o->recv_buffer = 0;
    }
    return optind == argc ? 0 : -1;
}

/* While the graceful shutdown runs (up to --shutdown-deadline): a second stop signal ends
 * the process at once, for an operator who will not wait; SIGUSR1 still prints. */
typedef struct shutdown_watch {
    cp_server *sv;
    const sigset_t *sigs;
} shutdown_watch;

static void *watch_second_signal(void *arg)
{
    const shutdown_watch *w = arg;
    for (;;) {
        int sig;
        if (sigwait(w->sigs, &sig) != 0)
            continue;
        if (sig == SIGUSR1) {
            print_stats(w->sv, stderr);
            continue;
        }
        fprintf(stderr, "cport-echo: %s again: exiting without waiting for the shutdown\n",
                strsignal(sig));
        _exit(1);
    }
    return NULL;
}

static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv)
{
    config cfg;
    if (parse_args(argc, argv, &cfg) < 0) {
        usage(stderr);
        return 2;
    }
    raise_fd_limit();
    /* Signals are taken synchronously by main; workers never see them. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    cp_server_callbacks cb = {.on_data = on_data};
    if (cfg.so.framed) {
        cb.on_data = on_data_framed;
        cb.on_open = on_open_framed;
        cb.on_close = on_close;
        cfg.so.conn_user_size = sizeof(struct sockaddr_in6); /* (either family's) */
    }
    cfg.so.user = &cfg;
    cp_server *sv;
    int r = cp_server_create(&sv, &cfg.so, &cb);
    if (r < 0) {
        fprintf(stderr, "cport-echo: cannot start: %s\n", cp_strerror(r));
        return 1;
    }
    const cp_server_options *o = &cfg.so;
    char at[INET6_ADDRSTRLEN + 16];
    if ((r = cp_server_start(sv)) < 0) {
        fprintf(stderr, "cport-echo: cannot listen on %s: %s\n",
                address_port_text(at, sizeof at, o->bind, o->port), cp_strerror(r));
        cp_server_destroy(sv);
        return 1;
    }
    unsigned amin = o->accepts_min ? o->accepts_min : 4;
    unsigned amax = o->accepts_max ? o->accepts_max : 256;
    if (amax < amin)
        amax = amin; /* (what the server does: --accepts above the default maximum) */
    long page = sysconf(_SC_PAGESIZE);
    unsigned buffer = o->zero_byte     ? (unsigned)cp_buffer_size(cp_server_port(sv))
                      : o->recv_buffer ? o->recv_buffer
                      : page > 16384   ? (unsigned)page /* (the server's default there) */
                                       : 16384;
    printf("cport-echo: backend=%s threads=%u bind=%s port=%u accepts=%u..%u max-conns=%u "
           "handshake-timeout=%ums idle-timeout=%ums max-pending=%u zero-byte=%s recvs=%u "
           "buffer=%u framed=%s max-frame=%u\n",
           cp_port_backend_name(cp_server_port(sv)),
           o->threads ? o->threads : (unsigned)sysconf(_SC_NPROCESSORS_ONLN), o->bind,
           cp_server_listen_port(sv), amin, amax, o->max_conns, o->handshake_timeout_ms,
           o->idle_timeout_ms, o->max_pending_send ? o->max_pending_send : 1u << 20,
           o->zero_byte ? "on" : "off", o->recvs ? o->recvs : 1, buffer, o->framed ? "on" : "off",
           o->max_frame ? o->max_frame : CP_FRAME_DEFAULT_MAX);
    struct rlimit rl;
    if (o->max_conns && getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        o->max_conns > rl.rlim_cur)
        fprintf(stderr,
                "cport-echo: note: --max-conns %u is above the limit of open files (%llu): "
                "when descriptors run out, accepting pauses and connections wait in the "
                "backlog instead of being closed at once\n",
                o->max_conns, (unsigned long long)rl.rlim_cur);
    cp_server *stats = NULL;
    if (cfg.stats_port >= 0 && (r = stats_start(&stats, sv, o, cfg.stats_port)) < 0) {
        fprintf(stderr, "cport-echo: cannot serve stats on %s: %s\n",
                address_port_text(at, sizeof at, o->bind, (unsigned)cfg.stats_port),
                cp_strerror(r));
        cp_server_destroy(sv);
        return 1;
    }
    /* Last: whoever waits for this line finds everything (stats included) ready. */
    printf("listening on %s\n",
           address_port_text(at, sizeof at, o->bind, cp_server_listen_port(sv)));
    fflush(stdout);

    int sig;
    for (;;) {
        sigwait(&sigs, &sig);
        if (sig != SIGUSR1)
            break;
        print_stats(sv, stderr);
    }
    shutdown_watch watch = {.sv = sv, .sigs = &sigs};
    pthread_t watcher;
    bool watching = pthread_create(&watcher, NULL, watch_second_signal, &watch) == 0;
    r = cp_server_shutdown(sv, cfg.shutdown_ms);
    if (watching) {
        pthread_cancel(watcher); /* (sigwait is a cancellation point) */
        pthread_join(watcher, NULL);
    }
    if (stats)
        stats_stop(stats);
    print_stats(sv, stdout);
    cp_server_stats st;
    cp_server_get_stats(sv, &st);
    printf("cport-echo: %s: accepted=%llu rejected=%llu closed=%llu; shut down %s\n",
           strsignal(sig), (unsigned long long)st.conns_total,
           (unsigned long long)st.conns_rejected,
           (unsigned long long)(st.conns_total - st.conns_open),
           r == 0 ? "cleanly" : "at the deadline (connections cut)");
    cp_server_destroy(sv);
    return 0;
}
