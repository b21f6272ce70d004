/* cport-bench: time, payload pool, histograms, sockets, /proc sampling, result output and
 * the measured-window driver shared by the modes. */
#include "bench.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

volatile sig_atomic_t cb_stop, cb_drain_cut, cb_window_over;

int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

bool sleep_until(int64_t t)
{
    while (!bench_stopped()) {
        int64_t left = t - now_ns();
        if (left <= 0)
            return true;
        if (left > 50000000) /* wake at least every 50 ms to notice cb_stop */
            left = 50000000;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)left};
        nanosleep(&ts, NULL);
    }
    return false;
}

/* ---- payload pool -------------------------------------------------------------------------- */
enum { POOL_EXTRA = 1 << 20 };

const uint8_t *cb_pool;
uint64_t cb_pool_starts;
uint64_t cb_seed;

void pool_init(size_t msg_size)
{
    size_t len = msg_size + POOL_EXTRA;
    uint8_t *p = malloc(len + 8);
    if (!p) {
        fprintf(stderr, "cport-bench: out of memory\n");
        exit(2);
    }
    for (size_t i = 0; i < len; i += 8) {
        uint64_t w = mix64(0x63706f7274ull + i);
        memcpy(p + i, &w, 8);
    }
    cb_pool = p;
    if (getrandom(&cb_seed, sizeof cb_seed, 0) != sizeof cb_seed)
        cb_seed = mix64((uint64_t)now_ns() ^ ((uint64_t)getpid() << 32));
    cb_pool_starts = POOL_EXTRA + 1;
}

/* ---- histogram ------------------------------------------------------------------------------ */
void hist_merge(struct hist *into, const struct hist *h)
{
    if (!h->count)
        return;
    if (!into->count || h->min < into->min)
        into->min = h->min;
    if (h->max > into->max)
        into->max = h->max;
    into->count += h->count;
    into->sum += h->sum;
    for (unsigned i = 0; i < HIST_BUCKETS; i++)
        into->b[i] += h->b[i];
}

static uint64_t bucket_upper(unsigned b)
{
    if (b < 2 * HIST_SUB)
        return b;
    unsigned e = b / HIST_SUB + HIST_SUB_BITS - 1;
    unsigned sub = b % HIST_SUB;
    uint64_t low = (uint64_t)(HIST_SUB + sub) << (e - HIST_SUB_BITS);
    return low + ((uint64_t)1 << (e - HIST_SUB_BITS)) - 1;
}

uint64_t hist_quantile(const struct hist *h, double q)
{
    if (!h->count)
        return 0;
    uint64_t rank = (uint64_t)ceil(q * (double)h->count);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += h->b[i];
        if (seen >= rank) {
            uint64_t v = bucket_upper(i);
            if (v > h->max)
                v = h->max;
            if (v < h->min)
                v = h->min;
            return v;
        }
    }
    return h->max;
}

void errs_add(struct errs *into, const struct errs *e)
{
    into->connect_errors += e->connect_errors;
    into->resets += e->resets;
    into->eof += e->eof;
    into->verify_errors += e->verify_errors;
    into->timeouts += e->timeouts;
    if (!into->connect_errno)
        into->connect_errno = e->connect_errno;
}

uint64_t errs_total(const struct errs *e)
{
    return e->connect_errors + e->resets + e->eof + e->verify_errors + e->timeouts;
}

/* ---- sockets --------------------------------------------------------------------------------- */
uint32_t src_addr_for(const struct opts *o, uint64_t src_index)
{
    if (o->src_per_ip <= 0)
        return 0;
    /* Wraps after 65536 addresses (connrate keeps counting), or at the end of the start
     * address's /8 (127.255.255.255 for loopback), whichever comes first. */
    uint64_t span = ((uint64_t)(o->src_start & 0xff000000u) + 0x1000000u) - o->src_start;
    if (span > 65536)
        span = 65536;
    return o->src_start + (uint32_t)((src_index / (uint64_t)o->src_per_ip) % span);
}

int start_connect(const struct opts *o, uint64_t src_index, bool *done)
{
    int fd = socket(o->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    uint32_t src = src_addr_for(o, src_index); /* (0 towards an IPv6 server) */
    if (src) {
        /* Pick the port at connect time, unique per 4-tuple, not per source address. */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(src)};
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
            goto fail;
    }
    if (connect(fd, (const struct sockaddr *)&o->addr, o->addr_len) == 0) {
        *done = true;
        return fd;
    }
    if (errno == EINPROGRESS) {
        *done = false;
        return fd;
    }
fail:;
    int e = errno;
    close(fd);
    errno = e;
    return -1;
}

/* ---- /proc sampling ---------------------------------------------------------------------------
 */
static int read_small_file(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = 0;
    return 0;
}

