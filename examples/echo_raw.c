/* echo_raw: the echo server written directly on the completion port and sockets (no
 * server layer), as cport-echo was before cport/server.h existed. cport-echo's basic flags
 * (--port, --bind, --threads, --backend, --accepts, --max-conns, --zero-byte, --recvs,
 * --buffer), plus --skip/--no-skip; none of the server layer's (timeouts, backpressure,
 * framing, stats, a shutdown deadline): see --help.
 *
 * A cp_pool of N worker threads runs the completions of the listener and of every
 * connection as callbacks (bound sockets, no dequeue loop here). Each connection keeps `--recvs`
 * receives outstanding (default 1); what comes in goes back out in the order it arrived,
 * also with several receives outstanding and several workers: receives carry sequence
 * numbers and a completion is sent only when its turn comes (the seeds' reordering fix).
 *
 * Memory: connections live in a slab of fixed-size slots. With --zero-byte and one
 * receive, a connection is a cp_socket plus one cp_op and a few flags — 128 bytes — and
 * holds no buffer while idle: data lands in the port's shared pool only when it arrives.
 * The single op alternates receive → send → receive, so such a connection never has two
 * completions in flight and needs no lock. A reply the kernel takes whole at once
 * (CP_SEND_SKIP_ON_SUCCESS; by default on epoll only, see main) finishes inside the call,
 * and the op receives again right away: no completion, no trip through the port.
 *
 * Lifetime: the port queues a socket's close completion after all its other completions,
 * but with several workers another thread may still be running the handler of an earlier
 * one. So a connection counts references — one per operation started and one while
 * setting up — and is freed by whoever drops the last one.
 */
#include "cport.h"

#include "../tools/common/address.h" /* address_listen: IPv4 and IPv6 */
#include "../src/inject.h" /* CP__INJECT_DELAY: a delay point in -DCPORT_INJECT=ON builds only */

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
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

enum {
    BATCH = 64,
    CHUNK_BYTES = 1 << 20,
    ACCEPT_RETRY_MS = 100,
    MAX_ACCEPTS = 4096,
};

typedef struct config {
    int port;
    const char *bind;
    unsigned threads;
    cp_backend_kind backend;
    unsigned accepts;
    unsigned max_conns;
    bool zero_byte;
    unsigned recvs;
    unsigned buffer;
    int skip; /* CP_SEND_SKIP_ON_SUCCESS: 1 on, 0 off, -1 by backend (see main) */
} config;

/* ---- connection slab ----------------------------------------------------------------- */

typedef struct conn {
    cp_socket s;
    uint8_t live;         /* slot in use (for the shutdown walk) */
    uint8_t closing;      /* atomic: stop, close with the next op that comes back */
    uint8_t close_issued; /* cp_socket_close() called */
    uint8_t pad;
    uint32_t refs; /* operations outstanding + setup; the last to drop it frees */
} conn;

/* With several receives outstanding each op carries a sequence number. */
typedef struct slot {
    cp_op op;
    uint32_t seq;
    int32_t len; /* received bytes waiting for their turn to be sent; -1 = none */
} slot;

typedef struct multi_state {
    uint32_t lock;
    uint32_t next_recv; /* sequence number of the next receive posted */
    uint32_t next_send; /* sequence number of the next receive to send back */
    uint32_t eof;       /* the end of stream came in its turn: a disconnect is under way */
} multi_state;

typedef struct chunk {
    struct chunk *next;
    size_t count; /* objects carved so far (the rest of the chunk is untouched) */
} chunk;

/* Fixed-size objects from 1 MiB anonymous chunks. Objects are carved from the newest
 * chunk only when the free list is empty, so untouched pages cost no memory: RSS grows by
 * exactly the objects ever live at once. */
typedef struct slab {
    pthread_mutex_t lock;
    size_t size;
    size_t zero;        /* bytes zeroed at allocation, under the lock (receive buffers are not) */
    size_t chunk_bytes; /* CHUNK_BYTES, or more when one object needs more */
    void *free;
    chunk *chunks;
    size_t live; /* atomic: read without the lock (max-conns, shutdown) */
} slab;

static size_t chunk_first(void)
{
    return (sizeof(chunk) + 63) & ~(size_t)63;
}

static size_t chunk_capacity(const slab *s)
{
    return (s->chunk_bytes - chunk_first()) / s->size;
}

