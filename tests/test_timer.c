/* Tests of the pool's timers (src/timer.c): never early, periodic schedule, cancel
 * semantics (won't run / is running / wait), cancel from inside the callback, destroy with
 * live timers. */
#include "harness.h"

#include "cport.h"
#include "pool_internal.h" /* cp__timers_fire_due: the timer thread's pass at a chosen time */
#include "timer_heap.h"

#include <errno.h>
#include <pthread.h>
#include <dirent.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static cp_pool *make_pool(unsigned concurrency, unsigned threads)
{
    cp_pool_options o = {.concurrency = concurrency, .threads = threads};
    cp_pool *p;
    CHECK_OK(cp_pool_create(&p, &o));
    return p;
}

static void wait_until(int *counter, int value)
{
    for (int64_t t0 = cpt_now_ms(); __atomic_load_n(counter, __ATOMIC_SEQ_CST) < value;) {
        CHECK(cpt_now_ms() - t0 < 20000);
        sched_yield();
    }
}

typedef struct fire_log {
    int n;
    int64_t at[16];
} fire_log;

static void log_fire(void *arg)
{
    fire_log *l = arg;
    int i = __atomic_load_n(&l->n, __ATOMIC_SEQ_CST);
    if (i < 16)
        l->at[i] = cpt_now_ns();
    __atomic_store_n(&l->n, i + 1, __ATOMIC_SEQ_CST);
}

TEST(one_shot_never_early)
{
    cp_pool *pool = make_pool(1, 1);
    fire_log l = {0};
    cp_timer *t;
    int64_t start = cpt_now_ns();
    CHECK_OK(cp_timer_start(pool, &t, 30, 0, log_fire, &l));
    wait_until(&l.n, 1);
    CHECK(l.at[0] - start >= 30 * 1000000LL);
    CHECK_EQ(cp_timer_cancel(t, true), 0); /* releases the fired one-shot */
    cp_pool_destroy(pool, CP_POOL_DRAIN);
    CHECK_EQ(l.n, 1);
}

TEST(periodic_schedule_never_early)
{
    cp_pool *pool = make_pool(1, 1);
    fire_log l = {0};
    cp_timer *t;
    int64_t start = cpt_now_ns();
    CHECK_OK(cp_timer_start(pool, &t, 20, 10, log_fire, &l));
    wait_until(&l.n, 5);
    CHECK_EQ(cp_timer_cancel(t, true), 0);
    int fired = __atomic_load_n(&l.n, __ATOMIC_SEQ_CST);
    for (int i = 0; i < 5; i++)
        CHECK(l.at[i] - start >= (20 + 10 * (int64_t)i) * 1000000LL); /* each due time kept */
    cp_pool_destroy(pool, CP_POOL_DRAIN);
    CHECK_EQ(l.n, fired); /* nothing after cancel returned */
}

/* A periodic timer that fires late skips the periods it missed and keeps its schedule: the
 * next due time is the first one on the schedule after now, one firing per pass however
 * late. Counted exactly, on a clock the test sets: the timer is due in an hour (the timer
 * thread never fires it) and the test runs the timer thread's pass itself at chosen times.
 * A catch-up that skipped one period too many (or too few) was caught by no test: the
 * tests on the real clock only check that firings are never early. */
typedef struct stall_ctx {
    int n;       /* firings started */
    int hold_at; /* this firing waits for release */
    int release;
} stall_ctx;

static void stall_fire(void *arg)
{
    stall_ctx *x = arg;
    if (__atomic_add_fetch(&x->n, 1, __ATOMIC_SEQ_CST) == x->hold_at)
        wait_until(&x->release, 1);
}

