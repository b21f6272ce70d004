/* The completion port: a FIFO of completions, a LIFO stack of parked threads, and the
 * concurrency accounting of Windows' I/O completion port (see cport/port.h).
 *
 * Design in brief:
 *   - One lock guards the queue, the parked stack and the counters. Critical sections are
 *     a few pointer updates; futex wakes and backend wakes happen after unlocking.
 *   - A completion that arrives while a thread is parked and fewer than `concurrency`
 *     threads run is handed straight to the most recently parked thread (NT's handoff):
 *     the waker converts it into the waiter's output array and counts the waiter as
 *     running before waking it, so nobody can steal it and the limit is never exceeded.
 *   - When the port has I/O handles, one waiting thread at a time holds the poller role
 *     and waits in the backend (io_uring_enter / epoll_wait) instead of on its futex; the
 *     completions it harvests are queued like any other. With one worker this makes the
 *     whole path a single thread: no handoff, no extra wakeup. When the poller leaves to
 *     run work, a parked thread is promoted to poll in its place.
 */
#include "port_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum {
    PACKETS_PER_BLOCK = 256,
    /* After this many completions taken without the backend being polled, a dequeuing
     * thread polls it once without blocking, so a busy queue cannot starve I/O. */
    POLL_EVERY = 64,
    DEFAULT_MAX_POSTED = 65536,
};

typedef struct packet_block {
    struct packet_block *next;
    cp__packet packets[PACKETS_PER_BLOCK];
} packet_block;

/* Threads to wake once the port lock is released: parked records and/or the poller. */
typedef struct wake_list {
    cp__thread *threads;
    bool poller;
} wake_list;

static void record_destructor(void *arg);

/* ---- queue ------------------------------------------------------------------------ */

static void enqueue_locked(cp_port *p, cp_op *op)
{
    op->cp__next = NULL;
    if (p->qtail)
        p->qtail->cp__next = op;
    else
        p->qhead = op;
    p->qtail = op;
    __atomic_store_n(&p->queued, p->queued + 1, __ATOMIC_RELAXED);
}

static unsigned take_locked(cp_port *p, cp_completion *out, unsigned max)
{
    unsigned n = 0;
    while (n < max && p->qhead) {
        cp_op *op = p->qhead;
        p->qhead = op->cp__next;
        if (op->opcode == CP__OP_PACKET) {
            cp__packet *pk = CP_CONTAINER_OF(op, cp__packet, op);
            out[n].op = pk->op.u.buf;
            out[n].key = pk->key;
            out[n].result = pk->result;
            pk->op.cp__next = p->free_packets ? &p->free_packets->op : NULL;
            p->free_packets = pk;
            p->posted_queued--;
        } else {
            cp__op_to_completion(op, &out[n]);
        }
        n++;
    }
    if (!p->qhead)
        p->qtail = NULL;
    __atomic_store_n(&p->queued, p->queued - n, __ATOMIC_RELAXED);
    p->stats.dequeued += n;
    p->since_poll += n;
    return n;
}

static bool need_poller(cp_port *p)
{
    return __atomic_load_n(&p->io_handles, __ATOMIC_RELAXED) > 0;
}

static cp__thread *pop_parked_locked(cp_port *p)
{
    cp__thread *w = p->parked;
    p->parked = w->next_parked;
    w->next_parked = NULL;
    w->parked = false;
    p->nparked--;
    p->stats.wakeups++;
    return w;
}

/* Hand queued completions to parked threads while the concurrency limit allows, most
 * recently parked first; promote a parked thread to poller if the port needs one; note
 * whether the poller must be woken for work nobody else can take. */
