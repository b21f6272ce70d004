/* pool_vs_naive: seed 002's thread-pool experiment on Linux.
 *
 * Seed 002 builds a naive thread pool (a semaphore plus a locked list of work items; N
 * threads, any thread takes any item, nothing limits how many run at once) and compares
 * it with the system pool (QueueUserWorkItem, which sits on a completion port: at most
 * one running thread per CPU, the most recently idle thread woken first). It runs 20
 * work items, either CPU-bound (compute(): 20 million rand() calls) or sleep-bound
 * (Sleep(1000)), and prints the total time.
 *
 * Here the naive pool is the seed's, in POSIX terms (sem_t + pthread mutex + list, one
 * malloc'd item per submission), and the system pool is cp_pool (cp_pool_submit). Both
 * get the same number of threads: 2 x the online CPUs (cp_pool's default; seed 003's
 * advice), so the only difference is the completion port's concurrency limit (= CPUs)
 * and LIFO release.
 *
 * Scaled down so that the default run stays under ~10 s on 2 CPUs:
 *   - CPU-bound: compute() runs a rand_r() loop calibrated at start-up to about
 *     --item-ms (150 ms) of CPU per item, instead of 20 million rand() calls. rand_r()
 *     with per-item state rather than rand(): glibc's rand() takes a process-wide lock,
 *     so the naive pool's extra threads would measure lock contention; MSVC's rand(), the
 *     seed's, keeps its state per thread.
 *   - sleep-bound: each item sleeps --item-ms (150 ms) instead of 1000 ms.
 * --quick shrinks both to ~2 ms and the item count to 8 (for valgrind).
 *
 * Printed per pool and load: the total time (the seed's figure), the mean time from
 * submission to an item's end, the most items seen running at once, and the process's
 * voluntary / involuntary context switches during the run (getrusage).
 *
 * Usage: pool_vs_naive [--quick] [--items N] [--item-ms MS] [--threads N]
 */
#include "cport.h"

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, int err)
{
    fprintf(stderr, "pool_vs_naive: %s: %s\n", what, strerror(err < 0 ? -err : err));
    exit(1);
}

/* ---- the work ---------------------------------------------------------------------------- */

static unsigned long compute_iterations; /* calibrated so compute() takes about item_ms */

