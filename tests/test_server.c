/* Tests of the server layer (cport/server.h; src/server.c, src/conn.c): issue 4.
 *
 * Most tests run a cp_server in this process, with callbacks written here and clients on
 * plain sockets, so that they see what the callbacks see: a per-connection "in a callback"
 * flag that catches two callbacks of one connection running at once (or any after
 * on_close), the byte order each connection's data arrives in, cp_conn_pending(), the heap
 * and RSS. The cport-echo tests run it as a child process found next to this binary; every
 * child is registered and stopped (SIGTERM, then SIGKILL) at exit, also when a CHECK fails.
 *
 *   T3/S6  order_and_serialisation, on_close_exactly_once
 *   S2     accept_burst_5000
 *   S3     handshake_timeout_reaps_silent, idle_timeout, idle_connections_cost_no_cpu
 *   S4     steady_state_allocates_nothing, framed_large_frames_allocate_nothing
 *   S5     max_conns_refuses_extra, max_conns_burst, backpressure_bounds_memory,
 *          echo_fd_exhaustion
 *   S7     framed_split_and_batched, framed_bad_frame
 *   S8     shutdown_under_load, shutdown_deadline_cuts, echo_sigterm_under_load,
 *          shutdown_races_closing_peers
 *   stats  stats_counters_move, echo_stats_sigusr1_and_prometheus
 *   (shutdown_slow_reader_gets_every_reply, backpressure_keeps_order: S5/S8 corner cases)
 *
 * Volumes scale with CPORT_TEST_SCALE (cpt_scaled); the counts the issue names (5,000
 * connects, 5,000 silent connections, 100 clients) do not. Every wait has a deadline that
 * fails the test. */
#include "harness.h"

#include "cport.h"
#include "pool_internal.h"   /* the pool's worker ids */
#include "server_internal.h" /* the tick clock, to make time pass */

#include <arpa/inet.h>
#include <linux/filter.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum {
    IO_MS = 30000,    /* one client exchange / one wait for a condition */
    START_MS = 20000, /* a child server's start-up (sanitizer builds start slowly) */
};

#define LOAD(p)     __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define ADD(p, v)   __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
#define SUB(p, v)   __atomic_sub_fetch((p), (v), __ATOMIC_SEQ_CST)
#define XCHG(p, v)  __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)

/* Wait (polling every millisecond) until cond holds; fail after ms milliseconds. */
#define WAIT_FOR(cond, ms)                                                                         \
    do {                                                                                           \
        int64_t wf_deadline = cpt_now_ms() + (ms);                                                 \
        while (!(cond)) {                                                                          \
            if (cpt_now_ms() > wf_deadline) {                                                      \
                fprintf(stderr, "%s:%d: timed out after %d ms waiting for %s\n", __FILE__,         \
                        __LINE__, (int)(ms), #cond);                                               \
                exit(1);                                                                           \
            }                                                                                      \
            usleep(1000);                                                                          \
        }                                                                                          \
    } while (0)

static void atomic_max(uint64_t *p, uint64_t v)
{
    uint64_t cur = LOAD(p);
    while (v > cur &&
           !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        ;
}

/* ---- counting allocations ------------------------------------------------------------------ */

/* S4 asks for zero malloc calls in steady state, so every allocation of the process is
 * counted: in plain builds by wrapping glibc's allocator entry points (forwarding to the
 * __libc_* originals, so the heap stays glibc's), under ASan/TSan with the sanitizer's
 * malloc hook. heap_in_use() is mallinfo2().uordblks, or the sanitizer's live byte count
 * (mallinfo2 does not see the sanitizer's heap). */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CPT_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define CPT_SANITIZED 1
#endif
#endif

static uint64_t malloc_calls;

#ifdef CPT_SANITIZED
#include <sanitizer/allocator_interface.h>

static void count_malloc_hook(const volatile void *ptr, size_t size)
{
    (void)ptr;
    (void)size;
    __atomic_add_fetch(&malloc_calls, 1, __ATOMIC_RELAXED);
}

static void count_free_hook(const volatile void *ptr)
{
    (void)ptr;
}

__attribute__((constructor)) static void install_malloc_hooks(void)
{
    __sanitizer_install_malloc_and_free_hooks(count_malloc_hook, count_free_hook);
}

static uint64_t heap_in_use(void)
{
    return __sanitizer_get_current_allocated_bytes();
}
#else
extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t size);
extern void *__libc_memalign(size_t align, size_t size);

void *malloc(size_t size)
{
    __atomic_add_fetch(&malloc_calls, 1, __ATOMIC_RELAXED);
    return __libc_malloc(size);
}

void *calloc(size_t n, size_t size)
{
    __atomic_add_fetch(&malloc_calls, 1, __ATOMIC_RELAXED);
    return __libc_calloc(n, size);
}

void *realloc(void *p, size_t size)
{
    __atomic_add_fetch(&malloc_calls, 1, __ATOMIC_RELAXED);
    return __libc_realloc(p, size);
}

void *memalign(size_t align, size_t size)
{
    __atomic_add_fetch(&malloc_calls, 1, __ATOMIC_RELAXED);
    return __libc_memalign(align, size);
}

void *aligned_alloc(size_t align, size_t size)
{
    __atomic_add_fetch(&malloc_calls, 1, __ATOMIC_RELAXED);
    return __libc_memalign(align, size);
}

int posix_memalign(void **out, size_t align, size_t size)
{
    __atomic_add_fetch(&malloc_calls, 1, __ATOMIC_RELAXED);
    if (align % sizeof(void *) != 0 || (align & (align - 1)) != 0)
        return EINVAL;
    void *p = __libc_memalign(align, size);
    if (!p)
        return ENOMEM;
    *out = p;
    return 0;
}

static uint64_t heap_in_use(void)
{
    return mallinfo2().uordblks;
}
#endif

static uint64_t malloc_count(void)
{
    return __atomic_load_n(&malloc_calls, __ATOMIC_RELAXED);
}

/* ---- byte patterns ----------------------------------------------------------------------- */

static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Bytes off.. of the pseudo-random sequence keyed by seed (no period a reordering of
 * chunks could hide in). */
static void pattern_fill(uint32_t seed, uint64_t off, uint8_t *buf, size_t len)
{
    uint64_t key = (uint64_t)seed << 40;
    size_t i = 0;
    while (i < len) {
        uint64_t o = off + i;
        uint64_t h = mix64(key ^ (o >> 3));
        for (unsigned b = (unsigned)(o & 7); b < 8 && i < len; b++)
            buf[i++] = (uint8_t)(h >> (8 * b));
    }
}

/* A connection's stream: 4 bytes naming the seed (big-endian), then its pattern, so that
 * the server can check every byte it is handed. */
static void stream_fill(uint32_t seed, uint64_t off, uint8_t *buf, size_t len)
{
    size_t i = 0;
    for (; i < len && off + i < 4; i++)
        buf[i] = (uint8_t)(seed >> (24 - 8 * (off + i)));
    if (i < len)
        pattern_fill(seed, off + i, buf + i, len - i);
}

static uint64_t rng_next(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return mix64(*s);
}

/* ---- client sockets ---------------------------------------------------------------------- */

static struct sockaddr_in loopback(uint16_t port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sa;
}

static int sock_nb(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fprintf(stderr, "socket: %s\n", strerror(errno));
    CHECK(fd >= 0);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* Start a non-blocking connect; returns the socket. */
static int connect_start(uint16_t port)
{
    int fd = sock_nb();
    struct sockaddr_in sa = loopback(port);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        fprintf(stderr, "connect: %s\n", strerror(errno));
        CHECK(!"connect started");
    }
    return fd;
}

/* A connected non-blocking socket (the connect must succeed). */
static int connect_to(uint16_t port)
{
    int fd = connect_start(port);
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int r;
    while ((r = poll(&p, 1, IO_MS)) < 0 && errno == EINTR)
        ;
    CHECK_EQ(r, 1);
    int err = 0;
    socklen_t l = sizeof err;
    CHECK_EQ(getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l), 0);
    if (err)
        fprintf(stderr, "connect: %s\n", strerror(err));
    CHECK_EQ(err, 0);
    return fd;
}

/* Wait for ev on fd until the absolute deadline (ms); false on timeout. */
static bool wait_fd(int fd, short ev, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - cpt_now_ms();
        if (left <= 0)
            return false;
        struct pollfd p = {.fd = fd, .events = ev};
        int r = poll(&p, 1, (int)(left > 1000 ? 1000 : left));
        if (r > 0)
            return true;
        if (r < 0 && errno != EINTR) {
            fprintf(stderr, "poll: %s\n", strerror(errno));
            return false;
        }
    }
}

/* Send everything (no allocation; usable in a steady-state phase). 0, or -errno. */
static int try_send_all(int fd, const void *buf, size_t len, int64_t deadline)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t w = send(fd, p, len, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            len -= (size_t)w;
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EINTR)
            return -errno;
        if (!wait_fd(fd, POLLOUT, deadline))
            return -ETIMEDOUT;
    }
    return 0;
}

/* Receive exactly len bytes. 0, -EPIPE at EOF, or -errno. */
static int try_recv_all(int fd, void *buf, size_t len, int64_t deadline)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t r = recv(fd, p, len, 0);
        if (r > 0) {
            p += r;
            len -= (size_t)r;
            continue;
        }
        if (r == 0)
            return -EPIPE;
        if (errno != EAGAIN && errno != EINTR)
            return -errno;
        if (!wait_fd(fd, POLLIN, deadline))
            return -ETIMEDOUT;
    }
    return 0;
}

static void send_all(int fd, const void *buf, size_t len)
{
    int r = try_send_all(fd, buf, len, cpt_now_ms() + IO_MS);
    if (r < 0)
        fprintf(stderr, "send of %zu bytes: %s\n", len, strerror(-r));
    CHECK_EQ(r, 0);
}

static void recv_all(int fd, void *buf, size_t len)
{
    int r = try_recv_all(fd, buf, len, cpt_now_ms() + IO_MS);
    if (r < 0)
        fprintf(stderr, "receive of %zu bytes: %s\n", len, r == -EPIPE ? "EOF" : strerror(-r));
    CHECK_EQ(r, 0);
}

/* Send len bytes of pattern `seed` and read them back byte-exact, interleaved (any size;
 * no allocation). Returns 0, or -errno / -EPIPE (EOF) / -EBADMSG (wrong bytes). */
static int try_exchange(int fd, uint32_t seed, size_t len, int64_t deadline)
{
    uint8_t tx[16384], rx[16384], want[16384];
    size_t sent = 0, got = 0;
    while (got < len) {
        short ev = (short)(POLLIN | (sent < len ? POLLOUT : 0));
        if (!wait_fd(fd, ev, deadline))
            return -ETIMEDOUT;
        if (sent < len) {
            size_t n = len - sent < sizeof tx ? len - sent : sizeof tx;
            pattern_fill(seed, sent, tx, n);
            ssize_t w = send(fd, tx, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0)
                sent += (size_t)w;
            else if (w < 0 && errno != EAGAIN && errno != EINTR)
                return -errno;
        }
        ssize_t r = recv(fd, rx, sizeof rx, MSG_DONTWAIT);
        if (r > 0) {
            if (got + (size_t)r > sent)
                return -EBADMSG;
            pattern_fill(seed, got, want, (size_t)r);
            if (memcmp(rx, want, (size_t)r) != 0)
                return -EBADMSG;
            got += (size_t)r;
        } else if (r == 0) {
            return -EPIPE;
        } else if (errno != EAGAIN && errno != EINTR) {
            return -errno;
        }
    }
    return 0;
}

static void exchange(int fd, uint32_t seed, size_t len)
{
    int r = try_exchange(fd, seed, len, cpt_now_ms() + IO_MS);
    if (r < 0)
        fprintf(stderr, "echo of %zu bytes: %s\n", len,
                r == -EPIPE     ? "EOF"
                : r == -EBADMSG ? "wrong bytes"
                                : strerror(-r));
    CHECK_EQ(r, 0);
}

/* Read until the peer closes (EOF or reset), discarding data; *data gets the byte count,
 * *how 0 for EOF or the errno (ECONNRESET for a reset). Returns the close's time (ms), or
 * -1 at the deadline. data and how may be NULL. */
static int64_t read_to_close(int fd, int64_t deadline, size_t *data, int *how)
{
    uint8_t buf[16384];
    if (data)
        *data = 0;
    for (;;) {
        ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r > 0) {
            if (data)
                *data += (size_t)r;
            continue;
        }
        if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
            if (how)
                *how = r == 0 ? 0 : errno;
            return cpt_now_ms();
        }
        if (!wait_fd(fd, POLLIN, deadline))
            return -1;
    }
}

static int64_t wait_peer_close(int fd, int64_t deadline, size_t *data)
{
    return read_to_close(fd, deadline, data, NULL);
}

/* The server closes fd without sending anything, within timeout_ms. */
static void expect_closed(int fd, int timeout_ms)
{
    size_t data;
    int64_t t = wait_peer_close(fd, cpt_now_ms() + timeout_ms, &data);
    if (t < 0)
        fprintf(stderr, "connection not closed within %d ms\n", timeout_ms);
    CHECK(t >= 0);
    CHECK_EQ(data, 0);
}

/* ---- processes ------------------------------------------------------------------------- */

/* Resident memory in KiB of pid (0 = this process). */
/* A field of /proc/PID/status in kB ("VmRSS", "VmSize"); pid 0 = this process. */
static long status_kb(pid_t pid, const char *field)
{
    char path[64], buf[4096];
    if (pid)
        snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    else
        snprintf(path, sizeof path, "/proc/self/status");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    CHECK(fd >= 0);
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    CHECK(n > 0);
    buf[n] = 0;
    char key[32];
    snprintf(key, sizeof key, "\n%s:", field);
    const char *p = strstr(buf, key);
    CHECK(p != NULL);
    return strtol(p + strlen(key), NULL, 10);
}

static long rss_kb(pid_t pid)
{
    return status_kb(pid, "VmRSS");
}

/* CPU time (user + system) of pid in ms, from /proc/PID/stat. */
static int64_t cpu_ms(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    CHECK(fd >= 0);
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    CHECK(n > 0);
    buf[n] = 0;
    const char *p = strrchr(buf, ')');
    CHECK(p != NULL);
    /* After ")": state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
     * utime(14) stime(15). */
    unsigned long long ut = 0, st = 0;
    CHECK_EQ(sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st), 2);
    return (int64_t)(ut + st) * 1000 / sysconf(_SC_CLK_TCK);
}

static long fd_count(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    CHECK(d != NULL);
    long n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* Children: registered at fork, stopped at exit (SIGTERM, SIGKILL after 5 s). */
enum { MAX_CHILDREN = 8 };
static pid_t children[MAX_CHILDREN];
static pid_t children_owner;

static void stop_children(void)
{
    if (getpid() != children_owner)
        return;
    for (int i = 0; i < MAX_CHILDREN; i++)
        if (children[i] > 0)
            kill(children[i], SIGTERM);
    for (int i = 0; i < MAX_CHILDREN; i++) {
        pid_t pid = children[i];
        if (pid <= 0)
            continue;
        children[i] = 0;
        int st;
        int64_t deadline = cpt_now_ms() + 5000;
        pid_t r;
        while ((r = waitpid(pid, &st, WNOHANG)) == 0 && cpt_now_ms() < deadline)
            usleep(5000);
        if (r == 0) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            fprintf(stderr, "clean-up: child %d killed\n", (int)pid);
        }
    }
}

static void child_track(pid_t pid)
{
    if (!children_owner) {
        children_owner = getpid();
        atexit(stop_children);
    }
    for (int i = 0; i < MAX_CHILDREN; i++) {
        if (children[i] == 0) {
            children[i] = pid;
            return;
        }
    }
    kill(pid, SIGKILL);
    CHECK(!"too many children");
}

static void child_untrack(pid_t pid)
{
    for (int i = 0; i < MAX_CHILDREN; i++)
        if (children[i] == pid)
            children[i] = 0;
}

/* Wait for pid to exit within timeout_ms (fails otherwise; the child is killed at exit). */
static int child_wait(pid_t pid, int timeout_ms)
{
    int64_t deadline = cpt_now_ms() + timeout_ms;
    for (;;) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        CHECK(r >= 0);
        if (r == pid) {
            child_untrack(pid);
            return st;
        }
        if (cpt_now_ms() > deadline) {
            fprintf(stderr, "child %d did not exit within %d ms\n", (int)pid, timeout_ms);
            CHECK(!"child exited in time");
        }
        usleep(1000);
    }
}

static const char *bin_path(const char *name)
{
    static char dir[PATH_MAX];
    static char path[PATH_MAX + 64];
    if (!dir[0]) {
        ssize_t n = readlink("/proc/self/exe", dir, sizeof dir - 1);
        CHECK(n > 0);
        dir[n] = 0;
        char *slash = strrchr(dir, '/');
        CHECK(slash != NULL);
        *slash = 0;
    }
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (access(path, X_OK) != 0) {
        fprintf(stderr, "%s is not built\n", path);
        CHECK(!"binary present");
    }
    return path;
}

/* Everything written to a memfd so far, NUL-terminated, in a static buffer. */
static const char *memfd_text(int fd)
{
    static char buf[1 << 18];
    size_t len = 0;
    for (;;) {
        ssize_t n = pread(fd, buf + len, sizeof buf - 1 - len, (off_t)len);
        if (n <= 0 || len + (size_t)n >= sizeof buf - 1) {
            if (n > 0)
                len += (size_t)n;
            break;
        }
        len += (size_t)n;
    }
    buf[len] = 0;
    return buf;
}

/* cport-echo as a child, on the backend under test (it inherits CPORT_BACKEND). */
typedef struct echo_child {
    pid_t pid;
    int out, err; /* memfds holding its stdout and stderr */
    uint16_t port, stats_port;
} echo_child;

static void echo_start(echo_child *e, rlim_t nofile, const char *const *args)
{
    const char *argv[40];
    int argc = 0;
    static char exe[PATH_MAX + 64];
    snprintf(exe, sizeof exe, "%s", bin_path("cport-echo"));
    argv[argc++] = exe;
    argv[argc++] = "--port";
    argv[argc++] = "0";
    argv[argc++] = "--bind";
    argv[argc++] = "127.0.0.1";
    for (int i = 0; args[i]; i++) {
        CHECK(argc < 38);
        argv[argc++] = args[i];
    }
    argv[argc] = NULL;
    fprintf(stderr, "$");
    for (int i = 0; argv[i]; i++)
        fprintf(stderr, " %s", argv[i]);
    fprintf(stderr, nofile ? " (RLIMIT_NOFILE %llu)\n" : "\n", (unsigned long long)nofile);
    *e = (echo_child){.out = cpt_memfd("echo-out"), .err = cpt_memfd("echo-err")};
    fflush(stderr);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        if (nofile) {
            struct rlimit rl = {.rlim_cur = nofile, .rlim_max = nofile};
            if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
                _exit(125);
        }
        if (dup2(e->out, STDOUT_FILENO) < 0 || dup2(e->err, STDERR_FILENO) < 0)
            _exit(126);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    e->pid = pid;
    child_track(pid);
    int64_t deadline = cpt_now_ms() + START_MS;
    const char *text, *listening;
    for (;;) {
        text = memfd_text(e->out);
        listening = strstr(text, "listening on 127.0.0.1:");
        if (listening && strchr(listening, '\n'))
            break;
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            child_untrack(pid);
            fprintf(stderr, "cport-echo exited during start-up (0x%x)\n%s%s\n", st, text,
                    memfd_text(e->err));
            CHECK(!"cport-echo started");
        }
        CHECK(cpt_now_ms() < deadline);
        usleep(2000);
    }
    int port = 0;
    CHECK_EQ(sscanf(listening, "listening on 127.0.0.1:%d", &port), 1);
    CHECK(port > 0 && port < 65536);
    e->port = (uint16_t)port;
    if (strcmp(cpt_backend(), "auto") != 0) {
        char want[64];
        snprintf(want, sizeof want, "backend=%s ", cpt_backend());
        CHECK(strstr(text, want) != NULL);
    }
    const char *st = strstr(text, "stats on 127.0.0.1:");
    if (st) {
        CHECK_EQ(sscanf(st, "stats on 127.0.0.1:%d", &port), 1);
        e->stats_port = (uint16_t)port;
    }
}

/* SIGTERM: cport-echo must exit 0 (its stderr is shown if not); its pipes are closed. */
static void echo_stop_cleanly(echo_child *e)
{
    CHECK_EQ(kill(e->pid, SIGTERM), 0);
    int st = child_wait(e->pid, IO_MS);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fprintf(stderr, "cport-echo: status 0x%x\n%s\n", st, memfd_text(e->err));
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    close(e->out);
    close(e->err);
}

/* The last "cport-echo: conns_open=..." counter line on its stderr after SIGUSR1. */
static uint64_t echo_counter(const char *line, const char *key)
{
    char k[64];
    snprintf(k, sizeof k, " %s=", key);
    const char *p = strstr(line, k);
    if (!p) {
        snprintf(k, sizeof k, ": %s=", key);
        p = strstr(line, k);
    }
    if (!p)
        fprintf(stderr, "no %s in: %s\n", key, line);
    CHECK(p != NULL);
    char *end;
    unsigned long long v = strtoull(p + strlen(k), &end, 10);
    CHECK(end > p + strlen(k) && (*end == ' ' || *end == '\n' || *end == 0));
    return v;
}

static int count_of(const char *text, const char *needle)
{
    int n = 0;
    for (const char *p = text; (p = strstr(p, needle)) != NULL; p++)
        n++;
    return n;
}

/* SIGUSR1, then the counter line it prints (copied into line). */
static void echo_counters(echo_child *e, char *line, size_t cap)
{
    static const char tag[] = "cport-echo: conns_open=";
    int before = count_of(memfd_text(e->err), tag);
    CHECK_EQ(kill(e->pid, SIGUSR1), 0);
    const char *text;
    int64_t deadline = cpt_now_ms() + IO_MS;
    for (;;) {
        text = memfd_text(e->err);
        const char *last = NULL;
        for (const char *p = text; (p = strstr(p, tag)) != NULL; p++)
            last = p;
        if (count_of(text, tag) > before && strchr(last, '\n')) {
            size_t n = (size_t)(strchr(last, '\n') - last);
            CHECK(n < cap);
            memcpy(line, last, n);
            line[n] = 0;
            return;
        }
        CHECK(cpt_now_ms() < deadline);
        usleep(1000);
    }
}

/* ---- scheduling gaps ------------------------------------------------------------------- */

/* The machine these tests run on may be shared and loaded: then every thread of this process
 * (server workers, clients, anything) can wait hundreds of ms for a CPU, and a latency bound
 * would measure the neighbours. A watcher thread that only sleeps 1 ms at a time records
 * every wake-up more than GAP_MS late as a gap; latency checks subtract the gaps that
 * overlap what they measure and print both figures. A server that stalls its clients (a
 * lock held too long, work queued behind a flood) does not delay this thread. */
enum { GAP_MS = 10, MAX_GAPS = 8192 };

typedef struct gapwatch {
    int stop;
    int n; /* atomic: gaps recorded */
    int64_t from[MAX_GAPS], to[MAX_GAPS];
    pthread_t th;
} gapwatch;

static void *gapwatch_main(void *arg)
{
    gapwatch *g = arg;
    while (!LOAD(&g->stop)) {
        int64_t t0 = cpt_now_ns();
        usleep(1000);
        int64_t t1 = cpt_now_ns();
        int n = LOAD(&g->n);
        if (t1 - t0 > (int64_t)GAP_MS * 1000000 && n < MAX_GAPS) {
            g->from[n] = t0 + 1000000;
            g->to[n] = t1;
            STORE(&g->n, n + 1);
        }
    }
    return NULL;
}

static gapwatch *gapwatch_start(void)
{
    gapwatch *g = calloc(1, sizeof(*g));
    CHECK(g != NULL);
    CHECK_EQ(pthread_create(&g->th, NULL, gapwatch_main, g), 0);
    return g;
}

static void gapwatch_stop(gapwatch *g)
{
    STORE(&g->stop, 1);
    pthread_join(g->th, NULL);
}

/* Nanoseconds of [from, to] (ns) during which this process was not being scheduled. */
static int64_t gap_overlap(gapwatch *g, int64_t from, int64_t to)
{
    int64_t sum = 0;
    int n = LOAD(&g->n);
    for (int i = 0; i < n; i++) {
        int64_t a = g->from[i] > from ? g->from[i] : from;
        int64_t b = g->to[i] < to ? g->to[i] : to;
        if (b > a)
            sum += b - a;
    }
    return sum;
}

static int64_t gap_total_ms(gapwatch *g)
{
    return gap_overlap(g, 0, INT64_MAX) / 1000000;
}

/* ---- an in-process server with checking callbacks -------------------------------------- */

#define UCONN_MAGIC 0xc0c0a11eu

/* The per-connection user area. */
typedef struct uconn {
    uint32_t in_cb;  /* atomic: one of its callbacks is running */
    uint32_t closed; /* atomic: on_close ran */
    uint32_t magic;  /* set by on_open when it keeps the connection */
    uint32_t id;     /* order of on_open */
    uint32_t seed;   /* stream checks: from the first 4 bytes */
    uint32_t calls;
    uint32_t client; /* framed tests: the client index carried by the frames */
    uint32_t kind;   /* on_close test: the command byte */
    uint64_t rx;     /* bytes delivered to on_data */
    uint64_t frames; /* on_data calls */
    uint64_t last_bytes_in;
    int32_t reason, err;
} uconn;

typedef enum echo_mode {
    ECHO_DATA,  /* cp_conn_send_data: the received buffer itself */
    ECHO_COPY,  /* cp_conn_send: a copy */
    ECHO_MIXED, /* each chunk in three sends: send_data, send (copy), send_ref */
    ECHO_FRAME, /* framed: cp_conn_send_frame */
    ECHO_NONE,
} echo_mode;

typedef struct tsrv tsrv;
typedef void (*data_hook)(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len);

struct tsrv {
    cp_server *sv;
    uint16_t port;
    cp_server_options o;
    echo_mode echo;
    bool check_stream;       /* on_data checks each connection's stream pattern */
    bool yield;              /* callbacks yield now and then inside the in-callback window */
    bool hold_refs;          /* on_open takes a reference, dropped by tsrv_release() */
    int sndbuf;              /* on_open sets the connection's SO_SNDBUF to this (0 = leave it) */
    uint32_t pause_on_open;  /* atomic: on_open pauses reading (cp_conn_pause_recv) */
    uint32_t resume_on_open; /* atomic: ...and then resumes it (cp_conn_resume_recv) */
    uint32_t refuse_every;   /* atomic: on_open refuses every n-th connection; 0 = none */
    data_hook hook;          /* replaces the echo */
    void (*end_hook)(tsrv *t, cp_conn *c, uconn *u); /* on_end (half_close) */
    uint64_t ends;                                   /* atomic: on_end calls */
    uint64_t end_rx;                                 /* atomic: u->rx summed at on_end */
    void *ctx;

    /* Counters (atomic). */
    uint64_t open_calls, opens, refused, closes, open_now, open_now_max;
    uint64_t nagle;          /* connections that reached on_open without TCP_NODELAY */
    uint64_t overlap;        /* two callbacks of one connection at once */
    uint64_t late;           /* a callback after on_close */
    uint64_t twice;          /* on_close twice */
    uint64_t unopened_close; /* on_close for a connection on_open did not keep */
    uint64_t dirty_open;     /* user area not zeroed at on_open */
    uint64_t order_errors, checked;
    uint64_t send_errors, epipe;
    uint64_t ref_sends, ref_sent_ok, ref_sent_bad;
    uint64_t max_pending;
    uint64_t reasons[8];
    uint64_t kind_reasons[8][8]; /* on_close test: [uconn.kind][reason] */
    uint32_t error_once;
    char first_error[256];
    uint32_t bad_frames;        /* atomic: on_close with CP_CLOSE_BAD_FRAME */
    char bad_frame_why[4][160]; /* the first four's cp_conn_frame_state() */
    pthread_t shutdown_caller;  /* with shutdown_caller_set: the thread in cp_server_shutdown */
    int shutdown_caller_set;    /* atomic */
    uint64_t closes_on_caller;  /* on_close ran on shutdown_caller */

    pthread_mutex_t lock; /* guards held */
    cp_conn **held;
    size_t nheld, held_cap;
};

static tsrv *tsrv_of(cp_conn *c)
{
    return cp_server_user(cp_conn_server(c));
}

static void note_error(tsrv *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note_error(tsrv *t, const char *fmt, ...)
{
    if (XCHG(&t->error_once, 1))
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->first_error, sizeof t->first_error, fmt, ap);
    va_end(ap);
}

static void cb_enter(tsrv *t, uconn *u)
{
    if (XCHG(&u->in_cb, 1) != 0)
        ADD(&t->overlap, 1);
    if (LOAD(&u->closed))
        ADD(&t->late, 1);
    /* Widen the window in which a second callback of this connection would be caught. */
    if (t->yield && ADD(&u->calls, 1) % 4 == 0)
        sched_yield();
}

static void cb_leave(uconn *u)
{
    STORE(&u->in_cb, 0);
}

static void hold(tsrv *t, cp_conn *c)
{
    cp_conn_ref(c);
    pthread_mutex_lock(&t->lock);
    if (t->nheld == t->held_cap) {
        t->held_cap = t->held_cap ? 2 * t->held_cap : 256;
        t->held = realloc(t->held, t->held_cap * sizeof(*t->held));
        if (!t->held)
            abort();
    }
    t->held[t->nheld++] = c;
    pthread_mutex_unlock(&t->lock);
}

/* How many connections on_open has held so far (under the lock: on_open holds after it
 * counts `opens`, so opens alone does not say the hold is done). */
static size_t held_count(tsrv *t)
{
    pthread_mutex_lock(&t->lock);
    size_t n = t->nheld;
    pthread_mutex_unlock(&t->lock);
    return n;
}

/* The i-th connection on_open held, or NULL if it has not held that many yet. */
static cp_conn *held_at(tsrv *t, size_t i)
{
    pthread_mutex_lock(&t->lock);
    cp_conn *c = i < t->nheld ? t->held[i] : NULL;
    pthread_mutex_unlock(&t->lock);
    return c;
}

static int t_on_open(cp_conn *c)
{
    tsrv *t = tsrv_of(c);
    uconn *u = cp_conn_user(c);
    ADD(&t->open_calls, 1);
    if (u->magic || u->closed || u->in_cb || u->rx)
        ADD(&t->dirty_open, 1);
    cb_enter(t, u);
    uint32_t every = LOAD(&t->refuse_every);
    uint64_t n = LOAD(&t->open_calls);
    if (every && n % every == 0) {
        ADD(&t->refused, 1);
        cb_leave(u);
        return -1;
    }
    int nodelay = 0, r;
    socklen_t nlen = sizeof nodelay;
    if (cp_conn_getsockopt(c, IPPROTO_TCP, TCP_NODELAY, &nodelay, &nlen) < 0 || !nodelay)
        ADD(&t->nagle, 1);
    if (t->sndbuf &&
        (r = cp_conn_setsockopt(c, SOL_SOCKET, SO_SNDBUF, &t->sndbuf, sizeof t->sndbuf)) < 0)
        note_error(t, "SO_SNDBUF: %s", strerror(-r));
    u->magic = UCONN_MAGIC;
    u->id = (uint32_t)ADD(&t->opens, 1);
    atomic_max(&t->open_now_max, ADD(&t->open_now, 1));
    if (LOAD(&t->pause_on_open) && (r = cp_conn_pause_recv(c)) != 0)
        note_error(t, "cp_conn_pause_recv in on_open: %d", r);
    if (LOAD(&t->resume_on_open) && (r = cp_conn_resume_recv(c)) != 0)
        note_error(t, "cp_conn_resume_recv in on_open: %d", r);
    if (t->hold_refs)
        hold(t, c);
    cb_leave(u);
    return 0;
}

static void t_on_close(cp_conn *c, cp_close_reason reason, int err)
{
    tsrv *t = tsrv_of(c);
    uconn *u = cp_conn_user(c);
    cb_enter(t, u);
    if (XCHG(&u->closed, 1))
        ADD(&t->twice, 1);
    if (u->magic != UCONN_MAGIC)
        ADD(&t->unopened_close, 1);
    if ((reason == CP_CLOSE_ERROR) != (err < 0))
        note_error(t, "on_close(%s) with err %d", cp_close_reason_name(reason), err);
    char why[160];
    int wl = cp_conn_frame_state(c, why, sizeof why);
    if (!t->o.framed && wl != -EINVAL)
        note_error(t, "cp_conn_frame_state on a stream server: %d", wl);
    if (reason == CP_CLOSE_BAD_FRAME) {
        uint32_t i = (uint32_t)ADD(&t->bad_frames, 1) - 1;
        if (i < 4)
            snprintf(t->bad_frame_why[i], sizeof t->bad_frame_why[i], "%s",
                     wl > 0 ? why : "(none)");
    }
    u->reason = (int32_t)reason;
    u->err = err;
    ADD(&t->reasons[(unsigned)reason & 7], 1);
    ADD(&t->kind_reasons[LOAD(&u->kind) & 7][(unsigned)reason & 7], 1);
    if (LOAD(&t->shutdown_caller_set) && pthread_equal(pthread_self(), t->shutdown_caller))
        ADD(&t->closes_on_caller, 1);
    SUB(&t->open_now, 1);
    ADD(&t->closes, 1);
    cb_leave(u);
}

static void t_on_sent(cp_conn *c, void *ctx, int64_t result)
{
    tsrv *t = tsrv_of(c);
    uconn *u = cp_conn_user(c);
    cb_enter(t, u);
    uint64_t *block = ctx;
    if (result == (int64_t)block[0])
        ADD(&t->ref_sent_ok, 1);
    else
        ADD(&t->ref_sent_bad, 1);
    free(block);
    cb_leave(u);
}

/* The server side of the stream check: every byte handed over is the next one expected. */
static void check_stream(tsrv *t, uconn *u, const uint8_t *d, size_t len)
{
    size_t i = 0;
    for (; i < len && u->rx + i < 4; i++)
        u->seed = u->seed << 8 | d[i];
    uint8_t want[4096];
    while (i < len) {
        size_t n = len - i < sizeof want ? len - i : sizeof want;
        stream_fill(u->seed, u->rx + i, want, n);
        if (memcmp(d + i, want, n) != 0) {
            size_t j = 0;
            while (d[i + j] == want[j])
                j++;
            ADD(&t->order_errors, 1);
            note_error(t, "stream %u: byte %llu is 0x%02x, expected 0x%02x (delivery of %zu bytes)",
                       u->seed, (unsigned long long)(u->rx + i + j), d[i + j], want[j], len);
            break;
        }
        i += n;
    }
    ADD(&t->checked, len);
}

static void note_send(tsrv *t, int r)
{
    if (r == -EPIPE)
        ADD(&t->epipe, 1);
    else if (r < 0)
        ADD(&t->send_errors, 1);
}

static void echo_back(tsrv *t, cp_conn *c, const uint8_t *data, size_t len)
{
    switch (t->echo) {
    case ECHO_DATA:
        note_send(t, cp_conn_send_data(c, data, len));
        break;
    case ECHO_COPY:
        note_send(t, cp_conn_send(c, data, len));
        break;
    case ECHO_FRAME:
        note_send(t, cp_conn_send_frame(c, data, len));
        break;
    case ECHO_MIXED: {
        size_t a = len / 3, b = len / 3, rest = len - a - b;
        if (a)
            note_send(t, cp_conn_send_data(c, data, a));
        if (b)
            note_send(t, cp_conn_send(c, data + a, b));
        uint64_t *block = malloc(sizeof(uint64_t) + rest);
        if (!block)
            abort();
        block[0] = rest;
        memcpy(block + 1, data + a + b, rest);
        int r = cp_conn_send_ref(c, block + 1, rest, block);
        if (r < 0)
            free(block);
        else
            ADD(&t->ref_sends, 1);
        note_send(t, r);
        break;
    }
    case ECHO_NONE:
        break;
    }
}

static void t_on_data(cp_conn *c, const void *data, size_t len)
{
    tsrv *t = tsrv_of(c);
    uconn *u = cp_conn_user(c);
    cb_enter(t, u);
    if (u->magic != UCONN_MAGIC)
        note_error(t, "on_data on a connection on_open did not keep");
    if (len == 0 && !t->o.framed)
        note_error(t, "on_data with 0 bytes in stream mode");
    if (t->check_stream)
        check_stream(t, u, data, len);
    if (t->hook)
        t->hook(t, c, u, data, len);
    else
        echo_back(t, c, data, len);
    u->rx += len;
    u->frames++;
    atomic_max(&t->max_pending, cp_conn_pending(c));
    cb_leave(u);
}

static void t_on_end(cp_conn *c)
{
    tsrv *t = tsrv_of(c);
    uconn *u = cp_conn_user(c);
    cb_enter(t, u);
    if (!t->o.half_close)
        note_error(t, "on_end without half_close");
    ADD(&t->ends, 1);
    ADD(&t->end_rx, u->rx);
    if (t->end_hook)
        t->end_hook(t, c, u);
    cb_leave(u);
}

static tsrv *tsrv_new(echo_mode echo)
{
    tsrv *t = calloc(1, sizeof(*t));
    CHECK(t != NULL);
    t->echo = echo;
    pthread_mutex_init(&t->lock, NULL);
    return t;
}

static const cp_server_callbacks t_callbacks = {.on_open = t_on_open,
                                                .on_data = t_on_data,
                                                .on_sent = t_on_sent,
                                                .on_close = t_on_close,
                                                .on_end = t_on_end};

/* Create and start the server on `bind` (a string literal), port o->port (0 = any), on the
 * backend under test. */
static void tsrv_start_at(tsrv *t, const cp_server_options *o, const char *bind)
{
    t->o = *o;
    t->o.bind = bind;
    t->o.user = t;
    t->o.conn_user_size = sizeof(uconn);
    t->o.port_options.flags |= CP_PORT_QUIET;
    CHECK_OK(cp_server_create(&t->sv, &t->o, &t_callbacks));
    CHECK_OK(cp_server_start(t->sv));
    t->port = cp_server_listen_port(t->sv);
    CHECK(t->port != 0);
    if (strcmp(cpt_backend(), "auto") != 0)
        CHECK(strcmp(cp_port_backend_name(cp_server_port(t->sv)), cpt_backend()) == 0);
}

/* Create and start the server on 127.0.0.1, any port, on the backend under test. */
static void tsrv_start(tsrv *t, const cp_server_options *o)
{
    cp_server_options any = *o;
    any.port = 0;
    tsrv_start_at(t, &any, "127.0.0.1");
}

static cp_server_stats tsrv_stats(tsrv *t)
{
    cp_server_stats s;
    cp_server_get_stats(t->sv, &s);
    return s;
}

/* Drop the references hold() took. */
static void tsrv_release(tsrv *t)
{
    pthread_mutex_lock(&t->lock);
    for (size_t i = 0; i < t->nheld; i++)
        cp_conn_unref(t->held[i]);
    t->nheld = 0;
    pthread_mutex_unlock(&t->lock);
}

/* The invariants every test shares. */
static void tsrv_check(tsrv *t)
{
    if (t->first_error[0])
        fprintf(stderr, "server-side error: %s\n", t->first_error);
    CHECK_EQ(LOAD(&t->overlap), 0);
    CHECK_EQ(LOAD(&t->late), 0);
    CHECK_EQ(LOAD(&t->twice), 0);
    CHECK_EQ(LOAD(&t->unopened_close), 0);
    CHECK_EQ(LOAD(&t->dirty_open), 0);
    CHECK_EQ(LOAD(&t->order_errors), 0);
    CHECK_EQ(LOAD(&t->error_once), 0);
}

/* Shut down (deadline_ms), check that on_close ran for every connection on_open kept, free.
 * Returns what cp_server_shutdown returned. */
static int tsrv_stop(tsrv *t, unsigned deadline_ms)
{
    int r = cp_server_shutdown(t->sv, deadline_ms);
    CHECK_EQ(LOAD(&t->closes), LOAD(&t->opens));
    CHECK_EQ(LOAD(&t->open_now), 0);
    tsrv_release(t);
    tsrv_check(t);
    cp_server_destroy(t->sv);
    free(t->held);
    pthread_mutex_destroy(&t->lock);
    free(t);
    return r;
}

/* ---- T3 / S6: callbacks of one connection serialised, data in order, sends in order -------- */

typedef struct sclient {
    int fd;
    uint32_t seed;
    uint64_t sent, got;
    uint64_t rng;
} sclient;

/* n connections each stream `total` bytes of their stream pattern in chunks of 1..max_chunk
 * bytes while reading the echo and checking it byte-exact; one poll loop. */
static void stream_echo(uint16_t port, int n, uint64_t total, size_t max_chunk, uint32_t seed0)
{
    sclient *cl = calloc((size_t)n, sizeof(*cl));
    struct pollfd *pf = calloc((size_t)n, sizeof(*pf));
    uint8_t *tx = malloc(max_chunk), *rx = malloc(65536), *want = malloc(65536);
    CHECK(cl && pf && tx && rx && want);
    for (int i = 0; i < n; i++) {
        cl[i].fd = connect_to(port);
        cl[i].seed = seed0 + (uint32_t)i;
        cl[i].rng = cl[i].seed * 7919ull + 1;
    }
    int64_t deadline = cpt_now_ms() + IO_MS;
    for (;;) {
        int busy = 0;
        for (int i = 0; i < n; i++) {
            pf[i].fd = cl[i].got < total ? cl[i].fd : -1;
            pf[i].events = (short)(POLLIN | (cl[i].sent < total ? POLLOUT : 0));
            busy += cl[i].got < total;
        }
        if (!busy)
            break;
        CHECK(cpt_now_ms() < deadline);
        int r = poll(pf, (nfds_t)n, 100);
        CHECK(r >= 0 || errno == EINTR);
        for (int i = 0; i < n && r > 0; i++) {
            sclient *s = &cl[i];
            if ((pf[i].revents & POLLOUT) && s->sent < total) {
                size_t len = 1 + rng_next(&s->rng) % max_chunk;
                if (len > total - s->sent)
                    len = total - s->sent;
                stream_fill(s->seed, s->sent, tx, len);
                ssize_t w = send(s->fd, tx, len, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (w < 0 && errno != EAGAIN)
                    fprintf(stderr, "stream %u: send: %s\n", s->seed, strerror(errno));
                CHECK(w > 0 || errno == EAGAIN);
                if (w > 0)
                    s->sent += (uint64_t)w;
            }
            if (pf[i].revents & (POLLIN | POLLHUP | POLLERR)) {
                ssize_t got = recv(s->fd, rx, 65536, MSG_DONTWAIT);
                if (got <= 0 && !(got < 0 && errno == EAGAIN))
                    fprintf(stderr, "stream %u: %s after %llu of %llu echoed bytes\n", s->seed,
                            got == 0 ? "EOF" : strerror(errno), (unsigned long long)s->got,
                            (unsigned long long)total);
                CHECK(got > 0 || (got < 0 && errno == EAGAIN));
                if (got > 0) {
                    CHECK(s->got + (uint64_t)got <= s->sent);
                    stream_fill(s->seed, s->got, want, (size_t)got);
                    if (memcmp(rx, want, (size_t)got) != 0) {
                        size_t j = 0;
                        while (rx[j] == want[j])
                            j++;
                        fprintf(stderr, "stream %u: echoed byte %llu is 0x%02x, expected 0x%02x\n",
                                s->seed, (unsigned long long)(s->got + j), rx[j], want[j]);
                        CHECK(!"echo byte-exact and in order");
                    }
                    s->got += (uint64_t)got;
                }
            }
        }
    }
    for (int i = 0; i < n; i++)
        close(cl[i].fd);
    free(cl);
    free(pf);
    free(tx);
    free(rx);
    free(want);
}

/* Several workers (2-4) and several receives outstanding per connection (1-8), with and
 * without zero-byte receives: the server-side check sees every connection's bytes in the
 * order sent, the in-callback flag never sees two callbacks of one connection at once
 * (on_data and on_sent of the send_ref replies included), and the echo - each chunk sent back
 * as three sends of three kinds - comes back byte-exact, so sends went out in the order
 * issued. */
TEST(order_and_serialisation)
{
    static const unsigned recvs[] = {1, 2, 4, 8};
    enum { CONNS = 6, MAX_CHUNK = 24000 };
    uint64_t per_conn = (uint64_t)cpt_scaled(1 << 20, 96 << 10);
    int idx = 0;
    for (int zb = 0; zb < 2; zb++) {
        for (size_t i = 0; i < sizeof recvs / sizeof recvs[0]; i++, idx++) {
            cp_server_options o = {.threads = 2 + (unsigned)idx % 3,
                                   .recvs = recvs[i],
                                   .zero_byte = zb,
                                   .recv_buffer = 4096};
            tsrv *t = tsrv_new(ECHO_MIXED);
            t->check_stream = true;
            t->yield = true;
            tsrv_start(t, &o);
            int64_t t0 = cpt_now_ms();
            stream_echo(t->port, CONNS, per_conn, MAX_CHUNK, (uint32_t)idx * 1000 + 1);
            WAIT_FOR(LOAD(&t->closes) == CONNS, IO_MS);
            cp_server_stats st = tsrv_stats(t);
            fprintf(stderr,
                    "threads=%u recvs=%u zero_byte=%d: %d x %llu bytes in %lld ms, %llu "
                    "completions, %llu send_ref replies\n",
                    o.threads, o.recvs, zb, CONNS, (unsigned long long)per_conn,
                    (long long)(cpt_now_ms() - t0), (unsigned long long)st.completions,
                    (unsigned long long)LOAD(&t->ref_sends));
            tsrv_check(t);
            CHECK_EQ(LOAD(&t->checked), CONNS * per_conn);
            CHECK_EQ(st.bytes_in, CONNS * per_conn);
            CHECK_EQ(LOAD(&t->send_errors), 0);
            CHECK_EQ(LOAD(&t->epipe), 0);
            CHECK_EQ(LOAD(&t->ref_sent_bad), 0);
            CHECK_EQ(LOAD(&t->ref_sent_ok), LOAD(&t->ref_sends));
            CHECK_EQ(tsrv_stop(t, 1000), 0);
        }
    }
}

/* ---- S2: the accept pool -------------------------------------------------------------------- */

typedef struct sampler {
    tsrv *t;
    int stop;
    uint64_t max_out, max_target, samples;
    pthread_t th;
} sampler;

static void *sampler_main(void *arg)
{
    sampler *s = arg;
    while (!LOAD(&s->stop)) {
        cp_server_stats st = tsrv_stats(s->t);
        atomic_max(&s->max_out, st.accepts_outstanding);
        atomic_max(&s->max_target, st.accepts_target);
        ADD(&s->samples, 1);
        usleep(200);
    }
    return NULL;
}

/* n connects fired at once; each, once connected, sends one byte, reads its echo and closes.
 * Every connect must succeed (none refused or reset). */
static void connect_burst(uint16_t port, int n)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    CHECK(ep >= 0);
    int *fds = calloc((size_t)n, sizeof(int));
    uint8_t *state = calloc((size_t)n, 1);
    CHECK(fds && state);
    struct sockaddr_in sa = loopback(port);
    int64_t t0 = cpt_now_ms();
    for (int i = 0; i < n; i++) {
        fds[i] = sock_nb();
        int r = connect(fds[i], (struct sockaddr *)&sa, sizeof sa);
        if (r < 0 && errno != EINPROGRESS)
            fprintf(stderr, "connect %d: %s\n", i, strerror(errno));
        CHECK(r == 0 || errno == EINPROGRESS);
        struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
        CHECK_EQ(epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev), 0);
    }
    int64_t t_connected = cpt_now_ms();
    int done = 0;
    int64_t deadline = cpt_now_ms() + 60000;
    struct epoll_event evs[256];
    while (done < n) {
        CHECK(cpt_now_ms() < deadline);
        int k = epoll_wait(ep, evs, 256, 100);
        CHECK(k >= 0 || errno == EINTR);
        for (int e = 0; e < k; e++) {
            int i = (int)evs[e].data.u32;
            if (state[i] == 0) {
                int err = 0;
                socklen_t l = sizeof err;
                CHECK_EQ(getsockopt(fds[i], SOL_SOCKET, SO_ERROR, &err, &l), 0);
                if (err)
                    fprintf(stderr, "connection %d of the burst: %s\n", i, strerror(err));
                CHECK_EQ(err, 0);
                uint8_t b = (uint8_t)i;
                CHECK_EQ(send(fds[i], &b, 1, MSG_NOSIGNAL), 1);
                state[i] = 1;
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
                CHECK_EQ(epoll_ctl(ep, EPOLL_CTL_MOD, fds[i], &ev), 0);
            } else if (state[i] == 1) {
                uint8_t b;
                ssize_t r = recv(fds[i], &b, 1, 0);
                if (r < 0 && errno == EAGAIN)
                    continue;
                if (r != 1)
                    fprintf(stderr, "connection %d of the burst: %s\n", i,
                            r == 0 ? "EOF" : strerror(errno));
                CHECK_EQ(r, 1);
                CHECK_EQ(b, (uint8_t)i);
                close(fds[i]); /* stay far below the descriptor limit */
                state[i] = 2;
                done++;
            }
        }
    }
    fprintf(stderr, "burst of %d: connects issued in %lld ms, all echoed after %lld ms\n", n,
            (long long)(t_connected - t0), (long long)(cpt_now_ms() - t0));
    close(ep);
    free(fds);
    free(state);
}

/* A burst of 5,000 connects is accepted with none refused; the accept pool grows above
 * accepts_min during the burst (never above accepts_max) and shrinks back to accepts_min
 * when quiet; a second burst grows it again. */
TEST(accept_burst_5000)
{
    enum { N = 5000, AMIN = 4, AMAX = 64, TICK = 20 };
    cp_server_options o = {.threads = 2, .accepts_min = AMIN, .accepts_max = AMAX, .tick_ms = TICK};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    cp_server_stats st = tsrv_stats(t);
    CHECK_EQ(st.accepts_outstanding, AMIN);
    CHECK_EQ(st.accepts_target, AMIN);
    for (int round = 0; round < 2; round++) {
        sampler s = {.t = t};
        CHECK_EQ(pthread_create(&s.th, NULL, sampler_main, &s), 0);
        connect_burst(t->port, round == 0 ? N : N / 5);
        STORE(&s.stop, 1);
        pthread_join(s.th, NULL);
        st = tsrv_stats(t);
        fprintf(stderr,
                "round %d: accepts outstanding peaked at %llu, target at %llu (%llu samples); "
                "now %llu / %llu\n",
                round, (unsigned long long)s.max_out, (unsigned long long)s.max_target,
                (unsigned long long)s.samples, (unsigned long long)st.accepts_outstanding,
                (unsigned long long)st.accepts_target);
        CHECK(s.max_out > AMIN);
        CHECK(s.max_target > AMIN);
        CHECK(s.max_out <= AMAX);
        CHECK(s.max_target <= AMAX);
        CHECK_EQ(st.conns_total, round == 0 ? N : N + N / 5);
        CHECK_EQ(st.conns_rejected, 0);
        /* Quiet: back to accepts_min (halving every ~10 ticks: well under 5 s at 20 ms). */
        int64_t t0 = cpt_now_ms();
        WAIT_FOR((st = tsrv_stats(t)).accepts_outstanding == AMIN && st.accepts_target == AMIN,
                 IO_MS);
        fprintf(stderr, "round %d: back to %d outstanding %lld ms after the burst\n", round, AMIN,
                (long long)(cpt_now_ms() - t0));
        /* ...and it stays there (never below). */
        for (int i = 0; i < 10; i++) {
            usleep(TICK * 1000);
            st = tsrv_stats(t);
            CHECK_EQ(st.accepts_outstanding, AMIN);
            CHECK_EQ(st.accepts_target, AMIN);
        }
    }
    WAIT_FOR(LOAD(&t->closes) == N + N / 5, IO_MS);
    CHECK_EQ(LOAD(&t->opens), N + N / 5);
    CHECK_EQ(LOAD(&t->nagle), 0); /* every one, including those set up while the first
                                   * was still finding out whether it is inherited */
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* S2: the accept pool shrinks by cancelling its surplus accepts. Their -ECANCELED
 * completions were counted as connections of the tick: halving the pool from 2n to n
 * cancelled n accepts, and one connection arriving before the next tick made n + 1 "within
 * one tick", which the pool takes for a burst: it doubled back to 2n. With connections that
 * come now and then the pool never shrank for good. (A connection that lands after the next
 * tick would pass without the fix too: the test cannot fail for a slow machine, only miss.) */
TEST(one_connection_after_the_pool_shrinks_does_not_regrow_it)
{
    enum { AMIN = 4, AMAX = 8, TICK = 200 };
    cp_server_options o = {.threads = 2, .accepts_min = AMIN, .accepts_max = AMAX, .tick_ms = TICK};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int rounds = (int)cpt_scaled(3, 2), grown = 0;
    for (int round = 0; round < rounds; round++) {
        connect_burst(t->port, 200);
        cp_server_stats st = tsrv_stats(t);
        if (st.accepts_target != AMAX) {
            fprintf(stderr, "round %d: the burst left the pool at %llu\n", round,
                    (unsigned long long)st.accepts_target);
            continue; /* connections came too slowly to grow it: nothing to check */
        }
        grown++;
        /* Quiet: it halves, cancelling the surplus; then one connection comes. */
        WAIT_FOR((st = tsrv_stats(t)).accepts_target == AMIN && st.accepts_outstanding == AMIN,
                 IO_MS);
        int fd = connect_to(t->port);
        exchange(fd, (uint32_t)round, 100);
        st = tsrv_stats(t);
        fprintf(stderr,
                "round %d: one connection after the shrink: target %llu, outstanding %llu\n", round,
                (unsigned long long)st.accepts_target, (unsigned long long)st.accepts_outstanding);
        CHECK_EQ(st.accepts_target, AMIN);
        close(fd);
    }
    CHECK(grown > 0);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* S2: the accept pool grows for bursts (connections that find every accept taken), not for
 * a rate. With accepts_min 1 every connection took the only accept, and was taken for a
 * burst: a trickle of connections, one at a time, each closed before the next, doubled the
 * pool at the 1st, 2nd, 4th, 8th... connection of a tick, to 32 after 16 of them. The
 * tick is long (no tick during the test), so every connection falls within one. */
TEST(a_trickle_of_connections_does_not_grow_the_accept_pool)
{
    enum { AMIN = 1, AMAX = 64, TICK = 60000 };
    cp_server_options o = {.threads = 2, .accepts_min = AMIN, .accepts_max = AMAX, .tick_ms = TICK};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int n = (int)cpt_scaled(32, 16);
    for (int i = 0; i < n; i++) {
        int fd = connect_to(t->port);
        exchange(fd, (uint32_t)i, 100); /* served: its accept was handled */
        close(fd);
        WAIT_FOR(LOAD(&t->closes) == (uint64_t)i + 1, IO_MS);
    }
    cp_server_stats st = tsrv_stats(t);
    fprintf(stderr, "after %d connections one at a time: target %llu, outstanding %llu\n", n,
            (unsigned long long)st.accepts_target, (unsigned long long)st.accepts_outstanding);
    CHECK_EQ(st.accepts_target, AMIN);
    CHECK_EQ(st.accepts_outstanding, AMIN);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* ...while a burst still grows it: connections made while the only worker is held in a
 * callback all find the one accept taken (they wait in the backlog). */
typedef struct burst_hold {
    int held, release;
} burst_hold;

static void burst_hold_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)c;
    (void)u;
    (void)data;
    (void)len;
    burst_hold *h = t->ctx;
    STORE(&h->held, 1);
    WAIT_FOR(LOAD(&h->release), IO_MS);
}

TEST(a_burst_of_connections_grows_the_accept_pool_from_one)
{
    enum { AMIN = 1, AMAX = 64, TICK = 60000, N = 8 };
    cp_server_options o = {.threads = 1, .accepts_min = AMIN, .accepts_max = AMAX, .tick_ms = TICK};
    burst_hold h = {0};
    tsrv *t = tsrv_new(ECHO_DATA);
    t->hook = burst_hold_hook;
    t->ctx = &h;
    tsrv_start(t, &o);
    int holder = connect_to(t->port);
    CHECK_EQ(send(holder, "x", 1, 0), 1);
    WAIT_FOR(LOAD(&h.held), IO_MS);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = connect_to(t->port); /* the kernel completes them; they wait to be accepted */
    STORE(&h.release, 1);
    WAIT_FOR(LOAD(&t->opens) == N + 1, IO_MS);
    cp_server_stats st = tsrv_stats(t);
    fprintf(stderr, "after a burst of %d: target %llu, outstanding %llu\n", N,
            (unsigned long long)st.accepts_target, (unsigned long long)st.accepts_outstanding);
    CHECK(st.accepts_target > AMIN);
    CHECK(st.accepts_target <= AMAX);
    CHECK_EQ(st.accepts_outstanding, st.accepts_target);
    close(holder);
    for (int i = 0; i < N; i++)
        close(fds[i]);
    WAIT_FOR(LOAD(&t->closes) == N + 1, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* ---- S3: handshake and idle timeouts -------------------------------------------------------- */

/* Well-behaved clients: n connections echoing small messages round after round on their own
 * thread, measuring the worst round trip; any error or stall is recorded. */
typedef struct pinger {
    uint16_t port;
    int n;
    int fds[128];
    int stop;
    uint64_t rounds; /* atomic */
    int failed;
    char error[200];
    /* Per round (up to MAX_ROUNDS): when its first message went out, and its worst trip. */
    int64_t *round_start, *round_rtt;
    pthread_t th;
} pinger;

enum { MAX_ROUNDS = 1 << 17 };

static void *pinger_main(void *arg)
{
    pinger *p = arg;
    enum { MSG = 64 };
    uint8_t tx[MSG], rx[MSG];
    int64_t sent_at[128];
    int got[128];
    struct pollfd pf[128];
    while (!LOAD(&p->stop)) {
        uint32_t r = (uint32_t)p->rounds;
        int64_t worst = 0;
        for (int i = 0; i < p->n; i++) {
            pattern_fill(r * 128 + (uint32_t)i, 0, tx, MSG);
            sent_at[i] = cpt_now_ns();
            got[i] = 0;
            if (send(p->fds[i], tx, MSG, MSG_NOSIGNAL) != MSG) {
                snprintf(p->error, sizeof p->error, "client %d: send: %s", i, strerror(errno));
                STORE(&p->failed, 1);
                return NULL;
            }
        }
        int left = p->n;
        int64_t deadline = cpt_now_ms() + 10000;
        while (left) {
            for (int i = 0; i < p->n; i++)
                pf[i] = (struct pollfd){.fd = got[i] < MSG ? p->fds[i] : -1, .events = POLLIN};
            if (cpt_now_ms() > deadline) {
                snprintf(p->error, sizeof p->error, "round %u stalled for 10 s", r);
                STORE(&p->failed, 1);
                return NULL;
            }
            if (poll(pf, (nfds_t)p->n, 100) < 0 && errno != EINTR) {
                snprintf(p->error, sizeof p->error, "poll: %s", strerror(errno));
                STORE(&p->failed, 1);
                return NULL;
            }
            for (int i = 0; i < p->n; i++) {
                if (!(pf[i].revents & (POLLIN | POLLHUP | POLLERR)))
                    continue;
                ssize_t k = recv(p->fds[i], rx + got[i], (size_t)(MSG - got[i]), MSG_DONTWAIT);
                if (k <= 0) {
                    if (k < 0 && errno == EAGAIN)
                        continue;
                    snprintf(p->error, sizeof p->error, "client %d: %s in round %u", i,
                             k == 0 ? "EOF" : strerror(errno), r);
                    STORE(&p->failed, 1);
                    return NULL;
                }
                got[i] += (int)k;
                if (got[i] == MSG) {
                    pattern_fill(r * 128 + (uint32_t)i, 0, tx, MSG);
                    if (memcmp(tx, rx, MSG) != 0) {
                        snprintf(p->error, sizeof p->error, "client %d: wrong echo", i);
                        STORE(&p->failed, 1);
                        return NULL;
                    }
                    if (cpt_now_ns() - sent_at[i] > worst)
                        worst = cpt_now_ns() - sent_at[i];
                    left--;
                }
            }
        }
        if (r < MAX_ROUNDS) {
            p->round_start[r] = sent_at[0];
            p->round_rtt[r] = worst;
        }
        ADD(&p->rounds, 1);
    }
    return NULL;
}

static void pinger_start(pinger *p, uint16_t port, int n)
{
    CHECK(n <= 128);
    *p = (pinger){.port = port, .n = n};
    p->round_start = calloc(MAX_ROUNDS, sizeof(int64_t));
    p->round_rtt = calloc(MAX_ROUNDS, sizeof(int64_t));
    CHECK(p->round_start && p->round_rtt);
    for (int i = 0; i < n; i++) {
        p->fds[i] = connect_to(port);
        exchange(p->fds[i], 5000 + (uint32_t)i, 100); /* past the handshake */
    }
    CHECK_EQ(pthread_create(&p->th, NULL, pinger_main, p), 0);
}

static void pinger_stop(pinger *p)
{
    STORE(&p->stop, 1);
    pthread_join(p->th, NULL);
    if (p->failed)
        fprintf(stderr, "well-behaved clients: %s\n", p->error);
    CHECK_EQ(p->failed, 0);
}

/* The worst round trip of rounds first..end (raw), and the worst once the scheduling gaps
 * the watcher saw during each round are taken off (adjusted). */
static void pinger_worst(pinger *p, uint64_t first, gapwatch *g, int64_t *raw_ms,
                         int64_t *adjusted_ms)
{
    int64_t raw = 0, adj = 0;
    uint64_t end = LOAD(&p->rounds);
    for (uint64_t r = first; r < end && r < MAX_ROUNDS; r++) {
        int64_t rtt = p->round_rtt[r];
        int64_t a = rtt - gap_overlap(g, p->round_start[r], p->round_start[r] + rtt);
        raw = rtt > raw ? rtt : raw;
        adj = a > adj ? a : adj;
    }
    *raw_ms = raw / 1000000;
    *adjusted_ms = adj / 1000000;
}

static void pinger_close(pinger *p)
{
    for (int i = 0; i < p->n; i++)
        close(p->fds[i]);
    free(p->round_start);
    free(p->round_rtt);
}

/* The sweep reads its tick once and then walks every connection, which takes a while with
 * many of them. A connection accepted during the walk is stamped with a later tick; taken
 * modulo 2^16 that stamp looked 65 535 ticks old and the connection was reaped at once (one
 * CI run saw a silent connection closed 127 ms after its connect with a 1 s handshake
 * timeout). Delay point sweep_walk (ASan build) holds each sweep 130 ms between reading the
 * tick and walking (4 workers: the others accept meanwhile): silent connections made
 * meanwhile must still get their whole second. */
TEST(a_connection_accepted_during_a_sweep_gets_its_whole_timeout)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    enum { N = 8, HS_MS = 1000, TICK = 100 };
    CHECK_OK(setenv("CPORT_INJECT_DELAY", "sweep_walk:130000", 1)); /* before any thread */
    cp_server_options o = {.threads = 4, .handshake_timeout_ms = HS_MS, .tick_ms = TICK};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int fds[N];
    int64_t t_up[N], t_down[N];
    for (int i = 0; i < N; i++) {
        fds[i] = connect_to(t->port);
        t_up[i] = cpt_now_ms();
        t_down[i] = 0;
        usleep(37 * 1000); /* spread over the sweeps' phases */
    }
    int left = N;
    int64_t deadline = cpt_now_ms() + 10000;
    while (left > 0) {
        CHECK(cpt_now_ms() < deadline);
        struct pollfd pf[N];
        for (int i = 0; i < N; i++)
            pf[i] = (struct pollfd){.fd = t_down[i] ? -1 : fds[i], .events = POLLIN};
        CHECK(poll(pf, N, 100) >= 0 || errno == EINTR);
        for (int i = 0; i < N; i++) {
            if (t_down[i] || !(pf[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            t_down[i] = cpt_now_ms();
            left--;
        }
    }
    int64_t earliest = INT64_MAX;
    for (int i = 0; i < N; i++) {
        earliest = t_down[i] - t_up[i] < earliest ? t_down[i] - t_up[i] : earliest;
        close(fds[i]);
    }
    fprintf(stderr,
            "%d silent connections made during slow sweeps: closed after %lld ms at "
            "the earliest\n",
            N, (long long)earliest);
    CHECK(earliest >= HS_MS - TICK - 5);
    CHECK_EQ(tsrv_stats(t).conns_reaped, N);
    WAIT_FOR(LOAD(&t->closes) == N, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
#endif
}

/* 5,000 connections that connect and send nothing are all closed within
 * handshake_timeout + 1 s of connecting (and not before the timeout), counted as reaped,
 * while 100 well-behaved clients keep echoing without an error and without a stall. */
TEST(handshake_timeout_reaps_silent)
{
    enum { SILENT = 5000, GOOD = 100, HS_MS = 1000, TICK = 50, MAX_RTT_MS = 500 };
    cp_server_options o = {.threads = 2, .handshake_timeout_ms = HS_MS, .tick_ms = TICK};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    pinger p;
    pinger_start(&p, t->port, GOOD);
    gapwatch *g = gapwatch_start();
    /* Let the clients settle, then measure from here. */
    WAIT_FOR(LOAD(&p.rounds) >= 20, IO_MS);
    uint64_t rounds0 = LOAD(&p.rounds);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    CHECK(ep >= 0);
    int *fds = calloc(SILENT, sizeof(int));
    int64_t *t_call = calloc(SILENT, sizeof(int64_t)), *t_up = calloc(SILENT, sizeof(int64_t));
    int64_t *t_down = calloc(SILENT, sizeof(int64_t));
    uint8_t *state = calloc(SILENT, 1);
    CHECK(fds && t_call && t_up && t_down && state);
    int64_t t0 = cpt_now_ms();
    for (int i = 0; i < SILENT; i++) {
        t_call[i] = cpt_now_ns();
        fds[i] = connect_start(t->port);
        struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP,
                                 .data.u32 = (uint32_t)i};
        CHECK_EQ(epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev), 0);
    }
    int closed = 0;
    struct epoll_event evs[256];
    while (closed < SILENT) {
        CHECK(cpt_now_ms() < t0 + 60000);
        int k = epoll_wait(ep, evs, 256, 100);
        CHECK(k >= 0 || errno == EINTR);
        for (int e = 0; e < k; e++) {
            int i = (int)evs[e].data.u32;
            uint32_t ev = evs[e].events;
            if (state[i] == 0 && (ev & EPOLLOUT)) {
                int err = 0;
                socklen_t l = sizeof err;
                CHECK_EQ(getsockopt(fds[i], SOL_SOCKET, SO_ERROR, &err, &l), 0);
                if (err)
                    fprintf(stderr, "silent connection %d: %s\n", i, strerror(err));
                CHECK_EQ(err, 0);
                t_up[i] = cpt_now_ns();
                state[i] = 1;
                struct epoll_event mod = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)i};
                CHECK_EQ(epoll_ctl(ep, EPOLL_CTL_MOD, fds[i], &mod), 0);
            }
            if (state[i] == 1 && (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
                uint8_t b;
                ssize_t r = recv(fds[i], &b, 1, MSG_DONTWAIT);
                if (r < 0 && errno == EAGAIN)
                    continue;
                CHECK(r == 0 || (r < 0 && errno == ECONNRESET)); /* nothing was sent to it */
                t_down[i] = cpt_now_ns();
                close(fds[i]);
                state[i] = 2;
                closed++;
            }
        }
    }
    int64_t elapsed = cpt_now_ms() - t0;
    pinger_stop(&p);
    gapwatch_stop(g);
    /* Closed within HS + 1 s of being connected (scheduling gaps of this process taken off),
     * and not before the timeout (a tick of slack: timeouts are counted in ticks). */
    int64_t earliest = INT64_MAX, worst = 0, worst_raw = 0;
    int late = 0;
    /* The issue's bound is 1 s; sanitizer builds (CPORT_TEST_SCALE < 1) run the closing
     * code several times slower, so their slack grows in proportion, as does the bound on
     * the echoes' round trip, which waits for the same slow code (an ASan run on a loaded
     * 2-core machine saw 589 ms: the gap watcher, which only sleeps, is woken promptly
     * while busy threads wait for a CPU, so it takes off little of such waits). */
    const double slower = cpt_scale() < 1 ? 1 / cpt_scale() : 1;
    const int64_t slack_ms = (int64_t)(1000 * slower);
    const int64_t max_rtt_ms = (int64_t)(MAX_RTT_MS * slower);
    for (int i = 0; i < SILENT; i++) {
        int64_t raw = t_down[i] - t_up[i];
        int64_t adj = raw - gap_overlap(g, t_up[i], t_down[i]);
        worst_raw = raw > worst_raw ? raw : worst_raw;
        worst = adj > worst ? adj : worst;
        earliest = t_down[i] - t_call[i] < earliest ? t_down[i] - t_call[i] : earliest;
        if (adj > (int64_t)(HS_MS + slack_ms) * 1000000 && late++ < 5)
            fprintf(stderr, "silent connection %d closed %lld ms after connecting\n", i,
                    (long long)(adj / 1000000));
    }
    int64_t rtt_raw, rtt;
    pinger_worst(&p, rounds0, g, &rtt_raw, &rtt);
    fprintf(stderr,
            "%d silent connections closed %lld..%lld ms after connecting (%lld raw), all within "
            "%lld ms; %d clients echoed %llu rounds meanwhile, worst round trip %lld ms (%lld "
            "raw); this process went unscheduled for %lld ms in all\n",
            SILENT, (long long)(earliest / 1000000), (long long)(worst / 1000000),
            (long long)(worst_raw / 1000000), (long long)elapsed, GOOD,
            (unsigned long long)(LOAD(&p.rounds) - rounds0), (long long)rtt, (long long)rtt_raw,
            (long long)gap_total_ms(g));
    cp_server_stats st = tsrv_stats(t);
    /* (Printed before the checks: an early close once seen in CI, 127 ms after connecting,
     * is either a refusal at accept or a timeout; these tell which.) */
    fprintf(stderr, "reaped %llu, rejected %llu, handshake-timeout closes so far %u\n",
            (unsigned long long)st.conns_reaped, (unsigned long long)st.conns_rejected,
            (unsigned)LOAD(&t->reasons[CP_CLOSE_HANDSHAKE_TIMEOUT]));
    CHECK_EQ(late, 0);
    CHECK(earliest >= (int64_t)(HS_MS - TICK - 5) * 1000000);
    CHECK(LOAD(&p.rounds) - rounds0 >= 10);
    CHECK(rtt < max_rtt_ms);
    CHECK_EQ(st.conns_reaped, SILENT);
    /* on_close comes once the lingering close ends (the client's close, seen above). */
    WAIT_FOR(LOAD(&t->reasons[CP_CLOSE_HANDSHAKE_TIMEOUT]) == SILENT, IO_MS);
    WAIT_FOR(tsrv_stats(t).conns_open == GOOD, IO_MS);
    /* The well-behaved ones are still served. */
    for (int i = 0; i < GOOD; i++)
        exchange(p.fds[i], 9000 + (uint32_t)i, 1000);
    pinger_close(&p);
    WAIT_FOR(LOAD(&t->closes) == SILENT + GOOD, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_PEER]), GOOD);
    close(ep);
    free(fds);
    free(t_call);
    free(t_up);
    free(t_down);
    free(state);
    free(g);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* idle_timeout: a connection that keeps talking stays open; one that goes quiet after a
 * message, and one that never says anything, are closed between the timeout and 1 s after
 * it, as idle-timeout, counted as reaped. */
/* One run of idle_timeout; false if the test thread itself stalled so long between two of
 * the talker's messages that the talker was idle, and reaped as it should be: that run
 * proves nothing. */
static bool idle_timeout_run(void)
{
    /* The talker's gaps (IDLE/10) leave 900 ms for a stalled test thread (sanitizers, a
     * loaded machine) before it would look idle. */
    enum { IDLE_MS = 1000, TICK = 20 };
    cp_server_options o = {.threads = 2, .idle_timeout_ms = IDLE_MS, .tick_ms = TICK};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int talker = connect_to(t->port);
    int64_t c_call = cpt_now_ms();
    int mute = connect_to(t->port);
    int quiet = connect_to(t->port);
    int64_t q_sent = cpt_now_ms();
    exchange(quiet, 1, 1000);
    int64_t q_echoed = cpt_now_ms();
    /* The talker sends every IDLE/10 for 3 x IDLE; the others are reaped meanwhile. */
    int64_t mute_closed = -1, quiet_closed = -1;
    uint32_t seq = 0;
    int64_t last_sent = cpt_now_ms();
    for (int64_t end = cpt_now_ms() + 3 * IDLE_MS; cpt_now_ms() < end;) {
        int64_t silent = cpt_now_ms() - last_sent;
        last_sent = cpt_now_ms();
        int r = try_exchange(talker, 100 + seq++, 10, cpt_now_ms() + IO_MS);
        if (r < 0 && silent >= IDLE_MS - TICK - 5) {
            fprintf(stderr, "the talker said nothing for %lld ms (a stalled test thread): %s\n",
                    (long long)silent, strerror(r == -EPIPE ? EPIPE : -r));
            close(talker);
            close(mute);
            close(quiet);
            WAIT_FOR(LOAD(&t->closes) == LOAD(&t->opens), IO_MS);
            CHECK_EQ(tsrv_stop(t, 1000), 0);
            return false;
        }
        if (r < 0)
            fprintf(stderr, "talker's echo after %lld ms of silence: %s\n", (long long)silent,
                    r == -EPIPE ? "EOF" : strerror(-r));
        CHECK_EQ(r, 0);
        int64_t next = cpt_now_ms() + IDLE_MS / 10;
        while (cpt_now_ms() < next) {
            struct pollfd pf[2] = {{.fd = mute_closed < 0 ? mute : -1, .events = POLLIN},
                                   {.fd = quiet_closed < 0 ? quiet : -1, .events = POLLIN}};
            int64_t left = next - cpt_now_ms();
            if (poll(pf, 2, (int)(left > 0 ? left : 0)) > 0) {
                uint8_t b;
                if (pf[0].revents) {
                    CHECK(recv(mute, &b, 1, MSG_DONTWAIT) <= 0);
                    mute_closed = cpt_now_ms();
                }
                if (pf[1].revents) {
                    CHECK(recv(quiet, &b, 1, MSG_DONTWAIT) <= 0);
                    quiet_closed = cpt_now_ms();
                }
            }
        }
    }
    fprintf(stderr, "never-sent closed after %lld ms, quiet-after-one closed %lld ms after it\n",
            (long long)(mute_closed - c_call), (long long)(quiet_closed - q_echoed));
    CHECK(mute_closed >= 0 && quiet_closed >= 0);
    CHECK(mute_closed - c_call >= IDLE_MS - TICK - 5);
    CHECK(mute_closed - c_call <= IDLE_MS + 1000);
    CHECK(quiet_closed - q_sent >= IDLE_MS - TICK - 5);
    CHECK(quiet_closed - q_echoed <= IDLE_MS + 1000);
    CHECK_EQ(tsrv_stats(t).conns_reaped, 2);
    /* on_close follows the close the clients saw, through the port. */
    WAIT_FOR(LOAD(&t->reasons[CP_CLOSE_IDLE_TIMEOUT]) == 2, IO_MS);
    /* The talker kept its connection all along, and it is served. */
    exchange(talker, 999, 100000);
    CHECK_EQ(LOAD(&t->closes), 2);
    /* Once it stops talking it goes the same way. */
    int64_t t_last = cpt_now_ms();
    expect_closed(talker, IDLE_MS + 1000 + 500);
    CHECK(cpt_now_ms() - t_last >= IDLE_MS - TICK - 5);
    CHECK_EQ(tsrv_stats(t).conns_reaped, 3);
    close(talker);
    close(mute);
    close(quiet);
    WAIT_FOR(LOAD(&t->closes) == 3, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
    return true;
}

TEST(idle_timeout)
{
    for (int run = 0; !idle_timeout_run(); run++)
        CHECK(run < 5);
}

/* Timeouts cost no event and no syscall per connection per tick: with 5,000 idle
 * connections under both timeouts and a 5 ms tick (1,000,000 connection checks a second),
 * the connections' handlers see no completion at all (a timed operation per connection
 * would bring 5,000 a tick), and the whole process uses less than one CPU (a syscall per
 * connection per tick alone would take about that; the sweep takes about 1% here). The
 * completions are counted, not timed; the CPU bound is loose enough for a sanitizer build
 * on a loaded machine. */
TEST(idle_connections_cost_no_cpu)
{
    enum { N = 5000, TICK = 5 };
    cp_server_options o = {
        .threads = 2, .handshake_timeout_ms = 600000, .idle_timeout_ms = 600000, .tick_ms = TICK};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int *fds = calloc(N, sizeof(int));
    CHECK(fds != NULL);
    for (int i = 0; i < N; i++) {
        fds[i] = connect_to(t->port);
        uint8_t b = (uint8_t)i, back = 0;
        send_all(fds[i], &b, 1);
        recv_all(fds[i], &back, 1);
        CHECK_EQ(back, b);
    }
    WAIT_FOR(tsrv_stats(t).conns_open == N, IO_MS);
    uint64_t done0 = tsrv_stats(t).completions;
    int64_t c0 = cpt_cpu_ms(), w0 = cpt_now_ms();
    usleep(1000000); /* a measurement window, not a wait for something */
    int64_t cpu = cpt_cpu_ms() - c0, wall = cpt_now_ms() - w0;
    uint64_t done = tsrv_stats(t).completions - done0;
    fprintf(stderr,
            "%d idle connections, %d ms tick: %lld ms CPU and %llu completions in %lld ms\n", N,
            TICK, (long long)cpu, (unsigned long long)done, (long long)wall);
    CHECK(done <= 100); /* none expected; far from 5,000 a tick */
    CHECK(cpu < wall);
    CHECK_EQ(tsrv_stats(t).conns_reaped, 0);
    for (int i = 0; i < N; i++)
        close(fds[i]);
    free(fds);
    WAIT_FOR(LOAD(&t->closes) == N, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* ---- S4: lookaside lists -------------------------------------------------------------------- */

enum { PP_CONNS = 8, PP_MAX = 65536 };
static uint8_t pp_tx[PP_CONNS][PP_MAX + 4], pp_rx[PP_MAX + 4];

/* Fill each connection's message (a frame when framed) for this phase: payload sizes from
 * `sizes`, one message per connection per round. */
static size_t pp_message(int conn, uint32_t round, const size_t *sizes, size_t nsizes, bool framed)
{
    size_t len = sizes[(round + (uint32_t)conn) % nsizes];
    uint8_t *m = pp_tx[conn];
    if (framed) {
        cp_frame_header(m, (uint32_t)len);
        m += 4;
    }
    pattern_fill(round * 64 + (uint32_t)conn, 0, m, len);
    return len + (framed ? 4 : 0);
}

/* Ping-pong rounds on every connection: each sends its message, then reads its echo. No
 * allocation, no output (except to fail). */
static void pingpong(const int *fds, uint32_t first, uint32_t rounds, const size_t *sizes,
                     size_t nsizes, bool framed)
{
    size_t len[PP_CONNS];
    for (uint32_t r = first; r < first + rounds; r++) {
        int64_t deadline = cpt_now_ms() + IO_MS;
        for (int i = 0; i < PP_CONNS; i++) {
            len[i] = pp_message(i, r, sizes, nsizes, framed);
            CHECK_EQ(try_send_all(fds[i], pp_tx[i], len[i], deadline), 0);
        }
        for (int i = 0; i < PP_CONNS; i++) {
            CHECK_EQ(try_recv_all(fds[i], pp_rx, len[i], deadline), 0);
            CHECK(memcmp(pp_rx, pp_tx[i], len[i]) == 0);
        }
    }
}

/* As pingpong, with `depth` copies of each message in flight per connection: more of the
 * server's buffers in use at once than pingpong ever has. */
static void pingpong_deep(const int *fds, uint32_t first, uint32_t rounds, const size_t *sizes,
                          size_t nsizes, bool framed, int depth)
{
    size_t len[PP_CONNS];
    for (uint32_t r = first; r < first + rounds; r++) {
        int64_t deadline = cpt_now_ms() + IO_MS;
        for (int i = 0; i < PP_CONNS; i++) {
            len[i] = pp_message(i, r, sizes, nsizes, framed);
            for (int d = 0; d < depth; d++)
                CHECK_EQ(try_send_all(fds[i], pp_tx[i], len[i], deadline), 0);
        }
        for (int i = 0; i < PP_CONNS; i++)
            for (int d = 0; d < depth; d++) {
                CHECK_EQ(try_recv_all(fds[i], pp_rx, len[i], deadline), 0);
                CHECK(memcmp(pp_rx, pp_tx[i], len[i]) == 0);
            }
    }
}

typedef struct heap_snap {
    uint64_t allocations, mallocs, heap;
} heap_snap;

/* Work items the server's pool has posted, ever (its tick is one). */
static uint64_t items_posted(tsrv *t)
{
    cp_port_stats ps;
    cp_port_get_stats(cp_server_port(t->sv), &ps);
    return ps.posted;
}

static heap_snap heap_snapshot(tsrv *t)
{
    heap_snap h;
    h.allocations = tsrv_stats(t).allocations;
    h.mallocs = malloc_count();
    h.heap = heap_in_use();
    return h;
}

/* After a warm-up, steady-state echo takes nothing from malloc: no call to it at all (from
 * any thread of this process), the heap in use stays exactly the same, and the server's own
 * allocation counter stays flat. */
static void steady_phase(const cp_server_options *base, echo_mode echo, const size_t *sizes,
                         size_t nsizes)
{
    tsrv *t = tsrv_new(echo);
    cp_server_options o = *base;
    tsrv_start(t, &o);
    int fds[PP_CONNS];
    for (int i = 0; i < PP_CONNS; i++)
        fds[i] = connect_to(t->port);
    /* Warm-up: enough rounds to reach every size class, and until the tick timer has fired
     * (the pool allocates its work-item block at the first work item). Not a fixed time:
     * on a loaded machine the first tick came after 350 ms and a second of ping-pong, and
     * its block was counted in the measured phase (1 malloc of 6152 bytes: ASan, epoll). */
    uint32_t warm = 0, steady = (uint32_t)cpt_scaled(2000, 300);
    int64_t warm_until = cpt_now_ms() + 350;
    while (warm < (uint32_t)cpt_scaled(400, 100) || cpt_now_ms() < warm_until ||
           items_posted(t) == 0) {
        CHECK(cpt_now_ms() < warm_until + IO_MS); /* the tick fires */
        pingpong(fds, warm, 50, sizes, nsizes, o.framed);
        warm += 50;
    }
    /* The lookaside lists grow to the most buffers ever in use at once (never shrinking).
     * In ping-pong that peak depends on timing: a reply's completion handled after the
     * connection's next message arrived holds a second buffer, and the workers' caches
     * hold up to a few each. A peak first reached in the measured phase was counted as an
     * allocation (1 run in 20 on a loaded machine). So the warm-up ends with messages
     * three deep, beyond any peak of ping-pong. */
    pingpong_deep(fds, warm, (uint32_t)cpt_scaled(100, 30), sizes, nsizes, o.framed, 3);
    warm += (uint32_t)cpt_scaled(100, 30);
    heap_snap a = heap_snapshot(t);
    int64_t t0 = cpt_now_ms();
    pingpong(fds, warm, steady, sizes, nsizes, o.framed);
    int64_t ms = cpt_now_ms() - t0;
    heap_snap b = heap_snapshot(t);
    fprintf(stderr,
            "framed=%d zero_byte=%d recvs=%u echo=%d: %u rounds x %d connections in %lld ms: "
            "%llu malloc calls, heap in use %+lld bytes, server allocations %llu -> %llu\n",
            o.framed, o.zero_byte, o.recvs, (int)echo, steady, PP_CONNS, (long long)ms,
            (unsigned long long)(b.mallocs - a.mallocs), (long long)(b.heap - a.heap),
            (unsigned long long)a.allocations, (unsigned long long)b.allocations);
    CHECK_EQ(b.mallocs - a.mallocs, 0);
    CHECK_EQ(b.heap, a.heap);
    CHECK_EQ(b.allocations, a.allocations);
    for (int i = 0; i < PP_CONNS; i++)
        close(fds[i]);
    WAIT_FOR(LOAD(&t->closes) == PP_CONNS, IO_MS);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* Stream mode (zero-copy replies and copies, buffers per connection or pooled), and framed
 * mode with frames that arrive whole. */
TEST(steady_state_allocates_nothing)
{
    static const size_t stream_sizes[] = {1, 100, 1000, 4000, 4097, 9000, 16000, 16384, 30000};
    static const size_t frame_sizes[] = {0, 1, 100, 1000, 2000, 3000};
    cp_server_options a = {.threads = 2, .recvs = 1};
    steady_phase(&a, ECHO_DATA, stream_sizes, sizeof stream_sizes / sizeof stream_sizes[0]);
    cp_server_options b = {.threads = 3, .recvs = 4, .zero_byte = true};
    steady_phase(&b, ECHO_COPY, stream_sizes, sizeof stream_sizes / sizeof stream_sizes[0]);
    cp_server_options c = {.threads = 2, .recvs = 2, .zero_byte = true};
    steady_phase(&c, ECHO_DATA, stream_sizes, sizeof stream_sizes / sizeof stream_sizes[0]);
    cp_server_options d = {.threads = 2, .recvs = 2, .framed = true};
    steady_phase(&d, ECHO_FRAME, frame_sizes, sizeof frame_sizes / sizeof frame_sizes[0]);
}

/* Framed mode with frames bigger than one receive (so every frame is assembled from several
 * receives) but within the server's size classes: steady state must allocate nothing
 * either. */
TEST(framed_large_frames_allocate_nothing)
{
    static const size_t frame_sizes[] = {20000, 30000, 40000, 50000, 60000};
    cp_server_options o = {.threads = 2, .recvs = 1, .framed = true, .recv_buffer = 16384};
    steady_phase(&o, ECHO_FRAME, frame_sizes, sizeof frame_sizes / sizeof frame_sizes[0]);
}

/* ---- S5: limits and backpressure ------------------------------------------------------------ */

/* max_conns: connections beyond it are closed at once (no callback runs for them) and
 * counted, while the ones open keep full service, before, during and after. When one leaves,
 * a new one fits. */
/* on_data closes the connection, then tries to reply both ways: the replies are refused
 * with -EPIPE, and what they took (the received buffer's hold, the copy's buffer, the send
 * contexts) goes back. */
static void close_then_send_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)u;
    cp_conn_close(c);
    note_send(t, cp_conn_send_data(c, data, len));
    note_send(t, cp_conn_send(c, data, len));
}

/* on_data shuts the server down and destroys it, plain and between block_begin and
 * block_end: both refuse with -EDEADLK (they would wait for this callback and join its
 * worker), doing nothing; then it echoes. */
static void shutdown_from_callback_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data,
                                        size_t len)
{
    (void)u;
    int r1 = cp_server_shutdown(t->sv, 0), r2 = cp_server_destroy(t->sv);
    cp_port_block_begin(cp_server_port(t->sv));
    int r3 = cp_server_shutdown(t->sv, 0), r4 = cp_server_destroy(t->sv);
    cp_port_block_end(cp_server_port(t->sv));
    if (r1 != -EDEADLK || r2 != -EDEADLK || r3 != -EDEADLK || r4 != -EDEADLK)
        note_error(t, "shutdown/destroy from on_data: %d %d %d %d", r1, r2, r3, r4);
    note_send(t, cp_conn_send(c, data, len));
}

TEST(shutdown_from_a_callback_is_refused)
{
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hook = shutdown_from_callback_hook;
    cp_server_options o = {.threads = 2};
    tsrv_start(t, &o);
    uint8_t msg[100], back[100];
    pattern_fill(3, 0, msg, sizeof msg);
    for (int i = 0; i < 3; i++) {
        int fd = connect_to(t->port);
        send_all(fd, msg, sizeof msg);
        recv_all(fd, back, sizeof back);
        CHECK(memcmp(back, msg, sizeof msg) == 0);
        close(fd);
    }
    WAIT_FOR(LOAD(&t->closes) == 3, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0); /* (checks that no callback noted an error) */
}

/* Replies refused because the connection is closing must not keep anything: a lost hold
 * would keep a 16 KiB receive buffer forever, so connection after connection the server's
 * lookaside would grow. After a warm-up, hundreds more such connections allocate no new
 * chunk. */
TEST(refused_replies_free_their_buffers)
{
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hook = close_then_send_hook;
    cp_server_options o = {.threads = 1};
    tsrv_start(t, &o);
    uint8_t msg[1000];
    pattern_fill(7, 0, msg, sizeof msg);
    uint64_t before = 0;
    int warm = 100, total = warm + (int)cpt_scaled(600, 200);
    for (int i = 0; i < total; i++) {
        if (i == warm)
            before = tsrv_stats(t).allocations;
        int fd = connect_to(t->port);
        send_all(fd, msg, sizeof msg);
        CHECK(wait_peer_close(fd, cpt_now_ms() + IO_MS, NULL) >= 0);
        close(fd);
    }
    WAIT_FOR(LOAD(&t->closes) == (uint64_t)total, IO_MS);
    uint64_t after = tsrv_stats(t).allocations;
    fprintf(stderr, "%d connections, %llu replies refused, allocations %llu -> %llu\n", total,
            (unsigned long long)LOAD(&t->epipe), (unsigned long long)before,
            (unsigned long long)after);
    CHECK_EQ(LOAD(&t->epipe), 2 * (uint64_t)total);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    CHECK_EQ(after, before);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* The descriptor guard. on_data asks for the peer and sets and reads a socket option,
 * closes the connection (nothing is queued and nothing is in flight, so its socket closes
 * right there), then opens and connects a socket of its own, which takes the lowest free
 * descriptor number at or above the one just freed: that one, unless another thread took it
 * meanwhile. The connection's descriptor calls must now
 * fail with -EBADF instead of reaching that socket (the graceful close's own FIN, sent from
 * any thread, goes through the same guard). */
typedef struct stale_fd_ctx {
    uint64_t reused;  /* the new socket got the connection's old number */
    uint64_t guarded; /* every call on the closed connection said -EBADF */
} stale_fd_ctx;

static void stale_fd_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)u, (void)data, (void)len;
    stale_fd_ctx *x = t->ctx;
    struct sockaddr_storage peer;
    socklen_t peer_len;
    int one = 1, v = 0;
    socklen_t vlen = sizeof v;
    if (cp_conn_peer(c, &peer, &peer_len) != 0 || peer.ss_family != AF_INET ||
        cp_conn_setsockopt(c, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) != 0 ||
        cp_conn_getsockopt(c, SOL_SOCKET, SO_KEEPALIVE, &v, &vlen) != 0 || !v)
        note_error(t, "descriptor calls on an open connection failed");
    /* The server's own address, from the connection (t->port is written by the main thread
     * in a way ThreadSanitizer cannot see ordered before this). */
    int old = cp_conn_fd(c);
    struct sockaddr_in self;
    socklen_t self_len = sizeof self;
    if (getsockname(old, (struct sockaddr *)&self, &self_len) < 0)
        note_error(t, "getsockname: %s", strerror(errno));
    cp_conn_close(c);
    /* The lowest free number at or above the old one: the client may already have seen the
     * FIN and freed a lower number, which a plain socket() would take instead. */
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && fd < old) {
        int above = fcntl(fd, F_DUPFD_CLOEXEC, old);
        close(fd);
        fd = above;
    }
    if (fd < 0 || connect(fd, (struct sockaddr *)&self, sizeof self) < 0) {
        note_error(t, "own socket: %s", strerror(errno));
        if (fd >= 0)
            close(fd);
        return;
    }
    if (fd == old)
        ADD(&x->reused, 1);
    vlen = sizeof v;
    if (cp_conn_peer(c, &peer, &peer_len) == -EBADF &&
        cp_conn_setsockopt(c, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) == -EBADF &&
        cp_conn_getsockopt(c, SOL_SOCKET, SO_KEEPALIVE, &v, &vlen) == -EBADF)
        ADD(&x->guarded, 1);
    close(fd);
}

TEST(descriptor_calls_after_close)
{
    enum { N = 20 };
    tsrv *t = tsrv_new(ECHO_NONE);
    stale_fd_ctx x = {0};
    t->ctx = &x;
    t->hook = stale_fd_hook;
    cp_server_options o = {.threads = 1};
    tsrv_start(t, &o);
    for (int i = 0; i < N; i++) {
        int fd = connect_to(t->port);
        uint8_t b = (uint8_t)i;
        send_all(fd, &b, 1);
        CHECK(wait_peer_close(fd, cpt_now_ms() + IO_MS, NULL) >= 0);
        close(fd);
    }
    /* Each client's connection and each socket the hook opened. */
    WAIT_FOR(LOAD(&t->closes) == 2 * N, IO_MS);
    fprintf(stderr,
            "%d connections closed in on_data: descriptor number reused %llu times, "
            "calls refused %llu times\n",
            N, (unsigned long long)LOAD(&x.reused), (unsigned long long)LOAD(&x.guarded));
    CHECK(LOAD(&x.reused) >= 1); /* else this test could not tell */
    CHECK_EQ(LOAD(&x.guarded), N);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* cp_conn_send_file from a thread that holds only a cp_conn_ref, while the peer ends the
 * connection. The send takes its operation reference only if the connection is not closing
 * yet; the close then waits for it, and on_close runs once. (It used to check first and add
 * the reference later, unlocked: if the close completed in between, the late reference
 * brought on_close back a second time and conns_open below zero.) In a build with
 * CPORT_INJECT (the ASan build) the sender sleeps 300 ms right after taking its reference,
 * while the peer's end is handled; elsewhere the test runs without the pause. */
typedef struct file_sender {
    cp_conn *c;
    int fd;
    int calling; /* atomic: about to call */
    int result;
} file_sender;

static void *send_file_thread(void *arg)
{
    file_sender *f = arg;
    STORE(&f->calling, 1);
    uint64_t *block = malloc(sizeof(uint64_t)); /* t_on_sent's context: the expected result */
    CHECK(block != NULL);
    block[0] = 4096;
    f->result = cp_conn_send_file(f->c, NULL, 0, f->fd, 0, 4096, block);
    if (f->result < 0)
        free(block); /* no on_sent for a send that was refused */
    return NULL;
}

/* The race both send-file tests run: a server holding its connection (the sender's
 * cp_conn_ref), a thread running `sender` (cp_conn_send_file of a 4 KiB file on it), and
 * the peer's end while the sender is inside the call (with CPORT_INJECT, 50 ms into the
 * sender's 300 ms pause at send_file_ref, set by the caller; only the window's use hangs
 * on the sleep). Returns once the sender has returned and on_close has run; f has the
 * result, and f->fd the file, which the caller closes after stopping the server. */
static tsrv *send_file_race(file_sender *f, void *(*sender)(void *))
{
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hold_refs = true;
    cp_server_options o = {.threads = 2};
    tsrv_start(t, &o);
    int file = cpt_memfd("file");
    uint8_t page[4096] = {0};
    CHECK_EQ(write(file, page, sizeof page), (ssize_t)sizeof page);
    int fd = connect_to(t->port);
    WAIT_FOR(held_count(t) == 1, IO_MS); /* on_open holds after counting opens */
    pthread_mutex_lock(&t->lock);
    *f = (file_sender){.c = t->held[0], .fd = file};
    pthread_mutex_unlock(&t->lock);
    pthread_t th;
    CHECK_OK(pthread_create(&th, NULL, sender, f));
    WAIT_FOR(LOAD(&f->calling) == 1, IO_MS);
#ifdef CPORT_INJECT
    usleep(50000);
#endif
    close(fd); /* the peer ends while the sender is inside the call */
    CHECK_OK(pthread_join(th, NULL));
    WAIT_FOR(LOAD(&t->closes) >= 1, IO_MS);
    return t;
}

TEST(send_file_races_the_peers_end)
{
#ifdef CPORT_INJECT
    CHECK_OK(setenv("CPORT_INJECT_DELAY", "send_file_ref:300000", 1)); /* before any thread */
#endif
    file_sender f;
    tsrv *t = send_file_race(&f, send_file_thread);
    /* Refused (the close came first) or sent and reported: either way exactly once. */
    fprintf(stderr, "cp_conn_send_file: %d; on_sent ok %llu, bad %llu\n", f.result,
            (unsigned long long)LOAD(&t->ref_sent_ok), (unsigned long long)LOAD(&t->ref_sent_bad));
    if (f.result < 0)
        CHECK_EQ(f.result, -EPIPE);
    else
        WAIT_FOR(LOAD(&t->ref_sent_ok) + LOAD(&t->ref_sent_bad) == 1, IO_MS);
    CHECK_EQ(tsrv_stats(t).conns_open, 0);
    CHECK_EQ(LOAD(&t->twice), 0);
    CHECK_EQ(LOAD(&t->closes), 1);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
    close(f.fd);
}

/* cp_conn_send_file without a head, behind other replies, whose file ends before the first
 * byte of its range (the range starts past the end; or the file was truncated while the
 * transmit waited behind a reply the peer had not read yet): on_sent gets -EIO and the
 * connection is aborted, and a reply sent after it must not reach the peer, which would
 * take those bytes for the file's. (It did: a transmit that failed before its first byte
 * left the socket's sending side open, and the next reply followed the earlier ones.) */
enum { HOLE_BIG = 2 << 20 };
static int hole_file, hole_behind, hole_next = 1; /* hole_next: atomic, the last send's result */
static uint8_t *hole_big;

static void send_file_hole_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)u;
    (void)data;
    (void)len;
    note_send(t, hole_behind ? cp_conn_send(c, hole_big, HOLE_BIG) : cp_conn_send(c, "HEAD", 4));
    uint64_t *block = malloc(sizeof(uint64_t)); /* t_on_sent's context: the expected result */
    CHECK(block != NULL);
    block[0] = (uint64_t)(int64_t)-EIO;
    int r = cp_conn_send_file(c, NULL, 0, hole_file, hole_behind ? 0 : 1000, 4096, block);
    if (r < 0) {
        free(block);
        note_send(t, r);
    }
    STORE(&hole_next, cp_conn_send(c, "NEXT", 4));
}

TEST(send_file_failing_before_its_first_byte_lets_nothing_after_it_out)
{
    hole_big = malloc(HOLE_BIG);
    CHECK(hole_big != NULL);
    pattern_fill(7, 0, hole_big, HOLE_BIG);
    for (hole_behind = 0; hole_behind < 2; hole_behind++) {
        /* (set before the server's threads start: they read it) */
        hole_file = cpt_memfd("file");
        uint8_t page[4096];
        pattern_fill(8, 0, page, sizeof page);
        CHECK_EQ(write(hole_file, page, hole_behind ? 4096 : 100), hole_behind ? 4096 : 100);
        tsrv *t = tsrv_new(ECHO_NONE);
        t->hook = send_file_hole_hook;
        if (hole_behind)
            t->sndbuf = 4096; /* the big reply stays queued until the peer reads */
        cp_server_options o = {.threads = 2, .max_pending_send = 8 << 20};
        tsrv_start(t, &o);
        int fd = connect_to(t->port);
        int rcvbuf = 65536; /* (not below loopback's MSS: the window would crawl) */
        CHECK_EQ(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf), 0);
        STORE(&hole_next, 1);
        send_all(fd, "x", 1);
        WAIT_FOR(LOAD(&hole_next) != 1, IO_MS);
        if (hole_behind) /* the transmit has not started: the reply before it is not out */
            CHECK_OK(ftruncate(hole_file, 0));
        size_t want = hole_behind ? HOLE_BIG : 4, got = 0;
        uint8_t *back = malloc(want + 8);
        CHECK(back != NULL);
        int64_t deadline = cpt_now_ms() + IO_MS;
        int end = -1; /* how the stream ended: 0 (a FIN) or the recv errno */
        while (got < want + 8) {
            ssize_t n = recv(fd, back + got, want + 8 - got, MSG_DONTWAIT);
            if (n > 0) {
                got += (size_t)n;
                continue;
            }
            if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                end = n == 0 ? 0 : errno;
                break;
            }
            if (!wait_fd(fd, POLLIN, deadline)) {
                fprintf(stderr, "stalled at %zu bytes\n", got);
                CHECK(0);
            }
        }
        fprintf(stderr, "%s: the next send %d; the peer got %zu bytes (%zu expected), end %d\n",
                hole_behind ? "truncated behind a reply" : "range past the end", LOAD(&hole_next),
                got, want, end);
        CHECK(LOAD(&hole_next) == 0 || LOAD(&hole_next) == -EPIPE);
        /* Not "NEXT" after them, and a reset, not a FIN that would pass the cut stream for a
         * whole one (the reset discards what the server's kernel still held of the reply
         * before: the peer may get less of it). */
        CHECK_EQ(end, ECONNRESET);
        CHECK(got <= want);
        CHECK(memcmp(back, hole_behind ? hole_big : (const uint8_t *)"HEAD", got) == 0);
        if (!hole_behind)
            CHECK_EQ(got, want); /* the head had gone out before the transmit started */
        WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
        CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_ERROR]), 1);
        CHECK_EQ(LOAD(&t->ref_sent_ok), 1); /* on_sent: -EIO */
        CHECK_EQ(LOAD(&t->ref_sent_bad), 0);
        CHECK_EQ(LOAD(&t->send_errors), 0);
        free(back);
        close(fd);
        CHECK_EQ(tsrv_stop(t, 1000), 0);
        close(hole_file);
    }
    free(hole_big);
}

/* A graceful close's FIN must reach its own connection. The test thread closes the first
 * connection gracefully; with CPORT_INJECT (the ASan build) it then pauses 300 ms inside the
 * close (point "drain_sealed"), before it looks at the socket. Meanwhile another thread
 * aborts that connection and, once its socket is closed, connects a second one, which the
 * server accepts on the freed descriptor number. The paused close then must not shut that
 * number down: the second connection still gets its echo. (It did: the rare
 * httpd.traversal failure, a response lost to a FIN.) Elsewhere the test skips. */
#ifdef CPORT_INJECT
typedef struct fin_race {
    tsrv *t;
    cp_conn *first;
    int second;  /* client socket, created before the race */
    int closing; /* atomic: the test thread is entering cp_conn_close */
} fin_race;

static void *abort_and_reconnect(void *arg)
{
    fin_race *r = arg;
    WAIT_FOR(LOAD(&r->closing) == 1, IO_MS);
    usleep(30000); /* into the 300 ms pause; only the window's use hangs on this */
    cp_conn_abort(r->first);
    WAIT_FOR(LOAD(&r->t->closes) == 1, IO_MS); /* on_close: its descriptor is closed */
    struct sockaddr_in sa = loopback(r->t->port);
    CHECK(connect(r->second, (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EINPROGRESS);
    CHECK(wait_fd(r->second, POLLOUT, cpt_now_ms() + IO_MS));
    WAIT_FOR(LOAD(&r->t->opens) == 2, IO_MS);
    return NULL;
}
#endif

TEST(graceful_close_fin_stays_on_its_connection)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    CHECK_OK(setenv("CPORT_INJECT_DELAY", "drain_sealed:300000", 1)); /* before any thread */
    tsrv *t = tsrv_new(ECHO_DATA);
    t->hold_refs = true; /* the connections stay valid for the calls below */
    cp_server_options o = {.threads = 2};
    tsrv_start(t, &o);
    fin_race r = {.t = t, .second = sock_nb()}; /* its number taken now, not the freed one */
    int first = connect_to(t->port);
    WAIT_FOR(held_count(t) == 1, IO_MS); /* on_open holds after counting opens */
    pthread_mutex_lock(&t->lock);
    r.first = t->held[0];
    pthread_mutex_unlock(&t->lock);
    int first_fd = cp_conn_fd(r.first);
    pthread_t th;
    CHECK_OK(pthread_create(&th, NULL, abort_and_reconnect, &r));
    STORE(&r.closing, 1);
    cp_conn_close(r.first); /* pauses inside while the other thread acts */
    CHECK_OK(pthread_join(th, NULL));
    pthread_mutex_lock(&t->lock);
    CHECK_EQ(t->nheld, 2);
    bool reused = cp_conn_fd(t->held[1]) == first_fd;
    pthread_mutex_unlock(&t->lock);
    fprintf(stderr, "second connection on the first one's descriptor number: %s\n",
            reused ? "yes" : "no");
    exchange(r.second, 77, 1000);
    close(r.second);
    close(first);
    WAIT_FOR(LOAD(&t->closes) == 2, IO_MS);
    CHECK(reused); /* else this run could not tell */
    CHECK_EQ(tsrv_stop(t, 1000), 0);
#endif
}

TEST(max_conns_refuses_extra)
{
    enum { MAX = 10, EXTRA = 20 };
    cp_server_options o = {.threads = 3, .max_conns = MAX};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int fds[MAX];
    for (int i = 0; i < MAX; i++) {
        fds[i] = connect_to(t->port);
        exchange(fds[i], (uint32_t)i, 1000);
    }
    CHECK_EQ(tsrv_stats(t).conns_open, MAX);
    for (int i = 0; i < EXTRA; i++) {
        int fd = connect_to(t->port);
        expect_closed(fd, 5000);
        close(fd);
        exchange(fds[i % MAX], 100 + (uint32_t)i, 64 * 1024); /* service goes on meanwhile */
    }
    cp_server_stats st = tsrv_stats(t);
    CHECK_EQ(st.conns_rejected, EXTRA);
    CHECK_EQ(st.conns_total, MAX);
    CHECK_EQ(LOAD(&t->open_calls), MAX); /* no callback for the refused ones */
    for (int i = 0; i < MAX; i++)
        exchange(fds[i], 200 + (uint32_t)i, i == 0 ? 4u << 20 : 100000);
    /* One leaves; once the server has closed it a new connection gets full service. */
    close(fds[0]);
    WAIT_FOR(tsrv_stats(t).conns_open == MAX - 1, IO_MS);
    fds[0] = connect_to(t->port);
    exchange(fds[0], 300, 1 << 20);
    st = tsrv_stats(t);
    CHECK_EQ(st.conns_rejected, EXTRA);
    CHECK_EQ(st.conns_total, MAX + 1);
    for (int i = 0; i < MAX; i++)
        close(fds[i]);
    WAIT_FOR(LOAD(&t->closes) == MAX + 1, IO_MS);
    CHECK_EQ(LOAD(&t->open_now_max), MAX);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* A burst of connects at once against max_conns with four workers: exactly max_conns are
 * kept (on_open never sees more than max_conns open), the others are refused. Workers race
 * only around the moment the limit is crossed, so this takes many fresh servers. */
TEST(max_conns_burst)
{
    enum { MAX = 8, N = 40 };
    int rounds = (int)cpt_scaled(150, 30);
    for (int round = 0; round < rounds; round++) {
        cp_server_options o = {.threads = 4, .max_conns = MAX, .accepts_min = 16};
        tsrv *t = tsrv_new(ECHO_DATA);
        tsrv_start(t, &o);
        int fds[N];
        for (int i = 0; i < N; i++)
            fds[i] = connect_start(t->port);
        WAIT_FOR(tsrv_stats(t).conns_total + tsrv_stats(t).conns_rejected == N, IO_MS);
        cp_server_stats st = tsrv_stats(t);
        if (st.conns_total != MAX)
            fprintf(stderr, "round %d: %llu kept, %llu refused, at most %llu open at once\n", round,
                    (unsigned long long)st.conns_total, (unsigned long long)st.conns_rejected,
                    (unsigned long long)LOAD(&t->open_now_max));
        CHECK_EQ(st.conns_total, MAX);
        CHECK_EQ(st.conns_rejected, N - MAX);
        CHECK(LOAD(&t->open_now_max) <= MAX);
        for (int i = 0; i < N; i++)
            close(fds[i]);
        WAIT_FOR(LOAD(&t->closes) == MAX, IO_MS);
        CHECK_EQ(tsrv_stop(t, 1000), 0);
    }
}

/* Per-connection send cap: a client that sends (up to) 1 GiB and never reads gets the server
 * to stop reading from it: what the server has queued to send stays within
 * max_pending_send + what the receives in flight hold, the process's RSS stays within a
 * small bound, backpressure_events counts it, another connection is served meanwhile. Once
 * the client reads, everything comes back byte-exact, still within the bounds. */
static void backpressure_case(const cp_server_options *base, echo_mode echo, size_t bound)
{
    enum { CAP = 256 * 1024, CHUNK = 65536 };
    const uint64_t total = (uint64_t)cpt_scaled(1ll << 30, 64ll << 20);
    const long rss_bound_kb = 2 * CAP / 1024 + 16 * 1024;
    cp_server_options o = *base;
    o.max_pending_send = CAP;
    tsrv *t = tsrv_new(echo);
    tsrv_start(t, &o);
    uint8_t *tx = malloc(CHUNK), *rx = malloc(CHUNK), *want = malloc(CHUNK);
    CHECK(tx && rx && want);
    int fd = connect_to(t->port), other = connect_to(t->port);
    exchange(fd, 1, 1 << 20); /* warm up both: buffers, lookaside chunks */
    exchange(other, 2, 1 << 20);
    long rss0 = rss_kb(0);

    /* Phase 1: send without reading until the server stops taking anything. */
    uint64_t sent = 0;
    bool stalled = false;
    while (sent < total && !stalled) {
        size_t n = total - sent < CHUNK ? (size_t)(total - sent) : CHUNK;
        pattern_fill(7, sent, tx, n);
        ssize_t w = send(fd, tx, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            sent += (uint64_t)w;
            continue;
        }
        CHECK(w < 0 && errno == EAGAIN);
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        stalled = poll(&p, 1, 500) == 0;
    }
    cp_server_stats s1 = tsrv_stats(t);
    long rss1 = rss_kb(0);
    fprintf(stderr,
            "recvs=%u zero_byte=%d: client sent %llu MiB of %llu without reading, then stalled; "
            "server read %llu MiB, queued at most %llu bytes (bound %zu), RSS %+ld KiB, %llu "
            "backpressure events\n",
            o.recvs, o.zero_byte, (unsigned long long)(sent >> 20),
            (unsigned long long)(total >> 20), (unsigned long long)(s1.bytes_in >> 20),
            (unsigned long long)LOAD(&t->max_pending), bound, rss1 - rss0,
            (unsigned long long)s1.backpressure_events);
    CHECK(stalled);
    CHECK(s1.backpressure_events > 0);
    CHECK(LOAD(&t->max_pending) <= bound);
    CHECK(rss1 - rss0 < rss_bound_kb);
    /* It really stopped reading: nothing more arrives while we wait. */
    usleep(200000);
    CHECK_EQ(tsrv_stats(t).bytes_in, s1.bytes_in);
    /* Other connections are served meanwhile. */
    exchange(other, 3, 1 << 20);

    /* Phase 2: read everything back (and send the rest). */
    uint64_t got = 0;
    long rss_max = rss1;
    int64_t deadline = cpt_now_ms() + 120000;
    while (got < total) {
        CHECK(cpt_now_ms() < deadline);
        struct pollfd p = {.fd = fd, .events = (short)(POLLIN | (sent < total ? POLLOUT : 0))};
        CHECK(poll(&p, 1, 1000) >= 0 || errno == EINTR);
        if ((p.revents & POLLOUT) && sent < total) {
            size_t n = total - sent < CHUNK ? (size_t)(total - sent) : CHUNK;
            pattern_fill(7, sent, tx, n);
            ssize_t w = send(fd, tx, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            CHECK(w > 0 || errno == EAGAIN);
            if (w > 0)
                sent += (uint64_t)w;
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = recv(fd, rx, CHUNK, MSG_DONTWAIT);
            if (r == 0 || (r < 0 && errno != EAGAIN))
                fprintf(stderr, "%s after %llu bytes\n", r == 0 ? "EOF" : strerror(errno),
                        (unsigned long long)got);
            CHECK(r > 0 || (r < 0 && errno == EAGAIN));
            if (r > 0) {
                pattern_fill(7, got, want, (size_t)r);
                CHECK(memcmp(rx, want, (size_t)r) == 0);
                uint64_t before = got;
                got += (uint64_t)r;
                if ((before >> 24) != (got >> 24)) { /* every 16 MiB */
                    long rss = rss_kb(0);
                    rss_max = rss > rss_max ? rss : rss_max;
                }
            }
        }
    }
    fprintf(stderr, "then %llu MiB echoed byte-exact; queued at most %llu bytes, RSS %+ld KiB\n",
            (unsigned long long)(got >> 20), (unsigned long long)LOAD(&t->max_pending),
            rss_max - rss0);
    CHECK(LOAD(&t->max_pending) <= bound);
    CHECK(rss_max - rss0 < rss_bound_kb);
    CHECK_EQ(tsrv_stats(t).bytes_in, total + (2 << 20) + (1 << 20));
    exchange(fd, 4, 1 << 20);
    close(fd);
    close(other);
    WAIT_FOR(LOAD(&t->closes) == 2, IO_MS);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    free(tx);
    free(rx);
    free(want);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(backpressure_bounds_memory)
{
    /* One receive of 16 KiB in flight, zero-copy replies. */
    cp_server_options a = {.threads = 2, .recvs = 1, .recv_buffer = 16384};
    backpressure_case(&a, ECHO_DATA, 256 * 1024 + 16384);
    /* Four pooled receives in flight (each at most one pool buffer), copied replies; a
     * smaller shared receive pool than the default 16 MiB, so that RSS bounds the server. */
    cp_server_options b = {.threads = 3, .recvs = 4, .zero_byte = true};
    b.port_options.pool_buffers = 256;
    backpressure_case(&b, ECHO_COPY, 256 * 1024 + 4 * 4096);
}

/* fd exhaustion: cport-echo under RLIMIT_NOFILE 64 with more connections than fit. It keeps
 * serving the connections it holds, pauses accepting (accept_pauses, retried on a timer)
 * without spinning (its CPU time stays small and the pauses grow at the retry rate), and
 * accepts again once descriptors are free. */
TEST(echo_fd_exhaustion)
{
    enum { LIMIT = 64, N = 100, WINDOW_MS = 1500 };
    echo_child e;
    const char *args[] = {"--threads", "2", NULL};
    echo_start(&e, LIMIT, args);
    long base = fd_count(e.pid);
    fprintf(stderr, "cport-echo holds %ld descriptors before any connection\n", base);
    CHECK(base < LIMIT - 8);
    int fds[N];
    bool served[N] = {0};
    for (int i = 0; i < N; i++) {
        fds[i] = connect_to(e.port); /* completes in the listen backlog */
        uint8_t b = (uint8_t)i;
        send_all(fds[i], &b, 1);
    }
    /* The server fills its descriptor table... */
    WAIT_FOR(fd_count(e.pid) >= LIMIT - 1, IO_MS);
    /* ...and serves everything it holds: each echo arrives (the others stay unanswered).
     * Collected for 3 s, and on (up to IO_MS) while fewer than the check below wants have
     * come: a slow server (a sanitizer build on a loaded machine) is not a failure; one
     * that serves nothing more once its table is full still is. */
    int nserved = 0;
    int64_t deadline = cpt_now_ms() + 3000, hard_deadline = cpt_now_ms() + IO_MS;
    while (nserved < N && (cpt_now_ms() < deadline ||
                           (nserved < LIMIT - base - 4 && cpt_now_ms() < hard_deadline))) {
        for (int i = 0; i < N; i++) {
            uint8_t b;
            if (!served[i] && recv(fds[i], &b, 1, MSG_DONTWAIT) == 1) {
                CHECK_EQ(b, (uint8_t)i);
                served[i] = true;
                nserved++;
            }
        }
        usleep(5000);
    }
    fprintf(stderr, "%d of %d connections served, %ld descriptors in use\n", nserved, N,
            fd_count(e.pid));
    CHECK(nserved >= LIMIT - base - 4);
    CHECK(nserved < N);
    /* Paused, not spinning. */
    char line[1024];
    echo_counters(&e, line, sizeof line);
    uint64_t pauses0 = echo_counter(line, "accept_pauses");
    int64_t c0 = cpu_ms(e.pid), w0 = cpt_now_ms();
    usleep(WINDOW_MS * 1000); /* a measurement window */
    int64_t cpu = cpu_ms(e.pid) - c0, wall = cpt_now_ms() - w0;
    echo_counters(&e, line, sizeof line);
    uint64_t pauses1 = echo_counter(line, "accept_pauses");
    fprintf(stderr, "exhausted: %lld ms CPU in %lld ms; accept_pauses %llu -> %llu\n",
            (long long)cpu, (long long)wall, (unsigned long long)pauses0,
            (unsigned long long)pauses1);
    CHECK(pauses0 > 0);
    CHECK(cpu * 5 < wall);
    /* Retried on a timer (100 ms), not in a loop. */
    CHECK(pauses1 - pauses0 <= (uint64_t)(wall / 50 + 5));
    /* Connections it holds keep full service. */
    int kept = -1;
    for (int i = 0; i < N && kept < 0; i++)
        if (served[i])
            kept = i;
    CHECK(kept >= 0);
    exchange(fds[kept], 11, 200000);
    /* Free descriptors: the extra clients and half of the served ones leave. */
    int left_open = 0;
    for (int i = 0; i < N; i++) {
        if (!served[i] || (i != kept && i % 2)) {
            close(fds[i]);
            fds[i] = -1;
        } else {
            left_open++;
        }
    }
    /* Service resumes: a new connection is accepted and echoed. */
    int fresh = connect_to(e.port);
    exchange(fresh, 12, 100000);
    for (int i = 0; i < N; i++)
        if (fds[i] >= 0)
            exchange(fds[i], 13 + (uint32_t)i, 1000);
    echo_counters(&e, line, sizeof line);
    fprintf(stderr, "after: %s\n", line);
    CHECK_EQ(echo_counter(line, "conns_open"), (uint64_t)left_open + 1);
    close(fresh);
    for (int i = 0; i < N; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    echo_stop_cleanly(&e);
}

/* Backpressure on and off all the time, with several receives outstanding and several
 * workers: the client floods until the server stops reading, then drains, over and over, with
 * a cap of a few receives. Not a byte may be lost or reordered: the server checks the stream
 * it is handed, the client the echo. */
static void churn_case(const cp_server_options *base, echo_mode echo)
{
    enum { CHUNK = 65536 };
    const uint64_t total = (uint64_t)cpt_scaled(96 << 20, 16 << 20);
    cp_server_options o = *base;
    tsrv *t = tsrv_new(echo);
    t->check_stream = true;
    /* A small send buffer on the server's side: its replies really wait for room (a reply
     * the kernel takes at once never counts as pending), so reading pauses. */
    t->sndbuf = 65536;
    tsrv_start(t, &o);
    uint8_t *tx = malloc(CHUNK), *rx = malloc(CHUNK), *want = malloc(CHUNK);
    CHECK(tx && rx && want);
    /* A small client receive buffer (still several of loopback's 64 KiB segments, or TCP
     * falls back to zero-window probes): the server's replies back up soon, so it pauses. */
    int fd = sock_nb();
    int small = 262144;
    CHECK_EQ(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
    struct sockaddr_in sa = loopback(t->port);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EINPROGRESS);
    CHECK(wait_fd(fd, POLLOUT, cpt_now_ms() + IO_MS));
    uint64_t sent = 0, got = 0;
    unsigned cycles = 0;
    int64_t deadline = cpt_now_ms() + 120000;
    while (got < total) {
        CHECK(cpt_now_ms() < deadline);
        /* Flood until nothing moves for 2 ms. */
        while (sent < total) {
            size_t n = total - sent < CHUNK ? (size_t)(total - sent) : CHUNK;
            stream_fill(99, sent, tx, n);
            ssize_t w = send(fd, tx, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0) {
                sent += (uint64_t)w;
                continue;
            }
            CHECK(w < 0 && errno == EAGAIN);
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, 2) == 0)
                break;
        }
        /* Drain what has come back. */
        for (;;) {
            ssize_t r = recv(fd, rx, CHUNK, MSG_DONTWAIT);
            if (r < 0 && errno == EAGAIN) {
                struct pollfd p = {.fd = fd, .events = POLLIN};
                if (poll(&p, 1, got < sent ? 2 : 0) == 0)
                    break;
                continue;
            }
            if (r <= 0)
                fprintf(stderr, "%s after %llu bytes\n", r == 0 ? "EOF" : strerror(errno),
                        (unsigned long long)got);
            CHECK(r > 0);
            stream_fill(99, got, want, (size_t)r);
            if (memcmp(rx, want, (size_t)r) != 0) {
                size_t j = 0;
                while (rx[j] == want[j])
                    j++;
                fprintf(stderr, "echo byte %llu is wrong (cycle %u)\n",
                        (unsigned long long)(got + j), cycles);
                tsrv_check(t);
                CHECK(!"echo byte-exact");
            }
            got += (uint64_t)r;
        }
        cycles++;
    }
    cp_server_stats st = tsrv_stats(t);
    fprintf(stderr,
            "threads=%u recvs=%u zero_byte=%d cap=%u: %llu MiB in %u flood/drain cycles, %llu "
            "backpressure events, queued at most %llu bytes\n",
            o.threads, o.recvs, o.zero_byte, o.max_pending_send, (unsigned long long)(total >> 20),
            cycles, (unsigned long long)st.backpressure_events,
            (unsigned long long)LOAD(&t->max_pending));
    tsrv_check(t);
    CHECK_EQ(LOAD(&t->checked), total);
    CHECK(st.backpressure_events > 0);
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    free(tx);
    free(rx);
    free(want);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(backpressure_keeps_order)
{
    cp_server_options a = {
        .threads = 4, .recvs = 8, .recv_buffer = 4096, .max_pending_send = 16384};
    churn_case(&a, ECHO_DATA);
    cp_server_options b = {.threads = 4, .recvs = 8, .zero_byte = true, .max_pending_send = 16384};
    churn_case(&b, ECHO_COPY);
    cp_server_options c = {.threads = 3, .recvs = 2, .recv_buffer = 4096, .max_pending_send = 8192};
    churn_case(&c, ECHO_MIXED);
}

/* ---- S7: framing ---------------------------------------------------------------------------- */

/* Frame `seq` of client `client`: header + payload of `len` bytes (client and seq in its first
 * 8 bytes when it has room, then the pattern). Returns the bytes written to out. */
static size_t frame_build(uint8_t *out, uint32_t client, uint32_t seq, size_t len)
{
    cp_frame_header(out, (uint32_t)len);
    uint8_t *p = out + 4;
    size_t i = 0;
    if (len >= 8) {
        for (int b = 0; b < 4; b++) {
            p[b] = (uint8_t)(client >> (24 - 8 * b));
            p[4 + b] = (uint8_t)(seq >> (24 - 8 * b));
        }
        i = 8;
    }
    pattern_fill(client << 20 ^ seq, 0, p + i, len - i);
    return len + 4;
}

/* on_data in the framing tests: echo the frame; note deliveries that came from the same
 * receive as the previous frame (server bytes_in unchanged since then). */
static uint64_t frames_batched;

static void frame_echo_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    uint64_t in = tsrv_stats(t).bytes_in;
    if (u->frames > 0 && in == u->last_bytes_in)
        ADD(&frames_batched, 1);
    u->last_bytes_in = in;
    note_send(t, cp_conn_send_frame(c, data, len));
}

/* Frames split across receives (sent one byte at a time, each byte received on its own),
 * many frames in one receive, and frames far bigger than a receive, all echoed byte-exact;
 * frames_in counts each. */
static void framed_case(const cp_server_options *base)
{
    cp_server_options o = *base;
    o.framed = true;
    tsrv *t = tsrv_new(ECHO_FRAME);
    t->hook = frame_echo_hook;
    tsrv_start(t, &o);
    size_t cap = 4 << 20;
    uint8_t *buf = malloc(cap), *back = malloc(cap);
    CHECK(buf && back);
    int fd = connect_to(t->port);

    /* One byte at a time, each waited for at the server. */
    static const size_t lens[] = {0, 1, 2, 3, 4, 7, 8, 9, 100, 1000, 0};
    size_t n = 0;
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++)
        n += frame_build(buf + n, 1, (uint32_t)i, lens[i]);
    uint64_t frames0 = tsrv_stats(t).frames_in;
    for (size_t i = 0; i < n; i++) {
        uint64_t in = tsrv_stats(t).bytes_in;
        send_all(fd, buf + i, 1);
        WAIT_FOR(tsrv_stats(t).bytes_in == in + 1, IO_MS);
    }
    recv_all(fd, back, n);
    CHECK(memcmp(back, buf, n) == 0);
    CHECK_EQ(tsrv_stats(t).frames_in - frames0, sizeof lens / sizeof lens[0]);

    /* Many frames in one send (most of them in one receive). */
    uint64_t batched0 = LOAD(&frames_batched);
    frames0 = tsrv_stats(t).frames_in;
    n = 0;
    uint32_t count = 0;
    for (; n < 60000; count++)
        n += frame_build(buf + n, 2, count, (count * 37) % 300);
    send_all(fd, buf, n);
    recv_all(fd, back, n);
    CHECK(memcmp(back, buf, n) == 0);
    CHECK_EQ(tsrv_stats(t).frames_in - frames0, count);
    fprintf(stderr,
            "%u frames in one send: %llu of them came in the same receive as the one "
            "before\n",
            count, (unsigned long long)(LOAD(&frames_batched) - batched0));
    CHECK(LOAD(&frames_batched) - batched0 > count / 2);

    /* Frames bigger than a receive, between small ones, split at odd places. */
    frames0 = tsrv_stats(t).frames_in;
    n = 0;
    static const size_t big[] = {5, 300000, 7, 1 << 20, 0, 65536, 65535, 65537, 3};
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
        n += frame_build(buf + n, 3, (uint32_t)i, big[i]);
    for (size_t off = 0; off < n;) {
        size_t k = 1 + (off * 7919) % 70001;
        k = k > n - off ? n - off : k;
        send_all(fd, buf + off, k);
        off += k;
    }
    recv_all(fd, back, n);
    CHECK(memcmp(back, buf, n) == 0);
    CHECK_EQ(tsrv_stats(t).frames_in - frames0, sizeof big / sizeof big[0]);
    CHECK_EQ(tsrv_stats(t).frames_rejected, 0);
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_PEER]), 1);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    free(buf);
    free(back);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(framed_split_and_batched)
{
    cp_server_options a = {.threads = 3, .recvs = 1, .recv_buffer = 16384};
    framed_case(&a);
    cp_server_options b = {.threads = 2, .recvs = 4, .zero_byte = true};
    framed_case(&b);
}

/* Framed mode: the on_data that closes its connection is the last one. Frames after it in
 * the same receive are dropped (server.h: data that arrives after the close began is
 * dropped), not handed to a connection that is closing. */
typedef struct stop_counts {
    int frames, after_close, closes; /* atomic */
} stop_counts;

static void stop_on_data(cp_conn *c, const void *data, size_t len)
{
    stop_counts *k = cp_server_user(cp_conn_server(c));
    int *closed = cp_conn_user(c);
    ADD(&k->frames, 1);
    if (LOAD(closed))
        ADD(&k->after_close, 1);
    if (len == 4 && memcmp(data, "stop", 4) == 0) {
        STORE(closed, 1);
        cp_conn_close(c);
    }
}

static void stop_on_close(cp_conn *c, cp_close_reason reason, int err)
{
    (void)reason;
    (void)err;
    stop_counts *k = cp_server_user(cp_conn_server(c));
    ADD(&k->closes, 1);
}

TEST(framed_close_in_on_data_ends_delivery)
{
    stop_counts k = {0};
    cp_server_callbacks cb = {.on_data = stop_on_data, .on_close = stop_on_close};
    cp_server_options o = {.bind = "127.0.0.1",
                           .threads = 2,
                           .framed = true,
                           .conn_user_size = sizeof(int),
                           .user = &k};
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_start(sv));
    int fd = connect_to(cp_server_listen_port(sv));
    /* Four frames in one write, so that they arrive in one receive. */
    static const char *const parts[] = {"a", "stop", "b", "c"};
    uint8_t msg[64];
    size_t len = 0;
    for (int i = 0; i < 4; i++) {
        size_t n = strlen(parts[i]);
        cp_frame_header(msg + len, (uint32_t)n);
        memcpy(msg + len + 4, parts[i], n);
        len += 4 + n;
    }
    send_all(fd, msg, len);
    expect_closed(fd, IO_MS);
    WAIT_FOR(LOAD(&k.closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&k.frames), 2);
    CHECK_EQ(LOAD(&k.after_close), 0);
    close(fd);
    CHECK_EQ(cp_server_shutdown(sv, 1000), 0);
    cp_server_destroy(sv);
}

/* Frame echo clients on their own thread (the framed counterpart of pinger): each round
 * every connection sends a frame and reads its echo. */
typedef struct fpinger {
    int n;
    int fds[8];
    int stop, failed;
    uint64_t rounds;
    char error[200];
    pthread_t th;
} fpinger;

static void *fpinger_main(void *arg)
{
    fpinger *p = arg;
    uint8_t tx[2100], rx[2100];
    while (!LOAD(&p->stop)) {
        uint32_t r = (uint32_t)LOAD(&p->rounds);
        for (int i = 0; i < p->n; i++) {
            size_t len = frame_build(tx, 100 + (uint32_t)i, r, 8 + (r * 131 + (uint32_t)i) % 900);
            int64_t deadline = cpt_now_ms() + 10000;
            int e = try_send_all(p->fds[i], tx, len, deadline);
            if (e == 0)
                e = try_recv_all(p->fds[i], rx, len, deadline);
            if (e == 0 && memcmp(tx, rx, len) != 0)
                e = -EBADMSG;
            if (e < 0) {
                snprintf(p->error, sizeof p->error, "client %d round %u: %s", i, r,
                         e == -EPIPE ? "EOF" : strerror(-e));
                STORE(&p->failed, 1);
                return NULL;
            }
        }
        ADD(&p->rounds, 1);
    }
    return NULL;
}

/* A malformed frame (a header over max_frame, whole or split, alone or after good frames)
 * closes that connection as bad-frame, counted in frames_rejected, and on_close can ask
 * cp_conn_frame_state() why; the library itself writes nothing on stderr (a peer must not
 * be able to flood the server's log); connections echoing frames meanwhile are not
 * disturbed; a frame of exactly max_frame is fine. */
TEST(framed_bad_frame)
{
    enum { MAX = 1000 };
    cp_server_options o = {.threads = 3, .framed = true, .max_frame = MAX, .recvs = 2};
    tsrv *t = tsrv_new(ECHO_FRAME);
    tsrv_start(t, &o);
    fpinger p = {.n = 4};
    for (int i = 0; i < p.n; i++)
        p.fds[i] = connect_to(t->port);
    CHECK_EQ(pthread_create(&p.th, NULL, fpinger_main, &p), 0);
    WAIT_FOR(LOAD(&p.rounds) >= 10, IO_MS);

    uint8_t buf[3 * MAX];
    /* The biggest frame allowed. */
    int ok = connect_to(t->port);
    size_t n = frame_build(buf, 7, 0, MAX);
    send_all(ok, buf, n);
    uint8_t back[3 * MAX];
    recv_all(ok, back, n);
    CHECK(memcmp(back, buf, n) == 0);

    /* The bad ones, with stderr captured to find the log lines. */
    int bad[4];
    for (int i = 0; i < 4; i++)
        bad[i] = connect_to(t->port);
    fflush(stderr);
    int saved = dup(STDERR_FILENO), cap = cpt_memfd("stderr");
    CHECK(saved >= 0 && cap >= 0);
    dup2(cap, STDERR_FILENO);
    uint8_t hdr[4], hdr1[4];
    cp_frame_header(hdr, 0xffffffffu); /* far over, split: closed at its 4th byte */
    uint64_t in = tsrv_stats(t).bytes_in;
    int e1 = try_send_all(bad[1], hdr, 2, cpt_now_ms() + IO_MS);
    int64_t wait_until = cpt_now_ms() + IO_MS;
    while (tsrv_stats(t).bytes_in < in + 2 && cpt_now_ms() < wait_until)
        usleep(1000);
    bool still_open = tsrv_stats(t).frames_rejected == 0;
    if (e1 == 0)
        e1 = try_send_all(bad[1], hdr + 2, 2, cpt_now_ms() + IO_MS);
    cp_frame_header(hdr1, MAX + 1); /* one over, in one piece */
    int e0 = try_send_all(bad[0], hdr1, 4, cpt_now_ms() + IO_MS);
    /* Good frames, then a bad header, in one send. */
    n = frame_build(buf, 8, 0, 10);
    n += frame_build(buf + n, 8, 1, 500);
    cp_frame_header(buf + n, 5000);
    n += 4;
    int e2 = try_send_all(bad[2], buf, n, cpt_now_ms() + IO_MS);
    /* A header over the limit with its payload following. */
    n = frame_build(buf, 9, 0, 2 * MAX);
    int e3 = try_send_all(bad[3], buf, n, cpt_now_ms() + IO_MS);
    int64_t closed[4];
    for (int i = 0; i < 4; i++)
        closed[i] = wait_peer_close(bad[i], cpt_now_ms() + IO_MS, NULL);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    const char *log = memfd_text(cap);
    fprintf(stderr, "captured stderr:\n%s", log);
    CHECK(e0 == 0 && e1 == 0 && e2 == 0);
    CHECK(e3 == 0 || e3 == -ECONNRESET || e3 == -EPIPE);
    CHECK(still_open); /* two bytes of a header are not an error yet */
    for (int i = 0; i < 4; i++)
        CHECK(closed[i] >= 0);
    CHECK(strstr(log, "cport") == NULL);
    close(cap);
    cp_server_stats st = tsrv_stats(t);
    CHECK_EQ(st.frames_rejected, 4);
    WAIT_FOR(LOAD(&t->reasons[CP_CLOSE_BAD_FRAME]) == 4, IO_MS);
    /* Each description names the limit; one names the announced length 1001. */
    int named = 0;
    for (int i = 0; i < 4; i++) {
        fprintf(stderr, "bad frame %d: %s\n", i, t->bad_frame_why[i]);
        CHECK(strstr(t->bad_frame_why[i], "over the 1000-byte limit") != NULL);
        named += strstr(t->bad_frame_why[i], "announces 1001 bytes") != NULL;
    }
    CHECK_EQ(named, 1);

    /* The others were not disturbed, and keep going. */
    uint64_t r0 = LOAD(&p.rounds);
    WAIT_FOR(LOAD(&p.rounds) >= r0 + 10 || LOAD(&p.failed), IO_MS);
    STORE(&p.stop, 1);
    pthread_join(p.th, NULL);
    if (p.failed)
        fprintf(stderr, "framed clients: %s\n", p.error);
    CHECK_EQ(p.failed, 0);
    n = frame_build(buf, 7, 1, 333);
    send_all(ok, buf, n);
    recv_all(ok, back, n);
    CHECK(memcmp(back, buf, n) == 0);
    CHECK_EQ(LOAD(&t->closes), 4);
    for (int i = 0; i < 4; i++) {
        close(bad[i]);
        close(p.fds[i]);
    }
    close(ok);
    WAIT_FOR(LOAD(&t->closes) == 9, IO_MS);
    CHECK_EQ(tsrv_stats(t).frames_rejected, 4);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* A bad frame after a good one: the reply to the good frame, already accepted by
 * cp_conn_send_frame(), still reaches the peer in full before the connection ends (the bad
 * frame closes it as bad-frame, it does not destroy replies queued to earlier requests). */
TEST(framed_bad_frame_keeps_earlier_replies)
{
    enum { BIG = 512 * 1024 };
    cp_server_options o = {
        .threads = 2, .framed = true, .max_frame = 1 << 20, .max_pending_send = 8 << 20};
    tsrv *t = tsrv_new(ECHO_FRAME);
    t->sndbuf = 4096; /* most of the reply stays queued at the server */
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    int small = 4096;
    CHECK_EQ(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
    size_t cap = BIG + 4 + 4 + 100;
    uint8_t *buf = malloc(cap), *back = malloc(BIG + 4);
    CHECK(buf && back);
    size_t n = frame_build(buf, 1, 0, BIG);
    cp_frame_header(buf + n, (1u << 20) + 1); /* over max_frame */
    n += 4;
    memset(buf + n, 'x', 100); /* some of its payload */
    n += 100;
    send_all(fd, buf, n);
    WAIT_FOR(tsrv_stats(t).frames_rejected == 1, IO_MS);
    usleep(100 * 1000); /* let the close go on */
    int r = try_recv_all(fd, back, BIG + 4, cpt_now_ms() + IO_MS);
    if (r < 0)
        fprintf(stderr, "reply to the good frame: %s\n", r == -EPIPE ? "EOF" : strerror(-r));
    CHECK_EQ(r, 0);
    CHECK(memcmp(back, buf, BIG + 4) == 0);
    size_t extra = 1;
    CHECK(wait_peer_close(fd, cpt_now_ms() + IO_MS, &extra) >= 0);
    CHECK_EQ(extra, 0);
    WAIT_FOR(LOAD(&t->reasons[CP_CLOSE_BAD_FRAME]) == 1, IO_MS);
    close(fd);
    free(buf);
    free(back);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* cp_conn_close() while a reply is still queued: the close waits for the reply, and sends
 * after it are refused with -EPIPE (only a close the peer's end began takes more sends,
 * for the replies held back). The peer gets the reply, exactly, then the end. */
enum { LQ_BIG = 2 << 20 }; /* more than the socket buffers take before the peer reads */
static uint8_t *lq_big;
static int lq_r[3], lq_done; /* the hook's results; lq_done atomic */
static size_t lq_pending;    /* queued when the close began */

static void close_with_reply_queued_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data,
                                         size_t len)
{
    (void)t;
    (void)u;
    lq_r[0] = cp_conn_send(c, lq_big, LQ_BIG);
    lq_pending = cp_conn_pending(c);
    cp_conn_close(c);
    lq_r[1] = cp_conn_send(c, data, len);
    lq_r[2] = cp_conn_send_data(c, data, len);
    STORE(&lq_done, 1);
}

TEST(sends_after_a_local_close_with_a_reply_queued_are_refused)
{
    lq_big = malloc(LQ_BIG);
    CHECK(lq_big != NULL);
    pattern_fill(5, 0, lq_big, LQ_BIG);
    cp_server_options o = {.threads = 2, .max_pending_send = 8 << 20};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hook = close_with_reply_queued_hook;
    t->sndbuf = 4096; /* most of the reply stays queued at the server */
    tsrv_start(t, &o);
    int fd = connect_to(t->port); /* (its receive buffer not shrunk: read at full speed) */
    send_all(fd, "x", 1);
    WAIT_FOR(LOAD(&lq_done), IO_MS);
    fprintf(stderr, "reply %d, %zu bytes of it queued; then %d %d\n", lq_r[0], lq_pending, lq_r[1],
            lq_r[2]);
    CHECK_EQ(lq_r[0], 0);
    CHECK(lq_pending > 0); /* (else the close was issued at once: not the case tested) */
    CHECK_EQ(lq_r[1], -EPIPE);
    CHECK_EQ(lq_r[2], -EPIPE);
    uint8_t *back = malloc(LQ_BIG);
    CHECK(back != NULL);
    CHECK_EQ(try_recv_all(fd, back, LQ_BIG, cpt_now_ms() + IO_MS), 0);
    CHECK(memcmp(back, lq_big, LQ_BIG) == 0);
    size_t extra = 1;
    CHECK(wait_peer_close(fd, cpt_now_ms() + IO_MS, &extra) >= 0);
    CHECK_EQ(extra, 0);
    WAIT_FOR(LOAD(&t->reasons[CP_CLOSE_LOCAL]) == 1, IO_MS);
    close(fd);
    free(back);
    free(lq_big);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* A connection whose peer ended its side takes sends until its close is issued (replies
 * to requests held back); once on_close has run, a send through a cp_conn_ref is refused
 * with -EPIPE, and nothing reaches the peer. */
TEST(sends_after_a_peer_ended_connection_closed_are_refused)
{
    cp_server_options o = {.threads = 2};
    tsrv *t = tsrv_new(ECHO_COPY);
    t->hold_refs = true;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    uint8_t msg[100], back[100];
    pattern_fill(6, 0, msg, sizeof msg);
    send_all(fd, msg, sizeof msg);
    CHECK_EQ(shutdown(fd, SHUT_WR), 0);
    recv_all(fd, back, sizeof back);
    CHECK(memcmp(back, msg, sizeof msg) == 0);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_PEER]), 1);
    pthread_mutex_lock(&t->lock);
    cp_conn *c = t->nheld ? t->held[0] : NULL;
    pthread_mutex_unlock(&t->lock);
    CHECK(c != NULL);
    CHECK_EQ(cp_conn_send(c, msg, sizeof msg), -EPIPE);
    int file = cpt_memfd("after-close");
    CHECK_EQ(write(file, msg, sizeof msg), (ssize_t)sizeof msg);
    uint64_t block = sizeof msg; /* (no on_sent for a refused send) */
    CHECK_EQ(cp_conn_send_file(c, NULL, 0, file, 0, sizeof msg, &block), -EPIPE);
    size_t extra = 1;
    CHECK(wait_peer_close(fd, cpt_now_ms() + IO_MS, &extra) >= 0);
    CHECK_EQ(extra, 0);
    CHECK_EQ(LOAD(&t->closes), 1);
    close(file);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* cp_conn_send_data() in framed mode takes only bytes of the frame being handed over, for
 * a frame assembled across receives as for one that arrived whole: a range past the
 * payload is refused with -EINVAL (it read past the assembly buffer, and sent what lay
 * there, when the frame was assembled). */
static int sd_results[2]; /* [assembled] = result of the over-long send_data */

static void send_data_past_frame_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data,
                                      size_t len)
{
    (void)u;
    int r = cp_conn_send_data(c, data, len + 16);
    STORE(&sd_results[len > 10000], r);
    note_send(t, cp_conn_send_frame(c, data, len));
}

TEST(framed_send_data_stays_within_the_frame)
{
    cp_server_options o = {.threads = 2, .framed = true, .recv_buffer = 4096};
    tsrv *t = tsrv_new(ECHO_FRAME);
    t->hook = send_data_past_frame_hook;
    tsrv_start(t, &o);
    STORE(&sd_results[0], 1);
    STORE(&sd_results[1], 1);
    int fd = connect_to(t->port);
    enum { BIG = 50000 };
    uint8_t *buf = malloc(2 * (BIG + 4)), *back = malloc(2 * (BIG + 4));
    CHECK(buf && back);
    /* A small frame followed by more data in the same send (arrives whole), then a frame
     * far bigger than a receive (assembled). */
    size_t n = frame_build(buf, 1, 0, 100);
    n += frame_build(buf + n, 1, 1, BIG);
    send_all(fd, buf, n);
    WAIT_FOR(tsrv_stats(t).frames_in == 2, IO_MS);
    CHECK_EQ(LOAD(&sd_results[0]), -EINVAL);
    CHECK_EQ(LOAD(&sd_results[1]), -EINVAL);
    recv_all(fd, back, n);
    CHECK(memcmp(back, buf, n) == 0);
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    free(buf);
    free(back);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* on_data: the frame back with cp_conn_send_data (the payload, no header). */
static void send_data_echo_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)u;
    note_send(t, cp_conn_send_data(c, data, len));
}

/* A frame assembled across receives lives in the decoder's buffer, which goes back to the
 * lookaside after on_data and assembles the next frame: cp_conn_send_data must send such
 * a frame by copy. Replies stay queued (small SO_SNDBUF, the peer reads only at the end)
 * while later frames are assembled; every byte must come back as it was sent. */
TEST(framed_send_data_of_assembled_frames_keeps_their_bytes)
{
    cp_server_options o = {.threads = 1, .framed = true, .recv_buffer = 4096};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hook = send_data_echo_hook;
    t->sndbuf = 4096;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    enum { BIG = 50000, N = 8 };
    uint8_t *buf = malloc(N * (BIG + 4)), *want = malloc(N * BIG), *back = malloc(N * BIG);
    CHECK(buf && want && back);
    size_t n = 0;
    for (uint32_t i = 0; i < N; i++) {
        size_t f = frame_build(buf + n, 3, i, BIG);
        memcpy(want + (size_t)i * BIG, buf + n + 4, BIG);
        n += f;
    }
    send_all(fd, buf, n);
    WAIT_FOR(tsrv_stats(t).frames_in == N, IO_MS);
    recv_all(fd, back, (size_t)N * BIG);
    for (size_t i = 0; i < (size_t)N * BIG; i++) {
        if (back[i] != want[i]) {
            fprintf(stderr, "byte %zu (frame %zu) is 0x%02x, expected 0x%02x\n", i, i / BIG,
                    back[i], want[i]);
            CHECK(back[i] == want[i]);
        }
    }
    CHECK_EQ(LOAD(&t->send_errors), 0);
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    free(buf);
    free(want);
    free(back);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* ---- S8: graceful shutdown ------------------------------------------------------------------ */

enum { FL_MAX = 32, FL_PAYLOAD = 3000, FL_WINDOW = 16 };

/* One side of a framed stream: frame k of `client` (deterministic), and how far into it. */
typedef struct fstream {
    uint32_t client, k;
    size_t off, len;
    uint8_t frame[FL_PAYLOAD + 16];
} fstream;

static void fstream_next(fstream *f)
{
    size_t plen = 8 + mix64((uint64_t)f->client << 32 | f->k) % FL_PAYLOAD;
    f->len = frame_build(f->frame, f->client, f->k, plen);
    f->off = 0;
}

typedef enum { FL_OPEN, FL_EOF, FL_RESET, FL_ERROR } fl_end;

typedef struct fconn {
    int fd;
    fstream tx, rx; /* tx.k frames sent in full; rx.k frames echoed in full */
    bool send_failed;
    fl_end end;
    char why[120];
} fconn;

/* Framed load: n connections each keep up to FL_WINDOW frames in flight and check every
 * echoed byte against the frames they sent, until every connection has ended. */
typedef struct floader {
    int n;
    fconn c[FL_MAX];
    uint64_t echoed; /* atomic: frames echoed in full, all connections */
    int done;        /* atomic */
    pthread_t th;
} floader;

static void fl_fail(fconn *c, fl_end end, const char *why)
{
    c->end = end;
    snprintf(c->why, sizeof c->why, "%s (after %u frames echoed, %u sent)", why, c->rx.k, c->tx.k);
}

static void *floader_main(void *arg)
{
    floader *L = arg;
    struct pollfd pf[FL_MAX];
    uint8_t buf[65536];
    int64_t deadline = cpt_now_ms() + 120000;
    for (;;) {
        int open = 0;
        for (int i = 0; i < L->n; i++) {
            fconn *c = &L->c[i];
            bool can_send = !c->send_failed && c->tx.k - c->rx.k < FL_WINDOW;
            pf[i] = (struct pollfd){.fd = c->end == FL_OPEN ? c->fd : -1,
                                    .events = (short)(POLLIN | (can_send ? POLLOUT : 0))};
            open += c->end == FL_OPEN;
        }
        if (!open || cpt_now_ms() > deadline)
            break;
        if (poll(pf, (nfds_t)L->n, 100) < 0 && errno != EINTR)
            break;
        for (int i = 0; i < L->n; i++) {
            fconn *c = &L->c[i];
            if (c->end != FL_OPEN)
                continue;
            if (pf[i].revents & POLLOUT) {
                ssize_t w = send(c->fd, c->tx.frame + c->tx.off, c->tx.len - c->tx.off,
                                 MSG_NOSIGNAL | MSG_DONTWAIT);
                if (w > 0) {
                    c->tx.off += (size_t)w;
                    if (c->tx.off == c->tx.len) {
                        c->tx.k++;
                        fstream_next(&c->tx);
                    }
                } else if (errno != EAGAIN) {
                    c->send_failed = true; /* the server is closing: keep reading */
                }
            }
            if (!(pf[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t r = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
            if (r < 0 && errno == EAGAIN)
                continue;
            if (r == 0) {
                if (c->rx.off)
                    fl_fail(c, FL_ERROR, "EOF in the middle of an echoed frame");
                else
                    c->end = FL_EOF;
                continue;
            }
            if (r < 0) {
                char why[80];
                snprintf(why, sizeof why, "%s%s", strerror(errno),
                         c->rx.off ? " in the middle of an echoed frame" : "");
                fl_fail(c, errno == ECONNRESET ? FL_RESET : FL_ERROR, why);
                continue;
            }
            for (ssize_t j = 0; j < r && c->end == FL_OPEN; j++) {
                if (c->rx.k >= c->tx.k + (c->tx.off ? 1 : 0)) {
                    fl_fail(c, FL_ERROR, "echo of a frame not sent");
                } else if (buf[j] != c->rx.frame[c->rx.off]) {
                    fl_fail(c, FL_ERROR, "wrong byte in an echoed frame");
                } else if (++c->rx.off == c->rx.len) {
                    c->rx.k++;
                    ADD(&L->echoed, 1);
                    fstream_next(&c->rx);
                }
            }
        }
    }
    STORE(&L->done, 1);
    return NULL;
}

static void floader_start(floader *L, uint16_t port, int n)
{
    CHECK(n <= FL_MAX);
    memset(L, 0, sizeof(*L));
    L->n = n;
    for (int i = 0; i < n; i++) {
        fconn *c = &L->c[i];
        c->fd = connect_to(port);
        c->tx.client = c->rx.client = (uint32_t)i;
        fstream_next(&c->tx);
        fstream_next(&c->rx);
    }
    CHECK_EQ(pthread_create(&L->th, NULL, floader_main, L), 0);
}

/* Wait for every connection to end; returns how many did not end with EOF after whole
 * frames (printing why). */
static int floader_finish(floader *L)
{
    WAIT_FOR(LOAD(&L->done), 130000);
    pthread_join(L->th, NULL);
    int bad = 0;
    for (int i = 0; i < L->n; i++) {
        fconn *c = &L->c[i];
        if (c->end != FL_EOF && bad++ < 8)
            fprintf(stderr, "client %d: %s\n", i,
                    c->end == FL_OPEN ? "still open at the deadline" : c->why);
        close(c->fd);
    }
    return bad;
}

typedef struct sd_ctx {
    int called; /* atomic: cp_server_shutdown is about to be (or was) called */
    uint64_t before[FL_MAX], ok[FL_MAX], refused_before, refused_after;
} sd_ctx;

/* Echo each frame; note per client the frames replied to, and those handed over (and
 * replied to) before shutdown was called. */
static void sd_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *d, size_t len)
{
    (void)u;
    sd_ctx *x = t->ctx;
    uint32_t client = len >= 8 ? (uint32_t)d[0] << 24 | d[1] << 16 | d[2] << 8 | d[3] : ~0u;
    int r = cp_conn_send_frame(c, d, len);
    bool after = LOAD(&x->called); /* read after the send: r is from before the call */
    if (client < FL_MAX && r == 0)
        ADD(&x->ok[client], 1);
    if (!after) {
        if (client < FL_MAX)
            ADD(&x->before[client], 1);
        if (r != 0)
            ADD(&x->refused_before, 1);
    } else if (r == -EPIPE) {
        ADD(&x->refused_after, 1);
    }
    if (r < 0 && r != -EPIPE)
        ADD(&t->send_errors, 1);
}

/* cp_server_shutdown under load (framed echo, several workers and receives): it returns
 * within the deadline, with everything closed (0); every frame handed to on_data before the
 * call got its full reply; clients see whole echoed frames - exactly the ones the server
 * replied to - and then EOF; on_close ran once for every connection. Leaks are ASan's
 * business (the suite runs under ASan). */
TEST(shutdown_under_load)
{
    enum { N = 16, DEADLINE_MS = 5000 };
    cp_server_options o = {.threads = 3, .recvs = 2, .framed = true};
    tsrv *t = tsrv_new(ECHO_FRAME);
    sd_ctx x = {0};
    t->ctx = &x;
    t->hook = sd_hook;
    tsrv_start(t, &o);
    gapwatch *g = gapwatch_start();
    floader L;
    floader_start(&L, t->port, N);
    WAIT_FOR(LOAD(&L.echoed) >= (uint64_t)cpt_scaled(N * 200, N * 20), IO_MS);
    STORE(&x.called, 1);
    int64_t t0 = cpt_now_ns();
    int r = cp_server_shutdown(t->sv, DEADLINE_MS);
    int64_t t1 = cpt_now_ns();
    int64_t el = (t1 - t0) / 1000000, adj = (t1 - t0 - gap_overlap(g, t0, t1)) / 1000000;
    int bad = floader_finish(&L);
    gapwatch_stop(g);
    for (int i = 0; i < N; i++)
        if (L.c[i].end != FL_EOF)
            fprintf(stderr,
                    "client %d: the server replied to %llu of its frames (%llu handed over "
                    "before the call); it received %u of them in full\n",
                    i, (unsigned long long)x.ok[i], (unsigned long long)x.before[i], L.c[i].rx.k);
    uint64_t before = 0, echoed = 0;
    for (int i = 0; i < N; i++) {
        before += x.before[i];
        echoed += L.c[i].rx.k;
    }
    fprintf(stderr,
            "shutdown returned %d after %lld ms (%lld without scheduling gaps); %llu frames "
            "echoed in all, %llu handed over before the call; %llu refused after it\n",
            r, (long long)el, (long long)adj, (unsigned long long)echoed,
            (unsigned long long)before, (unsigned long long)x.refused_after);
    CHECK_EQ(r, 0);
    CHECK(adj <= DEADLINE_MS);
    CHECK_EQ(x.refused_before, 0);
    CHECK_EQ(bad, 0);
    for (int i = 0; i < N; i++) {
        CHECK(L.c[i].rx.k >= x.before[i]);
        CHECK_EQ(L.c[i].rx.k, x.ok[i]);
    }
    CHECK_EQ(LOAD(&t->closes), N);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_SHUTDOWN]), N);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    free(g);
    CHECK_EQ(tsrv_stop(t, 0), 0); /* idempotent */
}

typedef struct closer_arg {
    int *fds;
    int n;
    int *started; /* atomic */
} closer_arg;

/* Closes its sockets one by one, every other one with a reset. */
static void *closer_main(void *arg)
{
    closer_arg *a = arg;
    STORE(a->started, 1);
    for (int i = 0; i < a->n; i++) {
        if (i % 2) {
            struct linger lg = {.l_onoff = 1, .l_linger = 0};
            setsockopt(a->fds[i], SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        close(a->fds[i]);
        a->fds[i] = -1;
    }
    return NULL;
}

/* Shutdown's walk while peers close and reset their connections (which finish, free and
 * reuse connection records at the same time): every connection closes exactly once, and
 * every on_close runs on a worker, not on the thread that called cp_server_shutdown. */
TEST(shutdown_races_closing_peers)
{
    enum { N = 600 };
    cp_server_options o = {.threads = 2};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    static int fds[N];
    for (int i = 0; i < N; i++) {
        fds[i] = connect_to(t->port);
        exchange(fds[i], (uint32_t)i, 64);
    }
    int started = 0;
    closer_arg a = {fds, N / 2, &started};
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, closer_main, &a), 0);
    while (!LOAD(&started))
        sched_yield();
    t->shutdown_caller = pthread_self();
    STORE(&t->shutdown_caller_set, 1);
    int r = cp_server_shutdown(t->sv, 10000);
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK_EQ(r, 0);
    CHECK_EQ(LOAD(&t->closes), N);
    CHECK_EQ(LOAD(&t->closes_on_caller), 0);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_SHUTDOWN]) + LOAD(&t->reasons[CP_CLOSE_PEER]) +
                 LOAD(&t->reasons[CP_CLOSE_ERROR]),
             N);
    fprintf(stderr, "closes: %llu by shutdown, %llu by the peer's end, %llu by its reset\n",
            (unsigned long long)LOAD(&t->reasons[CP_CLOSE_SHUTDOWN]),
            (unsigned long long)LOAD(&t->reasons[CP_CLOSE_PEER]),
            (unsigned long long)LOAD(&t->reasons[CP_CLOSE_ERROR]));
    for (int i = N / 2; i < N; i++) {
        expect_closed(fds[i], IO_MS);
        close(fds[i]);
    }
    CHECK_EQ(tsrv_stop(t, 0), 0);
}

/* A shutdown with a zero deadline when no connection is open cuts nothing, so it returns 0
 * (-ETIMEDOUT says connections had to be cut); the listener's close, which completes on
 * the port after the call has started it, is not one. Before, the wait for the listener
 * timed out at once and the call said -ETIMEDOUT. Several rounds, one with a connection
 * that has closed before. */
TEST(a_zero_deadline_shutdown_with_nothing_open_returns_0)
{
    for (int i = 0; i < 8; i++) {
        tsrv *t = tsrv_new(ECHO_COPY);
        cp_server_options o = {.threads = 1 + i % 2};
        tsrv_start(t, &o);
        if (i % 2) {
            int fd = connect_to(t->port);
            exchange(fd, 9, 1000);
            close(fd);
            WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
        }
        CHECK_EQ(cp_server_shutdown(t->sv, 0), 0);
        CHECK_EQ(tsrv_stop(t, 0), 0);
    }
}

/* Replies that cannot drain (clients that never read) are cut at the deadline: shutdown
 * returns -ETIMEDOUT about deadline ms after the call, every connection closed once. An idle
 * server shuts down at once with 0. */
TEST(shutdown_deadline_cuts)
{
    enum { N = 6, IDLE = 3, DEADLINE_MS = 500 };
    cp_server_options o = {.threads = 2, .max_pending_send = 65536};
    tsrv *t = tsrv_new(ECHO_DATA);
    t->hold_refs = true; /* to see which connections are paused */
    tsrv_start(t, &o);
    int fds[N + IDLE];
    uint8_t *chunk = calloc(1, 65536);
    CHECK(chunk != NULL);
    for (int i = 0; i < N + IDLE; i++)
        fds[i] = connect_to(t->port);
    for (int i = 0; i < IDLE; i++)
        exchange(fds[N + i], (uint32_t)i, 100);
    /* The others send until the server has stopped reading each of them (backpressure):
     * told by the server, not by the socket taking nothing more for 300 ms (a slow server,
     * ASan on a loaded machine, took longer than that to read, and that connection was
     * left unpaused). A paused one may resume while the kernel still takes its replies;
     * it is sent more until it pauses for good. */
    for (int64_t until = cpt_now_ms() + IO_MS;;) {
        size_t paused = 0, held = held_count(t);
        for (size_t i = 0; i < held; i++)
            paused += (LOAD(&held_at(t, i)->state) & CF_PAUSED) != 0;
        if (paused == N)
            break;
        CHECK(cpt_now_ms() < until);
        struct pollfd pf[N];
        for (int i = 0; i < N; i++) {
            while (send(fds[i], chunk, 65536, MSG_NOSIGNAL | MSG_DONTWAIT) > 0)
                ;
            CHECK(errno == EAGAIN);
            pf[i] = (struct pollfd){.fd = fds[i], .events = POLLOUT};
        }
        poll(pf, N, 10); /* until one takes more, or the next look */
    }
    CHECK(tsrv_stats(t).backpressure_events >= N);
    gapwatch *g = gapwatch_start();
    int64_t t0 = cpt_now_ns();
    int r = cp_server_shutdown(t->sv, DEADLINE_MS);
    int64_t t1 = cpt_now_ns();
    gapwatch_stop(g);
    int64_t el = (t1 - t0) / 1000000, adj = (t1 - t0 - gap_overlap(g, t0, t1)) / 1000000;
    fprintf(stderr, "shutdown returned %d after %lld ms (%lld without scheduling gaps)\n", r,
            (long long)el, (long long)adj);
    CHECK_EQ(r, -ETIMEDOUT);
    CHECK(el >= DEADLINE_MS - 5);
    CHECK(adj <= DEADLINE_MS + 1000);
    CHECK_EQ(LOAD(&t->closes), N + IDLE);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_SHUTDOWN]), N + IDLE);
    for (int i = 0; i < N + IDLE; i++) {
        CHECK(wait_peer_close(fds[i], cpt_now_ms() + IO_MS, NULL) >= 0);
        close(fds[i]);
    }
    CHECK_EQ(cp_server_shutdown(t->sv, DEADLINE_MS), 0); /* idempotent */
    CHECK_EQ(tsrv_stop(t, 0), 0);
    free(chunk);
    free(g);

    /* Idle: at once. */
    t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    for (int i = 0; i < IDLE; i++) {
        fds[i] = connect_to(t->port);
        exchange(fds[i], (uint32_t)i, 1000);
    }
    /* 0: all closed before the deadline, none left to it (that would be -ETIMEDOUT, 30 s
     * on, for what takes milliseconds; a slow thread cannot make it so). */
    t0 = cpt_now_ms();
    CHECK_EQ(cp_server_shutdown(t->sv, 30000), 0);
    fprintf(stderr, "idle server: shut down in %lld ms\n", (long long)(cpt_now_ms() - t0));
    for (int i = 0; i < IDLE; i++) {
        expect_closed(fds[i], IO_MS);
        close(fds[i]);
    }
    CHECK_EQ(tsrv_stop(t, 0), 0);
}

/* A connection the application still references (cp_conn_ref) is closed by the shutdown
 * but not freed: the shutdown must still see the last one go and return at once, not wait
 * out its deadline (it used to be woken only when a connection was freed). */
TEST(shutdown_sees_referenced_connections_close)
{
    enum { N = 3 };
    cp_server_options o = {.threads = 2};
    tsrv *t = tsrv_new(ECHO_DATA);
    t->hold_refs = true;
    tsrv_start(t, &o);
    int fds[N];
    for (int i = 0; i < N; i++) {
        fds[i] = connect_to(t->port);
        exchange(fds[i], (uint32_t)i, 100);
    }
    int64_t t0 = cpt_now_ms();
    CHECK_EQ(cp_server_shutdown(t->sv, 20000), 0);
    fprintf(stderr, "shut down in %lld ms\n", (long long)(cpt_now_ms() - t0));
    CHECK_EQ(tsrv_stats(t).conns_open, 0);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_SHUTDOWN]), N);
    for (int i = 0; i < N; i++) {
        expect_closed(fds[i], IO_MS);
        close(fds[i]);
    }
    CHECK_EQ(tsrv_stop(t, 0), 0);
}

/* send_queue_limit: pushes from another thread to a peer that reads nothing are refused
 * with -ENOBUFS (counted in sends_refused) once the queue would pass the limit, before any
 * byte of them goes out; the connection stays open. Once the peer reads, it gets exactly
 * the pushes that were taken, byte-exact, and pushes are taken again. */
TEST(send_queue_limit_refuses_pushes_to_a_slow_reader)
{
    enum { LIMIT = 256 * 1024, MSG = 16 * 1024, MAX_PUSHES = 4096 };
    cp_server_options o = {.threads = 2, .send_queue_limit = LIMIT};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hold_refs = true;
    t->sndbuf = 64 * 1024;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    WAIT_FOR(held_count(t) == 1, IO_MS); /* (on_open counts opens before it holds) */
    cp_conn *c = held_at(t, 0);
    CHECK(c != NULL);
    uint8_t msg[MSG];
    int pushed = 0, r = 0;
    while (pushed < MAX_PUSHES) {
        pattern_fill(9, (uint64_t)pushed * MSG, msg, MSG);
        if ((r = cp_conn_send(c, msg, MSG)) != 0)
            break;
        pushed++;
    }
    size_t pending = cp_conn_pending(c);
    fprintf(stderr, "%d pushes of %d bytes taken, then %d; %zu bytes queued\n", pushed, MSG, r,
            pending);
    CHECK_EQ(r, -ENOBUFS);
    CHECK(pending <= LIMIT && pending + MSG > LIMIT);
    CHECK_EQ(tsrv_stats(t).sends_refused, 1);
    CHECK_EQ(LOAD(&t->closes), 0);
    /* The peer reads: every push taken, nothing of the refused one. */
    size_t total = (size_t)pushed * MSG;
    uint8_t *got = malloc(total), *want = malloc(total);
    CHECK(got && want);
    recv_all(fd, got, total);
    pattern_fill(9, 0, want, total);
    CHECK(memcmp(got, want, total) == 0);
    WAIT_FOR(cp_conn_pending(c) == 0, IO_MS);
    pattern_fill(9, total, msg, MSG);
    CHECK_OK(cp_conn_send(c, msg, MSG));
    recv_all(fd, got, MSG);
    CHECK(memcmp(got, msg, MSG) == 0);
    struct pollfd p = {.fd = fd, .events = POLLIN};
    CHECK_EQ(poll(&p, 1, 50), 0); /* nothing more */
    free(got);
    free(want);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* A stream the application feeds from on_sent, one chunk at a time, under a
 * send_queue_limit that holds one chunk but not two: each on_sent sends the next chunk
 * (cp_conn_send_ref), which must find the room the finished one freed. Its bytes still
 * counted while on_sent ran, so the second chunk was refused (-ENOBUFS) and, no send being
 * left to report, the stream stopped after one chunk. All CHUNKS arrive, byte-exact. */
enum { FEED_CHUNK = 48 * 1024, FEED_CHUNKS = 40 };

typedef struct feed {
    uint8_t data[FEED_CHUNKS][FEED_CHUNK];
    int next, refused; /* atomic */
} feed;

static void feed_next(cp_conn *c)
{
    feed *f = cp_server_user(cp_conn_server(c));
    int i = LOAD(&f->next);
    if (i == FEED_CHUNKS)
        return;
    int r = cp_conn_send_ref(c, f->data[i], FEED_CHUNK, f->data[i]);
    if (r == 0)
        STORE(&f->next, i + 1);
    else
        ADD(&f->refused, 1);
}

static int feed_open(cp_conn *c)
{
    feed_next(c);
    return 0;
}

static void feed_on_sent(cp_conn *c, void *ctx, int64_t result)
{
    (void)ctx;
    if (result == FEED_CHUNK)
        feed_next(c);
}

static void feed_on_data(cp_conn *c, const void *data, size_t len)
{
    (void)c;
    (void)data;
    (void)len;
}

TEST(a_stream_fed_from_on_sent_finds_the_room_its_last_chunk_freed)
{
    static feed f;
    memset(&f, 0, sizeof f);
    for (int i = 0; i < FEED_CHUNKS; i++)
        pattern_fill(21, (uint64_t)i * FEED_CHUNK, f.data[i], FEED_CHUNK);
    cp_server_callbacks cb = {
        .on_open = feed_open, .on_data = feed_on_data, .on_sent = feed_on_sent};
    cp_server_options o = {.bind = "127.0.0.1",
                           .threads = 2,
                           .send_queue_limit = FEED_CHUNK + FEED_CHUNK / 2,
                           .user = &f};
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_start(sv));
    int fd = connect_to(cp_server_listen_port(sv));
    size_t total = (size_t)FEED_CHUNKS * FEED_CHUNK;
    uint8_t *got = malloc(total);
    CHECK(got);
    int r = try_recv_all(fd, got, total, cpt_now_ms() + IO_MS);
    fprintf(stderr, "receive: %d; %d chunks sent, %d refused\n", r, LOAD(&f.next),
            LOAD(&f.refused));
    CHECK_EQ(r, 0);
    CHECK(memcmp(got, f.data, total) == 0);
    CHECK_EQ(LOAD(&f.refused), 0);
    free(got);
    close(fd);
    CHECK_EQ(cp_server_shutdown(sv, 1000), 0);
    cp_server_destroy(sv);
}

#ifdef CPORT_INJECT
/* A gate for a delay point ("point:usec@fd", src/inject.h): the thread that reaches the
 * point waits there until the test calls gate_open(), once it has seen what it needs,
 * rather than for a fixed time that a stalled test thread might overrun. GATE_US only
 * bounds a test that never opens it. gate_shut() makes it hold again. */
#define GATE_US 60000000L
typedef struct gate {
    int r, w;
} gate;

static void gate_init(gate *g)
{
    int fds[2];
    CHECK_OK(pipe2(fds, O_CLOEXEC));
    g->r = fds[0];
    g->w = fds[1];
}

static void gate_open(gate *g)
{
    CHECK_EQ(write(g->w, "g", 1), 1);
}

static void gate_shut(gate *g)
{
    char b;
    CHECK_EQ(read(g->r, &b, 1), 1);
}

static void gate_free(gate *g)
{
    close(g->r);
    close(g->w);
}
#endif

/* A shutdown that begins while a connection is being refused at max_conns (with
 * CPORT_INJECT, the ASan build, the refusing thread pauses 500 ms after counting it
 * rejected) ends with nothing open and the refused connection closed. (The refusal once
 * counted the connection in conns_open and took it back after the pause: the count
 * reaching zero then had to wake the shutdown. Now it never counts it.) */
TEST(shutdown_sees_a_refused_connection_counted_out)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    CHECK_OK(setenv("CPORT_INJECT_DELAY", "refuse_count:500000", 1)); /* before any thread */
    cp_server_options o = {.threads = 2, .max_conns = 1};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int a = connect_to(t->port);
    exchange(a, 1, 100);
    int b = connect_to(t->port); /* over max_conns: refused, slowly */
    /* Counted rejected: the refusal is in its pause now. */
    WAIT_FOR(tsrv_stats(t).conns_rejected == 1, IO_MS);
    CHECK_EQ(cp_server_shutdown(t->sv, 20000), 0);
    CHECK_EQ(tsrv_stats(t).conns_open, 0);
    expect_closed(a, IO_MS);
    expect_closed(b, IO_MS);
    close(a);
    close(b);
    CHECK_EQ(tsrv_stop(t, 0), 0);
#endif
}

/* A connection refused at max_conns takes no place among the open ones, not even while it
 * is being refused: it was counted in conns_open first and taken back after, and a
 * connection that came meanwhile, on another worker, was refused although fewer than
 * max_conns were open. With max_conns 1: A is open, B is refused (held inside the refusal
 * by a gated delay point until C has been decided), A closes, and C, with nothing open,
 * must be served. It was refused (conns_rejected 2). */
TEST(a_connection_below_max_conns_is_served_while_another_is_refused)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    gate g;
    gate_init(&g);
    char env[64];
    snprintf(env, sizeof env, "refuse_count:%ld@%d", GATE_US, g.r);
    CHECK_OK(setenv("CPORT_INJECT_DELAY", env, 1)); /* before any thread */
    cp_server_options o = {.threads = 2, .max_conns = 1};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int a = connect_to(t->port);
    exchange(a, 1, 100);
    int b = connect_to(t->port);                        /* at the limit: refused, slowly */
    WAIT_FOR(tsrv_stats(t).conns_rejected == 1, IO_MS); /* B is in the refusal's pause */
    close(a);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS); /* A's on_close has run: nothing is open */
    int c = connect_to(t->port);
    WAIT_FOR(LOAD(&t->opens) == 2 || tsrv_stats(t).conns_rejected == 2, IO_MS);
    /* B's refusal is still in its pause (the gate is shut): C was decided meanwhile. */
    struct pollfd p = {.fd = b, .events = POLLIN};
    CHECK_EQ(poll(&p, 1, 0), 0);
    cp_server_stats st = tsrv_stats(t);
    CHECK_EQ(st.conns_rejected, 1);
    CHECK_EQ(LOAD(&t->opens), 2);
    exchange(c, 2, 100);
    gate_open(&g); /* B's refusal ends */
    expect_closed(b, IO_MS);
    close(b);
    close(c);
    WAIT_FOR(LOAD(&t->closes) == 2, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
    gate_free(&g);
#endif
}

/* An on_data for servers whose tests look at other callbacks. */
static void ignore_data(cp_conn *c, const void *data, size_t len)
{
    (void)c;
    (void)data;
    (void)len;
}

/* conns_reaped counts connections a timeout closed, not timeouts: one that on_timeout
 * leaves standing fires again at every tick, and used to be counted every time. */
typedef struct reap_ctx {
    uint32_t calls, close_at, closes;
} reap_ctx;

static void reap_on_timeout(cp_conn *c, cp_close_reason reason)
{
    reap_ctx *x = cp_server_user(cp_conn_server(c));
    CHECK_EQ(reason, CP_CLOSE_HANDSHAKE_TIMEOUT);
    if (__atomic_add_fetch(&x->calls, 1, __ATOMIC_SEQ_CST) >= LOAD(&x->close_at))
        cp_conn_close(c);
}

static void reap_on_close(cp_conn *c, cp_close_reason reason, int err)
{
    (void)reason;
    (void)err;
    reap_ctx *x = cp_server_user(cp_conn_server(c));
    __atomic_add_fetch(&x->closes, 1, __ATOMIC_SEQ_CST);
}

TEST(conns_reaped_counts_connections_not_timeouts)
{
    reap_ctx x = {.close_at = UINT32_MAX};
    cp_server_callbacks cb = {
        .on_data = ignore_data, .on_timeout = reap_on_timeout, .on_close = reap_on_close};
    cp_server_options o = {
        .bind = "127.0.0.1", .threads = 1, .handshake_timeout_ms = 100, .tick_ms = 20, .user = &x};
    o.port_options.flags |= CP_PORT_QUIET;
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_start(sv));
    int fd = connect_to(cp_server_listen_port(sv)); /* silent */
    WAIT_FOR(LOAD(&x.calls) >= 3, IO_MS);
    cp_server_stats st;
    cp_server_get_stats(sv, &st);
    CHECK_EQ(st.conns_reaped, 0); /* left standing each time */
    __atomic_store_n(&x.close_at, 0, __ATOMIC_SEQ_CST);
    WAIT_FOR(LOAD(&x.closes) == 1, IO_MS);
    /* Counted once on_timeout has returned, which may be just after the close is seen. */
    WAIT_FOR((cp_server_get_stats(sv, &st), st.conns_reaped == 1), IO_MS);
    expect_closed(fd, IO_MS);
    close(fd);
    CHECK_EQ(cp_server_shutdown(sv, 1000), 0);
    cp_server_destroy(sv);
}

/* A timeout left standing fires again at every tick, also once the connection has been
 * silent for 2^15 ticks or more: its 16-bit stamp used to look ahead of the tick then, and
 * it stopped firing for the next 2^15 ticks (55 minutes with tick_ms 100). Time passes
 * here by moving the server's tick epoch back 10,000 ticks at each firing, from
 * on_timeout: the only worker runs it, and it is the only thread reading the epoch. */
static void standing_on_timeout(cp_conn *c, cp_close_reason reason)
{
    cp_server *sv = cp_conn_server(c);
    reap_ctx *x = cp_server_user(sv);
    CHECK_EQ(reason, CP_CLOSE_HANDSHAKE_TIMEOUT);
    sv->tick_epoch_ns -= 10000 * sv->tick_ns;
    ADD(&x->calls, 1);
}

TEST(a_timeout_left_standing_keeps_firing_across_the_tick_wrap)
{
    reap_ctx x = {0};
    cp_server_callbacks cb = {
        .on_data = ignore_data, .on_timeout = standing_on_timeout, .on_close = reap_on_close};
    cp_server_options o = {
        .bind = "127.0.0.1", .threads = 1, .handshake_timeout_ms = 100, .tick_ms = 20, .user = &x};
    o.port_options.flags |= CP_PORT_QUIET;
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_start(sv));
    int fd = connect_to(cp_server_listen_port(sv)); /* silent */
    /* The 4th firing sees it 30,000 ticks old, the 5th 40,000 (more than 2^15). */
    WAIT_FOR(LOAD(&x.calls) >= 8, IO_MS);
    close(fd);
    CHECK_EQ(cp_server_shutdown(sv, 1000), 0);
    cp_server_destroy(sv);
    CHECK_EQ(LOAD(&x.closes), 1);
}

/* A deadline set on a connection whose handshake or idle timeout on_timeout leaves standing
 * fires too: the standing timeout was found due first at every tick, and the deadline never
 * ran (on_timeout saw the handshake timeout again and again). Both tests run a silent
 * connection on a server with a 100 ms handshake timeout and 20 ms ticks; their on_timeout
 * sets a 1 ms deadline at the first firing. */
typedef struct standing_ctx {
    uint32_t standing, deadlines, standing_at_deadline, closes;
} standing_ctx;

static void standing_on_close(cp_conn *c, cp_close_reason reason, int err)
{
    (void)err;
    standing_ctx *x = cp_server_user(cp_conn_server(c));
    CHECK_EQ(reason, CP_CLOSE_LOCAL);
    ADD(&x->closes, 1);
}

/* Runs the silent connection until on_close; returns the server's conns_reaped. */
static uint64_t run_standing(standing_ctx *x, void (*on_timeout)(cp_conn *, cp_close_reason))
{
    cp_server_callbacks cb = {
        .on_data = ignore_data, .on_timeout = on_timeout, .on_close = standing_on_close};
    cp_server_options o = {.bind = "127.0.0.1",
                           .threads = 1,
                           .handshake_timeout_ms = 100,
                           .tick_ms = 20,
                           .conn_deadlines = true,
                           .user = x};
    o.port_options.flags |= CP_PORT_QUIET;
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_start(sv));
    int fd = connect_to(cp_server_listen_port(sv)); /* silent */
    WAIT_FOR(LOAD(&x->closes) == 1, IO_MS);
    fprintf(stderr, "handshake timeout fired %u times, the deadline %u\n", LOAD(&x->standing),
            LOAD(&x->deadlines));
    cp_server_stats st;
    cp_server_get_stats(sv, &st);
    expect_closed(fd, IO_MS);
    close(fd);
    CHECK_EQ(cp_server_shutdown(sv, 1000), 0);
    cp_server_destroy(sv);
    return st.conns_reaped;
}

static void starve_on_timeout(cp_conn *c, cp_close_reason reason)
{
    standing_ctx *x = cp_server_user(cp_conn_server(c));
    if (reason == CP_CLOSE_DEADLINE) {
        ADD(&x->deadlines, 1);
        cp_conn_abort(c);
        return;
    }
    CHECK_EQ(reason, CP_CLOSE_HANDSHAKE_TIMEOUT);
    if (ADD(&x->standing, 1) == 1)
        CHECK_OK(cp_conn_set_deadline(c, 1)); /* left standing, with a deadline to end it */
}

TEST(a_deadline_fires_while_a_timeout_is_left_standing)
{
    standing_ctx x = {0};
    uint64_t reaped = run_standing(&x, starve_on_timeout);
    CHECK_EQ(LOAD(&x.deadlines), 1);
    CHECK_EQ(reaped, 0); /* closed by its deadline */
}

/* The same deadline, left standing too (on_timeout neither closes nor re-arms it), has
 * fired: it is used up, and does not fire again at the ticks after it while the handshake
 * timeout keeps firing. */
static void once_on_timeout(cp_conn *c, cp_close_reason reason)
{
    standing_ctx *x = cp_server_user(cp_conn_server(c));
    if (reason == CP_CLOSE_DEADLINE) {
        if (ADD(&x->deadlines, 1) == 1)
            STORE(&x->standing_at_deadline, LOAD(&x->standing));
        return; /* left standing */
    }
    CHECK_EQ(reason, CP_CLOSE_HANDSHAKE_TIMEOUT);
    uint32_t n = ADD(&x->standing, 1);
    if (n == 1)
        CHECK_OK(cp_conn_set_deadline(c, 1));
    else if (LOAD(&x->deadlines) && n >= LOAD(&x->standing_at_deadline) + 5)
        cp_conn_abort(c); /* five more ticks with the deadline passed: enough */
}

TEST(a_deadline_left_standing_fires_once)
{
    standing_ctx x = {0};
    run_standing(&x, once_on_timeout);
    CHECK_EQ(LOAD(&x.deadlines), 1);
}

/* Ticks can overlap (each runs on a worker): two sweeps may both find one connection's
 * timeout due and both close it. With CPORT_INJECT (the ASan build) the first pauses
 * 150 ms before its close, so that later ticks (every 20 ms) find the connection still
 * due. It must be counted once. */
TEST(a_connection_reaped_by_overlapping_ticks_counts_once)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    CHECK_OK(setenv("CPORT_INJECT_DELAY", "timed_out:150000", 1)); /* before any thread */
    cp_server_options o = {.threads = 2, .handshake_timeout_ms = 100, .tick_ms = 20};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int fd = connect_to(t->port); /* silent */
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    expect_closed(fd, IO_MS);
    close(fd);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_HANDSHAKE_TIMEOUT]), 1);
    CHECK_EQ(tsrv_stats(t).conns_reaped, 1);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
#endif
}

/* Sends queued on one connection add up in a 32-bit counter (cp_conn_pending). 4 GiB of
 * them used to wrap it to 0: a graceful close then saw nothing queued and sent its FIN
 * ahead of the data. Now the send that would wrap it fails with -ENOBUFS. The bytes are
 * an untouched MAP_NORESERVE mapping (it costs no memory: the kernel reads zero pages),
 * sent twice with cp_conn_send_ref to a peer that does not read. */
static void *big_map;
static int wrap_results[3];

static void send_4gib(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)t;
    (void)u;
    (void)data;
    (void)len;
    static const size_t sizes[3] = {0x7ffff000, 0x7ffff000, 0x2000};
    for (int i = 0; i < 3; i++) {
        uint64_t *block = malloc(sizeof(*block));
        CHECK(block != NULL);
        block[0] = sizes[i];
        wrap_results[i] = cp_conn_send_ref(c, big_map, sizes[i], block);
        if (wrap_results[i] < 0)
            free(block);
    }
    CHECK(cp_conn_pending(c) >= 0x7ffff000);
    cp_conn_abort(c);
}

TEST(queued_sends_cannot_wrap_the_pending_count)
{
    big_map = mmap(NULL, 0x7ffff000, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    CHECK(big_map != MAP_FAILED);
    cp_server_options o = {.threads = 1};
    tsrv *t = tsrv_new(ECHO_DATA);
    t->hook = send_4gib;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    CHECK_EQ(send(fd, "x", 1, MSG_NOSIGNAL), 1); /* and never read */
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(wrap_results[0], 0);
    CHECK_EQ(wrap_results[1], 0);
    CHECK_EQ(wrap_results[2], -ENOBUFS);
    CHECK_EQ(LOAD(&t->ref_sent_ok) + LOAD(&t->ref_sent_bad), 2); /* each accepted one, once */
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
    munmap(big_map, 0x7ffff000);
}

/* on_data queues more than a peer that has stopped reading will ever take, then closes
 * gracefully. The replies cannot drain; once nothing has been acknowledged for linger_ms
 * the close is aborted (TCP_USER_TIMEOUT), instead of keeping the connection forever. */
static void send_lots_then_close(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)t;
    (void)u;
    (void)data;
    (void)len;
    static const uint8_t zeros[65536];
    for (int i = 0; i < 64; i++) /* 4 MiB */
        CHECK_OK(cp_conn_send(c, zeros, sizeof(zeros)));
    cp_conn_close(c);
}

TEST(graceful_close_of_a_peer_that_stopped_reading_ends)
{
    cp_server_options o = {.threads = 2, .linger_ms = 300, .max_pending_send = 8 << 20};
    tsrv *t = tsrv_new(ECHO_DATA);
    t->hook = send_lots_then_close;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    int small = 4096;
    CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)));
    CHECK_EQ(send(fd, "x", 1, MSG_NOSIGNAL), 1); /* and never read */
    int64_t t0 = cpt_now_ms();
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    fprintf(stderr, "closed %lld ms after the request\n", (long long)(cpt_now_ms() - t0));
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_LOCAL]), 1);
    CHECK_EQ(tsrv_stats(t).conns_open, 0);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* cport-echo: SIGTERM under framed load exits 0 within --shutdown-deadline, having closed
 * every connection cleanly; the clients see whole echoed frames, then EOF. */
TEST(echo_sigterm_under_load)
{
    enum { N = 8, DEADLINE_MS = 3000 };
    echo_child e;
    const char *args[] = {"--threads",           "2",    "--framed", "--recvs", "2",
                          "--shutdown-deadline", "3000", NULL};
    echo_start(&e, 0, args);
    floader L;
    floader_start(&L, e.port, N);
    WAIT_FOR(LOAD(&L.echoed) >= (uint64_t)cpt_scaled(N * 200, N * 20), IO_MS);
    gapwatch *g = gapwatch_start();
    int64_t t0 = cpt_now_ns();
    CHECK_EQ(kill(e.pid, SIGTERM), 0);
    int st = child_wait(e.pid, IO_MS);
    int64_t t1 = cpt_now_ns();
    gapwatch_stop(g);
    int64_t el = (t1 - t0) / 1000000, adj = (t1 - t0 - gap_overlap(g, t0, t1)) / 1000000;
    const char *out = memfd_text(e.out);
    fprintf(stderr,
            "cport-echo exited (0x%x) %lld ms after SIGTERM (%lld without scheduling "
            "gaps)\n%s",
            st, (long long)el, (long long)adj, out);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
    CHECK(adj <= DEADLINE_MS);
    CHECK(strstr(out, "shut down cleanly") != NULL);
    CHECK_EQ(floader_finish(&L), 0);
    fprintf(stderr, "%llu frames echoed\n", (unsigned long long)LOAD(&L.echoed));
    free(g);
    close(e.out);
    close(e.err);
}

/* A slow reader during shutdown: a client that keeps sending and has not read its replies
 * yet when cp_server_shutdown is called, and only then reads. Every byte the server replied
 * to (before the call, its whole input so far) must reach it, followed by EOF: the replies
 * the server handed to the kernel before closing must not be thrown away. */
typedef struct flood {
    int fd;
    int stop;
    int err; /* how its sending ended (the RST's error shows up here first) */
    uint64_t sent;
    pthread_t th;
} flood;

static void *flood_main(void *arg)
{
    flood *f = arg;
    uint8_t buf[16384];
    while (!LOAD(&f->stop)) {
        pattern_fill(77, f->sent, buf, sizeof buf);
        ssize_t w = send(f->fd, buf, sizeof buf, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            ADD(&f->sent, (uint64_t)w);
        } else if (errno == EAGAIN) {
            struct pollfd p = {.fd = f->fd, .events = POLLOUT};
            poll(&p, 1, 10);
        } else {
            f->err = errno; /* the server closed */
            break;
        }
    }
    return NULL;
}

typedef struct sd_thread {
    cp_server *sv;
    unsigned deadline_ms;
    int called, result, done;
    pthread_t th;
} sd_thread;

static void *sd_thread_main(void *arg)
{
    sd_thread *s = arg;
    STORE(&s->called, 1);
    s->result = cp_server_shutdown(s->sv, s->deadline_ms);
    STORE(&s->done, 1);
    return NULL;
}

TEST(shutdown_slow_reader_gets_every_reply)
{
    const uint64_t queued = (uint64_t)cpt_scaled(16 << 20, 8 << 20);
    cp_server_options o = {.threads = 2, .max_pending_send = 1u << 30};
    tsrv *t = tsrv_new(ECHO_COPY);
    tsrv_start(t, &o);
    flood f = {.fd = connect_to(t->port)};
    CHECK_EQ(pthread_create(&f.th, NULL, flood_main, &f), 0);
    /* The server has replied to `queued` bytes; most of the replies wait for the reader. */
    WAIT_FOR(tsrv_stats(t).bytes_in >= queued, IO_MS);
    sd_thread s = {.sv = t->sv, .deadline_ms = 20000};
    CHECK_EQ(pthread_create(&s.th, NULL, sd_thread_main, &s), 0);
    WAIT_FOR(LOAD(&s.called), IO_MS);
    /* Now read everything, checking it, until the server closes. */
    uint8_t buf[65536], want[65536];
    uint64_t got = 0;
    int end = 0;
    int64_t deadline = cpt_now_ms() + 60000;
    while (!end) {
        CHECK(cpt_now_ms() < deadline);
        ssize_t r = recv(f.fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r > 0) {
            pattern_fill(77, got, want, (size_t)r);
            CHECK(memcmp(buf, want, (size_t)r) == 0);
            got += (uint64_t)r;
        } else if (r == 0) {
            end = 1;
        } else if (errno == EAGAIN) {
            wait_fd(f.fd, POLLIN, cpt_now_ms() + 100);
        } else {
            end = -errno;
        }
    }
    STORE(&f.stop, 1);
    pthread_join(f.th, NULL);
    WAIT_FOR(LOAD(&s.done), IO_MS);
    pthread_join(s.th, NULL);
    cp_server_stats st = tsrv_stats(t);
    fprintf(stderr,
            "shutdown returned %d; the server received %llu bytes and handed %llu bytes of "
            "replies to the kernel (%llu replies refused after the call); the client read %llu "
            "of them, then %s (its sender saw: %s)\n",
            s.result, (unsigned long long)st.bytes_in, (unsigned long long)st.bytes_out,
            (unsigned long long)LOAD(&t->epipe), (unsigned long long)got,
            end == 1 ? "EOF" : strerror(-end), f.err ? strerror(f.err) : "nothing");
    CHECK_EQ(s.result, 0);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    CHECK(st.bytes_out + 65536 * LOAD(&t->epipe) >= st.bytes_in);
    CHECK_EQ(got, st.bytes_out);
    CHECK_EQ(end, 1);
    CHECK(f.err != ECONNRESET);
    close(f.fd);
    CHECK_EQ(tsrv_stop(t, 0), 0);
}

/* How a peer's stream ends: 0 at EOF, else the errno (ECONNRESET for a reset); -1 at the
 * deadline. */
static int stream_end(int fd, int64_t deadline)
{
    int how = 0;
    return read_to_close(fd, deadline, NULL, &how) < 0 ? -1 : how;
}

/* A client with a small receive buffer that reads nothing: replies pile up. */
static int connect_not_reading(uint16_t port)
{
    int fd = sock_nb();
    int small = 4096;
    CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small));
    struct sockaddr_in sa = loopback(port);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EINPROGRESS);
    CHECK(wait_fd(fd, POLLOUT, cpt_now_ms() + IO_MS));
    return fd;
}

/* Fill c's queue until the kernel holds data it cannot send (the peer does not read). */
static void fill_unread(cp_conn *c)
{
    static uint8_t chunk[65536];
    for (int i = 0; i < 64; i++)
        CHECK_OK(cp_conn_send(c, chunk, sizeof chunk));
    WAIT_FOR(cp_conn_pending(c) > 0, IO_MS); /* the kernel took what it could, no more */
}

/* NULL arguments of the calls that return an error are refused with -EINVAL (they were
 * dereferenced: a crash), and the stats calls take NULL as cp_port_get_stats() does. */
TEST(null_arguments_are_refused)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    int v = 0;
    socklen_t vl = sizeof v;
    char buf[64];
    CHECK_EQ(cp_server_start(NULL), -EINVAL);
    CHECK_EQ(cp_conn_peer(NULL, &ss, &sl), -EINVAL);
    CHECK_EQ(cp_conn_setsockopt(NULL, SOL_SOCKET, SO_SNDBUF, &v, sizeof v), -EINVAL);
    CHECK_EQ(cp_conn_getsockopt(NULL, SOL_SOCKET, SO_SNDBUF, &v, &vl), -EINVAL);
    CHECK_EQ(cp_conn_set_deadline(NULL, 10), -EINVAL);
    CHECK_EQ(cp_conn_frame_state(NULL, buf, sizeof buf), -EINVAL);
    CHECK_EQ(cp_server_stats_prometheus(NULL, "x_", buf, sizeof buf), -EINVAL);
    cp_server_stats st;
    memset(&st, 0xff, sizeof st);
    cp_server_get_stats(NULL, &st);
    CHECK_EQ(st.conns_open, 0);
    CHECK_EQ(st.allocations, 0);
    /* On a live server and connection: NULL out-parameters and prefix. */
    cp_server_options o = {.threads = 1};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hold_refs = true;
    tsrv_start(t, &o);
    cp_server_get_stats(t->sv, NULL);
    CHECK_EQ(cp_server_stats_prometheus(t->sv, NULL, buf, sizeof buf), -EINVAL);
    CHECK(cp_server_stats_prometheus(t->sv, "", buf, sizeof buf) > 0);
    int fd = connect_to(t->port);
    WAIT_FOR(held_count(t) == 1, IO_MS);
    cp_conn *c = held_at(t, 0);
    CHECK_EQ(cp_conn_peer(c, NULL, &sl), -EINVAL);
    CHECK_EQ(cp_conn_peer(c, &ss, NULL), -EINVAL);
    CHECK_OK(cp_conn_peer(c, &ss, &sl));
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* cp_conn_abort and the shutdown's deadline cut are abortive closes: the peer gets a reset,
 * not an end of stream after part of the data (which would pass a cut stream for a whole
 * one), and the kernel drops what it still held instead of sending it for minutes to a
 * peer that does not read. (Before, the socket was closed normally: its unsent data went
 * on, followed by a FIN.) */
TEST(abort_and_the_shutdown_cut_reset_the_peer)
{
    cp_server_options o = {.threads = 2};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hold_refs = true;
    tsrv_start(t, &o);
    int a = connect_not_reading(t->port);
    int b = connect_not_reading(t->port);
    WAIT_FOR(held_count(t) == 2, IO_MS);
    pthread_mutex_lock(&t->lock);
    cp_conn *held[2] = {t->held[0], t->held[1]};
    pthread_mutex_unlock(&t->lock);
    for (int i = 0; i < 2; i++)
        fill_unread(held[i]);
    /* Which client is held[0]'s peer: the accept order is the server's. */
    struct sockaddr_storage peer;
    socklen_t pl = sizeof peer;
    CHECK_OK(cp_conn_peer(held[0], &peer, &pl));
    struct sockaddr_in mine;
    socklen_t ml = sizeof mine;
    CHECK_OK(getsockname(a, (struct sockaddr *)&mine, &ml));
    bool a_first = ((struct sockaddr_in *)&peer)->sin_port == mine.sin_port;
    int aborted = a_first ? a : b, other = a_first ? b : a;
    cp_conn_abort(held[0]);
    CHECK_EQ(stream_end(aborted, cpt_now_ms() + IO_MS), ECONNRESET);
    /* The other one is cut by the shutdown's deadline. */
    tsrv_release(t);
    CHECK_EQ(cp_server_shutdown(t->sv, 100), -ETIMEDOUT);
    CHECK_EQ(stream_end(other, cpt_now_ms() + IO_MS), ECONNRESET);
    close(a);
    close(b);
    CHECK_EQ(tsrv_stop(t, 0), 0);
}

/* A timeout without on_timeout aborts the connection (server.h): the replies still queued
 * are cancelled and the peer gets a reset, as from cp_conn_abort(). Before, the socket was
 * closed normally: the peer read what the kernel held, then an end of stream, a cut stream
 * passing for a whole one. Here the idle timeout fires on a peer that reads nothing while
 * 4 MiB of replies are queued to it; then on a quiet one, which gets a FIN (its stream is
 * whole). */
TEST(a_timeout_without_on_timeout_resets_a_cut_stream_and_ends_a_quiet_one)
{
    cp_server_options o = {.threads = 2, .idle_timeout_ms = 300, .tick_ms = 20};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hold_refs = true;
    tsrv_start(t, &o);
    int a = connect_not_reading(t->port);
    WAIT_FOR(held_count(t) == 1, IO_MS);
    cp_conn *c = held_at(t, 0);
    fill_unread(c);
    WAIT_FOR(LOAD(&t->reasons[CP_CLOSE_IDLE_TIMEOUT]) == 1, IO_MS);
    size_t got = 0;
    int how = -1;
    CHECK(read_to_close(a, cpt_now_ms() + IO_MS, &got, &how) >= 0);
    fprintf(stderr, "the peer got %zu bytes, then %s\n", got, how ? strerror(how) : "EOF");
    CHECK_EQ(how, ECONNRESET);
    close(a);
    /* A quiet connection, nothing queued: its stream is whole, and it ends with a FIN. */
    int b = connect_not_reading(t->port);
    WAIT_FOR(held_count(t) == 2, IO_MS);
    WAIT_FOR(LOAD(&t->reasons[CP_CLOSE_IDLE_TIMEOUT]) == 2, IO_MS);
    got = 0;
    how = -1;
    CHECK(read_to_close(b, cpt_now_ms() + IO_MS, &got, &how) >= 0);
    CHECK_EQ(how, 0);
    CHECK_EQ(got, 0);
    close(b);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* bytes_out counts what a send handed to the kernel also when the send does not finish:
 * a queued 8 MiB send_ref, partly taken (the peer reads 1 MiB of it), then cancelled by an
 * abort. Before, a failed or cancelled send counted nothing, so bytes_out fell short of
 * what peers received. Both ends' buffers are small: autotuned loopback buffers can hold
 * the other 7 MiB, and the send then completed whole before the abort (1 run in ~20). */
TEST(bytes_out_counts_the_part_of_a_cancelled_send_that_went_out)
{
    enum { LEN = 8 << 20, READ = 1 << 20 };
    cp_server_options o = {.threads = 2};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hold_refs = true;
    tsrv_start(t, &o);
    int fd = connect_not_reading(t->port); /* a small receive buffer; it reads below */
    WAIT_FOR(held_count(t) == 1, IO_MS);
    cp_conn *c = held_at(t, 0);
    int small = 65536;
    CHECK_OK(cp_conn_setsockopt(c, SOL_SOCKET, SO_SNDBUF, &small, sizeof small));
    uint64_t *block = calloc(1, 8 + LEN);
    CHECK(block != NULL);
    block[0] = LEN;
    CHECK_OK(cp_conn_send_ref(c, block + 1, LEN, block)); /* on_sent frees it */
    uint8_t *buf = malloc(READ);
    recv_all(fd, buf, READ);
    free(buf);
    cp_conn_abort(c);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->ref_sent_bad), 1); /* cancelled, not sent whole */
    uint64_t out = tsrv_stats(t).bytes_out;
    fprintf(stderr, "the peer read %d bytes; bytes_out %llu\n", READ, (unsigned long long)out);
    CHECK(out >= READ);
    CHECK(out < LEN);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* ---- T3/S6: on_close exactly once, whichever way a connection ends ---------------------- */

/* The first byte a client sends says how its connection is to end. */
enum {
    END_PEER_FIN = 1, /* the client closes after its echo */
    END_LOCAL,        /* on_data replies, then cp_conn_close() twice */
    END_ABORT,        /* on_data cp_conn_abort(), then cp_conn_close() */
    END_PEER_RESET,   /* the client resets after its echo */
    END_DEADLINE,     /* on_data sets a 100 ms deadline */
    END_SHUTDOWN,     /* still open when the server shuts down */
    END_RACE,         /* the client resets while another thread calls cp_conn_close() */
    END_KINDS
};

static void close_kind_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *d, size_t len)
{
    if (u->rx == 0)
        STORE(&u->kind, d[0]);
    switch (LOAD(&u->kind)) {
    case END_LOCAL:
        note_send(t, cp_conn_send(c, d, len));
        cp_conn_close(c);
        cp_conn_close(c);
        if (cp_conn_send(c, d, len) != -EPIPE) /* closing: nothing more is queued */
            note_error(t, "cp_conn_send after cp_conn_close did not fail with -EPIPE");
        break;
    case END_ABORT:
        cp_conn_abort(c);
        cp_conn_close(c);
        break;
    case END_DEADLINE:
        note_send(t, cp_conn_send(c, d, len));
        if (cp_conn_set_deadline(c, 100) != 0)
            note_error(t, "cp_conn_set_deadline failed");
        break;
    default:
        note_send(t, cp_conn_send(c, d, len));
        break;
    }
}

typedef struct racer {
    int *fds;
    int n;
    uint32_t go; /* atomic */
    pthread_t th;
} racer;

static void reset_close(int fd)
{
    struct linger lg = {1, 0};
    CHECK_EQ(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
    close(fd);
}

static void *racer_main(void *arg)
{
    racer *r = arg;
    while (!LOAD(&r->go))
        sched_yield();
    for (int i = 0; i < r->n; i++)
        reset_close(r->fds[i]);
    return NULL;
}

/* Connections end in seven ways (peer FIN, peer reset, cp_conn_close twice, abort then
 * close, a deadline, server shutdown, and cp_conn_close from another thread racing the
 * peer's reset): every one kept by on_open gets exactly one on_close, with the reason of
 * the way it ended, and no callback of it runs after that or alongside another. */
TEST(on_close_exactly_once)
{
    enum { PER = 40 };
    cp_server_options o = {.threads = 2, .tick_ms = 20, .conn_deadlines = true};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hook = close_kind_hook;
    t->hold_refs = true; /* the race below needs the connections */
    t->yield = true;
    tsrv_start(t, &o);
    int fds[END_KINDS][PER];
    uint8_t msg[8], back[8];
    for (int k = 1; k < END_KINDS; k++)
        for (int i = 0; i < PER; i++) {
            fds[k][i] = connect_to(t->port);
            memset(msg, 'a' + i % 26, sizeof msg);
            msg[0] = (uint8_t)k;
            send_all(fds[k][i], msg, sizeof msg);
        }
    for (int k = 1; k < END_KINDS; k++)
        for (int i = 0; i < PER; i++) {
            int fd = fds[k][i];
            if (k == END_ABORT) {
                /* Aborted: a reset (or an EOF), and never the reply. */
                size_t got;
                CHECK(wait_peer_close(fd, cpt_now_ms() + IO_MS, &got) >= 0);
                CHECK_EQ(got, 0);
                continue;
            }
            recv_all(fd, back, sizeof back);
            CHECK_EQ(back[0], k);
            if (k == END_LOCAL || k == END_DEADLINE)
                expect_closed(fd, IO_MS); /* the reply came first, then the close */
            if (k == END_PEER_FIN)
                shutdown(fd, SHUT_WR);
            if (k == END_PEER_RESET)
                reset_close(fd);
        }
    /* All connections are open on the server side but for those closing: now race. */
    WAIT_FOR(LOAD(&t->opens) == (END_KINDS - 1) * PER, IO_MS);
    racer r = {.fds = fds[END_RACE], .n = PER};
    CHECK_EQ(pthread_create(&r.th, NULL, racer_main, &r), 0);
    pthread_mutex_lock(&t->lock);
    size_t nheld = t->nheld;
    cp_conn **held = malloc(nheld * sizeof(*held));
    CHECK(held != NULL);
    memcpy(held, t->held, nheld * sizeof(*held));
    pthread_mutex_unlock(&t->lock);
    STORE(&r.go, 1);
    int raced = 0;
    for (size_t i = 0; i < nheld; i++)
        if (LOAD(&((uconn *)cp_conn_user(held[i]))->kind) == END_RACE) {
            cp_conn_close(held[i]);
            raced++;
        }
    pthread_join(r.th, NULL);
    free(held);
    CHECK_EQ(raced, PER);
    /* Everything but the END_SHUTDOWN ones ends by itself. */
    WAIT_FOR(LOAD(&t->closes) == (END_KINDS - 2) * PER, IO_MS);
    for (int i = 0; i < PER; i++)
        close(fds[END_PEER_FIN][i]);
    cp_server_shutdown(t->sv, 5000);
    uint64_t(*kr)[8] = t->kind_reasons;
    fprintf(stderr, "on_close reasons by way of ending (peer/error/local/deadline/shutdown):\n");
    for (int k = 1; k < END_KINDS; k++)
        fprintf(stderr, "  kind %d: %llu/%llu/%llu/%llu/%llu\n", k,
                (unsigned long long)LOAD(&kr[k][CP_CLOSE_PEER]),
                (unsigned long long)LOAD(&kr[k][CP_CLOSE_ERROR]),
                (unsigned long long)LOAD(&kr[k][CP_CLOSE_LOCAL]),
                (unsigned long long)LOAD(&kr[k][CP_CLOSE_DEADLINE]),
                (unsigned long long)LOAD(&kr[k][CP_CLOSE_SHUTDOWN]));
    CHECK_EQ(LOAD(&kr[END_PEER_FIN][CP_CLOSE_PEER]), PER);
    CHECK_EQ(LOAD(&kr[END_LOCAL][CP_CLOSE_LOCAL]), PER);
    CHECK_EQ(LOAD(&kr[END_ABORT][CP_CLOSE_LOCAL]), PER);
    CHECK_EQ(LOAD(&kr[END_PEER_RESET][CP_CLOSE_PEER]) + LOAD(&kr[END_PEER_RESET][CP_CLOSE_ERROR]),
             PER);
    CHECK_EQ(LOAD(&kr[END_DEADLINE][CP_CLOSE_DEADLINE]), PER);
    CHECK_EQ(LOAD(&kr[END_SHUTDOWN][CP_CLOSE_SHUTDOWN]), PER);
    CHECK_EQ(LOAD(&kr[END_RACE][CP_CLOSE_LOCAL]) + LOAD(&kr[END_RACE][CP_CLOSE_PEER]) +
                 LOAD(&kr[END_RACE][CP_CLOSE_ERROR]),
             PER);
    CHECK_EQ(LOAD(&t->closes), (END_KINDS - 1) * PER);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    for (int i = 0; i < PER; i++)
        close(fds[END_SHUTDOWN][i]);
    for (int k = END_LOCAL; k <= END_DEADLINE; k++)
        if (k != END_PEER_RESET)
            for (int i = 0; i < PER; i++)
                close(fds[k][i]);
    CHECK_EQ(tsrv_stop(t, 0), 0); /* the second shutdown is a no-op */
}

/* ---- stats ------------------------------------------------------------------------------ */

/* The value of metric `name` in Prometheus text, checking its TYPE line. */
static uint64_t prom_value(const char *text, const char *name, const char *type)
{
    char want[160];
    snprintf(want, sizeof want, "# TYPE %s %s\n", name, type);
    if (!strstr(text, want))
        fprintf(stderr, "no \"%s\" in:\n%s\n", want, text);
    CHECK(strstr(text, want) != NULL);
    snprintf(want, sizeof want, "\n%s ", name);
    const char *p = strstr(text, want);
    CHECK(p != NULL);
    char *end;
    unsigned long long v = strtoull(p + strlen(want), &end, 10);
    CHECK(*end == '\n');
    return v;
}

/* Prometheus text of the server's counters agrees with cp_server_get_stats (quiet server). */
static void check_prometheus(cp_server *sv, const cp_server_stats *s)
{
    char buf[8192];
    int n = cp_server_stats_prometheus(sv, "t_", buf, sizeof buf);
    CHECK(n > 0 && (size_t)n < sizeof buf);
    CHECK_EQ(strlen(buf), (size_t)n);
    CHECK_EQ(prom_value(buf, "t_connections_open", "gauge"), s->conns_open);
    CHECK_EQ(prom_value(buf, "t_connections_total", "counter"), s->conns_total);
    CHECK_EQ(prom_value(buf, "t_connections_rejected_total", "counter"), s->conns_rejected);
    CHECK_EQ(prom_value(buf, "t_connections_reaped_total", "counter"), s->conns_reaped);
    CHECK_EQ(prom_value(buf, "t_accepts_outstanding", "gauge"), s->accepts_outstanding);
    CHECK_EQ(prom_value(buf, "t_bytes_received_total", "counter"), s->bytes_in);
    CHECK_EQ(prom_value(buf, "t_bytes_sent_total", "counter"), s->bytes_out);
    CHECK_EQ(prom_value(buf, "t_backpressure_events_total", "counter"), s->backpressure_events);
    CHECK_EQ(prom_value(buf, "t_frames_received_total", "counter"), s->frames_in);
    CHECK_EQ(prom_value(buf, "t_frames_rejected_total", "counter"), s->frames_rejected);
    CHECK_EQ(prom_value(buf, "t_sends_refused_total", "counter"), s->sends_refused);
    CHECK(prom_value(buf, "t_completions_total", "counter") >= s->completions);
    /* Too small a buffer: truncated, NUL-terminated, and the length it needed returned. */
    char small[64];
    memset(small, 'x', sizeof small);
    CHECK_EQ(cp_server_stats_prometheus(sv, "t_", small, sizeof small), n);
    CHECK_EQ(strlen(small), sizeof small - 1);
    CHECK(memcmp(small, buf, sizeof small - 1) == 0);
    CHECK_EQ(cp_server_stats_prometheus(sv, "t_", NULL, 0), n);
}

/* On epoll a reply the kernel takes at once is finished right in the send call: it costs
 * no completion. With a client that waits for each echo, a round trip then takes one
 * completion (the receive) instead of two. On io_uring every reply is a request that
 * completes through the port (cheaper there than a system call per reply): two. Run for
 * small replies (copied into the send context), large copies and replies that keep the
 * received buffer. */
TEST(replies_sent_at_once_skip_the_port)
{
    const bool uring = strcmp(cpt_backend(), "io_uring") == 0;
    enum { ROUNDS = 200 };
    static const echo_mode modes[] = {ECHO_COPY, ECHO_DATA};
    static const size_t sizes[] = {64, 3000};
    for (size_t m = 0; m < 2; m++) {
        cp_server_options o = {.threads = 1};
        tsrv *t = tsrv_new(modes[m]);
        tsrv_start(t, &o);
        int fd = connect_to(t->port);
        for (size_t k = 0; k < 2; k++) {
            exchange(fd, 1, sizes[k]); /* the connection is set up and served */
            /* The client can have the echo before the server has counted its send. */
            WAIT_FOR(tsrv_stats(t).bytes_out == tsrv_stats(t).bytes_in, IO_MS);
            cp_server_stats s0 = tsrv_stats(t);
            for (uint32_t r = 0; r < ROUNDS; r++)
                exchange(fd, r, sizes[k]);
            WAIT_FOR(tsrv_stats(t).bytes_out == s0.bytes_out + ROUNDS * sizes[k], IO_MS);
            cp_server_stats s1 = tsrv_stats(t);
            uint64_t per100 = (s1.completions - s0.completions) * 100 / ROUNDS;
            bool ok = uring ? per100 >= 200 && per100 <= 250 : per100 >= 100 && per100 <= 150;
            if (!ok)
                fprintf(stderr, "mode %zu, %zu B: %llu completions per 100 round trips\n", m,
                        sizes[k], (unsigned long long)per100);
            CHECK(ok);
        }
        close(fd);
        WAIT_FOR(tsrv_stats(t).conns_open == 0, IO_MS);
        CHECK_EQ(tsrv_stop(t, 1000), 0);
    }
}

/* Every counter moves by exactly what the traffic says: connections kept, refused by
 * on_open, reaped by the handshake timeout; bytes in and out; completions; a backpressure
 * pause; frames delivered and rejected. The Prometheus text says the same. */
TEST(stats_counters_move)
{
    enum { CLIENTS = 5, ROUNDS = 50, MSG = 700, REFUSED = 3, SILENT = 4 };
    cp_server_options o = {
        .threads = 2, .handshake_timeout_ms = 1000, .tick_ms = 20, .max_pending_send = 64 * 1024};
    tsrv *t = tsrv_new(ECHO_COPY);
    tsrv_start(t, &o);
    cp_server_stats s0 = tsrv_stats(t);
    CHECK_EQ(s0.conns_open, 0);
    CHECK_EQ(s0.conns_total, 0);
    CHECK_EQ(s0.bytes_in, 0);
    CHECK(s0.accepts_outstanding >= 4 && s0.accepts_outstanding <= 256);
    check_prometheus(t->sv, &s0);

    /* Kept connections and echoed bytes. */
    int fds[CLIENTS];
    for (int i = 0; i < CLIENTS; i++)
        fds[i] = connect_to(t->port);
    for (int r = 0; r < ROUNDS; r++)
        for (int i = 0; i < CLIENTS; i++)
            exchange(fds[i], (uint32_t)(r * CLIENTS + i), MSG);
    const uint64_t bytes = (uint64_t)CLIENTS * ROUNDS * MSG;
    WAIT_FOR(tsrv_stats(t).bytes_out == bytes, IO_MS); /* send completions may trail */
    cp_server_stats s1 = tsrv_stats(t);
    CHECK_EQ(s1.conns_open, CLIENTS);
    CHECK_EQ(s1.conns_total, CLIENTS);
    CHECK_EQ(s1.conns_rejected, 0);
    CHECK_EQ(s1.conns_reaped, 0);
    CHECK_EQ(s1.bytes_in, bytes);
    CHECK_EQ(s1.bytes_out, bytes);
    /* Each round trip took at least one receive completion (the next message waited for
     * the echo). */
    CHECK(s1.completions - s0.completions >= (uint64_t)CLIENTS * ROUNDS);
    CHECK_EQ(s1.backpressure_events, 0);
    check_prometheus(t->sv, &s1);

    /* Refused by on_open: counted as rejected, not as kept. */
    STORE(&t->refuse_every, 1);
    for (int i = 0; i < REFUSED; i++) {
        int fd = connect_to(t->port);
        expect_closed(fd, IO_MS);
        close(fd);
    }
    STORE(&t->refuse_every, 0);
    WAIT_FOR(tsrv_stats(t).conns_rejected == REFUSED, IO_MS);

    /* Silent ones reaped by the handshake timeout. */
    int silent[SILENT];
    for (int i = 0; i < SILENT; i++)
        silent[i] = connect_to(t->port);
    for (int i = 0; i < SILENT; i++) {
        expect_closed(silent[i], IO_MS);
        close(silent[i]);
    }
    WAIT_FOR(tsrv_stats(t).conns_open == CLIENTS, IO_MS);
    cp_server_stats s2 = tsrv_stats(t);
    CHECK_EQ(s2.conns_reaped, SILENT);
    CHECK_EQ(s2.conns_total, CLIENTS + SILENT);
    CHECK_EQ(s2.conns_rejected, REFUSED);
    CHECK_EQ(s2.bytes_in, bytes);

    /* A client that does not read: the server pauses reading (counted) once the kernel's
     * buffers both ways are full, and every byte is echoed once it reads. */
    enum { CHUNK = 64 * 1024, MAX_FLOOD = 256 << 20 };
    uint8_t *buf = malloc(CHUNK), *want = malloc(CHUNK);
    CHECK(buf && want);
    uint64_t sent = 0, got = 0;
    int64_t deadline = cpt_now_ms() + 60000;
    while (tsrv_stats(t).backpressure_events == 0) {
        CHECK(cpt_now_ms() < deadline);
        CHECK(sent < MAX_FLOOD);
        stream_fill(99, sent, buf, CHUNK);
        ssize_t k = send(fds[0], buf, CHUNK, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k > 0)
            sent += (uint64_t)k;
        else
            CHECK(errno == EAGAIN);
        if (k <= 0)
            wait_fd(fds[0], POLLOUT, cpt_now_ms() + 10);
    }
    while (got < sent) {
        CHECK(cpt_now_ms() < deadline);
        size_t want_n = sent - got < CHUNK ? (size_t)(sent - got) : CHUNK;
        ssize_t k = recv(fds[0], buf, want_n, MSG_DONTWAIT);
        if (k > 0) {
            stream_fill(99, got, want, (size_t)k);
            CHECK(memcmp(buf, want, (size_t)k) == 0);
            got += (uint64_t)k;
        } else {
            CHECK(k < 0 && errno == EAGAIN);
            wait_fd(fds[0], POLLIN, cpt_now_ms() + 10);
        }
    }
    free(buf);
    free(want);
    fprintf(stderr, "the server paused reading after %llu bytes sent unread\n",
            (unsigned long long)sent);
    WAIT_FOR(tsrv_stats(t).bytes_out == bytes + sent, IO_MS);
    cp_server_stats s3 = tsrv_stats(t);
    CHECK(s3.backpressure_events >= 1);
    CHECK_EQ(s3.bytes_in, bytes + sent);
    CHECK_EQ(s3.frames_in, 0);
    check_prometheus(t->sv, &s3);
    for (int i = 0; i < CLIENTS; i++)
        close(fds[i]);
    WAIT_FOR(tsrv_stats(t).conns_open == 0, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);

    /* Framed: frames delivered and a bad one rejected. */
    cp_server_options fo = {.threads = 2, .framed = true, .max_frame = 4096};
    t = tsrv_new(ECHO_FRAME);
    tsrv_start(t, &fo);
    int fd = connect_to(t->port);
    uint8_t fbuf[8 * 1024], fback[8 * 1024];
    size_t n = 0;
    for (uint32_t i = 0; i < 6; i++)
        n += frame_build(fbuf + n, 1, i, 100 + 300 * i);
    send_all(fd, fbuf, n);
    recv_all(fd, fback, n);
    CHECK(memcmp(fbuf, fback, n) == 0);
    WAIT_FOR(tsrv_stats(t).frames_in == 6, IO_MS);
    cp_frame_header(fbuf, 5000); /* over max_frame */
    send_all(fd, fbuf, 4);
    expect_closed(fd, IO_MS);
    close(fd);
    WAIT_FOR(tsrv_stats(t).conns_open == 0, IO_MS);
    cp_server_stats f = tsrv_stats(t);
    CHECK_EQ(f.frames_in, 6);
    CHECK_EQ(f.frames_rejected, 1);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_BAD_FRAME]), 1);
    check_prometheus(t->sv, &f);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* GET / on a stats port; returns the whole response (static buffer). */
/* Read fd until the peer closes (IO_MS at most) into buf, NUL-terminated. */
static void read_to_eof(int fd, char *buf, size_t cap)
{
    size_t n = 0;
    int64_t deadline = cpt_now_ms() + IO_MS;
    for (;;) {
        CHECK(n < cap - 1);
        ssize_t k = recv(fd, buf + n, cap - 1 - n, MSG_DONTWAIT);
        if (k == 0)
            break;
        if (k > 0) {
            n += (size_t)k;
            continue;
        }
        CHECK(errno == EAGAIN);
        CHECK(wait_fd(fd, POLLIN, deadline));
    }
    buf[n] = 0;
}

static const char *http_get(uint16_t port)
{
    static char resp[16384];
    int fd = connect_to(port);
    static const char req[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    send_all(fd, req, sizeof req - 1);
    read_to_eof(fd, resp, sizeof resp);
    close(fd);
    return resp;
}

/* cport-echo prints its counters on SIGUSR1 and serves them in Prometheus text format on
 * --stats-port; both agree with the traffic sent and with each other. */
TEST(echo_stats_sigusr1_and_prometheus)
{
    enum { CLIENTS = 3, MSG = 1000, ROUNDS = 4 };
    const char *args[] = {"--threads", "2", "--stats-port", "0", "--handshake-timeout",
                          "1000",      NULL};
    echo_child e;
    echo_start(&e, 0, args);
    CHECK(e.stats_port != 0);
    int fds[CLIENTS];
    for (int i = 0; i < CLIENTS; i++) {
        fds[i] = connect_to(e.port);
        for (int r = 0; r < ROUNDS; r++)
            exchange(fds[i], (uint32_t)(i * 10 + r), MSG);
    }
    int silent = connect_to(e.port);
    expect_closed(silent, IO_MS); /* reaped */
    close(silent);
    const uint64_t bytes = (uint64_t)CLIENTS * MSG * ROUNDS;
    char line[1024];
    int64_t deadline = cpt_now_ms() + IO_MS;
    for (;;) { /* the last send completions and the reaped close may trail what we saw */
        echo_counters(&e, line, sizeof line);
        if (echo_counter(line, "bytes_out") == bytes && echo_counter(line, "conns_open") == CLIENTS)
            break;
        CHECK(cpt_now_ms() < deadline);
        usleep(5000);
    }
    fprintf(stderr, "%s\n", line);
    CHECK_EQ(echo_counter(line, "conns_total"), CLIENTS + 1);
    CHECK_EQ(echo_counter(line, "conns_reaped"), 1);
    CHECK_EQ(echo_counter(line, "conns_rejected"), 0);
    CHECK_EQ(echo_counter(line, "bytes_in"), bytes);
    CHECK(echo_counter(line, "completions") >= (uint64_t)CLIENTS * ROUNDS);
    CHECK(echo_counter(line, "accepts_outstanding") >= 1);
    const char *resp = http_get(e.stats_port);
    CHECK(strncmp(resp, "HTTP/1.1 200 OK\r\n", 17) == 0);
    CHECK(strstr(resp, "Content-Type: text/plain; version=0.0.4\r\n") != NULL);
    const char *body = strstr(resp, "\r\n\r\n");
    CHECK(body != NULL);
    body += 4;
    unsigned long clen = 0;
    const char *cl = strstr(resp, "Content-Length: ");
    CHECK(cl != NULL && sscanf(cl, "Content-Length: %lu", &clen) == 1);
    CHECK_EQ(strlen(body), clen);
    CHECK(strstr(body, "# HELP cport_echo_connections_open ") != NULL);
    CHECK_EQ(prom_value(body, "cport_echo_connections_open", "gauge"), CLIENTS);
    CHECK_EQ(prom_value(body, "cport_echo_connections_total", "counter"), CLIENTS + 1);
    CHECK_EQ(prom_value(body, "cport_echo_connections_reaped_total", "counter"), 1);
    CHECK_EQ(prom_value(body, "cport_echo_bytes_received_total", "counter"), bytes);
    CHECK_EQ(prom_value(body, "cport_echo_bytes_sent_total", "counter"), bytes);
    CHECK_EQ(prom_value(body, "cport_echo_frames_rejected_total", "counter"), 0);
    /* A second scrape works too (one request per connection). */
    CHECK(strncmp(http_get(e.stats_port), "HTTP/1.1 200 OK\r\n", 17) == 0);
    for (int i = 0; i < CLIENTS; i++)
        close(fds[i]);
    echo_stop_cleanly(&e);
}

/* The stats port serves scrapers at once: one that connects and says nothing holds up
 * nobody. (The old single-threaded responder answered the next scrape only after the
 * silent one's 1 s read timeout, and answered and closed the silent one first.) */
TEST(echo_stats_scrape_not_held_by_a_silent_client)
{
    const char *args[] = {"--threads", "1", "--stats-port", "0", NULL};
    echo_child e;
    echo_start(&e, 0, args);
    CHECK(e.stats_port != 0);
    int silent = connect_to(e.stats_port);
    for (int i = 0; i < 3; i++) {
        const char *resp = http_get(e.stats_port);
        CHECK(strncmp(resp, "HTTP/1.1 200 OK\r\n", 17) == 0);
        CHECK(strstr(resp, "cport_echo_connections_open") != NULL);
    }
    char b;
    CHECK_EQ(recv(silent, &b, 1, MSG_DONTWAIT), -1); /* still open, nothing answered */
    CHECK(errno == EAGAIN);
    /* It is answered too, once it asks (a request in two pieces gets one answer). */
    send_all(silent, "GET / HTTP/1.1\r\n", 16);
    usleep(20000);
    send_all(silent, "Host: x\r\n\r\n", 11);
    char resp[8192];
    read_to_eof(silent, resp, sizeof resp);
    CHECK(strncmp(resp, "HTTP/1.1 200 OK\r\n", 17) == 0);
    CHECK(strstr(resp + 17, "HTTP/1.1") == NULL);
    close(silent);
    echo_stop_cleanly(&e);
}

/* Accepting pauses on EMFILE and a retry timer resumes it. When that timer cannot be
 * started (failure point accept_retry_timer), the tick must resume it: the accept that
 * failed is not posted again until then, and with the last posted accept lost nothing else
 * would ever post one. A pool of two accepts; RLIMIT_NOFILE lowered to the descriptors in
 * use, so that both fail with EMFILE when clients connect; then the tick must keep trying
 * (accept_pauses grows beyond the two the pool's accepts account for) and, once the limit
 * is back, the server must accept and echo the waiting clients and new ones. Without the
 * tick's resume both accepts are lost: accept_pauses stops at 2 and nobody is accepted
 * again. */
TEST(accepting_resumes_without_a_retry_timer)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    enum { EARLY = 3, LATE = 3, WAIT_MS = 5000 };
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "accept_retry_timer", 1)); /* before any thread */
    cp_server_options o = {.threads = 1, .accepts_min = 2, .accepts_max = 2, .tick_ms = 50};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    WAIT_FOR(tsrv_stats(t).accepts_outstanding == 2, WAIT_MS);
    int fds[EARLY + LATE];
    for (int i = 0; i < EARLY; i++)
        fds[i] = sock_nb(); /* made while descriptors may still be made */
    int lowest = fcntl(fds[0], F_DUPFD_CLOEXEC, 0);
    CHECK(lowest >= 0);
    close(lowest);
    struct rlimit saved, low;
    CHECK_OK(getrlimit(RLIMIT_NOFILE, &saved));
    low = saved;
    low.rlim_cur = (rlim_t)lowest; /* every descriptor below is in use: accepts fail */
    CHECK_OK(setrlimit(RLIMIT_NOFILE, &low));
    struct sockaddr_in sa = loopback(t->port);
    for (int i = 0; i < EARLY; i++)
        CHECK(connect(fds[i], (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EINPROGRESS);
    /* A third pause means accepting was resumed while the limit held. */
    int64_t deadline = cpt_now_ms() + WAIT_MS;
    while (tsrv_stats(t).accept_pauses < 3 && cpt_now_ms() < deadline)
        usleep(1000);
    cp_server_stats st = tsrv_stats(t);
    CHECK_OK(setrlimit(RLIMIT_NOFILE, &saved));
    fprintf(stderr, "descriptor limit %d: accept_pauses %llu, accepts_outstanding %llu\n", lowest,
            (unsigned long long)st.accept_pauses, (unsigned long long)st.accepts_outstanding);
    CHECK(st.accept_pauses >= 3);
    /* Not checked: that nobody was accepted meanwhile. io_uring takes the descriptor limit
     * when an accept request is submitted, so one submitted before the limit dropped may
     * still succeed (seen 1 run in 30); the pauses show the limit held for the others. */
    /* Descriptors again: the waiting clients and new ones are accepted and served. */
    for (int i = 0; i < EARLY; i++)
        CHECK_EQ(try_exchange(fds[i], (uint32_t)i, 1000, cpt_now_ms() + WAIT_MS), 0);
    for (int i = EARLY; i < EARLY + LATE; i++) {
        fds[i] = connect_to(t->port);
        CHECK_EQ(try_exchange(fds[i], (uint32_t)i, 1000, cpt_now_ms() + WAIT_MS), 0);
    }
    CHECK_EQ(tsrv_stats(t).conns_total, EARLY + LATE);
    for (int i = 0; i < EARLY + LATE; i++)
        close(fds[i]);
    WAIT_FOR(LOAD(&t->closes) == EARLY + LATE, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
#endif
}

/* S5: an accept that fails with an error the pool does not know was posted again at once;
 * when the error stays (the listener no longer listens; EPERM from a seccomp filter or an
 * LSM, which the kernel checks before taking a connection) the new accept failed at once
 * too, and every worker spun at full speed re-posting accepts. Such an error now pauses
 * accepting as the resource errors do: retried on the timer, counted in accept_pauses. */
TEST(an_accept_error_that_persists_does_not_spin)
{
    enum { WINDOW_MS = 1000 };
    cp_server_options o = {.threads = 2, .accepts_min = 4, .tick_ms = 50};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    exchange(fd, 1, 1000);
    /* Not listening any more: every accept fails with EINVAL from now on. */
    int64_t c0 = cpt_cpu_ms(), w0 = cpt_now_ms();
    uint64_t p0 = tsrv_stats(t).accept_pauses;
    CHECK_OK(shutdown(t->sv->listener.fd, SHUT_RD));
    usleep(WINDOW_MS * 1000); /* a measurement window */
    int64_t cpu = cpt_cpu_ms() - c0, wall = cpt_now_ms() - w0;
    uint64_t p1 = tsrv_stats(t).accept_pauses;
    fprintf(stderr, "listener shut: %lld ms CPU in %lld ms; accept_pauses %llu -> %llu\n",
            (long long)cpu, (long long)wall, (unsigned long long)p0, (unsigned long long)p1);
    CHECK(cpu * 5 < wall);
    CHECK(p1 > p0);
    CHECK(p1 - p0 <= (uint64_t)(wall / 50 + 5)); /* retried on the timer (100 ms) */
    exchange(fd, 2, 1000);                       /* the connections it has are served on */
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* A connection and its user area live in one lookaside chunk (1 MiB). conn_user_size
 * beyond CP_CONN_USER_MAX is refused with -EINVAL (before, create succeeded and the first
 * connection was carved past its chunk's end: a write out of bounds), without leaking a
 * byte or a descriptor (ASan's leak check and the descriptor count). The largest size
 * works with the largest connection record (64 receives, framed, deadlines): each
 * connection finds its whole area zeroed, fills it, and still finds it intact when data
 * arrives; an overrun would fault or show as a changed byte. */
typedef struct big_user {
    size_t size;
    uint64_t opens, closes, dirty, damaged;
} big_user;

static int bu_on_open(cp_conn *c)
{
    big_user *x = cp_server_user(cp_conn_server(c));
    const uint8_t *u = cp_conn_user(c);
    for (size_t i = 0; i < x->size; i++) {
        if (u[i]) {
            ADD(&x->dirty, 1);
            break;
        }
    }
    memset(cp_conn_user(c), 0xab, x->size);
    ADD(&x->opens, 1);
    return 0;
}

static void bu_on_data(cp_conn *c, const void *data, size_t len)
{
    big_user *x = cp_server_user(cp_conn_server(c));
    const uint8_t *u = cp_conn_user(c);
    for (size_t i = 0; i < x->size; i++) {
        if (u[i] != 0xab) {
            ADD(&x->damaged, 1);
            break;
        }
    }
    cp_conn_send_frame(c, data, len);
}

static void bu_on_close(cp_conn *c, cp_close_reason reason, int err)
{
    (void)reason;
    (void)err;
    big_user *x = cp_server_user(cp_conn_server(c));
    ADD(&x->closes, 1);
}

TEST(conn_user_size_up_to_its_maximum)
{
    enum { CONNS = 3, PAYLOAD = 5000 };
    static const cp_server_callbacks cb = {
        .on_open = bu_on_open, .on_data = bu_on_data, .on_close = bu_on_close};
    big_user x = {0};
    cp_server_options o = {.bind = "127.0.0.1",
                           .threads = 2,
                           .recvs = 64,
                           .framed = true,
                           .conn_deadlines = true,
                           .user = &x};
    o.port_options.flags |= CP_PORT_QUIET;
    long fds0 = fd_count(getpid());
    const size_t too_big[] = {CP_CONN_USER_MAX + 1, 2u << 20, SIZE_MAX};
    for (size_t i = 0; i < sizeof too_big / sizeof too_big[0]; i++) {
        cp_server *sv = (cp_server *)&x; /* must be overwritten */
        o.conn_user_size = too_big[i];
        CHECK_EQ(cp_server_create(&sv, &o, &cb), -EINVAL);
        CHECK(sv == NULL);
    }
    CHECK_EQ(fd_count(getpid()), fds0);
    x.size = o.conn_user_size = CP_CONN_USER_MAX;
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_start(sv));
    uint16_t port = cp_server_listen_port(sv);
    int fds[CONNS];
    static uint8_t out[PAYLOAD + 4], in[PAYLOAD + 4];
    for (int i = 0; i < CONNS; i++) /* open at once: each holds its own chunk */
        fds[i] = connect_to(port);
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < CONNS; i++) {
            size_t n = frame_build(out, (uint32_t)i, (uint32_t)round, PAYLOAD);
            send_all(fds[i], out, n);
            recv_all(fds[i], in, n);
            CHECK(memcmp(in, out, n) == 0);
        }
    }
    CHECK_EQ(LOAD(&x.opens), CONNS);
    for (int i = 0; i < CONNS; i++)
        close(fds[i]);
    WAIT_FOR(LOAD(&x.closes) == CONNS, IO_MS);
    CHECK_EQ(LOAD(&x.dirty), 0);
    CHECK_EQ(LOAD(&x.damaged), 0);
    CHECK_EQ(cp_server_shutdown(sv, 1000), 0);
    cp_server_destroy(sv);
}

/* cp_conn_send() may be called from any thread. Each thread that did got its own record
 * with lookaside caches, which refill several objects at once: one that exited stranded
 * them for good (here about one 64 KiB copy buffer per thread) and its record too, so a
 * program sending from a stream of short-lived threads grew without bound (found by a
 * review of the lookaside lists). Threads other than the pool's now share one record
 * whose caches keep nothing. */
typedef struct one_send {
    cp_conn *c;
    int r;
} one_send;

enum { ONE_SEND = 65536 };

static void *send_once_and_exit(void *arg)
{
    one_send *s = arg;
    static char msg[ONE_SEND];
    s->r = cp_conn_send(s->c, msg, sizeof msg);
    return NULL;
}

TEST(short_lived_senders_do_not_strand_lookaside_objects)
{
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hold_refs = true;
    t->sndbuf = 4096;
    cp_server_options o = {.threads = 1};
    tsrv_start(t, &o);
    /* A small receive window: the kernel takes little of each send, the rest is copied. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(fd >= 0);
    int small = 4096;
    CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small));
    struct sockaddr_in sa = loopback(t->port);
    CHECK_OK(connect(fd, (struct sockaddr *)&sa, sizeof sa));
    WAIT_FOR(held_count(t) == 1, IO_MS); /* on_open holds after counting opens */
    cp_conn *c = held_at(t, 0);
    int threads = (int)cpt_scaled(1000, 300);
    uint64_t before = 0;
    static char sink[ONE_SEND];
    for (int i = 0; i < threads; i++) {
        if (i == 50)
            before = tsrv_stats(t).allocations; /* warmed up */
        one_send s = {.c = c};
        pthread_t th;
        CHECK_OK(-pthread_create(&th, NULL, send_once_and_exit, &s));
        CHECK_OK(-pthread_join(th, NULL));
        CHECK_OK(s.r);
        recv_all(fd, sink, sizeof sink);
    }
    uint64_t after = tsrv_stats(t).allocations;
    fprintf(stderr, "%d sending threads: server allocations %llu -> %llu\n", threads,
            (unsigned long long)before, (unsigned long long)after);
    CHECK(after <= before + 1);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* ---- cp_conn_set_deadline: when a deadline fires ------------------------------------------
 *
 * A small server of its own: each client sends 2-byte commands [index, command]; the index
 * (0..DL_MAX-1) names the slot where the server records what happened to that connection.
 *   'D' set the slot's deadline (dl->ms[i]), noting the time just before the call
 *   'C' clear the deadline (0)
 *   'B' block in on_data for dl->block_ms, then set the slot's deadline as 'D' does
 *   'X' queue dl->big bytes the client does not read, cp_conn_close(), then set a deadline
 *   'T' another thread (holding a reference) sets the deadline while on_data blocks
 * on_timeout notes the first firing's time and counts firings; it aborts the connection
 * unless dl->keep is set. */
enum { DL_MAX = 32 };

typedef struct dlsrv {
    cp_server *sv;
    uint16_t port;
    unsigned ms[DL_MAX];
    unsigned block_ms;
    size_t big;
    bool keep;
    unsigned linger_ms;
    int64_t set_ns[DL_MAX];   /* atomic: just before the (last) cp_conn_set_deadline */
    int set_ret[DL_MAX];      /* atomic: what it returned, +1 (0 = not called) */
    int64_t fired_ns[DL_MAX]; /* atomic: the first on_timeout, 0 = none */
    uint32_t fires[DL_MAX];   /* atomic */
    uint32_t closes[DL_MAX];  /* atomic */
    int32_t close_reason[DL_MAX];
    uint32_t bad_reason, overlap, opens, closes_all;
} dlsrv;

typedef struct dlconn {
    int idx;      /* -1 until the first command */
    uint8_t half; /* 1 = the index byte of a command arrived, its command not yet */
    uint32_t inside;
} dlconn;

typedef struct dl_thread_arg {
    dlsrv *dl;
    cp_conn *c;
    int idx;
} dl_thread_arg;

static void dl_enter(dlsrv *dl, dlconn *u)
{
    if (XCHG(&u->inside, 1))
        ADD(&dl->overlap, 1);
}

static void dl_leave(dlconn *u)
{
    STORE(&u->inside, 0);
}

static void dl_set(dlsrv *dl, cp_conn *c, int i, unsigned ms)
{
    STORE(&dl->set_ns[i], cpt_now_ns());
    STORE(&dl->set_ret[i], cp_conn_set_deadline(c, ms) + 1);
}

static void *dl_thread_main(void *arg)
{
    dl_thread_arg *a = arg;
    dl_set(a->dl, a->c, a->idx, LOAD(&a->dl->ms[a->idx]));
    cp_conn_unref(a->c);
    return NULL;
}

static int dl_on_open(cp_conn *c)
{
    dlconn *u = cp_conn_user(c);
    u->idx = -1;
    ADD(&((dlsrv *)cp_server_user(cp_conn_server(c)))->opens, 1);
    return 0;
}

static void dl_command(dlsrv *dl, cp_conn *c, int i, uint8_t cmd)
{
    switch (cmd) {
    case 'D':
        dl_set(dl, c, i, LOAD(&dl->ms[i]));
        break;
    case 'C':
        dl_set(dl, c, i, 0);
        break;
    case 'B':
        cp_port_block_begin(cp_server_port(dl->sv));
        usleep(LOAD(&dl->block_ms) * 1000u);
        cp_port_block_end(cp_server_port(dl->sv));
        dl_set(dl, c, i, LOAD(&dl->ms[i]));
        break;
    case 'X': {
        char *junk = calloc(1, LOAD(&dl->big));
        CHECK(junk != NULL);
        CHECK_OK(cp_conn_send(c, junk, LOAD(&dl->big)));
        free(junk);
        CHECK(cp_conn_pending(c) > 0);
        cp_conn_close(c);
        dl_set(dl, c, i, LOAD(&dl->ms[i]));
        break;
    }
    case 'Q': {
        char *junk = calloc(1, LOAD(&dl->big));
        CHECK(junk != NULL);
        CHECK_OK(cp_conn_send(c, junk, LOAD(&dl->big)));
        free(junk);
        STORE(&dl->set_ret[i], 1);
        break;
    }
    case 'T': {
        static dl_thread_arg args[DL_MAX];
        args[i] = (dl_thread_arg){dl, c, i};
        cp_conn_ref(c);
        pthread_t th;
        CHECK_OK(-pthread_create(&th, NULL, dl_thread_main, &args[i]));
        cp_port_block_begin(cp_server_port(dl->sv));
        WAIT_FOR(LOAD(&dl->set_ret[i]) != 0, IO_MS); /* set while this callback runs */
        usleep(LOAD(&dl->block_ms) * 1000u);
        cp_port_block_end(cp_server_port(dl->sv));
        CHECK_OK(-pthread_join(th, NULL));
        break;
    }
    }
}

static void dl_on_data(cp_conn *c, const void *data, size_t len)
{
    dlsrv *dl = cp_server_user(cp_conn_server(c));
    dlconn *u = cp_conn_user(c);
    dl_enter(dl, u);
    const uint8_t *d = data;
    for (size_t k = 0; k < len; k++) {
        if (!u->half) {
            CHECK(d[k] < DL_MAX);
            u->idx = d[k];
            u->half = 1;
        } else {
            u->half = 0;
            dl_command(dl, c, u->idx, d[k]);
        }
    }
    dl_leave(u);
}

static void dl_on_timeout(cp_conn *c, cp_close_reason reason)
{
    dlsrv *dl = cp_server_user(cp_conn_server(c));
    dlconn *u = cp_conn_user(c);
    dl_enter(dl, u);
    int64_t now = cpt_now_ns();
    if (reason != CP_CLOSE_DEADLINE || u->idx < 0) {
        ADD(&dl->bad_reason, 1);
    } else {
        int64_t zero = 0;
        __atomic_compare_exchange_n(&dl->fired_ns[u->idx], &zero, now, false, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST);
        ADD(&dl->fires[u->idx], 1);
    }
    if (!dl->keep)
        cp_conn_abort(c);
    dl_leave(u);
}

static void dl_on_close(cp_conn *c, cp_close_reason reason, int err)
{
    (void)err;
    dlsrv *dl = cp_server_user(cp_conn_server(c));
    dlconn *u = cp_conn_user(c);
    dl_enter(dl, u);
    if (u->idx >= 0) {
        STORE(&dl->close_reason[u->idx], (int32_t)reason);
        ADD(&dl->closes[u->idx], 1);
    }
    ADD(&dl->closes_all, 1);
    dl_leave(u);
}

static const cp_server_callbacks dl_callbacks = {.on_open = dl_on_open,
                                                 .on_data = dl_on_data,
                                                 .on_timeout = dl_on_timeout,
                                                 .on_close = dl_on_close};

static dlsrv *dl_start_linger(unsigned tick_ms, bool deadlines, unsigned threads,
                              unsigned linger_ms)
{
    dlsrv *dl = calloc(1, sizeof(*dl));
    CHECK(dl != NULL);
    cp_server_options o = {.bind = "127.0.0.1",
                           .linger_ms = linger_ms,
                           .threads = threads,
                           .tick_ms = tick_ms,
                           .conn_deadlines = deadlines,
                           .conn_user_size = sizeof(dlconn),
                           .user = dl};
    o.port_options.flags |= CP_PORT_QUIET;
    CHECK_OK(cp_server_create(&dl->sv, &o, &dl_callbacks));
    CHECK_OK(cp_server_start(dl->sv));
    dl->port = cp_server_listen_port(dl->sv);
    return dl;
}

__attribute__((unused)) static dlsrv *dl_start(unsigned tick_ms, bool deadlines, unsigned threads)
{
    return dl_start_linger(tick_ms, deadlines, threads, 0);
}

static void dl_cmd(int fd, int idx, char cmd)
{
    uint8_t m[2] = {(uint8_t)idx, (uint8_t)cmd};
    send_all(fd, m, 2);
}

__attribute__((unused)) static void dl_stop(dlsrv *dl)
{
    cp_server_shutdown(dl->sv, 1000);
    CHECK_EQ(LOAD(&dl->closes_all), LOAD(&dl->opens));
    CHECK_EQ(LOAD(&dl->overlap), 0);
    CHECK_EQ(LOAD(&dl->bad_reason), 0);
    cp_server_destroy(dl->sv);
    free(dl);
}

/* Milliseconds from the set call to the first firing. */
__attribute__((unused)) static double dl_elapsed_ms(dlsrv *dl, int i)
{
    return (double)(LOAD(&dl->fired_ns[i]) - LOAD(&dl->set_ns[i])) / 1e6;
}

/* A 1 s deadline with a 100 ms tick fires never before 1 s after the call, and well within
 * the documented bound after it (tick_ms + the sweep's lateness; 2.5 s here, so that a
 * loaded machine cannot fail it, while a deadline 3x late still does). The calls are spread
 * over the phases of the tick: a deadline rounded to the tick it was set in fires early
 * by up to one tick. */
TEST(deadline_fires_after_it_passes_and_not_before)
{
    enum { N = 10 };
    dlsrv *dl = dl_start(100, true, 2);
    int fds[N];
    for (int i = 0; i < N; i++) {
        STORE(&dl->ms[i], 1000);
        fds[i] = connect_to(dl->port);
    }
    for (int i = 0; i < N; i++) {
        dl_cmd(fds[i], i, 'D');
        usleep(13 * 1000); /* the next one in another phase of the tick */
    }
    for (int i = 0; i < N; i++)
        WAIT_FOR(LOAD(&dl->fired_ns[i]) != 0, IO_MS);
    int early = 0, late = 0;
    for (int i = 0; i < N; i++) {
        double e = dl_elapsed_ms(dl, i);
        fprintf(stderr, "deadline %d: 1000 ms asked, fired after %.1f ms\n", i, e);
        CHECK_EQ(LOAD(&dl->set_ret[i]), 1);
        early += e < 1000.0;
        late += e >= 2500.0;
    }
    CHECK_EQ(early, 0);
    CHECK_EQ(late, 0);
    for (int i = 0; i < N; i++) {
        expect_closed(fds[i], IO_MS); /* aborted by on_timeout */
        close(fds[i]);
        CHECK_EQ(LOAD(&dl->fires[i]), 1);
    }
    WAIT_FOR(LOAD(&dl->closes_all) == N, IO_MS);
    dl_stop(dl);
}

/* Cleared (0), a deadline never fires: checked once two deadlines set after the clear, one
 * at twice and one at four times its length, have fired (so sweeps well past it ran). */
TEST(deadline_cleared_never_fires)
{
    dlsrv *dl = dl_start(50, true, 2);
    dl->keep = true;
    STORE(&dl->ms[0], 300);
    STORE(&dl->ms[1], 600);
    STORE(&dl->ms[2], 1200);
    int a = connect_to(dl->port), b = connect_to(dl->port), c = connect_to(dl->port);
    dl_cmd(a, 0, 'D');
    WAIT_FOR(LOAD(&dl->set_ret[0]) != 0, IO_MS);
    dl_cmd(a, 0, 'C');
    WAIT_FOR(LOAD(&dl->set_ns[0]) != 0 && LOAD(&dl->set_ret[0]) == 1, IO_MS);
    usleep(10 * 1000);
    dl_cmd(b, 1, 'D');
    dl_cmd(c, 2, 'D');
    WAIT_FOR(LOAD(&dl->fires[1]) && LOAD(&dl->fires[2]), IO_MS);
    CHECK_EQ(LOAD(&dl->fires[0]), 0);
    /* A deadline on_timeout left standing does not fire again: it was used up. */
    CHECK_EQ(LOAD(&dl->fires[1]), 1);
    close(a);
    close(b);
    close(c);
    WAIT_FOR(LOAD(&dl->closes_all) == 3, IO_MS);
    CHECK_EQ(LOAD(&dl->fires[0]), 0);
    dl_stop(dl);
}

/* Without options.conn_deadlines: -EINVAL. A huge deadline (UINT_MAX ms, the natural
 * "forever") is taken as it is, or refused with -EINVAL, but never wraps to a deadline that
 * fires at the next tick; the same for one beyond 2^31 ticks (tick_ms 1). */
TEST(deadline_invalid_and_huge_values)
{
    dlsrv *off = dl_start(100, false, 1);
    STORE(&off->ms[0], 1000);
    int fd = connect_to(off->port);
    dl_cmd(fd, 0, 'D');
    WAIT_FOR(LOAD(&off->set_ret[0]) != 0, IO_MS);
    CHECK_EQ(LOAD(&off->set_ret[0]) - 1, -EINVAL);
    close(fd);
    WAIT_FOR(LOAD(&off->closes_all) == 1, IO_MS);
    dl_stop(off);

    static const unsigned ticks[2] = {100, 1};
    for (int k = 0; k < 2; k++) {
        dlsrv *dl = dl_start(ticks[k], true, 2);
        STORE(&dl->ms[0], UINT_MAX);
        STORE(&dl->ms[1], 0x80000000u);
        STORE(&dl->ms[2], UINT_MAX - 50);
        STORE(&dl->ms[3], 400); /* the marker: set after the others */
        int fds[4];
        for (int i = 0; i < 4; i++) {
            fds[i] = connect_to(dl->port);
            if (i == 3)
                WAIT_FOR(LOAD(&dl->set_ret[2]) != 0, IO_MS);
            dl_cmd(fds[i], i, 'D');
        }
        WAIT_FOR(LOAD(&dl->fires[3]) != 0, IO_MS);
        usleep(3 * ticks[k] * 1000);
        for (int i = 0; i < 3; i++) {
            int r = LOAD(&dl->set_ret[i]) - 1;
            fprintf(stderr, "tick %u ms, deadline %u ms: %d, fired %u times\n", ticks[k],
                    LOAD(&dl->ms[i]), r, LOAD(&dl->fires[i]));
            CHECK(r == 0 || r == -EINVAL);
            CHECK_EQ(LOAD(&dl->fires[i]), 0);
        }
        for (int i = 0; i < 4; i++)
            close(fds[i]);
        WAIT_FOR(LOAD(&dl->closes_all) == 4, IO_MS);
        dl_stop(dl);
    }
}

/* A connection record set up again while the sweep walks the slab: the sweep reads the
 * deadline of each live record it meets (then pins it only if its state is unchanged), and
 * the set-up cleared that word with a plain memset, a data race on a record freed and
 * reused in between (TSan, chaos stream_mix 1 run in ~100). Many short connections with a
 * 1 ms tick, every record's deadline read at each tick. */
static void *short_conns(void *arg)
{
    tsrv *t = arg;
    int n = (int)cpt_scaled(2000, 1500);
    for (int i = 0; i < n; i++) {
        int fd = connect_to(t->port);
        CHECK_EQ(try_exchange(fd, (uint32_t)i, 1 + (size_t)i % 64, cpt_now_ms() + IO_MS), 0);
        struct linger lg = {1, 0}; /* a reset: thousands of ports left in TIME_WAIT else */
        CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg));
        close(fd);
    }
    return NULL;
}

TEST(records_set_up_again_while_the_sweep_reads_their_deadlines)
{
    cp_server_options o = {.threads = 3, .conn_deadlines = true, .tick_ms = 1};
    tsrv *t = tsrv_new(ECHO_COPY);
    tsrv_start(t, &o);
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        CHECK_EQ(pthread_create(&th[i], NULL, short_conns, t), 0);
    for (int i = 0; i < 3; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    WAIT_FOR(LOAD(&t->closes) == LOAD(&t->opens), IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* A deadline set on a connection that is closing (gracefully, its replies held up by a
 * peer that does not read) does not fire: the close stands, with its own reason. */
TEST(deadline_on_a_closing_connection)
{
    dlsrv *dl = dl_start(20, true, 2);
    STORE(&dl->big, (size_t)8 << 20);
    STORE(&dl->ms[0], 50);
    STORE(&dl->ms[1], 500); /* the marker */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(fd >= 0);
    int small = 4096;
    CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small));
    struct sockaddr_in sa = loopback(dl->port);
    CHECK_OK(connect(fd, (struct sockaddr *)&sa, sizeof sa));
    int m = connect_to(dl->port);
    dl_cmd(fd, 0, 'X');
    WAIT_FOR(LOAD(&dl->set_ret[0]) != 0, IO_MS);
    dl_cmd(m, 1, 'D');
    WAIT_FOR(LOAD(&dl->fires[1]) != 0, IO_MS);
    CHECK_EQ(LOAD(&dl->fires[0]), 0);
    CHECK_EQ(LOAD(&dl->closes[0]), 0); /* still draining */
    /* Read everything: the close completes with its own reason. */
    static char sink[65536];
    ssize_t n;
    int64_t until = cpt_now_ms() + IO_MS;
    while ((n = recv(fd, sink, sizeof sink, 0)) > 0)
        CHECK(cpt_now_ms() < until);
    WAIT_FOR(LOAD(&dl->closes[0]) == 1, IO_MS);
    CHECK_EQ(LOAD(&dl->close_reason[0]), CP_CLOSE_LOCAL);
    CHECK_EQ(LOAD(&dl->fires[0]), 0);
    close(fd);
    close(m);
    WAIT_FOR(LOAD(&dl->closes_all) == 2, IO_MS);
    dl_stop(dl);
}

/* Set from another thread (holding a reference) while the connection's on_data runs: the
 * deadline holds (not before, within the bound) and on_timeout waits for on_data. */
TEST(deadline_set_from_another_thread_during_a_callback)
{
    dlsrv *dl = dl_start(20, true, 2);
    STORE(&dl->ms[0], 200);
    STORE(&dl->block_ms, 400); /* on_data still runs when the deadline passes */
    int fd = connect_to(dl->port);
    dl_cmd(fd, 0, 'T');
    WAIT_FOR(LOAD(&dl->fires[0]) != 0, IO_MS);
    double e = dl_elapsed_ms(dl, 0);
    fprintf(stderr, "deadline 200 ms set by another thread: fired after %.1f ms\n", e);
    CHECK_EQ(LOAD(&dl->set_ret[0]), 1);
    CHECK(e >= 400.0); /* after on_data returned */
    CHECK(e < 2500.0);
    CHECK_EQ(LOAD(&dl->overlap), 0);
    expect_closed(fd, IO_MS);
    close(fd);
    WAIT_FOR(LOAD(&dl->closes_all) == 1, IO_MS);
    dl_stop(dl);
}

/* A deadline passes while on_data runs, and on_data sets a new one before returning: the
 * sweep that found the old one due must not fire it after it was replaced, nor wipe the new
 * one (which would then never fire). */
TEST(deadline_replaced_while_the_sweep_waits_for_the_callback)
{
    dlsrv *dl = dl_start(20, true, 2);
    dl->keep = true;
    STORE(&dl->ms[0], 50);
    int fd = connect_to(dl->port);
    dl_cmd(fd, 0, 'D');
    WAIT_FOR(LOAD(&dl->set_ret[0]) != 0, IO_MS);
    STORE(&dl->ms[0], 600);
    STORE(&dl->block_ms, 300); /* the 50 ms deadline passes meanwhile */
    dl_cmd(fd, 0, 'B');
    int64_t until = cpt_now_ms() + 5000;
    while (!LOAD(&dl->fires[0]) && cpt_now_ms() < until)
        usleep(1000);
    CHECK(LOAD(&dl->fires[0]) != 0); /* the new deadline fired */
    double e = dl_elapsed_ms(dl, 0);
    fprintf(stderr, "deadline replaced by 600 ms: fired after %.1f ms\n", e);
    CHECK(e >= 500.0); /* the new one (the old one fired at once); "not before" is checked above */
    close(fd);
    WAIT_FOR(LOAD(&dl->closes_all) == 1, IO_MS);
    dl_stop(dl);
}

/* ---- cp_server_shutdown's deadline and the wall clock ---------------------------------------
 *
 * The wall clock can be stepped (NTP, date -s) at any moment; this process cannot step the
 * machine's clock, so the test interposes clock_gettime: while realtime_shift_s is set,
 * CLOCK_REALTIME reads that many seconds ahead, as it did before a step back by that much.
 * The monotonic clocks are untouched. */
#include <dlfcn.h>

static int64_t realtime_shift_s; /* atomic */

int clock_gettime(clockid_t id, struct timespec *ts)
{
    static int (*real)(clockid_t, struct timespec *);
    int (*f)(clockid_t, struct timespec *) = __atomic_load_n(&real, __ATOMIC_ACQUIRE);
    if (!f) {
        f = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
        if (!f)
            abort();
        __atomic_store_n(&real, f, __ATOMIC_RELEASE);
    }
    int r = f(id, ts);
    if (r == 0 && id == CLOCK_REALTIME)
        ts->tv_sec += (time_t)__atomic_load_n(&realtime_shift_s, __ATOMIC_RELAXED);
    return r;
}

typedef struct shut_arg {
    cp_server *sv;
    unsigned deadline_ms;
    int r;
    uint32_t done; /* atomic */
} shut_arg;

static void *shut_main(void *arg)
{
    shut_arg *a = arg;
    a->r = cp_server_shutdown(a->sv, a->deadline_ms);
    STORE(&a->done, 1);
    return NULL;
}

/* A shutdown with a 300 ms deadline cuts a connection whose replies cannot drain (its peer
 * does not read) at about 300 ms, also when the wall clock is stepped back an hour right
 * after the call read it: the deadline is a span of time, not a time of day. */
TEST(shutdown_deadline_ignores_wall_clock_steps)
{
    dlsrv *dl = dl_start_linger(20, false, 2, 60000);
    STORE(&dl->big, (size_t)8 << 20);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(fd >= 0);
    int small = 4096;
    CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small));
    struct sockaddr_in sa = loopback(dl->port);
    CHECK_OK(connect(fd, (struct sockaddr *)&sa, sizeof sa));
    dl_cmd(fd, 0, 'Q');
    WAIT_FOR(LOAD(&dl->set_ret[0]) != 0, IO_MS);
    shut_arg a = {.sv = dl->sv, .deadline_ms = 300};
    STORE(&realtime_shift_s, 3600);
    int64_t t0 = cpt_now_ms();
    pthread_t th;
    CHECK_OK(-pthread_create(&th, NULL, shut_main, &a));
    int64_t until = t0 + 5000;
    while (!LOAD(&a.done) && cpt_now_ms() < until)
        usleep(1000);
    STORE(&realtime_shift_s, 0);
    int64_t took = cpt_now_ms() - t0;
    fprintf(stderr, "shutdown(300 ms) with the wall clock an hour ahead: %s after %lld ms\n",
            LOAD(&a.done) ? "returned" : "still waiting", (long long)took);
    CHECK(LOAD(&a.done)); /* a wall-clock deadline waits an hour (here: until linger_ms) */
    CHECK_OK(-pthread_join(th, NULL));
    CHECK_EQ(a.r, -ETIMEDOUT);
    CHECK(took >= 300);
    close(fd);
    CHECK_EQ(LOAD(&dl->closes_all), LOAD(&dl->opens));
    cp_server_destroy(dl->sv);
    free(dl);
}

/* server.h: a timeout fires no earlier than (timeout - tick_ms) after its start. A long
 * linger_ms (4.5 hours) must not change that for a 1 s handshake timeout: the ticks are
 * 16-bit, and cp_server_create lengthened the tick so that the longest of the three fit (to
 * 1001 ms here), so the handshake timeout fired anywhere from ~0 to 1 s after the accept
 * (one lengthened tick, in the phase of the sweep timer). Connections spread over a
 * second; each must close no earlier than 990 ms (985: idle_timeout's slack). */
TEST(a_long_linger_does_not_make_timeouts_early)
{
    enum { N = 8, HS = 1000, TICK = 10 };
    cp_server_options o = {
        .threads = 2, .handshake_timeout_ms = HS, .tick_ms = TICK, .linger_ms = 16384000};
    tsrv *t = tsrv_new(ECHO_NONE);
    tsrv_start(t, &o);
    int fds[N];
    int64_t at[N];
    for (int i = 0; i < N; i++) {
        at[i] = cpt_now_ms();
        fds[i] = connect_to(t->port);
        usleep(130 * 1000);
    }
    int64_t earliest = INT64_MAX;
    for (int i = 0; i < N; i++) {
        int64_t closed = wait_peer_close(fds[i], cpt_now_ms() + IO_MS, NULL);
        CHECK(closed >= 0);
        if (closed - at[i] < earliest)
            earliest = closed - at[i];
        close(fds[i]);
    }
    fprintf(stderr, "handshake timeout %d ms, tick %d ms: earliest close after %lld ms\n", HS, TICK,
            (long long)earliest);
    CHECK(earliest >= HS - TICK - 5); /* the slack idle_timeout allows (ms clocks) */
    WAIT_FOR(LOAD(&t->closes) == N, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* Callbacks run on the server's worker threads. A cp_conn_send_file() from
 * another thread that loses the race with the connection's close must not run on_close on
 * the caller's thread, inside the call (an application holding its own lock around the
 * call, which on_close also takes, would deadlock). With CPORT_INJECT the sender pauses
 * 300 ms after taking its reference while the peer's end closes the connection. */
#ifdef CPORT_INJECT
static void *send_file_thread_marked(void *arg)
{
    file_sender *f = arg;
    tsrv *t = tsrv_of(f->c);
    t->shutdown_caller = pthread_self(); /* reusing the "on_close ran on this thread" count */
    STORE(&t->shutdown_caller_set, 1);
    return send_file_thread(arg);
}
#endif

TEST(send_file_losing_to_the_close_runs_no_callback_on_the_caller)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    CHECK_OK(setenv("CPORT_INJECT_DELAY", "send_file_ref:300000", 1)); /* before any thread */
    file_sender f;
    tsrv *t = send_file_race(&f, send_file_thread_marked);
    fprintf(stderr, "cp_conn_send_file: %d; on_close on the sender's thread: %llu\n", f.result,
            (unsigned long long)LOAD(&t->closes_on_caller));
    CHECK_EQ(LOAD(&t->closes_on_caller), 0);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
    close(f.fd);
#endif
}

/* About a million sends queued on one connection fill its operation references: the next
 * send is refused with -ENOBUFS (conn_send's and cp_conn_send_file's guard). With fail
 * point sends_max_16 the limit is 16 references. The peer reads nothing, so a first large
 * send stays queued and every later one queues behind it: each holds a reference until
 * its completion is handled. A refused send fails at submission and never completes (no
 * on_sent, none of its bytes sent); once the peer reads, everything accepted arrives in
 * order and the connection takes sends again. */
#ifdef CPORT_INJECT
enum { FULL_BIG = 1 << 20, FULL_MSG = 64, FULL_MAX = 64 };

typedef struct sends_full {
    cp_conn *c;                /* held by on_open's cp_conn_ref */
    uint64_t sent[FULL_MAX];   /* atomic: on_sent per send, by index */
    int64_t result[FULL_MAX];  /* on_sent's result */
    uint64_t sent_all, closes; /* atomic */
} sends_full;

/* The operation references c holds. */
static uint64_t sends_oprefs(cp_conn *c)
{
    return (LOAD(&c->state) & CS_OPREF_MASK) / CS_OPREF;
}

static int sends_full_on_open(cp_conn *c)
{
    sends_full *k = cp_server_user(cp_conn_server(c));
    int small = 4096;
    CHECK_OK(cp_conn_setsockopt(c, SOL_SOCKET, SO_SNDBUF, &small, sizeof small));
    cp_conn_ref(c);
    STORE(&k->c, c);
    return 0;
}

static void sends_full_on_sent(cp_conn *c, void *ctx, int64_t result)
{
    sends_full *k = cp_server_user(cp_conn_server(c));
    uintptr_t i = (uintptr_t)ctx - 1;
    k->result[i] = result;
    ADD(&k->sent[i], 1);
    ADD(&k->sent_all, 1);
}

static void sends_full_on_close(cp_conn *c, cp_close_reason reason, int err)
{
    (void)reason;
    (void)err;
    sends_full *k = cp_server_user(cp_conn_server(c));
    ADD(&k->closes, 1);
}

/* Read exactly len bytes from fd into buf (deadline: IO_MS). */
static void read_n(int fd, uint8_t *buf, size_t len)
{
    int64_t deadline = cpt_now_ms() + IO_MS;
    size_t got = 0;
    while (got < len) {
        ssize_t r = recv(fd, buf + got, len - got, MSG_DONTWAIT);
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        CHECK(r < 0 && errno == EAGAIN); /* not the end */
        CHECK(wait_fd(fd, POLLIN, deadline));
    }
}
#endif

TEST(a_send_past_the_reference_limit_is_refused_and_the_connection_goes_on)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan): a million "
         "queued sends otherwise");
#else
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "sends_max_16", 1)); /* before any thread */
    static sends_full k;
    memset(&k, 0, sizeof k);
    cp_server_callbacks cb = {.on_open = sends_full_on_open,
                              .on_data = ignore_data,
                              .on_sent = sends_full_on_sent,
                              .on_close = sends_full_on_close};
    cp_server_options o = {.bind = "127.0.0.1", .threads = 2, .user = &k};
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_start(sv));
    int fd = sock_nb();
    int small = 4096;
    CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small));
    struct sockaddr_in sa = loopback(cp_server_listen_port(sv));
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EINPROGRESS);
    CHECK(wait_fd(fd, POLLOUT, cpt_now_ms() + IO_MS));
    WAIT_FOR(LOAD(&k.c) != NULL, IO_MS);
    cp_conn *c = LOAD(&k.c);
    WAIT_FOR(sends_oprefs(c) == 2, IO_MS); /* its life and its receive */

    /* The stream: FULL_BIG bytes, then FULL_MSG per send; send i (from 1) is byte i. */
    static uint8_t big[FULL_BIG], msgs[FULL_MAX][FULL_MSG];
    for (size_t i = 0; i < FULL_BIG; i++)
        big[i] = (uint8_t)(i * 7 + 1);
    for (int i = 0; i < FULL_MAX; i++)
        memset(msgs[i], i, FULL_MSG);
    CHECK_OK(cp_conn_send_ref(c, big, FULL_BIG, (void *)(uintptr_t)1));
    int n = 1, refused = 0;
    for (; n < FULL_MAX - 1; n++) {
        uint64_t before = sends_oprefs(c);
        int r = cp_conn_send_ref(c, msgs[n], FULL_MSG, (void *)(uintptr_t)(n + 1));
        if (r == -ENOBUFS) {
            CHECK_EQ(before, 16); /* refused at the limit, not before */
            CHECK_EQ(sends_oprefs(c), 16);
            refused = n;
            break;
        }
        CHECK_OK(r);
        CHECK_EQ(sends_oprefs(c), before + 1); /* queued: nothing completes while the peer waits */
    }
    CHECK_EQ(refused, 16 - 2); /* 2 + the big send + 13 small ones = 16 */
    /* The other sends at the limit too: a copy, and a file (op_ref_unless_closing). */
    CHECK_EQ(cp_conn_send(c, msgs[0], FULL_MSG), -ENOBUFS);
    int file = cpt_memfd("file");
    CHECK_EQ(write(file, msgs[0], FULL_MSG), (ssize_t)FULL_MSG);
    CHECK_EQ(cp_conn_send_file(c, NULL, 0, file, 0, FULL_MSG, (void *)(uintptr_t)FULL_MAX),
             -ENOBUFS);
    CHECK_EQ(sends_oprefs(c), 16);
    CHECK_EQ(cp_conn_pending(c) <= FULL_BIG + (size_t)(refused - 1) * FULL_MSG, 1);

    /* The peer reads: the big send, then sends 1 .. refused-1, and nothing else. */
    static uint8_t got[FULL_BIG];
    read_n(fd, got, FULL_BIG);
    CHECK_EQ(memcmp(got, big, FULL_BIG), 0);
    for (int i = 1; i < refused; i++) {
        read_n(fd, got, FULL_MSG);
        CHECK_EQ(memcmp(got, msgs[i], FULL_MSG), 0);
    }
    WAIT_FOR(LOAD(&k.sent_all) == (uint64_t)refused, IO_MS);
    WAIT_FOR(sends_oprefs(c) == 2, IO_MS);
    CHECK_EQ(LOAD(&k.sent[0]), 1);
    CHECK_EQ(k.result[0], FULL_BIG);
    for (int i = 1; i < refused; i++) {
        CHECK_EQ(LOAD(&k.sent[i]), 1);
        CHECK_EQ(k.result[i], FULL_MSG);
    }
    CHECK_EQ(LOAD(&k.sent[refused]), 0); /* the refused one never completes */

    /* It goes on: a send, a copy and a file, in order. */
    CHECK_OK(cp_conn_send_ref(c, msgs[refused], FULL_MSG, (void *)(uintptr_t)(refused + 1)));
    CHECK_OK(cp_conn_send(c, msgs[refused + 1], FULL_MSG));
    CHECK_OK(cp_conn_send_file(c, NULL, 0, file, 0, FULL_MSG, (void *)(uintptr_t)FULL_MAX));
    read_n(fd, got, FULL_MSG);
    CHECK_EQ(memcmp(got, msgs[refused], FULL_MSG), 0);
    read_n(fd, got, FULL_MSG);
    CHECK_EQ(memcmp(got, msgs[refused + 1], FULL_MSG), 0);
    read_n(fd, got, FULL_MSG);
    CHECK_EQ(memcmp(got, msgs[0], FULL_MSG), 0);
    WAIT_FOR(LOAD(&k.sent_all) == (uint64_t)refused + 2, IO_MS);
    CHECK_EQ(LOAD(&k.sent[refused]), 1);
    CHECK_EQ(LOAD(&k.sent[FULL_MAX - 1]), 1);
    CHECK_EQ(k.result[FULL_MAX - 1], FULL_MSG);
    CHECK_EQ(LOAD(&k.closes), 0);

    cp_conn_unref(c);
    close(fd);
    CHECK_EQ(cp_server_shutdown(sv, 1000), 0);
    CHECK_EQ(LOAD(&k.closes), 1);
    CHECK_OK(cp_server_destroy(sv));
    close(file);
    unsetenv("CPORT_INJECT_FAIL");
#endif
}

/* recv_buffer may be any page multiple up to 64 KiB (8 KiB, 12 KiB, ...);
 * receive buffers come from the size class that fits (16 KiB) but were given back by
 * recv_buffer's size, which matches no class: free() on lookaside memory. Both ways: the
 * connection's own buffer at close, and a buffer kept by a large reply (a hold). */
TEST(receive_buffers_between_size_classes)
{
    static const uint32_t sizes[] = {8192, 12288, 32768};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        cp_server_options o = {.threads = 2, .recv_buffer = sizes[k]};
        tsrv *t = tsrv_new(ECHO_DATA); /* replies above 4 KiB keep the received buffer */
        t->sndbuf = 4096;
        tsrv_start(t, &o);
        int fd = connect_to(t->port);
        exchange(fd, 1, 1 << 20);
        close(fd);
        WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
        CHECK_EQ(tsrv_stop(t, 1000), 0);
    }
}

/* With backpressure, memory per connection stays bounded by about 4 times the cap plus one
 * receive (README). A reply of just over 4 KiB taken from each
 * received 64 KiB buffer (cp_conn_send_data) keeps the whole buffer: the queued bytes the
 * cap counts are a 16th of the memory kept. */
static void reply_a_slice(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)u;
    size_t n = len < 4097 ? len : 4097;
    note_send(t, cp_conn_send_data(c, data, n));
}

TEST(backpressure_bounds_memory_with_slices_of_big_buffers)
{
    enum { CAP = 1 << 20, CHUNK = 65536 };
    cp_server_options o = {.threads = 1, .recv_buffer = 65536, .max_pending_send = CAP};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hook = reply_a_slice;
    t->sndbuf = 4096;
    tsrv_start(t, &o);
    int fd = sock_nb();
    int small = 4096;
    CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small));
    struct sockaddr_in sa = loopback(t->port);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EINPROGRESS);
    CHECK(wait_fd(fd, POLLOUT, cpt_now_ms() + IO_MS));
    uint64_t heap0 = heap_in_use(), alloc0 = tsrv_stats(t).allocations;
    uint8_t *tx = calloc(1, CHUNK);
    CHECK(tx != NULL);
    uint64_t sent = 0;
    /* Until the server has stopped reading (paused, and nothing taken for 500 ms): a slow
     * server thread does not end the loop early. */
    for (int64_t until = cpt_now_ms() + 20000;;) {
        ssize_t w = send(fd, tx, CHUNK, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            sent += (uint64_t)w;
            continue;
        }
        CHECK(errno == EAGAIN);
        if (!wait_fd(fd, POLLOUT, cpt_now_ms() + 500) &&
            (tsrv_stats(t).backpressure_events > 0 || cpt_now_ms() > until))
            break;
    }
    cp_server_stats st = tsrv_stats(t);
    fprintf(stderr,
            "sent %llu KiB, server read %llu KiB; queued at most %llu KiB (cap %d KiB); "
            "allocations %llu -> %llu; heap +%lld KiB\n",
            (unsigned long long)(sent >> 10), (unsigned long long)(st.bytes_in >> 10),
            (unsigned long long)(LOAD(&t->max_pending) >> 10), CAP >> 10,
            (unsigned long long)alloc0, (unsigned long long)st.allocations,
            (long long)(heap_in_use() - heap0) / 1024);
    CHECK(st.backpressure_events > 0);
    /* The lookaside grew (1 MiB chunks) by what the queued replies keep: a few times the
     * cap at most (a copy rounds up to its size class), not 16 times. (Each slab's first
     * chunk is mapped at creation: alloc0.) */
    CHECK(st.allocations - alloc0 <= 4 * (CAP >> 20) + 6);
    close(fd);
    free(tx);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* cp_server_start() failing to start its ticker (out of memory, or no thread
 * for the timers) must not leave the listener behind: its descriptor leaked, and the port
 * stayed bound and listening (a retry on it got -EADDRINUSE). Failure point
 * "server_ticker" (CPORT_INJECT builds). */
TEST(a_failed_start_leaves_no_listener)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "server_ticker", 1)); /* before any thread */
    int fds0 = cpt_count_fds();
    cp_server_options o = {.threads = 1, .bind = "127.0.0.1"};
    o.port_options.flags |= CP_PORT_QUIET;
    cp_server_callbacks cb = {.on_data = ignore_data};
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    int fds1 = cpt_count_fds();
    CHECK(cp_server_start(sv) < 0);
    int fds2 = cpt_count_fds();
    cp_server_destroy(sv);
    int fds3 = cpt_count_fds();
    fprintf(stderr, "descriptors: %d before, %d created, %d after the failed start, %d destroyed\n",
            fds0, fds1, fds2, fds3);
    CHECK_EQ(fds2, fds1);
    CHECK_EQ(fds3, fds0);
#endif
}

/* Closing a connection must not need memory: when its close context cannot be had (failure
 * point close_ctx: the sends slab has no chunk and none can be mapped, as when the address
 * space is full of the receive buffers of the very connections that want to close), the
 * close used to wait for the next tick's retry, which failed the same way for ever: the
 * connections never closed, their memory was never given back, and cp_server_shutdown()
 * waited for them without end. More connections than the server keeps spare close
 * contexts, closed by their peers; then more, left to the shutdown. */
TEST(connections_close_without_memory_for_a_close_context)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    enum { N = 40, WAIT_MS = 10000 };
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "close_ctx", 1)); /* before any thread */
    cp_server_options o = {.threads = 2, .tick_ms = 20};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int fds[N];
    for (int i = 0; i < N; i++) {
        fds[i] = connect_to(t->port);
        exchange(fds[i], (uint32_t)i, 100);
    }
    for (int i = 0; i < N; i++)
        close(fds[i]);
    WAIT_FOR(LOAD(&t->closes) == N, WAIT_MS);
    CHECK_EQ(tsrv_stats(t).conns_open, 0);
    /* The shutdown closes these: it returns, within its deadline. */
    for (int i = 0; i < N; i++) {
        fds[i] = connect_to(t->port);
        exchange(fds[i], (uint32_t)i, 100);
    }
    CHECK_EQ(tsrv_stop(t, WAIT_MS), 0);
    for (int i = 0; i < N; i++)
        close(fds[i]);
#endif
}

/* A graceful close with 1.5 MiB of replies queued to a peer that reads slowly but steadily
 * through a small receive window, for longer than linger_ms: the replies all arrive, then the
 * end of the stream (with plain sends this holds here; server.h's linger_ms tells where Linux's
 * TCP_USER_TIMEOUT cuts such a peer all the same). */
static void send_lots_slowly_read_then_close(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data,
                                             size_t len)
{
    (void)t;
    (void)u;
    (void)data;
    (void)len;
    static uint8_t block[65536];
    for (size_t i = 0; i < sizeof(block); i++)
        block[i] = (uint8_t)(i * 7 + 1);
    for (int i = 0; i < 24; i++)
        CHECK_OK(cp_conn_send(c, block, sizeof(block)));
    cp_conn_close(c);
}

TEST(graceful_close_to_a_slow_reader_delivers_everything)
{
    /* linger_ms leaves room for a stalled test thread (its window stays shut meanwhile);
     * the reading takes longer. */
    cp_server_options o = {.threads = 2, .linger_ms = 2500, .max_pending_send = 8 << 20};
    tsrv *t = tsrv_new(ECHO_DATA);
    t->hook = send_lots_slowly_read_then_close;
    t->sndbuf = 4 << 20; /* (capped by wmem_max) replies reach the kernel early: it lingers */
    tsrv_start(t, &o);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int small = 4096;
    CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)));
    struct sockaddr_in sa = loopback(t->port);
    CHECK_OK(connect(fd, (struct sockaddr *)&sa, sizeof sa));
    CHECK_EQ(send(fd, "x", 1, MSG_NOSIGNAL), 1);
    uint64_t got = 0;
    bool ok = true;
    int64_t t0 = cpt_now_ms();
    uint8_t buf[4096];
    ssize_t k;
    /* About 400 KB/s: 4 KiB every 10 ms; 1.5 MiB in ~3.9 s, past linger_ms. */
    while ((k = recv(fd, buf, sizeof(buf), 0)) > 0) {
        for (ssize_t i = 0; i < k; i++)
            ok = ok && buf[i] == (uint8_t)((got + (uint64_t)i) % 65536 * 7 + 1);
        got += (uint64_t)k;
        usleep(10000);
    }
    fprintf(stderr, "%llu of %d bytes in %lld ms, then %s\n", (unsigned long long)got, 24 << 16,
            (long long)(cpt_now_ms() - t0), k == 0 ? "EOF" : strerror(errno));
    CHECK_EQ(k, 0);
    CHECK_EQ(got, 24u << 16);
    CHECK(ok);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_LOCAL]), 1);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* A graceful close whose replies the peer does not take is aborted once nothing has been
 * acknowledged for linger_ms, and the peer must learn that its stream was cut: a reset.
 * Linux's TCP_USER_TIMEOUT, which alone bounded such a close, gives up without one
 * (tcp_write_err), and so does an orphaned socket; a peer waiting to read then never hears
 * of the connection again (a chaos run: a slow client got 9132 of 11869 bytes, then nothing
 * for 60 s). The peer here has a 4 KiB receive buffer, reads nothing and sends nothing after
 * its request, so nothing of its own can draw a reset from a socket the server's kernel
 * dropped: the reset must come from the server, unprompted, within a bound (about
 * linger_ms plus a zero-window probe and a tick or two here); then the stream ends in
 * ECONNRESET, not in an end of stream. Three stages of the close: replies still queued in the
 * server; all of them in the kernel, behind the FIN of cp_conn_close(); all of them in the
 * kernel after the peer's own end (CP_CLOSE_PEER). A peer that reads everything gets every
 * byte, then the end. */
typedef struct cut_case {
    size_t reply;   /* bytes on_data queues for the request */
    bool close;     /* ...then cp_conn_close() */
    bool peer_ends; /* the peer ends its side after the request (the server closes then) */
    int sndbuf;     /* the server socket's SO_SNDBUF */
} cut_case;

static void reply_cut_case(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)u;
    (void)data;
    (void)len;
    const cut_case *k = t->ctx;
    static uint8_t block[65536];
    for (size_t i = 0; i < sizeof block; i++)
        block[i] = (uint8_t)(i * 13 + 5);
    for (size_t sent = 0; sent < k->reply; sent += sizeof block)
        CHECK_OK(cp_conn_send(c, block, sizeof block));
    if (k->close)
        cp_conn_close(c);
}

/* linger_ms leaves room for the reading peer's thread to stall on a loaded machine. */
enum { CUT_LINGER_MS = 1000, CUT_RESET_MS = 5000 };

/* Connect a peer that takes at most a few KiB, send the request (and the end): the server
 * replies, and closes. */
/* Wait up to limit_ms, without reading, for fd's connection to be reset: an error or a
 * hang-up, nothing else, can come. Then read what it holds up to its end (*got bytes;
 * *how: 0 = EOF, else the errno that ended it; -1 = not read). True if it was an error. */
static bool wait_for_reset(int fd, int64_t limit_ms, int64_t *took, size_t *got, int *how)
{
    int64_t t0 = cpt_now_ms();
    struct pollfd p = {.fd = fd, .events = 0};
    int r = 0;
    while (r == 0 && cpt_now_ms() - t0 < limit_ms) {
        r = poll(&p, 1, 20);
        CHECK(r >= 0 || errno == EINTR);
    }
    *took = cpt_now_ms() - t0;
    if (r > 0)
        read_to_close(fd, cpt_now_ms() + IO_MS, got, how);
    return r > 0 && (p.revents & POLLERR);
}

static const char *how_str(int how)
{
    return how < 0 ? "-" : how == 0 ? "EOF" : strerror(how);
}

static int cut_peer(tsrv *t, const cut_case *k)
{
    int fd = connect_not_reading(t->port);
    CHECK_EQ(send(fd, "x", 1, MSG_NOSIGNAL), 1);
    if (k->peer_ends)
        CHECK_OK(shutdown(fd, SHUT_WR));
    return fd;
}

/* A started test server that answers each peer's request as k says, lingering
 * CUT_LINGER_MS on a graceful close. */
static tsrv *cut_server(const cut_case *k)
{
    cp_server_options o = {.threads = 2, .linger_ms = CUT_LINGER_MS, .max_pending_send = 8 << 20};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hook = reply_cut_case;
    t->ctx = (void *)k;
    t->sndbuf = k->sndbuf;
    tsrv_start(t, &o);
    return t;
}

static void graceful_close_cut(const cut_case *k, cp_close_reason reason)
{
    tsrv *t = cut_server(k);
    int fd = cut_peer(t, k);
    size_t got = 0;
    int how = -1;
    int64_t took;
    bool reset = wait_for_reset(fd, CUT_RESET_MS, &took, &got, &how);
    fprintf(stderr, "peer that reads nothing: %s after %lld ms (%zu bytes held, then %s)\n",
            reset ? "reset" : "no reset", (long long)took, got, how_str(how));
    CHECK(reset);
    CHECK_EQ(how, ECONNRESET);
    CHECK(got < k->reply);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[reason]), 1);
    /* A peer that reads gets all of it, then the end. */
    int fd2 = cut_peer(t, k);
    how = -1;
    CHECK(read_to_close(fd2, cpt_now_ms() + IO_MS, &got, &how) >= 0);
    CHECK_EQ(how, 0);
    CHECK_EQ(got, k->reply);
    WAIT_FOR(LOAD(&t->closes) == 2, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[reason]), 2);
    close(fd);
    close(fd2);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(graceful_close_resets_a_peer_that_takes_nothing_with_replies_queued)
{
    /* 4 MiB through a 4 KiB send buffer: the replies stay queued in the server. */
    static const cut_case k = {.reply = 4 << 20, .close = true, .sndbuf = 4096};
    graceful_close_cut(&k, CP_CLOSE_LOCAL);
}

TEST(graceful_close_resets_a_peer_that_takes_nothing_after_the_fin)
{
    /* 256 KiB into a 1 MiB send buffer: all in the kernel, the FIN behind them. */
    static const cut_case k = {.reply = 256 << 10, .close = true, .sndbuf = 1 << 20};
    graceful_close_cut(&k, CP_CLOSE_LOCAL);
}

TEST(graceful_close_resets_a_peer_that_takes_nothing_after_its_end)
{
    static const cut_case k = {.reply = 256 << 10, .peer_ends = true, .sndbuf = 1 << 20};
    graceful_close_cut(&k, CP_CLOSE_PEER);
}

/* The other half of a stalled close: the peer vanishes (its host goes away, a route or a
 * middlebox drops its traffic), so the replies are lost on the way, nothing is acknowledged,
 * and the kernel retransmits them (tcpi_retransmits, and tcpi_backoff with it). No netem
 * here (nor on every CI kernel), and no namespace or privilege needed: the peer's socket
 * takes a classic BPF filter that drops every segment reaching it but a reset. The server's
 * segments are lost after they left it (dropped before the peer's TCP sees them: nothing is
 * acknowledged), and the peer can tell the reset the sweep must send from the kernel's
 * silent end (TCP_USER_TIMEOUT, the backstop). */
static void vanish(int fd)
{
    /* The filter sees the TCP header: its flags are byte 13, RST 0x04. */
    static struct sock_filter only_resets[] = {
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 13),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, 0x04, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, 0xffffffff),
        BPF_STMT(BPF_RET | BPF_K, 0),
    };
    struct sock_fprog prog = {.len = sizeof only_resets / sizeof only_resets[0],
                              .filter = only_resets};
    CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog));
}

/* A peer whose segments from the server are all lost from its request on: the server
 * replies and closes (both stages, as above); the reset must come about linger_ms after
 * (once the first retransmission tells the kernel is stalled), not before, and well before
 * the backstop. (A peer that first reads slowly for a while, then vanishes, does not test
 * this half on loopback: a slow reader keeps the window shut, and the loss is seen through
 * window probes, tcpi_backoff alone.) */
static void graceful_close_lost(const cut_case *k)
{
    tsrv *t = cut_server(k);
    int64_t backstop = t->sv->linger_backstop_ms, tick = t->sv->tick_ms;
    int fd = connect_not_reading(t->port);
    vanish(fd);
    CHECK_EQ(send(fd, "x", 1, MSG_NOSIGNAL), 1);
    /* Waits past the backstop, which ends the connection without a reset. */
    size_t got = 0;
    int how = -1;
    int64_t took;
    bool reset = wait_for_reset(fd, backstop + CUT_RESET_MS, &took, &got, &how);
    fprintf(stderr,
            "peer whose segments are lost: %s after %lld ms (linger %d ms, backstop %lld ms; "
            "%zu bytes got through, then %s)\n",
            reset ? "reset" : "no reset", (long long)took, CUT_LINGER_MS, (long long)backstop, got,
            how_str(how));
    CHECK(reset);
    CHECK_EQ(how, ECONNRESET);
    CHECK_EQ(got, 0);
    /* Not before linger_ms (the stamp is taken at a tick, rounded down), nor at the
     * backstop. */
    CHECK(took >= CUT_LINGER_MS - tick);
    CHECK(took < backstop);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_LOCAL]), 1);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(graceful_close_resets_a_peer_that_vanished_with_replies_queued)
{
    static const cut_case k = {.reply = 4 << 20, .close = true, .sndbuf = 4096};
    graceful_close_lost(&k);
}

TEST(graceful_close_resets_a_peer_that_vanished_after_the_fin)
{
    static const cut_case k = {.reply = 256 << 10, .close = true, .sndbuf = 1 << 20};
    graceful_close_lost(&k);
}

/* The replies were stalled already when the close began: the peer vanished, or stopped
 * reading, seconds before the server shut down. The close set TCP_USER_TIMEOUT (the
 * backstop, linger_ms + 3 ticks + 2 s here), which the kernel counts from its first
 * retransmission or window probe, long before: at its next one it dropped the connection
 * silently, before the sweep's reset (linger_ms after the close), and the peer never
 * heard of it (a peer stalled 2.9 s, or 6 s while not reading, got no reset; 2.5 s or 7 s
 * did: it depends on where the kernel's backed-off timer falls). Peers stalled for
 * 0 to 6 s, 125 ms apart, then the shutdown: each one must get a reset. */
enum { STALLED_PEERS = 48, STALLED_STEP_MS = 125 };

static void shutdown_resets_stalled_peers(bool lost)
{
    static const cut_case k = {.reply = 256 << 10, .sndbuf = 4096}; /* replies stay queued */
    tsrv *t = cut_server(&k);
    int fds[STALLED_PEERS];
    int64_t since[STALLED_PEERS];
    for (int i = 0; i < STALLED_PEERS; i++) {
        fds[i] = connect_not_reading(t->port);
        if (lost)
            vanish(fds[i]);
        since[i] = cpt_now_ms();
        CHECK_EQ(send(fds[i], "x", 1, MSG_NOSIGNAL), 1);
        usleep(STALLED_STEP_MS * 1000);
    }
    WAIT_FOR(LOAD(&t->opens) == STALLED_PEERS, IO_MS);
    int64_t t0 = cpt_now_ms();
    /* The deadline is far: only the sweep, or the kernel, ends these. */
    CHECK_EQ(tsrv_stop(t, 4 * CUT_RESET_MS), 0);
    int64_t took = cpt_now_ms() - t0;
    int silent = 0;
    for (int i = 0; i < STALLED_PEERS; i++) {
        int how = -1;
        struct pollfd p = {.fd = fds[i], .events = 0};
        /* The reset was sent before the shutdown returned; loopback delivers it at once. */
        if (poll(&p, 1, 1000) == 1 && (p.revents & POLLERR))
            read_to_close(fds[i], cpt_now_ms() + IO_MS, NULL, &how);
        if (how != ECONNRESET) {
            fprintf(stderr, "peer stalled %lld ms before the shutdown: no reset\n",
                    (long long)(t0 - since[i]));
            silent++;
        }
        close(fds[i]);
    }
    fprintf(stderr, "shutdown took %lld ms; %d of %d peers got no reset\n", (long long)took, silent,
            STALLED_PEERS);
    CHECK_EQ(silent, 0);
}

TEST(shutdown_resets_peers_that_vanished_before_it)
{
    shutdown_resets_stalled_peers(true);
}

TEST(shutdown_resets_peers_that_stopped_reading_before_it)
{
    shutdown_resets_stalled_peers(false);
}

/* cp_server_start() called a second time on a started server: it opened and bound a
 * second listener, associated it over the first one's cp_socket while that one's accepts
 * were outstanding, and started a second ticker; it returned 0. The first listener's
 * descriptor was never closed (still listening after cp_server_destroy). It is refused
 * with -EALREADY, and so is a start after cp_server_shutdown(). */
TEST(a_second_start_is_refused)
{
    int fds0 = cpt_count_fds();
    cp_server_options o = {.threads = 1, .bind = "127.0.0.1"};
    o.port_options.flags |= CP_PORT_QUIET;
    cp_server_callbacks cb = {.on_data = ignore_data};
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_start(sv));
    uint16_t port = cp_server_listen_port(sv);
    int fds1 = cpt_count_fds();
    CHECK_EQ(cp_server_start(sv), -EALREADY);
    CHECK_EQ(cpt_count_fds(), fds1);
    CHECK_EQ(cp_server_listen_port(sv), port);
    CHECK_EQ(cp_server_shutdown(sv, 1000), 0);
    CHECK_EQ(cp_server_start(sv), -EALREADY);
    cp_server_destroy(sv);
    CHECK_EQ(cpt_count_fds(), fds0);
}

/* Every descriptor the library opens is close-on-exec — the port's ring or epoll instance
 * and its eventfd, the listener, accepted sockets, TransmitFile's pipes (io_uring) — so a
 * server that starts another program leaks none of them into it (see port.h on fork). */
static void mark_open_fds(bool *open, int cap)
{
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL);
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] != '.' && fd != dirfd(d) && fd < cap)
            open[fd] = true;
    }
    closedir(d);
}

TEST(descriptors_are_close_on_exec)
{
    enum { CAP = 4096 };
    static bool before[CAP], after[CAP];
    memset(before, 0, sizeof before);
    memset(after, 0, sizeof after);
    int file = cpt_memfd("file");
    uint8_t page[4096];
    pattern_fill(5, 0, page, sizeof page);
    CHECK_EQ(write(file, page, sizeof page), (ssize_t)sizeof page);
    mark_open_fds(before, CAP);
    tsrv *t = tsrv_new(ECHO_DATA);
    t->hold_refs = true;
    cp_server_options o = {.threads = 2};
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    exchange(fd, 1, 100);
    pthread_mutex_lock(&t->lock);
    cp_conn *c = t->nheld ? t->held[0] : NULL;
    pthread_mutex_unlock(&t->lock);
    CHECK(c != NULL);
    uint64_t *block = malloc(sizeof(uint64_t)); /* t_on_sent's context: the expected result */
    CHECK(block != NULL);
    block[0] = sizeof page;
    CHECK_OK(cp_conn_send_file(c, NULL, 0, file, 0, sizeof page, block));
    uint8_t got[sizeof page];
    recv_all(fd, got, sizeof got);
    CHECK(memcmp(got, page, sizeof page) == 0);
    WAIT_FOR(LOAD(&t->ref_sent_ok) == 1, IO_MS);
    mark_open_fds(after, CAP);
    int created = 0;
    for (int i = 0; i < CAP; i++) {
        if (!after[i] || before[i] || i == fd)
            continue;
        created++;
        int flags = fcntl(i, F_GETFD);
        if (flags < 0 || !(flags & FD_CLOEXEC)) {
            char path[64], target[256] = "?";
            snprintf(path, sizeof path, "/proc/self/fd/%d", i);
            ssize_t n = readlink(path, target, sizeof target - 1);
            target[n > 0 ? n : 1] = 0;
            fprintf(stderr, "descriptor %d (%s) is not close-on-exec\n", i, target);
            CHECK(flags >= 0 && (flags & FD_CLOEXEC));
        }
    }
    fprintf(stderr, "%d descriptors opened by the library, all close-on-exec\n", created);
    CHECK(created >= 4); /* port (and its eventfd), listener, the accepted socket */
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
    close(file);
}

/* The shutdown's walk pins each connection with a compare-and-swap on its state word. That
 * word changes whenever data arrives in a new tick, a send is queued or completes, or the
 * application takes a reference; a connection whose word changed between the walk's look
 * and its swap was left out. Never stopped, it went on reading and kept the shutdown
 * waiting for its deadline, and when the deadline's walk missed it too, for ever. With
 * CPORT_INJECT (the ASan build) the walk pauses 200 ms between the look and the swap,
 * while this thread takes a reference every millisecond: the connection must still be
 * stopped, and the shutdown return 0 at once. */
TEST(shutdown_stops_a_connection_whose_state_changes_during_the_walk)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    enum { MAX_REFS = 3000 };                                     /* the count has 12 bits */
    CHECK_OK(setenv("CPORT_INJECT_DELAY", "stop_pin:200000", 1)); /* before any thread */
    cp_server_options o = {.threads = 2};
    tsrv *t = tsrv_new(ECHO_DATA);
    t->hold_refs = true;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    exchange(fd, 1, 100);
    pthread_mutex_lock(&t->lock);
    CHECK_EQ(t->nheld, 1);
    cp_conn *c = t->held[0];
    pthread_mutex_unlock(&t->lock);
    sd_thread s = {.sv = t->sv, .deadline_ms = 2000};
    CHECK_EQ(pthread_create(&s.th, NULL, sd_thread_main, &s), 0);
    int refs = 0;
    /* Well past the deadline: a connection both walks missed keeps the shutdown until its
     * client ends it. */
    for (int64_t until = cpt_now_ms() + 10000; !LOAD(&s.done) && cpt_now_ms() < until;) {
        if (refs < MAX_REFS) {
            cp_conn_ref(c);
            refs++;
        }
        usleep(1000);
    }
    int done_in_time = LOAD(&s.done);
    close(fd); /* ends a connection that was left out */
    pthread_join(s.th, NULL);
    fprintf(stderr, "shutdown %s before the client closed (%d references taken); returned %d\n",
            done_in_time ? "returned" : "had not returned", refs, s.result);
    for (int i = 0; i < refs; i++)
        cp_conn_unref(c);
    CHECK(done_in_time);
    CHECK_EQ(s.result, 0);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_SHUTDOWN]), 1);
    CHECK_EQ(tsrv_stop(t, 0), 0);
#endif
}

/* A graceful close reads (and drops) what the peer still sends while its replies go out, so
 * that a peer blocked writing (a client that reads only once its request is sent) can
 * finish and then read them. A connection paused by backpressure did not: the close
 * waited for replies the peer would never read, until TCP_USER_TIMEOUT (linger_ms) cut
 * it with a reset, replies lost. Here the client sends until the server has paused it,
 * the application closes the connection (from another thread, holding a reference), and
 * the client goes on sending 1 MiB more before it reads: it must get every reply, then
 * EOF. */
TEST(graceful_close_of_a_paused_connection_reads_on)
{
    enum { CHUNK = 65536, MORE = 1 << 20 };
    cp_server_options o = {.threads = 2, .max_pending_send = 65536, .linger_ms = 1000};
    tsrv *t = tsrv_new(ECHO_COPY);
    t->hold_refs = true;
    t->sndbuf = 4096;
    tsrv_start(t, &o);
    int fd = sock_nb();
    int small = 4096;
    CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small));
    struct sockaddr_in sa = loopback(t->port);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EINPROGRESS);
    CHECK(wait_fd(fd, POLLOUT, cpt_now_ms() + IO_MS));
    uint8_t *tx = malloc(CHUNK);
    CHECK(tx != NULL);
    uint64_t sent = 0;
    /* Until the server has paused reading and the client's sending has stalled. */
    for (int64_t until = cpt_now_ms() + 20000;;) {
        pattern_fill(5, sent, tx, CHUNK);
        ssize_t w = send(fd, tx, CHUNK, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            sent += (uint64_t)w;
            continue;
        }
        CHECK(errno == EAGAIN);
        if (!wait_fd(fd, POLLOUT, cpt_now_ms() + 300) &&
            (tsrv_stats(t).backpressure_events > 0 || cpt_now_ms() > until))
            break;
    }
    CHECK(tsrv_stats(t).backpressure_events > 0);
    pthread_mutex_lock(&t->lock);
    CHECK_EQ(t->nheld, 1);
    cp_conn *c = t->held[0];
    pthread_mutex_unlock(&t->lock);
    CHECK(cp_conn_pending(c) > 0);
    cp_conn_close(c);
    /* The rest of the request, then the replies. */
    uint64_t total = sent + MORE;
    int64_t deadline = cpt_now_ms() + IO_MS;
    int r = 0;
    while (sent < total && r == 0) {
        size_t n = total - sent < CHUNK ? (size_t)(total - sent) : CHUNK;
        pattern_fill(5, sent, tx, n);
        r = try_send_all(fd, tx, n, deadline);
        if (r == 0)
            sent += n;
    }
    uint8_t buf[65536], want[65536];
    uint64_t got = 0;
    ssize_t k = 0;
    bool same = true;
    for (;;) {
        k = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (k > 0) {
            pattern_fill(5, got, want, (size_t)k);
            same = same && memcmp(buf, want, (size_t)k) == 0;
            got += (uint64_t)k;
        } else if (k == 0 || errno != EAGAIN || !wait_fd(fd, POLLIN, deadline)) {
            break;
        }
    }
    int rerr = k < 0 ? errno : 0;
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    cp_server_stats st = tsrv_stats(t);
    fprintf(stderr,
            "client sent %llu bytes (%s), read %llu of the %llu replied, then %s; on_close: %s\n",
            (unsigned long long)sent, r ? strerror(-r) : "all", (unsigned long long)got,
            (unsigned long long)st.bytes_out, k == 0 ? "EOF" : strerror(rerr),
            LOAD(&t->reasons[CP_CLOSE_LOCAL]) ? "local" : "other");
    CHECK_EQ(r, 0);
    CHECK_EQ(k, 0);
    CHECK(same);
    CHECK_EQ(got, st.bytes_out);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_LOCAL]), 1);
    free(tx);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* A graceful close bounds replies still queued with TCP_USER_TIMEOUT, set if any are
 * queued when the close begins (since the sweep resets a close whose replies stall for
 * linger_ms, it is the kernel's backstop, linger_backstop_ms, should the sweep not run). A
 * send from another thread that had found the connection open before the close began, and
 * queued its bytes just after the close looked, was not bounded: with a peer that never
 * reads, the connection stayed for good. With CPORT_INJECT (the ASan build) the send
 * pauses 300 ms after its check and the close 400 ms after its look; the close begins
 * 100 ms into the send's pause (a test thread stalled past the pause only makes the test
 * miss the window: it cannot fail it). */
typedef struct late_sender {
    cp_conn *c;
    int fd; /* the file, for late_file_sender_main */
    int result;
    pthread_t th;
} late_sender;

#ifdef CPORT_INJECT
static void *late_sender_main(void *arg)
{
    late_sender *l = arg;
    static uint8_t big[4 << 20];
    l->result = cp_conn_send(l->c, big, sizeof big);
    return NULL;
}

static void *late_file_sender_main(void *arg)
{
    late_sender *l = arg;
    uint64_t *block = malloc(sizeof(uint64_t)); /* t_on_sent's context: the expected result */
    CHECK(block != NULL);
    block[0] = 4 << 20;
    l->result = cp_conn_send_file(l->c, NULL, 0, l->fd, 0, 4 << 20, block);
    if (l->result < 0)
        free(block); /* no on_sent for a send that was refused */
    return NULL;
}

/* Both tests: a peer that reads nothing (4 KiB buffers), `sender` started on the held
 * connection (file: its file), the close 100 ms into the sender's pause; a send that was
 * queued must have set the kernel's bound on the socket. Returns the sender's result. */
static int late_send_race(void *(*sender)(void *), int file)
{
    /* A 10 s tick: the sweep, which moves graceful closes on too, stays out of the way. */
    cp_server_options o = {
        .threads = 2, .tick_ms = 10000, .linger_ms = 300, .max_pending_send = 8 << 20};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hold_refs = true;
    t->sndbuf = 4096;
    tsrv_start(t, &o);
    int fd = sock_nb();
    int small = 4096;
    CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small));
    struct sockaddr_in sa = loopback(t->port);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EINPROGRESS);
    WAIT_FOR(held_count(t) == 1, IO_MS);
    late_sender l = {.c = t->held[0], .fd = file};
    uint64_t refs = (LOAD(&l.c->state) & CS_OPREF_MASK) / CS_OPREF;
    CHECK_EQ(pthread_create(&l.th, NULL, sender, &l), 0);
    /* A send-file takes its reference before its pause: it has found the connection open
     * (a sender thread slow to start found it closing, -EPIPE, and failed the test). A
     * send takes none; a slow one is refused, and not judged. */
    if (file >= 0)
        WAIT_FOR((LOAD(&l.c->state) & CS_OPREF_MASK) / CS_OPREF == refs + 1, IO_MS);
    usleep(100000); /* into the sender's pause (past it: the window is missed, no failure) */
    cp_conn_close(l.c);
    pthread_join(l.th, NULL);
    unsigned bound = 0;
    socklen_t blen = sizeof bound;
    int g = cp_conn_getsockopt(l.c, IPPROTO_TCP, TCP_USER_TIMEOUT, &bound, &blen);
    fprintf(stderr, "send: %d, %zu bytes still queued; TCP_USER_TIMEOUT %u ms (%d)\n", l.result,
            cp_conn_pending(l.c), bound, g);
    /* The sweep would reset it at its next tick, ten seconds away. */
    cp_conn_abort(l.c);
    if (l.result == 0) {
        CHECK_EQ(g, 0);
        CHECK_EQ(bound, t->sv->linger_backstop_ms);
    }
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_LOCAL]), 1);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
    return l.result;
}
#endif

TEST(a_send_queued_as_the_close_begins_is_bounded)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    CHECK_OK(setenv("CPORT_INJECT_DELAY", "send_checked:300000,close_looked:400000", 1));
    late_send_race(late_sender_main, -1);
#endif
}

/* The same with cp_conn_send_file: the transmit queued just after the close looked is
 * bounded too. The sender pauses 300 ms after taking its reference (send_file_ref), the
 * close 400 ms after its look. */
TEST(a_send_file_queued_as_the_close_begins_is_bounded)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    CHECK_OK(setenv("CPORT_INJECT_DELAY", "send_file_ref:300000,close_looked:400000", 1));
    int file = cpt_memfd("late-file");
    CHECK_OK(ftruncate(file, 4 << 20));
    CHECK_EQ(late_send_race(late_file_sender_main, file), 0);
    close(file);
#endif
}

/* Lookaside chunks are kept once mapped, so after a burst has taken all memory a slab that
 * never grew could not grow any more: on io_uring every reply needs a send context and
 * every close a close context, and the server accepted and dropped every connection until
 * restarted. Each slab maps its first chunk when the server is created. With CPORT_INJECT
 * (the ASan build) no slab maps a chunk after that (fail point slab_grow): of 120
 * connections the server serves as many as its first chunks hold (each holds a 16 KiB
 * receive buffer, 63 to a chunk) and sheds the rest, and once they are gone it serves new
 * ones. */
#ifdef CPORT_INJECT
static int echo_or_closed(int fd, uint32_t seed)
{
    uint8_t msg[100], got[100];
    pattern_fill(seed, 0, msg, sizeof msg);
    if (try_send_all(fd, msg, sizeof msg, cpt_now_ms() + IO_MS) < 0)
        return 0;
    size_t n = 0;
    int64_t deadline = cpt_now_ms() + IO_MS;
    while (n < sizeof got) {
        ssize_t r = recv(fd, got + n, sizeof got - n, MSG_DONTWAIT);
        if (r > 0) {
            n += (size_t)r;
            continue;
        }
        if (r == 0 || (errno != EAGAIN && errno != EINTR))
            return 0; /* shed */
        CHECK(wait_fd(fd, POLLIN, deadline));
    }
    CHECK(memcmp(got, msg, sizeof msg) == 0);
    return 1;
}
#endif

TEST(a_server_whose_slabs_cannot_grow_sheds_and_keeps_serving)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    enum { N = 120, LATER = 20 };
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "slab_grow", 1)); /* before any thread */
    cp_server_options o = {.threads = 2};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    CHECK_EQ(tsrv_stats(t).allocations, 7); /* one chunk for each slab, mapped at creation */
    int fds[N], echoed = 0;
    for (int i = 0; i < N; i++)
        fds[i] = connect_to(t->port);
    for (int i = 0; i < N; i++)
        echoed += echo_or_closed(fds[i], (uint32_t)i);
    fprintf(stderr, "%d of %d connections served, the rest shed\n", echoed, N);
    CHECK(echoed >= 40 && echoed < N);
    for (int i = 0; i < N; i++)
        close(fds[i]);
    WAIT_FOR(tsrv_stats(t).conns_open == 0, IO_MS);
    for (int i = 0; i < LATER; i++) {
        int fd = connect_to(t->port);
        CHECK_EQ(echo_or_closed(fd, 1000u + (uint32_t)i), 1);
        close(fd);
    }
    CHECK_EQ(tsrv_stats(t).allocations, 7);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
#endif
}

/* cp_conn_send: when part of a send went out inside the call and the rest cannot be kept
 * (no memory for its copy), the connection is aborted (server.h): the peer gets a reset,
 * not the part followed by an end of stream, which would pass the cut stream for a whole
 * one. (Before, it was closed normally: the part, then a FIN.) With CPORT_INJECT (the ASan
 * build) no lookaside chunk is mapped after creation (fail point slab_grow): a peer that
 * does not read takes the 64 KiB buffers' first chunk with queued sends, and a send of 64 KiB
 * to another such peer goes out in part (epoll sends inside the call; io_uring never does). */
TEST(a_send_cut_short_by_a_lack_of_memory_resets_the_peer)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    if (strcmp(cpt_backend(), "epoll") != 0)
        SKIP("epoll only: on io_uring no send goes out inside the call");
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "slab_grow", 1)); /* before any thread */
    static uint8_t chunk[65536];
    cp_server_options o = {.threads = 1};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hold_refs = true;
    t->sndbuf = 4096;
    tsrv_start(t, &o);
    int b = connect_not_reading(t->port);
    WAIT_FOR(held_count(t) == 1, IO_MS);
    pthread_mutex_lock(&t->lock);
    cp_conn *hog = t->held[0];
    pthread_mutex_unlock(&t->lock);
    int r = 0;
    for (int i = 0; i < 1000 && r == 0; i++)
        r = cp_conn_send(hog, chunk, sizeof chunk);
    CHECK_EQ(r, -ENOMEM); /* queued behind the others: nothing of it went out */
    int a = connect_not_reading(t->port);
    WAIT_FOR(held_count(t) == 2, IO_MS);
    pthread_mutex_lock(&t->lock);
    cp_conn *cut = t->held[1];
    pthread_mutex_unlock(&t->lock);
    CHECK_EQ(cp_conn_send(cut, chunk, sizeof chunk), -ENOMEM);
    size_t got = 0;
    int how = -1;
    CHECK(read_to_close(a, cpt_now_ms() + IO_MS, &got, &how) >= 0);
    fprintf(stderr, "the peer got %zu bytes, then %s\n", got, how ? strerror(how) : "EOF");
    CHECK(got > 0 && got < sizeof chunk); /* the part that went out */
    CHECK_EQ(how, ECONNRESET);
    WAIT_FOR(LOAD(&t->reasons[CP_CLOSE_ERROR]) == 1, IO_MS);
    close(a);
    close(b);
    tsrv_stop(t, 1000);
#endif
}

/* A reply that fails in the socket layer (io_uring: no SQE for it) before its first byte
 * leaves a hole in the stream as surely as one cut midway: a reply queued after it must
 * not go out into that hole, and the peer must not get a FIN (a whole stream of fewer
 * replies). The connection is reset at once, under the socket's lock, before anything
 * queued behind it starts. (Before, the next reply went out and the close sent a FIN.)
 * With CPORT_INJECT (the ASan build) a server send of 64 KiB or more finds no SQE (fail
 * point stream_send_no_sqe). epoll has no such failure: a send there needs no resource. */
TEST(a_reply_failing_before_its_first_byte_lets_nothing_after_it_out)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    if (strcmp(cpt_backend(), "io_uring") != 0)
        SKIP("io_uring only: an epoll send needs no resource and cannot fail this way");
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "stream_send_no_sqe", 1)); /* before any thread */
    static uint8_t big[65536];
    uint8_t small[100];
    memset(big, 'A', sizeof big);
    memset(small, 'B', sizeof small);
    cp_server_options o = {.threads = 1};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hold_refs = true;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    WAIT_FOR(held_count(t) == 1, IO_MS);
    cp_conn *c = held_at(t, 0);
    CHECK_OK(cp_conn_send(c, big, sizeof big)); /* accepted: fails in the socket layer */
    int r = cp_conn_send(c, small, sizeof small);
    CHECK(r == 0 || r == -EPIPE); /* -EPIPE if the failure's close came first */
    size_t got = 0;
    int how = -1;
    CHECK(read_to_close(fd, cpt_now_ms() + IO_MS, &got, &how) >= 0);
    fprintf(stderr, "small reply %s; the peer got %zu bytes, then %s\n", r ? "refused" : "accepted",
            got, how ? strerror(how) : "EOF");
    CHECK_EQ(got, 0);
    CHECK_EQ(how, ECONNRESET);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_ERROR]), 1);
    close(fd);
    CHECK_OK(unsetenv("CPORT_INJECT_FAIL"));
    CHECK_EQ(tsrv_stop(t, 1000), 0);
#endif
}

/* Every abort that cancels replies still queued cuts the stream, whatever closes it (here
 * on_open refusing a connection after a reply larger than the socket takes; also a
 * delivery out of memory, a receive that cannot be posted): the peer gets a reset, not
 * the part the kernel held followed by a FIN. (Before, only cp_conn_abort, a timeout and
 * a send cut short reset.) A refusal with nothing queued still ends with a FIN. */
static int refuse_after_reply(cp_conn *c)
{
    static uint8_t reply[8 << 20];
    int small = 4096;
    CHECK_OK(cp_conn_setsockopt(c, SOL_SOCKET, SO_SNDBUF, &small, sizeof small));
    int *big = cp_server_user(cp_conn_server(c));
    if (LOAD(big))
        CHECK_OK(cp_conn_send(c, reply, sizeof reply));
    else
        CHECK_OK(cp_conn_send(c, reply, 100));
    return -1;
}

TEST(an_abort_cancelling_queued_replies_resets_the_peer)
{
    int big = 1;
    cp_server_callbacks cb = {.on_open = refuse_after_reply, .on_data = ignore_data};
    cp_server_options o = {.bind = "127.0.0.1", .threads = 1, .user = &big};
    o.port_options.flags |= CP_PORT_QUIET;
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_start(sv));
    int fd = connect_not_reading(cp_server_listen_port(sv));
    size_t got = 0;
    int how = -1;
    CHECK(read_to_close(fd, cpt_now_ms() + IO_MS, &got, &how) >= 0);
    fprintf(stderr, "refused with 8 MiB queued: the peer got %zu bytes, then %s\n", got,
            how ? strerror(how) : "EOF");
    CHECK(got < (8u << 20));
    CHECK_EQ(how, ECONNRESET);
    close(fd);
    /* Nothing queued (epoll: the 100 bytes went out inside the call): a whole stream, and
     * a FIN. On io_uring the send is queued until its completion is seen, so the refusal
     * may find it queued, and reset. */
    STORE(&big, 0);
    fd = connect_not_reading(cp_server_listen_port(sv));
    CHECK(read_to_close(fd, cpt_now_ms() + IO_MS, &got, &how) >= 0);
    fprintf(stderr, "refused with 100 bytes sent: the peer got %zu bytes, then %s\n", got,
            how ? strerror(how) : "EOF");
    CHECK(got == 0 || got == 100);
    if (strcmp(cpt_backend(), "epoll") == 0) {
        CHECK_EQ(got, 100);
        CHECK_EQ(how, 0);
    }
    close(fd);
    CHECK_EQ(cp_server_shutdown(sv, 1000), 0);
    cp_server_destroy(sv);
}

/* Each pool thread's record (its caches, what on_data is handing over) is made when the
 * server is created: a worker's first completion needs no memory. It used to be allocated
 * then, and a worker that found no memory waited for some, for ever if none came (the
 * shutdown with it). With CPORT_INJECT (the ASan build) that allocation fails (fail point
 * worker_record): every worker must still serve. */
TEST(worker_records_are_made_at_creation)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    enum { N = 30 };
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "worker_record", 1)); /* before any thread */
    cp_server_options o = {.threads = 3, .recvs = 2};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = connect_to(t->port);
    for (int round = 0; round < 3; round++)
        for (int i = 0; i < N; i++)
            exchange(fds[i], (uint32_t)(round * N + i), 3000);
    for (int i = 0; i < N; i++)
        close(fds[i]);
    WAIT_FOR(LOAD(&t->closes) == N, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
#endif
}

/* A cp_server_create that fails after its slabs mapped their first chunks (here the port
 * refuses its options) unmaps them: eight failed creations leave the address space as it
 * was (each would otherwise keep 7 MiB). */
TEST(a_failed_server_create_unmaps_its_slabs)
{
    cp_server_options o = {.threads = 1, .port_options = {.ring_entries = 1u << 20}};
    cp_server_callbacks cb = {.on_data = ignore_data};
    long before = status_kb(0, "VmSize");
    for (int i = 0; i < 8; i++) {
        cp_server *sv = NULL;
        CHECK_EQ(cp_server_create(&sv, &o, &cb), -EINVAL);
        CHECK(sv == NULL);
    }
    long after = status_kb(0, "VmSize");
    fprintf(stderr, "VmSize %ld -> %ld kB\n", before, after);
    CHECK(after - before < 8 * 1024);
}

/* S2/S5: a burst far larger than both the listen backlog and accepts_max. The only worker
 * is held in a callback while the burst is fired, so the backlog really overflows: the
 * kernel drops the connects that find it full and their clients retry (after 1, 3, 7 ...
 * s). Every one is accepted and served, none refused; the pool stays whole (every accept
 * that completed was replaced: accepts_outstanding == accepts_target) and quiet brings it
 * back to accepts_min. */
static void hold_worker_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)u;
    if (data[0] == 'H') {
        int *gate = t->ctx;
        STORE(&gate[0], 1); /* held */
        while (!LOAD(&gate[1]))
            usleep(1000);
    }
    echo_back(t, c, data, len);
}

TEST(a_burst_beyond_the_backlog_is_all_served_and_the_pool_stays_whole)
{
    enum { AMIN = 1, AMAX = 4, BACKLOG = 8, N = 3 * BACKLOG + AMAX, TICK = 20 };
    cp_server_options o = {.threads = 1,
                           .accepts_min = AMIN,
                           .accepts_max = AMAX,
                           .backlog = BACKLOG,
                           .tick_ms = TICK};
    tsrv *t = tsrv_new(ECHO_DATA);
    int gate[2] = {0, 0};
    t->hook = hold_worker_hook;
    t->ctx = gate;
    tsrv_start(t, &o);
    int holder = connect_to(t->port);
    send_all(holder, "H", 1);
    WAIT_FOR(LOAD(&gate[0]), IO_MS);
    /* Fired while nothing is accepted: the backlog fills and the rest is dropped. */
    sampler s = {.t = t};
    CHECK_EQ(pthread_create(&s.th, NULL, sampler_main, &s), 0);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = connect_start(t->port);
    usleep(50000); /* (only so that the burst meets a held worker; not needed to pass) */
    STORE(&gate[1], 1);
    uint8_t b;
    recv_all(holder, &b, 1);
    int64_t t0 = cpt_now_ms();
    for (int i = 0; i < N; i++) {
        CHECK(wait_fd(fds[i], POLLOUT, cpt_now_ms() + 60000));
        exchange(fds[i], (uint32_t)i, 100);
    }
    STORE(&s.stop, 1);
    pthread_join(s.th, NULL);
    cp_server_stats st = tsrv_stats(t);
    fprintf(stderr,
            "%d connects against a backlog of %d: all served %lld ms after the worker was "
            "free; pool peaked at %llu outstanding, target %llu; now %llu / %llu\n",
            N, BACKLOG, (long long)(cpt_now_ms() - t0), (unsigned long long)s.max_out,
            (unsigned long long)s.max_target, (unsigned long long)st.accepts_outstanding,
            (unsigned long long)st.accepts_target);
    CHECK_EQ(st.conns_total, (uint64_t)N + 1);
    CHECK_EQ(st.conns_rejected, 0);
    CHECK(s.max_out <= AMAX && s.max_target <= AMAX);
    CHECK_EQ(st.accepts_outstanding, st.accepts_target);
    WAIT_FOR((st = tsrv_stats(t)).accepts_outstanding == AMIN && st.accepts_target == AMIN, IO_MS);
    for (int i = 0; i < N; i++)
        close(fds[i]);
    close(holder);
    WAIT_FOR(LOAD(&t->closes) == (uint64_t)N + 1, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* S5: refusals under a burst. Bursts against max_conns, while the kept connections stay
 * open: every connection beyond the limit is refused and counted once, none is lost (kept +
 * refused == connects), refusals take nothing from the accept pool (accepts_outstanding ==
 * accepts_target once the burst is over), and a slot freed is taken again. */
TEST(refusals_under_bursts_keep_the_pool_whole)
{
    enum { MAX = 6, N = 120, AMIN = 2, AMAX = 16 };
    cp_server_options o = {
        .threads = 2, .max_conns = MAX, .accepts_min = AMIN, .accepts_max = AMAX, .tick_ms = 20};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    int kept[MAX];
    for (int i = 0; i < MAX; i++) {
        kept[i] = connect_to(t->port);
        exchange(kept[i], (uint32_t)i, 100);
    }
    uint64_t refused = 0;
    for (int round = 0; round < 3; round++) {
        int fds[N];
        for (int i = 0; i < N; i++)
            fds[i] = connect_start(t->port);
        refused += N;
        WAIT_FOR(tsrv_stats(t).conns_rejected == refused, IO_MS);
        for (int i = 0; i < N; i++) {
            expect_closed(fds[i], IO_MS);
            close(fds[i]);
        }
        cp_server_stats st = tsrv_stats(t);
        CHECK_EQ(st.conns_total, MAX + (uint64_t)round);
        CHECK_EQ(st.conns_open, MAX);
        CHECK_EQ(st.accepts_outstanding, st.accepts_target);
        /* One leaves: the next connection is kept. */
        close(kept[round]);
        WAIT_FOR(tsrv_stats(t).conns_open == MAX - 1, IO_MS);
        kept[round] = connect_to(t->port);
        exchange(kept[round], 100 + (uint32_t)round, 100);
        CHECK_EQ(tsrv_stats(t).conns_rejected, refused);
    }
    CHECK_EQ(LOAD(&t->open_calls), MAX + 3);
    WAIT_FOR(tsrv_stats(t).accepts_outstanding == AMIN && tsrv_stats(t).accepts_target == AMIN,
             IO_MS);
    for (int i = 0; i < MAX; i++)
        close(kept[i]);
    WAIT_FOR(LOAD(&t->closes) == MAX + 3, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* S5: descriptors run out in the middle of a backlog of connections. Accepting pauses (and
 * retries on its timer, several times while the limit holds); once descriptors are there
 * again, every connection waiting in the backlog is accepted and served with no new
 * connection arriving to wake the listener up, and the pool is whole again. */
TEST(accepting_resumes_on_its_timer_and_drains_the_backlog)
{
    enum { N = 24, ROOM = 4, WAIT_MS = 10000 };
    cp_server_options o = {.threads = 2, .accepts_min = 2, .accepts_max = 8, .tick_ms = 1000};
    tsrv *t = tsrv_new(ECHO_DATA);
    tsrv_start(t, &o);
    WAIT_FOR(tsrv_stats(t).accepts_outstanding == 2, WAIT_MS);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = sock_nb(); /* made while descriptors may still be made */
    int lowest = fcntl(fds[0], F_DUPFD_CLOEXEC, 0);
    CHECK(lowest >= 0);
    close(lowest);
    struct rlimit saved, low;
    CHECK_OK(getrlimit(RLIMIT_NOFILE, &saved));
    low = saved;
    low.rlim_cur = (rlim_t)lowest + ROOM; /* room for a few connections, not all */
    CHECK_OK(setrlimit(RLIMIT_NOFILE, &low));
    struct sockaddr_in sa = loopback(t->port);
    for (int i = 0; i < N; i++) {
        CHECK(connect(fds[i], (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EINPROGRESS);
        CHECK(wait_fd(fds[i], POLLOUT, cpt_now_ms() + WAIT_MS));
        uint8_t b = (uint8_t)i;
        CHECK_EQ(send(fds[i], &b, 1, MSG_NOSIGNAL), 1);
    }
    /* Paused, then paused again after a retry (100 ms): the limit holds. */
    int64_t deadline = cpt_now_ms() + WAIT_MS;
    while (tsrv_stats(t).accept_pauses < 2 && cpt_now_ms() < deadline)
        usleep(1000);
    cp_server_stats st = tsrv_stats(t);
    CHECK_OK(setrlimit(RLIMIT_NOFILE, &saved));
    fprintf(stderr, "limit %d + %d: %llu accepted, %llu pauses, %llu accepts outstanding\n", lowest,
            ROOM, (unsigned long long)st.conns_total, (unsigned long long)st.accept_pauses,
            (unsigned long long)st.accepts_outstanding);
    CHECK(st.accept_pauses >= 2);
    CHECK(st.conns_total < N);
    /* Nothing new arrives: the retry alone must take the whole backlog. */
    for (int i = 0; i < N; i++) {
        uint8_t b = 0;
        CHECK_EQ(try_recv_all(fds[i], &b, 1, cpt_now_ms() + WAIT_MS), 0);
        CHECK_EQ(b, (uint8_t)i);
    }
    st = tsrv_stats(t);
    CHECK_EQ(st.conns_total, N);
    CHECK_EQ(st.conns_rejected, 0);
    WAIT_FOR(tsrv_stats(t).accepts_outstanding == tsrv_stats(t).accepts_target &&
                 tsrv_stats(t).accepts_outstanding >= 2,
             WAIT_MS);
    for (int i = 0; i < N; i++)
        close(fds[i]);
    WAIT_FOR(LOAD(&t->closes) == N, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* cp_server_shutdown from several threads at once (a signal thread and main, say): one
 * shuts down, the others wait until it has finished (every connection closed, the workers
 * stopped) and return 0. (Before, each caller ran the whole shutdown: the pool was
 * destroyed twice.) */
typedef struct sd_racer {
    cp_server *sv;
    tsrv *t;
    pthread_t th;
    int result;
    uint64_t open_at_return;
} sd_racer;

static void *sd_racer_main(void *arg)
{
    sd_racer *r = arg;
    r->result = cp_server_shutdown(r->sv, 5000);
    r->open_at_return = tsrv_stats(r->t).conns_open;
    return NULL;
}

TEST(concurrent_shutdowns_wait_for_the_first)
{
    enum { RACERS = 3 };
    tsrv *t = tsrv_new(ECHO_DATA);
    cp_server_options o = {.threads = 2};
    tsrv_start(t, &o);
    int idle = connect_to(t->port);
    exchange(idle, 1, 100);
    sd_racer r[RACERS];
    for (int i = 0; i < RACERS; i++) {
        r[i] = (sd_racer){.sv = t->sv, .t = t, .result = 1};
        CHECK_OK(pthread_create(&r[i].th, NULL, sd_racer_main, &r[i]));
    }
    expect_closed(idle, IO_MS);
    close(idle);
    int zeros = 0;
    for (int i = 0; i < RACERS; i++) {
        pthread_join(r[i].th, NULL);
        CHECK_EQ(r[i].open_at_return, 0); /* none returned before the shutdown ended */
        zeros += r[i].result == 0;
    }
    CHECK_EQ(zeros, RACERS);
    CHECK_EQ(LOAD(&t->closes), LOAD(&t->opens));
    CHECK_EQ(tsrv_stop(t, 0), 0); /* (a shutdown after them: 0 at once) */
}

/* A thread started after the shutdown joined the workers often gets the id of one of them
 * (glibc reuses a joined thread's stack, and the id is its address). It is no callback:
 * its shutdown returns 0, not -EDEADLK. (Before, the server compared ids with a copy of
 * the workers' ids: the third racer above failed so in CI, under TSan.) */
typedef struct reuse_probe {
    cp_server *sv;
    pthread_t self;
    int result;
} reuse_probe;

static void *reuse_probe_main(void *arg)
{
    reuse_probe *p = arg;
    p->self = pthread_self();
    p->result = cp_server_shutdown(p->sv, 0);
    return NULL;
}

/* When the shutdown cannot queue its stop item, it stops the connections itself, and an
 * on_close may run on the shutting-down thread. A cp_server_shutdown (or destroy) from
 * that on_close is refused like one from a worker: it would wait for the very shutdown
 * it runs inside. (Without the check it waited forever.) */
#ifdef CPORT_INJECT
typedef struct nested_stop {
    pthread_t caller;
    uint64_t closes, on_caller, refused, other; /* atomic */
} nested_stop;

static void nested_stop_on_close(cp_conn *c, cp_close_reason reason, int err)
{
    (void)reason;
    (void)err;
    cp_server *sv = cp_conn_server(c);
    nested_stop *k = cp_server_user(sv);
    int r = cp_server_shutdown(sv, 0);
    int d = cp_server_destroy(sv);
    ADD(r == -EDEADLK && d == -EDEADLK ? &k->refused : &k->other, 1);
    if (pthread_equal(pthread_self(), k->caller))
        ADD(&k->on_caller, 1);
    ADD(&k->closes, 1);
}
#endif

TEST(a_shutdown_from_an_on_close_run_by_the_shutdown_is_refused)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "stop_item", 1)); /* before any thread */
    enum { N = 40 };
    nested_stop k = {.caller = pthread_self()};
    cp_server_callbacks cb = {.on_data = ignore_data, .on_close = nested_stop_on_close};
    cp_server_options o = {.bind = "127.0.0.1", .threads = 2, .user = &k};
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_start(sv));
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = connect_to(cp_server_listen_port(sv));
    cp_server_stats st = {0};
    WAIT_FOR((cp_server_get_stats(sv, &st), st.conns_open == N), IO_MS);
    CHECK_EQ(cp_server_shutdown(sv, 2000), 0);
    fprintf(stderr, "%llu of %d on_close ran on the shutting-down thread\n",
            (unsigned long long)LOAD(&k.on_caller), N);
    CHECK_EQ(LOAD(&k.closes), N);
    CHECK_EQ(LOAD(&k.refused), N);
    CHECK_EQ(LOAD(&k.other), 0);
    CHECK_OK(cp_server_destroy(sv));
    for (int i = 0; i < N; i++)
        close(fds[i]);
    unsetenv("CPORT_INJECT_FAIL");
    if (LOAD(&k.on_caller) == 0)
        SKIP("no on_close ran on the shutting-down thread here");
#endif
}

/* The last operation reference dropped by a call from an application thread (here a
 * cp_conn_send_file() that lost to the peer's end) is handed to a worker, also when no
 * work item can be queued (fail point pool_submit: the port's queue full): on_close ran on
 * the sender's thread otherwise, inside its call, and a cp_server_shutdown() from it was
 * not refused (the thread is no worker) and waited forever for that very on_close. The
 * sender holds its reference in the delay point send_file_ref while the test sees the
 * close handled (only that reference left), then its transmit fails and it drops it. */
#ifdef CPORT_INJECT
typedef struct unref_caller {
    cp_conn *c;       /* held by on_open's cp_conn_ref */
    pthread_t sender; /* with sender_set */
    int sender_set;   /* atomic */
    int sending;      /* atomic: about to call cp_conn_send_file */
    int result;       /* cp_conn_send_file's */
    int file;
    uint64_t closes, on_sender, shutdown_returned; /* atomic */
    int shutdown_r;
} unref_caller;

static int unref_caller_on_open(cp_conn *c)
{
    unref_caller *k = cp_server_user(cp_conn_server(c));
    cp_conn_ref(c);
    STORE(&k->c, c);
    return 0;
}

static void unref_caller_on_close(cp_conn *c, cp_close_reason reason, int err)
{
    (void)reason;
    (void)err;
    cp_server *sv = cp_conn_server(c);
    unref_caller *k = cp_server_user(sv);
    if (LOAD(&k->sender_set) && pthread_equal(pthread_self(), k->sender))
        ADD(&k->on_sender, 1);
    ADD(&k->closes, 1);
    k->shutdown_r = cp_server_shutdown(sv, 0); /* -EDEADLK on a worker */
    STORE(&k->shutdown_returned, 1);
}

static void *unref_caller_sender(void *arg)
{
    unref_caller *k = arg;
    k->sender = pthread_self();
    STORE(&k->sender_set, 1);
    STORE(&k->sending, 1);
    k->result = cp_conn_send_file(LOAD(&k->c), NULL, 0, k->file, 0, 4096, k);
    return NULL;
}

static uint64_t oprefs(cp_conn *c)
{
    return (LOAD(&c->state) & CS_OPREF_MASK) / CS_OPREF;
}
#endif

TEST(a_send_dropping_the_last_reference_runs_on_close_on_a_worker_without_a_work_item)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    /* Before any thread. The sender is held until the test has ended the connection. */
    gate g;
    gate_init(&g);
    char env[64];
    snprintf(env, sizeof env, "send_file_ref:%ld@%d", GATE_US, g.r);
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "pool_submit", 1));
    CHECK_OK(setenv("CPORT_INJECT_DELAY", env, 1));
    unref_caller k = {.file = cpt_memfd("file")};
    uint8_t page[4096] = {0};
    CHECK_EQ(write(k.file, page, sizeof page), (ssize_t)sizeof page);
    cp_server_callbacks cb = {
        .on_open = unref_caller_on_open, .on_data = ignore_data, .on_close = unref_caller_on_close};
    cp_server_options o = {.bind = "127.0.0.1", .threads = 2, .user = &k};
    cp_server *sv;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_start(sv));
    int fd = connect_to(cp_server_listen_port(sv));
    WAIT_FOR(LOAD(&k.c) != NULL, IO_MS);
    cp_conn *c = LOAD(&k.c);
    WAIT_FOR(oprefs(c) == 2, IO_MS); /* its life and its receive */
    pthread_t th;
    CHECK_OK(-pthread_create(&th, NULL, unref_caller_sender, &k));
    WAIT_FOR(oprefs(c) == 3, IO_MS); /* the sender's, taken: it waits in send_file_ref */
    close(fd);
    WAIT_FOR(oprefs(c) == 1, IO_MS); /* the close is done: the sender's is the last */
    gate_open(&g);                   /* the sender goes on, and drops it */
    WAIT_FOR(LOAD(&k.closes) == 1, IO_MS);
    fprintf(stderr, "on_close on the sender's thread: %llu\n",
            (unsigned long long)LOAD(&k.on_sender));
    /* A hang here (a shutdown on the sender's thread waiting for itself) fails the test. */
    WAIT_FOR(LOAD(&k.shutdown_returned) == 1, IO_MS);
    fprintf(stderr, "cp_server_shutdown from it: %d\n", k.shutdown_r);
    CHECK_EQ(LOAD(&k.on_sender), 0);
    CHECK_EQ(k.shutdown_r, -EDEADLK);
    CHECK_OK(-pthread_join(th, NULL));
    CHECK_EQ(k.result, -EPIPE); /* it lost to the close: the path under test */
    CHECK_EQ(LOAD(&k.closes), 1);
    cp_conn_unref(c);
    CHECK_EQ(cp_server_shutdown(sv, 1000), 0);
    CHECK_OK(cp_server_destroy(sv));
    close(k.file);
    unsetenv("CPORT_INJECT_FAIL");
    unsetenv("CPORT_INJECT_DELAY");
    gate_free(&g);
#endif
}

TEST(a_new_thread_with_a_joined_workers_id_is_no_callback)
{
    tsrv *t = tsrv_new(ECHO_DATA);
    cp_server_options o = {.threads = 2};
    tsrv_start(t, &o);
    pthread_t workers[2];
    CHECK_EQ(t->sv->pool->nthreads, 2);
    memcpy(workers, t->sv->pool->threads, sizeof workers);
    CHECK_EQ(cp_server_shutdown(t->sv, 1000), 0);
    int reused = 0;
    for (int i = 0; i < 16; i++) {
        reuse_probe p = {.sv = t->sv, .result = 1};
        pthread_t th;
        CHECK_OK(pthread_create(&th, NULL, reuse_probe_main, &p));
        pthread_join(th, NULL);
        CHECK_EQ(p.result, 0);
        reused += pthread_equal(p.self, workers[0]) || pthread_equal(p.self, workers[1]);
    }
    fprintf(stderr, "%d of 16 new threads had a joined worker's id\n", reused);
    CHECK_EQ(tsrv_stop(t, 0), 0);
    if (!reused)
        SKIP("no thread id was reused here, so the case did not arise");
}

/* ---- cp_conn_pause_recv / cp_conn_resume_recv ------------------------------------------ */

/* The pause tests' hook state (atomic fields). */
typedef struct pz {
    uint64_t bytes;    /* delivered to on_data */
    uint64_t calls;    /* on_data calls */
    uint64_t at_bytes; /* ...when on_data paused its connection */
    uint64_t at_calls;
    uint32_t paused;    /* connections paused by the hook */
    uint32_t pause_max; /* the hook pauses the first pause_max connections (0: none) */
    uint32_t echo_from; /* connections with an id from this one echo (cp_conn_send); 0: none */
    uint32_t cross;     /* pause and resume another held connection on every delivery */
    uint64_t cross_calls;
    /* If set, deliveries wait until *gate > 0 (a thread pausing the connections from
     * outside has paused one): a loaded machine may run the whole stream first. */
    const uint64_t *gate;
} pz;

static size_t held_n(tsrv *t)
{
    pthread_mutex_lock(&t->lock);
    size_t n = t->nheld;
    pthread_mutex_unlock(&t->lock);
    return n;
}

static void pause_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    pz *z = t->ctx;
    if (z->gate && !LOAD(z->gate)) {
        int64_t end = cpt_now_ms() + IO_MS;
        while (!LOAD(z->gate) && cpt_now_ms() < end)
            sched_yield();
        if (!LOAD(z->gate))
            note_error(t, "no pause from the other thread in %d ms", IO_MS);
    }
    uint64_t bytes = ADD(&z->bytes, len);
    uint64_t calls = ADD(&z->calls, 1);
    /* u->frames: deliveries before this one. */
    if (u->frames == 0 && u->id <= LOAD(&z->pause_max)) {
        int r1 = cp_conn_pause_recv(c), r2 = cp_conn_pause_recv(c);
        if (r1 != 0 || r2 != 0)
            note_error(t, "cp_conn_pause_recv: %d, again: %d", r1, r2);
        STORE(&z->at_bytes, bytes);
        STORE(&z->at_calls, calls);
        ADD(&z->paused, 1);
    }
    if (z->echo_from && u->id >= z->echo_from)
        note_send(t, cp_conn_send(c, data, len));
    if (LOAD(&z->cross)) {
        /* Another connection's pause and resume from this callback: never waits for its
         * callbacks (two connections doing this to each other would deadlock). */
        size_t n = held_n(t);
        cp_conn *o = n ? held_at(t, (u->id + 1) % n) : NULL;
        if (o) {
            int r1 = cp_conn_pause_recv(o), r2 = cp_conn_resume_recv(o);
            if ((r1 != 0 && r1 != -EPIPE) || (r2 != 0 && r2 != -EPIPE))
                note_error(t, "cross pause %d, resume %d", r1, r2);
            ADD(&z->cross_calls, 1);
        }
        /* Resuming a connection that is not paused does nothing. */
        int r = cp_conn_resume_recv(c);
        if (r != 0)
            note_error(t, "resume of a running connection: %d", r);
    }
}

/* A stream server whose on_data is pause_hook (state z); on_open holds each connection. */
static tsrv *pause_tsrv(pz *z)
{
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hold_refs = true;
    t->hook = pause_hook;
    t->ctx = z;
    return t;
}

/* Send stream `seed` from `*sent` on until the kernel takes no more for 500 ms (at most
 * `cap` bytes: a server that does not stop reading fails the test). */
static void send_until_blocked(int fd, uint32_t seed, uint64_t *sent, uint64_t cap)
{
    uint8_t tx[65536];
    for (;;) {
        CHECK(*sent < cap);
        stream_fill(seed, *sent, tx, sizeof tx);
        ssize_t w = send(fd, tx, sizeof tx, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            *sent += (uint64_t)w;
            continue;
        }
        CHECK(w < 0 && errno == EAGAIN);
        if (!wait_fd(fd, POLLOUT, cpt_now_ms() + 500))
            return;
    }
}

/* Send stream `seed` from *sent up to `total` (blocking as needed). */
static void send_stream_to(int fd, uint32_t seed, uint64_t *sent, uint64_t total)
{
    uint8_t tx[65536];
    while (*sent < total) {
        size_t n = total - *sent < sizeof tx ? (size_t)(total - *sent) : sizeof tx;
        stream_fill(seed, *sent, tx, n);
        send_all(fd, tx, n);
        *sent += n;
    }
}

/* The receives one connection of `o` may have outstanding, and the most bytes each takes. */
static uint64_t rx_bound(tsrv *t, const cp_server_options *o)
{
    uint64_t per = o->zero_byte ? cp_buffer_size(cp_server_port(t->sv))
                                : (o->recv_buffer ? o->recv_buffer : 16384);
    return (o->recvs ? o->recvs : 1) * per;
}

/* A client streams; on_data pauses its connection at the first delivery. Then at most
 * `recvs` receives are delivered, the client's sends block (kernel buffers full), and
 * after cp_conn_resume_recv() from this thread everything arrives byte-exact and in order
 * (check_stream), the rest of the stream too. Framed: the payloads form the stream. */
static void pause_case(const cp_server_options *base)
{
    cp_server_options o = *base;
    o.threads = 2;
    pz z = {.pause_max = 1};
    tsrv *t = pause_tsrv(&z);
    t->check_stream = true;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    uint32_t seed = 77;
    uint64_t sent = 0;
    if (o.framed) {
        /* Frames of 1000 payload bytes of the stream, many in a receive. */
        enum { PAY = 1000, FRAMES = 16384 };
        size_t len = (size_t)FRAMES * (4 + PAY), off = 0;
        uint8_t *fr = malloc(len);
        CHECK(fr != NULL);
        for (size_t i = 0; i < FRAMES; i++) {
            cp_frame_header(fr + i * (4 + PAY), PAY);
            stream_fill(seed, i * PAY, fr + i * (4 + PAY) + 4, PAY);
        }
        for (;;) {
            CHECK(off < len);
            ssize_t w = send(fd, fr + off, len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0) {
                off += (size_t)w;
                continue;
            }
            CHECK(errno == EAGAIN);
            if (!wait_fd(fd, POLLOUT, cpt_now_ms() + 500))
                break;
        }
        uint64_t after = LOAD(&z.bytes) - LOAD(&z.at_bytes);
        fprintf(stderr,
                "framed: %zu bytes sent, %llu payload bytes delivered, %llu after the pause\n", off,
                (unsigned long long)LOAD(&z.bytes), (unsigned long long)after);
        CHECK_EQ(LOAD(&z.paused), 1);
        /* The rest of the receive being delivered, and the receives outstanding. */
        CHECK(after <= rx_bound(t, &o) +
                           (o.zero_byte ? cp_buffer_size(cp_server_port(t->sv)) : o.recv_buffer));
        CHECK(LOAD(&z.bytes) < off);
        CHECK_OK(cp_conn_resume_recv(held_at(t, 0)));
        CHECK_OK(cp_conn_resume_recv(held_at(t, 0)));
        send_all(fd, fr + off, len - off);
        free(fr);
        uint64_t frames = FRAMES;
        WAIT_FOR(LOAD(&z.bytes) == frames * PAY, IO_MS);
    } else {
        uint8_t first[100];
        stream_fill(seed, 0, first, sizeof first);
        send_all(fd, first, sizeof first);
        sent = sizeof first;
        WAIT_FOR(LOAD(&z.paused) == 1, IO_MS);
        send_until_blocked(fd, seed, &sent, 256ull << 20);
        uint64_t calls = LOAD(&z.calls) - LOAD(&z.at_calls);
        uint64_t after = LOAD(&z.bytes) - LOAD(&z.at_bytes);
        fprintf(stderr,
                "recvs %u%s: sent %llu bytes until blocked; after the pause %llu deliveries, "
                "%llu bytes (bound %llu)\n",
                o.recvs, o.zero_byte ? " zero-byte" : "", (unsigned long long)sent,
                (unsigned long long)calls, (unsigned long long)after,
                (unsigned long long)rx_bound(t, &o));
        CHECK(calls <= (o.recvs ? o.recvs : 1));
        CHECK(after <= rx_bound(t, &o));
        CHECK(LOAD(&z.bytes) < sent);
        CHECK_OK(cp_conn_resume_recv(held_at(t, 0)));
        CHECK_OK(cp_conn_resume_recv(held_at(t, 0)));
        send_stream_to(fd, seed, &sent, sent + (1 << 20));
        WAIT_FOR(LOAD(&z.bytes) == sent, IO_MS);
    }
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_PEER]), 1);
    CHECK_EQ(cp_conn_pause_recv(held_at(t, 0)), -EPIPE);
    CHECK_EQ(cp_conn_resume_recv(held_at(t, 0)), -EPIPE);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(pause_recv_stops_reading_and_resume_delivers_everything)
{
    cp_server_options a = {.recvs = 1, .recv_buffer = 4096};
    pause_case(&a);
    cp_server_options b = {.recvs = 4, .recv_buffer = 4096};
    pause_case(&b);
    cp_server_options c = {.recvs = 1, .zero_byte = true};
    pause_case(&c);
    cp_server_options d = {.recvs = 3, .zero_byte = true};
    pause_case(&d);
    cp_server_options e = {.recvs = 1, .recv_buffer = 4096, .framed = true};
    pause_case(&e);
    cp_server_options f = {.recvs = 2, .zero_byte = true, .framed = true};
    pause_case(&f);
}

/* A thread pauses and resumes the connections over and over while they stream and echo,
 * and every on_data pauses and resumes another connection (from a callback: must not wait
 * for that connection's callbacks): the echo stays byte-exact, callbacks never overlap. */
typedef struct toggler {
    tsrv *t;
    int stop;
    uint64_t pauses, resumes;
    pthread_t th;
} toggler;

static void *toggler_main(void *arg)
{
    toggler *g = arg;
    uint64_t rng = 99;
    while (!LOAD(&g->stop)) {
        size_t n = held_n(g->t);
        if (!n) {
            sched_yield();
            continue;
        }
        cp_conn *c = held_at(g->t, rng_next(&rng) % n);
        int r = cp_conn_pause_recv(c);
        if (r == 0)
            ADD(&g->pauses, 1);
        else
            CHECK_EQ(r, -EPIPE);
        if (rng_next(&rng) % 2)
            sched_yield();
        r = cp_conn_resume_recv(c);
        if (r == 0)
            ADD(&g->resumes, 1);
        else
            CHECK_EQ(r, -EPIPE);
    }
    return NULL;
}

static void toggle_case(const cp_server_options *base)
{
    cp_server_options o = *base;
    pz z = {.echo_from = 1, .cross = 1};
    tsrv *t = pause_tsrv(&z);
    t->check_stream = true;
    t->yield = true;
    toggler g = {.t = t};
    z.gate = &g.pauses;
    tsrv_start(t, &o);
    CHECK_EQ(pthread_create(&g.th, NULL, toggler_main, &g), 0);
    stream_echo(t->port, 6, (uint64_t)cpt_scaled(2 << 20, 128 << 10), 20000, 300);
    STORE(&g.stop, 1);
    pthread_join(g.th, NULL);
    fprintf(stderr, "%llu pauses and %llu resumes from a thread, %llu from callbacks\n",
            (unsigned long long)g.pauses, (unsigned long long)g.resumes,
            (unsigned long long)LOAD(&z.cross_calls));
    CHECK(g.pauses > 0 && LOAD(&z.cross_calls) > 0);
    WAIT_FOR(LOAD(&t->closes) == 6, IO_MS);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(pause_and_resume_from_other_threads_while_data_flows)
{
    cp_server_options a = {.threads = 3, .recvs = 1, .recv_buffer = 4096};
    toggle_case(&a);
    cp_server_options b = {.threads = 3, .recvs = 4, .zero_byte = true};
    toggle_case(&b);
    cp_server_options c = {.threads = 2, .recvs = 1, .zero_byte = true};
    toggle_case(&c);
}

/* Paused, the peer sends more and closes: nothing is noticed until the resume; then the
 * rest of the data, then on_close(PEER). */
static void pause_peer_close_case(const cp_server_options *base)
{
    cp_server_options o = *base;
    o.threads = 2;
    pz z = {.pause_max = 1};
    tsrv *t = pause_tsrv(&z);
    t->check_stream = true;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    uint64_t sent = 0;
    send_stream_to(fd, 5, &sent, 100);
    WAIT_FOR(LOAD(&z.paused) == 1, IO_MS);
    send_stream_to(fd, 5, &sent, 200000);
    close(fd);
    usleep(200000); /* nothing may happen meanwhile: this only gives it the chance */
    CHECK_EQ(LOAD(&t->closes), 0);
    CHECK(LOAD(&z.bytes) - LOAD(&z.at_bytes) <= rx_bound(t, &o));
    CHECK_OK(cp_conn_resume_recv(held_at(t, 0)));
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&z.bytes), sent);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_PEER]), 1);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(pause_then_the_peer_closes)
{
    cp_server_options a = {.recvs = 1, .recv_buffer = 4096};
    pause_peer_close_case(&a);
    cp_server_options b = {.recvs = 2, .zero_byte = true};
    pause_peer_close_case(&b);
}

/* A paused connection whose peer keeps its sends queued does not hold up the shutdown:
 * the close reads (and drops) the input, and the connection closes without the deadline. */
static void pause_shutdown_case(const cp_server_options *base)
{
    cp_server_options o = *base;
    o.threads = 2;
    o.tick_ms = 20;
    pz z = {.pause_max = 1};
    tsrv *t = tsrv_new(ECHO_NONE);
    t->check_stream = true;
    t->hook = pause_hook;
    t->ctx = &z;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    uint64_t sent = 0;
    send_stream_to(fd, 6, &sent, 100);
    WAIT_FOR(LOAD(&z.paused) == 1, IO_MS);
    send_until_blocked(fd, 6, &sent, 256ull << 20);
    int64_t t0 = cpt_now_ms();
    int r = cp_server_shutdown(t->sv, 20000);
    fprintf(stderr, "shutdown: %d after %lld ms\n", r, (long long)(cpt_now_ms() - t0));
    CHECK_EQ(r, 0);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_SHUTDOWN]), 1);
    expect_closed(fd, IO_MS);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* Paused with receives outstanding (recvs > 1), the peer ends its side with nothing more
 * to send: a receive that was outstanding reports the end, which, as for data sent after
 * the pause, waits for the resume. The application may still hold what it must answer (a
 * proxy whose upstream is slow): here the answer is sent from the test's thread after the
 * end, then the resume. (Before, the end was acted on at once: the graceful close began,
 * or on_end ran, while paused, and the answer got -EPIPE.) One worker, and two echoes on
 * another connection after the end, so that the end's completion has been handled when
 * the test looks. */
static void pause_then_end_case(const cp_server_options *base)
{
    cp_server_options o = *base;
    o.threads = 1;
    pz z = {.pause_max = 1, .echo_from = 2};
    tsrv *t = pause_tsrv(&z);
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    uint8_t req[100], back[100];
    pattern_fill(7, 0, req, sizeof req);
    send_all(fd, req, sizeof req);
    WAIT_FOR(LOAD(&z.bytes) == sizeof req, IO_MS);
    CHECK_EQ(LOAD(&z.paused), 1);
    CHECK_EQ(shutdown(fd, SHUT_WR), 0);
    int fence = connect_to(t->port);
    exchange(fence, 8, 1000);
    exchange(fence, 8, 1000);
    CHECK_EQ(LOAD(&t->closes), 0);
    CHECK_EQ(LOAD(&t->ends), 0);
    cp_conn *c = held_at(t, 0);
    CHECK_EQ(cp_conn_send(c, req, sizeof req), 0);
    CHECK_OK(cp_conn_resume_recv(c));
    recv_all(fd, back, sizeof back);
    CHECK(memcmp(back, req, sizeof req) == 0);
    if (o.half_close) {
        WAIT_FOR(LOAD(&t->ends) == 1, IO_MS);
        cp_conn_close(c);
    }
    expect_closed(fd, IO_MS);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[o.half_close ? CP_CLOSE_LOCAL : CP_CLOSE_PEER]), 1);
    close(fd);
    close(fence);
    if (o.half_close) {
        WAIT_FOR(LOAD(&t->ends) == 2, IO_MS);
        cp_conn_close(held_at(t, 1));
    }
    WAIT_FOR(LOAD(&t->closes) == 2, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(pause_then_the_peer_ends_with_a_receive_outstanding)
{
    cp_server_options a = {.recvs = 2, .recv_buffer = 4096};
    pause_then_end_case(&a);
    cp_server_options b = {.recvs = 3, .zero_byte = true};
    pause_then_end_case(&b);
    cp_server_options c = {.recvs = 2, .recv_buffer = 4096, .half_close = true};
    pause_then_end_case(&c);
    cp_server_options d = {.recvs = 2, .zero_byte = true, .half_close = true};
    pause_then_end_case(&d);
}

TEST(pause_then_shutdown_completes)
{
    cp_server_options a = {.recvs = 1, .recv_buffer = 4096};
    pause_shutdown_case(&a);
    cp_server_options b = {.recvs = 1, .zero_byte = true};
    pause_shutdown_case(&b);
}

static bool peer_closed(int fd)
{
    uint8_t b;
    ssize_t r = recv(fd, &b, 1, MSG_DONTWAIT);
    return r == 0 || (r < 0 && errno != EAGAIN);
}

/* Neither the handshake nor the idle timeout reaps a connection the application paused
 * (one paused in on_open, before any data; one after its first data); both count again
 * from the resume. A silent connection that is not paused is reaped meanwhile. */
TEST(paused_connections_are_not_reaped_until_resumed)
{
    enum { IDLE_MS = 400, TICK = 20 };
    cp_server_options o = {
        .threads = 2, .handshake_timeout_ms = IDLE_MS, .idle_timeout_ms = IDLE_MS, .tick_ms = TICK};
    pz z = {.pause_max = 2};
    tsrv *t = pause_tsrv(&z);
    tsrv_start(t, &o);
    STORE(&t->pause_on_open, 1);
    int a = connect_to(t->port);
    WAIT_FOR(held_n(t) == 1, IO_MS);
    STORE(&t->pause_on_open, 0);
    int b = connect_to(t->port);
    WAIT_FOR(held_n(t) == 2, IO_MS);
    send_all(b, "x", 1);
    WAIT_FOR(LOAD(&z.paused) == 1, IO_MS);
    int silent = connect_to(t->port);
    int64_t t0 = cpt_now_ms();
    expect_closed(silent, IDLE_MS + 1000);
    /* Three timeouts long. */
    while (cpt_now_ms() - t0 < 3 * IDLE_MS) {
        CHECK(!peer_closed(a));
        CHECK(!peer_closed(b));
        usleep(10000);
    }
    CHECK_EQ(LOAD(&t->closes), 1);
    CHECK_EQ(tsrv_stats(t).conns_reaped, 1);
    int64_t tr = cpt_now_ms();
    CHECK_OK(cp_conn_resume_recv(held_at(t, 0)));
    CHECK_OK(cp_conn_resume_recv(held_at(t, 1)));
    size_t data;
    int64_t ca = wait_peer_close(a, tr + IDLE_MS + 2000, &data);
    int64_t cb = wait_peer_close(b, tr + IDLE_MS + 2000, &data);
    fprintf(stderr, "reaped %lld and %lld ms after the resume\n", (long long)(ca - tr),
            (long long)(cb - tr));
    CHECK(ca >= 0 && cb >= 0);
    CHECK(ca - tr >= IDLE_MS - TICK - 5);
    CHECK(cb - tr >= IDLE_MS - TICK - 5);
    WAIT_FOR(LOAD(&t->closes) == 3, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_HANDSHAKE_TIMEOUT]), 2); /* silent and a */
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_IDLE_TIMEOUT]), 1);
    close(a);
    close(b);
    close(silent);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* The two pauses combine: reading runs only when neither holds. A client that does not
 * read its echo makes backpressure pause the connection; a resume by the application then
 * keeps it paused, and so does the replies' draining while the application's pause holds;
 * only both ended read again, and the whole stream is echoed byte-exact. */
static void pause_backpressure_case(const cp_server_options *base)
{
    cp_server_options o = *base;
    o.threads = 2;
    o.max_pending_send = 65536;
    pz z = {.echo_from = 1};
    tsrv *t = pause_tsrv(&z);
    t->check_stream = true;
    t->sndbuf = 4096;
    tsrv_start(t, &o);
    int fd = connect_not_reading(t->port); /* (until it reads below) */
    uint64_t sent = 0, got = 0;
    send_until_blocked(fd, 8, &sent, 256ull << 20);
    CHECK(tsrv_stats(t).backpressure_events > 0);
    cp_conn *c = held_at(t, 0);
    uint32_t *cst = (uint32_t *)&c->state; /* low half: the flags */
    CHECK(LOAD(cst) & CF_PAUSED);
    /* Backpressure holds: the application's pause and resume leave it paused. */
    CHECK_OK(cp_conn_pause_recv(c));
    CHECK_OK(cp_conn_resume_recv(c));
    uint64_t in0 = LOAD(&z.bytes);
    usleep(200000); /* a wrong resume would read on meanwhile: this gives it the chance */
    CHECK_EQ(LOAD(&z.bytes), in0);
    /* Paused by the application, the replies drain: still no reading. */
    CHECK_OK(cp_conn_pause_recv(c));
    uint8_t buf[65536], want[65536];
    while (got < in0) {
        CHECK(wait_fd(fd, POLLIN, cpt_now_ms() + IO_MS));
        ssize_t k = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        CHECK(k > 0);
        stream_fill(8, got, want, (size_t)k);
        CHECK(memcmp(buf, want, (size_t)k) == 0);
        got += (uint64_t)k;
    }
    WAIT_FOR(!(LOAD(cst) & CF_PAUSED), IO_MS); /* the drain ended the backpressure */
    usleep(200000);
    CHECK_EQ(LOAD(&z.bytes), in0);
    CHECK_EQ(cp_conn_pending(c), 0);
    /* Both ended: everything is read and echoed. */
    CHECK_OK(cp_conn_resume_recv(c));
    uint64_t total = sent + (1 << 20);
    uint8_t tx[16384];
    int64_t deadline = cpt_now_ms() + IO_MS;
    while (got < total) {
        CHECK(cpt_now_ms() < deadline);
        short ev = (short)(POLLIN | (sent < total ? POLLOUT : 0));
        CHECK(wait_fd(fd, ev, deadline));
        if (sent < total) {
            size_t n = total - sent < sizeof tx ? (size_t)(total - sent) : sizeof tx;
            stream_fill(8, sent, tx, n);
            ssize_t w = send(fd, tx, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            CHECK(w > 0 || errno == EAGAIN);
            if (w > 0)
                sent += (uint64_t)w;
        }
        ssize_t k = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (k > 0) {
            stream_fill(8, got, want, (size_t)k);
            CHECK(memcmp(buf, want, (size_t)k) == 0);
            got += (uint64_t)k;
        } else {
            CHECK(k < 0 && errno == EAGAIN);
        }
    }
    CHECK_EQ(LOAD(&z.bytes), total);
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(pause_and_backpressure_combine)
{
    cp_server_options a = {.recvs = 1, .recv_buffer = 4096};
    pause_backpressure_case(&a);
    cp_server_options b = {.recvs = 2, .zero_byte = true};
    pause_backpressure_case(&b);
}

/* Zero-byte mode: paused connections whose peers keep sending leave the shared receive
 * pool to the others. On io_uring a socket's background (multishot) receive went on
 * taking pool buffers after the server stopped posting receives, up to its share
 * (pool_per_socket); 12 paused sockets x 4 took the whole 32-buffer pool, and a 13th
 * connection starved. The pause stops it. */
TEST(paused_connections_leave_the_pool_to_others)
{
    enum { PAUSED = 12 };
    cp_server_options o = {.threads = 2, .zero_byte = true};
    o.port_options.pool_buffers = 32;
    o.port_options.pool_per_socket = 4;
    o.port_options.flags = CP_PORT_WHOLE_BUFFERS;
    pz z = {.pause_max = PAUSED, .echo_from = PAUSED + 1};
    tsrv *t = pause_tsrv(&z);
    tsrv_start(t, &o);
    int fds[PAUSED];
    for (int i = 0; i < PAUSED; i++) {
        fds[i] = connect_to(t->port);
        WAIT_FOR(held_n(t) == (size_t)i + 1, IO_MS); /* ids in connect order */
        send_all(fds[i], "x", 1);
        WAIT_FOR(LOAD(&z.paused) == (uint32_t)i + 1, IO_MS);
    }
    /* Each paused peer sends more than its share could take. */
    uint8_t tx[65536];
    memset(tx, 'y', sizeof tx);
    uint64_t total = 200000;
    for (int i = 0; i < PAUSED; i++) {
        ssize_t w = send(fds[i], tx, sizeof tx, MSG_NOSIGNAL | MSG_DONTWAIT);
        CHECK(w > 0);
        total += 1 + (uint64_t)w;
    }
    int other = connect_to(t->port);
    int r = try_exchange(other, 3, 200000, cpt_now_ms() + 5000);
    fprintf(stderr, "the unpaused connection's echo: %s\n", r ? strerror(-r) : "complete");
    CHECK_EQ(r, 0);
    for (int i = 0; i < PAUSED; i++)
        CHECK_OK(cp_conn_resume_recv(held_at(t, (size_t)i)));
    close(other);
    for (int i = 0; i < PAUSED; i++)
        close(fds[i]);
    WAIT_FOR(LOAD(&t->closes) == PAUSED + 1, IO_MS);
    CHECK_EQ(LOAD(&z.bytes), total); /* every byte sent reached on_data */
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* cp_conn_resume_recv() cannot fail. A resume that finds the connection's lock taken (a
 * callback of it is running: here on_data or on_open, which pause and then resume) leaves
 * the read to others. It was a work item, which cannot be queued when the pool's queue is
 * full or memory runs out (fail point pool_submit): the resume paused the connection
 * again and returned -EAGAIN, while a resume racing it had already returned 0 (it found
 * the connection unpaused), and the connection stayed paused for good. Now the receive
 * being handled reads again (recvs 1, from on_data), or a worker gets a completion on the
 * idle receive context (recvs > 1, or from on_open), which cannot fail: every resume
 * returns 0 and the data flows. */
#ifdef CPORT_INJECT
static void pause_resume_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    if (u->frames == 0 && !LOAD(&t->resume_on_open)) {
        int r1 = cp_conn_pause_recv(c), r2 = cp_conn_resume_recv(c);
        if (r1 != 0 || r2 != 0)
            note_error(t, "in on_data: cp_conn_pause_recv %d, cp_conn_resume_recv %d", r1, r2);
    }
    note_send(t, cp_conn_send(c, data, len));
}

static void resume_inside_case(const cp_server_options *base, bool in_on_open)
{
    cp_server_options o = *base;
    o.threads = 2;
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hook = pause_resume_hook;
    STORE(&t->pause_on_open, in_on_open);
    STORE(&t->resume_on_open, in_on_open);
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    exchange(fd, 1, 100);
    if (t->first_error[0])
        fprintf(stderr, "recvs %u%s, from %s: %s\n", o.recvs, o.zero_byte ? " zero-byte" : "",
                in_on_open ? "on_open" : "on_data", t->first_error);
    CHECK_EQ(LOAD(&t->error_once), 0);
    exchange(fd, 2, 200000); /* reading resumed */
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}
#endif

TEST(a_resume_left_to_a_worker_cannot_fail)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "pool_submit", 1)); /* before any thread */
    cp_server_options a = {.recvs = 1, .recv_buffer = 4096};
    resume_inside_case(&a, false);
    resume_inside_case(&a, true);
    cp_server_options b = {.recvs = 2, .zero_byte = true};
    resume_inside_case(&b, false);
    resume_inside_case(&b, true);
    cp_server_options c = {.recvs = 1, .zero_byte = true};
    resume_inside_case(&c, false);
    resume_inside_case(&c, true);
    unsetenv("CPORT_INJECT_FAIL");
#endif
}

/* A resume from another thread that finds the single receive taken (its completion being
 * handled) leaves the read to it; the receive, letting go, looks at the pause again. Here
 * the resume comes after its look (paused: not posted again) and before it lets go: the
 * delay point rx_stopping holds it there while this thread resumes, once on_data (which
 * paused) has returned. The resume must return 0 and reading go on. (Also fails where the
 * resume needs a work item: fail point pool_submit.) */
#ifdef CPORT_INJECT
static void resume_after_the_look_case(const cp_server_options *base)
{
    cp_server_options o = *base;
    o.threads = 2;
    pz z = {.pause_max = 1, .echo_from = 1};
    tsrv *t = pause_tsrv(&z);
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    uint8_t msg[100], back[100];
    pattern_fill(3, 0, msg, sizeof msg);
    send_all(fd, msg, sizeof msg);
    WAIT_FOR(LOAD(&z.paused) == 1, IO_MS);
    cp_conn *c = held_at(t, 0);
    uconn *u = cp_conn_user(c);
    WAIT_FOR(LOAD(&u->in_cb) == 0, IO_MS); /* on_data returned: the receive looks, waits */
    CHECK_OK(cp_conn_resume_recv(c));
    recv_all(fd, back, sizeof back);
    CHECK(memcmp(back, msg, sizeof msg) == 0);
    exchange(fd, 4, 100000); /* reading resumed */
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}
#endif

TEST(a_resume_after_the_receives_last_look_reads_again)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    /* Before any thread. */
    CHECK_OK(setenv("CPORT_INJECT_FAIL", "pool_submit", 1));
    CHECK_OK(setenv("CPORT_INJECT_DELAY", "rx_stopping:300000", 1));
    cp_server_options a = {.recvs = 1, .recv_buffer = 4096};
    resume_after_the_look_case(&a);
    cp_server_options b = {.recvs = 1, .zero_byte = true};
    resume_after_the_look_case(&b);
    unsetenv("CPORT_INJECT_FAIL");
    unsetenv("CPORT_INJECT_DELAY");
#endif
}

/* A timeout without on_timeout aborts the connection: with a reset if replies were queued
 * (the stream is cut), with a FIN if none were. Another thread may send meanwhile (it holds
 * a cp_conn_ref, not the connection's lock): a send queued after the sweep looked at the
 * queue (empty: a FIN) was cancelled by the close, and the peer read the part the kernel
 * held, then the FIN, a cut stream passing for a whole one. The delay point timed_out holds
 * the sweep after its look while this thread sends 1 MiB to a peer that reads nothing until
 * the connection has closed: the send must be refused (then a FIN, nothing before it), or,
 * accepted, end in a reset. The sweep's pin on the connection (one more operation
 * reference) says it is there. */
TEST(a_send_racing_a_timeouts_abort_is_refused_or_reset)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    CHECK_OK(setenv("CPORT_INJECT_DELAY", "timed_out:1000000", 1)); /* before any thread */
    static uint8_t big[1 << 20];
    cp_server_options o = {.threads = 2, .idle_timeout_ms = 200, .tick_ms = 20};
    pz z = {0}; /* pause_hook only counts */
    tsrv *t = pause_tsrv(&z);
    t->sndbuf = 4096;
    tsrv_start(t, &o);
    int fd = connect_not_reading(t->port);
    send_all(fd, "x", 1);
    WAIT_FOR(LOAD(&z.bytes) == 1, IO_MS);
    cp_conn *c = held_at(t, 0);
    WAIT_FOR(oprefs(c) == 2, IO_MS); /* its life and its receive: the set-up is done */
    WAIT_FOR(oprefs(c) == 3, IO_MS); /* the sweep's pin: the timeout is due */
    int r = cp_conn_send(c, big, sizeof big);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS); /* read nothing before: the send is cut */
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_IDLE_TIMEOUT]), 1);
    size_t got = 0;
    int how = -1;
    CHECK(read_to_close(fd, cpt_now_ms() + IO_MS, &got, &how) >= 0);
    fprintf(stderr, "the send: %s; the peer got %zu bytes, then %s\n",
            r == 0 ? "accepted" : strerror(-r), got, how ? strerror(how) : "EOF");
    if (r == 0) {
        CHECK_EQ(how, ECONNRESET);
    } else {
        CHECK_EQ(r, -EPIPE);
        CHECK_EQ(got, 0);
        CHECK_EQ(how, 0);
    }
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
    unsetenv("CPORT_INJECT_DELAY");
#endif
}

/* ---- half_close and cp_conn_shutdown_send ----------------------------------------------- */

static void end_trailer_hook(tsrv *t, cp_conn *c, uconn *u)
{
    uint64_t rx = u->rx;
    int r = cp_conn_send(c, &rx, sizeof rx);
    if (r != 0)
        note_error(t, "send after on_end: %d", r);
}

/* Read stream `seed` (total bytes) byte-exact, then exactly `tail` (tail_len bytes), then
 * the end of stream. */
static void expect_stream_then(int fd, uint32_t seed, uint64_t total, const void *tail,
                               size_t tail_len)
{
    uint8_t buf[65536], want[65536];
    uint64_t got = 0;
    while (got < total) {
        size_t n = total - got < sizeof buf ? (size_t)(total - got) : sizeof buf;
        recv_all(fd, buf, n);
        stream_fill(seed, got, want, n);
        CHECK(memcmp(buf, want, n) == 0);
        got += n;
    }
    if (tail_len) {
        CHECK(tail_len <= sizeof buf);
        recv_all(fd, buf, tail_len);
        CHECK(memcmp(buf, tail, tail_len) == 0);
    }
    CHECK(wait_fd(fd, POLLIN, cpt_now_ms() + IO_MS));
    CHECK_EQ(recv(fd, buf, 1, MSG_DONTWAIT), 0);
}

/* half_close: the client sends its request and shuts down its sending side; on_end runs
 * once, after every byte was delivered; sends go on after it (one from on_end, one from
 * another thread later, as a proxy's upstream answer would come), and the application's
 * cp_conn_close() ends the connection after them: the client reads everything, then EOF. */
static void half_close_case(const cp_server_options *base)
{
    cp_server_options o = *base;
    o.threads = 2;
    o.half_close = true;
    o.idle_timeout_ms = 300; /* an ended connection is exempt */
    o.tick_ms = 20;
    tsrv *t = tsrv_new(ECHO_COPY);
    t->check_stream = true;
    t->hold_refs = true;
    t->end_hook = end_trailer_hook;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    uint64_t sent = 0, total = 300000;
    send_stream_to(fd, 11, &sent, total);
    CHECK_OK(shutdown(fd, SHUT_WR));
    WAIT_FOR(LOAD(&t->ends) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->end_rx), total);
    usleep(500000); /* past the idle timeout: it must not reap the ended connection */
    CHECK_EQ(LOAD(&t->closes), 0);
    cp_conn *c = held_at(t, 0);
    CHECK_OK(cp_conn_send(c, "late", 4));
    cp_conn_close(c);
    uint8_t tail[12];
    memcpy(tail, &total, 8);
    memcpy(tail + 8, "late", 4);
    expect_stream_then(fd, 11, total, tail, sizeof tail);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->ends), 1);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_LOCAL]), 1);
    CHECK_EQ(LOAD(&t->send_errors) + LOAD(&t->epipe), 0);
    CHECK_EQ(cp_conn_send(c, "x", 1), -EPIPE);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(half_close_sends_after_the_peers_end)
{
    cp_server_options a = {.recvs = 1, .recv_buffer = 4096};
    half_close_case(&a);
    cp_server_options b = {.recvs = 3, .zero_byte = true};
    half_close_case(&b);
    /* Without the option the end closes (the default is unchanged). */
    tsrv *t = tsrv_new(ECHO_COPY);
    cp_server_options d = {.threads = 2};
    tsrv_start(t, &d);
    int fd = connect_to(t->port);
    uint64_t sent = 0;
    send_stream_to(fd, 12, &sent, 1000);
    CHECK_OK(shutdown(fd, SHUT_WR));
    expect_stream_then(fd, 12, 1000, NULL, 0);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->ends), 0);
    CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_PEER]), 1);
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
    /* half_close needs on_end. */
    cp_server *sv;
    cp_server_callbacks cb = {.on_data = t_on_data};
    cp_server_options h = {.half_close = true};
    CHECK_EQ(cp_server_create(&sv, &h, &cb), -EINVAL);
}

enum { SHUT_REPLY = 100000 };

static void shut_send_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)data;
    (void)len;
    if (u->frames != 0)
        return;
    static uint8_t reply[SHUT_REPLY];
    stream_fill(21, 0, reply, sizeof reply);
    int r1 = cp_conn_send(c, reply, sizeof reply);
    int r2 = cp_conn_shutdown_send(c), r3 = cp_conn_shutdown_send(c);
    int r4 = cp_conn_send(c, reply, 1);
    if (r1 != 0 || r2 != 0 || r3 != 0 || r4 != -EPIPE)
        note_error(t, "send %d, shutdown_send %d, again %d, send after it %d", r1, r2, r3, r4);
}

static void end_close_hook(tsrv *t, cp_conn *c, uconn *u)
{
    (void)t;
    (void)u;
    cp_conn_close(c);
}

/* cp_conn_shutdown_send: the reply queued before it reaches the client, then the FIN (the
 * client reads EOF) while the connection stays open: the client keeps sending and the
 * server keeps receiving every byte. The client's close then ends it (on_close PEER; with
 * half_close, on_end, whose cp_conn_close ends it: LOCAL). */
static void shutdown_send_case(const cp_server_options *base, bool half)
{
    cp_server_options o = *base;
    o.threads = 2;
    o.half_close = half;
    tsrv *t = tsrv_new(ECHO_NONE);
    t->check_stream = true;
    t->hook = shut_send_hook;
    t->end_hook = end_close_hook;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    uint64_t sent = 0;
    send_stream_to(fd, 22, &sent, 100);
    expect_stream_then(fd, 21, SHUT_REPLY, NULL, 0); /* ...then EOF */
    CHECK_EQ(LOAD(&t->closes), 0);
    send_stream_to(fd, 22, &sent, 2 << 20);
    WAIT_FOR(LOAD(&t->checked) == sent, IO_MS);
    CHECK_EQ(LOAD(&t->closes), 0);
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->reasons[half ? CP_CLOSE_LOCAL : CP_CLOSE_PEER]), 1);
    CHECK_EQ(LOAD(&t->ends), half ? 1 : 0);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(shutdown_send_ends_the_sending_side_and_reading_goes_on)
{
    cp_server_options a = {.recvs = 1, .recv_buffer = 4096};
    shutdown_send_case(&a, false);
    shutdown_send_case(&a, true);
    cp_server_options b = {.recvs = 2, .zero_byte = true};
    shutdown_send_case(&b, false);
    shutdown_send_case(&b, true);
}

/* cp_conn_shutdown_send racing a send-file: the send-file found the connection taking
 * sends; the shutdown, with nothing queued, sealed the socket and sent the FIN; the
 * send-file then counted its bytes in `pending` and failed to start (-EPIPE), taking them
 * back. A delivery in between saw them, above max_pending_send, and paused reading
 * (backpressure), and no send completion was to come to resume it: the connection never
 * read again, though reading goes on after cp_conn_shutdown_send. With CPORT_INJECT the
 * sender is held at send_file_ref (the shutdown comes) and at send_file_counted (a
 * delivery comes); elsewhere the test skips. */
#ifdef CPORT_INJECT
typedef struct sf_racer {
    cp_conn *c;
    int fd;
    int result;
    int done; /* atomic */
} sf_racer;

static void *sf_racer_main(void *arg)
{
    sf_racer *r = arg;
    uint64_t *block = malloc(sizeof(uint64_t));
    CHECK(block != NULL);
    block[0] = 1 << 20;
    r->result = cp_conn_send_file(r->c, NULL, 0, r->fd, 0, 1 << 20, block);
    if (r->result < 0)
        free(block); /* no on_sent for a send that was refused */
    STORE(&r->done, 1);
    return NULL;
}

static uint64_t op_refs(cp_conn *c)
{
    return (LOAD(&c->state) & CS_OPREF_MASK) / CS_OPREF;
}

/* at_ref holds the sender at send_file_ref (until the shutdown is done), at_counted at
 * send_file_counted (until a delivery saw its bytes); both are shut again at the end. */
static void unqueued_send_case(const cp_server_options *base, gate *at_ref, gate *at_counted)
{
    cp_server_options o = *base;
    o.threads = 2;
    o.max_pending_send = 65536;
    tsrv *t = tsrv_new(ECHO_NONE);
    t->check_stream = true;
    t->hold_refs = true;
    tsrv_start(t, &o);
    int file = cpt_memfd("file");
    CHECK_OK(ftruncate(file, 1 << 20));
    int fd = connect_to(t->port);
    uint64_t sent = 0;
    send_stream_to(fd, 31, &sent, 100);
    WAIT_FOR(LOAD(&t->checked) == sent, IO_MS);
    sf_racer r = {.c = held_at(t, 0), .fd = file};
    cp_conn *c = r.c;
    uint64_t refs = op_refs(c); /* the life reference and the receive */
    pthread_t th;
    CHECK_OK(pthread_create(&th, NULL, sf_racer_main, &r));
    WAIT_FOR(op_refs(c) == refs + 1, IO_MS); /* the sender took its reference */
    CHECK_OK(cp_conn_shutdown_send(c));      /* nothing queued: sealed, FIN */
    gate_open(at_ref);
    WAIT_FOR(cp_conn_pending(c) == 1 << 20, IO_MS); /* the sender counted its bytes */
    send_stream_to(fd, 31, &sent, 200);
    WAIT_FOR(LOAD(&t->checked) == sent, IO_MS);
    WAIT_FOR(LOAD(&c->state) & CF_PAUSED, IO_MS); /* the delivery saw them: backpressure */
    CHECK(!LOAD(&r.done));                        /* (still held) */
    gate_open(at_counted);
    CHECK_OK(pthread_join(th, NULL));
    CHECK_EQ(r.result, -EPIPE);
    CHECK_EQ(cp_conn_pending(c), 0);
    /* Reading goes on. */
    send_stream_to(fd, 31, &sent, 300);
    int64_t deadline = cpt_now_ms() + 10000;
    while (LOAD(&t->checked) < sent && cpt_now_ms() < deadline)
        usleep(1000);
    fprintf(stderr, "%s: %llu of %llu bytes delivered after the send-file failed\n",
            o.zero_byte ? "zero-byte" : "buffered", (unsigned long long)LOAD(&t->checked) - 200,
            (unsigned long long)sent - 200);
    CHECK_EQ(LOAD(&t->checked), sent);
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->order_errors), 0);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
    close(file);
    gate_shut(at_ref);
    gate_shut(at_counted);
}
#endif

TEST(a_send_file_that_fails_after_counting_its_bytes_leaves_no_backpressure)
{
#ifndef CPORT_INJECT
    SKIP("needs a build configured with -DCPORT_INJECT=ON (scripts/test.sh asan)");
#else
    gate at_ref, at_counted;
    gate_init(&at_ref);
    gate_init(&at_counted);
    char env[96];
    snprintf(env, sizeof env, "send_file_ref:%ld@%d,send_file_counted:%ld@%d", GATE_US, at_ref.r,
             GATE_US, at_counted.r);
    CHECK_OK(setenv("CPORT_INJECT_DELAY", env, 1)); /* before any thread */
    cp_server_options a = {.recvs = 1, .recv_buffer = 4096};
    unqueued_send_case(&a, &at_ref, &at_counted);
    cp_server_options b = {.recvs = 1, .zero_byte = true};
    unqueued_send_case(&b, &at_ref, &at_counted);
    gate_free(&at_ref);
    gate_free(&at_counted);
#endif
}

/* Each worker thread (and its record) is made by cp_server_create: a count past
 * CP_SERVER_THREADS_MAX is refused at once. UINT_MAX threads made it allocate a record per
 * thread, about a terabyte, before the pool could fail. */
TEST(a_thread_count_beyond_the_limit_is_refused)
{
    cp_server_callbacks cb = {.on_data = ignore_data};
    cp_server *sv = (cp_server *)1;
    cp_server_options o = {.bind = "127.0.0.1", .threads = CP_SERVER_THREADS_MAX + 1};
    CHECK_EQ(cp_server_create(&sv, &o, &cb), -EINVAL);
    CHECK(sv == NULL);
    o.threads = UINT_MAX;
    CHECK_EQ(cp_server_create(&sv, &o, &cb), -EINVAL);
    o.threads = 2;
    CHECK_OK(cp_server_create(&sv, &o, &cb));
    CHECK_OK(cp_server_destroy(sv));
}

/* cp_conn_send_frame() is framed mode's: on a stream server it is refused with -EINVAL and
 * sends nothing (it sent a length header the peer's protocol did not have, silently). */
static void frame_on_stream_hook(tsrv *t, cp_conn *c, uconn *u, const uint8_t *data, size_t len)
{
    (void)u;
    int *r = t->ctx;
    STORE(r, cp_conn_send_frame(c, data, len));
    note_send(t, cp_conn_send(c, "ok", 2));
}

TEST(send_frame_on_a_stream_server_is_refused)
{
    int r = 1;
    tsrv *t = tsrv_new(ECHO_NONE);
    t->hook = frame_on_stream_hook;
    t->ctx = &r;
    cp_server_options o = {.threads = 2};
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    send_all(fd, "a", 1);
    char buf[2];
    recv_all(fd, buf, 2);
    fprintf(stderr, "cp_conn_send_frame on a stream server: %d; the peer read %02x %02x\n",
            LOAD(&r), (unsigned char)buf[0], (unsigned char)buf[1]);
    CHECK_EQ(LOAD(&r), -EINVAL);
    CHECK_EQ(memcmp(buf, "ok", 2), 0); /* nothing went out before the next send */
    close(fd);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(LOAD(&t->send_errors), 0);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* Framed mode: the peer's end of stream inside a frame (a header announcing 100 bytes, 10
 * of them sent; or 2 bytes of a header) is a truncated message, a protocol error: the
 * connection closes as CP_CLOSE_BAD_FRAME (counted in frames_rejected), gracefully (the
 * reply to the whole frame before it arrives, then EOF), with or without half_close, and
 * on_end does not run: it ran before (the partial frame dropped unseen), and without
 * half_close the close said CP_CLOSE_PEER. An end between frames is still an end. */
static void truncated_frame_case(const cp_server_options *base, bool half, size_t cut)
{
    tsrv *t = tsrv_new(ECHO_FRAME);
    t->end_hook = end_close_hook;
    cp_server_options o = *base;
    o.threads = 2;
    o.framed = true;
    o.half_close = half;
    tsrv_start(t, &o);
    int fd = connect_to(t->port);
    uint8_t msg[4 + 100];
    cp_frame_header(msg, 5);
    memcpy(msg + 4, "hello", 5);
    send_all(fd, msg, 9);
    uint8_t got[9];
    recv_all(fd, got, sizeof got);
    CHECK_EQ(memcmp(got, msg, 9), 0);
    if (cut) {
        cp_frame_header(msg, 100);
        memset(msg + 4, 'x', 100);
        send_all(fd, msg, cut);
    }
    CHECK_OK(shutdown(fd, SHUT_WR));
    CHECK(wait_fd(fd, POLLIN, cpt_now_ms() + IO_MS));
    CHECK_EQ(recv(fd, got, 1, MSG_DONTWAIT), 0); /* EOF: nothing more, no reset */
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    fprintf(stderr,
            "half_close %d, recvs %u, %zu bytes of the frame: bad-frame %llu, peer %llu, "
            "on_end %llu (%s)\n",
            half, o.recvs, cut, (unsigned long long)LOAD(&t->reasons[CP_CLOSE_BAD_FRAME]),
            (unsigned long long)LOAD(&t->reasons[CP_CLOSE_PEER]),
            (unsigned long long)LOAD(&t->ends), LOAD(&t->bad_frames) ? t->bad_frame_why[0] : "");
    if (cut) {
        CHECK_EQ(LOAD(&t->reasons[CP_CLOSE_BAD_FRAME]), 1);
        CHECK_EQ(LOAD(&t->ends), 0);
        CHECK_EQ(tsrv_stats(t).frames_rejected, 1);
        CHECK(strstr(t->bad_frame_why[0], "incomplete frame") != NULL);
    } else {
        CHECK_EQ(LOAD(&t->reasons[half ? CP_CLOSE_LOCAL : CP_CLOSE_PEER]), 1);
        CHECK_EQ(LOAD(&t->ends), half ? 1 : 0);
        CHECK_EQ(tsrv_stats(t).frames_rejected, 0);
    }
    close(fd);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

TEST(a_stream_ending_inside_a_frame_closes_as_a_bad_frame)
{
    cp_server_options a = {.recvs = 1, .recv_buffer = 4096};
    cp_server_options b = {.recvs = 2, .zero_byte = true};
    for (int half = 0; half < 2; half++) {
        for (int i = 0; i < 2; i++) {
            const cp_server_options *o = i ? &b : &a;
            truncated_frame_case(o, half, 4 + 10); /* header and part of the payload */
            truncated_frame_case(o, half, 2);      /* part of a header */
            truncated_frame_case(o, half, 0);      /* between frames: an end */
        }
    }
}

/* ---- IPv6 listeners ------------------------------------------------------------------------ */

/* Connect a non-blocking socket of addr's family to addr; 0 and the socket in *fdp, or the
 * connect's errno (the socket closed). */
static int try_connect_addr(const struct sockaddr *addr, socklen_t len, int *fdp)
{
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0);
    int one = 1, err = 0;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, addr, len) < 0) {
        err = errno;
        if (err == EINPROGRESS) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int r;
            while ((r = poll(&p, 1, IO_MS)) < 0 && errno == EINTR)
                ;
            CHECK_EQ(r, 1);
            socklen_t l = sizeof err;
            CHECK_EQ(getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l), 0);
        }
    }
    if (err) {
        close(fd);
        return err;
    }
    *fdp = fd;
    return 0;
}

static struct sockaddr_in6 loopback6(uint16_t port)
{
    struct sockaddr_in6 sa = {
        .sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    return sa;
}

/* A connected non-blocking socket to ::1 (the connect must succeed). */
static int connect6_to(uint16_t port)
{
    struct sockaddr_in6 sa = loopback6(port);
    int fd = -1, err = try_connect_addr((struct sockaddr *)&sa, sizeof sa, &fd);
    if (err)
        fprintf(stderr, "connect to [::1]:%u: %s\n", port, strerror(err));
    CHECK_EQ(err, 0);
    return fd;
}

/* The local port of a connected socket. */
static uint16_t local_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    CHECK_EQ(getsockname(fd, (struct sockaddr *)&ss, &len), 0);
    return ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port);
}

/* The i-th held connection's peer, which must be IPv6 with the address `want` (text) and
 * the port `port`; and its IPV6_V6ONLY (inherited from the listener) must be `v6only`. */
static void check_peer6(tsrv *t, size_t i, const char *want, uint16_t port, int v6only)
{
    cp_conn *c = held_at(t, i);
    CHECK(c != NULL);
    struct sockaddr_storage ss;
    socklen_t len = 0;
    memset(&ss, 0, sizeof ss);
    CHECK_OK(cp_conn_peer(c, &ss, &len));
    CHECK_EQ(ss.ss_family, AF_INET6);
    CHECK_EQ(len, sizeof(struct sockaddr_in6));
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&ss;
    char text[INET6_ADDRSTRLEN];
    CHECK(inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text) != NULL);
    fprintf(stderr, "peer %zu: [%s]:%u\n", i, text, ntohs(in6->sin6_port));
    struct in6_addr a;
    CHECK_EQ(inet_pton(AF_INET6, want, &a), 1);
    CHECK(memcmp(&a, &in6->sin6_addr, sizeof a) == 0);
    CHECK_EQ(ntohs(in6->sin6_port), port);
    int on = -1;
    socklen_t olen = sizeof on;
    CHECK_OK(cp_conn_getsockopt(c, IPPROTO_IPV6, IPV6_V6ONLY, &on, &olen));
    CHECK_EQ(on, v6only);
}

/* A server bound to "::1" (and to "[::1]", the bracketed form) echoes byte-exact over IPv6:
 * cp_server_start() took IPv4 addresses only and failed with -EINVAL. */
TEST(ipv6_loopback_echo)
{
    cpt_need_ipv6_loopback();
    static const char *const binds[] = {"::1", "[::1]"};
    for (size_t b = 0; b < 2; b++) {
        tsrv *t = tsrv_new(ECHO_DATA);
        t->hold_refs = true;
        cp_server_options o = {.threads = 2};
        tsrv_start_at(t, &o, binds[b]);
        int fds[3];
        for (int i = 0; i < 3; i++) {
            fds[i] = connect6_to(t->port);
            WAIT_FOR(held_count(t) == (size_t)i + 1, IO_MS);
            check_peer6(t, (size_t)i, "::1", local_port(fds[i]), 1);
        }
        for (int i = 0; i < 3; i++)
            exchange(fds[i], 600u + (uint32_t)i, i == 0 ? 1 : (size_t)(200000 << i));
        for (int i = 0; i < 3; i++)
            close(fds[i]);
        WAIT_FOR(LOAD(&t->closes) == 3, IO_MS);
        cp_server_stats st = tsrv_stats(t);
        CHECK_EQ(st.conns_total, 3);
        CHECK_EQ(st.bytes_in, 1 + 400000 + 800000);
        CHECK_EQ(st.bytes_out, st.bytes_in);
        CHECK_EQ(tsrv_stop(t, 1000), 0);
    }
}

/* A server bound to "::" serves an IPv4 client and an IPv6 one through one listener (set
 * IPV6_V6ONLY off itself, whatever net.ipv6.bindv6only says); cp_conn_peer reports both as
 * AF_INET6, the IPv4 one v4-mapped. A server bound to the v4-mapped ::ffff:127.0.0.1
 * serves IPv4 (Linux refuses that bind with IPV6_V6ONLY on). */
TEST(ipv6_any_serves_both_families)
{
    cpt_need_ipv6_loopback();
    tsrv *t = tsrv_new(ECHO_DATA);
    t->hold_refs = true;
    cp_server_options o = {.threads = 2};
    tsrv_start_at(t, &o, "::");
    int v4 = connect_to(t->port);
    WAIT_FOR(held_count(t) == 1, IO_MS);
    int v6 = connect6_to(t->port);
    WAIT_FOR(held_count(t) == 2, IO_MS);
    check_peer6(t, 0, "::ffff:127.0.0.1", local_port(v4), 0);
    check_peer6(t, 1, "::1", local_port(v6), 0);
    exchange(v4, 41, 100000);
    exchange(v6, 42, 100000);
    close(v4);
    close(v6);
    WAIT_FOR(LOAD(&t->closes) == 2, IO_MS);
    CHECK_EQ(tsrv_stats(t).bytes_out, 200000);
    CHECK_EQ(tsrv_stop(t, 1000), 0);

    t = tsrv_new(ECHO_DATA);
    t->hold_refs = true;
    tsrv_start_at(t, &o, "::ffff:127.0.0.1");
    v4 = connect_to(t->port);
    WAIT_FOR(held_count(t) == 1, IO_MS);
    check_peer6(t, 0, "::ffff:127.0.0.1", local_port(v4), 0);
    exchange(v4, 43, 1000);
    close(v4);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
}

/* A server bound to "::1" is IPv6 only (IPV6_V6ONLY on): a connect to 127.0.0.1 on its
 * port is refused. The test holds 127.0.0.1 on that port itself, bound and not listening,
 * so that nothing else on the machine can answer there. */
TEST(ipv6_loopback_refuses_ipv4)
{
    cpt_need_ipv6_loopback();
    int hold = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(hold >= 0);
    struct sockaddr_in sa = loopback(0);
    CHECK_EQ(bind(hold, (struct sockaddr *)&sa, sizeof sa), 0);
    uint16_t port = local_port(hold);
    tsrv *t = tsrv_new(ECHO_DATA);
    t->hold_refs = true;
    cp_server_options o = {.threads = 1, .port = port};
    tsrv_start_at(t, &o, "::1");
    CHECK_EQ(t->port, port);
    sa = loopback(port);
    int fd = -1;
    CHECK_EQ(try_connect_addr((struct sockaddr *)&sa, sizeof sa, &fd), ECONNREFUSED);
    int v6 = connect6_to(port); /* while IPv6 is served */
    WAIT_FOR(held_count(t) == 1, IO_MS);
    check_peer6(t, 0, "::1", local_port(v6), 1);
    exchange(v6, 44, 5000);
    close(v6);
    WAIT_FOR(LOAD(&t->closes) == 1, IO_MS);
    CHECK_EQ(tsrv_stats(t).conns_total, 1);
    CHECK_EQ(tsrv_stop(t, 1000), 0);
    close(hold);
}

/* Bind strings that are neither IPv4 nor IPv6 fail cp_server_start() with -EINVAL and
 * leave no listener (no descriptor) behind; the server is then destroyed cleanly. */
TEST(ipv6_bad_bind_strings_are_refused)
{
    static const char *const bad[] = {"::g",
                                      "1.2.3",
                                      "[::1",
                                      "",
                                      "::1]",
                                      "[]",
                                      "[1.2.3.4]",
                                      "localhost",
                                      "::1%lo",
                                      "[::1]:80",
                                      "1:2:3:4:5:6:7:8:9"};
    cp_server_callbacks cb = {.on_data = ignore_data};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cp_server_options o = {.threads = 1, .bind = bad[i]};
        o.port_options.flags |= CP_PORT_QUIET;
        cp_server *sv;
        CHECK_OK(cp_server_create(&sv, &o, &cb));
        int fds0 = cpt_count_fds();
        int r = cp_server_start(sv);
        int fds1 = cpt_count_fds();
        if (r != -EINVAL || fds1 != fds0)
            fprintf(stderr, "bind \"%s\": %d (%s), descriptors %d -> %d\n", bad[i], r,
                    cpt_strerror(r), fds0, fds1);
        CHECK_EQ(r, -EINVAL);
        CHECK_EQ(fds1, fds0);
        CHECK_EQ(cp_server_listen_port(sv), 0);
        CHECK_OK(cp_server_destroy(sv));
    }
}
