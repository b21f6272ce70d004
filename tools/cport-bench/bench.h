/* cport-bench: shared declarations of the load generator (see main.c for the overview). */
#ifndef CPORT_BENCH_H
#define CPORT_BENCH_H

#include <netinet/in.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Descriptors needed besides the connections: stdio, the mark file, /proc reads and slack.
 * Each worker thread adds one for its epoll. */
#define CB_FD_MARGIN 16

#define CB_MAX_SIZE (64u << 20)

struct opts {
    const char *mode;
    const char *host;
    int port;
    struct sockaddr_storage addr; /* the server's: IPv4 or IPv6 */
    socklen_t addr_len;
    char target[64]; /* "host:port", "[host]:port" for IPv6, for the summaries */
    int conns;       /* echo: connections, connrate: concurrent slots, hold: connections */
    size_t size;     /* message size in bytes */
    int depth;       /* echo: messages in flight per connection */
    double rate;     /* echo: open loop at this many messages per second in all (0 = closed loop) */
    double secs, warmup, drain;
    double settle; /* hold: idle pause before each RSS sample of the set-up (0 = none) */
    int threads;
    bool json;
    const char *mark_file;
    int server_pid;
    bool echo;          /* hold: echo one message on each connection */
    int src_per_ip;     /* connections per source address; 0 = let the kernel choose */
    uint32_t src_start; /* first source address, host byte order */
    int batch;          /* connects in flight at most */
    int connect_timeout_ms;
};

/* ---- time and stop flag ----------------------------------------------------------------- */
/* Set by the SIGINT/SIGTERM handler: cb_stop before the window's end, cb_drain_cut after
 * it (cb_window_over, set by window_run once the end is published, tells which). */
extern volatile sig_atomic_t cb_stop, cb_drain_cut, cb_window_over;

/* Whether SIGINT/SIGTERM asked to stop (any thread): the window ends early. */
static inline bool bench_stopped(void)
{
    return __atomic_load_n(&cb_stop, __ATOMIC_RELAXED) != 0;
}
/* Whether SIGINT/SIGTERM came after the window's end: echo mode's drain ends at once (what
 * is still unanswered counts as unanswered). */
static inline bool bench_drain_cut(void)
{
    return __atomic_load_n(&cb_drain_cut, __ATOMIC_RELAXED) != 0;
}
int64_t now_ns(void);
/* Sleeps until the monotonic time t (ns) or until cb_stop is set; false if stopped. */
bool sleep_until(int64_t t);
/* Blocks (or unblocks) SIGINT/SIGTERM in the calling thread; threads created meanwhile
 * inherit the mask, so only the main thread handles them. */
void signals_block(bool block);

/* ---- payloads ----------------------------------------------------------------------------
 * Message (conn, seq) is the slice of a fixed pseudo-random pool that starts at an offset
 * derived from a hash of (conn, seq). Sending writes straight from the pool and verifying
 * is one memcmp against it, so neither side does per-byte work. */
extern const uint8_t *cb_pool;
extern uint64_t cb_pool_starts;
extern uint64_t cb_seed; /* per run: distinct payloads in every cport-bench process */
void pool_init(size_t msg_size);

static inline uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline const uint8_t *msg_bytes(uint64_t conn, uint64_t seq)
{
    return cb_pool + mix64(mix64(conn ^ cb_seed) ^ seq) % cb_pool_starts;
}

/* ---- latency histogram: log buckets with 32 linear sub-buckets (< 3.2% error) --------- */
#define HIST_SUB_BITS 5
#define HIST_SUB      (1u << HIST_SUB_BITS)
#define HIST_BUCKETS  ((64 - HIST_SUB_BITS + 1) * HIST_SUB)

struct hist {
    uint64_t count, sum, min, max;
    uint64_t b[HIST_BUCKETS];
};

static inline unsigned hist_bucket(uint64_t v)
{
    if (v < 2 * HIST_SUB)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    unsigned sub = (unsigned)(v >> (e - HIST_SUB_BITS)) & (HIST_SUB - 1);
    return (e - HIST_SUB_BITS + 1) * HIST_SUB + sub;
}

static inline void hist_add(struct hist *h, uint64_t v)
{
    h->b[hist_bucket(v)]++;
    h->count++;
    h->sum += v;
    if (v > h->max)
        h->max = v;
    if (v < h->min || h->count == 1)
        h->min = v;
}

void hist_merge(struct hist *into, const struct hist *h);
/* The value at quantile q (0..1): the upper edge of its bucket, clamped to [min, max]. */
uint64_t hist_quantile(const struct hist *h, double q);

/* ---- error counters shared by all modes ------------------------------------------------- */
struct errs {
    uint64_t connect_errors; /* refused, timed out, no address ... */
    uint64_t resets;         /* read/write error on an established connection */
    uint64_t eof;            /* peer closed while we expected data */
    uint64_t verify_errors;  /* echoed bytes differ from what was sent (or too many) */
    uint64_t timeouts;       /* echo not complete in time */
    int connect_errno;       /* why the first failed connect failed; 0 = none failed */
};
void errs_add(struct errs *into, const struct errs *e);
uint64_t errs_total(const struct errs *e);