/* The seed's compute(): a long run of pseudo-random numbers. */
static int compute(unsigned seed)
{
    int x = 0;
    for (unsigned long i = 0; i < compute_iterations; i++)
        x ^= rand_r(&seed);
    return x;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* One experiment: `total` items of one kind submitted at t0; the last one to finish posts
 * `done` (the seed's CompleteEvent). */
typedef struct batch {
    bool sleep_bound;
    unsigned item_ms;
    cp_port *hint_port; /* cp_pool only: bracket sleeps with block_begin/_end on this port */
    double t0;
    unsigned total;
    unsigned left;        /* items not yet finished (atomic) */
    unsigned running;     /* items running right now (atomic) */
    unsigned max_running; /* the most seen at once (atomic) */
    double sum_done;      /* sum over items of (end - t0), under sum_lock */
    pthread_mutex_t sum_lock;
    sem_t done;
    int sink; /* keeps compute() from being optimised away (atomic) */
} batch;

typedef struct item_arg {
    batch *b;
    unsigned index;
} item_arg;

static void work_item(void *arg)
{
    item_arg *ia = arg;
    batch *b = ia->b;
    unsigned now_running = __atomic_add_fetch(&b->running, 1, __ATOMIC_RELAXED);
    unsigned seen = __atomic_load_n(&b->max_running, __ATOMIC_RELAXED);
    while (now_running > seen &&
           !__atomic_compare_exchange_n(&b->max_running, &seen, now_running, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
        ;
    if (b->sleep_bound) {
        /* Linux cannot see that this worker is blocked (Windows' kernel can: a thread
         * that blocks stops counting against its port's concurrency). Without the hint
         * the port still counts this sleeping worker as running, so no more than
         * `concurrency` items could sleep at once and the spare threads would stay
         * parked while the CPUs idle. block_begin lets the port release another worker
         * for the duration; block_end counts this one as running again. */
        if (b->hint_port)
            cp_port_block_begin(b->hint_port);
        sleep_ms(b->item_ms);
        if (b->hint_port)
            cp_port_block_end(b->hint_port);
    } else {
        __atomic_store_n(&b->sink, compute(1u + ia->index), __ATOMIC_RELAXED);
    }
    __atomic_sub_fetch(&b->running, 1, __ATOMIC_RELAXED);
    double end = now_s();
    pthread_mutex_lock(&b->sum_lock);
    b->sum_done += end - b->t0;
    pthread_mutex_unlock(&b->sum_lock);
    if (__atomic_sub_fetch(&b->left, 1, __ATOMIC_ACQ_REL) == 0)
        sem_post(&b->done);
}

/* ---- the naive pool (the seed's THREAD_POOL) ---------------------------------------------- */

typedef void (*work_fn)(void *arg);

typedef struct naive_item {
    struct naive_item *next;
    work_fn fn;
    void *arg;
} naive_item;

typedef struct naive_pool {
    sem_t items; /* one count per queued item (the seed's WorkItemSemaphore) */
    pthread_mutex_t lock;
    naive_item *head, *tail;
    bool quit; /* under lock (the seed's QuitEvent) */
    unsigned nthreads;
    pthread_t *threads;
} naive_pool;

static void *naive_worker(void *arg)
{
    naive_pool *np = arg;
    for (;;) {
        while (sem_wait(&np->items) != 0 && errno == EINTR)
            ;
        pthread_mutex_lock(&np->lock);
        naive_item *it = np->head;
        if (!it) {
            /* Only the quit posts outnumber the items. */
            bool quit = np->quit;
            pthread_mutex_unlock(&np->lock);
            if (quit)
                return NULL;
            continue;
        }
        np->head = it->next;
        if (!np->head)
            np->tail = NULL;
        pthread_mutex_unlock(&np->lock);
        it->fn(it->arg);
        free(it);
    }
}

static void naive_create(naive_pool *np, unsigned nthreads)
{
    memset(np, 0, sizeof(*np));
    if (sem_init(&np->items, 0, 0) != 0)
        die("sem_init", errno);
    pthread_mutex_init(&np->lock, NULL);
    np->threads = calloc(nthreads, sizeof(*np->threads));
    if (!np->threads)
        die("calloc", ENOMEM);
    for (unsigned i = 0; i < nthreads; i++) {
        int r = pthread_create(&np->threads[i], NULL, naive_worker, np);
        if (r != 0)
            die("pthread_create", r);
        np->nthreads++;
    }
}

static void naive_submit(naive_pool *np, work_fn fn, void *arg)
{
    naive_item *it = malloc(sizeof(*it));
    if (!it)
        die("malloc", ENOMEM);
    it->next = NULL;
    it->fn = fn;
    it->arg = arg;
    pthread_mutex_lock(&np->lock);
    if (np->tail)
        np->tail->next = it;
    else
        np->head = it;
    np->tail = it;
    pthread_mutex_unlock(&np->lock);
    sem_post(&np->items);
}

static void naive_destroy(naive_pool *np)
{
    pthread_mutex_lock(&np->lock);
    np->quit = true;
    pthread_mutex_unlock(&np->lock);
    for (unsigned i = 0; i < np->nthreads; i++)
        sem_post(&np->items);
    for (unsigned i = 0; i < np->nthreads; i++)
        pthread_join(np->threads[i], NULL);
    while (np->head) {
        naive_item *it = np->head;
        np->head = it->next;
        free(it);
    }
    free(np->threads);
    pthread_mutex_destroy(&np->lock);
    sem_destroy(&np->items);
}

/* ---- running one experiment -------------------------------------------------------------- */

typedef enum pool_kind { POOL_NAIVE, POOL_CPORT, POOL_CPORT_NO_HINT } pool_kind;

typedef struct result {
    double total_s, mean_done_s;
    unsigned max_running;
    long vcsw, ivcsw;
} result;

static result run(pool_kind kind, bool sleep_bound, unsigned items, unsigned item_ms,
                  unsigned threads)
{
    naive_pool np;
    cp_pool *pool = NULL;
    if (kind == POOL_NAIVE) {
        naive_create(&np, threads);
    } else {
        cp_pool_options po = {.threads = threads}; /* concurrency: online CPUs */
        int r = cp_pool_create(&pool, &po);
        if (r < 0)
            die("cp_pool_create", r);
    }

    batch b = {.sleep_bound = sleep_bound, .item_ms = item_ms, .total = items, .left = items};
    if (kind == POOL_CPORT)
        b.hint_port = cp_pool_port(pool);
    pthread_mutex_init(&b.sum_lock, NULL);
    if (sem_init(&b.done, 0, 0) != 0)
        die("sem_init", errno);
    item_arg *args = calloc(items, sizeof(*args));
    if (!args)
        die("calloc", ENOMEM);

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    b.t0 = now_s();
    for (unsigned i = 0; i < items; i++) {
        args[i].b = &b;
        args[i].index = i;
        if (kind == POOL_NAIVE) {
            naive_submit(&np, work_item, &args[i]);
        } else {
            int r = cp_pool_submit(pool, work_item, &args[i]);
            if (r < 0)
                die("cp_pool_submit", r);
        }
    }
    while (sem_wait(&b.done) != 0 && errno == EINTR)
        ;
    double t1 = now_s();
    getrusage(RUSAGE_SELF, &ru1);

    if (kind == POOL_NAIVE)
        naive_destroy(&np);
    else
        cp_pool_destroy(pool, CP_POOL_DRAIN);

    result res = {
        .total_s = t1 - b.t0,
        .mean_done_s = b.sum_done / items,
        .max_running = b.max_running,
        .vcsw = ru1.ru_nvcsw - ru0.ru_nvcsw,
        .ivcsw = ru1.ru_nivcsw - ru0.ru_nivcsw,
    };
    free(args);
    sem_destroy(&b.done);
    pthread_mutex_destroy(&b.sum_lock);
    return res;
}

/* Find how many rand_r() iterations take about `ms` milliseconds on one CPU. */
static void calibrate(unsigned ms)
{
    compute_iterations = 1000000;
    volatile int sink;
    double t;
    for (;;) {
        double t0 = now_s();
        sink = compute(7);
        t = now_s() - t0;
        if (t >= 0.02 || compute_iterations >= (1ul << 40))
            break;
        compute_iterations *= 4;
    }
    (void)sink;
    double per = t / (double)compute_iterations;
    compute_iterations = (unsigned long)((double)ms / 1000.0 / per);
    if (compute_iterations < 1000)
        compute_iterations = 1000;
}

static void usage(void)
{
    fprintf(stderr, "usage: pool_vs_naive [--quick] [--items N] [--item-ms MS] [--threads N]\n");
    exit(2);
}

static unsigned parse_uint(const char *s)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *end || end == s || v == 0 || v > 100000)
        usage();
    return (unsigned)v;
}

int main(int argc, char **argv)
{
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned cpus = ncpu > 0 ? (unsigned)ncpu : 1;
    unsigned items = 20, item_ms = 150, threads = 2 * cpus;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            items = 8;
            item_ms = 2;
        } else if (i + 1 < argc && strcmp(argv[i], "--items") == 0) {
            items = parse_uint(argv[++i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--item-ms") == 0) {
            item_ms = parse_uint(argv[++i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--threads") == 0) {
            threads = parse_uint(argv[++i]);
        } else {
            usage();
        }
    }
    calibrate(item_ms);

    printf("seed 002: %u work items, %u threads in each pool, %u CPUs, cp_pool concurrency %u\n",
           items, threads, cpus, cpus);
    printf("CPU-bound item: %lu rand_r() calls (~%u ms of CPU); sleep-bound item: sleep %u ms\n\n",
           compute_iterations, item_ms, item_ms);
    printf("%-11s %-30s %8s %10s %7s %8s %8s\n", "load", "pool", "total s", "mean end s", "max run",
           "vol cs", "invol cs");

    static const struct {
        pool_kind kind;
        const char *name;
    } pools[] = {
        {POOL_NAIVE, "naive (sem + locked list)"},
        {POOL_CPORT, "cp_pool"},
        {POOL_CPORT_NO_HINT, "cp_pool, no block_begin/_end"},
    };
    for (int load = 0; load < 2; load++) {
        bool sleep_bound = load == 1;
        for (unsigned p = 0; p < sizeof(pools) / sizeof(pools[0]); p++) {
            /* Without a blocking wait the hint makes no difference: one cp_pool row. */
            if (!sleep_bound && pools[p].kind == POOL_CPORT_NO_HINT)
                continue;
            result r = run(pools[p].kind, sleep_bound, items, item_ms, threads);
            printf("%-11s %-30s %8.3f %10.3f %7u %8ld %8ld\n",
                   sleep_bound ? "sleep-bound" : "CPU-bound", pools[p].name, r.total_s,
                   r.mean_done_s, r.max_running, r.vcsw, r.ivcsw);
            fflush(stdout);
        }
    }
    printf("\ntotal s: from the first submission to the last item's end (the seed's figure);\n"
           "mean end s: mean time from the first submission to an item's end;\n"
           "max run: most items running at once; cs: context switches of the whole process.\n");
    return 0;
}
