/* cport-bench: load generator for echo servers (epoll + pthreads; does not use libcport).
 *
 *   cport-bench echo     -c CONNS -s SIZE -d DEPTH -T SECS -w SECS -t THREADS [--rate R]
 *   cport-bench connrate -c CONCURRENCY -s SIZE -T SECS -w SECS -t THREADS
 *   cport-bench hold     -n CONNS [--echo] -T SECS
 *
 * Every mode prints a human summary and exactly one machine-readable line: "RESULT k=v ..."
 * or, with --json, one JSON object (the summary then goes to stderr). Exit status: 0 ok,
 * 1 the run saw errors (verification, lost connections, failed connects), 2 bad usage or
 * not enough file descriptors. */
#include "bench.h"
#include "common/address.h"

#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static void on_signal(int sig)
{
    (void)sig;
    /* Read by every thread: during the window (or the warm-up) it ends the window; after
     * the window's end, echo mode's drain. */
    if (__atomic_load_n(&cb_window_over, __ATOMIC_RELAXED))
        __atomic_store_n(&cb_drain_cut, 1, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&cb_stop, 1, __ATOMIC_RELAXED);
}

void signals_block(bool block)
{
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGINT);
    sigaddset(&s, SIGTERM);
    pthread_sigmask(block ? SIG_BLOCK : SIG_UNBLOCK, &s, NULL);
}

static const char common_help[] =
    "  --host ADDR         server address, IPv4 or IPv6 (bare or in brackets; default\n"
    "                      127.0.0.1)\n"
    "  --port N            server port (default 5050)\n"
    "  --json              print the result as one JSON object (summary goes to stderr)\n"
    "  --server-pid PID    sample the server's CPU (/proc/PID/stat) at the start and end of\n"
    "                      the measured window and report user/system us per operation\n"
    "                      (hold: its RSS before and after, bytes per connection)\n"
    "  --mark-file FILE    write \"start <ns>\" / \"end <ns>\" lines (CLOCK_MONOTONIC) to FILE\n"
    "                      when the measured window starts and ends\n"
    "  --connect-timeout MS  per-connection setup deadline (default 5000)\n"
    "  --batch N           connects in flight at most while connecting (echo, hold;\n"
    "                      default 512)\n"
    "  --src-per-ip N      bind every N connections to the next source address, starting at\n"
    "                      --src-start (default 127.0.0.1); 0 = let the kernel choose.\n"
    "                      Default 5000 for a 127/8 server, else 0; IPv4 servers only.\n"
    "                      (Linux's ephemeral port\n"
    "                      search gets quadratic beyond ~14000 connections per source address.)\n"
    "  --src-start ADDR    first source address; give each cport-bench process its own range\n"
    "                      (e.g. 127.1.0.1, 127.2.0.1) when several run against one server;\n"
    "                      the addresses wrap after 65536 or at the end of its /8\n"
    "  -h, --help          this help\n";

