/* Slow path of the internal futex mutex (see sync.h). */
#include "sync.h"

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
