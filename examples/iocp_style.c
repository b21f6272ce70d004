/* iocp_style: an echo server written the way a Windows IOCP server is written, for teams
 * porting one (docs/porting.md maps every Win32 call to cport).
 *
 *   Windows                                   here
 *   CreateIoCompletionPort(INVALID_HANDLE_VALUE, NULL, 0, 0)
 *                                             cp_port_create_ex() (concurrency 0 = CPUs)
 *   CreateIoCompletionPort(sock, port, key, 0)
 *                                             cp_socket_associate(&h->s, port, fd, key)
 *   GetQueuedCompletionStatusEx loop          cp_port_dequeue(port, batch, BATCH, -1)
 *   PER_IO_DATA deriving from OVERLAPPED      io_ctx: embeds a cp_op, plus an op type
 *   PER_HANDLE_DATA as the completion key     handle: its address is the key
 *   pre-posted AcceptEx                       cp_socket_accept(), ACCEPTS of them
 *   WSARecv / WSASend                         cp_socket_recv() / cp_socket_send()
 *   closesocket with I/O pending              cp_socket_close(): pending operations
 *                                             complete with -ECANCELED, then the close's
 *                                             own context completes
 *   PostQueuedCompletionStatus(port, 0, 0, NULL) as the quit message
 *                                             cp_port_post(port, KEY_QUIT, 0, NULL)
 *   GetQueuedCompletionStatus with a timeout  cp_port_dequeue(..., ms): -ETIMEDOUT
 *
 * Each connection has one operation outstanding at a time, on one per-I/O context:
 * receive, send back what came, receive again. So no two threads ever hold completions of
 * the same connection's data, and the echo needs no reordering (several receives
 * outstanding would: see echo_raw.c --recvs).
 *
 * Out of descriptors (or memory), an accept fails at once, and re-posting it at once would
 * fail at once again: the failed accept contexts are parked, and re-posted 100 ms later by
 * whichever worker's dequeue returns then (the workers dequeue with a timeout while any is
 * parked). A worker never sleeps instead: completions of other connections would wait
 * behind it (with one worker and 16 accepts failing, an echo took seconds).
 *
 * Shutdown (SIGINT/SIGTERM): main posts the quit message; the worker that dequeues it
 * closes the listener and every connection. The thread that handles the last completion
 * of the last handle closes the port; every worker's dequeue then fails with -ECANCELED
 * and the thread returns. main joins them and destroys the port.
 */
#include "cport.h"

#include "../tools/common/address.h" /* address_listen: IPv4 and IPv6 */

#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum {
    ACCEPTS = 16,          /* accepts kept posted on the listener */
    BATCH = 32,            /* completions one dequeue may return (GetQueuedCompletionStatusEx) */
    BUF_SIZE = 16384,      /* each connection's receive buffer */
    ACCEPT_RETRY_MS = 100, /* pause after EMFILE/ENFILE/ENOBUFS/ENOMEM before accepting again */
};

/* The key of the quit message. No handle is associated with key 0 (handles use their
 * address), so a completion with key 0 can only be a post. */
#define KEY_QUIT ((uintptr_t)0)

typedef enum io_type { IO_ACCEPT, IO_RECV, IO_SEND, IO_CLOSE } io_type;

/* The per-I/O context: what an IOCP program derives from OVERLAPPED. A completion hands
 * back the cp_op* it was started with; CP_CONTAINER_OF (CONTAINING_RECORD) gives the
 * io_ctx. The cp_op may sit anywhere in the struct; an accept's is the first member of
 * its cp_accept_op, so both union members start at the same address. */
typedef struct io_ctx {
    union {
        cp_op op;            /* a receive's, send's or close's */
        cp_accept_op accept; /* an accept's: accept.op, plus the new fd and the peer */
    } u;
    io_type type;
} io_ctx;

