/* The io_uring backend: Linux's native completion queue under the port.
 *
 * One ring per port. Any thread may prepare submissions (under sq_lock); only the port's
 * poller reaps completions. Submissions made by a thread that will come back to the port
 * (a worker running a handler, or the poller itself) are not sent at once: the next
 * poll hands them to the kernel together with its wait, in one io_uring_enter. With one
 * worker a whole batch of receives and sends therefore costs one system call. Nothing
 * waits on a sleeper: a port thread's submission made while a poller is blocked in the
 * kernel is sent at once; one from any other thread is sent at once by that thread, or,
 * while a poller is blocked, by the poller, which it wakes (a request fails when the
 * thread that submitted it exits, and such a thread may exit at any time).
 *
 * Pooled receives use a multishot receive per socket over a provided-buffer ring. The
 * ring is filled lazily from the port's LIFO buffer pool (bufpool.h): it starts with a
 * few buffers and grows only when the kernel runs dry, so an idle server touches few
 * pages. -ENOBUFS ends a multishot (the ring was empty): the socket re-arms as soon as
 * buffers exist, or waits on the pool's starving list; it is never closed for it.
 *
 * Where the kernel has them (6.12), the ring's buffers are consumed incrementally: each
 * receive takes only the bytes it needs from the buffer at the head of the ring, so small
 * messages of all sockets are packed one after the other and a few buffers serve many of
 * them. The data the CPU touches then stays within a few buffers that are reused as soon
 * as their chunks are released, instead of one whole buffer a message cycling through the
 * ring (cold caches, and RSS that grows with the ring). A buffer counts its chunks
 * (bufpool.h) and returns to the pool when the kernel has moved past it and every chunk in
 * it is released.
 *
 * liburing 2.3 (Debian 12) lacks io_uring_setup_buf_ring(): setup_buf_ring() below maps
 * and registers the ring itself.
 */
#include "handle.h"
#include "inject.h"
#include "sys.h"

#include "cport/file.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/sendfile.h>
#include <liburing.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Incrementally consumed provided buffers (kernel 6.12): not in liburing 2.3's headers.
 * The flag goes in io_uring_buf_reg's 16 bits after bgid (`pad` in 2.3, `flags` since). */
#ifndef IOU_PBUF_RING_INC
#define IOU_PBUF_RING_INC 2
#endif
#ifndef IORING_CQE_F_BUF_MORE
#define IORING_CQE_F_BUF_MORE (1U << 4)
#endif

/* Kernel 6.3's feature bit; cport requires a kernel with multishot receive (6.0), which
 * has no bit of its own, so this later bit stands in for it. */
#ifndef IORING_FEAT_REG_REG_RING
#define IORING_FEAT_REG_REG_RING (1U << 13)
#endif

enum {
    TAG_OP = 0,     /* user_data is a cp_op: cp__io_done() */
    TAG_MSHOT = 1,  /* user_data is a cp_handle with a multishot pooled receive */
    TAG_IGNORE = 2, /* cancel requests and the like */
    TAG_WAKE = 3,   /* the read on the wake-up eventfd */
    TAG_MASK = 7,
    BUF_GROUP = 0,
    RING_START_BUFFERS = 64,
    RING_START_BUFFERS_INC = 8, /* each one holds many receives */
    PIPE_BYTES = 64 * 1024,
    REFILL_BATCH = 32,
    MAX_CQES_PER_POLL = 4096,
};

/* A ring target decays after this long without running dry. */
#define RING_DECAY_NS (5 * 1000000000LL)

/* The most one request may ask to move: the kernel's MAX_RW_COUNT (INT_MAX rounded down
 * to a 4 KiB page), what read(2) and send(2) move at most. io_uring fails a send or
 * receive request for 2 GiB or more with -EINVAL, where the system calls move part; the
 * API takes lengths up to 4 GiB. A capped send or
 * write comes back short and the socket layer continues from there; a capped receive or
 * read returns what it got, as the system call would. */
#define UR_MAX_RW 0x7ffff000u

static inline unsigned rw_len(uint64_t len)
{
    return len > UR_MAX_RW ? UR_MAX_RW : (unsigned)len;
}

typedef struct ur_state {
    struct io_uring ring;
    cp__lock sq_lock; /* guards the submission queue, `blocking` and `poll_budget` */
    bool blocking;    /* the poller is in (or entering) a waiting io_uring_enter */
    /* The poller submits with an io_uring_enter made without sq_lock (every other enter is
     * made under it): until that enter is back, the kernel may consume up to poll_budget
     * SQEs for it from the queue's head, whichever they are (others' enters may have taken
     * some of those the poller flushed). poll_head is the head when the poller flushed,
     * locked_taken what enters under sq_lock consumed since: the rest of the head's
     * advance is the poller's. */
    unsigned poll_budget;
    unsigned poll_head;
    unsigned locked_taken;
    int wakefd;
    uint64_t wake_value; /* target of the pending eventfd read (written by the kernel) */
    /* The eventfd read is queued or in the kernel (sq_lock). When the queue had no room to
     * re-arm it, a wake-up cannot reach a waiting poller: polls then wait 1 ms at most and
     * try to arm it again. */
    bool wake_armed;
    bool wake_by_msg; /* wakes post a message into the ring (Linux 6.13+); the eventfd
                         read is then only the fallback (see wake_poller) */
    /* One msghdr per SQE slot, for a vector send prepared in that slot: the kernel reads it
     * when it consumes the SQE, which may be at a later io_uring_enter than the one its
     * start made; the slot (and so its msghdr) is reused only after that. */
    struct msghdr *msgs;

    struct io_uring_buf_ring *br;
    size_t br_len;
    uint32_t br_entries;
    bool br_inc;          /* consumed incrementally (IOU_PBUF_RING_INC) */
    uint32_t ring_start;  /* the target a ring starts with and decays back to */
    cp__lock br_lock;     /* guards the ring's tail, ring_count and ring_target */
    uint32_t ring_count;  /* buffers in the kernel's ring (added minus consumed) */
    uint32_t ring_target; /* how many we keep there; doubles when it runs dry */
    int64_t last_dry_ns;  /* when it last ran dry (coarse clock) */

    /* TransmitFile's pipes (splice file -> pipe -> socket), created on first use. */
    cp__lock pipe_lock;
    int (*pipes)[2];
    uint32_t npipes; /* created */
    uint32_t max_pipes;
    uint32_t *free_pipes; /* stack of free indices */
    uint32_t nfree_pipes;
} ur_state;