/* ---- sockets ------------------------------------------------------------------------------ */
/* Opens a nonblocking TCP socket (TCP_NODELAY; bound to the source address of connection
 * number src_index when --src-per-ip is set) and starts connecting it. Returns the fd with
 * *done = true if already connected, false if in progress; -1 (errno set) on failure. */
int start_connect(const struct opts *o, uint64_t src_index, bool *done);
/* The source address used for connection number src_index (host byte order), or 0. */
uint32_t src_addr_for(const struct opts *o, uint64_t src_index);

/* ---- connection jobs ------------------------------------------------------------------------
 * A job runner keeps up to `slots` operations in flight on its own epoll. Each operation
 * connects, optionally sends one message and reads back and verifies its echo, then either
 * keeps the connection (keep: the fd goes to fds[job]) or closes it and starts the next one
 * (connrate: it half-closes after sending and is done at the server's end of stream, so that
 * any byte beyond the echo is a verification error). Every operation has a deadline
 * (connect timeout). */
struct jobrun {
    const struct opts *o;
    bool echo, keep;
    int nslots;
    uint64_t njobs;    /* keep mode: jobs 0..njobs-1 */
    uint64_t id_base;  /* connection ids (payload seeds) = id_base + job number */
    uint64_t src_base; /* source address index = src_base + job number */
    int *fds;          /* keep mode: out, fd per job or -1 */
    _Atomic int64_t *win_start, *win_end; /* connrate: measured window (ns) */
    /* results */
    struct errs err;
    struct hist hist;        /* latency of completed operations (connrate: in window) */
    uint64_t done, win_done; /* completed operations; those in the window */
    _Atomic uint64_t progress;
    int64_t first_ns, last_ns; /* first start, last completion */
    /* private */
    int epfd;
    struct slot *slots;
    int *free_list, nfree;
    uint64_t next_job;
    uint8_t *rxbuf;
};
int jobrun_init(struct jobrun *r);
/* Runs until all jobs are done (keep mode) or, in connrate mode, until *win_end has passed;
 * then lets operations in flight finish (bounded by their deadlines). Stops early on
 * cb_stop. */
void jobrun_run(struct jobrun *r);
void jobrun_free(struct jobrun *r);

/* ---- server sampling, marks and results ---------------------------------------------------- */
/* CPU time of a process in microseconds and its start time (clock ticks after boot: which
 * process the pid names) from /proc/PID/stat; false if unreadable. */
bool proc_cpu_us(int pid, uint64_t *user_us, uint64_t *sys_us, uint64_t *start);
/* Resident memory of a process in KiB (exact: /proc/PID/smaps_rollup; VmRSS where that
 * is missing), or -1. */
long proc_rss_kb(int pid);
/* Number of open file descriptors of a process (entries of /proc/PID/fd), or -1. */
long proc_fd_count(int pid);
void mark_open(const char *path);
/* Writes "what <ns>" to the mark file: now, or the monotonic time t. */
void mark_write(const char *what);
void mark_write_at(const char *what, int64_t t);

void res_str(const char *key, const char *v);
void res_int(const char *key, int64_t v);
void res_num(const char *key, double v, int decimals);
/* Prints the single machine-readable line (RESULT key=value ... or one JSON object). */
void res_print(bool json);
/* Human summary output: stdout normally, stderr with --json so stdout is pure JSON. */
void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void set_say_stream(bool json);

/* Shared reporting of the measured window's server CPU (when --server-pid is set). */
struct cpu_sample {
    bool ok;
    uint64_t user_us, sys_us;
    uint64_t start; /* the process's start time: a server that exited and left its pid to
                     * another process must not be measured as that process */
};
struct cpu_sample cpu_sample_take(int pid);
/* Whether two samples are of one process and the second is not behind the first. */
bool cpu_same_process(const struct cpu_sample *a, const struct cpu_sample *b);

/* The measured window, driven by the main thread: marks, server CPU samples, progress. */
struct window {
    /* ns; INT64_MAX until the main thread publishes them (each just after a CPU sample, a
     * little ahead of the time it was published). Workers classify each completion with
     * them, loaded after reading the clock, and load on until the end has passed. */
    _Atomic int64_t start, end;
    int64_t t0; /* when warm-up began */
    struct cpu_sample cpu0, cpu1;
    double secs; /* actual measured duration */
};
/* Runs the warm-up (o->warmup from w->t0) and the measured window (o->secs, or until
 * SIGINT/SIGTERM) on the calling (main) thread; returns once the window's end has passed.
 * progress() returns the operations completed so far (all threads); it is printed each
 * second on a tty. */
void window_run(const struct opts *o, struct window *w, uint64_t (*progress)(void *), void *arg,
                const char *unit);
void report_server_cpu(const struct opts *o, const struct window *w, uint64_t ops, const char *per);
/* Prints "<label> (us): p50 ..." and adds p50_us .. mean_us to the result. */
void report_latency(const struct hist *h, const char *label);
double jain_index(const uint64_t *x, size_t n);

int run_echo(struct opts *o);
int run_connrate(struct opts *o);
int run_hold(struct opts *o);

#endif
