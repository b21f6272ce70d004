/* port_bench: post -> dequeue throughput of cp_port against a classic mutex + condition
 * variable queue, and the voluntary context switches each pays per completion.
 *
 * Loads (1, 2 and 4 consumer threads each; dequeue batches of 1 and 32 for the first two):
 *   prod      one producer thread posts `items` completions as fast as it can (on a full
 *             queue it yields and retries), then closes the queue; the consumers drain it.
 *             The producer is faster than the consumers: the queue stays deep.
 *   pingpong  `tokens` (256) completions circulate: every consumer re-posts each token it
 *             dequeues until the token has made its hops, so the consumers feed themselves
 *             and keep finding work (the case the port's no-wakeup fast path is for).
 *   paced     one producer posts every --gap-ns (2 us), slower than the consumers drain:
 *             every completion may need a sleeping consumer woken. Shown for the cost of
 *             the wakeup path only; the throughput goal does not apply (the producer's pace
 *             sets the rate).
 * The port runs with concurrency = --concurrency (default: online CPUs); the mutex queue
 * has no such limit. Both queues hold at most 65536 entries (the bench sets the port's
 * max_posted to it), take up to `batch` entries per dequeue, and are driven by the same code
 * through a small vtable.
 *
 * Each configuration is calibrated once (one short unmeasured run of each queue) so that
 * the slower queue runs about --target (0.6) seconds; then port and mutex runs alternate
 * (port, mutex, port, mutex, ...) for --rounds (5) rounds and medians are reported. Every
 * completion is checked (key, value and pointer; count and sum per run), so a queue that
 * loses, duplicates or corrupts completions cannot look fast: the run fails instead. A run
 * that takes more than 60 s aborts the program.
 *
 * Context switches and CPU time are counted per thread with getrusage(RUSAGE_THREAD) from
 * the start barrier to the thread's end, summed over producer and consumers. "par" (CPU
 * seconds per wall second) tells whether the threads really ran on both CPUs: on a small
 * machine the scheduler may stack them on one CPU, which makes a one-lock queue faster
 * (no cache-line transfers), so compare configurations with similar par.
 *
 * The port's backend comes from CPORT_BACKEND (io_uring by default). Without --io the
 * port has no I/O handle, so nobody polls the backend and the backend hardly matters;
 * --io associates one idle socket so that a waiting thread polls the backend (as in a
 * server) and the backend's wake path is exercised.
 *
 * Usage: port_bench [--rounds N] [--items N] [--quick] [--load prod|pingpong|paced|all]
 *                   [--gap-ns N] [--tokens N] [--concurrency N] [--target SECONDS] [--io]
 *                   [--consumers N] [--batch N] [--impl port|mutex|both] [--pin] [--verbose]
 * --consumers/--batch/--impl restrict the matrix (for profiling); --pin pins thread i to
 * CPU i % CPUs; --verbose prints every run; --quick is one short round of everything.
 */
#include "cport.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum {
    QUEUE_CAPACITY = 65536, /* both queues (the port's max_posted is set to it) */
    MAX_BATCH = 32,
    RUN_TIMEOUT_S = 60, /* a single run taking longer than this is a hang: abort */
    MAX_ROUNDS = 101,
    ANCHOR_KEY = 0xA11C, /* --io: the key of the idle socket */
};

typedef enum load_kind { LOAD_PROD, LOAD_PINGPONG, LOAD_PACED, LOAD_COUNT } load_kind;

static const char *const load_names[] = {"prod", "pingpong", "paced"};

/* ---- options ---------------------------------------------------------------------------- */

typedef struct options {
    unsigned rounds;
    uint64_t items; /* 0 = calibrate */
    unsigned tokens;
    unsigned concurrency;
    double target_s;
    bool quick;
    bool io;
    bool verbose;       /* print every run */
    bool pin;           /* pin thread i to CPU i % CPUs (reproducible placement) */
    int load;           /* -1 = all */
    unsigned gap_ns;    /* paced: time between two posts */
    unsigned consumers; /* 0 = 1, 2 and 4 */
    unsigned batch;     /* 0 = 1 and 32 */
    unsigned impls;     /* bit 0: port, bit 1: mutex (one alone is for profiling) */
} options;

