/* cport: overlapped socket I/O through a completion port.
 *
 * The model is Windows' overlapped I/O:
 *   - a handle (cp_socket) is associated with a port and a per-handle key (P2);
 *   - every operation is started with a caller-owned per-I/O context, a cp_op (the
 *     OVERLAPPED); its completion carries that exact cp_op*, the key and the result;
 *   - an operation that fails at submission returns a negative errno and never completes;
 *     an operation that was accepted completes exactly once: with its result, with
 *     -ECANCELED when cancelled or when its socket is closed, or with -ETIMEDOUT when its
 *     timeout expires.
 *
 * Every call that starts an operation fails with -EBUSY when its cp_op is still in use
 * (started and its completion not yet dequeued), with -EINVAL for NULL or out-of-range
 * arguments, a misaligned op, or a handle that is not associated (or is a cp_file), and
 * with -EBADF once the socket's close has begun. A start with a timeout (cp_op.timeout_ms)
 * also fails with -ENOMEM when the port's timer heap cannot grow.
 *
 * -EBUSY as a completion's result (io_uring only) is another thing: a step of the accepted
 * operation (its start, also when it reaches the head of its socket's queue later; a send
 * continuing after a short write; a wait for room in the socket) could not get a
 * submission slot (the submission queue was full and the kernel would take none of it).
 * It does not mean the op was in use: only a start call says that. What a send or transmit that
 * fails so after part of it went out does to the socket: cp_socket_send(),
 * cp_socket_transmit_packets().
 *
 * Ownership and lifetime.
 *   - The caller allocates every cp_socket and cp_op (usually embedded in its own
 *     per-connection and per-I/O structs) and never moves them while in use.
 *   - A cp_op is in use from a successful start call until its completion has been
 *     dequeued. While in use, neither the op nor the buffers or iovec arrays it refers to
 *     may be touched, reused or freed. After its completion is dequeued it is the
 *     caller's again and may be reused for any operation on any socket.
 *   - A cp_socket is in use from cp_socket_associate() until the completion of the
 *     cp_op passed to cp_socket_close() has been dequeued; only then may its memory be
 *     freed or reused. That close completion is queued after every other operation of the
 *     socket has completed. The socket owns its fd from associate() on and closes it.
 *   - Queued after is not handled after: when several threads dequeue, another thread may
 *     still be running its handler for an earlier completion of the same socket when the
 *     close completion is dequeued, and an operation you start may complete and be
 *     handled on another thread before the start call returns. A program that handles
 *     one socket's completions on several threads must therefore count, per socket, the
 *     operations it started (count before starting) and free the socket's memory only
 *     when the count drops to zero (the server layer, cport/server.h, does this for you).
 *   - Fields of cp_op and cp_socket whose names start with cp__ are private.
 *
 * Threads. Every function here may be called from any thread, concurrently, including
 * from code handling a completion. Operations of one kind on one socket are carried out
 * in the order they were started: several receives outstanding on a socket are filled in
 * the order posted (the first gets the earliest bytes) and complete in that order;
 * several sends outstanding go out in the order posted, each in full, never interleaved.
 * That order is the order of operations that run to their end: one that is cancelled, times
 * out or is cut by cp_socket_close() completes when that happens, which may be before an
 * earlier one of the socket that the kernel still holds (io_uring), e.g. the receives
 * queued behind the first on a close. Data still arrives in the order posted.
 * Completions of different operations may still be dequeued by different threads in
 * different orders; a server that hands one connection to several workers at once must
 * order them itself (the server layer, cport/server.h, does).
 *
 * NULL arguments: only where a function's comment allows them (see cport/common.h).
 */
#ifndef CPORT_SOCKET_H
#define CPORT_SOCKET_H

#include "cport/port.h"

#include <sys/socket.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_handle cp_handle;
/* A socket associated with a port. */
typedef struct cp_handle cp_socket;

/* Operation codes, readable in cp_op.opcode after a completion is dequeued: ACCEPT
 * (cp_socket_accept), CONNECT (cp_socket_connect and _connect_ex), RECV (cp_socket_recv
 * and _recvv), RECV_POOL, SEND (all the sends), CLOSE, DISCONNECT, TRANSMIT (transmit_file
 * and _packets), READ/WRITE (cport/file.h). */
