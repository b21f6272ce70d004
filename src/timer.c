/* Timer-queue timers on the thread pool (see cport/pool.h).
 *
 * A timer thread (started with the pool's first timer) sleeps until the earliest due
 * time in a deadline heap and posts each due timer to the workers as a work item. A
 * record is reference-counted: one reference for the caller's handle, one while it sits
 * in the heap, one per firing queued or running. It is freed when the count reaches zero,
 * so the caller never has to know whether a firing is still in flight.
 *
 * A periodic timer whose previous firing has not started yet is not posted again (no
 * pile-up behind slow workers); missed periods are skipped, keeping the schedule aligned
 * to the first due time.
 */
#include "pool_internal.h"

#include <errno.h>
#include <stdlib.h>

struct cp_timer {
    cp_timer *prev, *next; /* the pool's list of live records */
    cp_pool *pool;
    cp_work_fn fn;
    void *arg;
    int64_t due;
    int64_t period;
    uint32_t heap_slot;
    uint32_t refs;
    uint32_t queued;  /* firings posted, not started */
    uint32_t running; /* firings running now */
    uint32_t idle;    /* futex word: bumped when a firing finishes */
    bool cancelled;
    /* The firings running now, one frame on each one's stack. A periodic timer's next
     * firing may start on another worker while one still runs, so "the thread of the last
     * firing" cannot tell a cancel from inside a callback. */
    struct firing *firings;
};

struct firing {
    pthread_t thread;
    struct firing *next;
};

enum { RETRY_NS = 1000000 }; /* retry a firing the port could not take in 1 ms */

static void unlink_free_locked(cp_pool *pool, cp_timer *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else
        pool->timers = t->next;
    if (t->next)
        t->next->prev = t->prev;
    free(t);
}

static void unref_locked(cp_pool *pool, cp_timer *t)
{
    if (--t->refs == 0)
        unlink_free_locked(pool, t);
}

static void poke_timer_thread_locked(cp_pool *pool)
{
    __atomic_add_fetch(&pool->tseq, 1, __ATOMIC_RELEASE);
    cp__futex_wake(&pool->tseq, 1);
}

/* Post every due timer; returns the next deadline (or -1). Called with tlock held. */
static int64_t fire_due_locked(cp_pool *pool, int64_t now)
{
    const cp__timer_entry *top;
    while ((top = cp__heap_top(&pool->theap)) && top->deadline <= now) {
        cp_timer *t = top->owner;
        cp__heap_remove(&pool->theap, &t->heap_slot);
        if (t->queued == 0) {
            t->refs++;
            t->queued++;
            int r = cp__pool_post(pool, cp__timer_fire, t);
            if (r == -ESHUTDOWN) {
                /* The port was closed: no firing will ever be taken. */
                t->refs--;
                t->queued--;
                unref_locked(pool, t); /* the heap's reference */
                continue;
            }
            if (r < 0) {
                /* The port is full: try again shortly, same firing. */
                t->refs--;
                t->queued--;
                if (cp__heap_push(&pool->theap, t, &t->heap_slot, now + RETRY_NS) < 0)
                    unref_locked(pool, t); /* the heap's reference */
                continue;
            }
        }
        if (t->period > 0) {
            /* The next due time after now on the schedule, in one step (after a long stall a
             * 1 ms timer has missed millions of periods). */
            if (t->due <= now)
                t->due += ((now - t->due) / t->period + 1) * t->period;
            if (cp__heap_push(&pool->theap, t, &t->heap_slot, t->due) == 0)
                continue;
        }
        unref_locked(pool, t); /* one-shot (or no memory to re-arm): leaves the heap */
    }
    top = cp__heap_top(&pool->theap);
    return top ? top->deadline : -1;
}

int64_t cp__timers_fire_due(cp_pool *pool, int64_t now)
{
    cp__lock_acquire(&pool->tlock);
    int64_t next = fire_due_locked(pool, now);
    cp__lock_release(&pool->tlock);
    return next;
}

static void *timer_thread_main(void *arg)
{
    cp_pool *pool = arg;
    cp__lock_acquire(&pool->tlock);
    while (!pool->timer_stop) {
        int64_t next = fire_due_locked(pool, cp__now_ns());
        uint32_t seq = __atomic_load_n(&pool->tseq, __ATOMIC_ACQUIRE);
        cp__lock_release(&pool->tlock);
        /* An absolute deadline: a wakeup before it only leads to another look. */
        cp__futex_wait(&pool->tseq, seq, next);
        cp__lock_acquire(&pool->tlock);
    }
    cp__lock_release(&pool->tlock);
    return NULL;
}