static ur_state *state_of(cp_port *p)
{
    return p->be_data;
}

/* ---- submission ------------------------------------------------------------------------ */

/* Publish prepared SQEs to the kernel's view of the queue; returns how many the kernel has
 * not consumed yet. The ring protocol: store the new tail with release semantics. */
static unsigned flush_sq_locked(struct io_uring *ring)
{
    struct io_uring_sq *sq = &ring->sq;
    unsigned tail = sq->sqe_tail;
    if (sq->sqe_head != tail) {
        sq->sqe_head = tail;
        io_uring_smp_store_release(sq->ktail, tail);
    }
    return tail - io_uring_smp_load_acquire(sq->khead);
}

#ifndef IORING_REGISTER_SEND_MSG_RING
#define IORING_REGISTER_SEND_MSG_RING 31 /* Linux 6.13; liburing 2.3's headers predate it */
#endif

/* Post a message CQE (user_data TAG_IGNORE) straight into this ring, from any thread, with
 * no ring of the caller's and no SQE of the ring's: a blocked poller wakes up. Unlike the
 * eventfd read, it does not complete through the task work of the thread that submitted
 * the read, which may be stuck in an uninterruptible wait (vfork, disk I/O) for long.
 * Returns 0 or a negative errno (-EINVAL before Linux 6.13). */
static int post_wake_msg(ur_state *s)
{
    if (CP__INJECT_FAIL("wake_msg"))
        return -EINVAL; /* tests of the eventfd read, the older kernels' way */
    struct io_uring_sqe sqe;
    memset(&sqe, 0, sizeof(sqe));
    io_uring_prep_msg_ring(&sqe, s->ring.ring_fd, 0, TAG_IGNORE, 0);
    long r = syscall(__NR_io_uring_register, -1, IORING_REGISTER_SEND_MSG_RING, &sqe, 1);
    return r < 0 ? -errno : 0;
}

/* Wake a poller blocked in io_uring_enter(). Async-signal-safe. */
static void wake_poller(ur_state *s)
{
    if (s->wake_by_msg && post_wake_msg(s) == 0)
        return;
    uint64_t one = 1; /* (also if the message could not be posted: out of memory) */
    ssize_t w = write(s->wakefd, &one, sizeof(one));
    (void)w;
}

static void submit_now_locked(ur_state *s)
{
    unsigned n = flush_sq_locked(&s->ring);
    if (n == 0)
        return;
    int r = CP__INJECT_FAIL("submit_not_consumed") ? -EAGAIN
                                                   : io_uring_enter(s->ring.ring_fd, n, 0, 0, NULL);
    if (r > 0)
        s->locked_taken += (unsigned)r;
    if (r < (int)n && s->blocking) {
        /* The kernel took fewer (-EAGAIN, -ENOMEM): the rest must not wait for a poller
         * asleep in the kernel. Woken, it submits them with its next enter. */
        wake_poller(s);
    }
}

static struct io_uring_sqe *get_sqe_locked(ur_state *s)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&s->ring);
    if (!sqe) {
        submit_now_locked(s); /* the queue is full of deferred work: send it */
        sqe = io_uring_get_sqe(&s->ring);
    }
    return sqe;
}

static void ur_wake(cp_port *p);

/* Decide whether the SQEs just prepared go to the kernel now (see the file comment): a
 * thread of the port defers them to its next poll unless a poller is blocked in the
 * kernel, which would not see them; any other thread never leaves them waiting. */
static void submitted_locked(cp_port *p, ur_state *s)
{
    bool defers = cp__port_caller_defers(p);
    if (!s->blocking) {
        /* A thread of the port comes back to poll. Another thread does not, and nothing
         * says one of the port's will poll soon (all may be busy in handlers): the
         * request goes now, and if this thread exits before it ends, the socket layer
         * restarts it (-ECANCELED, see cp__io_done). */
        if (!defers)
            submit_now_locked(s);
        return;
    }
    if (defers)
        submit_now_locked(s);
    else
        /* Not one of the port's threads: it may exit while the request is pending, and the
         * kernel fails a request whose submitting task is gone (-ECANCELED). The poller
         * submits it instead. */
        ur_wake(p);
}

static void ur_flush(cp_port *p)
{
    ur_state *s = state_of(p);
    cp__lock_acquire(&s->sq_lock);
    submit_now_locked(s);
    cp__lock_release(&s->sq_lock);
}

static void arm_wake_locked(ur_state *s)
{
    struct io_uring_sqe *sqe = CP__INJECT_FAIL("arm_wake_no_sqe") ? NULL : get_sqe_locked(s);
    if (!sqe)
        return;
    io_uring_prep_read(sqe, s->wakefd, &s->wake_value, sizeof(s->wake_value), 0);
    io_uring_sqe_set_data64(sqe, TAG_WAKE);
    s->wake_armed = true;
}

/* ---- provided buffers ---------------------------------------------------------------- */

static int setup_buf_ring(ur_state *s, uint32_t entries, bool whole)
{
    size_t len = entries * sizeof(struct io_uring_buf);
    long page = sysconf(_SC_PAGESIZE);
    len = (len + (size_t)page - 1) & ~((size_t)page - 1);
    void *br = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (br == MAP_FAILED)
        return -errno;
    struct io_uring_buf_reg reg = {.ring_addr = (uint64_t)(uintptr_t)br,
                                   .ring_entries = entries,
                                   .bgid = BUF_GROUP,
                                   .pad = whole ? 0 : IOU_PBUF_RING_INC};
    int r = io_uring_register_buf_ring(&s->ring, &reg, 0);
    s->br_inc = r == 0 && !whole;
    if (r == -EINVAL && !whole) { /* a kernel without incremental consumption */
        reg.pad = 0;
        r = io_uring_register_buf_ring(&s->ring, &reg, 0);
    }
    if (r < 0) {
        munmap(br, len);
        return r;
    }
    s->br = br;
    s->br_len = len;
    s->br_entries = entries;
    io_uring_buf_ring_init(s->br);
    return 0;
}

/* Move free pool buffers into the kernel's ring until it holds ring_target of them.
 * Returns how many the ring holds. */