enum cp_opcode {
    CP_OP_NONE = 0,
    CP_OP_ACCEPT,
    CP_OP_CONNECT,
    CP_OP_RECV,
    CP_OP_RECV_POOL,
    CP_OP_SEND,
    CP_OP_CLOSE,
    CP_OP_DISCONNECT,
    CP_OP_TRANSMIT,
    CP_OP_READ,
    CP_OP_WRITE,
    CP_OP__COUNT
};

/* The per-I/O context (OVERLAPPED). Caller-allocated; zero-initialise it once. 48 bytes
 * on 64-bit Linux. It must be aligned as the compiler aligns it (not inside a packed
 * structure): a submission with a misaligned one fails with -EINVAL. The same holds for
 * a cp_socket / cp_file given to cp_socket_associate() / cp_file_associate(). */
typedef struct cp_op {
    struct cp_op *cp__next;
    cp_handle *cp__h;
    /* For CP_OP_RECV_POOL: after the completion, the pool buffer holding the data
     * (result bytes long; NULL when result <= 0). Give it back with cp_buffer_release().
     * For other operations: the caller's buffer (or iovec array). */
    union {
        void *buf;
        const struct iovec *iov;
    } u;
    uint32_t cp__len;
    uint32_t cp__done; /* bytes moved so far; the errno once failed */
    /* Optional per-operation timeout in milliseconds, read when the operation starts;
     * 0 = none. When it expires the operation is cancelled and completes with
     * -ETIMEDOUT. The field is the caller's: cport never changes it, so it carries over
     * when the context is reused for another operation (a connect's timeout would apply
     * to the receive after it): set it before each start. */
    uint32_t timeout_ms;
    uint32_t cp__tidx;
    uint8_t opcode; /* CP_OP_*: the operation this context last carried (read-only) */
    uint8_t cp__state;
    uint16_t cp__flags;
    uint16_t cp__seq;
    uint16_t cp__aux; /* iovec count of a vector operation */
} cp_op;

/* The per-handle context. Caller-allocated; filled in by cp_socket_associate(). */
struct cp_handle {
    int fd; /* the descriptor (read-only): never close it or change its O_NONBLOCK; socket
               options may be set on it from any thread until cp_socket_close() is called
               (e.g. SO_LINGER {1, 0} just before, to close with a reset) */
    uint32_t cp__lock;
    uintptr_t key; /* the per-handle key every completion of this handle carries */
    cp_port *cp__port;
    cp_op *cp__rq; /* receives (and accepts) in start order: the last, circular */
    cp_op *cp__sq; /* sends (and connects) in start order: the last, circular */
    void *cp__aux;
    uint16_t cp__flags;
    uint16_t cp__nstash;
    uint32_t cp__inflight;
    uint32_t cp__stash_head;
    uint16_t cp__opseq;
    uint8_t cp__err;
    uint8_t cp__hgen;
};

/* An accept context (the AcceptEx per-I/O struct): a cp_op plus room for the result. */
typedef struct cp_accept_op {
    cp_op op;
    int fd;                       /* the accepted socket (non-blocking, close-on-exec), or -1 */
    socklen_t addrlen;            /* length of the peer address */
    struct sockaddr_storage addr; /* the peer address */
} cp_accept_op;

/* Associate the socket `fd` with `port` under the per-handle key `key`: from now on `s`
 * owns fd (cp_socket_close() closes it). Sets fd non-blocking. Returns 0, -EINVAL for a
 * negative fd (or a NULL s or port, or a misaligned s), -EBADF for one that is not open,
 * or an error from the backend (-ENOMEM,
 * -EPERM, ...); on error nothing is changed and fd stays the caller's. A descriptor may be
 * associated once: epoll refuses a second association with -EEXIST, io_uring cannot tell,
 * and two handles owning one descriptor close it twice. */
CP_EXTERN int cp_socket_associate(cp_socket *s, cp_port *port, int fd, uintptr_t key);

