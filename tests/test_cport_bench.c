/* Tests of the load generator (tools/cport-bench) against the reference echo servers
 * (bench/ref_echo, bench/ref_uring_echo): all are run as child processes from the test
 * binary's directory. */
/* test-backends: none */
#include "harness.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <liburing.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { OUT_CAP = 256 * 1024, RUN_DEADLINE_MS = 30000 };

static char bindir[PATH_MAX];

static const char *bin_path(const char *name)
{
    static char path[PATH_MAX + 64];
    if (!bindir[0]) {
        ssize_t n = readlink("/proc/self/exe", bindir, sizeof bindir - 1);
        CHECK(n > 0);
        bindir[n] = 0;
        char *slash = strrchr(bindir, '/');
        CHECK(slash != NULL);
        *slash = 0;
    }
    snprintf(path, sizeof path, "%s/%s", bindir, name);
    if (access(path, X_OK) != 0) {
        fprintf(stderr, "%s not built\n", path);
        exit(1);
    }
    return path;
}

/* ---- the server -------------------------------------------------------------------------- */
struct server {
    pid_t pid;
    int port;
};

/* Starts bench/<name> on an ephemeral port, with one optional extra flag and value, and
 * with at most `nofile` descriptors when nofile > 0. */
static struct server server_spawn(const char *name, const char *extra, const char *extra_val,
                                  rlim_t nofile)
{
    int p[2];
    CHECK(pipe2(p, O_CLOEXEC) == 0);
    const char *exe = bin_path(name);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        dup2(p[1], STDOUT_FILENO);
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* a failed CHECK exits: the server goes too */
        struct rlimit rl = {nofile, nofile};
        if (nofile > 0 && setrlimit(RLIMIT_NOFILE, &rl) < 0)
            _exit(126);
        if (extra)
            execl(exe, name, "--port", "0", extra, extra_val, (char *)NULL);
        else
            execl(exe, name, "--port", "0", (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    char line[128];
    size_t len = 0;
    int64_t deadline = cpt_now_ms() + 5000;
    while (len < sizeof line - 1 && !memchr(line, '\n', len)) {
        struct pollfd pfd = {.fd = p[0], .events = POLLIN};
        int left = (int)(deadline - cpt_now_ms());
        CHECK(left > 0 && poll(&pfd, 1, left) == 1);
        ssize_t n = read(p[0], line + len, sizeof line - 1 - len);
        CHECK(n > 0);
        len += (size_t)n;
    }
    close(p[0]);
    line[len] = 0;
    struct server s = {.pid = pid};
    CHECK(sscanf(line, "listening on port %d", &s.port) == 1);
    CHECK(s.port > 0);
    return s;
}

static struct server server_start_named(const char *name, const char *extra, const char *extra_val)
{
    return server_spawn(name, extra, extra_val, 0);
}

static struct server server_start(const char *extra, const char *extra_val)
{
    return server_start_named("ref_echo", extra, extra_val);
}

static int wait_child(pid_t pid, int timeout_ms)
{
    int64_t deadline = cpt_now_ms() + timeout_ms;
    for (;;) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        CHECK(r >= 0);
        if (r == pid)
            return st;
        if (cpt_now_ms() > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            fprintf(stderr, "child %d did not finish in time; killed\n", (int)pid);
            exit(1);
        }
        usleep(10000);
    }
}

static void server_stop(struct server *s)
{
    CHECK(kill(s->pid, SIGTERM) == 0);
    int st = wait_child(s->pid, 5000);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
}

/* Runs cmd through the shell; its standard output (cmd adds 2>&1 for the rest) goes into
 * text, NUL-terminated. Prints both; returns the wait status. */
static int shell_output(const char *cmd, char *text, size_t cap)
{
    fprintf(stderr, "$ %s\n", cmd);
    FILE *f = popen(cmd, "r");
    CHECK(f != NULL);
    size_t n = fread(text, 1, cap - 1, f);
    text[n] = 0;
    int st = pclose(f);
    fprintf(stderr, "%s[status 0x%x]\n", text, st);
    return st;
}

/* ---- running cport-bench ------------------------------------------------------------------ */
struct run {
    int status; /* exit status */
    char out[OUT_CAP], err[OUT_CAP];
};

static struct run run;
static _Atomic pid_t bench_pid; /* the cport-bench that bench() runs, while it runs */

/* Runs cport-bench with the NULL-terminated arguments, collecting stdout and stderr. */
static void bench(const char *arg0, ...)
{
    const char *argv[64];
    int argc = 0;
    argv[argc++] = "cport-bench";
    va_list ap;
    va_start(ap, arg0);
    for (const char *a = arg0; a; a = va_arg(ap, const char *)) {
        CHECK(argc < 63);
        argv[argc++] = a;
    }
    va_end(ap);
    argv[argc] = NULL;
    fprintf(stderr, "$");
    for (int i = 0; i < argc; i++)
        fprintf(stderr, " %s", argv[i]);
    fprintf(stderr, "\n");

    int po[2], pe[2];
    CHECK(pipe2(po, O_CLOEXEC) == 0 && pipe2(pe, O_CLOEXEC) == 0);
    const char *exe = bin_path("cport-bench");
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        dup2(po[1], STDOUT_FILENO);
        dup2(pe[1], STDERR_FILENO);
        execv(exe, (char *const *)argv);
        _exit(127);
    }
    atomic_store(&bench_pid, pid);
    close(po[1]);
    close(pe[1]);
    size_t lo = 0, le = 0;
    bool open_o = true, open_e = true;
    int64_t deadline = cpt_now_ms() + RUN_DEADLINE_MS;
    while (open_o || open_e) {
        struct pollfd pf[2] = {{.fd = open_o ? po[0] : -1, .events = POLLIN},
                               {.fd = open_e ? pe[0] : -1, .events = POLLIN}};
        int left = (int)(deadline - cpt_now_ms());
        if (left <= 0) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            fprintf(stderr, "cport-bench did not finish in %d ms; killed\n", RUN_DEADLINE_MS);
            exit(1);
        }
        if (poll(pf, 2, left) < 0) {
            CHECK(errno == EINTR);
            continue;
        }
        for (int i = 0; i < 2; i++) {
            if (!pf[i].revents)
                continue;
            char *buf = i ? run.err : run.out;
            size_t *len = i ? &le : &lo;
            char tmp[4096];
            ssize_t n = read(pf[i].fd, tmp, sizeof tmp);
            if (n <= 0) {
                if (i)
                    open_e = false;
                else
                    open_o = false;
                continue;
            }
            size_t k = (size_t)n < OUT_CAP - 1 - *len ? (size_t)n : OUT_CAP - 1 - *len;
            memcpy(buf + *len, tmp, k);
            *len += k;
        }
    }
    close(po[0]);
    close(pe[0]);
    run.out[lo] = 0;
    run.err[le] = 0;
    int st = wait_child(pid, 5000);
    atomic_store(&bench_pid, 0);
    CHECK(WIFEXITED(st));
    run.status = WEXITSTATUS(st);
    fprintf(stderr, "%s%s[exit %d]\n", run.out, run.err, run.status);
}

/* The value of key in the RESULT line of the last run (which must have exactly one). */
static double result(const char *key)
{
    const char *line = NULL;
    for (const char *p = run.out; (p = strstr(p, "RESULT ")) != NULL; p++) {
        if (p == run.out || p[-1] == '\n') {
            CHECK(line == NULL);
            line = p;
        }
    }
    CHECK(line != NULL);
    char pat[64];
    snprintf(pat, sizeof pat, " %s=", key);
    const char *end = strchr(line, '\n');
    const char *v = strstr(line, pat);
    if (!v || (end && v > end)) {
        fprintf(stderr, "no key %s in the RESULT line\n", key);
        exit(1);
    }
    return strtod(v + strlen(pat), NULL);
}

static char port_buf[16];

static const char *port_str(const struct server *s)
{
    snprintf(port_buf, sizeof port_buf, "%d", s->port);
    return port_buf;
}

/* ---- tests ---------------------------------------------------------------------------------- */
TEST(echo_ref)
{
    struct server s = server_start(NULL, NULL);
    static const char *sizes[] = {"1", "64", "16384"};
    static const char *depths[] = {"1", "8"};
    for (int i = 0; i < 3; i++) {
        for (int j = 0; j < 2; j++) {
            bench("echo", "--port", port_str(&s), "-c", "8", "-s", sizes[i], "-d", depths[j], "-T",
                  "0.7", "-w", "0", NULL);
            CHECK_EQ(run.status, 0);
            CHECK(result("msgs") > 0);
            CHECK(result("msgs_per_s") > 0);
            CHECK(result("mib_per_s") > 0);
            CHECK_EQ(result("size"), atoi(sizes[i]));
            CHECK_EQ(result("depth"), atoi(depths[j]));
            CHECK_EQ(result("errors"), 0);
            CHECK_EQ(result("verify_errors"), 0);
            CHECK_EQ(result("unclosed"), 0); /* it closes after the client's end */
            CHECK_EQ(result("established"), 8);
            CHECK(result("p50_us") > 0);
            CHECK(result("p50_us") <= result("p99_us"));
            CHECK(result("p99_us") <= result("max_us"));
            CHECK(result("jain") > 0.5 && result("jain") <= 1.0);
        }
    }
    /* --json: one JSON object on stdout, same keys. */
    bench("echo", "--port", port_str(&s), "-c", "2", "-T", "0.3", "-w", "0", "--json", NULL);
    CHECK_EQ(run.status, 0);
    CHECK(run.out[0] == '{');
    CHECK(strchr(run.out, '\n') == run.out + strlen(run.out) - 1);
    CHECK(strstr(run.out, "\"mode\":\"echo\"") != NULL);
    CHECK(strstr(run.out, "\"msgs_per_s\":") != NULL);
    CHECK(strstr(run.out, "\"errors\":0,") != NULL);
    server_stop(&s);
}

/* The io_uring yardstick echoes byte-exact in each of its task-run modes, including
 * messages larger than its receive buffer (short receives and sends in order). */