static uint32_t refill_ring(cp_port *p)
{
    ur_state *s = state_of(p);
    cp__bufpool *bp = &p->pool;
    cp__lock_acquire(&s->br_lock);
    /* Once the ring has not run dry for a while the target decays back, so the ring stops
     * holding (and touching) a past burst's worth of buffers; the surplus returns to the
     * pool, which trims it. Measured in time, not in refills: under steady load a target
     * that shrank after so many refills would run dry again at once, and the ring would
     * swing between the two sizes, faulting trimmed buffers back in each time. */
    if (s->ring_target > s->ring_start) {
        int64_t now = cp__now_coarse_ns();
        if (now - s->last_dry_ns >= RING_DECAY_NS) {
            s->ring_target /= 2;
            s->last_dry_ns = now;
        }
    }
    while (s->ring_count < s->ring_target) {
        uint16_t ids[REFILL_BATCH];
        uint32_t want = s->ring_target - s->ring_count;
        uint32_t n = cp__bufpool_get_many(bp, ids, want < REFILL_BATCH ? want : REFILL_BATCH);
        if (n == 0)
            break;
        /* Each comes with the kernel's hold, until it has moved past it. */
        for (uint32_t i = 0; i < n; i++) {
            bp->filled[ids[i]] = 0;
            cp__hb_release(&bp->filled[ids[i]]); /* the poller reads it after the kernel */
            io_uring_buf_ring_add(s->br, cp__bufpool_addr(bp, ids[i]), bp->size, ids[i],
                                  io_uring_buf_ring_mask(s->br_entries), (int)i);
        }
        io_uring_buf_ring_advance(s->br, (int)n);
        s->ring_count += n;
    }
    uint32_t in_ring = s->ring_count;
    cp__lock_release(&s->br_lock);
    return in_ring;
}

static uint32_t ur_pool_refill(cp_port *p)
{
    return refill_ring(p);
}

/* The most buffers the ring may hold: half the pool. A multishot receive can take every
 * buffer in the ring in one burst before its socket is stopped, so this keeps one fast
 * peer from ever holding the whole pool. */
static uint32_t ring_limit(const cp_port *p)
{
    return p->pool.count > 1 ? p->pool.count / 2 : 1;
}

/* ---- setup ------------------------------------------------------------------------------ */

static const uint8_t required_ops[] = {
    IORING_OP_ACCEPT,   IORING_OP_CONNECT,      IORING_OP_RECV,   IORING_OP_SEND,
    IORING_OP_SENDMSG,  IORING_OP_READV,        IORING_OP_READ,   IORING_OP_WRITE,
    IORING_OP_SHUTDOWN, IORING_OP_ASYNC_CANCEL, IORING_OP_SPLICE, IORING_OP_POLL_ADD,
};

static int ur_init(cp_port *p, const cp_port_options *opts)
{
    ur_state *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->wakefd = -1;
    cp__lock_init(&s->sq_lock);
    cp__lock_init(&s->pipe_lock);
    s->max_pipes = opts->max_pipes ? opts->max_pipes : 256;
    s->pipes = calloc(s->max_pipes, sizeof(*s->pipes));
    s->free_pipes = calloc(s->max_pipes, sizeof(*s->free_pipes));
    if (!s->pipes || !s->free_pipes) {
        free(s->pipes);
        free(s->free_pipes);
        free(s);
        return -ENOMEM;
    }
    cp__lock_init(&s->br_lock);
    struct io_uring_params params = {0};
    /* Sized apart from the submission queue: multishot receives post completions without
     * submissions. Overflow is survived either way (FEAT_NODROP; ur_poll drains it). */
    /* COOP_TASKRUN: completions of requests a thread submitted are posted when that
     * thread next returns to user space or sleeps, instead of interrupting it with an IPI
     * whenever data arrives; measured here to save ~25% of the server's system time per
     * echoed message. A thread busy in a handler posts them at its next syscall or tick. */
    /* TASKRUN_FLAG: the kernel says (IORING_SQ_TASKRUN) when completions wait as task work
     * to be posted; a poll that does not block then enters the kernel to post them (the
     * calling thread's; any system call of a thread posts its own). */
    params.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN |
                   IORING_SETUP_TASKRUN_FLAG;
    params.cq_entries = opts->cq_entries;
    int r = io_uring_queue_init_params(opts->ring_entries, &s->ring, &params);
    if (r < 0) {
        free(s->pipes);
        free(s->free_pipes);
        free(s);
        return r;
    }
    const unsigned need = IORING_FEAT_NODROP | IORING_FEAT_SUBMIT_STABLE | IORING_FEAT_FAST_POLL |
                          IORING_FEAT_EXT_ARG | IORING_FEAT_CQE_SKIP | IORING_FEAT_REG_REG_RING;
    r = (params.features & need) == need ? 0 : -EOPNOTSUPP;
    if (r == 0) {
        /* NULL only for want of memory: every kernel with the features above has
         * IORING_REGISTER_PROBE (Linux 5.6). */
        struct io_uring_probe *probe =
            CP__INJECT_FAIL("uring_probe") ? NULL : io_uring_get_probe_ring(&s->ring);
        if (!probe)
            r = -ENOMEM;
        for (size_t i = 0; r == 0 && i < sizeof(required_ops); i++)
            if (!io_uring_opcode_supported(probe, required_ops[i]))
                r = -EOPNOTSUPP;
        if (probe)
            io_uring_free_probe(probe);
    }
    if (r == 0) {
        s->msgs = calloc(s->ring.sq.ring_entries, sizeof(*s->msgs));
        if (!s->msgs)
            r = -ENOMEM;
    }
    if (r == 0)
        r = setup_buf_ring(s, p->pool.count, (opts->flags & CP_PORT_WHOLE_BUFFERS) != 0);
    if (r == 0) {
        s->wakefd = eventfd(0, EFD_CLOEXEC);
        if (s->wakefd < 0)
            r = -errno;
    }
    if (r < 0) {
        if (s->br)
            munmap(s->br, s->br_len);
        if (s->wakefd >= 0)
            close(s->wakefd);
        io_uring_queue_exit(&s->ring);
        free(s->msgs);
        free(s->pipes);
        free(s->free_pipes);
        free(s);
        return r;
    }
    p->pool.packed = s->br_inc;
    s->ring_start = s->br_inc ? RING_START_BUFFERS_INC : RING_START_BUFFERS;
    if (s->ring_start > ring_limit(p))
        s->ring_start = ring_limit(p);
    s->ring_target = s->ring_start;
    p->be_data = s;
    refill_ring(p);
    /* Wake-ups by message where the kernel has them (this first one is ignored: its CQE
     * carries TAG_IGNORE); else by the eventfd read, re-armed after each completion. The
     * read is armed in both cases: with messages it is the fallback for one that cannot be
     * posted (no memory for it). */
    s->wake_by_msg = post_wake_msg(s) == 0;
    cp__lock_acquire(&s->sq_lock);
    arm_wake_locked(s);
    submit_now_locked(s);
    cp__lock_release(&s->sq_lock);
    return 0;
}

