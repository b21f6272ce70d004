/* proxy: a TCP forwarding proxy on cport's sockets and worker pool.
 *
 *   proxy --port 8080 --upstream backend.example:80 [--threads N] [--backend io_uring|epoll]
 *
 * Listens on --port; for each client it accepts it opens a socket, connects it to
 * --upstream (cp_socket_connect: ConnectEx), and then forwards bytes both ways until both
 * directions have ended. SIGINT/SIGTERM close everything and exit 0.
 *
 * The layer: cport sockets bound to a cp_pool, for both sides, to show the socket layer
 * (the IOCP shape: contexts, ConnectEx, DisconnectEx) on a real job. The server layer
 * (cport/server.h) could run the client side with less code since it has
 * cp_conn_pause_recv/cp_conn_resume_recv (stop reading a client while its upstream is
 * slow) and the half_close option with on_end and cp_conn_shutdown_send (pass one
 * direction's end through while the other goes on); with plain sockets the proxy decides
 * when to read, and shuts down one direction (cp_socket_disconnect) itself.
 *
 * One connection pair: two cp_sockets (client, upstream) and two directions. Each
 * direction owns one cp_op and one buffer of --buffer bytes (default 32 KiB), and its op
 * alternates: receive from one side into the buffer, send the buffer to the other side,
 * receive again. The next receive starts only when the send has completed, i.e. when the
 * kernel took every byte. That is the backpressure, both ways: a side that does not read
 * fills its socket's send buffer, the send to it waits, the proxy stops reading from the
 * other side, that side's receive buffer fills, and TCP's window stops the sender.
 *
 * Memory bound: a pair's user-space memory is fixed at accept and never grows: the pair
 * struct with its two buffers, 2 x --buffer + about 400 bytes (printed as pair-bytes at
 * start; 64 KiB + 400 B by default). Beyond it only the kernel's buffers of the two
 * sockets hold data in flight, bounded by net.ipv4.tcp_rmem / tcp_wmem.
 *
 * The ends of a stream:
 *   - a receive that returns 0 (the peer shut down its sending side) becomes a
 *     cp_socket_disconnect() of the other side: FIN after the bytes already sent. The other
 *     direction keeps flowing. When both directions have ended, both sockets are closed.
 *   - an error (a reset, a send to a peer that went away, a failed disconnect) aborts the
 *     pair: both sockets get SO_LINGER {1, 0} and are closed, so the other peer sees a
 *     reset too, not a clean end that would pass a cut stream for a whole one. Limit: once
 *     a direction has ended, nothing is outstanding on its source socket, so a reset from
 *     that peer is noticed at the next send to it (cport has no operation that waits for
 *     an error alone, as poll's POLLERR would).
 *   - an upstream that refuses, or does not answer within --connect-timeout (the connect
 *     op's timeout_ms), closes the client at once (counted as upstream_failed). The
 *     client's first bytes are not awaited before connecting (AcceptEx with a buffer): an
 *     upstream that speaks first (SMTP, SSH) would never be reached.
 *
 * Out of descriptors (a pair takes two), accepting pauses for ACCEPT_RETRY_MS: a client
 * accepted with no descriptor left for its upstream socket waits for one (its acceptor
 * retries after the pause), and the clients behind it wait in the listener's backlog,
 * until pairs close. (It was closed at once, which freed the descriptor for the next
 * accept: the whole backlog was accepted and closed, one by one, as "upstream_failed".)
 *
 * Lifetime: a pair counts references, one per operation started (taken before the start:
 * the completion may run on another worker before the start returns), one per close, and
 * one held by whoever sets it up, walks it or handles one of its completions; the last
 * one unlinks and frees it (the close completions come last, but "queued after" is not
 * "handled after" with several workers). The listener counts the same way, so the
 * shutdown can wait for an accept handler still setting a pair up.
 *
 * Shutdown (SIGINT/SIGTERM, taken with sigwait in main): stop accepting, reset every
 * connected pair (both peers: their streams are cut, and a FIN would pass what each got so
 * far for the whole; not counted as aborted) and close the others (still connecting) as a
 * failed connect does, wait until every pair and the listener are gone, destroy the pool.
 */
#include "cport.h"