/* Accept one connection on the listening socket `listener` (AcceptEx). Many accepts may
 * be outstanding on one listener; they take connections in the order posted, and those
 * with len == 0 complete in that order. One waiting for first data leaves the queue with
 * its connection, so a silent peer does not hold up the accepts behind it: they may
 * complete before it. On success the
 * completion's result is the number of first-data bytes received into buf, op->fd holds
 * the new socket and op->addr/addrlen the peer. With len > 0 the completion waits until
 * the first data arrives (result > 0; 0 if the peer closed first); with len == 0 it
 * completes as soon as the connection is accepted. The accepted fd is the caller's: pass
 * it to cp_socket_associate() (or close it). On failure (result < 0) op->fd is -1.
 * Returns 0 or a negative errno at submission (-EBADF if the socket is closing). */
CP_EXTERN int cp_socket_accept(cp_socket *listener, cp_accept_op *op, void *buf, size_t len);

/* Connect the socket to addr (ConnectEx without data). The caller makes the socket
 * (socket(2), of addr's family) and associates it first; no bind is needed. addr must stay
 * valid until the completion is dequeued. Result 0 on success or a negative errno
 * (-ECONNREFUSED, -ETIMEDOUT from the op's timeout_ms, -ECANCELED, ...). After a failed
 * connect the socket's state is unspecified (POSIX): close it and use a new one.
 * Sends (all of them), transmits and a disconnect started before the connect completes
 * wait for it, in order; so do receives (cp_socket_recv, _recvv, _recv_pooled): they
 * start, in the order posted, once the connection is made (for cp_socket_connect_ex:
 * before its data is sent). If the connect fails (error, timeout, cancel), each operation
 * waiting for it, receive or send, completes with -ENOTCONN without ever being started (a
 * receive never 0; nothing of a send goes out: cp_op_transferred() and
 * cp_transmit_op.sent are 0), after the connect's completion, which carries the reason
 * (-ECONNREFUSED ...); an operation's -ETIMEDOUT and -ECANCELED stay its own. Until then a
 * waiting operation can be cancelled, time out or be cut by cp_socket_close() (-ECANCELED,
 * as any operation a close cuts). A send started after a second connect waits for that
 * one. */
CP_EXTERN int cp_socket_connect(cp_socket *s, cp_op *op, const struct sockaddr *addr,
                                socklen_t addrlen);

/* Receive up to len bytes into buf. Result: bytes received (> 0), 0 at end of stream, or a
 * negative errno. len must be > 0 and < 4 GiB. Fails with -EBUSY on a socket whose data
 * flows into the pool (cp_socket_recv_pooled): on io_uring from its first pooled receive
 * on while the kernel's multishot receive stays armed, on either backend while received
 * chunks are held for it undelivered. Do not mix the two kinds of receive on a socket. */
CP_EXTERN int cp_socket_recv(cp_socket *s, cp_op *op, void *buf, size_t len);

/* Receive into iov[0..iovcnt-1] (scatter). Same results and -EBUSY as cp_socket_recv();
 * the iovec array must stay valid until the completion is dequeued. 1 <= iovcnt <=
 * IOV_MAX, and the total length must be > 0 and < 4 GiB (else -EINVAL). */
CP_EXTERN int cp_socket_recvv(cp_socket *s, cp_op *op, const struct iovec *iov, int iovcnt);

/* Receive with no buffer of the caller's (the seeds' zero-byte receive, I3): an idle
 * connection holds no receive buffer; when data arrives it is put into the port's shared
 * pool (a provided-buffer ring on io_uring) and handed over in op->u.buf. Result: bytes
 * (> 0), 0 at end of stream, or a negative errno. op->u.buf points into one of the pool's
 * buffers: at its start, or, where receives are packed (io_uring on Linux 6.12+, unless
 * CP_PORT_WHOLE_BUFFERS; cp_port_stats.pool_packed says), anywhere in a buffer that other
 * receives, of any socket, share. Give the data back with cp_buffer_release(port, u.buf)
 * (the pointer as handed over); a shared buffer returns to the pool when all of its data
 * is given back. A socket that holds the port's pool_per_socket received chunks
 * undelivered stops receiving into the pool until they are claimed; on io_uring what the
 * kernel had already received by then is kept too (never dropped), but it never takes more
 * than the buffers in the kernel's ring, at most half the pool: a fast peer cannot take
 * every buffer. When the pool is empty the receive waits for a buffer instead of failing. */