static void ur_fini(cp_port *p)
{
    ur_state *s = state_of(p);
    if (!s)
        return;
    io_uring_queue_exit(&s->ring); /* cancels what is left, including the wake read */
    if (s->br)
        munmap(s->br, s->br_len);
    close(s->wakefd);
    free(s->msgs);
    for (uint32_t i = 0; i < s->npipes; i++) {
        if (s->pipes[i][0] >= 0)
            close(s->pipes[i][0]);
        if (s->pipes[i][1] >= 0)
            close(s->pipes[i][1]);
    }
    free(s->pipes);
    free(s->free_pipes);
    free(s);
    p->be_data = NULL;
}

static void ur_wake(cp_port *p)
{
    wake_poller(state_of(p));
}

/* ---- completion -------------------------------------------------------------------------- */

static void dispatch(cp_port *p, ur_state *s, struct io_uring_cqe *cqe, cp__oplist *done)
{
    uint64_t ud = cqe->user_data;
    void *ptr = (void *)(uintptr_t)(ud & ~(uint64_t)TAG_MASK);
    if ((ud & TAG_MASK) == TAG_OP || (ud & TAG_MASK) == TAG_MSHOT)
        cp__hb_acquire(ptr);
    switch (ud & TAG_MASK) {
    case TAG_OP:
        cp__io_done(ptr, cqe->res, done);
        break;
    case TAG_MSHOT: {
        uint32_t chunk = CP__NO_CHUNK;
        if (cqe->flags & IORING_CQE_F_BUFFER) {
            cp__bufpool *bp = &p->pool;
            uint16_t bufid = (uint16_t)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
            /* The kernel keeps filling the buffer (incremental consumption) or it has moved
             * past it; then its reference passes to this chunk, or is dropped. */
            bool kept = s->br_inc && (cqe->flags & IORING_CQE_F_BUF_MORE);
            cp__hb_acquire(&bp->filled[bufid]);
            if (cqe->res > 0) {
                chunk = (uint32_t)bufid * bp->size + bp->filled[bufid];
                if (s->br_inc)
                    bp->filled[bufid] += (uint32_t)cqe->res;
                if (kept)
                    cp__bufpool_ref(bp, bufid);
                else
                    cp__bufpool_pass(bp, bufid);
            } else if (!kept && cp__bufpool_unhold(bp, bufid)) {
                done->flags |= CP__OPLIST_POOL_FREED;
            }
            if (!kept) {
                cp__lock_acquire(&s->br_lock);
                s->ring_count--;
                cp__lock_release(&s->br_lock);
            }
        }
        bool more = (cqe->flags & IORING_CQE_F_MORE) != 0;
        if (!more && cqe->res == -ENOBUFS) {
            /* The ring ran dry: keep more buffers in it from now on. */
            cp__lock_acquire(&s->br_lock);
            s->ring_target =
                s->ring_target * 2 < ring_limit(p) ? s->ring_target * 2 : ring_limit(p);
            s->last_dry_ns = cp__now_coarse_ns();
            cp__lock_release(&s->br_lock);
            refill_ring(p);
        }
        cp__io_chunk(ptr, cqe->res, chunk, more, done);
        break;
    }
    case TAG_WAKE:
        cp__lock_acquire(&s->sq_lock);
        s->wake_armed = false;
        arm_wake_locked(s);
        cp__lock_release(&s->sq_lock);
        break;
    default:
        break;
    }
}

static int ur_poll(cp_port *p, int64_t deadline, cp__oplist *done)
{
    ur_state *s = state_of(p);
    struct io_uring *ring = &s->ring;
    bool wait = deadline != 0 && io_uring_cq_ready(ring) == 0;

    cp__lock_acquire(&s->sq_lock);
    if (!s->wake_armed)
        arm_wake_locked(s);
    if (wait && !s->wake_armed && !s->wake_by_msg) {
        int64_t cap = cp__now_ns() + 1000000;
        if (deadline < 0 || deadline > cap)
            deadline = cap;
    }
    unsigned to_submit = flush_sq_locked(ring);
    s->blocking = wait;
    s->poll_budget = to_submit;
    s->poll_head = ring->sq.sqe_tail - to_submit;
    s->locked_taken = 0;
    cp__lock_release(&s->sq_lock);
    /* Its batch published, its enter not made yet: a cancel of one of those SQEs must
     * wait for the enter (withdraw_locked's -EAGAIN) and cancel it in the kernel. */
    if (to_submit)
        CP__INJECT_DELAY("ur_poll_enter");

    int r = 0;
    bool overflow = io_uring_cq_has_overflow(ring);
    /* COOP_TASKRUN: completions of requests this thread submitted may be waiting as task
     * work, posted only when it enters the kernel. A poll that does not wait must enter
     * for them, or it reports nothing for I/O that has finished (until the next tick). */
    bool taskrun = (IO_URING_READ_ONCE(*ring->sq.kflags) & IORING_SQ_TASKRUN) != 0;
    if (wait) {
        struct __kernel_timespec ts;
        struct io_uring_getevents_arg arg = {.sigmask_sz = _NSIG / 8};
        if (deadline > 0) {
            int64_t left = deadline - cp__now_ns();
            if (left < 0)
                left = 0;
            ts.tv_sec = left / 1000000000;
            ts.tv_nsec = left % 1000000000;
            arg.ts = (uint64_t)(uintptr_t)&ts;
        }
        if (CP__INJECT_FAIL("cq_dropped")) /* what such a kernel does: submit, no wait */
            r = io_uring_enter(ring->ring_fd, to_submit, 0, 0, NULL) > 0 ? 0 : -EBADR;
        else
            r = io_uring_enter2(ring->ring_fd, to_submit, 1,
                                IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, (sigset_t *)&arg,
                                sizeof(arg));
        if (r == -EBADR) {
            /* The kernel dropped a completion (no memory for its overflow entry) and says
             * so at every wait from now on, without waiting: report it, and sleep instead
             * of spinning (completions are still read from the ring below, and the
             * thread's task work runs on the way back from the sleep). */
            __atomic_store_n(&p->cq_dropped, true, __ATOMIC_RELAXED);
            int64_t left = deadline > 0 ? deadline - cp__now_ns() : 1000000;
            struct timespec nap = {0, left < 1000000 ? (left > 0 ? left : 0) : 1000000};
            nanosleep(&nap, NULL);
        }
    } else if (to_submit || overflow || taskrun) {
        r = io_uring_enter(ring->ring_fd, to_submit, 0,
                           overflow || taskrun ? IORING_ENTER_GETEVENTS : 0, NULL);
    }
    if (wait || to_submit) {
        cp__lock_acquire(&s->sq_lock);
        s->blocking = false;
        s->poll_budget = 0;
        cp__lock_release(&s->sq_lock);
    }
    cp__port_poller_awake(p);

    unsigned total = 0;
    if (overflow)
        __atomic_add_fetch(&p->cq_overflows, 1, __ATOMIC_RELAXED);
    for (;;) {
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;
        io_uring_for_each_cqe(ring, head, cqe)
        {
            dispatch(p, s, cqe, done);
            n++;
        }
        io_uring_cq_advance(ring, n);
        total += n;
        if (total >= MAX_CQES_PER_POLL)
            break;
        if (n == 0) {
            /* Completions the kernel kept aside while the queue was full come back only
             * through io_uring_enter(GETEVENTS). */
            if (!io_uring_cq_has_overflow(ring))
                break;
            __atomic_add_fetch(&p->cq_overflows, 1, __ATOMIC_RELAXED);
            io_uring_enter(ring->ring_fd, 0, 0, IORING_ENTER_GETEVENTS, NULL);
        }
    }
    cp__lock_acquire(&s->br_lock);
    bool low = s->ring_count < s->ring_target / 2;
    cp__lock_release(&s->br_lock);
    if (low)
        refill_ring(p);
    if (r == -ETIME || r == -EINTR || r == -EBUSY || r == -EAGAIN)
        r = 0;
    return r < 0 ? r : 0;
}

