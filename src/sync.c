/* Slow path of the internal futex mutex, and the start of cport's own threads (see
 * sync.h). */
#include "sync.h"

#include <signal.h>

void cp__lock_slow(cp__lock *l)
{
    /* Spin a little first: critical sections in cport are a handful of pointer updates,
     * so the holder usually releases within a few hundred cycles. */
    for (int i = 0; i < 100; i++) {
        cp__cpu_relax();
        if (__atomic_load_n(l, __ATOMIC_RELAXED) == 0 && cp__lock_try(l))
            return;
    }
    /* Mark the lock contended (2) and sleep until we take it from the free state. */
    while (__atomic_exchange_n(l, 2, __ATOMIC_ACQUIRE) != 0)
        cp__futex_wait(l, 2, -1);
}

int cp__thread_start(pthread_t *thread, const char *name, void *(*fn)(void *), void *arg)
{
    sigset_t all, old;
    sigfillset(&all);
    /* The new thread inherits the mask in force when it is created. */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int r = pthread_create(thread, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r != 0)
        return -r;
    pthread_setname_np(*thread, name); /* (a name is a convenience: its failure is not) */
    return 0;
}
