/* The epoll backend: readiness turned into completions, for machines where io_uring is
 * not allowed (seccomp, kernel.io_uring_disabled, old kernels).
 *
 * Every handle is registered once, edge-triggered, for input and output. The handle
 * remembers whether it is readable/writable as far as we know (CP__H_RD_READY /
 * CP__H_WR_READY): a step is attempted with the syscall only then, so a receive posted on
 * an idle socket costs no syscall, and a short read or write clears the flag (the socket
 * is drained or full; the next edge sets it again). Sends are tried at once, like IOCP's
 * skip-on-success path, and usually complete without the poller.
 *
 * Stale events: the poller copies events out of the kernel before it handles them, so a
 * handle closed meanwhile must not complete its close (and be freed by the caller) until
 * the batch is done. A detach or cancel that happens while a poll is in progress is
 * therefore deferred to the end of that batch (the handle stays pinned until then).
 */
#include "handle.h"
#include "inject.h"
#include "sys.h"

#include "cport/file.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sys/sendfile.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

enum {
    MAX_EVENTS = 256,
    TAG_FIRSTDATA = 1, /* epoll data is an accept op waiting for its first data */
    /* A poll hands its completions to the port once they hold this many received bytes;
     * the rest of the harvest waits for the next poll (no system call). */
    HANDOFF_BYTES = 8192,
};

typedef struct ep_state {
    int epfd;
    int wakefd;
    cp__lock lock;  /* guards in_poll and the deferred lists */
    bool in_poll;   /* a poller is waiting in, or handling the events of, epoll_pwait2 */
    bool no_pwait2; /* epoll_pwait2 (Linux 5.11) is missing: use epoll_wait */
    /* Handles detached during the current poll, pinned: their close ops, linked through
     * cp__next (a closing handle's close op is not in any queue until the close
     * completes, which the pin prevents). No allocation, so a detach cannot fail. */
    cp_op *zombie_closes;
    /* First-data accepts cancelled during the current poll. Room for every accept in its
     * first-data phase (nphase) is reserved when it enters the phase, where running out
     * of memory can still fail the accept cleanly: a cancel cannot fail. */
    cp_op **zops;
    uint32_t nzops, czops, nphase;
    struct epoll_event events[MAX_EVENTS]; /* only the poller touches these */
    int nevents, next_event;               /* the harvest, and how far it is handled */

    /* Regular files: epoll cannot wait for them, so reads and writes run on a few
     * blocking threads (started with the first one). */
    pthread_mutex_t jobs_lock;
    pthread_cond_t jobs_cond;
    cp_file_op *jobs_head, *jobs_tail;
    pthread_t *job_threads;
    unsigned njob_threads;
    bool jobs_stop;
    cp_port *port;
} ep_state;

static ep_state *state_of(cp_port *p)
{
    return p->be_data;
}

static int grow(void **v, uint32_t *cap, uint32_t n)
{
    if (n < *cap)
        return 0;
    uint32_t c = *cap ? *cap * 2 : 16;
    void *nv = realloc(*v, c * sizeof(void *));
    if (!nv)
        return -ENOMEM;
    *v = nv;
    *cap = c;
    return 0;
}

