/* The completion port: queues of completions, a LIFO stack of parked threads, and the
 * concurrency accounting of Windows' I/O completion port (see cport/port.h).
 *
 * Design in brief:
 *   - Posted completions go into a lock-free bounded ring (ring.h); I/O completions,
 *     which arrive in batches from the backend, into an intrusive FIFO under the lock.
 *   - Fast path: a thread that is still running when it comes back to dequeue and finds
 *     work takes it without the lock and without touching any shared counter, and a post
 *     that finds nobody parked and no poller to wake takes no lock either.
 *   - Slow path, under the lock: a thread that is allowed to run (fewer than
 *     `concurrency` running) takes work, else parks on a LIFO stack. A completion that
 *     arrives while a thread is parked and the limit allows is handed straight to the most
 *     recently parked thread (NT's handoff): the waker moves it into the waiter's output
 *     array and counts the waiter as running before waking it, so nobody can steal it and
 *     the limit is never exceeded.
 *   - Lost wakeups are excluded by pairing every "publish, then look" on one side with a
 *     "publish, then look" on the other (all sequentially consistent): a poster pushes,
 *     then reads nparked/running/polling; a parking thread raises nparked, then re-checks
 *     the queues; a thread leaving the running set lowers `running`, then re-checks.
 *   - When the port has I/O handles, one waiting thread at a time holds the poller role
 *     and waits in the backend (io_uring_enter / epoll_wait) instead of on its futex; the
 *     completions it harvests are queued like any other. With one worker the whole path is
 *     a single thread: no handoff, no extra wakeup. When the poller leaves to run work, a
 *     parked thread is promoted to poll in its place.
 */
#include "handle.h"
#include "inject.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum {
    /* After this many completions taken without polling the backend, a dequeuing thread
     * polls it once without blocking, so a busy queue cannot starve I/O. */
    POLL_EVERY = 64,
    DEFAULT_MAX_POSTED = 16384,
};

/* Threads to wake once the port lock is released: parked records and/or the poller. */
typedef struct wake_list {
    cp__thread *threads;
    bool poller;
} wake_list;

static void record_destructor(void *arg);

static unsigned load_running(cp_port *p)
{
    return __atomic_load_n(&p->running, __ATOMIC_SEQ_CST);
}

static void add_running(cp_port *p, int delta)
{
    __atomic_add_fetch(&p->running, (unsigned)delta, __ATOMIC_SEQ_CST);
}

static bool need_poller(cp_port *p)
{
    return __atomic_load_n(&p->io_handles, __ATOMIC_RELAXED) > 0;
}

static bool have_work(cp_port *p)
{
    return __atomic_load_n(&p->io_queued, __ATOMIC_SEQ_CST) > 0 || cp__ring_count(&p->ring) > 0;
}

/* ---- queues ------------------------------------------------------------------------------ */

static void append_io_locked(cp_port *p, cp_op *head, cp_op *tail, unsigned n)
{
    tail->cp__next = NULL;
    if (p->qtail)
        p->qtail->cp__next = head;
    else
        p->qhead = head;
    p->qtail = tail;
    __atomic_add_fetch(&p->io_queued, n, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&p->completed, n, __ATOMIC_RELAXED);
}

static unsigned take_io_locked(cp_port *p, cp_completion *out, unsigned max)
{
    /* Two passes: unlinking the ops walks a chain of (mostly cold) per-I/O contexts; the
     * handles their completions name are fetched meanwhile, not one miss after the other. */
    unsigned n = 0;
    while (n < max && p->qhead) {
        cp_op *op = p->qhead;
        p->qhead = op->cp__next;
        __builtin_prefetch(op->cp__h);
        out[n++].op = op;
    }
    for (unsigned i = 0; i < n; i++)
        cp__op_to_completion(out[i].op, &out[i]);
    if (!p->qhead)
        p->qtail = NULL;
    if (n)
        __atomic_sub_fetch(&p->io_queued, n, __ATOMIC_SEQ_CST);
    return n;
}