TEST(echo_ref_uring)
{
    static const char *modes[] = {"coop", "defer", "none"};
    static const char *sizes[] = {"1", "16384", "200000"};
    struct io_uring probe;
    if (io_uring_queue_init(2, &probe, 0) < 0)
        SKIP("io_uring is not available here");
    io_uring_queue_exit(&probe);
    for (int m = 0; m < 3; m++) {
        struct server s = server_start_named("ref_uring_echo", "--taskrun", modes[m]);
        for (int i = 0; i < 3; i++) {
            bench("echo", "--port", port_str(&s), "-c", "8", "-s", sizes[i], "-d", "4", "-T", "0.5",
                  "-w", "0", NULL);
            CHECK_EQ(run.status, 0);
            CHECK(result("msgs") > 0);
            CHECK_EQ(result("errors"), 0);
            CHECK_EQ(result("verify_errors"), 0);
            CHECK_EQ(result("unclosed"), 0);
            CHECK_EQ(result("established"), 8);
        }
        server_stop(&s);
    }
}

/* The yardsticks out of descriptors: a connection beyond the limit is accepted and dropped
 * (its client sees the end), the others are served, and so is a new one once descriptors
 * are free again. An accept that fails at once and is simply tried again would leave the
 * extra connections waiting forever (and spin). */
TEST(reference_servers_shed_connections_beyond_their_descriptor_limit)
{
    static const char *names[] = {"ref_echo", "ref_uring_echo"};
    enum { CONNS = 48 };
    for (int n = 0; n < 2; n++) {
        struct io_uring probe;
        if (n == 1 && io_uring_queue_init(2, &probe, 0) < 0)
            continue; /* io_uring not available here */
        if (n == 1)
            io_uring_queue_exit(&probe);
        struct server s = server_spawn(names[n], NULL, NULL, 24);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s.port)};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int fds[CONNS], served = 0, shed = 0;
        for (int i = 0; i < CONNS; i++) {
            fds[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            CHECK(fds[i] >= 0);
            CHECK_OK(connect(fds[i], (struct sockaddr *)&sa, sizeof sa));
        }
        for (int i = 0; i < CONNS; i++) {
            struct timeval tv = {.tv_sec = 10};
            CHECK_OK(setsockopt(fds[i], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv));
            char c = 0;
            if (send(fds[i], "x", 1, MSG_NOSIGNAL) == 1 && recv(fds[i], &c, 1, 0) == 1) {
                CHECK_EQ(c, 'x');
                served++;
            } else {
                CHECK(errno != EAGAIN); /* waited 10 s: neither served nor dropped */
                shed++;
            }
        }
        fprintf(stderr, "%s: %d served, %d shed\n", names[n], served, shed);
        CHECK(served > 0);
        CHECK(shed > 0);
        for (int i = 0; i < CONNS; i++)
            close(fds[i]);
        /* Free again: a new connection is served (the server closes the old ones as it
         * sees their ends; a shed one may come first, so try a few). */
        bool ok = false;
        for (int tries = 0; tries < 50 && !ok; tries++) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            CHECK_OK(connect(fd, (struct sockaddr *)&sa, sizeof sa));
            struct timeval tv = {.tv_sec = 10};
            CHECK_OK(setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv));
            char c = 0;
            ok = send(fd, "y", 1, MSG_NOSIGNAL) == 1 && recv(fd, &c, 1, 0) == 1 && c == 'y';
            close(fd);
            if (!ok)
                usleep(20000);
        }
        CHECK(ok);
        server_stop(&s);
    }
}

TEST(echo_detects_corruption)
{
    struct server s = server_start("--corrupt-every", "1000");
    bench("echo", "--port", port_str(&s), "-c", "4", "-s", "64", "-d", "8", "-T", "1", "-w", "0",
          NULL);
    CHECK(run.status != 0);
    CHECK(result("verify_errors") > 0);
    CHECK(result("errors") > 0);
    CHECK(strstr(run.err, "verification failed") != NULL);
    server_stop(&s);
}

TEST(echo_server_gone)
{
    /* Connection refused: a connect error, non-zero exit, still a RESULT line. */
    struct server s = server_start(NULL, NULL);
    char port[16];
    snprintf(port, sizeof port, "%d", s.port);
    server_stop(&s);
    bench("echo", "--port", port, "-c", "3", "-T", "0.2", "-w", "0", NULL);
    CHECK_EQ(run.status, 1);
    CHECK_EQ(result("connect_errors"), 3);
}

TEST(connrate)
{
    struct server s = server_start(NULL, NULL);
    char pid[16];
    snprintf(pid, sizeof pid, "%d", (int)s.pid);
    bench("connrate", "--port", port_str(&s), "-c", "16", "-T", "1", "-w", "0", "--server-pid", pid,
          NULL);
    CHECK_EQ(run.status, 0);
    CHECK(result("connections") > 0);
    CHECK(result("conns_per_s") > 0);
    CHECK_EQ(result("errors"), 0);
    CHECK(result("p50_us") > 0);
    CHECK_EQ(result("server_cpu_ok"), 1);
    server_stop(&s);
}

TEST(hold)
{
    struct server s = server_start(NULL, NULL);
    char pid[16];
    snprintf(pid, sizeof pid, "%d", (int)s.pid);
    bench("hold", "--port", port_str(&s), "-n", "500", "--echo", "-T", "1", "--src-per-ip", "100",
          "--batch", "64", "--server-pid", pid, NULL);
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("established"), 500);
    CHECK_EQ(result("held"), 500);
    CHECK_EQ(result("lost"), 0);
    CHECK_EQ(result("errors"), 0);
    CHECK(result("server_rss_idle_kb") > 0);
    /* --settle: before each RSS sample of the set-up, wait until the RSS has not changed for
     * 2.5 s (the reference's never changes); the wait is not set-up time. The hold counts
     * from the end of the set-up, so the second wait is part of it. */
    int64_t t0 = cpt_now_ms();
    bench("hold", "--port", port_str(&s), "-n", "200", "--echo", "-T", "1", "--settle", "8",
          "--server-pid", pid, NULL);
    int64_t took = cpt_now_ms() - t0;
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("held"), 200);
    CHECK(result("establish_s") < 2.5); /* (the wait is not set-up time) */
    CHECK(took >= 5000);                /* 2.5 s settled twice (the hold's 1 s is inside) */
    CHECK(result("secs") >= 2.5);
    CHECK(strstr(run.out, "each once settled") != NULL);
    server_stop(&s);
}

TEST(hold_detects_loss)
{
    /* The server goes away while the connections are held: all of them are lost. */
    struct server s = server_start(NULL, NULL);
    int64_t t0 = cpt_now_ms();
    pid_t killer = fork();
    CHECK(killer >= 0);
    if (killer == 0) {
        usleep(1500000);
        kill(s.pid, SIGTERM);
        _exit(0);
    }
    bench("hold", "--port", port_str(&s), "-n", "50", "-T", "3", NULL);
    CHECK(cpt_now_ms() - t0 >= 1500);
    CHECK_EQ(run.status, 1);
    CHECK_EQ(result("established"), 50);
    CHECK_EQ(result("lost"), 50);
    int st = wait_child(killer, 5000);
    CHECK(WIFEXITED(st));
    st = wait_child(s.pid, 5000);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

TEST(fd_limit)
{
    struct rlimit rl;
    CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0);
    if (rl.rlim_max == RLIM_INFINITY || rl.rlim_max > 10000000)
        SKIP("no usable RLIMIT_NOFILE hard limit");
    long n = 30000;
    if ((rlim_t)n <= rl.rlim_max)
        n = (long)rl.rlim_max + 1;
    char ns[32];
    snprintf(ns, sizeof ns, "%ld", n);
    /* Port 1: nothing listens there, so a wrongly started run fails fast anyway. */
    bench("echo", "--port", "1", "-c", ns, "-T", "1", "-w", "0", NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "file descriptors") != NULL);
    CHECK(strstr(run.err, "RLIMIT_NOFILE") != NULL);
    CHECK(strstr(run.err, ns) != NULL);
    CHECK(strstr(run.out, "RESULT") == NULL);
    bench("hold", "--port", "1", "-n", ns, "-T", "1", NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "RLIMIT_NOFILE") != NULL);

    /* Descriptors the parent left open count too: 60 connections fit 100 descriptors, but
     * not beside 50 inherited ones (they were not counted: 12 connects failed with EMFILE,
     * reported only as connect errors). */
    struct server s = server_start(NULL, NULL);
    char cmd[PATH_MAX + 256], text[8192];
    snprintf(cmd, sizeof cmd, "ulimit -n 100 && exec %s hold --port %d -n 60 -T 0.2 2>&1",
             bin_path("cport-bench"), s.port);
    int st = shell_output(cmd, text, sizeof text);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0); /* they fit */
    int leaked[50];
    for (int i = 0; i < 50; i++)
        CHECK((leaked[i] = open("/dev/null", O_RDONLY)) >= 0); /* (no O_CLOEXEC: inherited) */
    st = shell_output(cmd, text, sizeof text);
    for (int i = 0; i < 50; i++)
        close(leaked[i]);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 2);
    CHECK(strstr(text, "RLIMIT_NOFILE") != NULL);
    CHECK(strstr(text, "open already at start") != NULL);
    server_stop(&s);
}

/* Every cport-bench process must send payloads of its own. Users run several processes to
 * get past the open-file limit (README); with the same bytes in each, a server that
 * delivered one process's echo to another process's connection of the same number would
 * pass every check. Two runs against a listener that records each one's first message:
 * the two messages must differ. */
struct first_msg {
    int lfd;
    uint8_t got[64];
    size_t n;
};