bool proc_cpu_us(int pid, uint64_t *user_us, uint64_t *sys_us, uint64_t *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    if (read_small_file(path, buf, sizeof buf) < 0)
        return false;
    /* Fields after the ")" ending the command name: state is field 3, utime 14, stime 15,
     * starttime 22. */
    char *p = strrchr(buf, ')');
    if (!p)
        return false;
    unsigned long long ut, st, t0;
    if (sscanf(p + 2,
               "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d %*d %*d %*d %*d %llu",
               &ut, &st, &t0) != 3)
        return false;
    *start = t0;
    long hz = sysconf(_SC_CLK_TCK);
    if (hz <= 0)
        hz = 100;
    *user_us = (uint64_t)ut * 1000000 / (uint64_t)hz;
    *sys_us = (uint64_t)st * 1000000 / (uint64_t)hz;
    return true;
}

long proc_rss_kb(int pid)
{
    /* smaps_rollup sums the page tables: exact. VmRSS in status is kept in per-thread
     * counters that are folded in lazily, so it can be off by hundreds of KiB in a
     * multi-threaded server — as much as what a few thousand connections cost. */
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/smaps_rollup", pid);
    if (read_small_file(path, buf, sizeof buf) >= 0) {
        char *p = strstr(buf, "\nRss:");
        if (p)
            return strtol(p + 5, NULL, 10);
    }
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    if (read_small_file(path, buf, sizeof buf) < 0)
        return -1;
    char *p = strstr(buf, "\nVmRSS:");
    if (!p)
        return -1;
    return strtol(p + 7, NULL, 10);
}