/* I/O completions first (they free kernel resources), then posted ones. */
static unsigned take_any_locked(cp_port *p, cp_completion *out, unsigned max)
{
    unsigned n = take_io_locked(p, out, max);
    if (n < max)
        n += cp__ring_pop(&p->ring, out + n, max - n);
    return n;
}

static unsigned take_unlocked(cp_port *p, cp_completion *out, unsigned max)
{
    unsigned n = 0;
    if (__atomic_load_n(&p->io_queued, __ATOMIC_RELAXED)) {
        cp__lock_acquire(&p->lock);
        n = take_io_locked(p, out, max);
        cp__lock_release(&p->lock);
    }
    if (n < max)
        n += cp__ring_pop(&p->ring, out + n, max - n);
    return n;
}

/* ---- parking and waking -------------------------------------------------------------------- */

static cp__thread *pop_parked_locked(cp_port *p)
{
    cp__thread *w = p->parked;
    p->parked = w->next_parked;
    w->next_parked = NULL;
    w->parked = false;
    __atomic_sub_fetch(&p->nparked, 1, __ATOMIC_SEQ_CST);
    p->wakeups++;
    return w;
}

static void push_parked_locked(cp_port *p, cp__thread *t)
{
    t->next_parked = p->parked;
    t->parked = true;
    p->parked = t;
    __atomic_add_fetch(&p->nparked, 1, __ATOMIC_SEQ_CST);
}

static void remove_parked_locked(cp_port *p, cp__thread *t)
{
    for (cp__thread **pp = &p->parked; *pp; pp = &(*pp)->next_parked) {
        if (*pp == t) {
            *pp = t->next_parked;
            t->next_parked = NULL;
            t->parked = false;
            __atomic_sub_fetch(&p->nparked, 1, __ATOMIC_SEQ_CST);
            return;
        }
    }
}

/* Hand queued completions to parked threads while the concurrency limit allows, most
 * recently parked first; promote a parked thread to poller if the port needs one; note
 * whether the poller must be woken for work nobody else can take. */
static void release_locked(cp_port *p, wake_list *wl)
{
    while (p->parked && load_running(p) < p->concurrency && have_work(p)) {
        cp__thread *w = p->parked;
        unsigned n = take_any_locked(p, w->hand, w->want);
        if (n == 0)
            break; /* a running thread took it first */
        pop_parked_locked(p);
        w->nhand = n;
        w->running = true;
        add_running(p, 1);
        w->next_wake = wl->threads;
        wl->threads = w;
    }
    if (__atomic_load_n(&p->closed, __ATOMIC_RELAXED)) {
        /* Closed: parked threads stay for what is queued (the limit may release them
         * later, e.g. at a cp_port_block_begin()); once it is gone they all leave. */
        while (p->parked && !have_work(p)) {
            cp__thread *w = pop_parked_locked(p);
            w->nhand = 0;
            w->next_wake = wl->threads;
            wl->threads = w;
        }
        return;
    }
    if (load_running(p) >= p->concurrency)
        return;
    if (have_work(p)) {
        /* Work is queued and nobody is parked: only the poller can take it. */
        if (__atomic_load_n(&p->polling, __ATOMIC_SEQ_CST) &&
            !__atomic_load_n(&p->wake_sent, __ATOMIC_SEQ_CST) &&
            !__atomic_exchange_n(&p->wake_sent, true, __ATOMIC_SEQ_CST))
            wl->poller = true;
    } else if (!p->polling && p->parked && need_poller(p)) {
        cp__thread *w = pop_parked_locked(p);
        w->nhand = 0;
        w->next_wake = wl->threads;
        wl->threads = w;
    }
}