static void release_locked(cp_port *p, wake_list *wl)
{
    while (p->qhead && p->parked && p->running < p->concurrency) {
        cp__thread *w = pop_parked_locked(p);
        w->nhand = take_locked(p, w->hand, w->want);
        w->running = true;
        p->running++;
        w->next_wake = wl->threads;
        wl->threads = w;
    }
    if (p->running >= p->concurrency || p->closed)
        return;
    if (p->qhead) {
        /* Work is queued, nobody is parked: only the poller can take it. */
        if (p->polling && !p->wake_sent) {
            p->wake_sent = true;
            wl->poller = true;
        }
    } else if (!p->polling && p->parked && need_poller(p)) {
        cp__thread *w = pop_parked_locked(p);
        w->nhand = 0;
        w->next_wake = wl->threads;
        wl->threads = w;
    }
}

static void wake_all(cp_port *p, wake_list *wl)
{
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

/* ---- thread records ------------------------------------------------------------------ */

static cp__thread *self_record(cp_port *p)
{
    cp__thread *t = pthread_getspecific(p->tkey);
    if (t)
        return t;
    t = calloc(1, sizeof(*t));
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
        p->running--;
        release_locked(p, &wl);
    }
    unlink_record_locked(p, t);
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
    free(t);
}

bool cp__port_caller_defers(cp_port *p)
{
    cp__thread *t = pthread_getspecific(p->tkey);
    return t && (__atomic_load_n(&t->running, __ATOMIC_RELAXED) ||
                 __atomic_load_n(&p->poller, __ATOMIC_RELAXED) == t);
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
    if (o->pool_buffers == 0)
        o->pool_buffers = 4096;
    if (o->pool_buffers > 32768)
        o->pool_buffers = 32768;
    uint32_t pow2 = 1;
    while (pow2 < o->pool_buffers)
        pow2 <<= 1;
    o->pool_buffers = pow2;
    if (o->pool_buffer_size == 0)
        o->pool_buffer_size = 4096;
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
    if (o.pool_buffer_size % (uint32_t)page != 0 || o.pool_per_socket > 255)
        return -EINVAL;
    resolve_options(&o);

    cp_port *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    p->opts = o;
    p->concurrency = o.concurrency;
    p->max_posted = o.max_posted;
    cp__lock_init(&p->lock);
    cp__lock_init(&p->timer_lock);
    int r = pthread_key_create(&p->tkey, record_destructor);
    if (r != 0) {
        free(p);
        return -r;
    }
    r = cp__bufpool_init(&p->pool, o.pool_buffers, o.pool_buffer_size, o.pool_per_socket);
    if (r == 0) {
        r = select_backend(p);
        if (r < 0)
            cp__bufpool_fini(&p->pool);
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
    while (p->threads) {
        cp__thread *t = p->threads;
        p->threads = t->next;
        free(t);
    }
    packet_block *b = p->packet_blocks;
    while (b) {
        packet_block *next = b->next;
        free(b);
        b = next;
    }
    cp__heap_free(&p->timers);
    free(p);
}

/* ---- posting and completing ------------------------------------------------------------ */

static cp__packet *alloc_packet_locked(cp_port *p)
{
    if (!p->free_packets) {
        packet_block *b = malloc(sizeof(*b));
        if (!b)
            return NULL;
        b->next = p->packet_blocks;
        p->packet_blocks = b;
        for (int i = PACKETS_PER_BLOCK - 1; i >= 0; i--) {
            b->packets[i].op.cp__next = p->free_packets ? &p->free_packets->op : NULL;
            p->free_packets = &b->packets[i];
        }
    }
    cp__packet *pk = p->free_packets;
    p->free_packets = pk->op.cp__next ? CP_CONTAINER_OF(pk->op.cp__next, cp__packet, op) : NULL;
    return pk;
}

int cp_port_post(cp_port *p, uintptr_t key, int64_t result, void *op)
{
    if (!p)
        return -EINVAL;
    wake_list wl = {0};
    cp__lock_acquire(&p->lock);
    if (p->closed) {
        cp__lock_release(&p->lock);
        return -ESHUTDOWN;
    }
    if (p->posted_queued >= p->max_posted) {
        cp__lock_release(&p->lock);
        return -EAGAIN;
    }
    cp__packet *pk = alloc_packet_locked(p);
    if (!pk) {
        cp__lock_release(&p->lock);
        return -ENOMEM;
    }
    pk->op.opcode = CP__OP_PACKET;
    pk->op.u.buf = op;
    pk->key = key;
    pk->result = result;
    p->posted_queued++;
    p->stats.posted++;
    enqueue_locked(p, &pk->op);
    release_locked(p, &wl);
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
    return 0;
}

void cp__port_complete(cp_port *p, cp_op *op)
{
    wake_list wl = {0};
    cp__lock_acquire(&p->lock);
    p->stats.completed++;
    enqueue_locked(p, op);
    release_locked(p, &wl);
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
}

static void append_list_locked(cp_port *p, cp__oplist *l)
{
    if (!l->head)
        return;
    if (p->qtail)
        p->qtail->cp__next = l->head;
    else
        p->qhead = l->head;
    p->qtail = l->tail;
    l->tail->cp__next = NULL;
    __atomic_store_n(&p->queued, p->queued + l->n, __ATOMIC_RELAXED);
    p->stats.completed += l->n;
}

void cp__port_complete_list(cp_port *p, cp__oplist *l)
{
    if (!l->head)
        return;
    wake_list wl = {0};
    cp__lock_acquire(&p->lock);
    append_list_locked(p, l);
    release_locked(p, &wl);
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
}

void cp__port_handle_added(cp_port *p)
{
    wake_list wl = {0};
    cp__lock_acquire(&p->lock);
    __atomic_store_n(&p->io_handles, p->io_handles + 1, __ATOMIC_RELAXED);
    release_locked(p, &wl); /* the first handle may need a parked thread to start polling */
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
}

void cp__port_handle_removed(cp_port *p)
{
    cp__lock_acquire(&p->lock);
    __atomic_store_n(&p->io_handles, p->io_handles - 1, __ATOMIC_RELAXED);
    cp__lock_release(&p->lock);
}

/* ---- dequeue ------------------------------------------------------------------------ */

/* Hold the poller role: wait in the backend until `deadline` (absolute ns; 0 = do not
 * block; < 0 = forever), then queue what it harvested. Called and returns with the lock
 * held; drops it while waiting. */
static void poll_backend_locked(cp_port *p, cp__thread *t, int64_t deadline)
{
    __atomic_store_n(&p->polling, true, __ATOMIC_RELEASE);
    __atomic_store_n(&p->poller, t, __ATOMIC_RELAXED);
    p->wake_sent = false;
    p->stats.polls++;
    cp__lock_release(&p->lock);

    int64_t timer = cp__io_next_deadline(p);
    if (timer >= 0 && (deadline < 0 || timer < deadline))
        deadline = timer > 0 ? timer : 0;
    cp__oplist done = {0};
    p->be->poll(p, deadline, &done);
    if (done.flags & CP__OPLIST_POOL_FREED)
        cp__io_serve_starving(p);
    if (timer >= 0)
        cp__io_expire(p, cp__now_ns());

    cp__lock_acquire(&p->lock);
    __atomic_store_n(&p->poller, NULL, __ATOMIC_RELAXED);
    __atomic_store_n(&p->polling, false, __ATOMIC_RELEASE);
    p->since_poll = 0;
    append_list_locked(p, &done);
}

static void remove_parked_locked(cp_port *p, cp__thread *t)
{
    for (cp__thread **pp = &p->parked; *pp; pp = &(*pp)->next_parked) {
        if (*pp == t) {
            *pp = t->next_parked;
            t->next_parked = NULL;
            t->parked = false;
            p->nparked--;
            return;
        }
    }
}

int cp_port_dequeue(cp_port *p, cp_completion *out, unsigned max, int timeout_ms)
{
    if (!p || !out || max == 0)
        return -EINVAL;
    cp__thread *t = self_record(p);
    if (!t)
        return -ENOMEM;
    int64_t deadline = timeout_ms < 0 ? -1 : cp__now_ns() + (int64_t)timeout_ms * 1000000;
    if (timeout_ms == 0)
        deadline = 0;

    /* A worker coming back may have deferred submissions (io_uring batches them until
     * the next poll); if a poller is already blocked, nobody else will flush them. */
    if (t->running && cp__port_polling(p) && p->be->flush)
        p->be->flush(p);

    wake_list wl = {0};
    bool polled = false;
    int ret;
    cp__lock_acquire(&p->lock);
    if (t->running) {
        t->running = false;
        p->running--;
    }
    t->blocked = false;
    p->nwaiting++;
    for (;;) {
        bool allowed = p->running < p->concurrency;
        bool can_poll = allowed && !p->polling && need_poller(p);
        if (allowed && p->qhead) {
            if (can_poll && p->since_poll >= POLL_EVERY) {
                poll_backend_locked(p, t, 0);
                continue;
            }
            ret = (int)take_locked(p, out, max);
            p->running++;
            t->running = true;
            release_locked(p, &wl);
            break;
        }
        bool expired = deadline == 0 || (deadline > 0 && cp__now_ns() >= deadline);
        if (can_poll && !p->closed && !(polled && expired)) {
            poll_backend_locked(p, t, deadline);
            polled = true;
            continue;
        }
        if (p->closed) {
            ret = -ECANCELED;
            break;
        }
        if (expired) {
            ret = -ETIMEDOUT;
            break;
        }
        /* Park: most recently parked is woken first. */
        t->hand = out;
        t->want = max;
        t->nhand = 0;
        __atomic_store_n(&t->futex, 0, __ATOMIC_RELAXED);
        t->next_parked = p->parked;
        t->parked = true;
        p->parked = t;
        p->nparked++;
        cp__lock_release(&p->lock);
        while (__atomic_load_n(&t->futex, __ATOMIC_ACQUIRE) == 0) {
            if (cp__futex_wait(&t->futex, 0, deadline) == -ETIMEDOUT)
                break;
        }
        cp__lock_acquire(&p->lock);
        if (t->parked)
            remove_parked_locked(p, t); /* timed out before anyone woke us */
        if (t->nhand) {
            /* Handed over by a waker, who already counted us as running. */
            ret = (int)t->nhand;
            t->nhand = 0;
            if ((unsigned)ret < max && p->qhead)
                ret += (int)take_locked(p, out + ret, max - (unsigned)ret);
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
    if (!p->closed) {
        p->closed = true;
        /* Parked threads may still drain what is queued (within the limit). */
        release_locked(p, &wl);
        while (p->parked) {
            cp__thread *w = pop_parked_locked(p);
            w->nhand = 0;
            w->next_wake = wl.threads;
            wl.threads = w;
        }
        wl.poller = p->polling;
    }
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
}

void cp_port_block_begin(cp_port *p)
{
    cp__thread *t = pthread_getspecific(p->tkey);
    if (!t || !t->running)
        return;
    if (p->be->flush)
        p->be->flush(p);
    wake_list wl = {0};
    cp__lock_acquire(&p->lock);
    t->running = false;
    t->blocked = true;
    p->running--;
    release_locked(p, &wl);
    cp__lock_release(&p->lock);
    wake_all(p, &wl);
}

void cp_port_block_end(cp_port *p)
{
    cp__thread *t = pthread_getspecific(p->tkey);
    if (!t || !t->blocked)
        return;
    cp__lock_acquire(&p->lock);
    t->blocked = false;
    t->running = true;
    p->running++;
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
    cp__lock_acquire(&p->lock);
    *s = p->stats;
    s->running = p->running;
    s->waiting = p->nwaiting;
    s->queued = p->queued;
    cp__lock_release(&p->lock);
}