static void *record_first_msg(void *arg)
{
    struct first_msg *f = arg;
    struct pollfd pl = {.fd = f->lfd, .events = POLLIN};
    if (poll(&pl, 1, 10000) != 1)
        return NULL;
    int fd = accept4(f->lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
        return NULL;
    while (f->n < sizeof f->got) {
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        if (poll(&pf, 1, 10000) != 1)
            break;
        ssize_t r = read(fd, f->got + f->n, sizeof f->got - f->n);
        if (r <= 0)
            break;
        f->n += (size_t)r;
    }
    close(fd); /* cport-bench then reports the end of stream and exits */
    return NULL;
}

TEST(echo_payloads_differ_between_processes)
{
    struct first_msg f[2];
    memset(f, 0, sizeof f);
    for (int i = 0; i < 2; i++) {
        f[i].lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK(f[i].lfd >= 0);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        CHECK(bind(f[i].lfd, (struct sockaddr *)&sa, sizeof sa) == 0);
        CHECK(listen(f[i].lfd, 16) == 0);
        socklen_t sl = sizeof sa;
        CHECK(getsockname(f[i].lfd, (struct sockaddr *)&sa, &sl) == 0);
        char port[16];
        snprintf(port, sizeof port, "%d", ntohs(sa.sin_port));
        pthread_t th;
        CHECK(pthread_create(&th, NULL, record_first_msg, &f[i]) == 0);
        bench("echo", "--port", port, "-c", "1", "-s", "64", "-d", "1", "-T", "0.2", "-w", "0",
              NULL);
        pthread_join(th, NULL);
        close(f[i].lfd);
        CHECK_EQ(f[i].n, sizeof f[i].got);
        CHECK(run.status != 0); /* the listener closed without echoing */
    }
    CHECK(memcmp(f[0].got, f[1].got, sizeof f[0].got) != 0);
}

/* A size suffix multiplied a value before its range was checked: 2^54 + 1 "k" wrapped to
 * 1 KiB and ran. Values that overflow with their suffix are refused, those that fit work. */
TEST(size_suffixes_that_overflow_are_refused)
{
    bench("echo", "--port", "1", "-s", "18014398509481985k", "-c", "1", "-T", "0.2", "-w", "0",
          NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "bad value for -s") != NULL);
    CHECK(strstr(run.out, "RESULT") == NULL);
    bench("echo", "--port", "1", "-c", "9007199254740993m", "-T", "0.2", "-w", "0", NULL);
    CHECK_EQ(run.status, 2);
    /* In range with a suffix: accepted (port 1: nothing listens, a connect error). */
    bench("echo", "--port", "1", "-s", "64k", "-c", "1", "-T", "0.2", "-w", "0", NULL);
    CHECK_EQ(run.status, 1);
    CHECK_EQ(result("size"), 65536);
}

/* Options of another mode are refused, not silently ignored (a run that looks configured
 * but is not). --drain 0 is refused: every echo in flight at the end would time out. */
TEST(options_of_another_mode_are_refused)
{
    bench("connrate", "--port", "1", "--depth", "7", "-T", "0.2", "-w", "0", NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "does not apply") != NULL);
    bench("hold", "--port", "1", "-n", "1", "--threads", "2", "-T", "0.2", NULL);
    CHECK_EQ(run.status, 2);
    bench("hold", "--port", "1", "-n", "1", "-w", "1", "-T", "0.2", NULL);
    CHECK_EQ(run.status, 2);
    bench("connrate", "--port", "1", "--drain", "1", "-T", "0.2", "-w", "0", NULL);
    CHECK_EQ(run.status, 2);
    bench("echo", "--port", "1", "--settle", "1", "-T", "0.2", "-w", "0", NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "--settle") != NULL);
    bench("echo", "--port", "1", "--drain", "0", "-T", "0.2", "-w", "0", NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "bad value for --drain") != NULL);
    CHECK(strstr(run.out, "RESULT") == NULL);
}

/* bench/echo_bench.sh measures the CPU and memory of the process it starts (cport-bench
 * --server-pid). A server given through a wrapper that runs it as a child (timeout here;
 * perf stat, a shell script without exec) must not be measured as the wrapper's near-zero
 * CPU, which made a ratio of 0.000 against the reference: such a run is reported failed. */
TEST(echo_bench_script_refuses_a_wrapped_server)
{
    const char *root = cpt_source_root();
    if (!root)
        SKIP("source path unknown");
    bin_path("ref_echo");
    bin_path("cport-bench");
    char out[PATH_MAX + 32];
    snprintf(out, sizeof out, "/tmp/echo_bench_test.%d", (int)getpid());
    char cmd[4 * PATH_MAX + 512];
    snprintf(cmd, sizeof cmd,
             "timeout -k 5 120 bash %s/bench/echo_bench.sh --build %s/.. --rounds 1 --secs 0.5 "
             "--warmup 0.2 --scenarios echo_64x100 --port-base %d --out %s "
             "--server 'ref|{build}/bin/ref_echo --port {port}|' "
             "--server 'wrapped|timeout 300 {build}/bin/ref_echo --port {port}|' 2>&1; "
             "rm -rf %s",
             /* below the ephemeral range (32768-): other tests' connections cannot hold
                it */
             root, bindir, 20000 + 2 * (int)(getpid() % 5000), out, out);
    static char text[OUT_CAP];
    int st = shell_output(cmd, text, sizeof text);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* The medians table: ref measured, the wrapped server's one run failed (no figures). */
    const char *table = strstr(text, "\nmedian ");
    CHECK(table != NULL);
    const char *ref = strstr(table, "\nref ");
    const char *wrapped = strstr(table, "\nwrapped ");
    CHECK(ref != NULL && wrapped != NULL);
    const char *eol = strchr(ref + 1, '\n');
    CHECK(eol != NULL && strstr(ref, "1(0)") != NULL && strstr(ref, "1(0)") < eol);
    eol = strchr(wrapped + 1, '\n');
    CHECK(eol != NULL);
    const char *fails = strstr(wrapped, "1(1)");
    CHECK(fails != NULL && fails < eol);
}

/* bench/httpd_bench.sh: wrk -d takes whole seconds only ("0.5s" makes wrk print its usage
 * and exit 1). --quick's 0.5 s warm-up was therefore never run, without a word, and a
 * fractional --secs failed every run. Fractions are refused; --quick warms up for 1 s. A
 * stand-in wrk (first in PATH) records how it is called and answers like wrk 4.1. */
TEST(httpd_bench_script_runs_wrk_with_whole_seconds)
{
    const char *root = cpt_source_root();
    if (!root)
        SKIP("source path unknown");
    bin_path("cport-bench"); /* sets bindir */
    char httpd[PATH_MAX + 32];
    snprintf(httpd, sizeof httpd, "%s/cport-httpd", bindir);
    if (access(httpd, X_OK) != 0)
        SKIP("cport-httpd not built");
    if (system("PATH=$PATH:/usr/sbin; for t in nginx curl ss taskset; do command -v $t >/dev/null "
               "|| exit 1; done") != 0)
        SKIP("nginx, curl, ss or taskset missing");
    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/httpd_bench_test.%d", (int)getpid());
    char cmd[4 * PATH_MAX + 1024];
    snprintf(cmd, sizeof cmd,
             "mkdir -p %s && cat >%s/wrk <<'EOS'\n"
             "#!/bin/sh\n"
             "echo \"$*\" >>%s/calls\n"
             "for a; do case $a in -d*) echo \"$a\" | grep -Eq '^-d[0-9]+[smh]?$' || "
             "{ echo 'Usage: wrk <options> <url>'; exit 1; } ;; esac; done\n"
             "printf '  50 requests in 1.00s, 200.00KB read\\nRequests/sec:     49.00\\n'\n"
             "EOS\n"
             "chmod +x %s/wrk",
             dir, dir, dir, dir);
    CHECK(system(cmd) == 0);
    int port = 20000 + 2 * (int)(getpid() % 5000) + 1;
    /* A fractional duration is refused before anything starts. */
    snprintf(cmd, sizeof cmd,
             "PATH=%s:$PATH timeout -k 5 60 bash %s/bench/httpd_bench.sh --build %s/.. --rounds 1 "
             "--secs 1.5 --servers cport-epoll --scenarios small --small-conns 1 --port-base %d "
             "2>&1",
             dir, root, bindir, port);
    static char text[OUT_CAP];
    int st = shell_output(cmd, text, sizeof text);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 2);
    CHECK(strstr(text, "whole") != NULL);
    /* --quick: every wrk run (warm-up included) gets a duration wrk takes. */
    snprintf(cmd, sizeof cmd,
             "PATH=%s:$PATH timeout -k 5 60 bash %s/bench/httpd_bench.sh --build %s/.. --quick "
             "--rounds 1 --servers cport-epoll --scenarios small --small-conns 1 --port-base %d "
             "2>&1",
             dir, root, bindir, port);
    st = shell_output(cmd, text, sizeof text);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    char calls_path[96];
    snprintf(calls_path, sizeof calls_path, "%s/calls", dir);
    FILE *cf = fopen(calls_path, "r");
    CHECK(cf != NULL);
    char line[512];
    int runs = 0;
    while (fgets(line, sizeof line, cf)) {
        fprintf(stderr, "wrk %s", line);
        const char *d = strstr(line, " -d");
        if (!d)
            continue; /* wrk -v */
        runs++;
        CHECK(strncmp(d, " -d1s ", 6) == 0); /* --quick: 1 s warm-up, 1 s measured */
    }
    fclose(cf);
    CHECK_EQ(runs, 2); /* the warm-up and the measured run */
    CHECK(strstr(text, "49.0") != NULL);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
}

/* Options that would have no effect are refused like those of another mode: connrate keeps
 * -c connects in flight whatever --batch says (its help listed --batch as "connects in
 * flight at most"), and hold without --echo sends nothing, so -s sized nothing. */
TEST(options_without_effect_are_refused)
{
    bench("connrate", "--port", "1", "-c", "2", "--batch", "1", "-T", "0.2", "-w", "0", NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "--batch") != NULL);
    CHECK(strstr(run.out, "RESULT") == NULL);
    bench("hold", "--port", "1", "-n", "1", "-s", "100", "-T", "0.2", NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "--echo") != NULL);
    /* Where they act, they are taken (port 1: nothing listens, a connect error). */
    bench("hold", "--port", "1", "-n", "1", "-s", "100", "--echo", "-T", "0.2", NULL);
    CHECK_EQ(run.status, 1);
    bench("echo", "--port", "1", "-c", "1", "--batch", "1", "-T", "0.2", "-w", "0", NULL);
    CHECK_EQ(run.status, 1);
}