#include "../src/inject.h" /* CP__INJECT_DELAY: a delay point in -DCPORT_INJECT=ON builds only */
#include "../tools/common/address.h" /* address_listen, address_port_text: IPv4 and IPv6 */

#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

enum {
    ACCEPTS = 16,         /* accepts kept posted on the listener */
    BATCH = 64,           /* completions a worker takes at once */
    ACCEPT_RETRY_MS = 100 /* pause after EMFILE/ENFILE/ENOBUFS/ENOMEM before accepting again */
};

typedef struct config {
    int port;
    const char *bind;
    const char *upstream;
    unsigned threads;
    cp_backend_kind backend;
    unsigned buffer;
    unsigned connect_timeout_ms;
} config;

/* One direction of a pair: reads `from`, writes `to`. */
typedef struct dir {
    cp_op op;
    cp_socket *from, *to;
    char *buf;
} dir;

typedef struct pair {
    cp_socket client;
    cp_socket upstream;
    cp_op client_close, upstream_close;
    dir up;   /* client -> upstream */
    dir down; /* upstream -> client; its op first carries the connect */
    uint32_t refs;
    uint32_t ended;           /* directions whose end was passed on (disconnect done) */
    int closing;              /* the sockets' close has been started (once) */
    bool has_upstream;        /* the upstream socket was made and associated */
    bool connected;           /* atomic: the upstream is connected, bytes may flow */
    struct pair *prev, *next; /* the server's list, for the shutdown walk */
    /* the two buffers follow */
} pair;

typedef struct server server;

typedef struct acceptor {
    cp_accept_op aop;
    cp_timer *retry; /* after a resource error: the pause before accepting again */
    server *sv;
    int client; /* an accepted client waiting for a descriptor for its upstream, or -1 */
} acceptor;

struct server {
    config cfg;
    cp_pool *pool;
    cp_port *port;
    unsigned skip; /* CP_SEND_SKIP_ON_SUCCESS or 0 */
    struct sockaddr_storage up_addr;
    socklen_t up_len;
    cp_io_binding listener_binding, client_binding, upstream_binding;
    cp_socket listener;
    cp_op listener_close;
    uint32_t listener_refs; /* accepts outstanding or waiting to retry, plus the close */
    acceptor accepts[ACCEPTS];
    pthread_mutex_t lock; /* the list, stopping, listener_done; done_cond */
    pthread_cond_t done_cond;
    pair *pairs;
    int stopping;
    bool listener_done;
    /* Counters (atomic). */
    uint64_t accepted, rejected, closed, upstream_failed, aborted, bytes_up, bytes_down;
};

static void count(uint64_t *c, uint64_t n)
{
    __atomic_add_fetch(c, n, __ATOMIC_RELAXED);
}

/* ---- pairs: references, closing ------------------------------------------------------- */

/* Unlinks and frees p. Lock held. */
static void pair_free_locked(server *sv, pair *p)
{
    if (p->prev)
        p->prev->next = p->next;
    else
        sv->pairs = p->next;
    if (p->next)
        p->next->prev = p->prev;
    count(&sv->closed, 1);
    if (sv->stopping && !sv->pairs)
        pthread_cond_broadcast(&sv->done_cond);
    free(p);
}

