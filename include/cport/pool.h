/* cport: a thread pool built on a completion port (the seeds' QueueUserWorkItem,
 * timer-queue timers and BindIoCompletionCallback).
 *
 * A pool owns a port and `threads` worker threads that dequeue from it. At most
 * `concurrency` of them run at once (the port's limit); the pool may have more threads
 * than that (by default twice as many, as seed 003 advises) so that items which block
 * do not stall the pool — an item about to block should bracket the wait with
 * cp_port_block_begin()/cp_port_block_end() on cp_pool_port(pool).
 *
 * Three kinds of work run on the workers:
 *   - work items: cp_pool_submit(fn, arg) from any thread;
 *   - timers: cp_timer_start(), one-shot or periodic, callbacks on the workers;
 *   - I/O completions of sockets associated through cp_pool_associate(): each runs the
 *     socket's binding callback (T3: no hand-written dequeue loop).
 * Do not call cp_port_post() or cp_socket_associate() on a pool's port yourself.
 *
 * Ownership: cp_pool_create() allocates the pool, its port and its threads;
 * cp_pool_destroy() joins the threads and frees everything. Timer records are allocated
 * by the pool (cp_timer_start) and freed by it once cancelled (a one-shot timer that has
 * fired too: see cp_timer_cancel()) and no callback refers to them any more, or by
 * cp_pool_destroy(), after which every cp_timer pointer is invalid. Bindings are the
 * caller's and must outlive the sockets bound to them.
 *
 * Threads: every function may be called from any thread, including a worker, except
 * cp_pool_destroy() (not from a worker). The workers run the caller's code: they start
 * with the signal mask of the thread that calls cp_pool_create() (block the signals the
 * application waits for, e.g. with sigwait(), before creating the pool), and are named
 * "cport-worker" (ps -L, top -H, gdb). The pool's timer thread, started by the first
 * cp_timer_start(), runs none: it blocks every signal, whichever thread started it, and
 * is named "cport-timer".
 *
 * NULL arguments: only where a function's comment allows them (see cport/common.h).
 */
#ifndef CPORT_POOL_H
#define CPORT_POOL_H

#include "cport/port.h"
#include "cport/socket.h"

#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_pool cp_pool;
typedef struct cp_timer cp_timer;

/* A work item or timer callback. */
typedef void (*cp_work_fn)(void *arg);

/* The callback of a bound socket: one call per completion of one of its operations. */
typedef void (*cp_io_fn)(cp_socket *s, cp_op *op, int64_t result, void *user);

/* A socket binding (caller-owned; may be shared by many sockets). The pool uses the
 * socket's key for it (s->key is the binding), and `user` is the same for every socket
 * bound with it: find a socket's own state from s, by embedding the cp_socket in it
 * (CP_CONTAINER_OF), or use one binding per kind of socket. */
typedef struct cp_io_binding {
    cp_io_fn fn;
    void *user;
} cp_io_binding;

/* The most worker threads a pool may have. Each is made at creation, with its stack and
 * records: a count beyond this is a mistake (a negative number cast to unsigned), not a
 * configuration, and would exhaust memory or the process's thread limit before failing. */
#define CP_POOL_THREADS_MAX 4096u

typedef struct cp_pool_options {
    unsigned concurrency; /* items running at once (any value: nothing is made per unit);
                             0 = online CPUs */
    unsigned threads;     /* worker threads; 0 = 2 x concurrency (at least 2, at most
                             CP_POOL_THREADS_MAX); above CP_POOL_THREADS_MAX
                             cp_pool_create() fails with -EINVAL */
    unsigned batch;       /* completions a worker dequeues at once; 0 = 1 (best for CPU-bound
                             items), at most 256 (larger values are taken as 256);
                             servers doing small I/O handlers gain from 16-64 */
    /* Called for each work item discarded by cp_pool_destroy(pool, CP_POOL_CANCEL), so its
     * argument can be freed: on a worker thread (the workers take what is queued while
     * they exit) or, for what they leave, on the destroying thread. May be NULL. */
    void (*on_discard)(cp_work_fn fn, void *arg);
    cp_port_options port; /* options of the pool's port (concurrency is taken from above) */
} cp_pool_options;