CP_EXTERN int cp_socket_recv_pooled(cp_socket *s, cp_op *op);

/* Give the data of a CP_OP_RECV_POOL completion (its op->u.buf) back to the port's pool,
 * once. A pointer that is not in the pool, or names a buffer none of whose data is out,
 * is ignored; a second release of data whose buffer still holds other data that is out
 * (another receive's, or, with whole buffers, the next receive's) cannot be told from a
 * release of that data and gives the buffer back too early. */
CP_EXTERN void cp_buffer_release(cp_port *port, void *buf);

/* The size in bytes of each pool buffer of the port (the most one pooled receive returns);
 * 0 for a NULL port. */
CP_EXTERN size_t cp_buffer_size(const cp_port *port);

/* Send len bytes from buf. The operation completes when all len bytes have been handed
 * to the kernel (result == len) or with a negative errno (-EPIPE, -ECONNRESET, ...; on
 * io_uring -EBUSY when no submission slot could be had for a step, see the top of this
 * file); short writes are continued internally. After a failure cp_op_transferred() tells
 * how many bytes went out. A send that fails after at least one of its bytes went out
 * shuts down the socket's sending side, as a failed transmit does
 * (cp_socket_transmit_packets()): the peer gets the bytes that went out, then the end of
 * the stream, and sends (and transmits) queued behind it or started later fail (-EPIPE)
 * rather than follow the hole. One that fails before its first byte leaves the socket as
 * it was, and so does any failure on a datagram socket (UDP, AF_UNIX SOCK_DGRAM): what
 * went out are whole datagrams, there is no stream to cut. Not one that is cancelled,
 * times out or is cut by cp_socket_close() (-ECANCELED, -ETIMEDOUT): see
 * cp_socket_cancel(). Never raises SIGPIPE. 0 < len < 4 GiB (len 0 is -EINVAL). */
CP_EXTERN int cp_socket_send(cp_socket *s, cp_op *op, const void *buf, size_t len);

/* Send iov[0..iovcnt-1] (gather), in full; as cp_socket_send(), results and the rule for
 * a failure after part of it went out included. The iovec array must stay valid until the
 * completion is dequeued. 1 <= iovcnt <= IOV_MAX, total length > 0 and < 4 GiB (else
 * -EINVAL). */
CP_EXTERN int cp_socket_sendv(cp_socket *s, cp_op *op, const struct iovec *iov, int iovcnt);

/* Flags of cp_socket_send_ex() / cp_socket_sendv_ex(). */
enum cp_send_flags {
    /* A send that the kernel takes whole while it is being started is finished right
     * there: the call returns CP_DONE_NOW, the op is the caller's again at once and no
     * completion is queued (IOCP's FILE_SKIP_COMPLETION_PORT_ON_SUCCESS, per operation).
     * A send that must wait for room, or fails, is accepted (0) and completes through
     * the port as usual. Because it skips the queue, such a send is reported before
     * completions of the same socket that are queued but not yet dequeued. On io_uring
     * the send is tried with a plain non-blocking send(2) first when nothing is queued
     * ahead of it: a system call of its own, where a send without the flag is a request
     * that rides the poller's next io_uring_enter. That saves the completion's user time
     * but costs kernel time: an echo of 64 B messages measured 1.10x the CPU per message
     * of a plain epoll server with the flag, 0.99x without (bench/README.md); on epoll
     * the flag saves. cp_port_backend() tells which one runs. */
    CP_SEND_SKIP_ON_SUCCESS = 1u << 0,
};

/* cp_socket_send_ex() / cp_socket_sendv_ex(): the send finished at once (see
 * CP_SEND_SKIP_ON_SUCCESS); every byte was handed to the kernel. */
#define CP_DONE_NOW 1

/* cp_socket_send() with flags (enum cp_send_flags). Returns 0 (accepted: one completion
 * follows), CP_DONE_NOW (finished, no completion), or a negative errno (no completion). */
CP_EXTERN int cp_socket_send_ex(cp_socket *s, cp_op *op, const void *buf, size_t len,
                                unsigned flags);