/* ---- handles and operations ----------------------------------------------------------- */

static int ur_attach(cp_handle *h)
{
    h->cp__flags |= CP__H_ATTACHED;
    return 0;
}

/* Take back a request whose SQE the kernel has not consumed yet (user_data ud): it becomes
 * a NOP nobody waits for. Returns 1 if it was taken back, 0 if no SQE in the queue carries
 * ud (the kernel has the request, or has finished it: it commits the queue's head only
 * after it issued what it consumed), or -EAGAIN if the poller's enter may be consuming
 * it right now (it cannot be rewritten under the kernel's reads). */
static int withdraw_locked(ur_state *s, uint64_t ud)
{
    struct io_uring_sq *sq = &s->ring.sq;
    unsigned head = io_uring_smp_load_acquire(sq->khead);
    /* What the poller's enter may still take: its budget less what it took (the kernel
     * publishes the head once an enter has issued all it consumed; so while the poller's
     * enter is inside, its whole budget counts). */
    unsigned left = s->poll_budget ? s->poll_budget - (head - s->poll_head - s->locked_taken) : 0;
    for (unsigned i = head; i != sq->sqe_tail; i++) {
        struct io_uring_sqe *sqe = &sq->sqes[i & sq->ring_mask];
        if (sqe->user_data != ud)
            continue;
        if (i - head < left)
            return -EAGAIN;
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, TAG_IGNORE);
        sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
        return 1;
    }
    return 0;
}

/* Cancel the request whose user_data is ud. Returns 0 when the kernel will end it (a
 * completion follows), or 1 when its SQE was taken back before the kernel saw it (no
 * completion will come: the caller ends it). `at_once` submits the cancel now instead of
 * with the next poll. The caller holds the handle's lock, not sq_lock. */
static int cancel_request(cp_port *p, uint64_t ud, bool at_once)
{
    ur_state *s = state_of(p);
    for (;;) {
        cp__lock_acquire(&s->sq_lock);
        struct io_uring_sqe *sqe = CP__INJECT_FAIL("ur_cancel_no_sqe") ? NULL : get_sqe_locked(s);
        if (sqe) {
            io_uring_prep_cancel64(sqe, ud, 0);
            io_uring_sqe_set_data64(sqe, TAG_IGNORE);
            sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
            if (at_once)
                submit_now_locked(s);
            else
                submitted_locked(p, s);
            cp__lock_release(&s->sq_lock);
            return 0;
        }
        /* The queue is full and the kernel takes nothing now (io_uring_enter failed or
         * consumed fewer): a cancel request could only wait behind the rest, while the
         * request may wait for data forever. */
        int r = withdraw_locked(s, ud);
        cp__lock_release(&s->sq_lock);
        if (r == 1)
            return 1;
        if (r == 0) {
            /* The kernel has it (or its completion is on the way): cancel it there with a
             * system call that needs no SQE. A zero timeout: do not wait for a request
             * that is running to stop; it reports its end through the queue in any case. */
            struct io_uring_sync_cancel_reg reg = {.addr = ud, .timeout = {0, 0}};
            io_uring_register_sync_cancel(&s->ring, &reg);
            return 0;
        }
        /* In the batch of the poller's enter: the kernel takes it, or the enter fails,
         * within that one system call; then look again. */
        sched_yield();
    }
}

static void ur_pool_stop(cp_handle *h)
{
    /* At once, not batched: every moment the receive stays armed it may take another
     * buffer from the shared pool. */
    if (cancel_request(h->cp__port, (uint64_t)(uintptr_t)h | TAG_MSHOT, true) == 1) {
        /* Taken back before it started: it ends here, as its last completion would end it
         * (cp__io_chunk without `more`; h is locked). */
        h->cp__flags &= (uint16_t) ~(CP__H_MSHOT | CP__H_MSHOT_STOP);
        cp__h_unpin(h);
    }
}

static void ur_detach(cp_handle *h)
{
    h->cp__flags &= (uint16_t)~CP__H_ATTACHED;
    if ((h->cp__flags & CP__H_MSHOT) && !(h->cp__flags & CP__H_MSHOT_STOP)) {
        h->cp__flags |= CP__H_MSHOT_STOP;
        ur_pool_stop(h);
    }
}