static void wake_all(cp_port *p, wake_list *wl)
{
    if (wl->threads)
        CP__INJECT_DELAY("wake_all"); /* a woken waiter that timed out may leave meanwhile */
    cp__thread *w = wl->threads;
    while (w) {
        /* Read the link before the store below lets the thread run on. The record itself
         * outlives this call: it is freed only when its thread exits, and the thread is
         * inside dequeue until it sees futex == 1. */
        cp__thread *next = w->next_wake;
        __atomic_store_n(&w->futex, 1, __ATOMIC_RELEASE);
        cp__futex_wake(&w->futex, 1);
        w = next;
    }
    if (wl->poller)
        p->be->wake(p);
}

/* Take the lock and release whoever release_locked() says may go. */
static void release_now(cp_port *p)
{
    wake_list wl = {0};
    cp__lock_acquire(&p->lock);
    release_locked(p, &wl);
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
}

/* After publishing work without the lock: take the lock only if someone may need waking. */
static void wake_if_needed(cp_port *p)
{
    if (load_running(p) >= p->concurrency)
        return; /* a running thread will take it when it comes back */
    if (__atomic_load_n(&p->nparked, __ATOMIC_SEQ_CST) == 0 &&
        (!__atomic_load_n(&p->polling, __ATOMIC_SEQ_CST) ||
         __atomic_load_n(&p->wake_sent, __ATOMIC_SEQ_CST)))
        return;
    release_now(p);
}

/* ---- thread records ------------------------------------------------------------------ */

static cp__thread *self_record(cp_port *p)
{
    cp__thread *t = pthread_getspecific(p->tkey);
    if (t)
        return t;
    t = CP__INJECT_FAIL("thread_record") ? NULL : calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->port = p;
    if (pthread_setspecific(p->tkey, t) != 0) {
        free(t);
        return NULL;
    }
    cp__lock_acquire(&p->lock);
    t->next = p->threads;
    if (p->threads)
        p->threads->prev = t;
    p->threads = t;
    cp__lock_release(&p->lock);
    return t;
}

static void unlink_record_locked(cp_port *p, cp__thread *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else
        p->threads = t->next;
    if (t->next)
        t->next->prev = t->prev;
    p->dequeued_by_gone += __atomic_load_n(&t->dequeued, __ATOMIC_RELAXED);
}

/* Runs when a thread that dequeued from the port exits: it stops counting as running. */
static void record_destructor(void *arg)
{
    cp__thread *t = arg;
    cp_port *p = t->port;
    wake_list wl = {0};
    cp__lock_acquire(&p->lock);
    if (t->running) {
        t->running = false;
        add_running(p, -1);
    }
    release_locked(p, &wl);
    unlink_record_locked(p, t);
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
    free(t);
}

unsigned cp__port_take_closed(cp_port *p, cp_completion *out, unsigned max)
{
    return take_unlocked(p, out, max);
}

bool cp__port_caller_defers(cp_port *p)
{
    cp__thread *t = pthread_getspecific(p->tkey);
    return t && (t->running || __atomic_load_n(&p->poller, __ATOMIC_RELAXED) == t);
}

/* ---- creation ------------------------------------------------------------------------ */

static int backend_from_env(cp_backend_kind *kind)
{
    const char *env = getenv("CPORT_BACKEND");
    if (!env || !*env || strcmp(env, "auto") == 0)
        *kind = CP_BACKEND_AUTO;
    else if (strcmp(env, "io_uring") == 0)
        *kind = CP_BACKEND_IO_URING;
    else if (strcmp(env, "epoll") == 0)
        *kind = CP_BACKEND_EPOLL;
    else
        return -EINVAL;
    return 0;
}

static int init_backend(cp_port *p, const cp__backend *be)
{
    p->be = be;
    int r = be->init(p, &p->opts);
    if (r < 0)
        p->be = NULL;
    return r;
}