/* Chunks hold at least one object: a connection with large buffers (--buffer, --recvs)
 * may be bigger than CHUNK_BYTES. */
static void slab_init(slab *s, size_t size, size_t zero)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t need = (chunk_first() + size + page - 1) / page * page;
    s->size = size;
    s->zero = zero;
    s->chunk_bytes = need > CHUNK_BYTES ? need : CHUNK_BYTES;
    pthread_mutex_init(&s->lock, NULL);
}

static void *slab_alloc(slab *s)
{
    pthread_mutex_lock(&s->lock);
    void *obj = s->free;
    if (obj) {
        s->free = *(void **)obj;
    } else {
        chunk *c = s->chunks;
        if (!c || c->count == chunk_capacity(s)) {
            c = mmap(NULL, s->chunk_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                     0);
            if (c == MAP_FAILED) {
                pthread_mutex_unlock(&s->lock);
                return NULL;
            }
            c->count = 0;
            c->next = s->chunks;
            s->chunks = c;
        }
        obj = (char *)c + chunk_first() + c->count++ * s->size;
    }
    /* Under the lock: the shutdown walk reads every slot's `live` under it. */
    memset(obj, 0, s->zero);
    __atomic_add_fetch(&s->live, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&s->lock);
    return obj;
}

static void slab_free(slab *s, void *obj)
{
    pthread_mutex_lock(&s->lock);
    ((conn *)obj)->live = 0;
    *(void **)obj = s->free;
    s->free = obj;
    __atomic_sub_fetch(&s->live, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&s->lock);
}

/* ---- the server ------------------------------------------------------------------------ */

typedef struct server {
    config cfg;
    cp_pool *pool;
    cp_port *port;
    cp_io_binding listener_binding;
    cp_io_binding conn_binding;
    cp_socket listener;
    cp_op listener_close;
    cp_accept_op *accepts;
    slab conns;
    size_t conn_size;
    int stopping;
    unsigned accepting; /* accept handlers that may still set up a connection (atomic) */
    uint64_t accepted, rejected, closed;
    /* Accepts parked after EMFILE/ENFILE/ENOBUFS/ENOMEM, retried by a timer. */
    pthread_mutex_t park_lock;
    cp_accept_op **parked;
    unsigned nparked;
    cp_timer *retry_timer;
    /* Shutdown waits here for every connection and the listener to close. */
    pthread_mutex_t done_lock;
    pthread_cond_t done_cond;
    int listener_closed;
} server;

static bool multi(const server *sv)
{
    return sv->cfg.recvs > 1;
}

static multi_state *mstate(conn *c)
{
    return (multi_state *)(c + 1);
}

static slot *slot_at(conn *c, unsigned i)
{
    return (slot *)(mstate(c) + 1) + i;
}

static cp_op *lean_op(conn *c)
{
    return (cp_op *)(c + 1);
}

static char *slot_buffer(const server *sv, conn *c, unsigned i)
{
    char *base = multi(sv) ? (char *)slot_at(c, sv->cfg.recvs) : (char *)(lean_op(c) + 1);
    return base + (size_t)i * sv->cfg.buffer;
}

static void spin_lock(uint32_t *l)
{
    while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(l, __ATOMIC_RELAXED))
            ;
}

static void spin_unlock(uint32_t *l)
{
    __atomic_store_n(l, 0, __ATOMIC_RELEASE);
}

static void *op_buffer(server *sv, conn *c, cp_op *op, unsigned idx)
{
    return sv->cfg.zero_byte ? op->u.buf : slot_buffer(sv, c, idx);
}

static void conn_unref(server *sv, conn *c)
{
    if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        slab_free(&sv->conns, c);
        __atomic_add_fetch(&sv->closed, 1, __ATOMIC_SEQ_CST);
        pthread_mutex_lock(&sv->done_lock);
        pthread_cond_broadcast(&sv->done_cond);
        pthread_mutex_unlock(&sv->done_lock);
    }
}

/* Each operation started holds a reference until its handler has run. The reference is
 * taken before starting: the completion may be handled on another worker before the
 * start call even returns. The caller always holds a reference of its own, so dropping
 * this one after a failed start never frees. */
static void ref_before_start(conn *c)
{
    __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
}

static int start_result(conn *c, int r)
{
    if (r < 0)
        __atomic_sub_fetch(&c->refs, 1, __ATOMIC_RELAXED);
    return r;
}