/* ---- the mutex + condition variable queue ---------------------------------------------- */

/* A bounded ring of (key, value, ptr) entries under one mutex and one condition variable:
 * producers lock, push, signal, unlock; consumers wait while it is empty and take up to
 * `max` entries per lock acquisition (the same batching the port offers). */
typedef struct mutex_queue {
    pthread_mutex_t lock;
    pthread_cond_t nonempty;
    cp_completion *ring;
    uint64_t head, tail; /* free-running; tail - head entries queued */
    uint64_t mask;
    bool closed;
    uint64_t waits; /* times a consumer went to sleep in pthread_cond_wait */
} mutex_queue;

static int mq_create(void **qp, const options *o)
{
    (void)o;
    mutex_queue *q = calloc(1, sizeof(*q));
    if (!q)
        return -ENOMEM;
    q->ring = malloc(sizeof(*q->ring) * QUEUE_CAPACITY);
    if (!q->ring) {
        free(q);
        return -ENOMEM;
    }
    q->mask = QUEUE_CAPACITY - 1;
    pthread_mutex_init(&q->lock, NULL);
    pthread_cond_init(&q->nonempty, NULL);
    *qp = q;
    return 0;
}

static void mq_destroy(void *qv)
{
    mutex_queue *q = qv;
    pthread_cond_destroy(&q->nonempty);
    pthread_mutex_destroy(&q->lock);
    free(q->ring);
    free(q);
}

static int mq_post(void *qv, uintptr_t key, int64_t value, void *ptr)
{
    mutex_queue *q = qv;
    pthread_mutex_lock(&q->lock);
    if (q->closed) {
        pthread_mutex_unlock(&q->lock);
        return -ESHUTDOWN;
    }
    if (q->tail - q->head == QUEUE_CAPACITY) {
        pthread_mutex_unlock(&q->lock);
        return -EAGAIN;
    }
    cp_completion *e = &q->ring[q->tail & q->mask];
    e->key = key;
    e->result = value;
    e->op = ptr;
    q->tail++;
    pthread_cond_signal(&q->nonempty);
    pthread_mutex_unlock(&q->lock);
    return 0;
}

/* Returns the number of entries taken (1..max), or 0 once closed and empty. */
static int mq_dequeue(void *qv, cp_completion *out, unsigned max)
{
    mutex_queue *q = qv;
    pthread_mutex_lock(&q->lock);
    while (q->head == q->tail && !q->closed) {
        q->waits++;
        pthread_cond_wait(&q->nonempty, &q->lock);
    }
    unsigned n = 0;
    while (n < max && q->head != q->tail)
        out[n++] = q->ring[q->head++ & q->mask];
    pthread_mutex_unlock(&q->lock);
    return (int)n;
}

static void mq_close(void *qv)
{
    mutex_queue *q = qv;
    pthread_mutex_lock(&q->lock);
    q->closed = true;
    pthread_cond_broadcast(&q->nonempty);
    pthread_mutex_unlock(&q->lock);
}

static uint64_t mq_sleeps(void *qv)
{
    mutex_queue *q = qv;
    return q->waits;
}

/* ---- the completion port, behind the same interface ------------------------------------ */

typedef struct port_queue {
    cp_port *port;
    bool io;
    int peer;         /* --io: the other end of the idle socket */
    cp_socket anchor; /* --io: associated so that the port keeps a poller */
    cp_op close_op;
} port_queue;

static int pq_create(void **qp, const options *o)
{
    port_queue *q = calloc(1, sizeof(*q));
    if (!q)
        return -ENOMEM;
    cp_port_options po = {.concurrency = o->concurrency, .max_posted = QUEUE_CAPACITY};
    int r = cp_port_create_ex(&q->port, &po);
    if (r < 0) {
        free(q);
        return r;
    }
    q->peer = -1;
    if (o->io) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) {
            r = -errno;
        } else {
            r = cp_socket_associate(&q->anchor, q->port, sv[0], ANCHOR_KEY);
            if (r < 0)
                close(sv[0]);
            else
                q->io = true;
            q->peer = sv[1];
        }
        if (r < 0) {
            if (q->peer >= 0)
                close(q->peer);
            cp_port_close(q->port);
            cp_port_destroy(q->port);
            free(q);
            return r;
        }
    }
    *qp = q;
    return 0;
}

