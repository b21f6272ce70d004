/* chat: a broadcast (chat room) server on cport's server layer: every message a client
 * sends goes to every other client connected at the time, tagged with its sender.
 *
 * Protocol (framed: every message is a 4-byte big-endian length, then that many bytes):
 *   client -> server   a frame of 0 .. --max-frame bytes: one chat message.
 *   server -> client   a frame whose payload is a 4-byte big-endian sender id, then the
 *                      sender's message as it came. Id 0 is the server: the first frame a
 *                      client gets is (0, its own id as 4 bytes big-endian). Client ids
 *                      start at 1 and are not reused while the server runs.
 * A client never gets its own messages back. Each sender's messages reach each receiver
 * in the order they were sent (one connection's on_data calls come in order, never two at
 * once, and sends to one connection go out in the order issued); messages of different
 * senders interleave in any order. A client gets the messages sent after its welcome
 * frame, until it leaves.
 *
 * Membership. The room is a roster: an immutable array of the members' cp_conn pointers,
 * each holding a cp_conn_ref(), so a broadcast on any worker may send to a member whose
 * on_close runs meanwhile on another (the send then fails with -EPIPE; its memory stays
 * valid until the reference goes). A join (on_open) or a leave (on_close) builds a new
 * roster under the room's lock and swaps it in; a broadcast takes the current roster
 * (a reference of its own, under the lock for a few instructions), sends without any
 * lock, then drops it; the last holder of an old roster drops its connection
 * references. So broadcasts never wait for each other or for sends, and a join or leave
 * never waits for a broadcast. A join or leave costs O(members) (a copy of the array):
 * fine for rooms of hundreds or a few thousands; larger ones want rooms of their own.
 *
 * Slow readers. A message for a receiver is copied into its send queue when the kernel
 * does not take it at once. A client that stops reading would make that queue grow
 * without bound, and max_pending_send cannot stop it: it pauses reading from the slow
 * client itself, while the messages come from other connections. So the server is
 * started with send_queue_limit (--queue-limit, default 1 MiB): a send that would pass it
 * fails with -ENOBUFS, and the policy here is to DROP THAT CLIENT at once (cp_conn_abort:
 * its queue is cancelled and its socket reset, see drop()). A relayed frame longer than the
 * limit would pass it on its own, even to a client with nothing queued: every receiver
 * would be dropped. So the limit is at least the largest relayed frame (--max-frame + 8
 * bytes; a smaller --queue-limit is refused), and by default at least two of them.
 * Skipping the one message instead would leave it a gap without telling it; waiting for
 * it would hold every sender. A dropped client is counted (dropped= in the exit line); a
 * client that does not read never delays the others. A client also stops being read
 * while more than max_pending_send (--queue-limit / 2) is queued for it: one that does
 * not read does not get to talk.
 *
 * What a slow client can cost: the limit counts message bytes, plus one message per
 * worker sending at once; but each queued message also has a send context of about 400
 * bytes, so a queue of tiny messages costs many times its bytes (9-byte frames at the
 * 1 MiB default: about 45 MB until the client is dropped). Lower --queue-limit for rooms
 * of small messages. And on io_uring every send is a request handed to the kernel at the
 * worker's next poll, counted in the queue until its completion is handled, even when the
 * socket has room: the limit must also cover what one client is sent in one burst (all
 * that the callbacks run between two polls relay to it; with 16 KiB receives the default
 * covers 64 senders at once). Below that, a client reading at full speed can be dropped
 * on io_uring, where epoll (which writes into the socket inside the call) keeps it.
 *
 * Signals: SIGINT/SIGTERM shut down gracefully (stop accepting and reading, let queued
 * messages go out until --shutdown-deadline, close) and exit 0.
 */
#include "cport.h"

#include "../tools/common/address.h" /* --bind and its printing: IPv4 and IPv6 */