TEST(periodic_catch_up_skips_exactly_the_missed_periods)
{
    cp_pool *pool = make_pool(1, 1);
    stall_ctx x = {.hold_at = 4};
    cp_timer *t;
    const int64_t p = 10 * 1000000LL; /* 10 ms */
    CHECK_OK(cp_timer_start(pool, &t, 3600 * 1000, 10, stall_fire, &x));
    int64_t due = cp__timers_fire_due(pool, 0); /* nothing due: the first due time */
    CHECK(due > cpt_now_ns());
    CHECK_EQ(cp__timers_fire_due(pool, due - 1), due); /* not yet */
    /* On time: one firing, the next one period on. */
    CHECK_EQ(cp__timers_fire_due(pool, due), due + p);
    wait_until(&x.n, 1);
    /* 3.5 periods late: one firing; the 3 missed are skipped, the schedule stays. */
    CHECK_EQ(cp__timers_fire_due(pool, due + 4 * p + p / 2), due + 5 * p);
    wait_until(&x.n, 2);
    /* A million periods late, exactly on a due time: one firing, the next one period on. */
    CHECK_EQ(cp__timers_fire_due(pool, due + 1000005 * p), due + 1000006 * p);
    wait_until(&x.n, 3);
    /* Almost two periods late: one skipped. */
    CHECK_EQ(cp__timers_fire_due(pool, due + 1000008 * p - 1), due + 1000008 * p);
    wait_until(&x.n, 4); /* held: the worker is busy */
    /* The next firing is queued behind it; then one more period passes while it waits: that
     * one is skipped (no pile-up), the schedule still moves on. */
    CHECK_EQ(cp__timers_fire_due(pool, due + 1000008 * p), due + 1000009 * p);
    CHECK_EQ(cp__timers_fire_due(pool, due + 1000011 * p + 1), due + 1000012 * p);
    __atomic_store_n(&x.release, 1, __ATOMIC_SEQ_CST);
    wait_until(&x.n, 5);
    CHECK_EQ(cp_timer_cancel(t, true), 0);
    cp_pool_destroy(pool, CP_POOL_DRAIN);
    CHECK_EQ(x.n, 5); /* one firing per pass that found none queued */
}

TEST(cancel_before_due_never_runs)
{
    /* One worker: firings run in due order, so the witness running proves the cancelled
     * timer (due earlier) would have run by now if it had been posted. */
    cp_pool *pool = make_pool(1, 1);
    fire_log cancelled = {0}, witness = {0};
    cp_timer *a, *w;
    CHECK_OK(cp_timer_start(pool, &a, 40, 0, log_fire, &cancelled));
    CHECK_OK(cp_timer_start(pool, &w, 80, 0, log_fire, &witness));
    CHECK_EQ(cp_timer_cancel(a, false), 0);
    wait_until(&witness.n, 1);
    CHECK_EQ(cancelled.n, 0);
    CHECK_EQ(cp_timer_cancel(w, false), 0);
    cp_pool_destroy(pool, CP_POOL_DRAIN);
    CHECK_EQ(cancelled.n, 0);
}

typedef struct slow_ctx {
    int started;
    int release;
    int finished;
} slow_ctx;

static void slow_fire(void *arg)
{
    slow_ctx *s = arg;
    __atomic_store_n(&s->started, 1, __ATOMIC_SEQ_CST);
    wait_until(&s->release, 1);
    __atomic_store_n(&s->finished, 1, __ATOMIC_SEQ_CST);
}

TEST(cancel_reports_running_callback)
{
    cp_pool *pool = make_pool(2, 2);
    slow_ctx s = {0};
    cp_timer *t;
    CHECK_OK(cp_timer_start(pool, &t, 1, 0, slow_fire, &s));
    wait_until(&s.started, 1);
    CHECK_EQ(cp_timer_cancel(t, false), 1); /* running now: it will still complete */
    CHECK_EQ(s.finished, 0);
    __atomic_store_n(&s.release, 1, __ATOMIC_SEQ_CST);
    wait_until(&s.finished, 1);
    cp_pool_destroy(pool, CP_POOL_DRAIN);
}