/* ---- a misbehaving echo server ------------------------------------------------------------
 * Echoes byte-exact except on its first accepted connection, where one fault is applied at
 * stream offset `at`: the client must notice every one of them. F_LATE echoes byte-exact
 * but, once the client has ended its stream, sends its last byte once more before closing:
 * a late duplicate that comes after every echo is back (with late_burn, only after a
 * burner, see below, has spent its CPU: long after). F_OPEN echoes byte-exact but never
 * closes after the client's end. F_HOLD reads nothing until `open` is set, echoes byte-exact
 * up to `at`, then holds back what comes after it (hit once `len` bytes are held) until
 * `release` is set. F_STALL echoes byte-exact but, once `stall` is set, reads and echoes
 * nothing for `len` ms (from stall_ns to end_ns; hit once it is over), then goes on. */
enum fault {
    F_NONE,
    F_CORRUPT,
    F_DROP,
    F_DUP,
    F_SWAP,
    F_CLOSE,
    F_SILENT,
    F_DEAF,
    F_LATE,
    F_OPEN,
    F_HOLD,
    F_STALL
};

enum { BAD_MAX_CONNS = 32 }; /* connections served at once; more wait in the backlog */

struct bad_server {
    int lfd, port;
    enum fault fault;
    uint64_t at, len;           /* F_SWAP: blocks [at, at+len) and [at+len, at+2len) change places
                                 * (or the first two that differ after them) */
    _Atomic int stop, nconns;   /* nconns: accepted so far */
    _Atomic bool open, release; /* F_HOLD: start reading; send what was held, echo again */
    _Atomic bool hit;       /* the faulty connection's stream reached the fault (it was applied) */
    _Atomic int64_t end_ns; /* F_LATE, F_OPEN: when the faulty connection saw the client's end
                             * (CLOCK_MONOTONIC); F_STALL: when its stall ended */
    _Atomic bool stall;     /* F_STALL: stall now */
    _Atomic int64_t stall_ns; /* F_STALL: when the stall began */
    bool ipv6;                /* listen on ::1 instead of 127.0.0.1 */
    bool late_burn;           /* F_LATE: before the duplicate, a byte to late_cmd and one back
                               * from late_done */
    int late_cmd, late_done;
    pthread_t acceptor, conn_th[BAD_MAX_CONNS];
    bool conn_running[BAD_MAX_CONNS];       /* (acceptor's) a thread to join */
    _Atomic bool conn_ended[BAD_MAX_CONNS]; /* that thread is about to return */
};

struct bad_conn {
    struct bad_server *s;
    int fd, slot;
    bool faulty;
};

static bool bad_write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

static void *bad_conn_main(void *arg)
{
    struct bad_conn *c = arg;
    struct bad_server *s = c->s;
    enum fault f = c->faulty ? s->fault : F_NONE;
    uint64_t off = 0; /* bytes received */
    uint64_t swap_at = s->at;
    static _Thread_local uint8_t in[65536], out[2 * 65536 + 16];
    uint8_t *hold = NULL, last = 0;
    size_t nhold = 0;
    if (f == F_SWAP || f == F_HOLD)
        hold = malloc(2 * s->len);
    while (!atomic_load(&s->stop)) {
        if (f == F_HOLD && nhold > 0 && atomic_load(&s->release)) {
            if (!bad_write_all(c->fd, hold, nhold))
                break;
            nhold = 0;
            f = F_NONE;
        }
        if (f == F_STALL && atomic_load(&s->stall)) {
            /* Everything read so far is echoed; what comes now waits. */
            int64_t t0 = cpt_now_ns(), until = t0 + (int64_t)s->len * 1000000;
            atomic_store(&s->stall_ns, t0);
            for (int64_t t = t0; t < until && !atomic_load(&s->stop); t = cpt_now_ns())
                poll(NULL, 0, (int)((until - t + 999999) / 1000000));
            atomic_store(&s->end_ns, cpt_now_ns());
            atomic_store(&s->hit, true);
            f = F_NONE;
        }
        bool deaf = f == F_DEAF || (f == F_HOLD && !atomic_load(&s->open));
        struct pollfd pf = {.fd = c->fd, .events = deaf ? 0 : POLLIN};
        int pr = poll(&pf, 1, f == F_HOLD || f == F_STALL ? 1 : 50);
        if (pr <= 0 || deaf)
            continue;
        ssize_t n = read(c->fd, in, sizeof in);
        if (n == 0 && (f == F_LATE || f == F_OPEN) && off > 0) {
            atomic_store(&s->end_ns, cpt_now_ns());
            char b;
            if (f == F_OPEN) {
                atomic_store(&s->hit, true);
                while (!atomic_load(&s->stop))
                    poll(NULL, 0, 10);
            } else if (!s->late_burn ||
                       (write(s->late_cmd, "x", 1) == 1 && read(s->late_done, &b, 1) == 1)) {
                if (bad_write_all(c->fd, &last, 1))
                    atomic_store(&s->hit, true);
            }
            break;
        }
        if (n <= 0)
            break;
        last = in[n - 1];
        size_t no = 0;
        bool closing = false;
        for (ssize_t i = 0; i < n; i++, off++) {
            uint8_t b = in[i];
            if (c->faulty && off == s->at && f != F_SWAP && f != F_LATE && f != F_OPEN &&
                f != F_HOLD && f != F_STALL)
                atomic_store(&s->hit, true);
            switch (f) {
            case F_CORRUPT:
                out[no++] = off == s->at ? (uint8_t)(b ^ 0x5a) : b;
                break;
            case F_DROP:
                if (off != s->at)
                    out[no++] = b;
                break;
            case F_DUP:
                out[no++] = b;
                if (off == s->at)
                    out[no++] = b;
                break;
            case F_SWAP:
                if (off >= swap_at && off < swap_at + 2 * s->len) {
                    hold[nhold++] = b;
                    if (nhold == 2 * s->len && memcmp(hold, hold + s->len, s->len) == 0) {
                        /* Equal blocks (two equal bytes: 1 in 256 runs) change nothing
                         * when swapped, and no client could tell: the swap moves on by a
                         * byte, to blocks that differ. */
                        out[no++] = hold[0];
                        memmove(hold, hold + 1, --nhold);
                        swap_at++;
                    } else if (nhold == 2 * s->len) {
                        if (!bad_write_all(c->fd, out, no))
                            goto done;
                        no = 0;
                        if (!bad_write_all(c->fd, hold + s->len, s->len) ||
                            !bad_write_all(c->fd, hold, s->len))
                            goto done;
                        atomic_store(&s->hit, true);
                    }
                } else {
                    out[no++] = b;
                }
                break;
            case F_CLOSE:
                if (off == s->at)
                    closing = true;
                else if (!closing)
                    out[no++] = b;
                break;
            case F_SILENT:
                break;
            case F_HOLD:
                if (off < s->at) {
                    out[no++] = b;
                } else {
                    CHECK(nhold < 2 * s->len); /* (the client sends no more than that) */
                    hold[nhold++] = b;
                    if (nhold == s->len)
                        atomic_store(&s->hit, true);
                }
                break;
            default:
                out[no++] = b;
            }
        }
        if (no && !bad_write_all(c->fd, out, no))
            break;
        if (closing)
            break;
    }
done:
    free(hold);
    close(c->fd);
    atomic_store(&s->conn_ended[c->slot], true);
    free(c);
    return NULL;
}

/* A slot for a new connection's thread (joining one that ended), or -1 if all are busy. */
static int bad_free_slot(struct bad_server *s)
{
    for (int i = 0; i < BAD_MAX_CONNS; i++) {
        if (s->conn_running[i] && atomic_load(&s->conn_ended[i])) {
            pthread_join(s->conn_th[i], NULL);
            s->conn_running[i] = false;
        }
        if (!s->conn_running[i])
            return i;
    }
    return -1;
}

