/* Raw system calls for the per-message path.
 *
 * glibc's recv/send/recvmsg/sendmsg/accept4/close are cancellation points: every call switches
 * asynchronous cancellation on and off around the system call, about 30 instructions that
 * cport never needs (its threads are never cancelled). These helpers make the system call
 * directly and return the result or a negative errno, without touching errno.
 *
 * Under AddressSanitizer or ThreadSanitizer they call the libc functions instead, so that
 * the sanitizers still see (and check) the buffers the kernel reads and writes.
 */
#ifndef CPORT_SYS_H
#define CPORT_SYS_H

#include "sync.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define CP__SYS_LIBC 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CP__SYS_LIBC 1
#endif
#endif
#if defined(CP__TSAN) && !defined(CP__SYS_LIBC)
#define CP__SYS_LIBC 1
#endif
#if !defined(CP__SYS_LIBC) && !defined(__x86_64__) && !defined(__aarch64__)
#define CP__SYS_LIBC 1
#endif

#ifndef CP__SYS_LIBC
static inline long cp__syscall6(long n, long a1, long a2, long a3, long a4, long a5, long a6)
{
#if defined(__x86_64__)
    long ret;
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    __asm__ __volatile__("syscall"
                         : "=a"(ret)
                         : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                         : "rcx", "r11", "memory");
    return ret;
#else /* aarch64 */
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a1;
    register long x1 __asm__("x1") = a2;
    register long x2 __asm__("x2") = a3;
    register long x3 __asm__("x3") = a4;
    register long x4 __asm__("x4") = a5;
    register long x5 __asm__("x5") = a6;
    __asm__ __volatile__("svc 0"
                         : "+r"(x0)
                         : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                         : "memory");
    return x0;
#endif
}
#endif

/* recv(2): bytes received, or a negative errno (EINTR included: the caller retries). */
static inline long cp__sys_recv(int fd, void *buf, size_t len, int flags)
{
#ifdef CP__SYS_LIBC
    ssize_t n = recv(fd, buf, len, flags);
    return n < 0 ? -errno : n;
#else
    return cp__syscall6(SYS_recvfrom, fd, (long)buf, (long)len, flags, 0, 0);
#endif
}

/* send(2), as cp__sys_recv(). */
static inline long cp__sys_send(int fd, const void *buf, size_t len, int flags)
{
#ifdef CP__SYS_LIBC
    ssize_t n = send(fd, buf, len, flags);
    return n < 0 ? -errno : n;
#else
    return cp__syscall6(SYS_sendto, fd, (long)buf, (long)len, flags, 0, 0);
#endif
}

/* recvmsg(2), as cp__sys_recv(). */
static inline long cp__sys_recvmsg(int fd, struct msghdr *msg, int flags)
{
#ifdef CP__SYS_LIBC
    ssize_t n = recvmsg(fd, msg, flags);
    return n < 0 ? -errno : n;
#else
    return cp__syscall6(SYS_recvmsg, fd, (long)msg, flags, 0, 0, 0);
#endif
}

/* accept4(2): the new descriptor, or a negative errno (EINTR included). */
static inline long cp__sys_accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
#ifdef CP__SYS_LIBC
    int r = accept4(fd, addr, addrlen, flags);
    return r < 0 ? -errno : r;
#else
    return cp__syscall6(SYS_accept4, fd, (long)addr, (long)addrlen, flags, 0, 0);
#endif
}

/* sendmsg(2), as cp__sys_recv(). */
static inline long cp__sys_sendmsg(int fd, const struct msghdr *msg, int flags)
{
#ifdef CP__SYS_LIBC
    ssize_t n = sendmsg(fd, msg, flags);
    return n < 0 ? -errno : n;
#else
    return cp__syscall6(SYS_sendmsg, fd, (long)msg, flags, 0, 0, 0);
#endif
}

/* close(2): 0 or a negative errno. (Not retried on EINTR: Linux frees the descriptor
 * even then.) */
static inline long cp__sys_close(int fd)
{
#ifdef CP__SYS_LIBC
    return close(fd) < 0 ? -errno : 0;
#else
    return cp__syscall6(SYS_close, fd, 0, 0, 0, 0, 0);
#endif
}

/* sendfile(2) and splice(2) into a socket take no MSG_NOSIGNAL: on a broken connection
 * the kernel raises SIGPIPE at the calling thread, which kills a program that left its
 * disposition at the default (cport's sends promise never to raise it). Around such a
 * call SIGPIPE is blocked on this thread, and one the call raised (it then failed with
 * EPIPE) is taken back before the mask is restored. A SIGPIPE already pending before the
 * call (only possible if the thread had it blocked) is left alone. */
typedef struct cp__nopipe {
    sigset_t old;
    bool pending_before;
} cp__nopipe;

static inline void cp__nopipe_begin(cp__nopipe *g)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &set, &g->old);
    g->pending_before = false;
    if (sigismember(&g->old, SIGPIPE)) {
        sigset_t pend;
        g->pending_before = sigpending(&pend) == 0 && sigismember(&pend, SIGPIPE);
    }
}

/* err: the call's errno (0 on success). Preserves errno. */
static inline void cp__nopipe_end(cp__nopipe *g, int err)
{
    int saved = errno;
    if (err == EPIPE && !g->pending_before) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGPIPE);
        struct timespec zero = {0, 0};
        while (sigtimedwait(&set, NULL, &zero) < 0 && errno == EINTR)
            ;
    }
    pthread_sigmask(SIG_SETMASK, &g->old, NULL);
    errno = saved;
}

#endif