static int ep_init(cp_port *p, const cp_port_options *opts)
{
    (void)opts;
    ep_state *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->epfd < 0 || s->wakefd < 0) {
        int err = -errno;
        if (s->epfd >= 0)
            close(s->epfd);
        if (s->wakefd >= 0)
            close(s->wakefd);
        free(s);
        return err;
    }
    /* Edge-triggered and never read: every write is one edge, one wakeup. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = 0};
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->wakefd, &ev) < 0) {
        int err = -errno;
        close(s->epfd);
        close(s->wakefd);
        free(s);
        return err;
    }
    cp__lock_init(&s->lock);
    pthread_mutex_init(&s->jobs_lock, NULL);
    pthread_cond_init(&s->jobs_cond, NULL);
    s->port = p;
    p->be_data = s;
    return 0;
}

static void ep_fini(cp_port *p)
{
    ep_state *s = state_of(p);
    if (!s)
        return;
    pthread_mutex_lock(&s->jobs_lock);
    s->jobs_stop = true;
    pthread_cond_broadcast(&s->jobs_cond);
    pthread_mutex_unlock(&s->jobs_lock);
    for (unsigned i = 0; i < s->njob_threads; i++)
        pthread_join(s->job_threads[i], NULL);
    free(s->job_threads);
    pthread_mutex_destroy(&s->jobs_lock);
    pthread_cond_destroy(&s->jobs_cond);
    close(s->epfd);
    close(s->wakefd);
    free(s->zops);
    free(s);
    p->be_data = NULL;
}

static void ep_wake(cp_port *p)
{
    uint64_t one = 1;
    ssize_t r = write(state_of(p)->wakefd, &one, sizeof(one));
    (void)r; /* EAGAIN only if the counter is saturated: a wakeup is pending anyway */
}

/* Bytes received by the receive completions in done after `from` (NULL: all of it). */
static size_t received_after(const cp__oplist *done, const cp_op *from)
{
    size_t bytes = 0;
    for (const cp_op *op = from ? from->cp__next : done->head; op; op = op->cp__next)
        if ((op->opcode == CP_OP_RECV || op->opcode == CP_OP_RECV_POOL) &&
            !(op->cp__flags & CP__OPF_FAILED))
            bytes += op->cp__done;
    return bytes;
}

/* Wait for events until `deadline` (absolute ns; 0 = do not block; < 0 = forever) and
 * make them the current harvest. Returns 0 or a negative errno. */
static int harvest_events(ep_state *s, int64_t deadline)
{
    cp__lock_acquire(&s->lock);
    s->in_poll = true;
    cp__lock_release(&s->lock);

    struct timespec ts, *tsp = NULL;
    if (deadline >= 0) {
        int64_t left = deadline == 0 ? 0 : deadline - cp__now_ns();
        if (left < 0)
            left = 0;
        ts.tv_sec = left / 1000000000;
        ts.tv_nsec = left % 1000000000;
        tsp = &ts;
    }
    int n = -1;
    if (!s->no_pwait2) {
        n = epoll_pwait2(s->epfd, s->events, MAX_EVENTS, tsp, NULL);
        /* Missing (ENOSYS), or refused by a seccomp filter older than the call: such
         * filters' default action is mostly EPERM (Docker's profile, systemd), and
         * epoll_pwait2 itself never fails with EPERM. */
        if (n < 0 && (errno == ENOSYS || errno == EPERM))
            s->no_pwait2 = true; /* only the poller touches this flag */
    }
    if (s->no_pwait2) {
        /* Whole milliseconds, rounded up: a wait never ends before its deadline. */
        int ms = -1;
        if (tsp) {
            int64_t left = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
            int64_t whole = (left + 999999) / 1000000;
            ms = whole > INT_MAX ? INT_MAX : (int)whole; /* then it wakes early, and waits on */
        }
        n = epoll_wait(s->epfd, s->events, MAX_EVENTS, ms);
    }
    int err = n < 0 && errno != EINTR ? -errno : 0;
    s->nevents = n > 0 ? n : 0;
    s->next_event = 0;
    return err;
}

/* A harvest is handled in parts: once the completions of one poll hold HANDOFF_BYTES of
 * received data, the poll returns and the port runs them; the next poll continues with the
 * events left, without a system call. So large messages are received, handled and
 * answered one socket after another, as a plain event loop does, instead of all being
 * received before the first reply goes out (measured: 16 KiB x 4 connections x depth 2
 * went from 0.6x to 1.0x the reference's throughput), while small messages still go to
 * the port a whole harvest at a time. The harvest stays "in poll" (handles detached
 * meanwhile stay pinned) until its last event is handled. */
