/* cport: the completion port.
 *
 * A cp_port is Windows' I/O completion port on Linux: a queue of completions that a
 * small pool of threads dequeues from, with
 *   - a concurrency limit: at most `concurrency` threads are released to run at once;
 *   - LIFO release: of the threads waiting, the one that began waiting last is woken first;
 *   - a fast path: a running thread that comes back to dequeue while completions are
 *     queued takes one without sleeping and without waking anyone;
 *   - posting of custom completions from any thread (PostQueuedCompletionStatus);
 *   - an I/O backend (io_uring, or epoll where io_uring is not allowed) whose operation
 *     completions arrive in the same queue (see cport/socket.h).
 *
 * Threads and "running". Linux cannot see a worker block the way the NT kernel does. A
 * thread therefore counts as running from the moment cp_port_dequeue() returns it work
 * until it calls cp_port_dequeue() again (or exits). A handler about to block on
 * something other than the port (a lock, a disk read, sleep, a reply from a peer,
 * another port's cp_port_dequeue()) should bracket the wait with
 * cp_port_block_begin()/cp_port_block_end() so another waiter may run meanwhile;
 * after cp_port_block_end() the thread counts as running again, so the number of running
 * threads may briefly exceed the concurrency value, exactly as on Windows.
 *   - Waiting on another port does not end a thread's running on this one (Windows moves
 *     the thread's association; cport keeps no per-thread state across ports): with
 *     concurrency 1 and no bracket, this port's work waits until the thread is back.
 *   - On io_uring the bracket is required when the wait depends on I/O the handler
 *     started: a running thread's submissions reach the kernel in one batch when it next
 *     polls (back at the port with nothing queued for it, or after taking 64 completions
 *     without a poll while no other thread polls), at cp_port_block_begin(), or through a
 *     thread blocked polling; with every thread running, a send started and then waited
 *     on without it never leaves (on epoll it goes out at once).
 *
 * Ownership. cp_port_create() allocates the port; cp_port_destroy() frees it and
 * everything it owns. The port records, per thread that ever dequeued from it, a small
 * record (allocated on that thread's first dequeue, freed when the thread exits or when
 * the port is destroyed, whichever comes first).
 *
 * Thread safety. Every function here may be called from any thread, concurrently,
 * except cp_port_destroy(), which must be the last call on the port and must not race
 * with any other call on it (including threads still exiting after having dequeued).
 *
 * fork(). A port does not cross into a child process. The child shares the parent's
 * io_uring ring or epoll instance (the same kernel object), but not its threads: a
 * request it submitted would complete in the parent's queue, and a lock a parent thread
 * held at the fork stays held. The child must make no call on the parent's ports, nor on
 * pools, sockets or servers built on them, not even the destroy functions (a pool's
 * destroy would wait for workers that do not exist there): it execs, exits with _exit(),
 * or creates ports of its own. (Descriptors cport creates are close-on-exec.)
 *
 * NULL arguments: only where a function's comment allows them (see cport/common.h).
 */
#ifndef CPORT_PORT_H
#define CPORT_PORT_H

#include "cport/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_port cp_port;

/* One dequeued completion: what GetQueuedCompletionStatus returns. */
typedef struct cp_completion {
    /* The per-I/O context. For an I/O operation this is its cp_op* (recover your own
     * struct with CP_CONTAINER_OF); for a posted completion, the pointer given to
     * cp_port_post(). */
    void *op;
    /* The per-handle key: the key the socket was associated with, or the key posted. */
    uintptr_t key;
    /* Bytes transferred or value posted (>= 0), or a negative errno value. */
    int64_t result;
} cp_completion;

/* Which I/O engine a port uses. */
typedef enum cp_backend_kind {
    CP_BACKEND_AUTO = 0, /* CPORT_BACKEND from the environment if set, else io_uring, else epoll */
    CP_BACKEND_IO_URING = 1,
    CP_BACKEND_EPOLL = 2,
} cp_backend_kind;

/* Flags for cp_port_options.flags. */
#define CP_PORT_QUIET 0x1u /* do not print the one-line notice when falling back to epoll */
/* Every pooled receive gets a pool buffer of its own, its data at the buffer's start. By
 * default, where the kernel can (io_uring, Linux 6.12+), receives of all sockets are
 * packed one after the other into shared buffers, so small messages touch little memory;
 * set this when received data must be buffer-aligned. */
#define CP_PORT_WHOLE_BUFFERS 0x2u

/* Creation options. Zero-initialise, then set what you need: every zero field means
 * "the default" described next to it. */