static void pair_unref(server *sv, pair *p)
{
    if (__atomic_sub_fetch(&p->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    CP__INJECT_DELAY("proxy_last_unref"); /* a shutdown's walk may find p meanwhile */
    pthread_mutex_lock(&sv->lock);
    pair_free_locked(sv, p);
    pthread_mutex_unlock(&sv->lock);
}

/* Takes a reference for an operation about to start. */
static void pair_ref(pair *p)
{
    __atomic_add_fetch(&p->refs, 1, __ATOMIC_RELAXED);
}

/* Takes a reference unless the last one is gone: a pair whose count reached zero is being
 * freed by the thread that dropped it (waiting for the lock to unlink it), and must not be
 * revived by a walk. */
static bool pair_ref_if_live(pair *p)
{
    uint32_t n = __atomic_load_n(&p->refs, __ATOMIC_ACQUIRE);
    do {
        if (n == 0)
            return false;
    } while (!__atomic_compare_exchange_n(&p->refs, &n, n + 1, true, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    return true;
}

/* After a start: a failed one (r < 0) or one finished in the call (CP_DONE_NOW) has no
 * completion to drop its reference. Every caller holds a reference of its own, so this never
 * drops the last one. Returns r. */
static int started(pair *p, int r)
{
    if (r != 0)
        __atomic_sub_fetch(&p->refs, 1, __ATOMIC_RELAXED);
    return r;
}

static void close_socket(pair *p, cp_socket *s, cp_op *op)
{
    pair_ref(p);
    /* It cannot fail: the op is the socket's own and `closing` lets this run once. */
    if (started(p, cp_socket_close(s, op)) < 0)
        fprintf(stderr, "proxy: cannot close a socket\n");
}

/* A reset makes the kernel send RST on close instead of FIN. */
static void set_reset_on_close(cp_socket *s)
{
    struct linger l = {.l_onoff = 1, .l_linger = 0};
    setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

enum close_mode {
    CLOSE_FIN,   /* both peers get a FIN */
    CLOSE_ABORT, /* an error: both peers get a reset, counted as aborted */
    CLOSE_STOP,  /* the shutdown: both peers get a reset */
};

/* Closes both sockets, once (operations outstanding complete with -ECANCELED). The caller
 * holds a reference. */
static void pair_close(server *sv, pair *p, enum close_mode mode)
{
    if (__atomic_exchange_n(&p->closing, 1, __ATOMIC_ACQ_REL))
        return;
    if (mode != CLOSE_FIN) {
        if (mode == CLOSE_ABORT)
            count(&sv->aborted, 1);
        /* The descriptors are still the sockets' own: only this call closes them. */
        set_reset_on_close(&p->client);
        if (p->has_upstream)
            set_reset_on_close(&p->upstream);
    }
    close_socket(p, &p->client, &p->client_close);
    if (p->has_upstream)
        close_socket(p, &p->upstream, &p->upstream_close);
}

/* ---- forwarding ------------------------------------------------------------------------- */

static uint64_t *dir_bytes(server *sv, pair *p, dir *d)
{
    return d == &p->up ? &sv->bytes_up : &sv->bytes_down;
}

static void recv_next(server *sv, pair *p, dir *d)
{
    pair_ref(p);
    if (started(p, cp_socket_recv(d->from, &d->op, d->buf, sv->cfg.buffer)) < 0)
        pair_close(sv, p, CLOSE_ABORT); /* -EBADF: the pair is closing already */
}

/* The send of a received block finished (res: its result): receive the next one. */
static void sent(server *sv, pair *p, dir *d, int64_t res)
{
    if (res < 0) {
        pair_close(sv, p, CLOSE_ABORT);
        return;
    }
    count(dir_bytes(sv, p, d), (uint64_t)res);
    recv_next(sv, p, d);
}

static void received(server *sv, pair *p, dir *d, int64_t res)
{
    if (res < 0) { /* a reset, or -ECANCELED by our own close */
        pair_close(sv, p, CLOSE_ABORT);
        return;
    }
    pair_ref(p);
    if (res == 0) {
        /* The end of this direction: FIN to the other side. The op is the direction's only
         * one, so each of its sends has completed: the FIN follows all of their bytes. */
        if (started(p, cp_socket_disconnect(d->to, &d->op)) < 0)
            pair_close(sv, p, CLOSE_ABORT);
        return;
    }
    int r = started(p, cp_socket_send_ex(d->to, &d->op, d->buf, (size_t)res, sv->skip));
    if (r == CP_DONE_NOW)
        sent(sv, p, d, res); /* the kernel took it all in the call: no completion comes */
    else if (r < 0)
        pair_close(sv, p, CLOSE_ABORT);
}

static void ended(server *sv, pair *p, int64_t res)
{
    if (res < 0)
        pair_close(sv, p, CLOSE_ABORT);
    else if (__atomic_add_fetch(&p->ended, 1, __ATOMIC_ACQ_REL) == 2)
        pair_close(sv, p, CLOSE_FIN); /* both ways ended: every byte was passed on */
}

static void connected(server *sv, pair *p, int64_t res)
{
    if (res < 0) {
        /* -ECANCELED: the shutdown closed the pair first. */
        if (res != -ECANCELED && __atomic_add_fetch(&sv->upstream_failed, 1, __ATOMIC_RELAXED) == 1)
            fprintf(stderr, "proxy: cannot connect to %s: %s (further failures are counted)\n",
                    sv->cfg.upstream, cp_strerror((int)res));
        pair_close(sv, p, CLOSE_FIN);
        return;
    }
    __atomic_store_n(&p->connected, true, __ATOMIC_RELEASE);
    p->down.op.timeout_ms = 0; /* read at each start: the receives wait as long as needed */
    recv_next(sv, p, &p->down);
    recv_next(sv, p, &p->up);
}

static void pair_io(server *sv, pair *p, cp_op *op, int64_t res)
{
    dir *d = op == &p->up.op ? &p->up : &p->down;
    switch (op->opcode) {
    case CP_OP_CONNECT:
        connected(sv, p, res);
        break;
    case CP_OP_RECV:
        received(sv, p, d, res);
        break;
    case CP_OP_SEND:
        sent(sv, p, d, res);
        break;
    case CP_OP_DISCONNECT:
        ended(sv, p, res);
        break;
    default: /* CP_OP_CLOSE: only its reference to drop */
        break;
    }
    pair_unref(sv, p); /* this completion's reference, after the last touch of p */
}

static void on_client(cp_socket *s, cp_op *op, int64_t res, void *user)
{
    pair_io(user, CP_CONTAINER_OF(s, pair, client), op, res);
}

static void on_upstream(cp_socket *s, cp_op *op, int64_t res, void *user)
{
    pair_io(user, CP_CONTAINER_OF(s, pair, upstream), op, res);
}

static void nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* An accepted client: make its pair and connect the upstream side (ufd: its socket, or -1
 * when none could be made: the client is closed as when the upstream cannot be reached). */
static void new_pair(server *sv, int fd, int ufd)
{
    pair *p = malloc(sizeof *p + 2 * (size_t)sv->cfg.buffer);
    if (!p) {
        close(fd);
        if (ufd >= 0)
            close(ufd);
        count(&sv->rejected, 1);
        return;
    }
    memset(p, 0, sizeof *p); /* not the buffers: untouched pages cost nothing */
    nodelay(fd);
    if (cp_pool_associate(sv->pool, &p->client, fd, &sv->client_binding) < 0) {
        close(fd); /* not associated: still ours */
        if (ufd >= 0)
            close(ufd);
        free(p);
        count(&sv->rejected, 1);
        return;
    }
    p->refs = 1; /* this set-up's */
    p->up = (dir){.from = &p->client, .to = &p->upstream, .buf = (char *)(p + 1)};
    p->down = (dir){.from = &p->upstream, .to = &p->client, .buf = p->up.buf + sv->cfg.buffer};
    if (ufd >= 0) {
        nodelay(ufd);
        if (cp_pool_associate(sv->pool, &p->upstream, ufd, &sv->upstream_binding) == 0)
            p->has_upstream = true;
        else
            close(ufd);
    }
    pthread_mutex_lock(&sv->lock);
    p->next = sv->pairs;
    if (p->next)
        p->next->prev = p;
    sv->pairs = p;
    /* Read under the lock the shutdown's walk holds: the walk saw p, or this sees it. */
    bool stopping = sv->stopping;
    pthread_mutex_unlock(&sv->lock);
    count(&sv->accepted, 1);
    if (stopping) {
        pair_close(sv, p, CLOSE_FIN);
    } else if (!p->has_upstream) {
        count(&sv->upstream_failed, 1);
        pair_close(sv, p, CLOSE_FIN);
    } else {
        p->down.op.timeout_ms = sv->cfg.connect_timeout_ms;
        pair_ref(p);
        if (started(p, cp_socket_connect(&p->upstream, &p->down.op, (struct sockaddr *)&sv->up_addr,
                                         sv->up_len)) < 0) {
            count(&sv->upstream_failed, 1);
            pair_close(sv, p, CLOSE_FIN);
        }
    }
    pair_unref(sv, p);
}

/* ---- the listener ------------------------------------------------------------------------ */

static void listener_unref(server *sv)
{
    if (__atomic_sub_fetch(&sv->listener_refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    pthread_mutex_lock(&sv->lock);
    sv->listener_done = true;
    pthread_cond_broadcast(&sv->done_cond);
    pthread_mutex_unlock(&sv->lock);
}

static void post_accept(server *sv, acceptor *a)
{
    __atomic_add_fetch(&sv->listener_refs, 1, __ATOMIC_RELAXED);
    int r = cp_socket_accept(&sv->listener, &a->aop, NULL, 0);
    if (r < 0) {
        if (r != -EBADF) /* -EBADF: the listener is closing */
            fprintf(stderr, "proxy: cannot post an accept: %s\n", cp_strerror(r));
        listener_unref(sv);
    }
}

static void retry_accept(void *arg);

/* Out of descriptors or memory: trying again at once would fail at once. Retry after a
 * pause, holding a listener reference meanwhile (the shutdown waits at most the pause). */
static void accept_later(server *sv, acceptor *a)
{
    __atomic_add_fetch(&sv->listener_refs, 1, __ATOMIC_RELAXED);
    if (cp_timer_start(sv->pool, &a->retry, ACCEPT_RETRY_MS, 0, retry_accept, a) < 0) {
        fprintf(stderr, "proxy: accepting stops: no retry timer\n");
        if (a->client >= 0) {
            close(a->client);
            a->client = -1;
            count(&sv->rejected, 1);
        }
        listener_unref(sv);
    }
}

static bool resource_error(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

/* The acceptor's client needs a socket for its upstream. Without a descriptor for it, the
 * client waits (holding the acceptor, which is not posted again meanwhile) and the socket
 * is tried again after a pause: closing the client would free its descriptor for the next
 * accept, whose upstream socket would fail in turn, and the whole backlog would be
 * accepted and closed one by one, where it can wait for descriptors to free up. */
static void pair_client(server *sv, acceptor *a)
{
    int ufd = socket(sv->up_addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ufd < 0 && resource_error(errno) && !__atomic_load_n(&sv->stopping, __ATOMIC_ACQUIRE)) {
        accept_later(sv, a);
        return;
    }
    int fd = a->client;
    a->client = -1;
    new_pair(sv, fd, ufd); /* (stopping: it closes the client) */
    post_accept(sv, a);
}

static void retry_accept(void *arg)
{
    acceptor *a = arg;
    server *sv = a->sv;
    cp_timer_cancel(a->retry, false); /* release the fired one-shot */
    if (a->client >= 0)
        pair_client(sv, a);
    else
        post_accept(sv, a);
    listener_unref(sv); /* the reference the parked accept held */
}

static void on_listener(cp_socket *s, cp_op *op, int64_t res, void *user)
{
    (void)s;
    server *sv = user;
    if (op->opcode == CP_OP_ACCEPT) {
        acceptor *a = CP_CONTAINER_OF(op, acceptor, aop.op);
        if (res >= 0) {
            a->client = a->aop.fd; /* read the fd before the op is posted again */
            pair_client(sv, a);
        } else if (resource_error((int)-res)) {
            accept_later(sv, a);
        } else if (res != -ECANCELED) {
            fprintf(stderr, "proxy: accept: %s\n", cp_strerror((int)res));
            post_accept(sv, a);
        }
    }
    listener_unref(sv); /* this completion's (or, for CP_OP_CLOSE, the close's) */
}

/* ---- start-up and shutdown --------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: proxy --upstream HOST:PORT [options]\n"
            "  --upstream H:P         where to forward to (a name, IPv4, or [IPv6]:port)\n"
            "  --port N               TCP port to listen on (default 5050; 0 = any, printed)\n"
            "  --bind ADDR            IPv4 or IPv6 address to listen on (default 0.0.0.0; ::\n"
            "                         is every address of both families)\n"
            "  --threads N            worker threads (default: online CPUs)\n"
            "  --backend B            io_uring or epoll (default: io_uring if allowed)\n"
            "  --buffer BYTES         buffer per direction of a connection (default 32768;\n"
            "                         a connection holds 2 x BYTES at most)\n"
            "  --connect-timeout MS   give up on the upstream after MS (default 10000; 0 = never)\n"
            "  --help                 this text\n"
            "SIGINT/SIGTERM close everything and exit 0.\n");
}

static int parse_uint(const char *s, unsigned max, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *s == 0 || *s == '-' || *end || v > max)
        return -1;
    *out = (unsigned)v;
    return 0;
}

static int parse_args(int argc, char **argv, config *cfg)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    *cfg = (config){.port = 5050,
                    .bind = "0.0.0.0",
                    .threads = cpus > 0 ? (unsigned)cpus : 1,
                    .buffer = 32768,
                    .connect_timeout_ms = 10000};
    static const struct option opts[] = {{"port", required_argument, 0, 'p'},
                                         {"bind", required_argument, 0, 'b'},
                                         {"upstream", required_argument, 0, 'u'},
                                         {"threads", required_argument, 0, 't'},
                                         {"backend", required_argument, 0, 'B'},
                                         {"buffer", required_argument, 0, 'f'},
                                         {"connect-timeout", required_argument, 0, 'c'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int ch;
    unsigned v;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'p':
            if (parse_uint(optarg, 65535, &v) < 0)
                return -1;
            cfg->port = (int)v;
            break;
        case 'b':
            cfg->bind = optarg;
            break;
        case 'u':
            cfg->upstream = optarg;
            break;
        case 't':
            if (parse_uint(optarg, 1024, &cfg->threads) < 0 || cfg->threads == 0)
                return -1;
            break;
        case 'B':
            if (strcmp(optarg, "io_uring") == 0)
                cfg->backend = CP_BACKEND_IO_URING;
            else if (strcmp(optarg, "epoll") == 0)
                cfg->backend = CP_BACKEND_EPOLL;
            else
                return -1;
            break;
        case 'f':
            if (parse_uint(optarg, 16 << 20, &cfg->buffer) < 0 || cfg->buffer == 0)
                return -1;
            break;
        case 'c':
            if (parse_uint(optarg, 3600 * 1000, &cfg->connect_timeout_ms) < 0)
                return -1;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            return -1;
        }
    }
    return optind == argc && cfg->upstream ? 0 : -1;
}

/* HOST:PORT or [HOST]:PORT, resolved once at start. */
static int resolve_upstream(server *sv)
{
    const char *spec = sv->cfg.upstream;
    const char *colon = strrchr(spec, ':');
    if (!colon || colon == spec || colon[1] == 0) {
        fprintf(stderr, "proxy: --upstream wants HOST:PORT, not %s\n", spec);
        return -1;
    }
    char host[256];
    size_t hlen = (size_t)(colon - spec);
    if (spec[0] == '[' && hlen >= 2 && spec[hlen - 1] == ']') {
        spec++;
        hlen -= 2;
    }
    if (hlen >= sizeof host)
        return -1;
    memcpy(host, spec, hlen);
    host[hlen] = 0;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
    int r = getaddrinfo(host, colon + 1, &hints, &res);
    if (r != 0) {
        fprintf(stderr, "proxy: cannot resolve %s: %s\n", sv->cfg.upstream, gai_strerror(r));
        return -1;
    }
    memcpy(&sv->up_addr, res->ai_addr, res->ai_addrlen);
    sv->up_len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* Two descriptors a client: raise the soft limit as far as allowed. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void shutdown_proxy(server *sv)
{
    pthread_mutex_lock(&sv->lock);
    __atomic_store_n(&sv->stopping, 1, __ATOMIC_RELEASE); /* (read without the lock too) */
    /* Each pair is held by a reference of the walk's while it is closed; a pair in the list
     * is not freed while the lock is held (unlinking takes it), so `next` stays valid. */
    for (pair *p = sv->pairs, *next; p; p = next) {
        next = p->next;
        if (!pair_ref_if_live(p))
            continue; /* its last reference is gone: the dropper frees it */
        /* Connected: a stream may be cut, so a reset. Not yet: the client is closed as when
         * the upstream cannot be reached. */
        pair_close(sv, p,
                   __atomic_load_n(&p->connected, __ATOMIC_ACQUIRE) ? CLOSE_STOP : CLOSE_FIN);
        next = p->next;
        if (__atomic_sub_fetch(&p->refs, 1, __ATOMIC_ACQ_REL) == 0)
            pair_free_locked(sv, p);
    }
    pthread_mutex_unlock(&sv->lock);
    __atomic_add_fetch(&sv->listener_refs, 1, __ATOMIC_RELAXED);
    if (cp_socket_close(&sv->listener, &sv->listener_close) < 0)
        listener_unref(sv);
    listener_unref(sv); /* main's own, held since start-up */
    pthread_mutex_lock(&sv->lock);
    while (!sv->listener_done || sv->pairs)
        pthread_cond_wait(&sv->done_cond, &sv->lock);
    pthread_mutex_unlock(&sv->lock);
    cp_pool_destroy(sv->pool, CP_POOL_CANCEL); /* pending accept retries are dropped */
}

static unsigned long long get(const uint64_t *c)
{
    return (unsigned long long)__atomic_load_n(c, __ATOMIC_RELAXED);
}

int main(int argc, char **argv)
{
    static server sv; /* large (the accepts): not on the stack */
    if (parse_args(argc, argv, &sv.cfg) < 0) {
        usage(stderr);
        return 2;
    }
    const config *cfg = &sv.cfg;
    if (resolve_upstream(&sv) < 0)
        return 2;
    raise_fd_limit();
    /* Handle SIGINT/SIGTERM synchronously in main: every thread inherits the mask. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    pthread_mutex_init(&sv.lock, NULL);
    pthread_cond_init(&sv.done_cond, NULL);

    cp_pool_options po = {.concurrency = cfg->threads, .threads = cfg->threads, .batch = BATCH};
    po.port.backend = cfg->backend;
    int r = cp_pool_create(&sv.pool, &po);
    if (r < 0) {
        fprintf(stderr, "proxy: cannot create the pool: %s\n", cp_strerror(r));
        return 1;
    }
    sv.port = cp_pool_port(sv.pool);
    sv.listener_binding = (cp_io_binding){on_listener, &sv};
    sv.client_binding = (cp_io_binding){on_client, &sv};
    sv.upstream_binding = (cp_io_binding){on_upstream, &sv};
    int port = 0;
    int lfd = address_listen("proxy", cfg->bind, cfg->port, 4096, &port);
    if (lfd < 0 || (r = cp_pool_associate(sv.pool, &sv.listener, lfd, &sv.listener_binding)) < 0) {
        if (lfd >= 0) {
            fprintf(stderr, "proxy: cannot associate the listener: %s\n", cp_strerror(r));
            close(lfd);
        }
        cp_pool_destroy(sv.pool, CP_POOL_CANCEL);
        return 1;
    }
    /* On epoll a send the kernel takes whole at once then needs no completion; on io_uring
     * it would cost a send(2) of its own (see CP_SEND_SKIP_ON_SUCCESS). */
    sv.skip = cp_port_backend(sv.port) == CP_BACKEND_EPOLL ? CP_SEND_SKIP_ON_SUCCESS : 0;
    sv.listener_refs = 1; /* main's, dropped by the shutdown */
    printf("proxy: backend=%s threads=%u bind=%s port=%d accepts=%u upstream=%s buffer=%u "
           "pair-bytes=%zu connect-timeout=%u\n",
           cp_port_backend_name(sv.port), cfg->threads, cfg->bind, port, (unsigned)ACCEPTS,
           cfg->upstream, cfg->buffer, sizeof(pair) + 2 * (size_t)cfg->buffer,
           cfg->connect_timeout_ms);
    char at[INET6_ADDRSTRLEN + 16];
    printf("listening on %s\n", address_port_text(at, sizeof at, cfg->bind, (unsigned)port));
    fflush(stdout);
    for (unsigned i = 0; i < ACCEPTS; i++) {
        sv.accepts[i].sv = &sv;
        sv.accepts[i].client = -1;
        post_accept(&sv, &sv.accepts[i]);
    }

    int sig = 0;
    sigwait(&sigs, &sig);
    shutdown_proxy(&sv);
    printf("proxy: %s: accepted=%llu rejected=%llu closed=%llu upstream_failed=%llu "
           "aborted=%llu bytes_up=%llu bytes_down=%llu\n",
           strsignal(sig), get(&sv.accepted), get(&sv.rejected), get(&sv.closed),
           get(&sv.upstream_failed), get(&sv.aborted), get(&sv.bytes_up), get(&sv.bytes_down));
    return 0;
}