static int ep_poll(cp_port *p, int64_t deadline, cp__oplist *done)
{
    ep_state *s = state_of(p);
    int err = s->next_event < s->nevents ? 0 : harvest_events(s, deadline);
    cp__port_poller_awake(p);
    size_t received = 0;
    /* The position in locals: the calls below cannot touch it (only the poller does). */
    int at = s->next_event;
    const int nevents = s->nevents;
    while (at < nevents && received < HANDOFF_BYTES) {
        struct epoll_event *ev = &s->events[at++];
        s->next_event = at;
        if (ev->data.u64 == 0)
            continue; /* wake-up */
        if (ev->data.u64 & TAG_FIRSTDATA) {
            cp_op *op = (cp_op *)(uintptr_t)(ev->data.u64 & ~(uint64_t)TAG_FIRSTDATA);
            /* The harvest names op: a cancel of it now must be deferred (ep_cancel). */
            CP__INJECT_DELAY("ep_firstdata_event");
            cp__hb_acquire(op);
            cp__io_firstdata(op, CP__PENDING, done);
            continue;
        }
        uint32_t e = ev->events;
        cp_op *before = done->tail;
        cp__hb_acquire(ev->data.ptr);
        cp__io_ready(ev->data.ptr,
                     (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR | EPOLLPRI)) != 0,
                     (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR | EPOLLPRI)) != 0,
                     (e & (EPOLLOUT | EPOLLHUP | EPOLLERR)) != 0, done);
        received += received_after(done, before);
    }
    if (at < nevents)
        return err; /* still in poll: the rest of the harvest comes next time */

    cp__lock_acquire(&s->lock);
    s->in_poll = false;
    cp_op *zc = s->zombie_closes;
    s->zombie_closes = NULL;
    bool zops = s->nzops != 0;
    cp__lock_release(&s->lock);
    /* No thread adds to zops now (in_poll is false), but another may grow the array (a
     * first-data wait beginning): take the entries out under the lock, a few at a time. */
    while (zops) {
        cp_op *batch[32];
        cp__lock_acquire(&s->lock);
        uint32_t k = s->nzops < 32 ? s->nzops : 32; /* in the order they were cancelled */
        if (k) { /* zops may be NULL when nothing was ever reserved */
            memcpy(batch, s->zops, k * sizeof(*batch));
            memmove(s->zops, s->zops + k, (s->nzops - k) * sizeof(*batch));
            s->nzops -= k;
        }
        s->nphase -= k; /* they leave the phase: their room is no longer needed */
        cp__lock_release(&s->lock);
        if (k == 0)
            break;
        for (uint32_t i = 0; i < k; i++)
            cp__io_firstdata(batch[i], -ECANCELED, done);
    }
    while (zc) {
        cp_op *next = zc->cp__next; /* the unpin may complete the close: read first */
        cp__io_unpin(zc->cp__h, done);
        zc = next;
    }
    return err;
}

static int ep_attach(cp_handle *h)
{
    ep_state *s = state_of(h->cp__port);
    /* EPOLLPRI: TCP urgent data makes a receive stop short at the urgent mark with more
     * bytes queued behind it (see CP__H_RD_HUP). */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET,
                             .data.ptr = h};
    /* Assume writable (the first send finds out, at the cost of one system call at most),
     * not readable: a socket just accepted has mostly nothing to read yet, and registering
     * it reports it readable at once if it has. Set before the fd is registered: from then
     * on the poller may be in cp__io_ready() for it. (A datagram socket comes with
     * CP__H_RD_HUP already set: see associate() in socket.c.) */
    const uint16_t f = CP__H_ATTACHED | CP__H_WR_READY;
    h->cp__flags |= f;
    cp__hb_release(h);
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, h->fd, &ev) < 0) {
        h->cp__flags &= (uint16_t)~f;
        return -errno;
    }
    return 0;
}