/* Arm the socket's multishot pooled receive (if it is not armed already). */
static int arm_multishot(cp_handle *h)
{
    if (h->cp__flags & CP__H_MSHOT)
        return CP__PENDING; /* armed, or stopping: its end re-arms if still wanted */
    cp_port *p = h->cp__port;
    ur_state *s = state_of(p);
    cp__lock_acquire(&s->br_lock);
    uint32_t in_ring = s->ring_count;
    cp__lock_release(&s->br_lock);
    while (in_ring == 0) {
        in_ring = refill_ring(p);
        if (in_ring == 0) {
            /* A buffer released now sees nobody waiting, and the poller may move it into
             * the ring. */
            CP__INJECT_DELAY("arm_no_buffer");
            /* Arming now would end at once with ENOBUFS: wait for a buffer instead. */
            int r = cp__io_starve_locked(h);
            if (r == -EAGAIN)
                continue;
            if (r != CP__PENDING)
                return r;
            /* A buffer released between refill_ring() and the registration saw nobody
             * waiting, and a refill (the poller's) may have moved it into the ring since:
             * no later release would wake us for it. Look once more, now that every
             * release sees us waiting. */
            cp__lock_acquire(&s->br_lock);
            in_ring = s->ring_count;
            cp__lock_release(&s->br_lock);
            if (in_ring == 0 || !cp__bufpool_unstarve(&p->pool, h))
                return CP__PENDING; /* (not listed: a resume is on its way) */
            h->cp__flags &= (uint16_t)~CP__H_STARVING;
            cp__h_unpin(h);
        }
    }
    cp__lock_acquire(&s->sq_lock);
    struct io_uring_sqe *sqe = get_sqe_locked(s);
    if (!sqe) {
        cp__lock_release(&s->sq_lock);
        return -EBUSY;
    }
    /* len 0: each completion carries at most one pool buffer, which caps what one
     * receive can take. */
    io_uring_prep_recv_multishot(sqe, h->fd, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = BUF_GROUP;
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)h | TAG_MSHOT);
    h->cp__flags |= CP__H_MSHOT;
    cp__h_pin(h);
    cp__hb_release(h);
    submitted_locked(p, s);
    cp__lock_release(&s->sq_lock);
    return CP__PENDING;
}

/* ---- TransmitFile: a bounded pool of pipes ---- */

/* Open slot i's pipe. Returns false when no descriptor is left (the slot stays empty). */
static bool pipe_open_locked(ur_state *s, uint32_t i)
{
    int fds[2];
    if (CP__INJECT_FAIL("pipe_open") || pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0)
        return false;
    fcntl(fds[1], F_SETPIPE_SZ, PIPE_BYTES);
    s->pipes[i][0] = fds[0];
    s->pipes[i][1] = fds[1];
    return true;
}

/* A free pipe's index, creating one if the pool may still grow; -1 if none. A free slot
 * may be empty (its pipe was dropped, see pipe_put; empty ones are at the bottom of the
 * stack): it gets a new pipe here. */
static int pipe_get(ur_state *s)
{
    int i = -1;
    cp__lock_acquire(&s->pipe_lock);
    if (s->nfree_pipes) {
        uint32_t k = s->free_pipes[s->nfree_pipes - 1];
        if (s->pipes[k][0] >= 0 || pipe_open_locked(s, k)) {
            s->nfree_pipes--;
            i = (int)k;
        }
    } else if (s->npipes < s->max_pipes && pipe_open_locked(s, s->npipes)) {
        i = (int)s->npipes++;
    }
    cp__lock_release(&s->pipe_lock);
    return i;
}

/* Give a pipe back. One that may still hold bytes (a transmit that failed or was
 * cancelled) is closed: its leftovers must never reach another socket. Its slot stays in
 * the pool, empty, and the next pipe_get opens a fresh pipe for it (so running out of
 * descriptors meanwhile cannot shrink the pool for good). */
static void pipe_put(ur_state *s, int i, bool dirty)
{
    cp__lock_acquire(&s->pipe_lock);
    uint32_t at = s->nfree_pipes++;
    if (dirty) {
        close(s->pipes[i][0]);
        close(s->pipes[i][1]);
        s->pipes[i][0] = s->pipes[i][1] = -1;
        /* Empty slots go to the bottom: pipe_get takes a ready pipe while there is one. */
        s->free_pipes[at] = s->free_pipes[0];
        at = 0;
    }
    s->free_pipes[at] = (uint32_t)i;
    cp__lock_release(&s->pipe_lock);
}

/* Move file bytes to the socket through the op's pipe: first what the pipe still holds,
 * then the next chunk of the file. Without a pipe (the pool is exhausted) sendfile. */
static int ur_file_leg(cp_handle *h, cp_transmit_op *t, int fd, int64_t offset, uint64_t len)
{
    ur_state *s = state_of(h->cp__port);
    if (t->cp__pipe < 0 && t->cp__inpipe == 0)
        t->cp__pipe = pipe_get(s);
    if (t->cp__pipe < 0) {
        off_t off = (off_t)offset;
        cp__nopipe g;
        cp__nopipe_begin(&g);
        ssize_t n = sendfile(h->fd, fd, &off, len > (1u << 30) ? (1u << 30) : (size_t)len);
        cp__nopipe_end(&g, n < 0 ? errno : 0);
        if (n < 0)
            return errno == EAGAIN ? CP__AGAIN : errno == EINTR ? 0 : -errno;
        if (n == 0)
            return -EIO;
        t->cp__off += (uint64_t)n;
        t->sent += (uint64_t)n;
        return 0;
    }
    int pr = s->pipes[t->cp__pipe][0], pw = s->pipes[t->cp__pipe][1];
    /* More follows if file bytes are left after the pipe's, or a later element holds
     * bytes (transmit.c caches that in cp__pad: 2 = yes). Never cork the last bytes. */
    bool more = len > 0 || t->cp__pad == 2;
    while (t->cp__inpipe > 0) {
        cp__nopipe g;
        cp__nopipe_begin(&g);
        ssize_t n = splice(pr, NULL, h->fd, NULL, t->cp__inpipe,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK | (more ? SPLICE_F_MORE : 0));
        cp__nopipe_end(&g, n < 0 ? errno : 0);
        if (n < 0)
            return errno == EAGAIN ? CP__AGAIN : errno == EINTR ? 0 : -errno;
        t->cp__inpipe -= (uint32_t)n;
        t->sent += (uint64_t)n;
    }
    if (len == 0) {
        pipe_put(s, t->cp__pipe, false);
        t->cp__pipe = -1;
        return 0;
    }
    loff_t off = offset;
    ssize_t n = splice(fd, &off, pw, NULL, len > PIPE_BYTES ? PIPE_BYTES : (size_t)len,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n < 0)
        return errno == EINTR ? 0 : -errno;
    if (n == 0)
        return -EIO; /* the file ended before the range did */
    t->cp__off += (uint64_t)n;
    t->cp__inpipe = (uint32_t)n;
    return 0;
}