static int select_backend(cp_port *p)
{
    cp_backend_kind kind = p->opts.backend;
    if (kind == CP_BACKEND_AUTO) {
        int r = backend_from_env(&kind);
        if (r < 0)
            return r;
    }
    if (kind == CP_BACKEND_IO_URING)
        return init_backend(p, &cp__backend_io_uring);
    if (kind == CP_BACKEND_EPOLL)
        return init_backend(p, &cp__backend_epoll);
    if (kind != CP_BACKEND_AUTO)
        return -EINVAL;
    int r = init_backend(p, &cp__backend_io_uring);
    if (r == 0)
        return 0;
    if (!(p->opts.flags & CP_PORT_QUIET))
        fprintf(stderr, "cport: io_uring is not available (%s); using epoll\n", cp_strerror(r));
    return init_backend(p, &cp__backend_epoll);
}

static uint32_t round_pow2(uint32_t v)
{
    uint32_t p = 1;
    while (p < v)
        p <<= 1;
    return p;
}

static void resolve_options(cp_port_options *o)
{
    if (o->concurrency == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        o->concurrency = n > 0 ? (unsigned)n : 1;
    }
    if (o->max_posted == 0)
        o->max_posted = DEFAULT_MAX_POSTED;
    if (o->ring_entries == 0)
        o->ring_entries = 1024;
    if (o->cq_entries == 0) {
        /* 4 x, within what the kernel takes (IORING_MAX_CQ_ENTRIES): a default beyond it
         * would make the io_uring set-up fail with -EINVAL. */
        uint64_t cq = (uint64_t)o->ring_entries * 4;
        o->cq_entries = cq < 4096 ? 4096 : cq > 65536 ? 65536 : (uint32_t)cq;
    }
    if (o->cq_entries < o->ring_entries)
        o->cq_entries = o->ring_entries;
    if (o->pool_buffers == 0)
        o->pool_buffers = 4096;
    if (o->pool_buffers > 32768)
        o->pool_buffers = 32768;
    o->pool_buffers = round_pow2(o->pool_buffers);
    if (o->pool_buffer_size == 0) {
        /* A page multiple also where pages are larger: trimming gives whole buffers back
         * with madvise, which works on whole pages. */
        long page = sysconf(_SC_PAGESIZE);
        o->pool_buffer_size = page > 4096 ? (uint32_t)page : 4096;
    }
    if (o->pool_per_socket == 0)
        o->pool_per_socket = 4;
}

int cp_port_create_ex(cp_port **portp, const cp_port_options *opts)
{
    if (!portp)
        return -EINVAL;
    *portp = NULL;
    cp_port_options o = {0};
    if (opts)
        o = *opts;
    long page = sysconf(_SC_PAGESIZE);
    /* The ring sizes the kernel refuses (IORING_MAX_ENTRIES, IORING_MAX_CQ_ENTRIES): bad
     * input, not a reason to fall back to epoll as if io_uring were denied. So is a pipe
     * pool whose bookkeeping io_uring's set-up could not allocate. */
    if (o.pool_buffer_size % (uint32_t)page != 0 || o.pool_per_socket > 255 ||
        o.max_posted > (1u << 30) || o.ring_entries > 32768 || o.cq_entries > 65536 ||
        o.file_threads > 256 || o.max_pipes > 65536)
        return -EINVAL;
    resolve_options(&o);
    /* Pool receives are named by their byte offset in the pool, 32 bits wide. */
    if ((uint64_t)o.pool_buffers * o.pool_buffer_size > UINT32_MAX)
        return -EINVAL;
    if (o.flags & ~(CP_PORT_QUIET | CP_PORT_WHOLE_BUFFERS))
        return -EINVAL; /* a flag this version does not know */

    cp_port *p = aligned_alloc(64, (sizeof(*p) + 63) & ~(size_t)63);
    if (!p)
        return -ENOMEM;
    memset(p, 0, sizeof(*p));
    p->opts = o;
    p->concurrency = o.concurrency;
    cp__lock_init(&p->lock);
    cp__lock_init(&p->timer_lock);
    int r = pthread_key_create(&p->tkey, record_destructor);
    if (r != 0) {
        free(p);
        return -r;
    }
    /* The ring holds exactly max_posted entries when that is a power of two; otherwise
     * the next power of two (documented as the cap rounded up). At least 2: with one slot,
     * its "full" and "free for the next lap" sequence values coincide (see ring.h) and a
     * second post would overwrite the first. */
    r = cp__ring_init(&p->ring, o.max_posted < 2 ? 2 : round_pow2(o.max_posted));
    if (r == 0) {
        r = cp__bufpool_init(&p->pool, o.pool_buffers, o.pool_buffer_size, o.pool_per_socket);
        if (r == 0) {
            r = select_backend(p);
            if (r < 0)
                cp__bufpool_fini(&p->pool);
        }
        if (r < 0)
            cp__ring_fini(&p->ring);
    }
    if (r < 0) {
        pthread_key_delete(p->tkey);
        free(p);
        return r;
    }
    *portp = p;
    return 0;
}