static void ep_detach(cp_handle *h)
{
    if (!(h->cp__flags & CP__H_ATTACHED))
        return;
    cp_port *p = h->cp__port;
    ep_state *s = state_of(p);
    h->cp__flags &= (uint16_t)~CP__H_ATTACHED;
    epoll_ctl(s->epfd, EPOLL_CTL_DEL, h->fd, NULL);
    bool deferred = false;
    cp__lock_acquire(&s->lock);
    if (s->in_poll) {
        /* Events copied out of epoll may still name h: keep it until the poll is over. */
        cp_op *close_op = h->cp__aux;
        cp__h_pin(h);
        close_op->cp__next = s->zombie_closes;
        s->zombie_closes = close_op;
        deferred = true;
    }
    cp__lock_release(&s->lock);
    if (deferred)
        ep_wake(p); /* end the poll so the close is not held up by a long wait */
}

static void clear_flag(cp_handle *h, uint16_t f)
{
    h->cp__flags &= (uint16_t)~f;
}

static int step_recv(cp_handle *h, cp_op *op)
{
    if (!(h->cp__flags & CP__H_RD_READY))
        return CP__PENDING;
    for (;;) {
        long n;
        size_t want;
        if (op->cp__flags & CP__OPF_VEC) {
            want = op->cp__len - op->cp__done;
            n = cp__op_recvmsg(op, h->fd, 0);
        } else {
            want = op->cp__len;
            n = cp__sys_recv(h->fd, op->u.buf, want, 0);
        }
        if (n >= 0) {
            /* Drained; the next arrival is a new edge. Not once the peer's FIN was
             * reported: its edge is spent, and the end of stream is still to be read. */
            if ((size_t)n < want && !(h->cp__flags & CP__H_RD_HUP))
                clear_flag(h, CP__H_RD_READY);
            return (int)n;
        }
        if (n == -EINTR)
            continue;
        if (n == -EAGAIN) {
            clear_flag(h, CP__H_RD_READY);
            return CP__PENDING;
        }
        return (int)n;
    }
}

static int step_recv_pool(cp_handle *h, cp_op *op)
{
    if (!(h->cp__flags & CP__H_RD_READY))
        return CP__PENDING;
    cp__bufpool *bp = &h->cp__port->pool;
    int id;
    while ((id = cp__bufpool_get(bp)) < 0) {
        int r = cp__io_starve_locked(h);
        if (r != -EAGAIN)
            return r;
    }
    void *buf = cp__bufpool_addr(bp, (uint16_t)id);
    long n;
    do
        n = cp__sys_recv(h->fd, buf, bp->size, 0);
    while (n == -EINTR);
    if (n > 0) {
        if ((size_t)n < bp->size && !(h->cp__flags & CP__H_RD_HUP))
            clear_flag(h, CP__H_RD_READY);
        op->u.buf = buf;
        return (int)n;
    }
    int err = n < 0 ? (int)-n : 0;
    if (cp__bufpool_put(bp, (uint16_t)id)) {
        /* Someone started waiting while we held it: have the poller serve them (not
         * here, under this handle's lock). */
        __atomic_store_n(&bp->kick, 1, __ATOMIC_RELEASE);
        ep_wake(h->cp__port);
    }
    if (err == EAGAIN) {
        clear_flag(h, CP__H_RD_READY);
        return CP__PENDING;
    }
    return -err;
}

static int step_send(cp_handle *h, cp_op *op)
{
    if (!(h->cp__flags & CP__H_WR_READY))
        return CP__PENDING;
    size_t want = op->cp__len - op->cp__done;
    for (;;) {
        long n;
        if (op->cp__flags & CP__OPF_VEC) {
            n = cp__op_sendmsg(op, h->fd, MSG_NOSIGNAL);
        } else {
            n = cp__sys_send(h->fd, (char *)op->u.buf + op->cp__done, want, MSG_NOSIGNAL);
        }
        if (n >= 0) {
            if ((size_t)n < want)
                clear_flag(h, CP__H_WR_READY); /* full; EPOLLOUT will tell us */
            return (int)n;
        }
        if (n == -EINTR)
            continue;
        if (n == -EAGAIN) {
            clear_flag(h, CP__H_WR_READY);
            return CP__PENDING;
        }
        return (int)n;
    }
}