/* cp_socket_sendv() with flags; returns as cp_socket_send_ex(). With CP_DONE_NOW the
 * iovec array may be reused at once. */
CP_EXTERN int cp_socket_sendv_ex(cp_socket *s, cp_op *op, const struct iovec *iov, int iovcnt,
                                 unsigned flags);

/* Cancel one outstanding operation (CancelIoEx with an OVERLAPPED). Returns 0 if the
 * operation was outstanding: it will complete (with -ECANCELED unless it finished first);
 * -ENOENT if op is not outstanding on s; -EALREADY if it is already being cancelled;
 * -EINVAL for a NULL or unassociated s or a NULL op.
 * A send (or transmit) cancelled, or timed out, after part of it went out reports
 * -ECANCELED (-ETIMEDOUT); cp_op_transferred() (cp_transmit_op.sent) tells how much of it
 * the peer gets. A later send follows that prefix, so on a stream the usual next step is
 * to close. Except on UDP, for a transmit: the datagram it had begun (bytes sent with more
 * of it to follow, which the kernel holds back) is discarded, as when a transmit fails
 * (cp_socket_transmit_packets()): none of it goes out, neither alone nor joined to the
 * socket's next send, which the caller could not prevent (`sent` still counts those
 * bytes). The same holds when cp_socket_close() cuts it. */
CP_EXTERN int cp_socket_cancel(cp_socket *s, cp_op *op);

/* The bytes a finished send or receive moved (IOCP's bytes transferred, which it reports
 * with a failure too). After a success, the result. After a failure, a cancel or a
 * timeout, the part that had moved before it: for a send, the prefix handed to the
 * kernel (the peer gets it); for a receive, 0 (a receive that got data completes with
 * it). Call it after the op's completion is dequeued and before the op is started again,
 * from the thread that dequeued it (or one it handed the op to). For a transmit, read
 * cp_transmit_op.sent. */
CP_EXTERN uint32_t cp_op_transferred(const cp_op *op);

/* Cancel every outstanding operation of s (CancelIoEx without one). Returns how many
 * operations were asked to cancel (>= 0), or -EINVAL for a NULL or unassociated s. */
CP_EXTERN int cp_socket_cancel_all(cp_socket *s);

/* Close the socket: every outstanding operation completes with -ECANCELED (unless it
 * finished first), the fd is closed, and then `op` completes (opcode CP_OP_CLOSE, result 0)
 * — after that completion the socket's memory may be freed. Further starts on s fail with
 * -EBADF. Returns 0, -EBADF if the socket is already closing, -EBUSY if op is still in
 * use, or -EINVAL (NULL or unassociated s, NULL or misaligned op). */
CP_EXTERN int cp_socket_close(cp_socket *s, cp_op *op);

/* Shut down the sending side (DisconnectEx without reuse): completes after every send
 * posted earlier has completed. Result 0 or a negative errno. (TF_REUSE_SOCKET has no
 * Linux equivalent: a socket is not reusable after a disconnect; open a new one.) */
CP_EXTERN int cp_socket_disconnect(cp_socket *s, cp_op *op);

/* A ConnectEx context: connect, then send the first data, as one operation. */
typedef struct cp_connect_op {
    cp_op op;
    const void *cp__data;
    uint32_t cp__data_len;
    uint32_t cp__pad;
} cp_connect_op;

/* Connect s to addr, then send len bytes from data (ConnectEx with a send buffer). One
 * completion (opcode CP_OP_CONNECT): the bytes of data sent (all of them), or a negative
 * errno (-ECONNREFUSED ...). op.timeout_ms bounds the connect and the send together;
 * after a failure, cancel or timeout cp_op_transferred(&op->op) tells how many bytes of
 * data were handed to the kernel (at most what the peer can get). Its data follows
 * cp_socket_send()'s rule: failing after part of it went out, it shuts down the sending
 * side. addr and data must stay valid until the completion is dequeued. len may be 0. As
 * cp_socket_connect() for what is started before it completes. */
CP_EXTERN int cp_socket_connect_ex(cp_socket *s, cp_connect_op *op, const struct sockaddr *addr,
                                   socklen_t addrlen, const void *data, size_t len);