static void ur_transmit_done(cp_transmit_op *t)
{
    if (t->cp__pipe >= 0) {
        pipe_put(state_of(t->op.cp__h->cp__port), t->cp__pipe, t->cp__inpipe != 0);
        t->cp__pipe = -1;
        t->cp__inpipe = 0;
    }
}

/* Wait until the socket is writable: a one-shot poll whose completion means "retry".
 * Without an SQE the op fails (-EBUSY); a transmit that sent part of itself before is cut
 * then (finish_locked in socket.c: cp__transmit_failed). */
static int wait_writable(cp_handle *h, cp_op *op)
{
    cp_port *p = h->cp__port;
    ur_state *s = state_of(p);
    cp__lock_acquire(&s->sq_lock);
    struct io_uring_sqe *sqe = CP__INJECT_FAIL("wait_writable_no_sqe") ? NULL : get_sqe_locked(s);
    if (!sqe) {
        cp__lock_release(&s->sq_lock);
        return -EBUSY;
    }
    io_uring_prep_poll_add(sqe, h->fd, POLLOUT);
    io_uring_sqe_set_data(sqe, op);
    op->cp__flags |= CP__OPF_POLLWAIT | CP__OPF_INKERNEL;
    cp__h_pin(h);
    cp__hb_release(op);
    submitted_locked(p, s);
    cp__lock_release(&s->sq_lock);
    return CP__PENDING;
}

/* A connect started again (its request failed with -ECANCELED because the thread that
 * submitted it exited; the kernel may have begun, finished or failed the connection
 * meanwhile): connect(2) tells which - in progress (wait for writability and ask again),
 * connected, or the error - and starts it if it never began. */
static int connect_again(cp_handle *h, cp_op *op)
{
    for (;;) {
        if (connect(h->fd, op->u.buf, op->cp__len) == 0 || errno == EISCONN)
            return 0;
        if (errno == EINPROGRESS || errno == EALREADY)
            return wait_writable(h, op);
        if (errno != EINTR)
            return -errno;
    }
}

/* A plain non-blocking send of what op has left (CP_SEND_SKIP_ON_SUCCESS): bytes sent,
 * or a negative errno (-EAGAIN: the socket is full, use a kernel request). */
static int send_now(cp_handle *h, cp_op *op)
{
    for (;;) {
        long n;
        if (op->cp__flags & CP__OPF_VEC) {
            n = cp__op_sendmsg(op, h->fd, MSG_DONTWAIT | MSG_NOSIGNAL);
        } else {
            n = cp__sys_send(h->fd, (char *)op->u.buf + op->cp__done, op->cp__len - op->cp__done,
                             MSG_DONTWAIT | MSG_NOSIGNAL);
        }
        if (n != -EINTR)
            return (int)n;
    }
}

/* Whether op continues a send (or connect_ex's data) after part of it went out. The
 * failure point send_continue_no_sqe (a CPORT_INJECT build) denies such a step its SQE:
 * the send then fails mid-stream (socket.c: finish_locked cuts the stream). */
static inline bool send_continues(const cp_op *op)
{
    return op->cp__done > 0 && (op->opcode == CP_OP_SEND || (op->opcode == CP_OP_CONNECT &&
                                                             (op->cp__flags & CP__OPF_CONNECTED)));
}

/* Fail points that deny a step its SQE (a CPORT_INJECT build): send_continue_no_sqe, and
 * stream_send_no_sqe for a server send of 64 KiB or more, before its first byte (a test
 * sends a large one, then a small one that must not follow it: finish_locked resets). */
static inline bool injected_no_sqe(const cp_op *op)
{
    if (send_continues(op) && CP__INJECT_FAIL("send_continue_no_sqe"))
        return true;
    return op->opcode == CP_OP_SEND && (op->cp__flags & CP__OPF_STREAM) && op->cp__done == 0 &&
           op->cp__len >= 65536 && CP__INJECT_FAIL("stream_send_no_sqe");
}

/* A vector send, submitted at once as it always was (its callers may wait for the bytes
 * before anything polls). io_uring_enter may still consume fewer SQEs than it is given
 * (-EAGAIN, -ENOMEM); then the SQE reaches the kernel at a later enter, after this call
 * returned, so nothing it points to may live on this stack: the msghdr is its SQE slot's
 * (msgs), the iovecs the caller's array (valid until the completion). After a short send
 * the rest of a partly sent element goes first as a plain send, so that the next step
 * starts on an element of that array and needs no trimmed copy. */
static int start_sendmsg(cp_handle *h, cp_op *op)
{
    cp_port *p = h->cp__port;
    ur_state *s = state_of(p);
    const struct iovec *iov = op->u.iov;
    size_t cnt = op->cp__aux, off = op->cp__done;
    while (cnt > 0 && off >= iov->iov_len) {
        off -= iov->iov_len;
        iov++;
        cnt--;
    }
    cp__lock_acquire(&s->sq_lock);
    struct io_uring_sqe *sqe = injected_no_sqe(op) ? NULL : get_sqe_locked(s);
    if (!sqe) {
        cp__lock_release(&s->sq_lock);
        return -EBUSY;
    }
    if (off > 0) {
        io_uring_prep_send(sqe, h->fd, (const char *)iov->iov_base + off,
                           rw_len(iov->iov_len - off), MSG_NOSIGNAL | MSG_WAITALL);
    } else {
        struct msghdr *msg = &s->msgs[sqe - s->ring.sq.sqes];
        *msg = (struct msghdr){.msg_iov = (struct iovec *)(uintptr_t)iov, .msg_iovlen = cnt};
        io_uring_prep_sendmsg(sqe, h->fd, msg, MSG_NOSIGNAL);
    }
    io_uring_sqe_set_data(sqe, op);
    cp__h_pin(h);
    op->cp__flags |= CP__OPF_INKERNEL;
    cp__hb_release(op);
    submit_now_locked(s);
    cp__lock_release(&s->sq_lock);
    return CP__PENDING;
}