/* ep_try_send() of several buffers: out of line, so that the common single buffer's path
 * carries no msghdr and no loop around it. */
static __attribute__((noinline)) long try_sendmsg(int fd, const struct iovec *iov, int iovcnt)
{
    struct msghdr msg = {.msg_iov = (struct iovec *)(uintptr_t)iov, .msg_iovlen = (size_t)iovcnt};
    long n;
    do
        n = cp__sys_sendmsg(fd, &msg, MSG_NOSIGNAL);
    while (n == -EINTR);
    return n;
}

static long ep_try_send(cp_handle *h, const struct iovec *iov, int iovcnt, size_t len)
{
    if (!(h->cp__flags & CP__H_WR_READY))
        return -EAGAIN;
    long n;
    if (iovcnt == 1) {
        do
            n = cp__sys_send(h->fd, iov->iov_base, iov->iov_len, MSG_NOSIGNAL);
        while (n == -EINTR);
    } else {
        n = try_sendmsg(h->fd, iov, iovcnt);
    }
    if (n == -EAGAIN || (n >= 0 && (size_t)n < len))
        clear_flag(h, CP__H_WR_READY); /* full; EPOLLOUT will tell us */
    return n;
}

/* One more accept in its first-data phase: make sure zops has room for its cancel. */
static int phase_reserve(ep_state *s)
{
    cp__lock_acquire(&s->lock);
    int r = CP__INJECT_FAIL("ep_phase_reserve") ? -ENOMEM
                                                : grow((void **)&s->zops, &s->czops, s->nphase);
    if (r == 0)
        s->nphase++;
    cp__lock_release(&s->lock);
    return r;
}

static void phase_release(ep_state *s)
{
    cp__lock_acquire(&s->lock);
    s->nphase--;
    cp__lock_release(&s->lock);
}

/* An accept waiting for its first data: try the new socket; if it has nothing yet, watch
 * it (one-shot) on the poller's epoll set, pinning the listener while registered. */
static int step_firstdata(cp_handle *h, cp_op *op)
{
    cp_accept_op *aop = CP_CONTAINER_OF(op, cp_accept_op, op);
    ep_state *s = state_of(h->cp__port);
    ssize_t n;
    do
        n = recv(aop->fd, op->u.buf, op->cp__len, 0);
    while (n < 0 && errno == EINTR);
    int r = n < 0 ? -errno : (int)n;
    if (r == -EAGAIN) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLONESHOT,
                                 .data.u64 = (uint64_t)(uintptr_t)op | TAG_FIRSTDATA};
        bool entering = !(op->cp__flags & CP__OPF_PHASE);
        if (entering && (r = phase_reserve(s)) < 0)
            return r;
        cp__hb_release(op);
        if (epoll_ctl(s->epfd, entering ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, aop->fd, &ev) == 0) {
            if (entering) {
                op->cp__flags |= CP__OPF_PHASE;
                cp__h_pin(h);
            }
            return CP__PENDING;
        }
        r = -errno; /* fails the accept; leaves the phase below (its pin and reservation) */
        if (entering)
            phase_release(s);
    }
    if (op->cp__flags & CP__OPF_PHASE) {
        epoll_ctl(s->epfd, EPOLL_CTL_DEL, aop->fd, NULL);
        op->cp__flags &= (uint16_t)~CP__OPF_PHASE;
        cp__h_unpin(h);
        phase_release(s);
    }
    return r;
}

static int step_accept(cp_handle *h, cp_op *op)
{
    if (op->cp__flags & CP__OPF_FIRSTDATA)
        return step_firstdata(h, op);
    if (!(h->cp__flags & CP__H_RD_READY))
        return CP__PENDING;
    cp_accept_op *aop = CP_CONTAINER_OF(op, cp_accept_op, op);
    for (;;) {
        aop->addrlen = sizeof(aop->addr);
        long fd = cp__sys_accept4(h->fd, (struct sockaddr *)&aop->addr, &aop->addrlen,
                                  SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0)
            return (int)fd;
        if (fd == -EINTR || fd == -ECONNABORTED)
            continue;
        if (fd == -EAGAIN) {
            clear_flag(h, CP__H_RD_READY);
            return CP__PENDING;
        }
        return (int)fd;
    }
}