static void close_conn(conn *c, cp_op *op)
{
    __atomic_store_n(&c->closing, 1, __ATOMIC_SEQ_CST);
    if (c->close_issued)
        return;
    c->close_issued = 1;
    ref_before_start(c);
    start_result(c, cp_socket_close(&c->s, op));
}

static int post_recv(server *sv, conn *c, cp_op *op, unsigned idx)
{
    ref_before_start(c);
    if (sv->cfg.zero_byte)
        return start_result(c, cp_socket_recv_pooled(&c->s, op));
    return start_result(c, cp_socket_recv(&c->s, op, slot_buffer(sv, c, idx), sv->cfg.buffer));
}

/* Send a received block back. Returns < 0 (failed), 0 (accepted: its completion follows)
 * or CP_DONE_NOW: the kernel took every byte at once and no completion comes (IOCP's
 * skip-completion-on-success), so the caller goes on with the op right away. */
static int post_send(server *sv, conn *c, cp_op *op, unsigned idx, size_t len)
{
    ref_before_start(c);
    int r = start_result(c, cp_socket_send_ex(&c->s, op, op_buffer(sv, c, op, idx), len,
                                              sv->cfg.skip ? CP_SEND_SKIP_ON_SUCCESS : 0));
    if (r == CP_DONE_NOW) /* no completion will drop it; the caller holds its own */
        __atomic_sub_fetch(&c->refs, 1, __ATOMIC_RELAXED);
    return r;
}

/* After (re)posting a receive: if shutdown began meanwhile, make sure it is cancelled
 * (shutdown sets `closing` before it cancels, so one of the two sees the other). */
static void recheck_closing(conn *c)
{
    if (__atomic_load_n(&c->closing, __ATOMIC_SEQ_CST))
        cp_socket_cancel_all(&c->s);
}

static void release_pool_buffer(server *sv, cp_op *op)
{
    if (sv->cfg.zero_byte && op->u.buf) {
        cp_buffer_release(sv->port, op->u.buf);
        op->u.buf = NULL;
    }
}

/* The lean op's send is done (res: its result): receive again. */
static void lean_sent(server *sv, conn *c, cp_op *op, int64_t res)
{
    release_pool_buffer(sv, op);
    if (res < 0 || __atomic_load_n(&c->closing, __ATOMIC_SEQ_CST) || post_recv(sv, c, op, 0) < 0) {
        close_conn(c, op);
        return;
    }
    recheck_closing(c);
}

/* One receive per connection: its op alternates receive, send, receive. */
static void lean_completion(server *sv, conn *c, cp_op *op, int64_t res)
{
    switch (op->opcode) {
    case CP_OP_RECV:
    case CP_OP_RECV_POOL: {
        if (res <= 0 || __atomic_load_n(&c->closing, __ATOMIC_SEQ_CST)) {
            if (res > 0)
                release_pool_buffer(sv, op);
            close_conn(c, op);
            return;
        }
        int r = post_send(sv, c, op, 0, (size_t)res);
        if (r == CP_DONE_NOW) {
            lean_sent(sv, c, op, res);
        } else if (r < 0) {
            release_pool_buffer(sv, op);
            close_conn(c, op);
        }
        return;
    }
    case CP_OP_SEND:
        lean_sent(sv, c, op, res);
        return;
    default:
        return;
    }
}

static bool multi_sent(server *sv, conn *c, slot *sl, int64_t res);

/* Closing: received blocks still waiting for their turn will not be sent; give their pool
 * buffers back (their receives have completed: the ops are ours). Lock held. */
static void drop_waiting(server *sv, conn *c)
{
    for (unsigned i = 0; i < sv->cfg.recvs; i++) {
        slot *s = slot_at(c, i);
        if (s->len >= 0) {
            release_pool_buffer(sv, &s->op);
            s->len = -1;
        }
    }
}

/* Send, in sequence order, every received block whose turn has come. A block of length 0
 * is the end of stream: every block before it has been sent or is being sent, so the
 * connection disconnects (which completes after those sends) and then closes. Lock held. */