#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
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
    ID_SERVER = 0,         /* the sender id of the server's own frames (the welcome) */
    TAG = 4,               /* the sender id in front of each relayed message */
    STACK_FRAME = 4096,    /* relayed frames up to this size are built on the stack */
    QUEUE_LIMIT = 1 << 20, /* --queue-limit's default, for frames of up to half of it */
};

/* A room: the current roster, swapped under the lock. */
typedef struct roster {
    unsigned refs; /* atomic: the room's own (while current) plus one per broadcast */
    unsigned n;
    cp_conn *conn[]; /* each holds a cp_conn_ref() */
} roster;

typedef struct room {
    pthread_mutex_t lock; /* `current` (swapped and referenced under it) */
    roster *current;
    uint32_t next_id; /* atomic */
    uint64_t relayed; /* atomic: messages received and relayed */
    uint64_t dropped; /* atomic: clients dropped for passing the queue limit */
    uint64_t no_mem;  /* atomic: clients closed because a message could not be queued */
} room;

/* Each connection's user area. */
typedef struct member {
    uint32_t id;
    uint8_t left;    /* atomic: on_close ran; it leaves every roster built from now on */
    uint8_t dropped; /* atomic: aborted as a slow reader (counted once) */
} member;

/* ---- the roster ----------------------------------------------------------------------- */