static void usage(FILE *f, const char *mode)
{
    if (mode && strcmp(mode, "echo") == 0) {
        fprintf(f,
                "usage: cport-bench echo [options]\n"
                "Pipelined echo load of SIZE-byte messages; every echoed byte is verified.\n"
                "Reports msgs/s, MiB/s, latency, Jain fairness, errors.\n"
                "Closed loop (default): every connection keeps DEPTH messages in flight and\n"
                "sends the next when one comes back. Latency runs from a message's first byte\n"
                "written to its last byte echoed; a stalled server also stalls the sends, so a\n"
                "stall shows only in the messages in flight (coordinated omission; see\n"
                "bench/README.md): read it as service time.\n"
                "Open loop (--rate R): messages are due on a fixed schedule, R per second in\n"
                "all, and their latency runs from their due time, so a stall shows in every\n"
                "message due during it (like wrk2).\n"
                "  -c, --conns N       connections (default 100)\n"
                "  -s, --size BYTES    message size (default 64; suffixes k, m)\n"
                "  -d, --depth N       messages in flight per connection at most (default 1)\n"
                "  --rate R            open loop: R messages per second over all connections\n"
                "                      (fractions and suffixes k = 1000, m = 10^6 allowed).\n"
                "                      Each connection sends R/conns per second, the\n"
                "                      connections' phases staggered evenly, from the start\n"
                "                      of the warm-up. A message goes out at its due time if\n"
                "                      its connection has fewer than DEPTH in flight and its\n"
                "                      socket takes it, else as soon as it can, in order.\n"
                "                      Reports the target (rate_target) and achieved rate\n"
                "                      (msgs_per_s), messages due in the window sent more\n"
                "                      than 1 ms late (late_sends) and those due over 1 ms\n"
                "                      before its end and not sent by then (backlog), and\n"
                "                      says \"did not keep up\" (kept_up=0) below 95%% of\n"
                "                      the target. Latency is \"from due time\"\n"
                "  -T, --secs SEC      measured duration (default 5)\n"
                "  -w, --warmup SEC    warm-up before it (default 1)\n"
                "  -t, --threads N     client threads, one epoll each (default 1)\n"
                "  --drain SEC         time allowed after the window for the echoes in flight\n"
                "                      and then, each connection having half-closed once all\n"
                "                      its echoes were back, for the server's end of stream\n"
                "                      (a byte before it is a verification error; a server\n"
                "                      not closed by then counts as unclosed, no error;\n"
                "                      default 5). SIGINT/SIGTERM ends the window early;\n"
                "                      one during the drain ends the drain at once\n"
                "%s",
                common_help);
    } else if (mode && strcmp(mode, "connrate") == 0) {
        fprintf(f,
                "usage: cport-bench connrate [options]\n"
                "Connection rate: each of CONCURRENCY slots loops connect -> send one message\n"
                "and half-close -> read and verify its echo up to the server's end of stream\n"
                "(a byte beyond the echo is a verification error; a server that does not\n"
                "close after the client's end times out) -> close. Reports conns/s and\n"
                "latency (connect to the server's end of stream).\n"
                "  -c, --conns N       concurrent slots (default 64)\n"
                "  -s, --size BYTES    message size (default 64)\n"
                "  -T, --secs SEC      measured duration (default 5)\n"
                "  -w, --warmup SEC    warm-up before it (default 1)\n"
                "  -t, --threads N     client threads (default 1)\n"
                "%s",
                common_help);
    } else if (mode && strcmp(mode, "hold") == 0) {
        fprintf(f,
                "usage: cport-bench hold [options]\n"
                "Opens N connections (at most --batch connects in flight), holds them idle for\n"
                "SEC seconds, then checks that every one is still open. Fails if any was lost.\n"
                "  -n, --conns N       connections (default 1000)\n"
                "  --echo              send and verify one message on each after connecting\n"
                "  -s, --size BYTES    that message's size (default 64)\n"
                "  -T, --secs SEC      how long to hold them (default 5)\n"
                "  --settle SEC        before each RSS sample of the set-up (half set up, all\n"
                "                      set up) wait, at most SEC, until the server's RSS has not\n"
                "                      changed for 2.5 s (at rest: e.g. its buffers trimmed); the\n"
                "                      wait is not in set-up time or CPU (with --server-pid;\n"
                "                      default 0: sample at once)\n"
                "%s",
                common_help);
    } else {
        fprintf(f, "usage: cport-bench MODE [options]   (cport-bench MODE --help for details)\n"
                   "  echo      pipelined echo throughput, latency and fairness, fully verified\n"
                   "  connrate  connect/echo/close rate\n"
                   "  hold      many idle connections: setup rate, server memory, none lost\n");
    }
}

static _Noreturn void bad(const char *mode, const char *flag, const char *v)
{
    fprintf(stderr, "cport-bench %s: bad value for %s: %s\n", mode, flag, v);
    exit(2);
}

static long long parse_int(const char *mode, const char *flag, const char *v, long long min,
                           long long max)
{
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10), mul = 1;
    if (*end == 'k' || *end == 'K')
        mul = 1024, end++;
    else if (*end == 'm' || *end == 'M')
        mul = 1024 * 1024, end++;
    /* Range-check before scaling: x * mul must not overflow (every min here is >= 0). */
    if (errno || end == v || *end || x < 0 || x > max / mul || x * mul < min)
        bad(mode, flag, v);
    return x * mul;
}

static double parse_secs(const char *mode, const char *flag, const char *v, double min)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || !isfinite(x) || x < min || x > 86400)
        bad(mode, flag, v);
    return x;
}

/* A rate in messages per second: > 0, fractions allowed, suffixes k (1000) and m (10^6). */
static double parse_rate(const char *mode, const char *flag, const char *v)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end), mul = 1;
    if (end != v && (*end == 'k' || *end == 'K'))
        mul = 1e3, end++;
    else if (end != v && (*end == 'm' || *end == 'M'))
        mul = 1e6, end++;
    x *= mul;
    if (errno || end == v || *end || !isfinite(x) || !(x > 0) || x > 1e9)
        bad(mode, flag, v);
    return x;
}