static void send_in_order(server *sv, conn *c)
{
    multi_state *ms = mstate(c);
    while (!ms->eof) {
        slot *next = NULL;
        for (unsigned i = 0; i < sv->cfg.recvs && !next; i++) {
            slot *s = slot_at(c, i);
            if (s->len >= 0 && s->seq == ms->next_send)
                next = s;
        }
        if (!next)
            return;
        unsigned idx = (unsigned)(next - slot_at(c, 0));
        int32_t len = next->len;
        next->len = -1;
        ms->next_send++;
        if (len == 0) {
            ms->eof = 1;
            ref_before_start(c);
            if (start_result(c, cp_socket_disconnect(&c->s, &next->op)) < 0) {
                drop_waiting(sv, c);
                close_conn(c, &next->op);
            }
            return;
        }
        int r = post_send(sv, c, &next->op, idx, (size_t)len);
        if (r < 0) {
            release_pool_buffer(sv, &next->op);
            drop_waiting(sv, c);
            close_conn(c, &next->op);
            return;
        }
        if (r == CP_DONE_NOW && !multi_sent(sv, c, next, len))
            return;
    }
}

/* A slot's send is done (res: its result): receive again on it. Lock held. Returns false
 * if the connection is closing. */
static bool multi_sent(server *sv, conn *c, slot *sl, int64_t res)
{
    release_pool_buffer(sv, &sl->op);
    if (res < 0 || __atomic_load_n(&c->closing, __ATOMIC_SEQ_CST) || c->close_issued) {
        drop_waiting(sv, c);
        close_conn(c, &sl->op);
        return false;
    }
    if (mstate(c)->eof)
        return false; /* nothing more to receive; the disconnect closes */
    sl->seq = mstate(c)->next_recv++;
    if (post_recv(sv, c, &sl->op, (unsigned)(sl - slot_at(c, 0))) < 0) {
        close_conn(c, &sl->op);
        return false;
    }
    recheck_closing(c);
    return true;
}

/* Several receives outstanding: received blocks go back strictly in arrival order. */
static void multi_completion(server *sv, conn *c, cp_op *op, int64_t res)
{
    slot *sl = CP_CONTAINER_OF(op, slot, op);
    spin_lock(&mstate(c)->lock);
    bool stop = __atomic_load_n(&c->closing, __ATOMIC_SEQ_CST) || c->close_issued;
    switch (op->opcode) {
    case CP_OP_RECV:
    case CP_OP_RECV_POOL:
        if (res < 0 || stop) {
            if (res > 0)
                release_pool_buffer(sv, op);
            drop_waiting(sv, c);
            close_conn(c, op);
            break;
        }
        sl->len = (int32_t)res; /* 0: the end of stream, which also waits for its turn */
        send_in_order(sv, c);
        break;
    case CP_OP_SEND:
        multi_sent(sv, c, sl, res);
        break;
    case CP_OP_DISCONNECT: /* every reply went out (or failed): close */
        drop_waiting(sv, c);
        close_conn(c, op);
        break;
    default:
        break;
    }
    spin_unlock(&mstate(c)->lock);
}

static void on_conn(cp_socket *s, cp_op *op, int64_t res, void *user)
{
    server *sv = user;
    conn *c = CP_CONTAINER_OF(s, conn, s);
    if (op->opcode != CP_OP_CLOSE) {
        if (multi(sv))
            multi_completion(sv, c, op, res);
        else
            lean_completion(sv, c, op, res);
    }
    conn_unref(sv, c); /* this completion's reference, after the last touch of c */
}

