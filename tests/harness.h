/* cport's test harness: each test file is one executable holding several named tests;
 * CTest runs every (test, backend) pair as its own process with a timeout. A test passes
 * by returning; any CHECK failure prints where and why and exits 1; exit 77 = skipped.
 *
 *   TEST(name) { CHECK(x == 1); CHECK_EQ(a, b); }
 *
 * The backend comes from CPORT_BACKEND (set per test by CTest). */
#ifndef CPORT_TEST_HARNESS_H
#define CPORT_TEST_HARNESS_H

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*cpt_fn)(void);
void cpt_register(const char *name, cpt_fn fn);

#define TEST(name)                                                                                 \
    static void cpt_test_##name(void);                                                             \
    __attribute__((constructor)) static void cpt_reg_##name(void)                                  \
    {                                                                                              \
        cpt_register(#name, cpt_test_##name);                                                      \
    }                                                                                              \
    static void cpt_test_##name(void)

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);               \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define CHECK_EQ(a, b)                                                                             \
    do {                                                                                           \
        int64_t cpt_a = (int64_t)(a), cpt_b = (int64_t)(b);                                        \
        if (cpt_a != cpt_b) {                                                                      \
            fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%" PRId64 " vs %" PRId64 ")\n",     \
                    __FILE__, __LINE__, #a, #b, cpt_a, cpt_b);                                     \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

/* CHECK that a cport call returned >= 0, printing the error name otherwise. */
#define CHECK_OK(expr)                                                                             \
    do {                                                                                           \
        int64_t cpt_r = (int64_t)(expr);                                                           \
        if (cpt_r < 0) {                                                                           \
            fprintf(stderr, "%s:%d: %s failed: %" PRId64 " (%s)\n", __FILE__, __LINE__, #expr,     \
                    cpt_r, cpt_strerror((int)cpt_r));                                              \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define SKIP(why)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "SKIP: %s\n", why);                                                        \
        exit(77);                                                                                  \
    } while (0)

const char *cpt_strerror(int err);

/* The backend this run targets ("io_uring" or "epoll"). */
const char *cpt_backend(void);

/* Monotonic milliseconds / nanoseconds. */
int64_t cpt_now_ms(void);
int64_t cpt_now_ns(void);

/* Work load multiplier: 1 normally, smaller under sanitizers (CPORT_TEST_SCALE=0.1 ..). The
 * properties checked never depend on it, only how many iterations check them. */
double cpt_scale(void);
int64_t cpt_scaled(int64_t n, int64_t min);

/* Descriptors this process has open now (not counting the one that lists them), to check
 * that nothing leaks. Fails the test if /proc/self/fd cannot be read. */
int cpt_count_fds(void);

/* The threads of this process named `name` (/proc/self/task/N/comm): returns how many,
 * and in *blocked_all / *blocked_none whether every one of them blocks / none of them
 * blocks each of SIGINT, SIGTERM, SIGHUP and SIGUSR1 (SigBlk). */
int cpt_threads_named(const char *name, bool *blocked_all, bool *blocked_none);

/* A memfd (close-on-exec) to capture a child's or the library's output in. It is in append
 * mode: a memfd's file position is not serialised between threads (unlike a file opened
 * with open()), so threads writing to it at once would overwrite each other's lines
 * without O_APPEND. Fails the test if it cannot be made. */
int cpt_memfd(const char *name);

/* Skips the test (SKIP) unless the machine has the IPv6 loopback address ::1 (a probe
 * socket binds it). */
void cpt_need_ipv6_loopback(void);

/* This process's CPU time (user + system, all threads) in ms. */
int64_t cpt_cpu_ms(void);

/* The root of the source tree (from the harness's own path at build time), or NULL if it
 * cannot be told. */
const char *cpt_source_root(void);

#endif