typedef struct cp_port_options {
    unsigned concurrency;      /* threads released at once; 0 = online CPUs */
    cp_backend_kind backend;   /* CP_BACKEND_AUTO unless forced; a forced backend that is
                                  unavailable makes creation fail (no silent switch) */
    uint32_t flags;            /* CP_PORT_*; 0 = none (unknown bits: creation fails with
                                  -EINVAL) */
    uint32_t max_posted;       /* most posted completions queued at once, rounded up to a
                                  power of two, at least 2; 0 = 16384; at most 2^30 (above
                                  it creation fails with -EINVAL). cp_port_post() fails with
                                  -EAGAIN beyond it (a pool's work items and timer
                                  firings are posts too) */
    uint32_t ring_entries;     /* io_uring submission queue size; 0 = 1024, at most 32768
                                  (the kernel's limit; above it creation fails with -EINVAL) */
    uint32_t cq_entries;       /* io_uring completion queue size (overflow beyond it is kept
                                  by the kernel and drained, never lost); 0 = the larger of
                                  4096 and 4 x ring_entries, at most 65536 (the kernel's limit;
                                  a larger value makes creation fail with -EINVAL); a value
                                  below ring_entries is raised to it */
    uint32_t pool_buffers;     /* buffers in the shared receive pool (CP_RECV_POOL receives);
                                  0 = 4096; rounded up to a power of two, at most 32768
                                  (a larger value is taken as 32768) */
    uint32_t pool_buffer_size; /* bytes per pool buffer, a multiple of the page size
                                  (else cp_port_create_ex() fails with -EINVAL);
                                  0 = 4096, or the page size where pages are larger.
                                  The pool (buffers x size) must stay under
                                  4 GiB: cp_port_create_ex() fails with -EINVAL */
    uint32_t pool_per_socket;  /* received chunks (pool buffers or parts of them) one
                                  socket may hold undelivered before it stops receiving
                                  into the pool (fairness cap; see
                                  cp_socket_recv_pooled); 0 = 4, at most 255 (above it
                                  creation fails with -EINVAL) */
    uint32_t max_pipes;        /* io_uring TransmitFile: pipes in the port's splice pool
                                  (64 KiB each, opened as needed); 0 = 256, at most 65536
                                  (above it creation fails with -EINVAL) */
    uint32_t file_threads;     /* epoll: threads doing file reads/writes (epoll cannot);
                                  0 = 2, at most 256 (started at the first file
                                  operation; above 256 creation fails with -EINVAL) */
} cp_port_options;

/* Create a port with `concurrency` (0 = number of online CPUs) and default options.
 * On success stores the new port in *portp and returns 0; otherwise a negative errno
 * (-ENOMEM, -EMFILE, -ENOSYS if no backend can run, ...). */
CP_EXTERN int cp_port_create(cp_port **portp, unsigned concurrency);

/* Create a port with explicit options (NULL = defaults). Same returns as cp_port_create(),
 * and -EINVAL for a NULL portp or an option outside the limits given above.
 * If opts->backend (or CPORT_BACKEND=io_uring|epoll in the environment, when opts->backend
 * is CP_BACKEND_AUTO) forces a backend that cannot run here, returns its error (-EPERM,
 * -ENOSYS, -EOPNOTSUPP; -ENOMEM when io_uring's probe cannot be allocated) instead of
 * switching. With CP_BACKEND_AUTO, io_uring is probed
 * first (setup plus every opcode and feature cport relies on); if it is denied, the port
 * uses epoll and prints one line saying so on stderr (unless CP_PORT_QUIET). An unknown
 * CPORT_BACKEND value is -EINVAL. */
CP_EXTERN int cp_port_create_ex(cp_port **portp, const cp_port_options *opts);

/* Post a completion (key, result, op) from any thread, like PostQueuedCompletionStatus.
 * No memory is allocated: posts go to a ring sized at creation. Returns 0, -EAGAIN when
 * opts.max_posted packets (rounded as above) are already queued, -ESHUTDOWN once the
 * port is closed, or -EINVAL for a NULL port. */
CP_EXTERN int cp_port_post(cp_port *port, uintptr_t key, int64_t result, void *op);