static void start_conn(server *sv, int fd)
{
    CP__INJECT_DELAY("echo_raw_start_conn");
    if (sv->cfg.max_conns &&
        __atomic_load_n(&sv->conns.live, __ATOMIC_RELAXED) >= sv->cfg.max_conns) {
        close(fd); /* over the limit: refuse at once, keep serving the others */
        __atomic_add_fetch(&sv->rejected, 1, __ATOMIC_SEQ_CST);
        return;
    }
    conn *c = slab_alloc(&sv->conns);
    if (!c) {
        close(fd);
        __atomic_add_fetch(&sv->rejected, 1, __ATOMIC_SEQ_CST);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (cp_pool_associate(sv->pool, &c->s, fd, &sv->conn_binding) < 0) {
        close(fd);
        slab_free(&sv->conns, c);
        __atomic_add_fetch(&sv->rejected, 1, __ATOMIC_SEQ_CST);
        return;
    }
    c->refs = 1; /* set-up's own reference */
    CP__INJECT_DELAY("echo_raw_conn_live");
    pthread_mutex_lock(&sv->conns.lock);
    c->live = 1; /* the shutdown walk may cancel it from now on */
    /* A walk that already ran did not see this connection: close it like the walk would.
     * (The walk sets `stopping` before it takes the lock.) */
    if (__atomic_load_n(&sv->stopping, __ATOMIC_SEQ_CST))
        __atomic_store_n(&c->closing, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&sv->conns.lock);
    __atomic_add_fetch(&sv->accepted, 1, __ATOMIC_SEQ_CST);
    if (!multi(sv)) {
        cp_op *op = lean_op(c);
        if (post_recv(sv, c, op, 0) < 0)
            close_conn(c, op);
        else
            recheck_closing(c);
        conn_unref(sv, c);
        return;
    }
    multi_state *ms = mstate(c);
    for (unsigned i = 0; i < sv->cfg.recvs; i++)
        slot_at(c, i)->len = -1;
    spin_lock(&ms->lock);
    for (unsigned i = 0; i < sv->cfg.recvs; i++) {
        slot *s = slot_at(c, i);
        s->seq = ms->next_recv++;
        if (post_recv(sv, c, &s->op, i) < 0) {
            close_conn(c, &s->op);
            break;
        }
    }
    spin_unlock(&ms->lock);
    recheck_closing(c);
    conn_unref(sv, c);
}

static void post_accept(server *sv, cp_accept_op *aop)
{
    if (__atomic_load_n(&sv->stopping, __ATOMIC_SEQ_CST))
        return;
    int r = cp_socket_accept(&sv->listener, aop, NULL, 0);
    if (r < 0 && r != -EBADF)
        fprintf(stderr, "echo_raw: cannot post an accept: %s\n", cp_strerror(r));
}

static void retry_parked(void *arg)
{
    server *sv = arg;
    pthread_mutex_lock(&sv->park_lock);
    unsigned n = sv->nparked;
    sv->nparked = 0;
    cp_timer *t = sv->retry_timer;
    sv->retry_timer = NULL;
    for (unsigned i = 0; i < n; i++)
        post_accept(sv, sv->parked[i]);
    pthread_mutex_unlock(&sv->park_lock);
    if (t)
        cp_timer_cancel(t, false); /* release the fired one-shot */
}

/* Out of descriptors or memory: accepting again at once would fail again at once (a busy
 * loop). Park the accept and retry after a pause. */
static void accept_later(server *sv, cp_accept_op *aop)
{
    pthread_mutex_lock(&sv->park_lock);
    sv->parked[sv->nparked++] = aop;
    if (!sv->retry_timer && !__atomic_load_n(&sv->stopping, __ATOMIC_SEQ_CST) &&
        cp_timer_start(sv->pool, &sv->retry_timer, ACCEPT_RETRY_MS, 0, retry_parked, sv) < 0)
        sv->retry_timer = NULL;
    pthread_mutex_unlock(&sv->park_lock);
}

static void on_listener(cp_socket *s, cp_op *op, int64_t res, void *user)
{
    (void)s;
    server *sv = user;
    if (op->opcode == CP_OP_CLOSE) {
        pthread_mutex_lock(&sv->done_lock);
        sv->listener_closed = 1;
        pthread_cond_broadcast(&sv->done_cond);
        pthread_mutex_unlock(&sv->done_lock);
        return;
    }
    cp_accept_op *aop = CP_CONTAINER_OF(op, cp_accept_op, op);
    if (res >= 0) {
        int fd = aop->fd;
        /* The listener's close completion may be handled while this handler still runs, so
         * shutdown also waits for `accepting` to drop to 0. Counted before `stopping` is
         * read (both seq_cst): shutdown sees this handler, or this handler sees it stop. */
        __atomic_add_fetch(&sv->accepting, 1, __ATOMIC_SEQ_CST);
        post_accept(sv, aop);
        if (__atomic_load_n(&sv->stopping, __ATOMIC_SEQ_CST))
            close(fd);
        else
            start_conn(sv, fd);
        if (__atomic_sub_fetch(&sv->accepting, 1, __ATOMIC_SEQ_CST) == 0) {
            pthread_mutex_lock(&sv->done_lock);
            pthread_cond_broadcast(&sv->done_cond);
            pthread_mutex_unlock(&sv->done_lock);
        }
        return;
    }
    int err = (int)-res;
    if (err == ECANCELED)
        return;
    if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM)
        accept_later(sv, aop);
    else
        post_accept(sv, aop);
}