static void *release_later(void *arg)
{
    slow_ctx *s = arg;
    /* Give cancel a chance to start waiting; correctness does not depend on it. */
    for (int i = 0; i < 1000; i++)
        sched_yield();
    __atomic_store_n(&s->release, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

TEST(cancel_wait_waits_for_running_callback)
{
    cp_pool *pool = make_pool(2, 2);
    slow_ctx s = {0};
    cp_timer *t;
    CHECK_OK(cp_timer_start(pool, &t, 1, 0, slow_fire, &s));
    wait_until(&s.started, 1);
    pthread_t th;
    CHECK_OK(-pthread_create(&th, NULL, release_later, &s));
    CHECK_EQ(cp_timer_cancel(t, true), 0);
    CHECK_EQ(s.finished, 1); /* it finished before cancel returned */
    pthread_join(th, NULL);
    cp_pool_destroy(pool, CP_POOL_DRAIN);
}

typedef struct self_ctx {
    cp_timer *t;
    int result;
    int done;
    int calls; /* firings started */
} self_ctx;

static void cancel_self(void *arg)
{
    self_ctx *x = arg;
    /* From inside its own callback cancel must not wait for itself. */
    x->result = cp_timer_cancel(x->t, true);
    __atomic_store_n(&x->done, 1, __ATOMIC_SEQ_CST);
}

TEST(cancel_from_own_callback)
{
    cp_pool *pool = make_pool(1, 1);
    self_ctx x = {0};
    CHECK_OK(cp_timer_start(pool, &x.t, 5, 5, cancel_self, &x));
    wait_until(&x.done, 1);
    CHECK_EQ(x.result, 1);
    cp_pool_destroy(pool, CP_POOL_DRAIN);
    CHECK_EQ(x.done, 1);
}

TEST(destroy_with_live_timers)
{
    cp_pool *pool = make_pool(1, 2);
    fire_log l = {0};
    cp_timer *t1, *t2;
    CHECK_OK(cp_timer_start(pool, &t1, 1, 1, log_fire, &l));
    CHECK_OK(cp_timer_start(pool, &t2, 100000, 0, log_fire, &l));
    wait_until(&l.n, 2);
    cp_pool_destroy(pool, CP_POOL_CANCEL); /* frees both records; ASan/valgrind check it */
    int n = __atomic_load_n(&l.n, __ATOMIC_SEQ_CST);
    for (int i = 0; i < 2000; i++)
        sched_yield();
    CHECK_EQ(__atomic_load_n(&l.n, __ATOMIC_SEQ_CST), n);
}

/* The pool's timer thread runs no caller code: it blocks every signal, whichever thread
 * started it (here one that blocks none), so that a process-directed signal never lands
 * on it (a handler there could not take the locks it holds). The workers run the caller's
 * code and keep the mask of the thread that created the pool. Both are named. */
TEST(the_timer_thread_blocks_every_signal_and_the_workers_keep_the_creators_mask)
{
    sigset_t none, old;
    sigemptyset(&none);
    CHECK_EQ(pthread_sigmask(SIG_SETMASK, &none, &old), 0);
    cp_pool *pool = make_pool(1, 2);
    fire_log l = {0};
    cp_timer *t;
    CHECK_OK(cp_timer_start(pool, &t, 1, 0, log_fire, &l));
    wait_until(&l.n, 1);
    bool all, no;
    CHECK_EQ(cpt_threads_named("cport-timer", &all, &no), 1);
    CHECK(all);
    CHECK_EQ(cpt_threads_named("cport-worker", &all, &no), 2);
    CHECK(no);
    CHECK_EQ(cp_timer_cancel(t, true), 0);
    cp_pool_destroy(pool, CP_POOL_DRAIN);
    CHECK_EQ(cpt_threads_named("cport-timer", &all, &no), 0); /* joined */
    CHECK_EQ(pthread_sigmask(SIG_SETMASK, &old, NULL), 0);
}

TEST(timer_argument_errors)
{
    cp_pool *pool = make_pool(1, 1);
    cp_timer *t;
    CHECK_EQ(cp_timer_start(pool, &t, 1, 0, NULL, NULL), -EINVAL);
    CHECK_EQ(cp_timer_start(NULL, &t, 1, 0, log_fire, NULL), -EINVAL);
    CHECK_EQ(cp_timer_cancel(NULL, false), -EINVAL);
    cp_pool_destroy(pool, CP_POOL_DRAIN);
}

/* cp_timer_cancel(t, wait=true) from the timer's own callback returns at once, also when a
 * later firing of the periodic timer has started on another worker meanwhile (the first
 * firing is slow). It used to recognise only the last firing's thread as "itself", and
 * then waited for its own firing to end: forever. */
static void slow_first_firing_cancels(void *arg)
{
    self_ctx *x = arg;
    if (__atomic_add_fetch(&x->calls, 1, __ATOMIC_SEQ_CST) != 1)
        return;
    /* Later firings (every 10 ms) start on the other workers meanwhile. */
    while (__atomic_load_n(&x->calls, __ATOMIC_SEQ_CST) < 3)
        sched_yield();
    x->result = cp_timer_cancel(x->t, true);
    __atomic_store_n(&x->done, 1, __ATOMIC_SEQ_CST);
}

TEST(cancel_from_own_callback_while_a_later_firing_runs)
{
    cp_pool *pool = make_pool(2, 4);
    self_ctx x = {0};
    CHECK_OK(cp_timer_start(pool, &x.t, 10, 10, slow_first_firing_cancels, &x));
    wait_until(&x.done, 1); /* fails after 20 s if the cancel waits for itself */
    CHECK_EQ(x.result, 1);  /* it is running (the caller's own firing) */
    cp_pool_destroy(pool, CP_POOL_DRAIN);
}

/* ... and with wait == true it waits for that later firing, running on another worker,
 * to end: the caller may free what the callbacks use once cancel returns. (It returned at
 * once, with the other firing still running.) The second firing runs until the main
 * thread, which sees the first inside cancel, lets it go. */
typedef struct overlap_ctx {
    cp_timer *t;
    int calls, in_cancel, release, second_done, second_done_at_return, done, result;
} overlap_ctx;

static void overlapping_firings(void *arg)
{
    overlap_ctx *x = arg;
    int call = __atomic_add_fetch(&x->calls, 1, __ATOMIC_SEQ_CST);
    if (call == 2) {
        while (!__atomic_load_n(&x->release, __ATOMIC_SEQ_CST))
            sched_yield();
        __atomic_store_n(&x->second_done, 1, __ATOMIC_SEQ_CST);
    }
    if (call != 1)
        return;
    while (__atomic_load_n(&x->calls, __ATOMIC_SEQ_CST) < 2) /* the second has started */
        sched_yield();
    __atomic_store_n(&x->in_cancel, 1, __ATOMIC_SEQ_CST);
    x->result = cp_timer_cancel(x->t, true);
    x->second_done_at_return = __atomic_load_n(&x->second_done, __ATOMIC_SEQ_CST);
    __atomic_store_n(&x->done, 1, __ATOMIC_SEQ_CST);
}

TEST(cancel_from_own_callback_waits_for_a_later_firing)
{
    cp_pool *pool = make_pool(2, 2);
    overlap_ctx x = {0};
    CHECK_OK(cp_timer_start(pool, &x.t, 10, 1, overlapping_firings, &x));
    wait_until(&x.in_cancel, 1);
    usleep(20000); /* (only lets a cancel that does not wait return first) */
    __atomic_store_n(&x.release, 1, __ATOMIC_SEQ_CST);
    wait_until(&x.done, 1);
    CHECK_EQ(x.second_done_at_return, 1);
    CHECK_EQ(x.result, 1); /* the caller's own firing runs */
    CHECK_EQ(x.calls, 2);  /* nothing started after the cancel */
    cp_pool_destroy(pool, CP_POOL_DRAIN);
}

/* The deadline heap (src/timer_heap.c, also behind per-operation timeouts) doubles its
 * 32-bit capacity: past 2^31 entries the doubling wrapped to 0, realloc(v, 0) freed the
 * array, and the heap kept the freed pointer (a double free, or a write far past a new
 * empty array). A full heap must refuse the entry and stay intact. The heap here only
 * pretends to hold 2^31 entries: the push never looks at them. */
TEST(a_full_deadline_heap_refuses_an_entry)
{
    cp__timer_entry *fake = malloc(sizeof(*fake));
    CHECK(fake != NULL);
    cp__timer_heap h = {.v = fake, .n = 1u << 31, .cap = 1u << 31};
    uint32_t slot = 0;
    CHECK_EQ(cp__heap_push(&h, &slot, &slot, 1), -ENOMEM);
    CHECK(h.v == fake);
    CHECK_EQ(h.n, 1u << 31);
    CHECK_EQ(slot, 0);
    free(fake);
}

/* Voluntary context switches of every thread of this process so far. */
static long ctx_switches(void)
{
    long total = 0;
    DIR *d = opendir("/proc/self/task");
    CHECK(d != NULL);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], line[128];
        snprintf(path, sizeof(path), "/proc/self/task/%s/status", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue; /* the thread exited */
        while (fgets(line, sizeof(line), f))
            if (strncmp(line, "voluntary_ctxt_switches:", 24) == 0)
                total += atol(line + 24);
        fclose(f);
    }
    closedir(d);
    return total;
}

/* Once a handler closed the pool's port, a periodic timer stops trying to fire: it tried
 * again every millisecond until the pool was destroyed (each try a wake-up of the timer
 * thread). Counted in context switches over 300 ms while the port is closed. */
TEST(timers_stop_trying_once_the_port_is_closed)
{
    cp_pool *pool = make_pool(1, 1);
    fire_log l = {0};
    cp_timer *t;
    CHECK_OK(cp_timer_start(pool, &t, 1, 1, log_fire, &l));
    wait_until(&l.n, 2);
    cp_port_close(cp_pool_port(pool));
    usleep(50000);
    long before = ctx_switches();
    usleep(300000);
    long switches = ctx_switches() - before;
    fprintf(stderr, "%ld context switches in 300 ms with the port closed\n", switches);
    CHECK(switches < 50); /* ~300 when it kept trying */
    cp_pool_destroy(pool, CP_POOL_CANCEL);
}
