/* Internal view of the thread pool, shared by pool.c (workers, work items, bindings) and
 * timer.c (timers). */
#ifndef CPORT_POOL_INTERNAL_H
#define CPORT_POOL_INTERNAL_H

#include "cport/pool.h"
#include "sync.h"
#include "timer_heap.h"

#include <pthread.h>
#include <stdbool.h>

typedef struct cp__work_item {
    struct cp__work_item *next; /* free list */
    cp_work_fn fn;
    void *arg;
} cp__work_item;

struct cp_pool {
    cp_port *port;
    pthread_t *threads;
    unsigned nthreads;
    void (*thread_start)(void *arg); /* run first on each worker (may be NULL) */
    void *thread_start_arg;
    unsigned batch;
    void (*on_discard)(cp_work_fn fn, void *arg);
    bool stopping;   /* destroy has begun (atomic) */
    bool cancelling; /* ...and queued items are discarded (atomic) */

    cp__lock items_lock; /* work item lookaside list */
    cp__work_item *free_items;
    void *item_blocks;

    cp__lock tlock; /* everything about timers below */
    cp__timer_heap theap;
    cp_timer *timers; /* every live timer record */
    uint32_t tseq;    /* futex word: bumped when the timer thread must look again */
    bool timer_thread_running;
    bool timer_stop;
    pthread_t timer_thread;
};

/* cp_pool_create(), plus thread_start(arg), run on each worker as it starts, before it
 * takes any completion (the server marks its workers with it). */
int cp__pool_create_marked(cp_pool **poolp, const cp_pool_options *opts,
                           void (*thread_start)(void *arg), void *arg);

/* Post fn(arg) as a work item even while stopping (timers use it). */
int cp__pool_post(cp_pool *pool, cp_work_fn fn, void *arg);

/* Timer side of the pool (timer.c). */
void cp__timer_fire(void *timer);        /* a timer's work item */
void cp__timer_discard(void *timer);     /* ...dropped at destroy */
void cp__timers_shutdown(cp_pool *pool); /* stop the thread, cancel all */
void cp__timers_free(cp_pool *pool);     /* free every record */
/* Post every timer due at `now` (ns, cp__now_ns()'s clock) as the timer thread does, and
 * return the next deadline (-1: none). For tests, which pass the time they want. */
int64_t cp__timers_fire_due(cp_pool *pool, int64_t now);

#endif