/* ---- start-up and shutdown ------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: echo_raw [options]\n"
            "  --port N          TCP port (default 5050; 0 = any, printed at start)\n"
            "  --bind ADDR       IPv4 or IPv6 address to listen on (default 0.0.0.0; ::\n"
            "                    is every address of both families)\n"
            "  --threads N       worker threads (default: online CPUs)\n"
            "  --backend B       io_uring or epoll (default: io_uring if allowed)\n"
            "  --accepts N       accepts kept outstanding (default 16)\n"
            "  --max-conns N     connections beyond N are closed at once (default 0 = none)\n"
            "  --zero-byte       idle connections hold no receive buffer (pooled receives)\n"
            "  --recvs N         receives outstanding per connection (default 1)\n"
            "  --buffer BYTES    receive buffer per receive without --zero-byte (default 16384)\n"
            "  --skip, --no-skip a send the kernel takes whole at once finishes in the call\n"
            "                    (CP_SEND_SKIP_ON_SUCCESS), or every send completes through the\n"
            "                    port (default: --skip on epoll, --no-skip on io_uring)\n"
            "  --help            this text\n"
            "SIGINT/SIGTERM close everything cleanly and exit 0.\n");
}

static int parse_uint(const char *s, unsigned max, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *s == 0 || *end || v > max)
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
                    .accepts = 16,
                    .recvs = 1,
                    .buffer = 16384,
                    .skip = -1};
    static const struct option opts[] = {{"port", required_argument, 0, 'p'},
                                         {"bind", required_argument, 0, 'b'},
                                         {"threads", required_argument, 0, 't'},
                                         {"backend", required_argument, 0, 'B'},
                                         {"accepts", required_argument, 0, 'a'},
                                         {"max-conns", required_argument, 0, 'm'},
                                         {"zero-byte", no_argument, 0, 'z'},
                                         {"recvs", required_argument, 0, 'r'},
                                         {"buffer", required_argument, 0, 'f'},
                                         {"no-skip", no_argument, 0, 'S'},
                                         {"skip", no_argument, 0, 's'},
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
        case 'a':
            if (parse_uint(optarg, MAX_ACCEPTS, &cfg->accepts) < 0 || cfg->accepts == 0)
                return -1;
            break;
        case 'm':
            if (parse_uint(optarg, 100000000, &cfg->max_conns) < 0)
                return -1;
            break;
        case 'S':
            cfg->skip = 0;
            break;
        case 's':
            cfg->skip = 1;
            break;
        case 'z':
            cfg->zero_byte = true;
            break;
        case 'r':
            if (parse_uint(optarg, 64, &cfg->recvs) < 0 || cfg->recvs == 0)
                return -1;
            break;
        case 'f':
            if (parse_uint(optarg, 1 << 24, &cfg->buffer) < 0 || cfg->buffer == 0)
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

static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* Close everything: stop accepting, cancel every connection's operations (each then
 * closes with the op that comes back), wait for all closes, stop the workers. */
static void shutdown_server(server *sv)
{
    __atomic_store_n(&sv->stopping, 1, __ATOMIC_SEQ_CST);
    cp_socket_close(&sv->listener, &sv->listener_close);
    pthread_mutex_lock(&sv->park_lock);
    cp_timer *t = sv->retry_timer;
    sv->retry_timer = NULL;
    sv->nparked = 0;
    pthread_mutex_unlock(&sv->park_lock);
    if (t)
        cp_timer_cancel(t, true);
    pthread_mutex_lock(&sv->conns.lock);
    for (chunk *ch = sv->conns.chunks; ch; ch = ch->next) {
        for (size_t i = 0; i < ch->count; i++) {
            conn *c = (conn *)((char *)ch + chunk_first() + i * sv->conns.size);
            if (!c->live)
                continue;
            __atomic_store_n(&c->closing, 1, __ATOMIC_SEQ_CST);
            cp_socket_cancel_all(&c->s);
        }
    }
    pthread_mutex_unlock(&sv->conns.lock);
    pthread_mutex_lock(&sv->done_lock);
    while (!sv->listener_closed || __atomic_load_n(&sv->accepting, __ATOMIC_SEQ_CST) > 0 ||
           __atomic_load_n(&sv->conns.live, __ATOMIC_SEQ_CST) > 0)
        pthread_cond_wait(&sv->done_cond, &sv->done_lock);
    pthread_mutex_unlock(&sv->done_lock);
    cp_pool_destroy(sv->pool, CP_POOL_DRAIN);
}