static void *bad_accept_main(void *arg)
{
    struct bad_server *s = arg;
    while (!atomic_load(&s->stop)) {
        struct pollfd pf = {.fd = s->lfd, .events = POLLIN};
        if (poll(&pf, 1, 50) != 1)
            continue;
        int slot = bad_free_slot(s);
        if (slot < 0) { /* the connection waits in the backlog until a thread ends */
            poll(NULL, 0, 1);
            continue;
        }
        int fd = accept4(s->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        int k = atomic_load(&s->nconns);
        struct bad_conn *c = malloc(sizeof *c);
        CHECK(c != NULL);
        *c = (struct bad_conn){.s = s, .fd = fd, .slot = slot, .faulty = k == 0};
        atomic_store(&s->conn_ended[slot], false);
        CHECK(pthread_create(&s->conn_th[slot], NULL, bad_conn_main, c) == 0);
        s->conn_running[slot] = true;
        atomic_store(&s->nconns, k + 1);
    }
    return NULL;
}

/* Sets up the server; fields set after this and before bad_server_run are seen by its
 * threads. */
static void bad_server_init(struct bad_server *s, enum fault f, uint64_t at, uint64_t len)
{
    memset(s, 0, sizeof *s);
    s->fault = f;
    s->at = at;
    s->len = len;
}

static void bad_server_run(struct bad_server *s)
{
    s->lfd = socket(s->ipv6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(s->lfd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct sockaddr_in6 sa6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    if (s->ipv6)
        CHECK(bind(s->lfd, (struct sockaddr *)&sa6, sizeof sa6) == 0);
    else
        CHECK(bind(s->lfd, (struct sockaddr *)&sa, sizeof sa) == 0);
    CHECK(listen(s->lfd, 64) == 0);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    CHECK(getsockname(s->lfd, (struct sockaddr *)&ss, &sl) == 0);
    s->port = ntohs(s->ipv6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                            : ((struct sockaddr_in *)&ss)->sin_port);
    CHECK(pthread_create(&s->acceptor, NULL, bad_accept_main, s) == 0);
}

static void bad_server_start(struct bad_server *s, enum fault f, uint64_t at, uint64_t len)
{
    bad_server_init(s, f, at, len);
    bad_server_run(s);
}

static void bad_server_stop(struct bad_server *s)
{
    atomic_store(&s->stop, 1);
    pthread_join(s->acceptor, NULL);
    for (int i = 0; i < BAD_MAX_CONNS; i++)
        if (s->conn_running[i])
            pthread_join(s->conn_th[i], NULL);
    close(s->lfd);
}

static const char *bad_port(const struct bad_server *s)
{
    snprintf(port_buf, sizeof port_buf, "%d", s->port);
    return port_buf;
}

/* Whether the last run's result shows fault f the way the test below checks it. */
static bool shows_fault(enum fault f)
{
    switch (f) {
    case F_CORRUPT:
    case F_DUP:
    case F_SWAP:
    case F_LATE:
        return run.status == 1 && result("verify_errors") >= 1;
    case F_CLOSE:
        return run.status == 1 && result("eof") + result("resets") + result("verify_errors") >= 1;
    case F_SILENT:
    case F_DEAF:
        return run.status == 1 && result("timeouts") >= 1;
    default:
        return run.status == 1;
    }
}

/* Every fault on the stream is caught, at depth 1 and deeper, with message sizes that are
 * no multiple of any buffer size on either side, and the run ends within its bounds. */
TEST(echo_detects_every_fault)
{
    static const size_t sizes[] = {1, 1000, 70001, 300001};
    static const int depths[] = {1, 3};
    static const struct {
        enum fault f;
        const char *name;
    } faults[] = {{F_NONE, "none"},    {F_CORRUPT, "corrupt"}, {F_DROP, "drop"},
                  {F_DUP, "dup"},      {F_SWAP, "swap bytes"}, {F_SWAP, "swap messages"},
                  {F_CLOSE, "close"},  {F_SILENT, "silent"},   {F_DEAF, "deaf"},
                  {F_LATE, "late dup"}};
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
        for (size_t di = 0; di < 2; di++) {
            for (size_t fi = 0; fi < sizeof faults / sizeof *faults; fi++) {
                size_t size = sizes[si];
                int depth = depths[di];
                enum fault f = faults[fi].f;
                bool msgswap = fi == 5;
                if (msgswap && depth == 1)
                    continue; /* a server cannot hold a message back at depth 1 */
                uint64_t at = 5 * (uint64_t)size + (size > 1 ? size / 2 + 3 : 0), len = 1;
                if (f == F_SWAP && size == 1 && depth == 1)
                    continue; /* two bytes in flight needed */
                if (msgswap) {
                    at = 5 * (uint64_t)size;
                    len = size;
                    if (depth < 2)
                        continue;
                }
                if (f == F_SWAP && !msgswap && size == 1)
                    at = 5; /* crosses messages: depth 3 has them in flight */
                char ssz[32], sd[16], ssecs[16];
                snprintf(ssz, sizeof ssz, "%zu", size);
                snprintf(sd, sizeof sd, "%d", depth);
                /* A run whose faulty connection did not get past the fault's byte, or whose
                 * client had not judged the message with it when the run ended (a slow,
                 * loaded machine: a sanitizer build moves a few 300 KB messages in 0.4 s),
                 * proves nothing either way: it runs again, twice as long, up to 6.4 s. The
                 * server tells the first (the messages of both connections together do
                 * not: the other one may have had most of them). */
                bool hit;
                for (double secs = 0.4;; secs *= 2) {
                    struct bad_server s;
                    bad_server_start(&s, f, at, len);
                    snprintf(ssecs, sizeof ssecs, "%.1f", secs);
                    fprintf(stderr, "== fault %s size %zu depth %d at %" PRIu64 ", %s s\n",
                            faults[fi].name, size, depth, at, ssecs);
                    int64_t t0 = cpt_now_ms();
                    bench("echo", "--port", bad_port(&s), "-c", "2", "-s", ssz, "-d", sd, "-T",
                          ssecs, "-w", "0", "--drain", "0.5", NULL);
                    int64_t took = cpt_now_ms() - t0;
                    bad_server_stop(&s);
                    CHECK(took < (int64_t)(secs * 1000) + 10000); /* it stops by itself */
                    hit = atomic_load(&s.hit);
                    /* The fault's byte went out; the run shows it once the client has
                     * judged that message too (a message still in flight when the drain
                     * ends counts as unanswered: no verdict on its bytes). */
                    /* (A silent or deaf server is faulty from the start: no byte to reach.
                     * A false error without a fault fails at once.) */
                    bool reached = hit || f == F_SILENT || f == F_DEAF;
                    if (f == F_NONE ? run.status != 0 || hit : reached && shows_fault(f))
                        break;
                    if (secs > 6)
                        break;
                }
                if (f == F_NONE) {
                    CHECK_EQ(run.status, 0);
                    CHECK_EQ(result("errors"), 0);
                    CHECK(hit);
                    continue;
                }
                CHECK_EQ(run.status, 1);
                CHECK(result("errors") >= 1);
                if (f == F_CORRUPT || f == F_DUP || f == F_SWAP || f == F_LATE)
                    CHECK(result("verify_errors") >= 1);
                if (f == F_CLOSE)
                    CHECK(result("eof") + result("resets") + result("verify_errors") >= 1);
                if (f == F_SILENT || f == F_DEAF)
                    CHECK(result("timeouts") >= 1);
            }
        }
    }
}

/* connrate judges each connection's whole stream: it half-closes once its message is sent
 * and takes the server's end of stream as the end of the echo, so a byte that comes after
 * the echo (a late duplicate, sent once the client ended its stream) is an error too; it
 * was missed when the client closed as soon as the echo was complete. The first connection
 * of each run is the faulty one; a run that did not reach the fault runs again, longer. */
TEST(connrate_detects_every_fault)
{
    static const size_t sizes[] = {1, 1000, 70001};
    static const struct {
        enum fault f;
        const char *name;
    } faults[] = {{F_NONE, "none"},   {F_CORRUPT, "corrupt"}, {F_DROP, "drop"},
                  {F_DUP, "dup"},     {F_DUP, "dup last"},    {F_LATE, "late dup"},
                  {F_CLOSE, "close"}, {F_SILENT, "silent"},   {F_DEAF, "deaf"}};
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
        for (size_t fi = 0; fi < sizeof faults / sizeof *faults; fi++) {
            size_t size = sizes[si];
            enum fault f = faults[fi].f;
            uint64_t at = fi == 4 ? size - 1 : size / 2;
            char ssz[32], ssecs[16];
            snprintf(ssz, sizeof ssz, "%zu", size);
            bool hit;
            for (double secs = 0.3;; secs *= 2) {
                struct bad_server s;
                bad_server_start(&s, f, at, 1);
                snprintf(ssecs, sizeof ssecs, "%.1f", secs);
                fprintf(stderr, "== connrate fault %s size %zu at %" PRIu64 ", %s s\n",
                        faults[fi].name, size, at, ssecs);
                int64_t t0 = cpt_now_ms();
                /* (a silent or deaf server's connection times out after 300 ms) */
                bench("connrate", "--port", bad_port(&s), "-c", "1", "-s", ssz, "-T", ssecs, "-w",
                      "0", "--connect-timeout", "300", NULL);
                int64_t took = cpt_now_ms() - t0;
                bad_server_stop(&s);
                CHECK(took < (int64_t)(secs * 1000) + 10000); /* it stops by itself */
                hit = atomic_load(&s.hit);
                bool reached = hit || f == F_SILENT || f == F_DEAF;
                if (f == F_NONE ? run.status != 0 || hit : reached)
                    break;
                CHECK(secs < 5); /* (a loaded machine: a longer run) */
            }
            if (f == F_NONE) {
                CHECK_EQ(run.status, 0);
                CHECK_EQ(result("errors"), 0);
                CHECK(result("connections") > 0);
                continue;
            }
            /* (A silent server closes once the client ended its stream: the end comes
             * before the echo.) */
            if (f == F_SILENT)
                CHECK(run.status == 1 && result("eof") + result("timeouts") == 1);
            else
                CHECK(shows_fault(f));
            CHECK_EQ(result("errors"), 1); /* the faulty connection, and only it */
        }
    }
}

/* An IPv6 server (--host ::1, or in brackets): every mode connects over IPv6, names it
 * "[::1]:PORT", and still verifies every byte (a corrupted echo over IPv6 is caught).
 * Source-address spreading is IPv4 only: asking for it towards an IPv6 server is refused,
 * as is a host that is no address. (It took IPv4 only.) */
TEST(ipv6_server)
{
    cpt_need_ipv6_loopback();
    struct bad_server s;
    bad_server_init(&s, F_NONE, 0, 1);
    s.ipv6 = true;
    bad_server_run(&s);
    char target[64];
    snprintf(target, sizeof target, "[::1]:%d", s.port);
    bench("echo", "--host", "::1", "--port", bad_port(&s), "-c", "4", "-s", "1000", "-d", "2", "-T",
          "0.3", "-w", "0", NULL);
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("errors"), 0);
    CHECK(result("msgs") > 0);
    CHECK(strstr(run.out, target) != NULL);
    bench("connrate", "--host", "[::1]", "--port", bad_port(&s), "-c", "2", "-T", "0.3", "-w", "0",
          NULL);
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("errors"), 0);
    CHECK(result("connections") > 0);
    CHECK(strstr(run.out, target) != NULL);
    bench("hold", "--host", "::1", "--port", bad_port(&s), "-n", "20", "--echo", "-T", "0.2", NULL);
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("held"), 20);
    CHECK(strstr(run.out, target) != NULL);
    bench("echo", "--host", "::1", "--port", bad_port(&s), "--src-per-ip", "10", "-T", "0.2", NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "IPv6") != NULL);
    bench("hold", "--host", "::1", "--port", bad_port(&s), "--src-start", "127.1.0.1", "-n", "2",
          "-T", "0.2", NULL);
    CHECK_EQ(run.status, 2);
    bench("echo", "--host", "::g", "--port", bad_port(&s), "-T", "0.2", NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "IPv4 or IPv6") != NULL);
    bad_server_stop(&s);

    /* A fault over IPv6 is seen as over IPv4; a run that did not reach it runs again. */
    for (double secs = 0.3;; secs *= 2) {
        bad_server_init(&s, F_CORRUPT, 500, 1);
        s.ipv6 = true;
        bad_server_run(&s);
        char ssecs[16];
        snprintf(ssecs, sizeof ssecs, "%.1f", secs);
        bench("echo", "--host", "::1", "--port", bad_port(&s), "-c", "1", "-s", "1000", "-T", ssecs,
              "-w", "0", NULL);
        bad_server_stop(&s);
        if (atomic_load(&s.hit))
            break;
        CHECK(secs < 5); /* (a loaded machine: a longer run) */
    }
    CHECK(shows_fault(F_CORRUPT));
}

