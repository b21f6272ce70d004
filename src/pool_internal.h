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

/* Whether the calling thread is one of the workers `ids` names: a callback, which must not
 * destroy what it runs on (cp_pool_destroy, and the server, from its copy of the ids, which
 * outlives the pool). */
static inline bool cp__pool_thread_in(const pthread_t *ids, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        if (pthread_equal(ids[i], pthread_self()))
            return true;
    return false;
}

/* Post fn(arg) as a work item even while stopping (timers use it). */
int cp__pool_post(cp_pool *pool, cp_work_fn fn, void *arg);

/* Timer side of the pool (timer.c). */
void cp__timer_fire(void *timer);        /* a timer's work item */
void cp__timer_discard(void *timer);     /* ...dropped at destroy */
void cp__timers_shutdown(cp_pool *pool); /* stop the thread, cancel all */
void cp__timers_free(cp_pool *pool);     /* free every record */

#endif