enum {
    O_HOST = 256,
    O_PORT,
    O_JSON,
    O_SERVER_PID,
    O_MARK,
    O_CTO,
    O_BATCH,
    O_SRC_PER_IP,
    O_SRC_START,
    O_ECHO,
    O_DRAIN,
    O_SETTLE,
    O_RATE,
};

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(argc < 2 ? stderr : stdout, NULL);
        return argc < 2 ? 2 : 0;
    }
    struct opts o = {.mode = argv[1],
                     .host = "127.0.0.1",
                     .port = 5050,
                     .size = 64,
                     .depth = 1,
                     .secs = 5,
                     .warmup = 1,
                     .drain = 5,
                     .threads = 1,
                     .src_per_ip = -1,
                     .src_start = 0x7f000001,
                     .batch = 512,
                     .connect_timeout_ms = 5000};
    const char *m = o.mode;
    if (strcmp(m, "echo") == 0)
        o.conns = 100;
    else if (strcmp(m, "connrate") == 0)
        o.conns = 64;
    else if (strcmp(m, "hold") == 0)
        o.conns = 1000;
    else {
        fprintf(stderr, "cport-bench: unknown mode '%s'\n", m);
        usage(stderr, NULL);
        return 2;
    }
    bool is_echo = strcmp(m, "echo") == 0, is_hold = strcmp(m, "hold") == 0;

    static const struct option lopts[] = {
        {"conns", required_argument, NULL, 'c'},
        {"size", required_argument, NULL, 's'},
        {"depth", required_argument, NULL, 'd'},
        {"secs", required_argument, NULL, 'T'},
        {"warmup", required_argument, NULL, 'w'},
        {"threads", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {"host", required_argument, NULL, O_HOST},
        {"port", required_argument, NULL, O_PORT},
        {"json", no_argument, NULL, O_JSON},
        {"server-pid", required_argument, NULL, O_SERVER_PID},
        {"mark-file", required_argument, NULL, O_MARK},
        {"connect-timeout", required_argument, NULL, O_CTO},
        {"batch", required_argument, NULL, O_BATCH},
        {"src-per-ip", required_argument, NULL, O_SRC_PER_IP},
        {"src-start", required_argument, NULL, O_SRC_START},
        {"echo", no_argument, NULL, O_ECHO},
        {"drain", required_argument, NULL, O_DRAIN},
        {"settle", required_argument, NULL, O_SETTLE},
        {"rate", required_argument, NULL, O_RATE},
        {NULL, 0, NULL, 0},
    };
    const char *shorts = is_hold ? "n:s:T:h" : is_echo ? "c:s:d:T:w:t:h" : "c:s:T:w:t:h";
    optind = 2;
    int ch;
    /* Options another mode uses, refused here rather than silently ignored. */
    const char *misplaced = NULL;
    bool size_given = false, src_start_given = false;
    while ((ch = getopt_long(argc, argv, shorts, lopts, NULL)) != -1) {
        if ((ch == 'd' || ch == O_DRAIN || ch == O_RATE) && !is_echo)
            misplaced = ch == 'd' ? "-d/--depth" : ch == O_DRAIN ? "--drain" : "--rate";
        if ((ch == 'w' || ch == 't') && is_hold)
            misplaced = ch == 'w' ? "-w/--warmup" : "-t/--threads";
        /* connrate keeps -c connects in flight: --batch would have no effect. */
        if (ch == O_BATCH && !is_echo && !is_hold)
            misplaced = "--batch";
        if (ch == 's')
            size_given = true;
        switch (ch) {
        case 'n':
        case 'c':
            o.conns = (int)parse_int(m, "-c/-n", optarg, 1, 100000000);
            break;
        case 's':
            o.size = (size_t)parse_int(m, "-s", optarg, 1, CB_MAX_SIZE);
            break;
        case 'd':
            o.depth = (int)parse_int(m, "-d", optarg, 1, 4096);
            break;
        case 'T':
            o.secs = parse_secs(m, "-T", optarg, 0.001);
            break;
        case 'w':
            o.warmup = parse_secs(m, "-w", optarg, 0);
            break;
        case 't':
            o.threads = (int)parse_int(m, "-t", optarg, 1, 256);
            break;
        case 'h':
            usage(stdout, m);
            return 0;
        case O_HOST:
            o.host = optarg;
            break;
        case O_PORT:
            o.port = (int)parse_int(m, "--port", optarg, 1, 65535);
            break;
        case O_JSON:
            o.json = true;
            break;
        case O_SERVER_PID:
            o.server_pid = (int)parse_int(m, "--server-pid", optarg, 1, 1 << 30);
            break;
        case O_MARK:
            o.mark_file = optarg;
            break;
        case O_CTO:
            o.connect_timeout_ms = (int)parse_int(m, "--connect-timeout", optarg, 1, 3600000);
            break;
        case O_BATCH:
            o.batch = (int)parse_int(m, "--batch", optarg, 1, 1000000);
            break;
        case O_SRC_PER_IP:
            o.src_per_ip = (int)parse_int(m, "--src-per-ip", optarg, 0, 1 << 30);
            break;
        case O_SRC_START: {
            struct in_addr a;
            if (inet_pton(AF_INET, optarg, &a) != 1)
                bad(m, "--src-start", optarg);
            o.src_start = ntohl(a.s_addr);
            src_start_given = true;
            break;
        }
        case O_ECHO:
            if (!is_hold)
                bad(m, "--echo", "(only for hold)");
            o.echo = true;
            break;
        case O_DRAIN:
            o.drain = parse_secs(m, "--drain", optarg, 0.001); /* 0: every run would time out */
            break;
        case O_RATE:
            o.rate = parse_rate(m, "--rate", optarg);
            break;
        case O_SETTLE:
            if (!is_hold)
                bad(m, "--settle", "(only for hold)");
            o.settle = parse_secs(m, "--settle", optarg, 0);
            break;
        default:
            usage(stderr, m);
            return 2;
        }
    }
    if (is_hold && size_given && !o.echo)
        misplaced = "-s/--size without --echo"; /* hold sends nothing then */
    if (optind < argc) {
        fprintf(stderr, "cport-bench %s: unexpected argument '%s'\n", m, argv[optind]);
        return 2;
    }
    if (misplaced) {
        fprintf(stderr, "cport-bench %s: option '%s' does not apply to this mode (see %s --help)\n",
                m, misplaced, m);
        return 2;
    }
    if (!address_parse(o.host, (uint16_t)o.port, &o.addr, &o.addr_len)) {
        fprintf(stderr, "cport-bench %s: --host needs an IPv4 or IPv6 address, not '%s'\n", m,
                o.host);
        return 2;
    }
    address_port_text(o.target, sizeof o.target, o.host, (unsigned)o.port);
    if (o.addr.ss_family == AF_INET6) {
        /* Source addresses are spread over 127/8 only. */
        if (o.src_per_ip > 0 || src_start_given) {
            fprintf(stderr,
                    "cport-bench %s: --src-per-ip and --src-start spread IPv4 source addresses; "
                    "the server '%s' is IPv6\n",
                    m, o.host);
            return 2;
        }
        o.src_per_ip = 0;
    } else if (o.src_per_ip < 0) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)&o.addr;
        o.src_per_ip = (ntohl(in->sin_addr.s_addr) >> 24) == 127 ? 5000 : 0;
    }
    if (is_hold)
        o.threads = 1;
    if (o.threads > o.conns)
        o.threads = o.conns;
    set_say_stream(o.json);

    /* Descriptors: raise the soft limit to the hard one, and refuse before connecting if the
     * connections cannot fit. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        struct rlimit want = {rl.rlim_max, rl.rlim_max};
        if (setrlimit(RLIMIT_NOFILE, &want) == 0)
            rl = want;
    }
    /* Descriptors open already (inherited from the parent) count too; stdio is in the
     * margin, and so is the one listing them (counted among them). */
    long open_now = proc_fd_count(getpid());
    unsigned long long inherited = open_now > 4 ? (unsigned long long)open_now - 4 : 0;
    unsigned long long need =
        (unsigned long long)o.conns + CB_FD_MARGIN + (unsigned)o.threads + inherited;
    if (rl.rlim_cur != RLIM_INFINITY && need > (unsigned long long)rl.rlim_cur) {
        char open_note[96] = "";
        if (inherited)
            snprintf(open_note, sizeof open_note, ", %llu of them open already at start",
                     inherited);
        fprintf(stderr,
                "cport-bench: %d connections need %llu file descriptors%s, but this process "
                "may open at most %llu (RLIMIT_NOFILE %s limit); use fewer connections or run "
                "several cport-bench processes\n",
                o.conns, need, open_note, (unsigned long long)rl.rlim_cur,
                rl.rlim_cur == rl.rlim_max ? "hard" : "soft");
        return 2;
    }

    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    mark_open(o.mark_file);

    res_str("mode", m);
    res_str("host", o.host);
    res_int("port", o.port);
    res_int("conns", o.conns);
    res_int("threads", o.threads);
    res_int("size", (int64_t)o.size);
    if (is_echo)
        res_int("depth", o.depth);
    if (!is_hold)
        res_num("warmup", o.warmup, 3);
    if (is_hold)
        res_int("echo", o.echo ? 1 : 0);

    int rc;
    if (is_echo)
        rc = run_echo(&o);
    else if (is_hold)
        rc = run_hold(&o);
    else
        rc = run_connrate(&o);
    res_print(o.json);
    return rc;
}