int cp_timer_start(cp_pool *pool, cp_timer **timerp, uint64_t due_ms, uint64_t period_ms,
                   cp_work_fn fn, void *arg)
{
    if (!pool || !timerp || !fn || due_ms > INT64_MAX / 2000000 || period_ms > INT64_MAX / 2000000)
        return -EINVAL;
    if (__atomic_load_n(&pool->stopping, __ATOMIC_ACQUIRE))
        return -ESHUTDOWN;
    cp_timer *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->pool = pool;
    t->fn = fn;
    t->arg = arg;
    t->period = (int64_t)period_ms * 1000000;
    t->due = cp__now_ns() + (int64_t)due_ms * 1000000;
    t->refs = 2; /* the caller's handle and the heap */
    int r = 0;
    /* Published before the timer is armed, so its own callback can use the handle. */
    *timerp = t;
    cp__lock_acquire(&pool->tlock);
    if (pool->timer_stop) {
        r = -ESHUTDOWN;
    } else if (!pool->timer_thread_running) {
        r = cp__thread_start(&pool->timer_thread, "cport-timer", timer_thread_main, pool);
        if (r == 0)
            pool->timer_thread_running = true;
    }
    if (r == 0)
        r = cp__heap_push(&pool->theap, t, &t->heap_slot, t->due);
    if (r < 0) {
        cp__lock_release(&pool->tlock);
        *timerp = NULL;
        free(t);
        return r;
    }
    t->next = pool->timers;
    if (pool->timers)
        pool->timers->prev = t;
    pool->timers = t;
    poke_timer_thread_locked(pool);
    cp__lock_release(&pool->tlock);
    return 0;
}

void cp__timer_fire(void *arg)
{
    cp_timer *t = arg;
    cp_pool *pool = t->pool;
    cp__lock_acquire(&pool->tlock);
    t->queued--;
    if (t->cancelled) {
        unref_locked(pool, t);
        cp__lock_release(&pool->tlock);
        return;
    }
    t->running++;
    struct firing me = {pthread_self(), t->firings};
    t->firings = &me;
    cp_work_fn fn = t->fn;
    void *fnarg = t->arg;
    cp__lock_release(&pool->tlock);

    fn(fnarg);

    cp__lock_acquire(&pool->tlock);
    for (struct firing **f = &t->firings; *f; f = &(*f)->next) {
        if (*f == &me) {
            *f = me.next;
            break;
        }
    }
    t->running--;
    __atomic_add_fetch(&t->idle, 1, __ATOMIC_RELEASE);
    bool waiters = t->cancelled;
    cp__lock_release(&pool->tlock);
    if (waiters)
        cp__futex_wake(&t->idle, INT32_MAX);
    cp__lock_acquire(&pool->tlock);
    unref_locked(pool, t);
    cp__lock_release(&pool->tlock);
}

void cp__timer_discard(void *arg)
{
    cp_timer *t = arg;
    cp_pool *pool = t->pool;
    cp__lock_acquire(&pool->tlock);
    t->queued--;
    unref_locked(pool, t);
    cp__lock_release(&pool->tlock);
}

/* Stop a timer; called with tlock held. */
static void stop_locked(cp_pool *pool, cp_timer *t)
{
    t->cancelled = true;
    if (t->heap_slot) {
        cp__heap_remove(&pool->theap, &t->heap_slot);
        t->refs--; /* the heap's reference; the caller's is dropped by the caller */
    }
}

int cp_timer_cancel(cp_timer *t, bool wait)
{
    if (!t)
        return -EINVAL;
    cp_pool *pool = t->pool;
    cp__lock_acquire(&pool->tlock);
    stop_locked(pool, t);
    /* Called from one of its own callbacks: that one cannot be waited for, but a firing
     * running on another worker (a periodic timer's next one) still must be. */
    uint32_t self = 0;
    for (struct firing *f = t->firings; f; f = f->next)
        self += pthread_equal(f->thread, pthread_self()) != 0;
    while (wait && t->running > self) {
        uint32_t seen = __atomic_load_n(&t->idle, __ATOMIC_ACQUIRE);
        cp__lock_release(&pool->tlock);
        cp__futex_wait(&t->idle, seen, -1);
        cp__lock_acquire(&pool->tlock);
    }
    int running = t->running > 0;
    unref_locked(pool, t); /* the caller's handle: t may be gone now */
    cp__lock_release(&pool->tlock);
    return running;
}

void cp__timers_shutdown(cp_pool *pool)
{
    cp__lock_acquire(&pool->tlock);
    pool->timer_stop = true;
    poke_timer_thread_locked(pool);
    bool join = pool->timer_thread_running;
    pool->timer_thread_running = false;
    /* Records are freed by cp__timers_free() once the workers are gone, whatever their
     * counts say; here they only stop: queued firings see `cancelled` and do nothing. */
    for (cp_timer *t = pool->timers; t; t = t->next) {
        t->cancelled = true;
        cp__heap_remove(&pool->theap, &t->heap_slot);
    }
    cp__lock_release(&pool->tlock);
    if (join)
        pthread_join(pool->timer_thread, NULL);
}

void cp__timers_free(cp_pool *pool)
{
    /* No worker runs any more: whatever records remain belong to handles the caller
     * never cancelled. */
    while (pool->timers) {
        cp_timer *t = pool->timers;
        pool->timers = t->next;
        free(t);
    }
    cp__heap_free(&pool->theap);
}