/* ---- TransmitFile / TransmitPackets (I5) ---------------------------------------------- */

/* One element of a transmit: memory (fd < 0: buf, len) or a file range (fd >= 0: offset
 * >= 0, len; len 0 = to the end of the file; offset + len must fit in int64_t, else the
 * start fails with -EINVAL). The fd must be a regular file or a block device,
 * not opened O_DIRECT: anything else fails the transmit with -EINVAL when it reaches
 * that element, before any of its bytes. */
typedef struct cp_packet {
    const void *buf;
    uint64_t len;
    int fd;
    int64_t offset;
} cp_packet;

/* Flags for cp_socket_transmit_*. */
#define CP_TF_DISCONNECT 0x1u /* shut down the sending side after the last byte */

/* A transmit context: a cp_op plus its progress. Caller-allocated, zero-initialised once. */
typedef struct cp_transmit_op {
    cp_op op;
    const cp_packet *cp__elems;
    uint32_t cp__n;
    uint32_t cp__flags;
    uint32_t cp__idx;    /* element being sent */
    uint32_t cp__inpipe; /* io_uring: bytes spliced into the pipe, not yet sent */
    int32_t cp__pipe;    /* io_uring: pipe from the port's pool, or -1 */
    uint32_t cp__pad;
    uint64_t cp__off;        /* bytes of the element already sent */
    uint64_t cp__end;        /* the element's length once known */
    uint64_t sent;           /* total bytes sent (the completion's result; read-only) */
    cp_packet cp__inline[3]; /* TransmitFile's head, file and tail */
} cp_transmit_op;

/* TransmitPackets: send elems[0..n-1] in order, memory and file ranges mixed, as one
 * operation with one completion (result: total bytes, or a negative errno). File data goes
 * from the page cache to the socket without passing through user space (epoll: sendfile;
 * io_uring: splice through a pipe from the port's bounded pool, or sendfile when the pool
 * is exhausted), except on a datagram socket: there file data is read and sent a few KiB
 * at a time, so that on UDP the whole transmit is one datagram (at most 65 507 bytes for
 * IPv4; a larger one fails with -EMSGSIZE and sends nothing). elems and the memory and
 * files they name must stay valid (and the fds open) until the completion is dequeued.
 * Ordered with the socket's sends. n >= 1. A transmit that fails after some of its bytes
 * went out (a file that ends before its range does reports -EIO; on io_uring, -EBUSY when
 * no submission slot could be had to wait for room in the socket, see the top of this
 * file) shuts down the socket's sending
 * side, as a send does (cp_socket_send()): sends queued behind it then fail (-EPIPE)
 * rather than follow the hole in the stream. One that fails before its first byte leaves
 * the socket as it was, as does one on a datagram socket (see cp_socket_send()), except
 * that on UDP the datagram it had begun (bytes sent with more of it to follow, which the
 * kernel holds back) is discarded: none of it goes out, neither alone nor joined to the
 * socket's next send (`sent` still counts those bytes). One cancelled or timed out leaves
 * a stream as it was (see cp_socket_cancel()), but on UDP discards the datagram it had
 * begun in the same way. Never raises SIGPIPE. A file must not be truncated
 * or rewritten while it is being sent: the kernel sends its page-cache pages without
 * copying them, so bytes already handed to it may go out as zeros or as the new contents,
 * without any error (only a range the file no longer has when it is read fails, with
 * -EIO); replace a file by renaming a new one over it instead. */
CP_EXTERN int cp_socket_transmit_packets(cp_socket *s, cp_transmit_op *op, const cp_packet *elems,
                                         unsigned n, unsigned flags);

/* TransmitFile: head (may be NULL/0), then len bytes of the file fd from offset (len 0 = to
 * the end), then tail (may be NULL/0), as one operation; as cp_socket_transmit_packets(). */
CP_EXTERN int cp_socket_transmit_file(cp_socket *s, cp_transmit_op *op, int fd, int64_t offset,
                                      uint64_t len, const void *head, size_t head_len,
                                      const void *tail, size_t tail_len, unsigned flags);

#ifdef __cplusplus
}
#endif
#endif