static void roster_put(roster *r)
{
    if (!r || __atomic_sub_fetch(&r->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    for (unsigned i = 0; i < r->n; i++)
        cp_conn_unref(r->conn[i]);
    free(r);
}

/* The current roster, with a reference for the caller. */
static roster *roster_get(room *rm)
{
    pthread_mutex_lock(&rm->lock);
    roster *r = rm->current;
    __atomic_add_fetch(&r->refs, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&rm->lock);
    return r;
}

/* A new roster (under the room's lock): the members of `old` that have not left, plus
 * `join` if not NULL. Each entry takes a reference: legal, since `old` holds one on each
 * of its members, and `join` is called from inside its on_open. NULL without memory. */
static roster *roster_build(const roster *old, cp_conn *join)
{
    roster *r = malloc(sizeof(*r) + (old->n + 1) * sizeof(r->conn[0]));
    if (!r)
        return NULL;
    r->refs = 1;
    r->n = 0;
    for (unsigned i = 0; i < old->n; i++) {
        member *m = cp_conn_user(old->conn[i]);
        if (__atomic_load_n(&m->left, __ATOMIC_ACQUIRE))
            continue;
        cp_conn_ref(old->conn[i]);
        r->conn[r->n++] = old->conn[i];
    }
    if (join) {
        cp_conn_ref(join);
        r->conn[r->n++] = join;
    }
    return r;
}

/* Swap a new roster in, with `join` (and its welcome, sent first) or without. Returns 0,
 * or a negative errno with nothing changed.
 *
 * The welcome is sent under the lock, before the swap: a broadcast that sees the new
 * member takes the roster after the swap, so the welcome is the member's first frame; and
 * a message sent by anyone who saw the welcome reaches the server after it was sent, so
 * its broadcast takes the roster after the swap too and includes the member. (Sent
 * before taking the lock, a message could slip in between; sent after the swap, a
 * broadcast could come first.) cp_conn_send never blocks and runs no callback. */
static int roster_change(room *rm, cp_conn *join, const void *welcome, size_t wlen)
{
    pthread_mutex_lock(&rm->lock);
    roster *old = rm->current, *r = roster_build(old, join);
    int e = r ? 0 : -ENOMEM;
    if (r && join && (e = cp_conn_send(join, welcome, wlen)) < 0) {
        pthread_mutex_unlock(&rm->lock);
        roster_put(r);
        return e;
    }
    if (r)
        rm->current = r;
    pthread_mutex_unlock(&rm->lock);
    if (!r)
        return e;
    roster_put(old); /* outside the lock: it may drop the last references */
    return 0;
}

/* ---- callbacks -------------------------------------------------------------------------- */

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static int on_open(cp_conn *c)
{
    room *rm = cp_server_user(cp_conn_server(c));
    member *m = cp_conn_user(c);
    m->id = __atomic_add_fetch(&rm->next_id, 1, __ATOMIC_RELAXED);
    if (m->id == ID_SERVER) /* (after 2^32 - 1 clients) */
        m->id = __atomic_add_fetch(&rm->next_id, 1, __ATOMIC_RELAXED);
    uint8_t hello[4 + TAG + 4];
    cp_frame_header(hello, TAG + 4);
    put_be32(hello + 4, ID_SERVER);
    put_be32(hello + 4 + TAG, m->id);
    return roster_change(rm, c, hello, sizeof(hello)) < 0 ? -1 : 0; /* -1: closed at once,
                                                                       no on_close follows */
}

static void on_close(cp_conn *c, cp_close_reason reason, int err)
{
    (void)reason;
    (void)err;
    room *rm = cp_server_user(cp_conn_server(c));
    member *m = cp_conn_user(c);
    __atomic_store_n(&m->left, 1, __ATOMIC_RELEASE);
    /* Without memory for the new roster the old one stays, still holding c (broadcasts
     * to it fail with -EPIPE); the next join or leave leaves it out, and the room's last
     * roster is dropped after the shutdown. */
    roster_change(rm, NULL, NULL, 0);
}

/* A receiver whose queue is full, or that the message could not be queued for: it would
 * miss the message, so it goes. cp_conn_abort, not cp_conn_close: a graceful close would
 * keep its queue (up to linger_ms) for a client that is not reading it. The abort is a
 * reset: the kernel frees the socket's full send buffer at once, and the client sees
 * ECONNRESET, not an end of stream behind messages it is not reading. */
static void drop(room *rm, cp_conn *to, int err)
{
    member *m = cp_conn_user(to); /* (the roster's reference keeps it valid) */
    if (__atomic_exchange_n(&m->dropped, 1, __ATOMIC_RELAXED))
        return;
    __atomic_add_fetch(err == -ENOBUFS ? &rm->dropped : &rm->no_mem, 1, __ATOMIC_RELAXED);
    cp_conn_abort(to);
}

static void on_data(cp_conn *c, const void *data, size_t len)
{
    room *rm = cp_server_user(cp_conn_server(c));
    const member *from = cp_conn_user(c);
    /* The whole relayed frame, built once and sent to each receiver as raw bytes (in
     * framed mode cp_conn_send sends bytes as they are; cp_conn_send_frame would want the
     * tag and the message in one buffer all the same). */
    size_t flen = 4 + TAG + len;
    uint8_t stack[STACK_FRAME], *frame = flen <= sizeof(stack) ? stack : malloc(flen);
    if (!frame) {
        cp_conn_abort(c); /* its message cannot be relayed: the sender must know */
        return;
    }
    cp_frame_header(frame, (uint32_t)(TAG + len));
    put_be32(frame + 4, from->id);
    if (len)
        memcpy(frame + 4 + TAG, data, len);

    roster *r = roster_get(rm);
    for (unsigned i = 0; i < r->n; i++) {
        cp_conn *to = r->conn[i];
        if (to == c)
            continue;
        int e = cp_conn_send(to, frame, flen);
        if (e == -ENOBUFS || e == -ENOMEM)
            drop(rm, to, e);
        /* -EPIPE: it is leaving. */
    }
    roster_put(r);
    __atomic_add_fetch(&rm->relayed, 1, __ATOMIC_RELAXED);
    if (frame != stack)
        free(frame);
}

/* ---- command line ------------------------------------------------------------------------ */

typedef struct config {
    cp_server_options so;
    unsigned shutdown_ms;
} config;

static void usage(FILE *f)
{
    fprintf(f, "usage: chat [options]\n"
               "  --port N              TCP port (default 5050; 0 = any, printed at start)\n"
               "  --bind ADDR           IPv4 or IPv6 address to listen on (default 0.0.0.0; :: is\n"
               "                        every address of both families)\n"
               "  --threads N           worker threads (default: online CPUs)\n"
               "  --backend B           io_uring or epoll (default: io_uring if allowed)\n"
               "  --max-conns N         connections beyond N are closed at once (default: none)\n"
               "  --max-frame BYTES     largest message accepted (default 65536); relayed\n"
               "                        frames are 4 bytes longer\n"
               "  --queue-limit BYTES   bytes queued for one client before it is dropped; at\n"
               "                        least --max-frame + 8 (default 1048576, or twice\n"
               "                        that when it is more)\n"
               "  --zero-byte           idle clients hold no receive buffer (pooled receives)\n"
               "  --shutdown-deadline MS  how long SIGTERM lets queued messages drain\n"
               "                        (default 5000)\n"
               "  --help                this text\n"
               "SIGINT/SIGTERM shut down gracefully and exit 0.\n");
}

static int parse_uint(const char *s, unsigned long max, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *s == 0 || *end || v > max)
        return -1;
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, config *cfg)
{
    *cfg = (config){.so = {.port = 5050,
                           .bind = "0.0.0.0",
                           .framed = true,
                           .max_frame = 65536,
                           .send_queue_limit = 0},
                    .shutdown_ms = 5000};
    static const struct option opts[] = {{"port", required_argument, 0, 'p'},
                                         {"bind", required_argument, 0, 'b'},
                                         {"threads", required_argument, 0, 't'},
                                         {"backend", required_argument, 0, 'B'},
                                         {"max-conns", required_argument, 0, 'm'},
                                         {"max-frame", required_argument, 0, 'f'},
                                         {"queue-limit", required_argument, 0, 'q'},
                                         {"zero-byte", no_argument, 0, 'z'},
                                         {"shutdown-deadline", required_argument, 0, 's'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    cp_server_options *o = &cfg->so;
    int ch;
    unsigned long v;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        bool ok = true;
        switch (ch) {
        case 'p':
            ok = parse_uint(optarg, 65535, &v) == 0;
            o->port = (uint16_t)v;
            break;
        case 'b':
            ok = bind_address_ok(optarg); /* not a name: cp_server_start takes none */
            o->bind = optarg;
            if (!ok)
                bind_address_refused("chat", optarg);
            break;
        case 't':
            ok = parse_uint(optarg, 1024, &v) == 0 && v > 0;
            o->threads = (unsigned)v;
            break;
        case 'B':
            if (strcmp(optarg, "io_uring") == 0)
                o->backend = CP_BACKEND_IO_URING;
            else if (strcmp(optarg, "epoll") == 0)
                o->backend = CP_BACKEND_EPOLL;
            else
                ok = false;
            break;
        case 'm':
            ok = parse_uint(optarg, 100000000, &v) == 0;
            o->max_conns = (unsigned)v;
            break;
        case 'f':
            /* (- TAG: a relayed frame must fit the clients' limit of the same size too) */
            ok = parse_uint(optarg, CP_FRAME_MAX_LIMIT - TAG, &v) == 0 && v > 0;
            o->max_frame = (uint32_t)v;
            break;
        case 'q':
            ok = parse_uint(optarg, UINT32_MAX / 2, &v) == 0 && v > 0;
            o->send_queue_limit = (uint32_t)v;
            break;
        case 'z':
            o->zero_byte = true;
            break;
        case 's':
            ok = parse_uint(optarg, 3600000, &v) == 0;
            cfg->shutdown_ms = (unsigned)v;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            ok = false;
        }
        if (!ok)
            return -1;
    }
    /* A relayed frame must fit the limit when nothing is queued, or each would drop every
     * receiver (-ENOBUFS). */
    uint32_t relayed = 4 + TAG + o->max_frame;
    if (!o->send_queue_limit) {
        o->send_queue_limit = QUEUE_LIMIT > 2 * relayed ? QUEUE_LIMIT : 2 * relayed;
    } else if (o->send_queue_limit < relayed) {
        fprintf(stderr,
                "chat: --queue-limit %u is below the largest relayed frame (%u bytes: "
                "--max-frame + 8)\n",
                o->send_queue_limit, relayed);
        return -1;
    }
    /* Reading from a client pauses while half the limit is queued for it: a client that
     * does not read stops being heard before it is dropped. */
    o->max_pending_send = o->send_queue_limit / 2 ? o->send_queue_limit / 2 : 1;
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

int main(int argc, char **argv)
{
    config cfg;
    if (parse_args(argc, argv, &cfg) < 0) {
        usage(stderr);
        return 2;
    }
    raise_fd_limit();
    /* Signals are taken synchronously by main; the workers (started with this mask) never
     * see them. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    room rm = {.lock = PTHREAD_MUTEX_INITIALIZER};
    rm.current = calloc(1, sizeof(roster));
    if (!rm.current)
        return 1;
    rm.current->refs = 1;
    cfg.so.user = &rm;
    cfg.so.conn_user_size = sizeof(member);
    cp_server_callbacks cb = {.on_open = on_open, .on_data = on_data, .on_close = on_close};
    cp_server *sv;
    int r = cp_server_create(&sv, &cfg.so, &cb);
    if (r < 0) {
        fprintf(stderr, "chat: cannot start: %s\n", cp_strerror(r));
        free(rm.current);
        return 1;
    }
    const cp_server_options *o = &cfg.so;
    char at[INET6_ADDRSTRLEN + 16];
    if ((r = cp_server_start(sv)) < 0) {
        fprintf(stderr, "chat: cannot listen on %s: %s\n",
                address_port_text(at, sizeof at, o->bind, o->port), cp_strerror(r));
        cp_server_destroy(sv);
        free(rm.current);
        return 1;
    }
    printf("chat: backend=%s threads=%u bind=%s port=%u accepts=4..256 max-conns=%u "
           "max-frame=%u queue-limit=%u zero-byte=%s\n",
           cp_port_backend_name(cp_server_port(sv)),
           o->threads ? o->threads : (unsigned)sysconf(_SC_NPROCESSORS_ONLN), o->bind,
           cp_server_listen_port(sv), o->max_conns, o->max_frame, o->send_queue_limit,
           o->zero_byte ? "on" : "off");
    printf("listening on %s\n",
           address_port_text(at, sizeof at, o->bind, cp_server_listen_port(sv)));
    fflush(stdout);

    int sig = 0;
    sigwait(&sigs, &sig);
    r = cp_server_shutdown(sv, cfg.shutdown_ms);
    /* Every on_close has run: the roster is empty, unless a leave found no memory for
     * its new one. Its references go before the server's memory does. */
    roster_put(rm.current);
    rm.current = NULL;
    cp_server_stats st;
    cp_server_get_stats(sv, &st);
    printf("chat: %s: accepted=%llu rejected=%llu closed=%llu relayed=%llu dropped=%llu "
           "no-memory=%llu refused-sends=%llu; shut down %s\n",
           strsignal(sig), (unsigned long long)st.conns_total,
           (unsigned long long)st.conns_rejected,
           (unsigned long long)(st.conns_total - st.conns_open),
           (unsigned long long)__atomic_load_n(&rm.relayed, __ATOMIC_RELAXED),
           (unsigned long long)__atomic_load_n(&rm.dropped, __ATOMIC_RELAXED),
           (unsigned long long)__atomic_load_n(&rm.no_mem, __ATOMIC_RELAXED),
           (unsigned long long)st.sends_refused,
           r == 0 ? "cleanly" : "at the deadline (connections cut)");
    cp_server_destroy(sv);
    pthread_mutex_destroy(&rm.lock);
    return 0;
}
