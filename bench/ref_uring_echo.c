/* ref_uring_echo: a second yardstick — the smallest io_uring echo server we could write.
 *
 * One thread, one ring, liburing only (no libcport). Every connection owns a receive
 * buffer; its loop is: receive into it, send what came (resubmitting the rest of a short
 * send), receive again. One accept is outstanding at a time. What it measures: what io_uring
 * itself costs against the epoll reference (bench/ref_echo.c) for the same work, so that
 * cport's io_uring backend can be compared both with the epoll loop and with a hand-written
 * io_uring loop that has no port, no pool and no contexts.
 *
 *   ref_uring_echo [--port N] [--bind ADDR] [--buffer BYTES] [--taskrun coop|defer|none]
 *                  [--no-poll-first]
 *
 * --taskrun picks how the kernel runs completion work: coop (IORING_SETUP_COOP_TASKRUN, as
 * cport's backend does; default), defer (IORING_SETUP_DEFER_TASKRUN + SINGLE_ISSUER: the
 * thread runs it itself when it waits, in passes of limited size) or none. Receives are
 * issued with IORING_RECVSEND_POLL_FIRST (as cport's are) unless --no-poll-first.
 * --port 0 picks an ephemeral port; prints "listening on port N"; SIGINT/SIGTERM end it
 * with status 0. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

enum { OP_ACCEPT = 1, OP_RECV = 2, OP_SEND = 3, OP_SIGNAL = 4, OP_LISTEN_POLL = 5, OP_MASK = 7 };

struct conn {
    struct conn *prev, *next; /* all open connections, so that exit frees them */
    int fd;
    uint32_t off, len; /* bytes of buf being sent: [off, len) still to go */
    char buf[];
};

struct server {
    struct io_uring ring;
    int lfd, sfd;
    int spare_fd; /* held open so an accept can shed a connection when out of descriptors */
    uint32_t buf_size;
    int poll_first;
    struct signalfd_siginfo sig;
    struct conn *conns;
    unsigned outstanding; /* requests submitted whose completion has not been seen */
};

static void die(const char *what, int err)
{
    fprintf(stderr, "ref_uring_echo: %s: %s\n", what, strerror(err));
    exit(1);
}

static struct io_uring_sqe *get_sqe(struct server *s)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&s->ring);
    if (!sqe) { /* submission queue full: hand it to the kernel and take a fresh slot */
        int r = io_uring_submit(&s->ring);
        if (r < 0)
            die("io_uring_submit", -r);
        sqe = io_uring_get_sqe(&s->ring);
        if (!sqe)
            die("io_uring_get_sqe", EBUSY);
    }
    s->outstanding++;
    return sqe;
}

static void post_accept(struct server *s)
{
    struct io_uring_sqe *sqe = get_sqe(s);
    io_uring_prep_accept(sqe, s->lfd, NULL, NULL, SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, OP_ACCEPT);
}

static void post_recv(struct server *s, struct conn *c)
{
    struct io_uring_sqe *sqe = get_sqe(s);
    io_uring_prep_recv(sqe, c->fd, c->buf, s->buf_size, 0);
    if (s->poll_first)
        sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)c | OP_RECV);
}

static void post_send(struct server *s, struct conn *c)
{
    struct io_uring_sqe *sqe = get_sqe(s);
    io_uring_prep_send(sqe, c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)c | OP_SEND);
}

static void close_conn(struct server *s, struct conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    close(c->fd);
    free(c);
}

/* Out of descriptors. An accept fails so whether a connection is queued or not (the
 * descriptor comes first), and trying it again at once would fail at once, forever. A
 * queued connection is taken with the spare descriptor and dropped (its client sees its
 * end), as bench/ref_echo.c does; with none queued, the server waits until one is. */
static bool shed_one(struct server *s)
{
    struct pollfd pf = {.fd = s->lfd, .events = POLLIN};
    if (s->spare_fd < 0 || poll(&pf, 1, 0) != 1)
        return false; /* the listener is blocking: accept only what is there */
    close(s->spare_fd);
    int fd = accept(s->lfd, NULL, NULL);
    if (fd >= 0)
        close(fd);
    s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    return true;
}

static void on_accept(struct server *s, int res)
{
    if ((res == -EMFILE || res == -ENFILE) && !shed_one(s)) {
        struct io_uring_sqe *sqe = get_sqe(s);
        io_uring_prep_poll_add(sqe, s->lfd, POLLIN);
        io_uring_sqe_set_data64(sqe, OP_LISTEN_POLL);
        return;
    }
    post_accept(s);
    if (res < 0)
        return; /* ECONNABORTED...: the next accept tries again */
    int one = 1;
    setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = malloc(sizeof *c + s->buf_size);
    if (!c) {
        close(res);
        return;
    }
    c->fd = res;
    c->off = c->len = 0;
    c->prev = NULL;
    c->next = s->conns;
    if (c->next)
        c->next->prev = c;
    s->conns = c;
    post_recv(s, c);
}

static void on_recv(struct server *s, struct conn *c, int res)
{
    if (res <= 0) {
        if (res == -EINTR || res == -EAGAIN) {
            post_recv(s, c);
            return;
        }
        close_conn(s, c); /* EOF or error */
        return;
    }
    c->off = 0;
    c->len = (uint32_t)res;
    post_send(s, c);
}