/* A stream socket registered before its connect() reports a hang-up at once (it has no
 * peer yet), and that makes CP__H_RD_HUP stick: every short read of the connection would
 * then cost a further read that finds nothing. Once connected, the flag is what the socket
 * reports now. Cleared first, so an edge arriving meanwhile sets it again. */
static int connected(cp_handle *h)
{
    if ((h->cp__flags & (CP__H_RD_HUP | CP__H_DGRAM)) == CP__H_RD_HUP) {
        clear_flag(h, CP__H_RD_HUP);
        struct pollfd pf = {.fd = h->fd, .events = POLLIN | POLLPRI | POLLRDHUP};
        int n = poll(&pf, 1, 0);
        if (n < 0 || (n == 1 && (pf.revents & (POLLPRI | POLLRDHUP | POLLHUP | POLLERR))))
            h->cp__flags |= CP__H_RD_HUP;
    }
    return 0;
}

static int step_connect(cp_handle *h, cp_op *op)
{
    if (!(op->cp__flags & CP__OPF_PHASE)) {
        if (connect(h->fd, op->u.buf, op->cp__len) == 0)
            return connected(h);
        if (errno != EINPROGRESS && errno != EINTR)
            return -errno;
        op->cp__flags |= CP__OPF_PHASE;
        clear_flag(h, CP__H_WR_READY);
        return CP__PENDING;
    }
    if (!(h->cp__flags & CP__H_WR_READY))
        return CP__PENDING;
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(h->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return -errno;
    if (err)
        return -err;
    /* A writable edge left over from before connect() can arrive first: only a socket
     * with a peer is connected. */
    struct sockaddr_storage peer;
    socklen_t plen = sizeof(peer);
    if (getpeername(h->fd, (struct sockaddr *)&peer, &plen) < 0) {
        if (errno != ENOTCONN)
            return -errno;
        /* Not connected: still connecting, or failed with an error that someone else
         * has already taken off the socket (receives queued meanwhile wait for the
         * connect, but the caller's own getsockopt(SO_ERROR) or a receive started before
         * the connect may). A socket still connecting reports nothing; a failed one
         * reports a hang-up, and no further edge will come for it. */
        struct pollfd pf = {.fd = h->fd, .events = POLLOUT};
        if (poll(&pf, 1, 0) == 1 && (pf.revents & (POLLHUP | POLLERR))) {
            len = sizeof(err);
            if (getsockopt(h->fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err)
                return -err;
            return -ENOTCONN;
        }
        clear_flag(h, CP__H_WR_READY);
        return CP__PENDING;
    }
    return connected(h);
}

/* ---- files: blocking threads ---- */

static void *job_main(void *arg)
{
    ep_state *s = arg;
    pthread_mutex_lock(&s->jobs_lock);
    for (;;) {
        while (!s->jobs_head && !s->jobs_stop) {
            pthread_cond_wait(&s->jobs_cond, &s->jobs_lock);
            CP__INJECT_DELAY("file_thread_woken");
        }
        if (!s->jobs_head)
            break;
        cp_file_op *f = s->jobs_head;
        s->jobs_head = f->cp__job_next;
        if (!s->jobs_head)
            s->jobs_tail = NULL;
        pthread_mutex_unlock(&s->jobs_lock);
        cp_op *op = &f->op;
        int fd = op->cp__h->fd;
        off_t at = (off_t)(f->offset + op->cp__done);
        ssize_t n;
        do {
            if (op->opcode == CP_OP_READ)
                n = pread(fd, op->u.buf, op->cp__len, at);
            else
                n = pwrite(fd, (char *)op->u.buf + op->cp__done, op->cp__len - op->cp__done, at);
        } while (n < 0 && errno == EINTR);
        cp__oplist done = {0};
        cp__io_done(op, n < 0 ? -errno : (int)n, &done);
        cp__io_deliver(s->port, &done);
        pthread_mutex_lock(&s->jobs_lock);
    }
    pthread_mutex_unlock(&s->jobs_lock);
    return NULL;
}

/* Failure point file_thread_<i> (ASan build): the pool's i-th pthread_create fails. */
static bool job_thread_fail(unsigned i)
{
#ifdef CPORT_INJECT
    char point[32];
    snprintf(point, sizeof(point), "file_thread_%u", i);
    return CP__INJECT_FAIL(point);
#else
    (void)i;
    return false;
#endif
}

static int start_file_job(cp_handle *h, cp_op *op)
{
    ep_state *s = state_of(h->cp__port);
    cp_file_op *f = CP_CONTAINER_OF(op, cp_file_op, op);
    pthread_mutex_lock(&s->jobs_lock);
    if (!s->job_threads) {
        unsigned n = h->cp__port->opts.file_threads ? h->cp__port->opts.file_threads : 2;
        s->job_threads = calloc(n, sizeof(*s->job_threads));
        /* Threads that could start are packed at the front: ep_fini joins the first
         * njob_threads (a failure between two successes must leave no hole there). */
        for (unsigned i = 0; s->job_threads && i < n; i++)
            if (!job_thread_fail(i) &&
                cp__thread_start(&s->job_threads[s->njob_threads], "cport-file", job_main, s) == 0)
                s->njob_threads++;
        if (s->njob_threads == 0) {
            free(s->job_threads);
            s->job_threads = NULL;
            pthread_mutex_unlock(&s->jobs_lock);
            return -EAGAIN;
        }
    }
    f->cp__job_next = NULL;
    if (s->jobs_tail)
        s->jobs_tail->cp__job_next = f;
    else
        s->jobs_head = f;
    s->jobs_tail = f;
    cp__h_pin(h); /* the job's; cp__io_done drops it */
    pthread_cond_signal(&s->jobs_cond);
    pthread_mutex_unlock(&s->jobs_lock);
    return CP__PENDING;
}

/* Pull a job back if no thread took it yet. */
static bool unqueue_file_job(ep_state *s, cp_op *op)
{
    cp_file_op *f = CP_CONTAINER_OF(op, cp_file_op, op);
    bool found = false;
    pthread_mutex_lock(&s->jobs_lock);
    cp_file_op *prev = NULL;
    for (cp_file_op *j = s->jobs_head; j; prev = j, j = j->cp__job_next) {
        if (j == f) {
            if (prev)
                prev->cp__job_next = j->cp__job_next;
            else
                s->jobs_head = j->cp__job_next;
            if (s->jobs_tail == j)
                s->jobs_tail = prev;
            found = true;
            break;
        }
    }
    pthread_mutex_unlock(&s->jobs_lock);
    return found;
}

/* ---- transmit and connect-with-data ---- */

static int ep_file_leg(cp_handle *h, cp_transmit_op *t, int fd, int64_t offset, uint64_t len)
{
    off_t off = (off_t)offset;
    cp__nopipe g;
    cp__nopipe_begin(&g);
    ssize_t n = sendfile(h->fd, fd, &off, len > (1u << 30) ? (1u << 30) : (size_t)len);
    cp__nopipe_end(&g, n < 0 ? errno : 0);
    if (n < 0)
        return errno == EAGAIN ? CP__AGAIN : errno == EINTR ? 0 : -errno;
    if (n == 0)
        return -EIO; /* the file ended before the range did */
    t->cp__off += (uint64_t)n;
    t->sent += (uint64_t)n;
    return 0;
}

static int step_transmit(cp_handle *h, cp_op *op)
{
    if (!(h->cp__flags & CP__H_WR_READY))
        return CP__PENDING;
    int r = cp__transmit_run(h, CP_CONTAINER_OF(op, cp_transmit_op, op));
    if (r == CP__AGAIN) {
        clear_flag(h, CP__H_WR_READY);
        return CP__PENDING;
    }
    return r;
}

static int step_connect_data(cp_handle *h, cp_op *op)
{
    if (!(h->cp__flags & CP__H_WR_READY))
        return CP__PENDING;
    cp_connect_op *cop = CP_CONTAINER_OF(op, cp_connect_op, op);
    for (;;) {
        ssize_t n = send(h->fd, (const char *)cop->cp__data + op->cp__done,
                         cop->cp__data_len - op->cp__done, MSG_NOSIGNAL);
        if (n >= 0)
            return (int)n;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            clear_flag(h, CP__H_WR_READY);
            return CP__PENDING;
        }
        return -errno;
    }
}

/* Every operation but a plain receive or send: kept out of ep_start, so that those two,
 * started once or twice per message, do not pay for the others' stack frame. */
static __attribute__((noinline)) int start_other(cp_handle *h, cp_op *op)
{
    switch (op->opcode) {
    case CP_OP_READ:
    case CP_OP_WRITE:
        return start_file_job(h, op);
    case CP_OP_TRANSMIT:
        return step_transmit(h, op);
    case CP_OP_RECV_POOL:
        return step_recv_pool(h, op);
    case CP_OP_ACCEPT:
        return step_accept(h, op);
    case CP_OP_CONNECT:
        return (op->cp__flags & CP__OPF_CONNECTED) ? step_connect_data(h, op) : step_connect(h, op);
    case CP_OP_DISCONNECT:
        return shutdown(h->fd, SHUT_WR) == 0 ? 0 : -errno;
    default:
        return -EOPNOTSUPP;
    }
}

static int ep_start(cp_op *op)
{
    cp_handle *h = op->cp__h;
    if (op->opcode == CP_OP_RECV)
        return step_recv(h, op);
    if (op->opcode == CP_OP_SEND)
        return step_send(h, op);
    return start_other(h, op);
}

static int ep_cancel(cp_op *op)
{
    if (op->opcode == CP_OP_READ || op->opcode == CP_OP_WRITE) {
        /* Not yet taken by a thread: pull it back; else let the thread finish it. */
        if (unqueue_file_job(state_of(op->cp__h->cp__port), op)) {
            cp__h_unpin(op->cp__h);
            return 0;
        }
        return CP__PENDING;
    }
    /* Only a first-data accept is known to the kernel; everything else just waits for
     * readiness and can be detached at once. */
    if (op->opcode != CP_OP_ACCEPT || !(op->cp__flags & CP__OPF_PHASE))
        return 0;
    cp_handle *h = op->cp__h;
    ep_state *s = state_of(h->cp__port);
    cp_accept_op *aop = CP_CONTAINER_OF(op, cp_accept_op, op);
    epoll_ctl(s->epfd, EPOLL_CTL_DEL, aop->fd, NULL);
    int r = 0;
    cp__lock_acquire(&s->lock);
    if (s->in_poll) {
        s->zops[s->nzops++] = op; /* room reserved; keeps its pin until the batch is done */
        r = CP__PENDING;
    } else {
        s->nphase--;
    }
    cp__lock_release(&s->lock);
    if (r == 0) {
        op->cp__flags &= (uint16_t)~CP__OPF_PHASE;
        cp__h_unpin(h);
    } else {
        ep_wake(h->cp__port);
    }
    return r;
}

static void ep_pool_stop(cp_handle *h)
{
    (void)h; /* epoll reads only for a waiting receive: nothing runs in the background */
}

const cp__backend cp__backend_epoll = {
    .name = "epoll",
    .kind = CP_BACKEND_EPOLL,
    .init = ep_init,
    .fini = ep_fini,
    .poll = ep_poll,
    .wake = ep_wake,
    .flush = NULL,
    .pool_refill = NULL,
    .pool_stop = ep_pool_stop,
    .file_leg = ep_file_leg,
    .transmit_done = NULL,
    .attach = ep_attach,
    .detach = ep_detach,
    .start = ep_start,
    .try_send = ep_try_send,
    .cancel = ep_cancel,
};