/* The per-handle context, whose address is the completion key. */
typedef struct handle {
    cp_socket s;   /* must not move or be freed while the socket is in use */
    bool listener; /* the listener (not freed) or a connection (freed at the end) */
    /* Operations started and not yet handled, plus one for the close to come, plus one
     * while a thread sets the connection up. IOCP servers keep the same count: the
     * close's completion may be dequeued while another thread still handles an earlier
     * completion of the handle, so memory is freed by whoever drops the count to 0. */
    unsigned refs;
    int closing;                /* cp_socket_close() called, by the data path or by the shutdown */
    struct handle *prev, *next; /* the server's list of connections */
    io_ctx data;                /* the one receive/send context */
    io_ctx close;               /* the close's context */
    char buf[BUF_SIZE];
} handle;

typedef struct server {
    cp_port *port;
    handle listener;
    io_ctx accepts[ACCEPTS];
    pthread_mutex_t lock; /* everything below */
    handle *conns;
    int stopping; /* written under the lock, also read without it */
    bool listener_done;
    /* Accept contexts parked after a resource error, each holding a listener count, and
     * when to re-post them (CLOCK_MONOTONIC ms; also read without the lock, as a hint). */
    io_ctx *parked[ACCEPTS];
    unsigned nparked;
    int64_t retry_at;
    unsigned long long accepted, rejected, closed;
} server;

