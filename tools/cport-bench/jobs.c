/* cport-bench: the connection job runner (connect, optionally echo one message, then keep or
 * close), used to establish connections in every mode and as the whole of connrate. */
#include "bench.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

enum { S_FREE, S_CONNECTING, S_ECHO };
enum { RXBUF = 64 * 1024, MAX_EVENTS = 256 };

struct slot {
    int fd;
    int state;
    uint64_t job, id;
    int64_t t0, deadline;
    size_t tx_off, rx_off;
    const uint8_t *msg;
};

int jobrun_init(struct jobrun *r)
{
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (r->epfd < 0)
        return -1;
    r->slots = calloc((size_t)r->nslots, sizeof *r->slots);
    r->free_list = calloc((size_t)r->nslots, sizeof *r->free_list);
    r->rxbuf = malloc(RXBUF);
    if (!r->slots || !r->free_list || !r->rxbuf)
        return -1;
    for (int i = 0; i < r->nslots; i++) {
        r->slots[i].fd = -1;
        r->free_list[i] = r->nslots - 1 - i;
    }
    r->nfree = r->nslots;
    r->hist.min = UINT64_MAX;
    return 0;
}

void jobrun_free(struct jobrun *r)
{
    for (int i = 0; i < r->nslots; i++)
        if (r->slots && r->slots[i].fd >= 0)
            close(r->slots[i].fd);
    if (r->epfd >= 0)
        close(r->epfd);
    free(r->slots);
    free(r->free_list);
    free(r->rxbuf);
}

static void slot_release(struct jobrun *r, struct slot *s)
{
    s->state = S_FREE;
    s->fd = -1;
    r->free_list[r->nfree++] = (int)(s - r->slots);
}

static void slot_fail(struct jobrun *r, struct slot *s, uint64_t *counter)
{
    (*counter)++;
    if (s->fd >= 0)
        close(s->fd);
    if (r->keep)
        r->fds[s->job] = -1;
    slot_release(r, s);
}

/* A connect failed with err: counted, and the first one's reason kept for the report. */
static void connect_fail(struct jobrun *r, struct slot *s, int err)
{
    if (!r->err.connect_errno)
        r->err.connect_errno = err ? err : ECONNABORTED;
    slot_fail(r, s, &r->err.connect_errors);
}

static void slot_done(struct jobrun *r, struct slot *s, int64_t now, bool registered)
{
    uint64_t lat = (uint64_t)(now - s->t0);
    r->done++;
    r->last_ns = now;
    if (r->keep) {
        if (registered)
            epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->fd, NULL);
        r->fds[s->job] = s->fd;
        hist_add(&r->hist, lat);
    } else {
        close(s->fd);
        if (now >= atomic_load_explicit(r->win_start, memory_order_relaxed) &&
            now < atomic_load_explicit(r->win_end, memory_order_relaxed)) {
            hist_add(&r->hist, lat);
            r->win_done++;
        }
    }
    atomic_store_explicit(&r->progress, r->done, memory_order_relaxed);
    slot_release(r, s);
}

static void slot_set_events(struct jobrun *r, struct slot *s, uint32_t events, int op)
{
    struct epoll_event ev = {.events = events, .data.ptr = s};
    if (epoll_ctl(r->epfd, op, s->fd, &ev) < 0) {
        fprintf(stderr, "cport-bench: epoll_ctl: %s\n", strerror(errno));
        exit(1);
    }
}

/* Writes what is left of the message; returns false if the slot failed. */
static bool slot_write(struct jobrun *r, struct slot *s)
{
    size_t size = r->o->size;
    while (s->tx_off < size) {
        ssize_t w = send(s->fd, s->msg + s->tx_off, size - s->tx_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return true;
            slot_fail(r, s, &r->err.resets);
            return false;
        }
        s->tx_off += (size_t)w;
    }
    /* connrate half-closes once the message is out: the server's end of stream then tells
     * when it has sent everything, and whatever comes after the echo is caught (a late
     * duplicate would otherwise arrive after the client had closed). */
    if (!r->keep && shutdown(s->fd, SHUT_WR) < 0) {
        slot_fail(r, s, &r->err.resets);
        return false;
    }
    return true;
}

/* Connected: either done, or start the echo. */
static void slot_connected(struct jobrun *r, struct slot *s, int64_t now, bool registered)
{
    if (!r->echo) {
        slot_done(r, s, now, registered);
        return;
    }
    s->state = S_ECHO;
    s->msg = msg_bytes(s->id, 0);
    if (!slot_write(r, s))
        return;
    uint32_t ev = s->tx_off < r->o->size ? EPOLLIN | EPOLLOUT : EPOLLIN;
    slot_set_events(r, s, ev, registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD);
}