int main(int argc, char **argv)
{
    server sv = {0};
    if (parse_args(argc, argv, &sv.cfg) < 0) {
        usage(stderr);
        return 2;
    }
    raise_fd_limit();
    /* Handle SIGINT/SIGTERM synchronously in main; workers never see them. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    config *cfg = &sv.cfg;
    size_t per = multi(&sv) ? sizeof(multi_state) + cfg->recvs * sizeof(slot) : sizeof(cp_op);
    size_t bufs = cfg->zero_byte ? 0 : (size_t)cfg->recvs * cfg->buffer;
    sv.conn_size = (sizeof(conn) + per + bufs + 7) & ~(size_t)7;
    slab_init(&sv.conns, sv.conn_size, sv.conn_size - bufs);
    pthread_mutex_init(&sv.park_lock, NULL);
    pthread_mutex_init(&sv.done_lock, NULL);
    pthread_cond_init(&sv.done_cond, NULL);
    sv.parked = calloc(cfg->accepts, sizeof(*sv.parked));
    sv.accepts = calloc(cfg->accepts, sizeof(*sv.accepts));
    if (!sv.parked || !sv.accepts)
        return 1;

    cp_pool_options po = {.concurrency = cfg->threads, .threads = cfg->threads, .batch = BATCH};
    po.port.backend = cfg->backend;
    int r = cp_pool_create(&sv.pool, &po);
    if (r < 0) {
        fprintf(stderr, "echo_raw: cannot create the port: %s\n", cp_strerror(r));
        return 1;
    }
    sv.port = cp_pool_port(sv.pool);
    sv.listener_binding = (cp_io_binding){on_listener, &sv};
    sv.conn_binding = (cp_io_binding){on_conn, &sv};
    int port = 0;
    int lfd = address_listen("echo_raw", cfg->bind, cfg->port, 4096, &port);
    if (lfd < 0 || (r = cp_pool_associate(sv.pool, &sv.listener, lfd, &sv.listener_binding)) < 0) {
        if (lfd >= 0)
            fprintf(stderr, "echo_raw: cannot associate the listener: %s\n", cp_strerror(r));
        cp_pool_destroy(sv.pool, CP_POOL_CANCEL);
        free(sv.parked);
        free(sv.accepts);
        return 1;
    }
    /* On epoll a send the kernel takes at once saves its completion. On io_uring it is a
     * send(2) of its own, while a request rides the poller's next io_uring_enter: at 64 B
     * that measured 1.10x the reference's CPU per message against 0.99x (bench/README.md). */
    if (cfg->skip < 0)
        cfg->skip = cp_port_backend(sv.port) == CP_BACKEND_EPOLL;
    printf("echo_raw: backend=%s threads=%u bind=%s port=%d accepts=%u max-conns=%u "
           "zero-byte=%s recvs=%u buffer=%u conn-bytes=%zu skip-on-success=%s\n",
           cp_port_backend_name(sv.port), cfg->threads, cfg->bind, port, cfg->accepts,
           cfg->max_conns, cfg->zero_byte ? "on" : "off", cfg->recvs,
           cfg->zero_byte ? (unsigned)cp_buffer_size(sv.port) : cfg->buffer, sv.conn_size,
           cfg->skip ? "on" : "off");
    char at[INET6_ADDRSTRLEN + 16];
    printf("listening on %s\n", address_port_text(at, sizeof at, cfg->bind, (unsigned)port));
    fflush(stdout);
    for (unsigned i = 0; i < cfg->accepts; i++)
        post_accept(&sv, &sv.accepts[i]);

    int sig = 0;
    sigwait(&sigs, &sig);
    shutdown_server(&sv);
    printf("echo_raw: %s: accepted=%llu rejected=%llu closed=%llu\n", strsignal(sig),
           (unsigned long long)sv.accepted, (unsigned long long)sv.rejected,
           (unsigned long long)sv.closed);
    for (chunk *ch = sv.conns.chunks; ch;) {
        chunk *next = ch->next;
        munmap(ch, sv.conns.chunk_bytes);
        ch = next;
    }
    free(sv.parked);
    free(sv.accepts);
    return 0;
}