int cp_port_create(cp_port **portp, unsigned concurrency)
{
    cp_port_options o = {.concurrency = concurrency};
    return cp_port_create_ex(portp, &o);
}

void cp_port_destroy(cp_port *p)
{
    if (!p)
        return;
    pthread_key_delete(p->tkey);
    if (p->be)
        p->be->fini(p);
    cp__bufpool_fini(&p->pool);
    cp__ring_fini(&p->ring);
    while (p->threads) {
        cp__thread *t = p->threads;
        p->threads = t->next;
        free(t);
    }
    cp__heap_free(&p->timers);
    free(p);
}

/* ---- posting and completing ------------------------------------------------------------ */

int cp_port_post(cp_port *p, uintptr_t key, int64_t result, void *op)
{
    if (!p)
        return -EINVAL;
    if (__atomic_load_n(&p->closed, __ATOMIC_ACQUIRE))
        return -ESHUTDOWN;
    CP__INJECT_DELAY("post_push"); /* the port may be closed and drained meanwhile */
    int r = cp__ring_push(&p->ring, key, result, op);
    if (r < 0)
        return r;
    wake_if_needed(p);
    return 0;
}

static void append_late_locked(cp_port *p, cp__oplist *l)
{
    if (p->late.tail)
        p->late.tail->cp__next = l->head;
    else
        p->late.head = l->head;
    p->late.tail = l->tail;
    p->late.n += l->n;
}

bool cp__port_complete_handle(cp_port *p, cp__oplist *l, uint8_t hgen)
{
    if (!l->head)
        return false;
    wake_list wl = {0};
    bool late = false;
    cp__lock_acquire(&p->lock);
    if (__atomic_load_n(&p->harvesting, __ATOMIC_SEQ_CST) &&
        hgen == (uint8_t)__atomic_load_n(&p->harvest_gen, __ATOMIC_SEQ_CST)) {
        /* The handle may have earlier completions in the poller's harvest: follow it. (A
         * stale stamp that happens to match only delays these until the harvest ends.) */
        append_late_locked(p, l);
        late = true;
    } else {
        append_io_locked(p, l->head, l->tail, l->n);
        release_locked(p, &wl);
    }
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
    return late;
}

void cp__port_complete_late(cp_port *p, cp__oplist *l)
{
    cp__lock_acquire(&p->lock);
    append_late_locked(p, l);
    cp__lock_release(&p->lock);
}

void cp__port_complete_op(cp_port *p, cp_op *op)
{
    wake_list wl = {0};
    cp__lock_acquire(&p->lock);
    append_io_locked(p, op, op, 1);
    release_locked(p, &wl);
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
}

void cp__port_handle_added(cp_port *p)
{
    /* Only the first handle can leave the port without a poller: once there are handles,
     * a thread polls or is running work and will poll when it comes back. */
    if (__atomic_add_fetch(&p->io_handles, 1, __ATOMIC_SEQ_CST) != 1)
        return;
    wake_list wl = {0};
    cp__lock_acquire(&p->lock);
    release_locked(p, &wl); /* a parked thread may need to start polling */
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
}

