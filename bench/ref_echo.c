/* ref_echo: the reference echo server that cport's servers are measured against.
 *
 * Deliberately plain: one thread, one level-triggered epoll, nonblocking sockets. On
 * readable it reads once into a 64 KiB buffer and writes the bytes straight back; if the
 * write is short, the remainder is kept for that connection, the connection stops being
 * read and waits for EPOLLOUT until the remainder is written. Bytes are never dropped or
 * reordered. It does not use libcport.
 *
 *   ref_echo [--port N] [--bind ADDR]
 *
 * --port 0 picks an ephemeral port; the chosen port is printed as "listening on port N".
 * SIGINT/SIGTERM end it with status 0. The hidden flag --corrupt-every N flips one byte in
 * every N echoed bytes; it exists only so tests can prove that a client's verifier works. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

enum { BUF_SIZE = 64 * 1024, MAX_EVENTS = 256 };

/* Unsent echo bytes of one connection; indexed by file descriptor. */
struct conn {
    char *pend;
    uint32_t off, len;
};

static struct conn *conns;
static int conns_cap;
static int epfd;
static int spare_fd = -1; /* held open so accept can shed connections on EMFILE */
static uint64_t corrupt_every, corrupt_left;
static char buf[BUF_SIZE];

static void die(const char *what)
{
    fprintf(stderr, "ref_echo: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: ref_echo [--port N] [--bind ADDR]\n"
               "  --port N     TCP port to listen on (default 5050; 0 = ephemeral)\n"
               "  --bind ADDR  IPv4 address to listen on (default 127.0.0.1)\n"
               "Prints \"listening on port N\" when ready; SIGINT/SIGTERM stop it.\n");
}

static void set_events(int fd, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev) < 0)
        die("epoll_ctl");
}

static void close_conn(int fd)
{
    free(conns[fd].pend);
    conns[fd].pend = NULL;
    conns[fd].len = conns[fd].off = 0;
    close(fd); /* also removes it from the epoll set */
}

static void corrupt(char *p, size_t n)
{
    while (corrupt_left <= n) {
        p += corrupt_left - 1;
        n -= corrupt_left - 1;
        *p ^= 0xff;
        p++;
        n--;
        corrupt_left = corrupt_every;
    }
    corrupt_left -= n;
}

static void on_readable(int fd)
{
    ssize_t r = read(fd, buf, sizeof buf);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        close_conn(fd); /* EOF or error */
        return;
    }
    if (corrupt_every)
        corrupt(buf, (size_t)r);
    ssize_t w = write(fd, buf, (size_t)r);
    if (w == r)
        return;
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            close_conn(fd);
            return;
        }
        w = 0;
    }
    /* Short write: keep the rest and stop reading until it is written. */
    struct conn *c = &conns[fd];
    c->len = (uint32_t)(r - w);
    c->off = 0;
    c->pend = malloc(c->len);
    if (!c->pend)
        die("malloc");
    memcpy(c->pend, buf + w, c->len);
    set_events(fd, EPOLLOUT);
}

static void on_writable(int fd)
{
    struct conn *c = &conns[fd];
    ssize_t w = write(fd, c->pend + c->off, c->len - c->off);
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR)
            close_conn(fd);
        return;
    }
    c->off += (uint32_t)w;
    if (c->off < c->len)
        return;
    free(c->pend);
    c->pend = NULL;
    c->len = c->off = 0;
    set_events(fd, EPOLLIN);
}

static void on_accept(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && spare_fd >= 0) {
                /* Out of descriptors: accept and drop one so the backlog does not spin.
                 * The error comes whether a connection is queued or not: stop when none. */
                close(spare_fd);
                fd = accept(lfd, NULL, NULL);
                if (fd >= 0)
                    close(fd);
                spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                if (fd < 0)
                    return;
                continue;
            }
            return; /* EAGAIN, or a transient error: epoll reports the next one */
        }
        if (fd >= conns_cap) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            close(fd);
    }
}

static long parse_num(const char *s, const char *flag, long max)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 0 || v > max) {
        fprintf(stderr, "ref_echo: bad value for %s: %s\n", flag, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    long port = 5050;
    const char *bind_addr = "127.0.0.1";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            usage(stderr);
            return 2;
        }
        if (strcmp(a, "--port") == 0)
            port = parse_num(argv[++i], a, 65535);
        else if (strcmp(a, "--bind") == 0)
            bind_addr = argv[++i];
        else if (strcmp(a, "--corrupt-every") == 0)
            corrupt_every = (uint64_t)parse_num(argv[++i], a, 1L << 40);
        else {
            usage(stderr);
            return 2;
        }
    }
    corrupt_left = corrupt_every;

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        die("getrlimit");
    conns_cap = rl.rlim_cur > (1 << 24) ? (1 << 24) : (int)rl.rlim_cur;
    conns = calloc((size_t)conns_cap, sizeof *conns);
    if (!conns)
        die("calloc");
    signal(SIGPIPE, SIG_IGN);

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &sigs, NULL) < 0)
        die("sigprocmask");
    int sfd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0)
        die("signalfd");

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, bind_addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "ref_echo: --bind needs an IPv4 address, not %s\n", bind_addr);
        return 2;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0)
        die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("bind");
    if (listen(lfd, 65535) < 0) /* the kernel caps it at net.core.somaxconn */
        die("listen");
    socklen_t salen = sizeof sa;
    if (getsockname(lfd, (struct sockaddr *)&sa, &salen) < 0)
        die("getsockname");
    spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0)
        die("epoll_ctl");
    ev.data.fd = sfd;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, sfd, &ev) < 0)
        die("epoll_ctl");

    printf("listening on port %u\n", (unsigned)ntohs(sa.sin_port));
    fflush(stdout);

    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd)
                on_accept(lfd);
            else if (fd == sfd)
                goto out;
            else if (conns[fd].pend)
                on_writable(fd);
            else
                on_readable(fd);
        }
    }
out:
    for (int fd = 0; fd < conns_cap; fd++)
        free(conns[fd].pend);
    free(conns);
    return 0;
}