static void pq_destroy(void *qv)
{
    port_queue *q = qv;
    if (q->peer >= 0)
        close(q->peer);
    cp_port_destroy(q->port);
    free(q);
}

static int pq_post(void *qv, uintptr_t key, int64_t value, void *ptr)
{
    port_queue *q = qv;
    return cp_port_post(q->port, key, value, ptr);
}

/* Returns 1..max, or 0 once the port is closed and nothing is left for this thread. With
 * --io, the idle socket's close completion is the signal to close the port. */
static int pq_dequeue(void *qv, cp_completion *out, unsigned max)
{
    port_queue *q = qv;
    for (;;) {
        int n = cp_port_dequeue(q->port, out, max, -1);
        if (n == -ECANCELED)
            return 0;
        if (n < 0) {
            fprintf(stderr, "port_bench: cp_port_dequeue: %s\n", cp_strerror(n));
            exit(1);
        }
        if (!q->io)
            return n;
        int kept = 0;
        for (int i = 0; i < n; i++) {
            if (out[i].key == ANCHOR_KEY && out[i].op == &q->close_op)
                cp_port_close(q->port);
            else
                out[kept++] = out[i];
        }
        if (kept > 0)
            return kept;
    }
}

/* All work is posted (prod) or has finished circulating (pingpong). With --io the socket
 * is closed first and the port closed when its close completion comes out, so that the
 * port is never destroyed with a live association. */
static void pq_close(void *qv)
{
    port_queue *q = qv;
    if (q->io) {
        int r = cp_socket_close(&q->anchor, &q->close_op);
        if (r < 0) {
            fprintf(stderr, "port_bench: cp_socket_close: %s\n", cp_strerror(r));
            exit(1);
        }
    } else {
        cp_port_close(q->port);
    }
}

static uint64_t pq_sleeps(void *qv)
{
    port_queue *q = qv;
    cp_port_stats st;
    cp_port_get_stats(q->port, &st);
    return st.wakeups;
}

typedef struct queue_ops {
    const char *name;
    int (*create)(void **q, const options *o);
    void (*destroy)(void *q);
    int (*post)(void *q, uintptr_t key, int64_t value, void *ptr);
    int (*dequeue)(void *q, cp_completion *out, unsigned max);
    void (*close)(void *q);
    uint64_t (*sleeps)(void *q); /* consumer sleeps: port wakeups / cond waits */
} queue_ops;

static const queue_ops port_ops = {"port",     pq_create, pq_destroy, pq_post,
                                   pq_dequeue, pq_close,  pq_sleeps};
static const queue_ops mutex_ops = {"mutex",    mq_create, mq_destroy, mq_post,
                                    mq_dequeue, mq_close,  mq_sleeps};

/* ---- one run ------------------------------------------------------------------------------ */

/* A slot array gives every completion a pointer to check. */
enum { SLOTS = 64 };
static char slots[SLOTS];

static uintptr_t key_of(int64_t value)
{
    return (uintptr_t)((uint64_t)value * 0x9E3779B97F4A7C15ull) | 1u; /* never ANCHOR_KEY's form */
}

typedef struct run_spec {
    const queue_ops *ops;
    void *q;
    load_kind load;
    unsigned consumers;
    unsigned batch;
    uint64_t items;    /* prod: values 1..items */
    unsigned tokens;   /* pingpong: tokens in flight */
    int64_t hops;      /* pingpong: each token starts at `hops` and is re-posted down to 0 */
    unsigned finished; /* pingpong: tokens that reached 0 (atomic) */
    unsigned gap_ns;   /* paced: time between two posts */
    bool pin;
    pthread_barrier_t start;
} run_spec;

