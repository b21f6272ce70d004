/* Test runner: `prog NAME` runs one test; `prog --list` lists them. */
#include "harness.h"

#include "cport.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { MAX_TESTS = 256 };

static struct {
    const char *name;
    cpt_fn fn;
} tests[MAX_TESTS];
static int ntests;

void cpt_register(const char *name, cpt_fn fn)
{
    if (ntests == MAX_TESTS) {
        fprintf(stderr, "too many tests\n");
        exit(2);
    }
    tests[ntests].name = name;
    tests[ntests].fn = fn;
    ntests++;
}

const char *cpt_strerror(int err)
{
    return cp_strerror(err);
}

const char *cpt_backend(void)
{
    const char *b = getenv("CPORT_BACKEND");
    return b && *b ? b : "auto";
}

int64_t cpt_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t cpt_now_ms(void)
{
    return cpt_now_ns() / 1000000;
}

double cpt_scale(void)
{
    const char *s = getenv("CPORT_TEST_SCALE");
    double v = s ? atof(s) : 1.0;
    return v > 0 ? v : 1.0;
}

int64_t cpt_scaled(int64_t n, int64_t min)
{
    int64_t v = (int64_t)((double)n * cpt_scale());
    return v < min ? min : v;
}

int64_t cpt_cpu_ms(void)
{
    struct rusage ru;
    CHECK_EQ(getrusage(RUSAGE_SELF, &ru), 0);
    return (int64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000 +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1000;
}

const char *cpt_source_root(void)
{
    static char root[PATH_MAX];
    snprintf(root, sizeof root, "%s", __FILE__);
    char *t = strstr(root, "/tests/harness.c");
    if (!t)
        return NULL;
    *t = 0;
    return root;
}

int cpt_count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    CHECK(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the directory's own fd */
}

int cpt_threads_named(const char *name, bool *blocked_all, bool *blocked_none)
{
    const uint64_t want =
        1ull << (SIGINT - 1) | 1ull << (SIGTERM - 1) | 1ull << (SIGHUP - 1) | 1ull << (SIGUSR1 - 1);
    DIR *d = opendir("/proc/self/task");
    CHECK(d);
    int n = 0;
    *blocked_all = *blocked_none = true;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], line[256] = "";
        snprintf(path, sizeof(path), "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue; /* the thread exited */
        bool named = fgets(line, sizeof(line), f) && strcmp(strtok(line, "\n"), name) == 0;
        fclose(f);
        if (!named)
            continue;
        snprintf(path, sizeof(path), "/proc/self/task/%s/status", e->d_name);
        f = fopen(path, "r");
        if (!f)
            continue;
        uint64_t blk = 0;
        while (fgets(line, sizeof(line), f))
            if (strncmp(line, "SigBlk:", 7) == 0)
                blk = strtoull(line + 7, NULL, 16);
        fclose(f);
        n++;
        if ((blk & want) != want)
            *blocked_all = false;
        if (blk & want)
            *blocked_none = false;
    }
    closedir(d);
    return n;
}

int cpt_memfd(const char *name)
{
    int fd = memfd_create(name, MFD_CLOEXEC);
    CHECK(fd >= 0);
    CHECK(fcntl(fd, F_SETFL, O_APPEND) == 0);
    return fd;
}

void cpt_need_ipv6_loopback(void)
{
    int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in6 sa = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    bool ok = fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
    if (fd >= 0)
        close(fd);
    if (!ok)
        SKIP("no IPv6 loopback (::1) on this machine");
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--list") == 0) {
        for (int i = 0; i < ntests; i++)
            printf("%s\n", tests[i].name);
        return 0;
    }
    if (argc != 2) {
        fprintf(stderr, "usage: %s TEST | --list\n", argv[0]);
        return 2;
    }
    /* Tests write to sockets whose peers may vanish: EPIPE must be an error, not a death. */
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < ntests; i++) {
        if (strcmp(tests[i].name, argv[1]) == 0) {
            fprintf(stderr, "== %s [%s]\n", argv[1], cpt_backend());
            tests[i].fn();
            fprintf(stderr, "== %s: pass\n", argv[1]);
            return 0;
        }
    }
    fprintf(stderr, "no test named %s\n", argv[1]);
    return 2;
}