/* Drop one count; at zero every completion of h has been handled (its close's last). */
static void handle_unref(server *sv, handle *h)
{
    if (__atomic_sub_fetch(&h->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    pthread_mutex_lock(&sv->lock);
    if (h->listener) {
        sv->listener_done = true;
    } else {
        if (h->prev)
            h->prev->next = h->next;
        else
            sv->conns = h->next;
        if (h->next)
            h->next->prev = h->prev;
        sv->closed++;
    }
    bool done = sv->stopping && sv->listener_done && !sv->conns;
    pthread_mutex_unlock(&sv->lock);
    if (!h->listener)
        free(h);
    /* Nothing is outstanding any more: closing the port makes every worker's dequeue return
     * -ECANCELED once the queue is empty (where a Windows program posts one quit packet per
     * thread). */
    if (done)
        cp_port_close(sv->port);
}

/* closesocket(): once per handle, by whoever comes first (the data path or the shutdown).
 * Operations still outstanding complete with -ECANCELED, then h->close completes. */
static void start_close(server *sv, handle *h)
{
    if (__atomic_exchange_n(&h->closing, 1, __ATOMIC_ACQ_REL))
        return;
    h->close.type = IO_CLOSE;
    /* It cannot fail here (the op is free and nobody closed before); if it did, no
     * completion would come to drop the close's count. */
    if (cp_socket_close(&h->s, &h->close.u.op) < 0)
        handle_unref(sv, h);
}

/* WSARecv. The count goes up before the start: the completion may be dequeued and handled
 * on another thread before cp_socket_recv() returns. */
static void post_recv(server *sv, handle *h)
{
    h->data.type = IO_RECV;
    __atomic_add_fetch(&h->refs, 1, __ATOMIC_ACQ_REL);
    /* 0 is ERROR_IO_PENDING: one completion follows. A negative errno means none will
     * (-EBADF: the shutdown closed the socket meanwhile). */
    if (cp_socket_recv(&h->s, &h->data.u.op, h->buf, sizeof h->buf) < 0) {
        start_close(sv, h);
        handle_unref(sv, h);
    }
}

/* WSASend of what the receive brought. It completes when every byte is with the kernel:
 * there is no short send to continue. */
static void post_send(server *sv, handle *h, size_t len)
{
    h->data.type = IO_SEND;
    __atomic_add_fetch(&h->refs, 1, __ATOMIC_ACQ_REL);
    if (cp_socket_send(&h->s, &h->data.u.op, h->buf, len) < 0) {
        start_close(sv, h);
        handle_unref(sv, h);
    }
}

/* AcceptEx without first data (len 0: it completes as soon as a connection is taken). */
static void post_accept(server *sv, io_ctx *io)
{
    io->type = IO_ACCEPT;
    __atomic_add_fetch(&sv->listener.refs, 1, __ATOMIC_ACQ_REL);
    int r = cp_socket_accept(&sv->listener.s, &io->u.accept, NULL, 0);
    if (r < 0) {
        if (r != -EBADF) /* -EBADF: the listener is closing */
            fprintf(stderr, "iocp_style: cannot post an accept: %s\n", cp_strerror(r));
        handle_unref(sv, &sv->listener);
    }
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* An accept failed for lack of descriptors or memory: park its context until
 * ACCEPT_RETRY_MS from now (re-posted by retry_parked), holding a listener count, so that
 * the listener's close waits for it. */
static void park_accept(server *sv, io_ctx *io)
{
    pthread_mutex_lock(&sv->lock);
    if (!sv->stopping) {
        __atomic_add_fetch(&sv->listener.refs, 1, __ATOMIC_ACQ_REL);
        unsigned n = sv->nparked;
        if (n == 0)
            __atomic_store_n(&sv->retry_at, now_ms() + ACCEPT_RETRY_MS, __ATOMIC_RELAXED);
        sv->parked[n] = io;
        __atomic_store_n(&sv->nparked, n + 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&sv->lock);
}

/* How long a worker may wait in its dequeue: until the parked accepts are due, or forever. */
static int dequeue_timeout(server *sv)
{
    if (!__atomic_load_n(&sv->nparked, __ATOMIC_RELAXED))
        return -1;
    int64_t left = __atomic_load_n(&sv->retry_at, __ATOMIC_RELAXED) - now_ms();
    return left < 0 ? 0 : (int)left;
}

/* Re-post the parked accepts once they are due (or drop them, once stopping). */
static void retry_parked(server *sv, bool force)
{
    if (!__atomic_load_n(&sv->nparked, __ATOMIC_RELAXED))
        return;
    io_ctx *io[ACCEPTS];
    pthread_mutex_lock(&sv->lock);
    unsigned n = 0;
    if (force || now_ms() >= sv->retry_at) {
        n = sv->nparked;
        memcpy(io, sv->parked, n * sizeof io[0]);
        __atomic_store_n(&sv->nparked, 0, __ATOMIC_RELAXED);
    }
    bool stopping = sv->stopping;
    pthread_mutex_unlock(&sv->lock);
    for (unsigned i = 0; i < n; i++) {
        if (!stopping)
            post_accept(sv, io[i]);
        handle_unref(sv, &sv->listener); /* the parked context's count */
    }
}

/* The accepted fd is not associated with anything yet (as an AcceptEx socket is not):
 * give it a handle whose address is its key. */
static void new_conn(server *sv, int fd)
{
    handle *h = calloc(1, sizeof *h);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (!h || cp_socket_associate(&h->s, sv->port, fd, (uintptr_t)h) < 0) {
        close(fd); /* not associated: the fd is still ours */
        free(h);
        pthread_mutex_lock(&sv->lock);
        sv->rejected++;
        pthread_mutex_unlock(&sv->lock);
        return;
    }
    h->refs = 2; /* its close to come, and this set-up (the shutdown may close it at once) */
    pthread_mutex_lock(&sv->lock);
    h->next = sv->conns;
    if (h->next)
        h->next->prev = h;
    sv->conns = h;
    sv->accepted++;
    /* Checked under the lock the shutdown's walk holds: the walk saw this connection, or
     * this sees the shutdown. */
    bool stopping = sv->stopping;
    pthread_mutex_unlock(&sv->lock);
    if (stopping)
        start_close(sv, h);
    else
        post_recv(sv, h);
    handle_unref(sv, h);
}

/* The quit message: close the listener (its accepts complete with -ECANCELED) and every
 * connection. */
static void begin_shutdown(server *sv)
{
    pthread_mutex_lock(&sv->lock);
    __atomic_store_n(&sv->stopping, 1, __ATOMIC_RELEASE);
    /* A handle in the list is not freed while the lock is held (it is unlinked under it
     * first), so the walk may touch every one. */
    for (handle *h = sv->conns; h; h = h->next)
        start_close(sv, h);
    pthread_mutex_unlock(&sv->lock);
    start_close(sv, &sv->listener);
    retry_parked(sv, true); /* parked accepts are not re-posted: drop their counts */
}

/* One completion. The key says which handle; the op type says which operation. */
static void dispatch(server *sv, const cp_completion *c)
{
    if (c->key == KEY_QUIT) {
        begin_shutdown(sv);
        return;
    }
    handle *h = (handle *)c->key;
    io_ctx *io = CP_CONTAINER_OF(c->op, io_ctx, u.op);
    /* From here on the context is ours again and may be started anew. */
    switch (io->type) {
    case IO_ACCEPT:
        if (c->result >= 0) {
            new_conn(sv, io->u.accept.fd); /* read the fd before the context is re-posted */
        } else if (c->result == -EMFILE || c->result == -ENFILE || c->result == -ENOBUFS ||
                   c->result == -ENOMEM) {
            /* Out of descriptors or memory: re-posting at once would fail at once. */
            park_accept(sv, io);
            break;
        } else if (c->result != -ECANCELED) {
            fprintf(stderr, "iocp_style: accept: %s\n", cp_strerror((int)c->result));
        }
        if (!__atomic_load_n(&sv->stopping, __ATOMIC_ACQUIRE))
            post_accept(sv, io);
        break;
    case IO_RECV:
        /* > 0: data. 0: the peer ended its side. < 0: an error, or -ECANCELED (our close;
         * ERROR_OPERATION_ABORTED on Windows). */
        if (c->result > 0)
            post_send(sv, h, (size_t)c->result);
        else
            start_close(sv, h);
        break;
    case IO_SEND:
        if (c->result >= 0)
            post_recv(sv, h);
        else
            start_close(sv, h);
        break;
    case IO_CLOSE:
        break; /* the handle's last completion to come: its own count is dropped below */
    }
    handle_unref(sv, h); /* the count of the operation just handled */
}

/* A worker: the GetQueuedCompletionStatusEx loop. */
static void *worker(void *arg)
{
    server *sv = arg;
    cp_completion batch[BATCH];
    for (;;) {
        /* The thread counts as running from the return until it calls again (Linux cannot
         * see it block): at most `concurrency` threads run the handlers at once. On
         * io_uring, the operations the handlers start go to the kernel together when the
         * thread comes back here. */
        int n = cp_port_dequeue(sv->port, batch, BATCH, dequeue_timeout(sv));
        retry_parked(sv, false);
        if (n == -ECANCELED)
            break; /* the port is closed and nothing is left: the shutdown is over */
        if (n == -ETIMEDOUT)
            continue;
        if (n < 0) {
            fprintf(stderr, "iocp_style: dequeue: %s\n", cp_strerror(n));
            break;
        }
        for (int i = 0; i < n; i++)
            dispatch(sv, &batch[i]);
    }
    return NULL;
}

/* ---- start-up ------------------------------------------------------------------------- */

typedef struct config {
    int port;
    const char *bind;
    unsigned threads;
    cp_backend_kind backend;
} config;

static void usage(FILE *f)
{
    fprintf(f, "usage: iocp_style [options]\n"
               "  --port N       TCP port (default 5050; 0 = any, printed at start)\n"
               "  --bind ADDR    IPv4 or IPv6 address to listen on (default 0.0.0.0; :: is\n"
               "                 every address of both families)\n"
               "  --threads N    worker threads (default: twice the online CPUs)\n"
               "  --backend B    io_uring or epoll (default: io_uring if allowed)\n"
               "  --help         this text\n"
               "SIGINT/SIGTERM close everything cleanly and exit 0.\n");
}

static int parse_args(int argc, char **argv, config *cfg)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    /* Windows' advice: more threads than the concurrency value (the CPUs), so that when
     * one blocks another can take its place. */
    *cfg =
        (config){.port = 5050, .bind = "0.0.0.0", .threads = 2 * (cpus > 0 ? (unsigned)cpus : 1)};
    static const struct option opts[] = {
        {"port", required_argument, 0, 'p'},    {"bind", required_argument, 0, 'b'},
        {"threads", required_argument, 0, 't'}, {"backend", required_argument, 0, 'B'},
        {"help", no_argument, 0, 'h'},          {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        char *end = NULL;
        long v = 0;
        if (ch == 'p' || ch == 't') {
            errno = 0;
            v = strtol(optarg, &end, 10);
            if (errno || *optarg == 0 || *end)
                return -1;
        }
        switch (ch) {
        case 'p':
            if (v < 0 || v > 65535)
                return -1;
            cfg->port = (int)v;
            break;
        case 'b':
            cfg->bind = optarg;
            break;
        case 't':
            if (v < 1 || v > 1024)
                return -1;
            cfg->threads = (unsigned)v;
            break;
        case 'B':
            if (strcmp(optarg, "io_uring") == 0)
                cfg->backend = CP_BACKEND_IO_URING;
            else if (strcmp(optarg, "epoll") == 0)
                cfg->backend = CP_BACKEND_EPOLL;
            else
                return -1;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            return -1;
        }
    }
    return optind == argc ? 0 : -1;
}

int main(int argc, char **argv)
{
    config cfg;
    if (parse_args(argc, argv, &cfg) < 0) {
        usage(stderr);
        return 2;
    }
    /* Signals are taken by sigwait() in main; blocked before any thread starts (cport's
     * own included), so no worker is interrupted by them. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    static server sv; /* large (the listener's handle has a buffer): not on the stack */
    pthread_mutex_init(&sv.lock, NULL);
    /* concurrency 0 = the online CPUs, as NumberOfConcurrentThreads 0 on Windows. */
    cp_port_options po = {.concurrency = 0, .backend = cfg.backend};
    int r = cp_port_create_ex(&sv.port, &po);
    if (r < 0) {
        fprintf(stderr, "iocp_style: cannot create the port: %s\n", cp_strerror(r));
        return 1;
    }
    int port = 0;
    int lfd = address_listen("iocp_style", cfg.bind, cfg.port, 1024, &port);
    sv.listener.listener = true;
    sv.listener.refs = 1; /* its close to come */
    if (lfd < 0 ||
        (r = cp_socket_associate(&sv.listener.s, sv.port, lfd, (uintptr_t)&sv.listener)) < 0) {
        if (lfd >= 0) {
            fprintf(stderr, "iocp_style: cannot associate the listener: %s\n", cp_strerror(r));
            close(lfd);
        }
        cp_port_close(sv.port);
        cp_port_destroy(sv.port);
        return 1;
    }
    printf("iocp_style: backend=%s threads=%u concurrency=%u bind=%s port=%d accepts=%d\n",
           cp_port_backend_name(sv.port), cfg.threads, cp_port_concurrency(sv.port), cfg.bind, port,
           ACCEPTS);
    char at[INET6_ADDRSTRLEN + 16];
    printf("listening on %s\n", address_port_text(at, sizeof at, cfg.bind, (unsigned)port));
    fflush(stdout);

    for (int i = 0; i < ACCEPTS; i++)
        post_accept(&sv, &sv.accepts[i]);
    pthread_t *threads = calloc(cfg.threads, sizeof *threads);
    unsigned started = 0;
    while (threads && started < cfg.threads &&
           pthread_create(&threads[started], NULL, worker, &sv) == 0)
        started++;
    int sig = SIGTERM;
    if (started < cfg.threads)
        fprintf(stderr, "iocp_style: started %u of %u worker threads\n", started, cfg.threads);
    if (started > 0)
        sigwait(&sigs, &sig);

    /* PostQueuedCompletionStatus(port, 0, KEY_QUIT, NULL): one worker starts the shutdown.
     * -EAGAIN means the port's post queue is full for the moment. */
    while ((r = cp_port_post(sv.port, KEY_QUIT, 0, NULL)) == -EAGAIN)
        usleep(1000);
    if (started == 0)
        worker(&sv); /* no worker: main drains the shutdown itself */
    for (unsigned i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    printf("iocp_style: %s: accepted=%llu rejected=%llu closed=%llu\n", strsignal(sig), sv.accepted,
           sv.rejected, sv.closed);
    /* Every thread is gone and every handle's close completion was dequeued. */
    cp_port_destroy(sv.port);
    pthread_mutex_destroy(&sv.lock);
    free(threads);
    return started ? 0 : 1;
}