long proc_fd_count(int pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", pid);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    long n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

struct cpu_sample cpu_sample_take(int pid)
{
    struct cpu_sample s = {0};
    if (pid > 0)
        s.ok = proc_cpu_us(pid, &s.user_us, &s.sys_us, &s.start);
    return s;
}

bool cpu_same_process(const struct cpu_sample *a, const struct cpu_sample *b)
{
    return a->ok && b->ok && a->start == b->start && b->user_us >= a->user_us &&
           b->sys_us >= a->sys_us;
}

/* ---- mark file ----------------------------------------------------------------------------------
 */
static int mark_fd = -1;

void mark_open(const char *path)
{
    if (!path)
        return;
    mark_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (mark_fd < 0) {
        fprintf(stderr, "cport-bench: cannot open --mark-file %s: %s\n", path, strerror(errno));
        exit(2);
    }
}

void mark_write(const char *what)
{
    mark_write_at(what, now_ns());
}

void mark_write_at(const char *what, int64_t t)
{
    if (mark_fd < 0)
        return;
    char line[96];
    int n = snprintf(line, sizeof line, "%s %" PRId64 "\n", what, t);
    if (write(mark_fd, line, (size_t)n) != n)
        fprintf(stderr, "cport-bench: writing the mark file failed\n");
}

/* ---- results
 * ------------------------------------------------------------------------------------- */
enum { MAX_RES = 64 };

static struct {
    char key[40];
    char val[64];
    bool quote;
} res[MAX_RES];
static int nres;

static void res_put(const char *key, bool quote, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void res_put(const char *key, bool quote, const char *fmt, ...)
{
    if (nres == MAX_RES)
        return;
    snprintf(res[nres].key, sizeof res[nres].key, "%s", key);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(res[nres].val, sizeof res[nres].val, fmt, ap);
    va_end(ap);
    res[nres].quote = quote;
    nres++;
}

void res_str(const char *key, const char *v)
{
    res_put(key, true, "%s", v);
}

void res_int(const char *key, int64_t v)
{
    res_put(key, false, "%" PRId64, v);
}

void res_num(const char *key, double v, int decimals)
{
    if (!isfinite(v))
        v = 0;
    res_put(key, false, "%.*f", decimals, v);
}

void res_print(bool json)
{
    if (json) {
        printf("{");
        for (int i = 0; i < nres; i++)
            printf(res[i].quote ? "%s\"%s\":\"%s\"" : "%s\"%s\":%s", i ? "," : "", res[i].key,
                   res[i].val);
        printf("}\n");
    } else {
        printf("RESULT");
        for (int i = 0; i < nres; i++)
            printf(" %s=%s", res[i].key, res[i].val);
        printf("\n");
    }
    fflush(stdout);
}

static FILE *say_stream;

void set_say_stream(bool json)
{
    say_stream = json ? stderr : stdout;
}

void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(say_stream ? say_stream : stdout, fmt, ap);
    va_end(ap);
}

/* ---- the measured window ------------------------------------------------------------------------
 */
/* Sleeps until the monotonic time t (ns), stop or no stop. */
static void sleep_through(int64_t t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000), .tv_nsec = (long)(t % 1000000000)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

/* How far ahead of its publication a window edge lies: see publish_edge(). */
enum { EDGE_MARGIN_NS = 2000000 };

/* Samples the server's CPU into *cpu and publishes *edge (the window's start or end) just
 * after, a little ahead of now; returns it once it has passed. The edges are where the CPU
 * was sampled (each EDGE_MARGIN_NS and half a sample's read later, the same at both ends),
 * however late the main thread woke: planned edges with samples taken when it woke up left
 * the CPU of that delay (the whole warm-up's load, or the drain) out or in. A worker reads
 * the clock, then loads the edge: one that still loads the old value (INT64_MAX, not yet)
 * loaded it before the edge was stored, so its completion came before the edge, unless this
 * thread was descheduled for longer than the margin right here. */
static int64_t publish_edge(const struct opts *o, _Atomic int64_t *edge, struct cpu_sample *cpu,
                            const char *mark)
{
    *cpu = cpu_sample_take(o->server_pid);
    int64_t t = now_ns() + EDGE_MARGIN_NS;
    atomic_store(edge, t);
    sleep_through(t);
    mark_write_at(mark, t);
    return t;
}

void window_run(const struct opts *o, struct window *w, uint64_t (*progress)(void *), void *arg,
                const char *unit)
{
    bool tty = isatty(STDOUT_FILENO) && !o->json;
    int64_t t_start = w->t0 + (int64_t)(o->warmup * 1e9), t_end = INT64_MAX;
    int64_t next_tick = w->t0 + 1000000000;
    uint64_t last_ops = 0;
    int64_t last_t = w->t0;
    bool started = false;
    for (;;) {
        int64_t target = next_tick;
        if (!started && t_start < target)
            target = t_start;
        if (t_end < target)
            target = t_end;
        if (!sleep_until(target))
            break; /* interrupted: the window ends now */
        int64_t now = now_ns();
        if (!started && now >= t_start) {
            t_start = publish_edge(o, &w->start, &w->cpu0, "start");
            t_end = t_start + (int64_t)(o->secs * 1e9);
            started = true;
        }
        if (now >= t_end)
            break;
        if (now >= next_tick) {
            if (tty) {
                uint64_t ops = progress(arg);
                double rate = (double)(ops - last_ops) * 1e9 / (double)(now - last_t);
                printf("%6.1fs %-7s %s/s %.0f\n", (double)(now - w->t0) / 1e9,
                       started ? "measure" : "warm-up", unit, rate);
                fflush(stdout);
                last_ops = ops;
                last_t = now;
            }
            next_tick += 1000000000;
        }
    }
    /* The end is decided: a signal from now on ends the drain (before the mark file says
     * "end"). */
    __atomic_store_n(&cb_window_over, 1, __ATOMIC_RELAXED);
    if (started) {
        t_end = publish_edge(o, &w->end, &w->cpu1, "end");
        w->secs = (double)(t_end - t_start) / 1e9;
    } else { /* interrupted in the warm-up: nothing counted (the start is INT64_MAX) */
        int64_t t = now_ns() + EDGE_MARGIN_NS;
        atomic_store(&w->end, t);
        sleep_through(t);
        w->secs = 0;
    }
}

void report_server_cpu(const struct opts *o, const struct window *w, uint64_t ops, const char *per)
{
    if (o->server_pid <= 0)
        return;
    if (!cpu_same_process(&w->cpu0, &w->cpu1)) {
        if (w->cpu0.ok) /* gone, or the pid names another process now */
            say("server CPU: process %d exited during the window; not measured\n", o->server_pid);
        else
            say("server CPU: could not read /proc/%d/stat\n", o->server_pid);
        res_int("server_pid", o->server_pid);
        res_int("server_cpu_ok", 0);
        return;
    }
    uint64_t u = w->cpu1.user_us - w->cpu0.user_us, s = w->cpu1.sys_us - w->cpu0.sys_us;
    double upo = ops ? (double)u / (double)ops : 0, spo = ops ? (double)s / (double)ops : 0;
    double pct = w->secs > 0 ? (double)(u + s) / (w->secs * 1e4) : 0;
    say("server CPU: %.1f%% of one core; per %s: user %.3f us, system %.3f us\n", pct, per, upo,
        spo);
    char k1[48], k2[48];
    snprintf(k1, sizeof k1, "server_user_us_per_%s", per);
    snprintf(k2, sizeof k2, "server_sys_us_per_%s", per);
    res_int("server_pid", o->server_pid);
    res_int("server_cpu_ok", 1);
    res_int("server_user_us", (int64_t)u);
    res_int("server_sys_us", (int64_t)s);
    res_num("server_cpu_pct", pct, 1);
    res_num(k1, upo, 4);
    res_num(k2, spo, 4);
}

void report_latency(const struct hist *h, const char *label)
{
    double p50 = (double)hist_quantile(h, 0.50) / 1e3, p99 = (double)hist_quantile(h, 0.99) / 1e3;
    double p999 = (double)hist_quantile(h, 0.999) / 1e3, mx = (double)h->max / 1e3;
    double mean = h->count ? (double)h->sum / (double)h->count / 1e3 : 0;
    say("%s (us): p50 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  mean %.1f  (%" PRIu64 " samples)\n",
        label, p50, p99, p999, mx, mean, h->count);
    res_num("p50_us", p50, 1);
    res_num("p99_us", p99, 1);
    res_num("p999_us", p999, 1);
    res_num("max_us", mx, 1);
    res_num("mean_us", mean, 1);
}

double jain_index(const uint64_t *x, size_t n)
{
    double s = 0, s2 = 0;
    for (size_t i = 0; i < n; i++) {
        s += (double)x[i];
        s2 += (double)x[i] * (double)x[i];
    }
    return s2 > 0 ? s * s / ((double)n * s2) : 0;
}