static void on_send(struct server *s, struct conn *c, int res)
{
    if (res < 0) {
        if (res == -EINTR || res == -EAGAIN) {
            post_send(s, c);
            return;
        }
        close_conn(s, c);
        return;
    }
    c->off += (uint32_t)res;
    if (c->off < c->len)
        post_send(s, c); /* short send: the rest, in order */
    else
        post_recv(s, c);
}

static long parse_num(const char *str, const char *flag, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(str, &end, 10);
    if (errno || end == str || *end || v < min || v > max) {
        fprintf(stderr, "ref_uring_echo: bad value for %s: %s\n", flag, str);
        exit(2);
    }
    return v;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: ref_uring_echo [--port N] [--bind ADDR] [--buffer BYTES]\n"
               "                      [--taskrun coop|defer|none] [--no-poll-first]\n"
               "  --port N        TCP port (default 5050; 0 = ephemeral)\n"
               "  --bind ADDR     IPv4 address (default 127.0.0.1)\n"
               "  --buffer BYTES  receive buffer per connection (default 65536)\n"
               "  --taskrun MODE  coop (default), defer (DEFER_TASKRUN) or none\n"
               "  --no-poll-first receives try at once instead of waiting for data first\n");
}

int main(int argc, char **argv)
{
    struct server s = {.buf_size = 64 * 1024, .poll_first = 1};
    long port = 5050;
    const char *bind_addr = "127.0.0.1";
    unsigned setup = IORING_SETUP_COOP_TASKRUN;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "--no-poll-first") == 0) {
            s.poll_first = 0;
            continue;
        }
        if (i + 1 >= argc) {
            usage(stderr);
            return 2;
        }
        const char *v = argv[++i];
        if (strcmp(a, "--port") == 0)
            port = parse_num(v, a, 0, 65535);
        else if (strcmp(a, "--bind") == 0)
            bind_addr = v;
        else if (strcmp(a, "--buffer") == 0)
            s.buf_size = (uint32_t)parse_num(v, a, 1, 1 << 24);
        else if (strcmp(a, "--taskrun") == 0 && strcmp(v, "coop") == 0)
            setup = IORING_SETUP_COOP_TASKRUN;
        else if (strcmp(a, "--taskrun") == 0 && strcmp(v, "defer") == 0)
            setup = IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SINGLE_ISSUER;
        else if (strcmp(a, "--taskrun") == 0 && strcmp(v, "none") == 0)
            setup = 0;
        else {
            usage(stderr);
            return 2;
        }
    }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &sigs, NULL) < 0)
        die("sigprocmask", errno);
    s.sfd = signalfd(-1, &sigs, SFD_CLOEXEC);
    if (s.sfd < 0)
        die("signalfd", errno);

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, bind_addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "ref_uring_echo: --bind needs an IPv4 address, not %s\n", bind_addr);
        return 2;
    }
    s.lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s.lfd < 0)
        die("socket", errno);
    int one = 1;
    setsockopt(s.lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s.lfd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("bind", errno);
    if (listen(s.lfd, 65535) < 0)
        die("listen", errno);
    socklen_t salen = sizeof sa;
    if (getsockname(s.lfd, (struct sockaddr *)&sa, &salen) < 0)
        die("getsockname", errno);

    struct io_uring_params params = {.flags = setup | IORING_SETUP_CQSIZE, .cq_entries = 16384};
    int r = io_uring_queue_init_params(4096, &s.ring, &params);
    if (r < 0)
        die("io_uring_queue_init_params", -r);

    s.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    post_accept(&s);
    struct io_uring_sqe *sqe = get_sqe(&s);
    io_uring_prep_read(sqe, s.sfd, &s.sig, sizeof s.sig, 0);
    io_uring_sqe_set_data64(sqe, OP_SIGNAL);

    printf("listening on port %u\n", (unsigned)ntohs(sa.sin_port));
    fflush(stdout);

    int stop = 0;
    while (!stop) {
        r = io_uring_submit_and_wait(&s.ring, 1);
        if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY)
            die("io_uring_submit_and_wait", -r);
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&s.ring, head, cqe)
        {
            seen++;
            s.outstanding--;
            uint64_t ud = cqe->user_data;
            struct conn *c = (struct conn *)(uintptr_t)(ud & ~(uint64_t)OP_MASK);
            switch (ud & OP_MASK) {
            case OP_ACCEPT:
                on_accept(&s, cqe->res);
                break;
            case OP_RECV:
                on_recv(&s, c, cqe->res);
                break;
            case OP_SEND:
                on_send(&s, c, cqe->res);
                break;
            case OP_LISTEN_POLL: /* a connection is queued: accept (or shed) it */
                post_accept(&s);
                break;
            case OP_SIGNAL:
                stop = 1;
                break;
            }
        }
        io_uring_cq_advance(&s.ring, seen);
    }
    /* Cancel every request and wait until each has completed: only then is no buffer in
     * the kernel's hands, and the connections may be freed. */
    sqe = get_sqe(&s);
    io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
    io_uring_sqe_set_data64(sqe, 0);
    while (s.outstanding) {
        r = io_uring_submit_and_wait(&s.ring, 1);
        if (r < 0 && r != -EINTR)
            die("io_uring_submit_and_wait", -r);
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&s.ring, head, cqe) seen++;
        s.outstanding -= seen;
        io_uring_cq_advance(&s.ring, seen);
    }
    io_uring_queue_exit(&s.ring);
    while (s.conns)
        close_conn(&s, s.conns);
    return 0;
}
