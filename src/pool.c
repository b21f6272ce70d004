/* The thread pool: worker threads dequeuing from the pool's port, work items, and socket
 * bindings (see cport/pool.h). Timers live in timer.c. */
#include "pool_internal.h"
#include "port_internal.h"
#include "inject.h"

#include <errno.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

enum { ITEMS_PER_BLOCK = 256, MAX_BATCH = 256 };

typedef struct item_block {
    struct item_block *next;
    cp__work_item items[ITEMS_PER_BLOCK];
} item_block;

static cp__work_item *alloc_item(cp_pool *pool)
{
    cp__lock_acquire(&pool->items_lock);
    if (!pool->free_items) {
        item_block *b = malloc(sizeof(*b));
        if (!b) {
            cp__lock_release(&pool->items_lock);
            return NULL;
        }
        b->next = pool->item_blocks;
        pool->item_blocks = b;
        for (int i = ITEMS_PER_BLOCK - 1; i >= 0; i--) {
            b->items[i].next = pool->free_items;
            pool->free_items = &b->items[i];
        }
    }
    cp__work_item *it = pool->free_items;
    pool->free_items = it->next;
    cp__lock_release(&pool->items_lock);
    return it;
}

static void free_item(cp_pool *pool, cp__work_item *it)
{
    cp__lock_acquire(&pool->items_lock);
    it->next = pool->free_items;
    pool->free_items = it;
    cp__lock_release(&pool->items_lock);
}

int cp__pool_post(cp_pool *pool, cp_work_fn fn, void *arg)
{
    cp__work_item *it = alloc_item(pool);
    if (!it)
        return -ENOMEM;
    it->fn = fn;
    it->arg = arg;
    /* The key names the pool itself: no binding can live at the pool's address. */
    int r = cp_port_post(pool->port, (uintptr_t)pool, 0, it);
    if (r < 0)
        free_item(pool, it);
    return r;
}

int cp_pool_submit(cp_pool *pool, cp_work_fn fn, void *arg)
{
    if (!pool || !fn)
        return -EINVAL;
    if (__atomic_load_n(&pool->stopping, __ATOMIC_ACQUIRE))
        return -ESHUTDOWN;
    if (CP__INJECT_FAIL("pool_submit"))
        return -EAGAIN; /* as when the port's queue is full */
    return cp__pool_post(pool, fn, arg);
}

static void run_item(cp_pool *pool, cp__work_item *it)
{
    cp_work_fn fn = it->fn;
    void *arg = it->arg;
    free_item(pool, it);
    if (!__atomic_load_n(&pool->cancelling, __ATOMIC_ACQUIRE))
        fn(arg);
    else if (fn == cp__timer_fire)
        cp__timer_discard(arg);
    else if (pool->on_discard)
        pool->on_discard(fn, arg);
}

/* Inlined into the workers' loop: once per completion. */
static inline __attribute__((always_inline)) void dispatch(cp_pool *pool, const cp_completion *c)
{
    if (c->key == (uintptr_t)pool) {
        run_item(pool, c->op);
        return;
    }
    const cp_io_binding *b = (const cp_io_binding *)c->key;
    cp_op *op = c->op;
    b->fn(op->cp__h, op, c->result, b->user);
}

static void *worker_main(void *arg)
{
    cp_pool *pool = arg;
    if (pool->thread_start)
        pool->thread_start(pool->thread_start_arg);
    cp_completion c[MAX_BATCH];
    for (;;) {
        int n = cp_port_dequeue(pool->port, c, pool->batch, -1);
        if (n == -ECANCELED)
            break;
        if (n < 0) {
            /* Out of memory for this thread's record (its first dequeue): wait a little
             * and try again rather than spin, and give up once the pool is stopping (the
             * closed port cannot say so while the record cannot be made). */
            if (__atomic_load_n(&pool->stopping, __ATOMIC_ACQUIRE))
                break;
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
            continue;
        }
        for (int i = 0; i < n; i++)
            dispatch(pool, &c[i]);
    }
    return NULL;
}

int cp_pool_create(cp_pool **poolp, const cp_pool_options *opts)
{
    return cp__pool_create_marked(poolp, opts, NULL, NULL);
}