typedef struct thread_stats {
    uint64_t count, bad, full_retries;
    uint64_t sum; /* modulo 2^64 */
    long vcsw, ivcsw;
    double cpu_s;
} thread_stats;

typedef struct worker {
    run_spec *rs;
    pthread_t tid;
    thread_stats st;
    struct rusage ru0;
    double t_begin, t_end; /* CLOCK_MONOTONIC seconds */
    unsigned index;
} worker;

static double tv_s(struct timeval tv)
{
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void worker_begin(worker *w)
{
    if (w->rs->pin) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(w->index % (unsigned)(ncpu > 0 ? ncpu : 1), &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    pthread_barrier_wait(&w->rs->start);
    getrusage(RUSAGE_THREAD, &w->ru0);
    w->t_begin = now_s();
}

static void worker_end(worker *w)
{
    w->t_end = now_s();
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    w->st.vcsw = ru.ru_nvcsw - w->ru0.ru_nvcsw;
    w->st.ivcsw = ru.ru_nivcsw - w->ru0.ru_nivcsw;
    w->st.cpu_s =
        tv_s(ru.ru_utime) + tv_s(ru.ru_stime) - tv_s(w->ru0.ru_utime) - tv_s(w->ru0.ru_stime);
}

static void post_or_die(run_spec *rs, uintptr_t key, int64_t value, void *ptr, thread_stats *st)
{
    for (;;) {
        int r = rs->ops->post(rs->q, key, value, ptr);
        if (r == 0)
            return;
        if (r != -EAGAIN) {
            fprintf(stderr, "port_bench: %s post: %s\n", rs->ops->name, cp_strerror(r));
            exit(1);
        }
        st->full_retries++;
        sched_yield();
    }
}

static void *producer_main(void *arg)
{
    worker *w = arg;
    run_spec *rs = w->rs;
    worker_begin(w);
    double next = w->t_begin, gap = rs->gap_ns / 1e9;
    for (uint64_t v = 1; v <= rs->items; v++) {
        if (rs->load == LOAD_PACED) {
            /* Post on a fixed schedule: consumers drain the queue between posts. */
            next += gap;
            while (now_s() < next)
                ;
        }
        post_or_die(rs, key_of((int64_t)v), (int64_t)v, &slots[v % SLOTS], &w->st);
    }
    rs->ops->close(rs->q);
    worker_end(w);
    return NULL;
}

static void *consumer_main(void *arg)
{
    worker *w = arg;
    run_spec *rs = w->rs;
    cp_completion c[MAX_BATCH];
    worker_begin(w);
    for (;;) {
        int n = rs->ops->dequeue(rs->q, c, rs->batch);
        if (n <= 0)
            break;
        for (int i = 0; i < n; i++) {
            int64_t v = c[i].result;
            w->st.count++;
            w->st.sum += (uint64_t)v;
            if (rs->load != LOAD_PINGPONG) {
                if (c[i].key != key_of(v) || c[i].op != &slots[v % SLOTS])
                    w->st.bad++;
                continue;
            }
            /* pingpong: the key names the token, the pointer is its slot */
            if (c[i].key >= rs->tokens || c[i].op != &slots[c[i].key % SLOTS] || v < 0) {
                w->st.bad++;
                continue;
            }
            if (v > 0)
                post_or_die(rs, c[i].key, v - 1, c[i].op, &w->st);
            else if (__atomic_add_fetch(&rs->finished, 1, __ATOMIC_ACQ_REL) == rs->tokens)
                rs->ops->close(rs->q);
        }
    }
    worker_end(w);
    return NULL;
}

typedef struct run_result {
    double secs;
    uint64_t completions;
    double vcsw, ivcsw, sleeps, full_retries; /* totals */
    double cpu_s;
} run_result;

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "port_bench: a run exceeded its time limit (hang?); aborting\n";
    ssize_t r = write(2, msg, sizeof(msg) - 1);
    (void)r;
    _exit(2);
}

/* 1 + 2 + ... + n, modulo 2^64 */
static uint64_t tri(uint64_t n)
{
    return n % 2 == 0 ? n / 2 * (n + 1) : (n + 1) / 2 * n;
}

static run_result run_once(const queue_ops *ops, const options *o, load_kind load,
                           unsigned consumers, unsigned batch, uint64_t items)
{
    run_spec rs = {.ops = ops,
                   .load = load,
                   .consumers = consumers,
                   .batch = batch,
                   .gap_ns = o->gap_ns,
                   .pin = o->pin};
    int r = ops->create(&rs.q, o);
    if (r < 0) {
        fprintf(stderr, "port_bench: creating the %s queue: %s\n", ops->name, cp_strerror(r));
        exit(1);
    }
    uint64_t expect_count, expect_sum; /* sums are compared modulo 2^64 */
    if (load != LOAD_PINGPONG) {
        rs.items = items;
        expect_count = items;
        expect_sum = tri(items);
    } else {
        rs.tokens = o->tokens;
        uint64_t per = (items + o->tokens - 1) / o->tokens; /* completions per token */
        if (per < 1)
            per = 1;
        rs.hops = (int64_t)per - 1;
        expect_count = per * o->tokens;
        expect_sum = o->tokens * tri((uint64_t)rs.hops);
        thread_stats dummy = {0};
        for (unsigned t = 0; t < o->tokens; t++)
            post_or_die(&rs, t, rs.hops, &slots[t % SLOTS], &dummy);
    }
    unsigned nthreads = consumers + (load != LOAD_PINGPONG ? 1 : 0);
    worker *ws = calloc(nthreads, sizeof(*ws));
    if (!ws) {
        fprintf(stderr, "port_bench: out of memory\n");
        exit(1);
    }
    pthread_barrier_init(&rs.start, NULL, nthreads + 1);
    alarm(RUN_TIMEOUT_S);
    for (unsigned i = 0; i < nthreads; i++) {
        ws[i].rs = &rs;
        ws[i].index = i;
        bool is_producer = load != LOAD_PINGPONG && i == consumers;
        r = pthread_create(&ws[i].tid, NULL, is_producer ? producer_main : consumer_main, &ws[i]);
        if (r != 0) {
            fprintf(stderr, "port_bench: pthread_create: %s\n", strerror(r));
            exit(1);
        }
    }
    pthread_barrier_wait(&rs.start);
    for (unsigned i = 0; i < nthreads; i++)
        pthread_join(ws[i].tid, NULL);
    alarm(0);

    /* From the first worker's start to the last worker's end. */
    double t0 = ws[0].t_begin, t1 = ws[0].t_end;
    for (unsigned i = 1; i < nthreads; i++) {
        t0 = ws[i].t_begin < t0 ? ws[i].t_begin : t0;
        t1 = ws[i].t_end > t1 ? ws[i].t_end : t1;
    }
    run_result res = {.secs = t1 - t0};
    uint64_t bad = 0;
    uint64_t sum = 0;
    for (unsigned i = 0; i < nthreads; i++) {
        res.completions += ws[i].st.count;
        sum += ws[i].st.sum;
        bad += ws[i].st.bad;
        res.vcsw += (double)ws[i].st.vcsw;
        res.ivcsw += (double)ws[i].st.ivcsw;
        res.full_retries += (double)ws[i].st.full_retries;
        res.cpu_s += ws[i].st.cpu_s;
    }
    res.sleeps = (double)ops->sleeps(rs.q);
    if (bad != 0 || res.completions != expect_count || sum != expect_sum) {
        fprintf(stderr,
                "port_bench: %s/%s: CHECK FAILED: %llu completions (expected %llu), %llu bad, "
                "sum %s\n",
                ops->name, load_names[load], (unsigned long long)res.completions,
                (unsigned long long)expect_count, (unsigned long long)bad,
                sum == expect_sum ? "ok" : "wrong");
        exit(1);
    }
    pthread_barrier_destroy(&rs.start);
    ops->destroy(rs.q);
    free(ws);
    return res;
}

/* ---- statistics and reporting -------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double min_of(const double *v, unsigned n)
{
    double m = v[0];
    for (unsigned i = 1; i < n; i++)
        m = v[i] < m ? v[i] : m;
    return m;
}

static double max_of(const double *v, unsigned n)
{
    double m = v[0];
    for (unsigned i = 1; i < n; i++)
        m = v[i] > m ? v[i] : m;
    return m;
}

static double median(const double *v, unsigned n)
{
    double tmp[MAX_ROUNDS];
    memcpy(tmp, v, n * sizeof(*v));
    qsort(tmp, n, sizeof(*tmp), cmp_double);
    return n % 2 ? tmp[n / 2] : (tmp[n / 2 - 1] + tmp[n / 2]) / 2;
}

typedef struct series {
    double mops[MAX_ROUNDS];   /* million completions per second */
    double cs[MAX_ROUNDS];     /* voluntary context switches per completion */
    double ics[MAX_ROUNDS];    /* involuntary context switches per completion */
    double sleeps[MAX_ROUNDS]; /* consumer sleeps per completion */
    double cpu_ns[MAX_ROUNDS]; /* CPU ns (all threads) per completion */
    double par[MAX_ROUNDS];    /* CPU seconds / wall seconds: CPUs kept busy */
    double full[MAX_ROUNDS];   /* post retries on a full queue per completion */
} series;