static int ur_start(cp_op *op)
{
    cp_handle *h = op->cp__h;
    if (op->opcode == CP_OP_RECV_POOL)
        return arm_multishot(h);
    if (op->opcode == CP_OP_SEND && (op->cp__flags & CP__OPF_TRYNOW)) {
        /* The caller can take a send that finishes now as its result: a system call of
         * its own costs less than a request, its completion and its trip through the
         * port. Whatever is left (a short send, a full socket) goes to the kernel as a
         * request. */
        op->cp__flags &= (uint16_t)~CP__OPF_TRYNOW;
        int r = send_now(h, op);
        if (r != -EAGAIN)
            return r;
    }
    if (op->opcode == CP_OP_TRANSMIT) {
        int r = cp__transmit_run(h, CP_CONTAINER_OF(op, cp_transmit_op, op));
        return r == CP__AGAIN ? wait_writable(h, op) : r;
    }
    if (op->opcode == CP_OP_SEND && (op->cp__flags & CP__OPF_VEC))
        return start_sendmsg(h, op);
    if (op->opcode == CP_OP_CONNECT &&
        (op->cp__flags & (CP__OPF_PHASE | CP__OPF_CONNECTED)) == CP__OPF_PHASE)
        return connect_again(h, op);
    cp_port *p = h->cp__port;
    ur_state *s = state_of(p);
    cp__lock_acquire(&s->sq_lock);
    struct io_uring_sqe *sqe = injected_no_sqe(op) ? NULL : get_sqe_locked(s);
    if (!sqe) {
        /* The op completes with -EBUSY (socket.h); a send that continued after a short
         * write is cut mid-stream then (finish_locked in socket.c). */
        cp__lock_release(&s->sq_lock);
        return -EBUSY;
    }
    switch (op->opcode) {
    case CP_OP_RECV:
        if (op->cp__flags & CP__OPF_VEC) {
            io_uring_prep_readv(sqe, h->fd, op->u.iov, op->cp__aux, 0);
        } else {
            io_uring_prep_recv(sqe, h->fd, op->u.buf, rw_len(op->cp__len), 0);
            /* Wait for data before the first attempt: a receive is posted right after the
             * last one emptied the socket, so trying at once mostly fails (a wasted pass
             * through the TCP receive path); when data is there the wait ends at once. */
            sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
        }
        break;
    case CP_OP_SEND:
        /* MSG_WAITALL: the kernel sends the whole buffer before it completes (retrying
         * after short sends itself), or reports the bytes sent before an error; the
         * socket layer continues from there. A request the kernel fails with -ECANCELED
         * because its submitter exited reports what it sent before, too. */
        io_uring_prep_send(sqe, h->fd, (char *)op->u.buf + op->cp__done,
                           rw_len(op->cp__len - op->cp__done), MSG_NOSIGNAL | MSG_WAITALL);
        break;
    case CP_OP_ACCEPT: {
        cp_accept_op *aop = CP_CONTAINER_OF(op, cp_accept_op, op);
        if (op->cp__flags & CP__OPF_FIRSTDATA) {
            io_uring_prep_recv(sqe, aop->fd, op->u.buf, rw_len(op->cp__len), 0);
        } else {
            aop->addrlen = sizeof(aop->addr);
            io_uring_prep_accept(sqe, h->fd, (struct sockaddr *)&aop->addr, &aop->addrlen,
                                 SOCK_NONBLOCK | SOCK_CLOEXEC);
        }
        break;
    }
    case CP_OP_CONNECT:
        if (op->cp__flags & CP__OPF_CONNECTED) {
            cp_connect_op *cop = CP_CONTAINER_OF(op, cp_connect_op, op);
            io_uring_prep_send(sqe, h->fd, (const char *)cop->cp__data + op->cp__done,
                               rw_len(cop->cp__data_len - op->cp__done), MSG_NOSIGNAL);
        } else {
            io_uring_prep_connect(sqe, h->fd, op->u.buf, op->cp__len);
            op->cp__flags |= CP__OPF_PHASE; /* a later start is a restart: connect_again */
        }
        break;
    case CP_OP_READ: {
        cp_file_op *f = CP_CONTAINER_OF(op, cp_file_op, op);
        io_uring_prep_read(sqe, h->fd, op->u.buf, rw_len(op->cp__len), f->offset);
        break;
    }
    case CP_OP_WRITE: {
        cp_file_op *f = CP_CONTAINER_OF(op, cp_file_op, op);
        io_uring_prep_write(sqe, h->fd, (char *)op->u.buf + op->cp__done,
                            rw_len(op->cp__len - op->cp__done), f->offset + op->cp__done);
        break;
    }
    case CP_OP_DISCONNECT:
        io_uring_prep_shutdown(sqe, h->fd, SHUT_WR);
        break;
    default:
        /* Give the SQE back as a no-op that nobody waits for. */
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, TAG_IGNORE);
        cp__lock_release(&s->sq_lock);
        return -EOPNOTSUPP;
    }
    io_uring_sqe_set_data(sqe, op);
    cp__h_pin(h);
    op->cp__flags |= CP__OPF_INKERNEL;
    cp__hb_release(op);
    submitted_locked(p, s);
    cp__lock_release(&s->sq_lock);
    return CP__PENDING;
}

static int ur_cancel(cp_op *op)
{
    if (op->opcode == CP_OP_RECV_POOL)
        return 0; /* waits on the socket's multishot, not on a request of its own */
    cp_handle *h = op->cp__h;
    if (cancel_request(h->cp__port, (uint64_t)(uintptr_t)op, false) == 0)
        return CP__PENDING;
    /* The kernel never saw it: the op ends here, as if it had not started. */
    op->cp__flags &= (uint16_t) ~(CP__OPF_INKERNEL | CP__OPF_POLLWAIT);
    cp__h_unpin(h);
    return 0;
}

const cp__backend cp__backend_io_uring = {
    .name = "io_uring",
    .kind = CP_BACKEND_IO_URING,
    .init = ur_init,
    .fini = ur_fini,
    .poll = ur_poll,
    .wake = ur_wake,
    .flush = ur_flush,
    .pool_refill = ur_pool_refill,
    .pool_background = true,
    .pool_stop = ur_pool_stop,
    .file_leg = ur_file_leg,
    .transmit_done = ur_transmit_done,
    .attach = ur_attach,
    .detach = ur_detach,
    .start = ur_start,
    /* No immediate sends for the server (cp__send_try): its sends go to the kernel as
     * requests, with the next poll's single io_uring_enter. A system call per reply costs
     * more kernel time than the request and its completion (measured: bench/README.md). */
    .try_send = NULL,
    .cancel = ur_cancel,
};