void cp__port_handle_removed(cp_port *p)
{
    __atomic_sub_fetch(&p->io_handles, 1, __ATOMIC_RELAXED);
}

/* ---- dequeue ------------------------------------------------------------------------ */

/* Hold the poller role: wait in the backend until `deadline` (absolute ns; 0 = do not
 * block; < 0 = forever), then queue what it harvested. Called and returns with the lock
 * held; drops it while waiting. */
static void poll_backend_locked(cp_port *p, cp__thread *t, int64_t deadline)
{
    __atomic_store_n(&p->wake_sent, false, __ATOMIC_SEQ_CST);
    __atomic_store_n(&p->poller, t, __ATOMIC_RELAXED);
    __atomic_store_n(&p->polling, true, __ATOMIC_SEQ_CST);
    p->polls++;
    t->since_poll = 0;
    cp__lock_release(&p->lock);

    /* A post that saw no poller yet did not wake one: look before blocking. */
    if (have_work(p))
        deadline = 0;
    int64_t timer = cp__io_next_deadline(p);
    if (timer >= 0 && (deadline < 0 || timer < deadline))
        deadline = timer > 0 ? timer : 0;
    /* Pool buffers a burst left behind are trimmed on releases; with no traffic, this
     * poll wakes for the check (only while something could be trimmed). */
    int64_t trim = cp__bufpool_trim_at(&p->pool);
    if (trim > 0 && (deadline < 0 || trim < deadline))
        deadline = trim;
    /* It will not block: nothing to wake. (The harvest itself begins only when the
     * backend's poll returns: one harvest must keep one generation from its start to its
     * end, or completions that other threads put on the late list for a handle stamped
     * with the first would be overtaken by the handle's later ones in the harvest.) */
    if (deadline == 0)
        __atomic_store_n(&p->wake_sent, true, __ATOMIC_SEQ_CST);
    cp__oplist done = {.flags = CP__OPLIST_HARVEST};
    p->be->poll(p, deadline, &done);
    /* The kick is looked at before it is taken: mostly not set, and then the poll costs no
     * read-modify-write (one set after the look is followed by a wake-up: the next poll). */
    if ((done.flags & CP__OPLIST_POOL_FREED) ||
        (__atomic_load_n(&p->pool.kick, __ATOMIC_ACQUIRE) &&
         __atomic_exchange_n(&p->pool.kick, 0, __ATOMIC_ACQ_REL)))
        cp__io_serve_starving(p);
    if (timer >= 0)
        cp__io_expire(p, cp__now_ns());
    if (trim > 0)
        cp__bufpool_maintain(&p->pool, cp__now_ns());

    cp__lock_acquire(&p->lock);
    __atomic_store_n(&p->poller, NULL, __ATOMIC_RELAXED);
    __atomic_store_n(&p->polling, false, __ATOMIC_SEQ_CST);
    /* The harvest, then what other threads completed meanwhile for handles in it. */
    __atomic_store_n(&p->harvesting, false, __ATOMIC_SEQ_CST);
    if (done.head)
        append_io_locked(p, done.head, done.tail, done.n);
    if (p->late.head) {
        append_io_locked(p, p->late.head, p->late.tail, p->late.n);
        p->late = (cp__oplist){0};
    }
}

static unsigned finish_take(cp__thread *t, unsigned n)
{
    t->since_poll += n;
    /* Only this thread writes it; a plain store keeps the read-modify-write off the hot
     * path while stats readers still get a whole value. */
    __atomic_store_n(&t->dequeued, t->dequeued + n, __ATOMIC_RELAXED);
    return n;
}