/* A failed connect says why (the first one's reason), and hold's source addresses stay in
 * 127/8 when the range reaches its end (they went on to 128.0.0.x, which fails to bind). */
TEST(connect_errors_say_why_and_sources_stay_in_loopback)
{
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK_OK(bind(lfd, (struct sockaddr *)&sa, sizeof sa));
    socklen_t sl = sizeof sa;
    CHECK_OK(getsockname(lfd, (struct sockaddr *)&sa, &sl));
    char port[16];
    snprintf(port, sizeof port, "%d", ntohs(sa.sin_port));
    close(lfd); /* nothing listens there now */
    bench("connrate", "--port", port, "-c", "1", "-T", "0.2", "-w", "0", NULL);
    CHECK_EQ(run.status, 1);
    CHECK(result("connect_errors") > 0);
    CHECK(strstr(run.out, "first connect error: Connection refused") != NULL);

    struct server s = server_start(NULL, NULL);
    bench("hold", "--port", port_str(&s), "-n", "6", "--src-per-ip", "1", "--src-start",
          "127.255.255.253", "-T", "0.2", NULL);
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("held"), 6);
    CHECK_EQ(result("connect_errors"), 0);
    CHECK(strstr(run.out, "first connect error") == NULL);
    server_stop(&s);
}

/* ---- a server pid taken over by another process -------------------------------------------
 * --server-pid samples /proc/PID at the start and the end of a measurement. A server that
 * exits in between may leave its pid to another process (pids are reused): that process's
 * CPU (less than the server's: the difference wrapped to 2^64 - x us) and memory were
 * reported as the server's. Here the "server" is a stand-in that burns some CPU and waits;
 * once cport-bench writes "start" to its mark file the stand-in is killed and a process with
 * the same pid takes its place (clone3 with set_tid; needs CAP_SYS_ADMIN). */
struct clone_args_v1 { /* struct clone_args up to set_tid_size (CLONE_ARGS_SIZE_VER1) */
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
        set_tid_size;
};

static _Noreturn void idle_forever(void)
{
    alarm(120); /* never outlives a failed test for long */
    for (;;)
        pause();
}

static pid_t standin_spawn(void)
{
    int p[2];
    CHECK(pipe2(p, O_CLOEXEC) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        struct timespec ts;
        do /* some CPU time, so that a successor's smaller figure shows */
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
        while (ts.tv_sec == 0 && ts.tv_nsec < 50000000);
        (void)!write(p[1], "x", 1);
        idle_forever();
    }
    close(p[1]);
    char c;
    CHECK(read(p[0], &c, 1) == 1);
    close(p[0]);
    return pid;
}

/* The time (ns, CLOCK_MONOTONIC) of the mark file's line `word`, or -1 if it has none. */
static int64_t mark_time(const char *path, const char *word)
{
    char buf[512] = {0};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    size_t len = strlen(word);
    for (const char *l = buf; l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL)
        if (strncmp(l, word, len) == 0 && l[len] == ' ')
            return strtoll(l + len + 1, NULL, 10);
    return -1;
}

static bool mark_has(const char *path, const char *word)
{
    return mark_time(path, word) >= 0;
}

/* Wait until the mark file at path has word, looking every poll_us; false if the
 * deadline (cpt_now_ms) passed first. */
static bool wait_mark(const char *path, const char *word, int64_t deadline, unsigned poll_us)
{
    while (!mark_has(path, word)) {
        if (cpt_now_ms() > deadline)
            return false;
        usleep(poll_us);
    }
    return true;
}

struct takeover {
    pid_t pid;        /* the stand-in */
    const char *mark; /* cport-bench's mark file */
    pid_t successor;  /* the process that took its pid */
    bool late;        /* the measurement had ended already */
    int err;
};

static void *takeover_main(void *arg)
{
    struct takeover *t = arg;
    int64_t deadline = cpt_now_ms() + 30000;
    if (!wait_mark(t->mark, "start", deadline, 2000)) {
        t->err = ETIMEDOUT;
        return NULL;
    }
    kill(t->pid, SIGKILL);
    waitpid(t->pid, NULL, 0);
    pid_t tid = t->pid;
    struct clone_args_v1 ca = {
        .exit_signal = SIGCHLD, .set_tid = (uint64_t)(uintptr_t)&tid, .set_tid_size = 1};
    long r = syscall(SYS_clone3, &ca, sizeof ca);
    if (r == 0)
        idle_forever();
    if (r < 0) {
        t->err = errno;
        return NULL;
    }
    t->successor = (pid_t)r;
    t->late = mark_has(t->mark, "end");
    return NULL;
}

TEST(server_figures_are_not_taken_from_a_process_that_reused_its_pid)
{
    struct server s = server_start(NULL, NULL);
    char mark[64];
    snprintf(mark, sizeof mark, "/tmp/cport_bench_mark.%d", (int)getpid());
    for (int hold = 0; hold < 2; hold++) {
        for (double secs = 1;; secs *= 2) {
            pid_t v = standin_spawn();
            unlink(mark);
            struct takeover t = {.pid = v, .mark = mark};
            pthread_t th;
            CHECK(pthread_create(&th, NULL, takeover_main, &t) == 0);
            char vs[16], ss[16], ps[16];
            snprintf(vs, sizeof vs, "%d", (int)v);
            snprintf(ss, sizeof ss, "%.0f", secs);
            snprintf(ps, sizeof ps, "%d", s.port);
            if (hold)
                bench("hold", "--port", ps, "-n", "4", "-T", ss, "--server-pid", vs, "--mark-file",
                      mark, NULL);
            else
                bench("echo", "--port", ps, "-c", "2", "-T", ss, "-w", "0", "--server-pid", vs,
                      "--mark-file", mark, NULL);
            pthread_join(th, NULL);
            unlink(mark);
            if (t.err) {
                kill(v, SIGKILL); /* (if the takeover did not get that far) */
                waitpid(v, NULL, 0);
            } else {
                kill(t.successor, SIGKILL);
                waitpid(t.successor, NULL, 0);
            }
            if (t.err == EPERM)
                SKIP("clone3 with set_tid needs CAP_SYS_ADMIN");
            if (t.err == EEXIST && secs < 8)
                continue; /* another process took the pid first: again */
            CHECK_EQ(t.err, 0);
            fprintf(stderr, "pid %d taken over%s\n", (int)v, t.late ? " too late" : "");
            if (!t.late)
                break;
            CHECK(secs < 8); /* a loaded machine: a longer measurement */
        }
        CHECK_EQ(run.status, 0);
        if (!hold) {
            CHECK_EQ(result("server_cpu_ok"), 0);
            CHECK(strstr(run.out, "exited during the window") != NULL);
        } else {
            CHECK_EQ(result("held"), 4);
            CHECK_EQ(result("server_cpu_ok"), 1); /* the set-up was the stand-in's */
            CHECK(result("server_rss_before_kb") > 0);
            CHECK(result("server_fds_before") > 0);
            CHECK_EQ(result("server_rss_idle_kb"), -1);
            CHECK_EQ(result("server_fds_idle"), -1);
            CHECK(strstr(run.out, "exited during the run") != NULL);
        }
    }
    server_stop(&s);
}

/* ---- an interrupted window ------------------------------------------------------------------
 * SIGINT ends the measured window; the messages it counts must be those completed in it.
 * Once the window has begun (the mark file says "start") the server echoes N messages, then
 * holds back the next DEPTH (the client, keeping DEPTH in flight, has completed all N by
 * then); cport-bench is interrupted, and only once it has closed its window (the mark file
 * says "end") are the held echoes sent: they complete after the window and must not be
 * counted in it (they were, when a worker compared them with the end it had read before its
 * last wait for events, up to 20 ms before). */
struct interrupter {
    struct bad_server *s;
    const char *mark;
    int err;
};

static void *interrupt_main(void *arg)
{
    struct interrupter *it = arg;
    int64_t deadline = cpt_now_ms() + 20000;
    if (!wait_mark(it->mark, "start", deadline, 200)) {
        it->err = ETIMEDOUT;
        return NULL;
    }
    atomic_store(&it->s->open, true);
    while (!atomic_load(&it->s->hit) || !atomic_load(&bench_pid)) {
        if (cpt_now_ms() > deadline) {
            it->err = ETIMEDOUT;
            return NULL;
        }
        usleep(1000);
    }
    kill(atomic_load(&bench_pid), SIGINT);
    if (!wait_mark(it->mark, "end", deadline, 200))
        it->err = ETIMEDOUT;
    atomic_store(&it->s->release, true);
    return NULL;
}

TEST(interrupted_window_counts_only_its_messages)
{
    enum { N = 300, SIZE = 64, DEPTH = 4 };
    char mark[64];
    snprintf(mark, sizeof mark, "/tmp/cport_bench_mark.%d", (int)getpid());
    for (int round = 0; round < 3; round++) {
        struct bad_server s;
        bad_server_start(&s, F_HOLD, (uint64_t)N * SIZE, (uint64_t)DEPTH * SIZE);
        unlink(mark);
        struct interrupter it = {.s = &s, .mark = mark};
        pthread_t th;
        CHECK(pthread_create(&th, NULL, interrupt_main, &it) == 0);
        bench("echo", "--port", bad_port(&s), "-c", "1", "-s", "64", "-d", "4", "-T", "20", "-w",
              "0", "--mark-file", mark, NULL);
        pthread_join(th, NULL);
        bad_server_stop(&s);
        unlink(mark);
        CHECK_EQ(it.err, 0);
        CHECK_EQ(run.status, 0);
        CHECK_EQ(result("interrupted"), 1);
        CHECK_EQ(result("errors"), 0);
        CHECK_EQ(result("msgs"), N); /* the window counts those before it */
        /* The held ones came back after it (and at most one more round, sent before the
         * client noticed the end). */
        CHECK(result("total_msgs") >= N + DEPTH);
        CHECK(result("secs") > 0);
    }
}

/* ---- the server's CPU is sampled at the window's edges ----------------------------------------
 * The window's edges are the moments the main thread sampled the server's CPU, however late
 * it woke up for them: with planned edges, a late sample took in CPU the server spent outside
 * the window. Here cport-bench is stopped (SIGSTOP: every thread) once its window has begun,
 * the --server-pid stand-in spends BURN_MS of CPU meanwhile, and only then does cport-bench
 * go on, long after its planned end (-T 0.2). A single-threaded stand-in cannot spend more
 * CPU than the window lasts; planned edges reported the 600 ms in a 0.2 s window. */