/* Dequeue up to `max` completions into out[0..max-1], waiting up to timeout_ms
 * milliseconds (0 = poll without waiting, -1 or any negative value = wait forever).
 * Completions from one poster come out in the order posted. Returns the number dequeued
 * (1..max), or
 *   -ETIMEDOUT  nothing arrived in time (also for timeout_ms == 0),
 *   -ECANCELED  the port is closed and nothing is left to hand out to this thread,
 *   -EINVAL     max == 0 (or port or out NULL),
 *   -ENOMEM     this thread's record could not be allocated (first call only).
 * The calling thread stops counting as running when it enters and counts as running
 * again when this returns work. After cp_port_close() the completions still queued are
 * handed out (within the concurrency limit) before -ECANCELED is returned; none is lost.
 * Each call on a closed port also collects, without waiting, I/O that has completed
 * meanwhile; -ECANCELED means nothing is queued at that moment, so call again for a
 * completion still on its way (a socket's close completion, for one). */
CP_EXTERN int cp_port_dequeue(cp_port *port, cp_completion *out, unsigned max, int timeout_ms);

/* Close the port: from now on cp_port_post() fails with -ESHUTDOWN; every thread waiting
 * in cp_port_dequeue() wakes up and, once the queue is empty, gets -ECANCELED. I/O
 * completions of operations already accepted are still queued and handed out, so no
 * per-I/O context is forgotten; so is every post that returned 0, even one racing with
 * the close (it is counted as queued from the close on, or fails with -ESHUTDOWN). Idempotent; may
 * be called from any thread, including a handler. */
CP_EXTERN void cp_port_close(cp_port *port);

/* Free the port and everything it owns. Call it once, after cp_port_close() and after
 * every thread has stopped calling into the port; every socket associated with the port
 * must have been closed and its close completion dequeued. Posted completions still queued
 * are discarded (their op pointers belong to the caller and are not touched). */
CP_EXTERN void cp_port_destroy(cp_port *port);

/* Tell the port that the calling thread, currently running work from this port, is about
 * to block on something else; another waiter may be released meanwhile. No effect if the
 * calling thread is not running work from this port (or port is NULL). */
CP_EXTERN void cp_port_block_begin(cp_port *port);

/* Tell the port the blocking wait announced with cp_port_block_begin() is over: the
 * thread counts as running again (possibly above the concurrency value for a moment).
 * No effect without a matching cp_port_block_begin() (or if port is NULL). */
CP_EXTERN void cp_port_block_end(cp_port *port);

/* The port's concurrency value (after resolving 0 to the CPU count). */
CP_EXTERN unsigned cp_port_concurrency(const cp_port *port);

/* The backend the port uses: CP_BACKEND_IO_URING or CP_BACKEND_EPOLL. */
CP_EXTERN cp_backend_kind cp_port_backend(const cp_port *port);

/* The backend's name: "io_uring" or "epoll". */
CP_EXTERN const char *cp_port_backend_name(const cp_port *port);

/* A snapshot of the port's counters (each read under the port's lock). */
typedef struct cp_port_stats {
    unsigned running;      /* threads released and not yet back in cp_port_dequeue() */
    unsigned waiting;      /* threads inside cp_port_dequeue(): parked or polling the backend */
    uint64_t queued;       /* completions queued, not yet dequeued */
    uint64_t posted;       /* completions posted with cp_port_post(), ever */
    uint64_t completed;    /* I/O completions queued by the backend, ever */
    uint64_t dequeued;     /* completions handed out, ever */
    uint64_t wakeups;      /* times a parked thread was woken */
    uint64_t polls;        /* times a thread waited in or polled the backend */
    bool pool_packed;      /* pooled receives share pool buffers (see CP_PORT_WHOLE_BUFFERS) */
    bool cq_dropped;       /* io_uring: the kernel dropped completions (it had no memory to
                              keep an overflow aside: io_uring_enter said -EBADR). Some
                              accepted operations will then never complete; from then on
                              the ring's waits return at once, so each poll that would
                              wait sleeps 1 ms instead (no spin). Recreate the port. */
    uint64_t cq_overflows; /* times the kernel's completion queue was found overflowed
                              (io_uring; the overflow is drained, nothing is lost, unless
                              cq_dropped) */
    uint32_t pool_free;    /* receive-pool buffers free now (not handed out, not in the
                              kernel's ring; never-used ones not counted) */
    uint32_t pool_trimmed; /* ...of which hold no memory: given back to the OS after a
                              second unused (all but 64; at most 256 a second), also when
                              no traffic follows */
} cp_port_stats;

/* Fill *stats with the port's counters (all zero for a NULL port; nothing for NULL
 * stats). */
CP_EXTERN void cp_port_get_stats(cp_port *port, cp_port_stats *stats);

#ifdef __cplusplus
}
#endif
#endif