static void slot_start(struct jobrun *r, struct slot *s, uint64_t job)
{
    int64_t now = now_ns();
    s->job = job;
    s->id = r->id_base + job;
    s->t0 = now;
    s->deadline = now + (int64_t)r->o->connect_timeout_ms * 1000000;
    s->tx_off = s->rx_off = 0;
    s->state = S_CONNECTING;
    if (!r->first_ns)
        r->first_ns = now;
    bool done;
    s->fd = start_connect(r->o, r->src_base + job, &done);
    if (s->fd < 0) {
        connect_fail(r, s, errno);
        return;
    }
    if (done)
        slot_connected(r, s, now, false);
    else
        slot_set_events(r, s, EPOLLOUT, EPOLL_CTL_ADD);
}

static void slot_readable(struct jobrun *r, struct slot *s)
{
    size_t size = r->o->size;
    for (;;) {
        ssize_t n = recv(s->fd, r->rxbuf, RXBUF, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                slot_fail(r, s, &r->err.resets);
            return;
        }
        if (n == 0) {
            if (s->rx_off == size && !r->keep) /* connrate: the server closed after the echo */
                slot_done(r, s, now_ns(), true);
            else
                slot_fail(r, s, &r->err.eof);
            return;
        }
        /* Beyond what was sent (also after the whole echo, before the server's end of
         * stream), or not what was sent. */
        if (s->rx_off + (size_t)n > s->tx_off ||
            memcmp(r->rxbuf, s->msg + s->rx_off, (size_t)n) != 0) {
            slot_fail(r, s, &r->err.verify_errors);
            return;
        }
        s->rx_off += (size_t)n;
        if (s->rx_off == size) {
            if (r->keep) {
                slot_done(r, s, now_ns(), true);
                return;
            }
            continue; /* the end of stream usually came with the echo: read it now */
        }
        if (n < RXBUF)
            return;
    }
}

static void slot_event(struct jobrun *r, struct slot *s, uint32_t events, int64_t now)
{
    if (s->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err || !(events & EPOLLOUT)) {
            connect_fail(r, s, err);
            return;
        }
        slot_connected(r, s, now, true);
        return;
    }
    if (s->state != S_ECHO)
        return;
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        slot_readable(r, s);
        if (s->state != S_ECHO)
            return;
    }
    if ((events & EPOLLOUT) && s->tx_off < r->o->size) {
        if (!slot_write(r, s))
            return;
        if (s->tx_off == r->o->size)
            slot_set_events(r, s, EPOLLIN, EPOLL_CTL_MOD);
    }
}

static bool may_start(struct jobrun *r, int64_t now)
{
    if (r->keep)
        return r->next_job < r->njobs && !bench_stopped();
    /* connrate: the load goes on until the window's end (also when interrupted). */
    return now < atomic_load_explicit(r->win_end, memory_order_relaxed);
}

void jobrun_run(struct jobrun *r)
{
    struct epoll_event evs[MAX_EVENTS];
    int64_t last_scan = now_ns();
    for (;;) {
        int64_t now = now_ns();
        /* Slots freed while handling the last batch restart only now, so that a stale event
         * of that batch can never be applied to a slot's new socket. A slot whose start
         * fails at once is not retried before the next epoll_wait. */
        for (int starts = r->nfree; starts > 0 && r->nfree > 0 && may_start(r, now); starts--) {
            struct slot *s = &r->slots[r->free_list[--r->nfree]];
            slot_start(r, s, r->next_job++);
        }
        if (r->nfree == r->nslots && !may_start(r, now))
            break;
        /* If every slot failed at once (server down), back off a little instead of spinning. */
        int n = epoll_wait(r->epfd, evs, MAX_EVENTS, r->nfree == r->nslots ? 1 : 20);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "cport-bench: epoll_wait: %s\n", strerror(errno));
            exit(1);
        }
        now = now_ns();
        for (int i = 0; i < n; i++)
            slot_event(r, evs[i].data.ptr, evs[i].events, now);
        if (now - last_scan >= 10000000) {
            last_scan = now;
            for (int i = 0; i < r->nslots; i++) {
                struct slot *s = &r->slots[i];
                if (s->state == S_FREE || now < s->deadline)
                    continue;
                if (s->state == S_CONNECTING)
                    connect_fail(r, s, ETIMEDOUT);
                else
                    slot_fail(r, s, &r->err.timeouts);
            }
        }
    }
}