int cp__pool_create_marked(cp_pool **poolp, const cp_pool_options *opts,
                           void (*thread_start)(void *arg), void *arg)
{
    if (!poolp)
        return -EINVAL;
    *poolp = NULL;
    cp_pool_options o = {0};
    if (opts)
        o = *opts;
    if (o.threads > CP_POOL_THREADS_MAX)
        return -EINVAL; /* each is made now: UINT_MAX of them would exhaust memory first */
    if (o.concurrency == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        o.concurrency = n > 0 ? (unsigned)n : 1;
    }
    if (o.threads == 0) {
        /* In 64 bits: twice a concurrency of 2^31 or more wrapped (to 0 or a huge count). */
        uint64_t twice = (uint64_t)o.concurrency * 2;
        o.threads = twice < 2                     ? 2
                    : twice > CP_POOL_THREADS_MAX ? CP_POOL_THREADS_MAX
                                                  : (unsigned)twice;
    }
    if (o.batch == 0)
        o.batch = 1;
    if (o.batch > MAX_BATCH)
        o.batch = MAX_BATCH;
    cp_pool *pool = calloc(1, sizeof(*pool));
    if (!pool)
        return -ENOMEM;
    pool->batch = o.batch;
    pool->on_discard = o.on_discard;
    pool->thread_start = thread_start;
    pool->thread_start_arg = arg;
    cp__lock_init(&pool->items_lock);
    cp__lock_init(&pool->tlock);
    o.port.concurrency = o.concurrency;
    int r = cp_port_create_ex(&pool->port, &o.port);
    if (r < 0) {
        free(pool);
        return r;
    }
    pool->threads = calloc(o.threads, sizeof(*pool->threads));
    if (!pool->threads) {
        cp_port_destroy(pool->port);
        free(pool);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < o.threads; i++) {
        r = pthread_create(&pool->threads[i], NULL, worker_main, pool);
        if (r != 0) {
            r = -r;
            break;
        }
        pthread_setname_np(pool->threads[i], "cport-worker");
        pool->nthreads++;
    }
    if (pool->nthreads < o.threads) {
        cp_pool_destroy(pool, CP_POOL_CANCEL);
        return r;
    }
    *poolp = pool;
    return 0;
}

cp_port *cp_pool_port(cp_pool *pool)
{
    return pool->port;
}

unsigned cp_pool_threads(const cp_pool *pool)
{
    return pool->nthreads;
}

int cp_pool_associate(cp_pool *pool, cp_socket *s, int fd, const cp_io_binding *b)
{
    if (!pool || !b || !b->fn)
        return -EINVAL;
    return cp_socket_associate(s, pool->port, fd, (uintptr_t)b);
}

int cp_pool_destroy(cp_pool *pool, cp_pool_destroy_mode mode)
{
    if (!pool)
        return 0;
    if (mode != CP_POOL_DRAIN && mode != CP_POOL_CANCEL)
        return -EINVAL;
    /* (The pool is alive, so are its workers: no other thread can have one of their ids.) */
    for (unsigned i = 0; i < pool->nthreads; i++)
        if (pthread_equal(pool->threads[i], pthread_self()))
            return -EDEADLK;
    /* Cancelling first: an item that sees submit fail must already see items discarded. */
    if (mode == CP_POOL_CANCEL)
        __atomic_store_n(&pool->cancelling, true, __ATOMIC_RELEASE);
    __atomic_store_n(&pool->stopping, true, __ATOMIC_RELEASE);
    cp__timers_shutdown(pool);
    /* Closing the port lets the workers hand out what is queued, then return -ECANCELED. */
    cp_port_close(pool->port);
    for (unsigned i = 0; i < pool->nthreads; i++)
        pthread_join(pool->threads[i], NULL);
    /* Whatever the exiting workers were not allowed to take is handled here; also when
     * none could take anything, for want of memory for its thread record, and this
     * thread has none either: then straight from the queue (or on_discard would never see
     * those items, and their arguments would leak). */
    cp_completion c;
    for (;;) {
        int n = cp_port_dequeue(pool->port, &c, 1, 0);
        if (n == -ENOMEM)
            n = (int)cp__port_take_closed(pool->port, &c, 1);
        if (n != 1)
            break;
        dispatch(pool, &c);
    }
    cp__timers_free(pool);
    cp_port_destroy(pool->port);
    item_block *b = pool->item_blocks;
    while (b) {
        item_block *next = b->next;
        free(b);
        b = next;
    }
    free(pool->threads);
    free(pool);
    return 0;
}