static void record(series *s, unsigned i, const run_result *r, const char *name, bool verbose)
{
    double n = (double)r->completions;
    s->mops[i] = n / r->secs / 1e6;
    s->cs[i] = r->vcsw / n;
    s->ics[i] = r->ivcsw / n;
    s->sleeps[i] = r->sleeps / n;
    s->cpu_ns[i] = r->cpu_s * 1e9 / n;
    s->par[i] = r->cpu_s / r->secs;
    if (verbose)
        printf("  run %-5s round %u: %7.2f Mops  cs %.5f  ics %.5f  sleeps %.5f  cpu %.0f ns  "
               "par %.2f  full %.5f\n",
               name, i, s->mops[i], s->cs[i], s->ics[i], s->sleeps[i], s->cpu_ns[i], s->par[i],
               s->full[i]);
    s->full[i] = r->full_retries / n;
}

/* "Near zero" context switches: at most one per 100 completions. */
#define NEAR_ZERO_CS 0.01

static uint64_t calibrate(const options *o, load_kind load, unsigned consumers, unsigned batch)
{
    uint64_t probe = o->quick ? 20000 : 200000;
    double slowest = 0;
    const queue_ops *impls[2] = {&port_ops, &mutex_ops};
    for (int i = 0; i < 2; i++) {
        if (!(o->impls & (1u << i)))
            continue;
        run_result r = run_once(impls[i], o, load, consumers, batch, probe);
        double rate = (double)r.completions / r.secs;
        if (slowest == 0 || rate < slowest)
            slowest = rate;
    }
    uint64_t items = (uint64_t)(slowest * o->target_s);
    if (items < probe)
        items = probe;
    return items;
}