/* Create a pool (opts may be NULL for defaults). Returns 0 and stores it in *poolp, or a
 * negative errno (-EINVAL for a NULL poolp or more than CP_POOL_THREADS_MAX threads, port
 * creation errors, -ENOMEM, -EAGAIN if threads could not be started). */
CP_EXTERN int cp_pool_create(cp_pool **poolp, const cp_pool_options *opts);

/* The pool's port: associate sockets with cp_pool_associate(), not directly. */
CP_EXTERN cp_port *cp_pool_port(cp_pool *pool);

/* Number of worker threads. */
CP_EXTERN unsigned cp_pool_threads(const cp_pool *pool);

/* Queue fn(arg) to run on a worker. Any thread, including a running item. No allocation
 * in steady state. Returns 0, -ESHUTDOWN once destroy has begun, -EAGAIN if the port's
 * max_posted items are already queued, -ENOMEM, or -EINVAL (NULL pool or fn). */
CP_EXTERN int cp_pool_submit(cp_pool *pool, cp_work_fn fn, void *arg);

/* Associate socket `fd` with the pool's port; every completion of an operation started
 * on `s` then runs b->fn(s, op, result, b->user) on a worker. Same returns as
 * cp_socket_associate(), and -EINVAL for a NULL pool, b or b->fn. */
CP_EXTERN int cp_pool_associate(cp_pool *pool, cp_socket *s, int fd, const cp_io_binding *b);

/* What cp_pool_destroy() does with work items still queued. */
typedef enum cp_pool_destroy_mode {
    CP_POOL_DRAIN = 0,  /* run every item already queued, then stop */
    CP_POOL_CANCEL = 1, /* run none of them (on_discard sees each), then stop */
} cp_pool_destroy_mode;

/* Stop the pool: from now on cp_pool_submit() fails with -ESHUTDOWN; every timer is
 * cancelled; queued items are run or discarded as `mode` says; the workers exit and are
 * joined; everything is freed. No item or timer callback runs after this returns. Bound
 * sockets must have been closed (and their close completions run) before. Returns 0
 * (also for NULL), -EINVAL (nothing done) for a mode that is neither CP_POOL_DRAIN nor
 * CP_POOL_CANCEL, or -EDEADLK when called from one of the pool's own workers (an item,
 * a timer or an I/O callback, even between cp_port_block_begin and _end): a worker
 * cannot join itself, so nothing is done; destroy the pool from another thread. */
CP_EXTERN int cp_pool_destroy(cp_pool *pool, cp_pool_destroy_mode mode);

/* Start a timer: fn(arg) runs on a worker once `due_ms` milliseconds have passed, then,
 * if period_ms > 0, every period_ms after the previous due time (a late firing does not
 * shift the schedule; it never fires early; a firing is not queued while the previous one
 * has not started, and periods missed meanwhile are skipped, not made up). Stores the
 * timer in *timerp before it can fire (so the callback may read it), and it stays valid
 * until cp_timer_cancel() or cp_pool_destroy() (periodic or not: cancel it to release
 * it). Returns 0, -EINVAL (NULL pool, timerp or fn; due_ms or period_ms above about 146
 * years), -ENOMEM, -EAGAIN (the pool's timer thread could not be started), or
 * -ESHUTDOWN once destroy has begun. Any thread. */
CP_EXTERN int cp_timer_start(cp_pool *pool, cp_timer **timerp, uint64_t due_ms, uint64_t period_ms,
                             cp_work_fn fn, void *arg);

/* Cancel a timer and release it (the pointer is invalid afterwards). No callback of it
 * starts after this returns. Returns 1 if a callback of this timer is running right now
 * (it will complete), or 0 if no callback is running or will run. With wait == true,
 * cancel first waits for the callbacks running on other threads: called from another
 * thread it then returns 0; from one of the timer's own callbacks (a periodic timer's
 * next firing may run on another worker meanwhile) it returns 1, for that callback. A
 * one-shot timer that already fired must still be cancelled to release it; cancel then
 * returns 0. -EINVAL for NULL. Any thread, including the timer's own callback; not after
 * cp_pool_destroy() (which already freed every timer). */
CP_EXTERN int cp_timer_cancel(cp_timer *timer, bool wait);

#ifdef __cplusplus
}
#endif
#endif