int cp_port_dequeue(cp_port *p, cp_completion *out, unsigned max, int timeout_ms)
{
    if (!p || !out || max == 0)
        return -EINVAL;
    cp__thread *t = self_record(p);
    if (!t)
        return -ENOMEM;

    if (t->running) {
        /* Fast path: still running and work is there: take it, no sleep, no wakeup, no
         * shared counter touched. Unless the backend is due a look, or block_end pushed
         * the running count over the limit (then this thread must yield its slot). */
        bool poll_due = t->since_poll >= POLL_EVERY && need_poller(p) &&
                        !__atomic_load_n(&p->polling, __ATOMIC_RELAXED);
        if (!poll_due && load_running(p) <= p->concurrency) {
            unsigned n = take_unlocked(p, out, max);
            if (n) {
                /* Maybe the last of a closed port's queue: its waiters leave now, whatever
                 * the running count (wake_if_needed() would stop at a full limit, and
                 * they would wait for this thread to come back). */
                if (__atomic_load_n(&p->closed, __ATOMIC_ACQUIRE) &&
                    __atomic_load_n(&p->nparked, __ATOMIC_SEQ_CST))
                    release_now(p);
                return (int)finish_take(t, n);
            }
        }
        /* Deferred submissions (io_uring batches them until the next poll): if a poller is
         * already blocked, nobody else will send them. */
        if (__atomic_load_n(&p->polling, __ATOMIC_SEQ_CST) && p->be->flush)
            p->be->flush(p);
    }

    int64_t deadline = timeout_ms < 0 ? -1 : cp__now_ns() + (int64_t)timeout_ms * 1000000;
    if (timeout_ms == 0)
        deadline = 0;
    wake_list wl = {0};
    bool polled = false;
    int ret;
    cp__lock_acquire(&p->lock);
    if (t->running) {
        t->running = false;
        add_running(p, -1);
    }
    t->blocked = false;
    p->nwaiting++;
    for (;;) {
        bool allowed = load_running(p) < p->concurrency;
        bool can_poll = allowed && !p->polling && need_poller(p);
        if (allowed && have_work(p)) {
            if (can_poll && t->since_poll >= POLL_EVERY) {
                poll_backend_locked(p, t, 0);
                continue;
            }
            unsigned n = take_any_locked(p, out, max);
            if (n) {
                t->running = true;
                add_running(p, 1);
                ret = (int)finish_take(t, n);
                release_locked(p, &wl);
                break;
            }
        }
        bool expired = deadline == 0 || (deadline > 0 && cp__now_ns() >= deadline);
        bool closed = __atomic_load_n(&p->closed, __ATOMIC_RELAXED);
        if (can_poll && !polled && closed) {
            /* Closed: I/O accepted before still completes; collect it without blocking. */
            poll_backend_locked(p, t, 0);
            polled = true;
            continue;
        }
        if (can_poll && !closed && !(polled && expired)) {
            poll_backend_locked(p, t, deadline);
            polled = true;
            continue;
        }
        bool drained = closed && !have_work(p);
        if (drained || expired) {
            ret = drained ? -ECANCELED : -ETIMEDOUT;
            release_locked(p, &wl); /* leaving: a parked thread may take the poller role */
            break;
        }
        /* Park: most recently parked is woken first. */
        t->hand = out;
        t->want = max;
        t->nhand = 0;
        __atomic_store_n(&t->futex, 0, __ATOMIC_RELAXED);
        push_parked_locked(p, t);
        /* A post may have slipped in before it could see us parked. */
        if ((load_running(p) < p->concurrency && have_work(p)) ||
            (__atomic_load_n(&p->closed, __ATOMIC_RELAXED) && !have_work(p))) {
            remove_parked_locked(p, t);
            continue;
        }
        cp__lock_release(&p->lock);
        while (__atomic_load_n(&t->futex, __ATOMIC_ACQUIRE) == 0) {
            if (cp__futex_wait(&t->futex, 0, deadline) == -ETIMEDOUT)
                break;
        }
        cp__lock_acquire(&p->lock);
        if (t->parked) {
            remove_parked_locked(p, t); /* timed out before anyone woke us */
        } else {
            /* Popped by a waker that has not yet stored futex = 1 (it does so after
             * unlocking): wait for that store, or the record could be freed under it. */
            while (__atomic_load_n(&t->futex, __ATOMIC_ACQUIRE) == 0) {
                cp__lock_release(&p->lock);
                cp__futex_wait(&t->futex, 0, -1);
                cp__lock_acquire(&p->lock);
            }
        }
        if (t->nhand) {
            /* Handed over by a waker, who already counted us as running. */
            unsigned n = t->nhand;
            t->nhand = 0;
            if (n < max)
                n += take_any_locked(p, out + n, max - n);
            ret = (int)finish_take(t, n);
            release_locked(p, &wl);
            break;
        }
    }
    p->nwaiting--;
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
    return ret;
}