enum { BURN_MS = 600 };

struct burner {
    pid_t pid;
    int cmd, done; /* write a byte to cmd: it burns BURN_MS of CPU, then writes one to done */
};

static struct burner burner_spawn(void)
{
    int c[2], d[2];
    CHECK(pipe2(c, O_CLOEXEC) == 0 && pipe2(d, O_CLOEXEC) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        close(c[1]); /* (the end of the commands: when the test closes its end) */
        close(d[0]);
        char b;
        while (read(c[0], &b, 1) == 1) {
            struct timespec t0, t;
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t0);
            do
                clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
            while ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 < BURN_MS);
            if (write(d[1], "x", 1) != 1)
                break;
        }
        _exit(0);
    }
    close(c[0]);
    close(d[1]);
    return (struct burner){.pid = pid, .cmd = c[1], .done = d[0]};
}

struct stopper {
    struct burner *b;
    const char *mark;
    bool late; /* the window had ended already when cport-bench was stopped */
    int err;
};

static void *stopper_main(void *arg)
{
    struct stopper *st = arg;
    int64_t deadline = cpt_now_ms() + 20000;
    while (!mark_has(st->mark, "start") || !atomic_load(&bench_pid)) {
        if (cpt_now_ms() > deadline) {
            st->err = ETIMEDOUT;
            return NULL;
        }
        usleep(200);
    }
    pid_t pid = atomic_load(&bench_pid);
    kill(pid, SIGSTOP);
    st->late = mark_has(st->mark, "end");
    char c;
    if (write(st->b->cmd, "x", 1) != 1 || read(st->b->done, &c, 1) != 1)
        st->err = EIO;
    kill(pid, SIGCONT);
    return NULL;
}

TEST(server_cpu_is_sampled_at_the_window_edges)
{
    struct server s = server_start(NULL, NULL);
    struct burner b = burner_spawn();
    char mark[64], bpid[16];
    snprintf(mark, sizeof mark, "/tmp/cport_bench_mark.%d", (int)getpid());
    snprintf(bpid, sizeof bpid, "%d", (int)b.pid);
    for (int mode = 0; mode < 2; mode++) {
        for (double secs = 0.2;; secs *= 2) {
            unlink(mark);
            struct stopper st = {.b = &b, .mark = mark};
            pthread_t th;
            CHECK(pthread_create(&th, NULL, stopper_main, &st) == 0);
            char ss[16];
            snprintf(ss, sizeof ss, "%.1f", secs);
            bench(mode ? "connrate" : "echo", "--port", port_str(&s), "-c", "1", "-T", ss, "-w",
                  "0", "--server-pid", bpid, "--mark-file", mark, NULL);
            pthread_join(th, NULL);
            unlink(mark);
            CHECK_EQ(st.err, 0);
            if (!st.late)
                break;
            CHECK(secs < 3); /* (stopped after the window: a loaded machine; longer) */
        }
        CHECK_EQ(run.status, 0);
        CHECK_EQ(result("server_cpu_ok"), 1);
        double cpu_us = result("server_user_us") + result("server_sys_us");
        fprintf(stderr, "server CPU %.0f us in a %.3f s window\n", cpu_us, result("secs"));
        CHECK(cpu_us >= (BURN_MS - 20) * 1000.0);      /* the burn was in it */
        CHECK(cpu_us <= result("secs") * 1e6 + 20000); /* (ticks: 10 ms each) */
        CHECK(result("secs") >= BURN_MS / 1000.0);
    }
    close(b.cmd);
    close(b.done);
    CHECK(waitpid(b.pid, NULL, 0) == b.pid);
    server_stop(&s);
}

/* ---- bytes after the last echo ----------------------------------------------------------------
 * A reply sent twice, the second time long after the first: echo mode ended once every echo
 * was back, looked for bytes already waiting and closed, so a duplicate that came later went
 * unseen. Now each connection, once all is back after the window, ends its stream and reads
 * on to the server's end (within --drain). Here the faulty connection's server, at the
 * client's end, first has a burner (the --server-pid stand-in) spend BURN_MS of CPU, then
 * sends its last byte again and closes. That drain must lie after the window: the client's
 * end comes after the window's end (mark file), and the burn is not in the window's CPU. */
TEST(echo_detects_a_duplicate_sent_long_after_the_last_echo)
{
    struct burner b = burner_spawn();
    char mark[64], bpid[16];
    snprintf(mark, sizeof mark, "/tmp/cport_bench_mark.%d", (int)getpid());
    snprintf(bpid, sizeof bpid, "%d", (int)b.pid);
    struct bad_server s;
    bad_server_init(&s, F_LATE, 0, 1);
    s.late_burn = true;
    s.late_cmd = b.cmd;
    s.late_done = b.done;
    bad_server_run(&s);
    unlink(mark);
    int64_t t0 = cpt_now_ms();
    /* (--drain: time enough for the burn on a loaded machine; the run ends at the server's
     * end, not at the drain's) */
    bench("echo", "--port", bad_port(&s), "-c", "2", "-s", "100", "-d", "2", "-T", "0.3", "-w", "0",
          "--drain", "20", "--server-pid", bpid, "--mark-file", mark, NULL);
    int64_t took = cpt_now_ms() - t0;
    bad_server_stop(&s);
    int64_t window_end = mark_time(mark, "end");
    unlink(mark);
    close(b.cmd);
    close(b.done);
    CHECK(waitpid(b.pid, NULL, 0) == b.pid);
    CHECK(atomic_load(&s.hit)); /* the duplicate went out, after the burn */
    fprintf(stderr, "took %" PRId64 " ms; the client's end came %.1f ms after the window's\n", took,
            (double)(atomic_load(&s.end_ns) - window_end) / 1e6);
    CHECK_EQ(run.status, 1);
    CHECK_EQ(result("verify_errors"), 1);
    CHECK_EQ(result("errors"), 1);
    CHECK_EQ(result("unclosed"), 0);
    CHECK(strstr(run.err, "more bytes came back than were sent") != NULL);
    CHECK(took >= BURN_MS); /* it waited for the server's end */
    CHECK(result("msgs") > 0);
    CHECK(window_end > 0);
    CHECK(atomic_load(&s.end_ns) > window_end);
    CHECK_EQ(result("server_cpu_ok"), 1);
    CHECK(result("server_user_us") + result("server_sys_us") < BURN_MS * 1000 / 2);
}

/* A signal that comes during the drain ends it at once: here a server that keeps its end
 * open would otherwise hold the run for the whole (60 s) drain. Sent once the mark file says
 * "end" (the window's end is decided before that) and the server has seen the client's
 * end, so the drain has begun; the run must still report, with drain_cut=1. One connection,
 * the one the server keeps open: with a second, well-behaved one the signal could come
 * before the client had seen that one's close, and it counted as unclosed too (TSan, a
 * loaded fresh-clone run: unclosed 2). */
struct drain_cutter {
    struct bad_server *s;
    const char *mark;
    int err;
};

static void *drain_cut_main(void *arg)
{
    struct drain_cutter *dc = arg;
    int64_t deadline = cpt_now_ms() + 20000;
    if (!wait_mark(dc->mark, "end", deadline, 1000)) {
        dc->err = ETIMEDOUT;
        return NULL;
    }
    while (!atomic_load(&dc->s->hit) || !atomic_load(&bench_pid)) {
        if (cpt_now_ms() > deadline) {
            dc->err = ETIMEDOUT;
            return NULL;
        }
        usleep(1000);
    }
    kill(atomic_load(&bench_pid), SIGINT);
    return NULL;
}

TEST(echo_drain_ends_at_a_signal_that_comes_during_it)
{
    char mark[64];
    snprintf(mark, sizeof mark, "/tmp/cport_bench_mark.%d", (int)getpid());
    unlink(mark);
    struct bad_server s;
    bad_server_start(&s, F_OPEN, 0, 1);
    struct drain_cutter dc = {.s = &s, .mark = mark};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, drain_cut_main, &dc) == 0);
    int64_t t0 = cpt_now_ms();
    bench("echo", "--port", bad_port(&s), "-c", "1", "-T", "0.3", "-w", "0", "--drain", "60",
          "--mark-file", mark, NULL);
    int64_t took = cpt_now_ms() - t0;
    pthread_join(th, NULL);
    bad_server_stop(&s);
    unlink(mark);
    fprintf(stderr, "took %" PRId64 " ms\n", took);
    CHECK_EQ(dc.err, 0);
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("drain_cut"), 1);
    CHECK_EQ(result("interrupted"), 0); /* the window ran its course */
    CHECK_EQ(result("errors"), 0);
    CHECK_EQ(result("unclosed"), 1);
    CHECK(result("msgs") > 0);
    CHECK(strstr(run.out, "drain cut short by a signal") != NULL);
    CHECK(took < 30000); /* not the drain's 60 s */
}

/* A server that keeps its end open after the client's (TCP allows it) is waited for only up
 * to the drain's end, and counted apart (`unclosed`), not as an error. */
TEST(echo_waits_for_a_server_that_keeps_its_end_open_only_as_long_as_the_drain)
{
    struct bad_server s;
    bad_server_start(&s, F_OPEN, 0, 1);
    int64_t t0 = cpt_now_ms();
    bench("echo", "--port", bad_port(&s), "-c", "2", "-T", "0.3", "-w", "0", "--drain", "0.5",
          NULL);
    int64_t took = cpt_now_ms() - t0;
    bad_server_stop(&s);
    CHECK(atomic_load(&s.hit)); /* it saw the client's end and kept its own open */
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("errors"), 0);
    CHECK_EQ(result("unclosed"), 1); /* the faulty connection; the other one was closed */
    CHECK(strstr(run.out, "not closed: 1 connection") != NULL);
    CHECK(took >= 800);  /* -T and the whole drain */
    CHECK(took < 10000); /* and not much more */
}

/* ---- open loop (--rate) ---------------------------------------------------------------------
 * Messages are due on a fixed schedule (R per second in all, from the warm-up's start) and
 * their latency runs from their due time, so that a server's stall shows in every message
 * due during it; closed loop, the stall also stops the sends and shows once per message in
 * flight (coordinated omission). */

