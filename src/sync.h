/* Internal synchronisation primitives: futex wait/wake, a 4-byte mutex, monotonic time.
 *
 * cp__lock is a three-state futex mutex (0 free, 1 held, 2 held with sleepers) that
 * spins briefly before sleeping. It is 4 bytes so that every socket can own one without
 * growing past its cache line; pthread_mutex_t would cost 40.
 */
#ifndef CPORT_SYNC_H
#define CPORT_SYNC_H

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdbool.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static inline void cp__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

/* ThreadSanitizer cannot see the ordering the kernel provides between registering a handle
 * or submitting a request and the poller getting it back (epoll_wait, a CQE): tell it. A
 * release before the kernel learns of the pointer, an acquire once the poller got it. */
#if defined(__SANITIZE_THREAD__)
#define CP__TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CP__TSAN 1
#endif
#endif
#ifdef CP__TSAN
#include <sanitizer/tsan_interface.h>
#define cp__hb_release(p) __tsan_release((void *)(p))
#define cp__hb_acquire(p) __tsan_acquire((void *)(p))
#else
#define cp__hb_release(p) ((void)0)
#define cp__hb_acquire(p) ((void)0)
#endif

/* Monotonic clock in nanoseconds. */
static inline int64_t cp__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The monotonic clock as of the last timer tick (CLOCK_MONOTONIC_COARSE): a few
 * nanoseconds to read, where the exact clock costs ~20 ns; it lags the exact clock by up
 * to its resolution (clock_getres), one scheduler tick. */
static inline int64_t cp__now_coarse_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Sleep while *word == expected, until woken or until the absolute CLOCK_MONOTONIC time
 * deadline_ns (< 0 = no deadline). Returns 0 when woken (or the value changed, or a signal
 * interrupted the wait) and -ETIMEDOUT when the deadline passed. Spurious returns are
 * allowed: callers re-check their condition. */
static inline int cp__futex_wait(uint32_t *word, uint32_t expected, int64_t deadline_ns)
{
    struct timespec ts, *tsp = NULL;
    if (deadline_ns >= 0) {
        ts.tv_sec = deadline_ns / 1000000000;
        ts.tv_nsec = deadline_ns % 1000000000;
        tsp = &ts;
    }
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline, so repeated waits do not
     * drift. */
    long r = syscall(SYS_futex, word, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, expected, tsp, NULL,
                     FUTEX_BITSET_MATCH_ANY);
    if (r == -1 && errno == ETIMEDOUT)
        return -ETIMEDOUT;
    return 0;
}

static inline void cp__futex_wake(uint32_t *word, int n)
{
    syscall(SYS_futex, word, FUTEX_WAKE | FUTEX_PRIVATE_FLAG, n, NULL, NULL, 0);
}

/* Start a thread of cport's own, one that runs no caller code (the timer thread, epoll's
 * file threads): every signal is blocked in it, whatever the mask of the thread that
 * happened to start it, so that a process-directed signal goes to one of the
 * application's threads (a handler run here could not take the locks this thread
 * holds), and it is named `name` (at most 15 characters), for ps, top and gdb. Returns 0
 * or a negative errno. (sync.c) */
int cp__thread_start(pthread_t *thread, const char *name, void *(*fn)(void *), void *arg);

/* A lock is a bare 32-bit word so that public structs can embed one as uint32_t. */
typedef uint32_t cp__lock;

static inline void cp__lock_init(cp__lock *l)
{
    __atomic_store_n(l, 0, __ATOMIC_RELAXED);
}

static inline bool cp__lock_try(cp__lock *l)
{
    uint32_t zero = 0;
    return __atomic_compare_exchange_n(l, &zero, 1, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

void cp__lock_slow(cp__lock *l);

static inline void cp__lock_acquire(cp__lock *l)
{
    if (!cp__lock_try(l))
        cp__lock_slow(l);
}

static inline void cp__lock_release(cp__lock *l)
{
    if (__atomic_exchange_n(l, 0, __ATOMIC_RELEASE) == 2)
        cp__futex_wake(l, 1);
}

#endif