/* ---- close, blocking, introspection --------------------------------------------------- */

void cp_port_close(cp_port *p)
{
    if (!p)
        return;
    wake_list wl = {0};
    cp__lock_acquire(&p->lock);
    if (!__atomic_load_n(&p->closed, __ATOMIC_RELAXED)) {
        /* Parked threads may still drain what is queued (within the limit)... */
        release_locked(p, &wl);
        /* Sealed before anyone can see the port closed: a post either counts as queued
         * from now on or fails, so no post succeeds after a waiter got -ECANCELED. */
        cp__ring_seal(&p->ring);
        __atomic_store_n(&p->closed, true, __ATOMIC_SEQ_CST);
        /* ...and every other one wakes up to find the port closed once nothing is left. */
        release_locked(p, &wl);
        wl.poller = __atomic_load_n(&p->polling, __ATOMIC_RELAXED);
    }
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
}

void cp_port_block_begin(cp_port *p)
{
    if (!p)
        return;
    cp__thread *t = pthread_getspecific(p->tkey);
    if (!t || !t->running)
        return;
    if (p->be->flush)
        p->be->flush(p);
    wake_list wl = {0};
    cp__lock_acquire(&p->lock);
    t->running = false;
    t->blocked = true;
    add_running(p, -1);
    release_locked(p, &wl);
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
}

void cp_port_block_end(cp_port *p)
{
    if (!p)
        return;
    cp__thread *t = pthread_getspecific(p->tkey);
    if (!t || !t->blocked)
        return;
    cp__lock_acquire(&p->lock);
    t->blocked = false;
    t->running = true;
    add_running(p, 1);
    cp__lock_release(&p->lock);
}

unsigned cp_port_concurrency(const cp_port *p)
{
    return p->concurrency;
}

cp_backend_kind cp_port_backend(const cp_port *p)
{
    return p->be->kind;
}

const char *cp_port_backend_name(const cp_port *p)
{
    return p->be->name;
}

void cp_port_get_stats(cp_port *p, cp_port_stats *s)
{
    if (!s)
        return;
    memset(s, 0, sizeof(*s));
    if (!p)
        return;
    cp__lock_acquire(&p->lock);
    s->running = load_running(p);
    s->waiting = p->nwaiting;
    s->queued = __atomic_load_n(&p->io_queued, __ATOMIC_RELAXED) + cp__ring_count(&p->ring);
    s->posted = __atomic_load_n(&p->ring.tail, __ATOMIC_RELAXED) & ~CP__RING_SEALED;
    s->completed = __atomic_load_n(&p->completed, __ATOMIC_RELAXED);
    s->wakeups = p->wakeups;
    s->polls = p->polls;
    s->pool_packed = p->pool.packed;
    s->cq_overflows = __atomic_load_n(&p->cq_overflows, __ATOMIC_RELAXED);
    s->cq_dropped = __atomic_load_n(&p->cq_dropped, __ATOMIC_RELAXED);
    s->dequeued = p->dequeued_by_gone;
    for (cp__thread *t = p->threads; t; t = t->next)
        s->dequeued += __atomic_load_n(&t->dequeued, __ATOMIC_RELAXED);
    cp__lock_release(&p->lock);
    cp__lock_acquire(&p->pool.lock);
    s->pool_free = p->pool.nfree;
    s->pool_trimmed = p->pool.trimmed;
    cp__lock_release(&p->pool.lock);
}