/* A rate is followed, and never exceeded: nothing goes out before it is due, so the run's
 * messages are at most those due between its start and its window's end (the mark file);
 * a slower machine only starts the schedule later. The lower bound is lenient. */
TEST(echo_open_loop_follows_its_rate)
{
    enum { RATE = 400 };
    char mark[64];
    snprintf(mark, sizeof mark, "/tmp/cport_bench_mark.%d", (int)getpid());
    unlink(mark);
    struct server s = server_start(NULL, NULL);
    int64_t t0 = cpt_now_ns();
    bench("echo", "--port", port_str(&s), "--rate", "400", "-c", "4", "-t", "2", "-T", "1", "-w",
          "0.2", "--mark-file", mark, NULL);
    int64_t window_end = mark_time(mark, "end");
    unlink(mark);
    server_stop(&s);
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("errors"), 0);
    CHECK_EQ(result("established"), 4);
    CHECK_EQ(result("rate_target"), RATE);
    CHECK(window_end > t0);
    double due = RATE * (double)(window_end - t0) / 1e9;
    fprintf(stderr, "%.0f msgs in all, at most %.1f due by the window's end\n",
            result("total_msgs"), due);
    CHECK(result("total_msgs") <= due + 4); /* (+ one per connection: rounding) */
    CHECK(result("msgs") >= 0.5 * RATE * result("secs"));
    CHECK(result("msgs_per_s") >= 0.5 * RATE);
    CHECK(result("conn_msgs_min") > 0); /* every connection has its share */
    CHECK(strstr(run.out, "open loop: target 400 msgs/s") != NULL);
    CHECK(strstr(run.out, "latency from due time (us): p50") != NULL);
}

/* One stall of the server, STALL_MS long, once the window has begun (the mark file says
 * "start"). A run whose stall had not ended STALL_MS before the window's end (a slow,
 * loaded machine) proves nothing: it runs again, twice as long. */
enum { STALL_MS = 500 };

struct staller {
    struct bad_server *s;
    const char *mark;
    int err;
};

static void *stall_main(void *arg)
{
    struct staller *st = arg;
    if (!wait_mark(st->mark, "start", cpt_now_ms() + 20000, 1000))
        st->err = ETIMEDOUT;
    atomic_store(&st->s->stall, true);
    return NULL;
}

/* Runs cport-bench echo with one connection, depth 1 (plus the extra arguments, NULL-ended
 * list of up to 4) against a server that stalls once in the window, until a run has the
 * whole stall in its window. */
static void run_with_a_stall(const char *a1, const char *a2)
{
    char mark[64];
    snprintf(mark, sizeof mark, "/tmp/cport_bench_mark.%d", (int)getpid());
    for (double secs = 2;; secs *= 2) {
        struct bad_server s;
        bad_server_start(&s, F_STALL, 0, STALL_MS);
        unlink(mark);
        struct staller st = {.s = &s, .mark = mark};
        pthread_t th;
        CHECK(pthread_create(&th, NULL, stall_main, &st) == 0);
        char ss[16];
        snprintf(ss, sizeof ss, "%.0f", secs);
        bench("echo", "--port", bad_port(&s), "-c", "1", "-d", "1", "-s", "64", "-T", ss, "-w", "0",
              "--mark-file", mark, a1, a2, NULL);
        pthread_join(th, NULL);
        bad_server_stop(&s);
        int64_t start = mark_time(mark, "start"), end = mark_time(mark, "end");
        unlink(mark);
        CHECK_EQ(st.err, 0);
        bool whole = atomic_load(&s.hit) && atomic_load(&s.stall_ns) >= start &&
                     atomic_load(&s.end_ns) + STALL_MS * 1000000ll <= end;
        fprintf(stderr, "stall %.1f .. %.1f ms into a %.1f ms window\n",
                (double)(atomic_load(&s.stall_ns) - start) / 1e6,
                (double)(atomic_load(&s.end_ns) - start) / 1e6, (double)(end - start) / 1e6);
        if (whole)
            break;
        CHECK(secs < 10);
    }
}

TEST(echo_open_loop_measures_a_stall_in_every_message_due_during_it)
{
    /* Open loop, 200 msgs/s: the 100 or so messages due during the stall wait for it (on
     * the server, or here behind the one in flight) and their latency, from their due
     * time, is up to STALL_MS; those due in its first 300 ms are still 200 ms or more
     * late: more than 1% of a window of at most 8 s (1600 messages). */
    run_with_a_stall("--rate", "200");
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("errors"), 0);
    double open_p99 = result("p99_us");
    CHECK(open_p99 >= 200000);
    CHECK(result("max_us") >= (STALL_MS - 10) * 1000.0);
    /* Those due during the stall went out after it, behind the one held (depth 1). */
    CHECK(result("late_sends") >= 50);
    CHECK(strstr(run.out, "latency from due time") != NULL);

    /* Closed loop against the same server: the stall stops the sends too, so it shows in
     * the one message in flight, and the median is an ordinary echo's. (The one upper
     * bound on a latency here: the 200 ms the open loop's p99 reached, against a loopback
     * round trip's median.) */
    run_with_a_stall(NULL, NULL);
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("errors"), 0);
    CHECK(result("msgs") >= 3); /* (the one stalled message is not the median) */
    fprintf(stderr, "p99 open loop %.1f us; p50 closed loop %.1f us\n", open_p99, result("p50_us"));
    CHECK(result("p50_us") < 200000);
    CHECK(strstr(run.out, "rate_target") == NULL); /* closed loop reports as before */
    CHECK(strstr(run.out, "latency (us): p50") != NULL);
}

/* A server that echoes 10 messages, then holds the next one until the window is over: the
 * rate asked for is not reached, and the summary says so; what was due and could not go
 * out (depth 1) is the backlog. The held echo comes back in the drain: no error. */
struct end_releaser {
    struct bad_server *s;
    const char *mark;
    int err;
};

static void *release_at_end_main(void *arg)
{
    struct end_releaser *r = arg;
    if (!wait_mark(r->mark, "end", cpt_now_ms() + 20000, 1000))
        r->err = ETIMEDOUT;
    atomic_store(&r->s->release, true);
    return NULL;
}

TEST(echo_open_loop_says_when_it_did_not_keep_up)
{
    char mark[64];
    snprintf(mark, sizeof mark, "/tmp/cport_bench_mark.%d", (int)getpid());
    unlink(mark);
    struct bad_server s;
    bad_server_start(&s, F_HOLD, 10 * 64, 64);
    atomic_store(&s.open, true);
    struct end_releaser r = {.s = &s, .mark = mark};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, release_at_end_main, &r) == 0);
    bench("echo", "--port", bad_port(&s), "--rate", "200", "-c", "1", "-d", "1", "-s", "64", "-T",
          "1", "-w", "0", "--mark-file", mark, NULL);
    pthread_join(th, NULL);
    bad_server_stop(&s);
    unlink(mark);
    CHECK_EQ(r.err, 0);
    CHECK(atomic_load(&s.hit));
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("errors"), 0);
    CHECK(result("msgs") <= 10);
    CHECK_EQ(result("kept_up"), 0);
    CHECK(strstr(run.out, "did not keep up") != NULL);
    /* Due in the window: 200 a second from its start; at most 11 went out. */
    CHECK(result("backlog") >= 150);
}

/* A rate far beyond reach (10^9 msgs/s) still sends, as fast as the depth lets it, and says
 * it did not keep up: the client released the due messages one at a time, and spent the
 * window counting them (2 messages per connection in a second, measured), not sending.
 * The bound below is a hundredth of what a slow (sanitized) run echoes here. */
TEST(echo_open_loop_beyond_reach_still_sends)
{
    struct bad_server s;
    bad_server_start(&s, F_NONE, 0, 1);
    bench("echo", "--port", bad_port(&s), "-c", "2", "-d", "1", "-T", "0.5", "-w", "0.1", "--rate",
          "1000m", NULL);
    bad_server_stop(&s);
    CHECK_EQ(run.status, 0);
    CHECK_EQ(result("errors"), 0);
    CHECK_EQ(result("kept_up"), 0);
    CHECK(result("backlog") > 0);
    CHECK(strstr(run.out, "did not keep up") != NULL);
    fprintf(stderr, "%.0f messages in the window\n", result("msgs"));
    CHECK(result("msgs") >= 50);
}

/* --rate takes a positive number of messages per second (suffixes k, m), in echo mode. */
TEST(echo_rate_arguments)
{
    static const char *bad_rates[] = {"0", "-1", "abc", "", "10x", "nan", "inf", "0k"};
    for (size_t i = 0; i < sizeof bad_rates / sizeof *bad_rates; i++) {
        bench("echo", "--port", "1", "-c", "1", "-T", "0.2", "-w", "0", "--rate", bad_rates[i],
              NULL);
        CHECK_EQ(run.status, 2);
        CHECK(strstr(run.err, "bad value for --rate") != NULL);
        CHECK(strstr(run.out, "RESULT") == NULL);
    }
    bench("connrate", "--port", "1", "-c", "1", "-T", "0.2", "-w", "0", "--rate", "100", NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "'--rate' does not apply") != NULL);
    bench("hold", "--port", "1", "-n", "1", "-T", "0.2", "--rate", "100", NULL);
    CHECK_EQ(run.status, 2);
    CHECK(strstr(run.err, "'--rate' does not apply") != NULL);
    /* Taken (port 1: nothing listens, a connect error), with its suffix and fractions. */
    bench("echo", "--port", "1", "-c", "1", "-T", "0.2", "-w", "0", "--rate", "2k", NULL);
    CHECK_EQ(run.status, 1);
    CHECK_EQ(result("rate_target"), 2000);
    bench("echo", "--port", "1", "-c", "1", "-T", "0.2", "-w", "0", "--rate", "0.5", NULL);
    CHECK_EQ(run.status, 1);
    CHECK_EQ(result("rate_target"), 0.5);
    /* The help says what it does. */
    bench("echo", "--help", NULL);
    CHECK_EQ(run.status, 0);
    CHECK(strstr(run.out, "--rate R") != NULL);
}