/* The machine's load average: a benchmark on a shared or noisy machine should say so. */
static void print_loadavg(const char *when)
{
    char buf[128] = "?";
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (!fgets(buf, sizeof(buf), f))
            strcpy(buf, "?\n");
        fclose(f);
    }
    printf("loadavg %s: %s", when, buf);
}

static void usage(void)
{
    fprintf(stderr, "usage: port_bench [--rounds N] [--items N] [--quick] "
                    "[--load prod|pingpong|paced|all] [--gap-ns N] [--tokens N] [--concurrency N] "
                    "[--target SECONDS] [--io] [--consumers N] [--batch N] "
                    "[--impl port|mutex|both] [--verbose] [--pin]\n");
    exit(2);
}

static uint64_t parse_u64(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || end == s)
        usage();
    return v;
}

int main(int argc, char **argv)
{
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    options o = {.rounds = 5,
                 .tokens = 256,
                 .concurrency = ncpu > 0 ? (unsigned)ncpu : 1,
                 .target_s = 0.6,
                 .load = -1,
                 .gap_ns = 2000,
                 .impls = 3};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--quick") == 0) {
            o.quick = true;
        } else if (strcmp(a, "--io") == 0) {
            o.io = true;
        } else if (strcmp(a, "--verbose") == 0) {
            o.verbose = true;
        } else if (strcmp(a, "--pin") == 0) {
            o.pin = true;
        } else if (!v) {
            usage();
        } else if (strcmp(a, "--rounds") == 0) {
            o.rounds = (unsigned)parse_u64(v), i++;
        } else if (strcmp(a, "--items") == 0) {
            o.items = parse_u64(v), i++;
        } else if (strcmp(a, "--tokens") == 0) {
            o.tokens = (unsigned)parse_u64(v), i++;
        } else if (strcmp(a, "--concurrency") == 0) {
            o.concurrency = (unsigned)parse_u64(v), i++;
        } else if (strcmp(a, "--target") == 0) {
            o.target_s = atof(v), i++;
        } else if (strcmp(a, "--gap-ns") == 0) {
            o.gap_ns = (unsigned)parse_u64(v), i++;
        } else if (strcmp(a, "--consumers") == 0) {
            o.consumers = (unsigned)parse_u64(v), i++;
        } else if (strcmp(a, "--batch") == 0) {
            o.batch = (unsigned)parse_u64(v), i++;
        } else if (strcmp(a, "--impl") == 0) {
            if (strcmp(v, "port") == 0)
                o.impls = 1;
            else if (strcmp(v, "mutex") == 0)
                o.impls = 2;
            else if (strcmp(v, "both") == 0)
                o.impls = 3;
            else
                usage();
            i++;
        } else if (strcmp(a, "--load") == 0) {
            if (strcmp(v, "prod") == 0)
                o.load = LOAD_PROD;
            else if (strcmp(v, "pingpong") == 0)
                o.load = LOAD_PINGPONG;
            else if (strcmp(v, "paced") == 0)
                o.load = LOAD_PACED;
            else if (strcmp(v, "all") == 0)
                o.load = -1;
            else
                usage();
            i++;
        } else {
            usage();
        }
    }
    if (o.quick) {
        if (o.rounds == 5)
            o.rounds = 1;
        o.target_s = 0.05;
    }
    if (o.rounds < 1 || o.rounds > MAX_ROUNDS || o.tokens < 1 || o.tokens > QUEUE_CAPACITY ||
        o.concurrency < 1 || o.target_s <= 0 || o.batch > MAX_BATCH)
        usage();
    signal(SIGALRM, on_alarm);

    /* Which backend the port runs: create one port to ask. */
    cp_port *probe;
    int r = cp_port_create(&probe, o.concurrency);
    if (r < 0) {
        fprintf(stderr, "port_bench: cp_port_create: %s\n", cp_strerror(r));
        return 1;
    }
    const char *backend = cp_port_backend_name(probe);
    cp_port_close(probe);
    cp_port_destroy(probe);

    printf("port_bench: backend=%s concurrency=%u cpus=%ld rounds=%u tokens=%u io=%s pin=%s\n",
           backend, o.concurrency, ncpu, o.rounds, o.tokens, o.io ? "yes" : "no",
           o.pin ? "yes" : "no");
    print_loadavg("at start");
    printf("Mops = million completions/s (median); cs = voluntary context switches per "
           "completion;\nsleeps = consumer sleeps per completion (port wakeups / cond waits); "
           "cpu = CPU ns per completion;\npar = CPU-seconds per wall-second (CPUs kept busy).\n\n");
    printf("%-8s %4s %5s %9s | %7s %7s %6s | %8s %8s %6s %6s | %6s %6s | %4s %4s | %s\n", "load",
           "cons", "batch", "items", "port", "mutex", "ratio", "cs:port", "mutex", "sl:prt",
           "mutex", "cpu:pt", "mutex", "par", "par", "goal");
    fflush(stdout);

    unsigned consumer_counts[] = {1, 2, 4}, ncounts = 3;
    unsigned batches[] = {1, MAX_BATCH}, nbatches = 2;
    if (o.consumers)
        consumer_counts[0] = o.consumers, ncounts = 1;
    if (o.batch)
        batches[0] = o.batch, nbatches = 1;
    unsigned met = 0, total = 0;
    for (int load = 0; load < LOAD_COUNT; load++) {
        if (o.load >= 0 && o.load != load)
            continue;
        for (unsigned bi = 0; bi < nbatches; bi++) {
            /* paced: consumers wait for every completion; batches change nothing */
            if (load == LOAD_PACED && !o.batch && batches[bi] != 1)
                continue;
            for (unsigned ci = 0; ci < ncounts; ci++) {
                unsigned consumers = consumer_counts[ci], batch = batches[bi];
                uint64_t items = o.items ? o.items : calibrate(&o, load, consumers, batch);
                series sp = {0}, sm = {0};
                for (unsigned round = 0; round < o.rounds; round++) {
                    if (o.impls & 1) {
                        run_result rp = run_once(&port_ops, &o, load, consumers, batch, items);
                        record(&sp, round, &rp, "port", o.verbose);
                    }
                    if (o.impls & 2) {
                        run_result rm = run_once(&mutex_ops, &o, load, consumers, batch, items);
                        record(&sm, round, &rm, "mutex", o.verbose);
                    }
                }
                unsigned n = o.rounds;
                double pm = median(sp.mops, n), mm = median(sm.mops, n);
                double pcs = median(sp.cs, n), mcs = median(sm.cs, n);
                double ratio = o.impls == 3 ? pm / mm : 0;
                bool fast = ratio >= 3.0, quiet = pcs <= NEAR_ZERO_CS;
                /* The goal is about consumers that keep finding work; a paced producer
                 * empties the queue on purpose (shown for the wakeup path's cost). */
                bool judged = o.impls == 3 && load != LOAD_PACED;
                const char *goal = !judged         ? "n/a"
                                   : fast && quiet ? "MET"
                                   : fast          ? "no:cs"
                                   : quiet         ? "no:3x"
                                                   : "no";
                met += judged && fast && quiet;
                total += judged;
                printf("%-8s %4u %5u %9llu | %7.2f %7.2f %6.2f | %8.4f %8.4f %6.3f %6.3f | %6.0f "
                       "%6.0f | %4.2f %4.2f | %s\n",
                       load_names[load], consumers, batch, (unsigned long long)items, pm, mm, ratio,
                       pcs, mcs, median(sp.sleeps, n), median(sm.sleeps, n), median(sp.cpu_ns, n),
                       median(sm.cpu_ns, n), median(sp.par, n), median(sm.par, n), goal);
                printf(
                    "RESULT backend=%s io=%d pin=%d load=%s consumers=%u batch=%u concurrency=%u "
                    "items=%llu rounds=%u port_mops=%.3f mutex_mops=%.3f ratio=%.3f "
                    "port_cs=%.5f mutex_cs=%.5f port_ics=%.5f mutex_ics=%.5f "
                    "port_sleeps=%.5f mutex_sleeps=%.5f port_cpu_ns=%.1f mutex_cpu_ns=%.1f "
                    "port_full=%.5f mutex_full=%.5f port_mops_min=%.3f port_mops_max=%.3f "
                    "mutex_mops_min=%.3f mutex_mops_max=%.3f port_par=%.2f mutex_par=%.2f "
                    "goal=%s\n",
                    backend, o.io, o.pin, load_names[load], consumers, batch, o.concurrency,
                    (unsigned long long)items, n, pm, mm, ratio, pcs, mcs, median(sp.ics, n),
                    median(sm.ics, n), median(sp.sleeps, n), median(sm.sleeps, n),
                    median(sp.cpu_ns, n), median(sm.cpu_ns, n), median(sp.full, n),
                    median(sm.full, n), min_of(sp.mops, n), max_of(sp.mops, n), min_of(sm.mops, n),
                    max_of(sm.mops, n), median(sp.par, n), median(sm.par, n), goal);
                fflush(stdout);
            }
        }
    }
    printf("\n");
    print_loadavg("at end");
    printf("goal (port >= 3x mutex and <= %.2f voluntary cs per completion): met in %u of %u "
           "configurations\n",
           NEAR_ZERO_CS, met, total);
    return 0;
}
