/* cport: the scalable server layer (S2-S8, T3).
 *
 * A cp_server owns a listening socket, a port and a pool of worker threads, and runs a
 * TCP server as callbacks: connection opened, data (or whole frames) received, send
 * done, connection closed. It does what the seeds spend most of their pages on:
 *   - keeps between accepts_min and accepts_max accepts posted, growing when connections
 *     find none posted and shrinking back when quiet (S2);
 *   - closes connections that send nothing within handshake_timeout_ms or go silent for
 *     idle_timeout_ms, with one sweep per tick over all connections: no per-connection
 *     timer, no syscall per connection per tick (S3);
 *   - takes connections, I/O contexts and buffers from lookaside lists, so steady-state
 *     traffic allocates nothing (S4). Each thread keeps a small cache of free send
 *     contexts and buffers in front of them (as NT's per-processor lookaside lists do), so
 *     a message costs no lock there; a thread's cache holds at most 64 contexts of each
 *     kind and 512 KiB of buffers (32 of 4 KiB, 8 of 16 KiB, 4 of 64 KiB);
 *   - refuses connections beyond max_conns at once (they are accepted and closed, and
 *     counted); stops reading from a peer whose replies pile up beyond max_pending_send
 *     (backpressure) and resumes when they drain, and lets the application pause reading
 *     a connection for reasons of its own (cp_conn_pause_recv); pauses accepting on
 *     EMFILE / ENFILE /
 *     ENOBUFS / ENOMEM (and on any accept error that is not the new connection's own, such
 *     as EPERM from an LSM) and retries on a timer, without spinning (S5);
 *   - hands one connection's data to its callbacks in arrival order, never two callbacks
 *     of one connection at once, with any number of workers and receives outstanding;
 *     sends go out in the order issued (S6);
 *   - optionally frames messages as a 4-byte big-endian length plus payload (S7);
 *   - shuts down gracefully: stop accepting, stop reading, let replies to what was
 *     already received go out until a deadline, then cancel, close, stop, free (S8);
 *   - counts what happens (cp_server_stats).
 *
 * Threads. Callbacks run on the server's worker threads. The callbacks of one connection
 * never run concurrently and see its data in arrival order; callbacks of different
 * connections run in parallel (up to `threads`). A callback should not block for long;
 * if it must, bracket the wait with cp_port_block_begin/end(cp_server_port(server)).
 * cp_conn_send*() (except cp_conn_send_data(): only from the connection's own on_data),
 * cp_conn_close(), cp_conn_abort(), cp_conn_pause_recv() and cp_conn_resume_recv() may be
 * called from any thread, including callbacks of other connections; the other cp_conn_*
 * calls from the connection's own callbacks (or while holding a reference, see
 * cp_conn_ref()).
 *
 * Lifetime. The server allocates each cp_conn when it accepts the connection. A cp_conn
 * pointer is valid from on_open until on_close returns; to use it after that (e.g. from
 * another thread), take a reference with cp_conn_ref() inside a callback and drop it with
 * cp_conn_unref(); the connection's memory (and its user area) stays valid until the last
 * reference is dropped. Every reference must be dropped before cp_server_destroy(), which
 * frees all connections' memory (after cp_server_shutdown() is fine). Data passed to
 * on_data is valid until the callback returns, unless handed back with
 * cp_conn_send_data().
 *
 * NULL arguments: only where a function's comment allows them (see cport/common.h).
 */
#ifndef CPORT_SERVER_H
#define CPORT_SERVER_H

#include "cport/port.h"

#include <stdbool.h>
#include <sys/socket.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_server cp_server;
typedef struct cp_conn cp_conn;

/* Why a connection closed (on_close's reason). */
typedef enum cp_close_reason {
    CP_CLOSE_PEER = 0,              /* the peer closed its side; then what was queued was
                                       sent, unless the peer stopped taking it (see
                                       linger_ms: the close is cut, the reason stays) */
    CP_CLOSE_ERROR = 1,             /* a receive or send failed (err says why) */
    CP_CLOSE_LOCAL = 2,             /* cp_conn_close() or cp_conn_abort() */
    CP_CLOSE_HANDSHAKE_TIMEOUT = 3, /* no data within handshake_timeout_ms of accepting */
    CP_CLOSE_IDLE_TIMEOUT = 4,      /* no data for idle_timeout_ms */
    CP_CLOSE_BAD_FRAME = 5,         /* framed mode: a header announcing more than max_frame,
                                       or the peer's end of stream inside a frame (its last
                                       message cut: no on_end, not CP_CLOSE_PEER) */
    CP_CLOSE_SHUTDOWN = 6,          /* the server is shutting down */
    CP_CLOSE_DEADLINE = 7,          /* the deadline set with cp_conn_set_deadline passed */
} cp_close_reason;

/* Name of a close reason, e.g. "idle-timeout". */
CP_EXTERN const char *cp_close_reason_name(cp_close_reason reason);

typedef struct cp_server_callbacks {
    /* A connection was accepted (its handshake may not have sent data yet). Its socket
     * has TCP_NODELAY set (cp_conn_setsockopt() to change that). Return 0 (or any value
     * >= 0) to keep it; a negative value closes it at once, and no other callback runs for
     * it, except on_sent for each send with a ctx that on_open started (an accepted send
     * always reports: the send is cancelled, or done if it went out first; if one was
     * still queued, the peer gets a reset, not a FIN after a cut stream). Optional. */
    int (*on_open)(cp_conn *c);
    /* Data arrived: in stream mode a chunk of bytes (any size >= 1), in framed mode the
     * payload of one whole frame (may be 0 bytes). `data` is valid until the callback
     * returns, or until the send completes if handed to cp_conn_send_data(). Required. */
    void (*on_data)(cp_conn *c, const void *data, size_t len);
    /* A send started with a non-NULL ctx finished: result is the byte count, or a
     * negative errno. Sends that succeed report in the order they were issued; once the
     * connection fails or is aborted, the ones it cancels may report in any order. Its
     * bytes no longer count (cp_conn_pending(), send_queue_limit) when this runs, so a
     * stream fed from here, a chunk at a time, finds the room this one freed. Optional. */
    void (*on_sent)(cp_conn *c, void *ctx, int64_t result);
    /* The connection is closed; the last callback for it. err is a negative errno for
     * CP_CLOSE_ERROR, else 0. Optional. */
    void (*on_close)(cp_conn *c, cp_close_reason reason, int err);
    /* A timeout fired (reason: CP_CLOSE_HANDSHAKE_TIMEOUT, CP_CLOSE_IDLE_TIMEOUT or
     * CP_CLOSE_DEADLINE). The callback decides: typically send a last word (an HTTP 408)
     * and cp_conn_close(), or cp_conn_abort(). A handshake or idle timeout that is left
     * standing fires again at the next tick. Optional: without it the connection is
     * aborted with that reason: queued sends are cancelled, and if any were queued the
     * peer gets a reset, as from cp_conn_abort() (a cut stream must not end in a FIN that
     * passes it for a whole one); with nothing queued it gets a FIN. A send from another
     * thread racing the abort is either refused (-EPIPE) or counts as queued (a reset). */
    void (*on_timeout)(cp_conn *c, cp_close_reason reason);
    /* With options.half_close: the peer ended its sending side (EOF), after every byte it
     * sent before was delivered to on_data. Once per connection, never after on_close and
     * not on a connection already closing. In framed mode only at an end between frames:
     * an end inside a frame closes the connection as CP_CLOSE_BAD_FRAME instead. The connection
     * stays open: sends go on (an answer the peer still waits for), and the application ends it
     * with cp_conn_close() (FIN after what is queued) or cp_conn_abort() when it is done. Required
     * with half_close (cp_server_create fails with -EINVAL without it); unused otherwise. */
    void (*on_end)(cp_conn *c);
} cp_server_callbacks;

/* The most worker threads a server may have (options.threads): the limit of its pool
 * (CP_POOL_THREADS_MAX in cport/pool.h). */
#define CP_SERVER_THREADS_MAX 4096u

/* The largest conn_user_size: a connection, with its user area, must fit in one of the
 * server's 1 MiB lookaside chunks, beside its own fields (a few KiB at most). */
#define CP_CONN_USER_MAX ((size_t)(1024 - 16) * 1024)

/* Creation options. Zero-initialise, then set what you need: every zero field means the
 * default described next to it (the bools: off). */
typedef struct cp_server_options {
    const char *bind;              /* address to listen on, IPv4 or IPv6 (no names); NULL =
                                      "0.0.0.0". IPv6 bare or in brackets ("::1",
                                      "[::1]"). "::" listens on every address of both
                                      families (IPV6_V6ONLY set off, whatever the system
                                      default): IPv4 peers arrive as v4-mapped IPv6
                                      addresses (::ffff:a.b.c.d in cp_conn_peer). Any other
                                      IPv6 address serves IPv6 only (IPV6_V6ONLY on); a
                                      v4-mapped one (::ffff:127.0.0.1) has it off and
                                      serves IPv4 only */
    uint16_t port;                 /* TCP port; 0 = any (see cp_server_listen_port) */
    unsigned threads;              /* worker threads, all may run at once; 0 = online CPUs
                                      (at most CP_SERVER_THREADS_MAX); above
                                      CP_SERVER_THREADS_MAX cp_server_create fails with
                                      -EINVAL (each thread, with its record, is made at
                                      creation) */
    cp_backend_kind backend;       /* CP_BACKEND_AUTO unless forced (see cport/port.h) */
    unsigned accepts_min;          /* accepts kept posted at least; 0 = 4 */
    unsigned accepts_max;          /* ...and at most; 0 = 256 (never below accepts_min);
                                      above 65536 cp_server_create fails with -EINVAL */
    unsigned backlog;              /* listen(2) backlog; 0 = 4096 */
    unsigned max_conns;            /* connections at once; beyond, closed at accept; 0 = none.
                                      A connection counts from its accept until its on_close
                                      has returned (or, refused by on_open, until its socket
                                      is closed): one closing still counts while it lingers.
                                      One closed at the limit never counts, so it cannot
                                      make another be refused */
    unsigned handshake_timeout_ms; /* close if nothing arrives this long after accept; 0 = off */
    unsigned idle_timeout_ms;      /* close if nothing arrives for this long; 0 = off */
    unsigned tick_ms;              /* timeout sweep period; 0 = 100. Timeouts are measured
                                      on the monotonic clock in whole ticks: one fires
                                      between (timeout - tick_ms) and (timeout + tick_ms +
                                      the sweep's lateness + one scheduler tick, the coarse
                                      clock that stamps arriving data) after its start,
                                      never earlier, however late the sweep timer runs.
                                      Ticks are 16-bit: when the longer of the handshake
                                      and idle timeouts is 16384 ticks or more, the tick
                                      is lengthened to a 16384th of it (plus 1 ms), and
                                      these bounds use that tick */
    unsigned linger_ms;            /* graceful close: after the last reply, FIN is sent and the
                                      connection reads (and drops) what the peer still sends
                                      until the peer has acknowledged every reply (and, unless
                                      it has ended, for at most this long after that), so that
                                      closing with unread data does not reset the connection
                                      and destroy replies in flight. The replies must make
                                      progress, while still queued in the server and once
                                      in the kernel, also after the peer's own end: once they
                                      have made none for this long (the kernel retransmits,
                                      or probes a closed window, and nothing new is
                                      acknowledged: the peer stopped reading), the close is
                                      aborted with a reset (at a tick), so that the peer
                                      sees ECONNRESET, not a stream that just stops. A peer
                                      that keeps taking them, however slowly, is not cut (the
                                      connection counts toward max_conns until it is done).
                                      Linux also counts a window too small for the next
                                      segment as no progress: a peer reading slowly through
                                      a small receive window can be cut. A server that closes
                                      after a large reply to slow readers should wait until
                                      the peer has (most of) it (tcpi_bytes_acked;
                                      cport-httpd does). While the replies are seen moving,
                                      TCP_USER_TIMEOUT is set on the socket as a backstop for
                                      a server too busy to sweep: this plus 3 ticks plus the
                                      larger of this and 2 s (the kernel then drops the
                                      connection without a reset; it counts from its first
                                      retransmission or window probe, which may be older
                                      than the close: not set while they are stalled).
                                      0 = 5000 */
    uint32_t max_pending_send;     /* bytes queued to send on one connection before reading
                                     from it pauses; resumes below half; 0 = 1 MiB */
    uint32_t send_queue_limit;     /* bytes a connection may have queued to send at most:
                                      a send of len bytes when cp_conn_pending() + len is
                                      over it fails with -ENOBUFS before any byte goes out
                                      (counted in sends_refused), and the connection stays
                                      open (drop the message, or close a peer that does not
                                      read). For pushes from other threads (broadcasts)
                                      to slow readers, which max_pending_send does not
                                      bound. Concurrent sends may pass it by one message
                                      each. Set it above max_pending_send plus the largest
                                      reply on_data makes, or replies to a connection's own
                                      data can fail too. On io_uring a send counts from
                                      its start until its completion is handled, even
                                      when the socket has room: the sends issued to one
                                      connection between two polls count together, so a
                                      reader keeping up can still be refused a burst
                                      larger than the limit (on epoll a send the socket
                                      takes inside the call never counts). Bytes, not
                                      memory: each queued send also holds a 384-byte
                                      context. Transmits (send_file) are not limited.
                                      0 = none (4 GiB) */
    bool zero_byte;                /* pooled receives: an idle connection holds no buffer
                                      (off: each receive has a recv_buffer of its own) */
    bool half_close;               /* the peer's end of stream does not close the
                                      connection: on_end runs, and the application closes it
                                      when it is done (a proxy passing the end on). A
                                      connection whose peer has ended is exempt from the
                                      idle and handshake timeouts (nothing more can arrive);
                                      a deadline still fires. Off: the end starts the
                                      graceful close (CP_CLOSE_PEER). */
    uint32_t recv_buffer;          /* receive buffer per receive without zero_byte; page
                                      multiple, at most 65536 (else cp_server_create fails
                                      with -EINVAL, with zero_byte too); 0 = 16384, or
                                      the page size where pages are larger */
    unsigned recvs;                /* receives outstanding per connection; 0 = 1, at most
                                      64 (else -EINVAL) */
    bool framed;                   /* 4-byte big-endian length-prefixed messages (off:
                                      on_data gets the stream in chunks) */
    uint32_t max_frame;            /* framed: largest payload accepted; 0 = 1 MiB, at most
                                      CP_FRAME_MAX_LIMIT (else -EINVAL). A
                                      header over it closes the connection gracefully
                                      (CP_CLOSE_BAD_FRAME; cp_conn_frame_state() says
                                      why): replies to the frames before it still go out.
                                      So does the peer's end of stream inside a frame
                                      (a truncated message; with or without half_close:
                                      no on_end for it).
                                      A frame in progress holds a buffer of its announced
                                      size until it completes (see "Memory a split frame
                                      costs" in cport/frame.h) */
    size_t conn_user_size;         /* bytes of per-connection user area (cp_conn_user); at
                                      most CP_CONN_USER_MAX, else cp_server_create fails
                                      with -EINVAL */
    bool conn_deadlines;           /* enable cp_conn_set_deadline (4 more bytes a connection) */
    void *user;                    /* the server's user pointer (cp_server_user) */
    cp_port_options port_options;  /* options of the port (concurrency and backend are set
                                  from the fields above) */
} cp_server_options;

/* Counters (monotonic unless noted). */
typedef struct cp_server_stats {
    uint64_t conns_open;          /* connections now (gauge) */
    uint64_t conns_total;         /* connections accepted and kept */
    uint64_t conns_rejected;      /* closed at accept: over max_conns, refused by on_open, or
                                     no memory for its record */
    uint64_t conns_reaped;        /* closed by the handshake or idle timeout (by the server,
                                     or by on_timeout closing them; not the deadline) */
    uint64_t accepts_outstanding; /* accepts posted now (gauge) */
    uint64_t accepts_target;      /* how many the accept pool aims for now (gauge) */
    uint64_t accept_pauses;       /* times accepting paused on a resource error (or on
                                     another that would stay, e.g. EPERM from an LSM) */
    uint64_t bytes_in;            /* bytes received */
    uint64_t bytes_out;           /* bytes sent (handed to the kernel; a send that fails
                                     or is cancelled counts the part it sent) */
    uint64_t completions;         /* completions dequeued by the workers */
    uint64_t backpressure_events; /* times reading paused because replies piled up */
    uint64_t frames_in;           /* framed mode: frames delivered */
    uint64_t frames_rejected;     /* framed mode: connections closed for a bad frame (a
                                     header over max_frame, or a frame cut by the end) */
    uint64_t sends_refused;       /* sends refused by send_queue_limit */
    uint64_t allocations;         /* lookaside chunks and buffers allocated (7 from
                                     cp_server_create: each lookaside list maps its first
                                     chunk then; flat in steady state) */
} cp_server_stats;

/* Create a server (not yet listening). Copies the options and the callbacks, but not the
 * string opts->bind points to: cp_server_start() reads it, so it must stay valid until
 * then. Returns 0 and stores it in *serverp, or a negative errno (-EINVAL for bad options
 * or a NULL on_data, port creation errors, -ENOMEM, -EAGAIN if the workers could not be
 * started). */
CP_EXTERN int cp_server_create(cp_server **serverp, const cp_server_options *opts,
                               const cp_server_callbacks *cb);

/* Bind, listen and start accepting. Returns 0, or a negative errno (-EADDRINUSE, ...;
 * -EINVAL for a bind string that is neither an IPv4 nor an IPv6 address, or a NULL
 * server; -EAFNOSUPPORT or -EADDRNOTAVAIL for an IPv6 address on a system without IPv6).
 * Nothing is left open when it fails. Once per server: a second call, or one after
 * cp_server_shutdown(), returns -EALREADY. */
CP_EXTERN int cp_server_start(cp_server *server);

/* The TCP port the server listens on (after cp_server_start), for either family. */
CP_EXTERN uint16_t cp_server_listen_port(const cp_server *server);

/* The server's port, e.g. for cp_port_block_begin/end in a callback. */
CP_EXTERN cp_port *cp_server_port(cp_server *server);

/* The user pointer from the options. */
CP_EXTERN void *cp_server_user(const cp_server *server);

/* Shut down gracefully: stop accepting, stop reading, let what is queued to send go out,
 * close each connection as its sends drain; at deadline_ms after the call, cancel and
 * close whatever is left, as cp_conn_abort() does (a reset). Then stop the workers. Returns 0 if
 * everything closed before the deadline, -ETIMEDOUT if connections had to be cut, or -EDEADLK
 * (nothing done) when called from one of the server's callbacks: it would wait for that callback to
 * end. Blocks. Once: any thread (not a callback) may call it, also several at once; a later or
 * concurrent call waits until the first has finished and returns 0. cp_server_destroy() still has
 * to be called. The connections are stopped by a work item on a worker; only if that item cannot be
 * queued (the port's queue is full, or memory ran out) does the calling thread stop them itself,
 * and an on_close may then run on it. */
CP_EXTERN int cp_server_shutdown(cp_server *server, unsigned deadline_ms);

/* Free the server (shutting it down first with a zero deadline if needed; a shutdown
 * running on another thread is waited for). Returns 0 (also for NULL), or -EDEADLK
 * (nothing done) when called from one of its callbacks, as cp_server_shutdown(). The last
 * call on the server: nothing else may run on it meanwhile but that shutdown. */
CP_EXTERN int cp_server_destroy(cp_server *server);

/* Fill *stats (a consistent-enough snapshot; any thread). All zero for a NULL server;
 * nothing for NULL stats. */
CP_EXTERN void cp_server_get_stats(cp_server *server, cp_server_stats *stats);

/* Write the counters in Prometheus text format into buf (at most size bytes, NUL
 * terminated); returns the length it needed, like snprintf, or -EINVAL for a NULL server
 * or prefix. Metric names start with `prefix` (e.g. "cport_echo_"; "" for none). */
CP_EXTERN int cp_server_stats_prometheus(cp_server *server, const char *prefix, char *buf,
                                         size_t size);

/* ---- connections ------------------------------------------------------------------- */

/* Send len bytes; the caller may reuse data at once. Sends go out in the order issued.
 * What the kernel takes right away (epoll: nothing queued ahead, room in the socket) is
 * sent inside the call; the rest is copied and queued. Returns 0, -EPIPE if the
 * connection is closing (not yet when the peer has ended its side: until the replies
 * queued before its end have gone out, more may follow, e.g. from on_sent, for requests
 * the application received but held back), -ENOMEM (nothing was sent; or, when part of
 * the bytes had gone out already, the connection is aborted with a reset, as by
 * cp_conn_abort(): its stream cannot go on without the rest), -ENOBUFS (the same, when
 * 4 GiB would be queued on the connection: cp_conn_pending() counts up to UINT32_MAX; or
 * before any byte goes out when options.send_queue_limit would be passed, or when about a
 * million sends are queued on the connection), or -EINVAL. Any thread. In framed mode the
 * bytes are sent as they are: use cp_conn_send_frame(). A queued send that fails later
 * (the peer reset the connection; on io_uring, no submission slot: -EBUSY) aborts the
 * connection (CP_CLOSE_ERROR; on_sent reports the error for cp_conn_send_ref) with a
 * reset at the failure, also before its first byte, as a failed cp_conn_send_file() does:
 * no reply sent after it reaches the peer in place of the missing bytes, and the peer
 * sees ECONNRESET, not an end of stream. */
CP_EXTERN int cp_conn_send(cp_conn *c, const void *data, size_t len);

/* Send back (part of) the data on_data is handing over right now: data must lie within
 * that callback's buffer. As cp_conn_send(), except that a remainder the kernel does not
 * take at once keeps the received buffer (no copy) until it is sent when it is above
 * 4 KiB and at least a quarter of that buffer (smaller ones, and frames the decoder
 * assembled, are copied). Only from on_data of the same connection: elsewhere, or for
 * data outside the buffer, -EINVAL. */
CP_EXTERN int cp_conn_send_data(cp_conn *c, const void *data, size_t len);

/* Send caller-owned memory without copying; it must stay valid until on_sent(c, ctx, ..)
 * reports the send done (ctx must not be NULL; set on_sent, without it nothing reports).
 * Returns as cp_conn_send(); after a negative return on_sent is not called for it. Any
 * thread. */
CP_EXTERN int cp_conn_send_ref(cp_conn *c, const void *data, size_t len, void *ctx);

/* TransmitFile through the connection: head (copied; may be NULL/0), then len bytes of the
 * file fd from offset (len > 0), without copying the file through user space; ordered with
 * the connection's other sends. fd must stay open until on_sent(c, ctx, result) reports
 * the send done (ctx must not be NULL; without on_sent, until on_close). Returns as
 * cp_conn_send(), except that send_queue_limit does not apply (-ENOBUFS only when 4 GiB,
 * or about a million sends, would be queued). A send that fails once started (-EIO: the
 * file ends before the range does; -EINVAL: fd is not a regular file or block device, or
 * was opened O_DIRECT) reports that to on_sent and aborts the connection (CP_CLOSE_ERROR);
 * it is reset at the failure, also before the first byte, so nothing sent after it
 * reaches the peer in place of the missing bytes, and the peer sees ECONNRESET, not an end
 * of stream (as from cp_conn_abort(), what the kernel still holds unsent, of earlier
 * replies too, is discarded). The file must not be truncated or rewritten until the send
 * is done: it is sent without copying, so bytes already handed to the kernel may go out
 * as zeros or as the new contents, without any error (only a range the file no longer has
 * when it is read fails, with -EIO); replace a file by renaming a new one over it
 * instead. Any thread. */
CP_EXTERN int cp_conn_send_file(cp_conn *c, const void *head, size_t head_len, int fd,
                                int64_t offset, uint64_t len, void *ctx);

/* Set (ms > 0) or clear (0) a deadline for the connection: when it passes, on_timeout
 * runs with CP_CLOSE_DEADLINE (or the connection is aborted). Checked at every tick, so
 * it fires never before the deadline and within one tick (plus the sweep's lateness) after
 * it. Needs options.conn_deadlines; -EINVAL otherwise (or for a NULL c), and for a
 * deadline 2^31 - 1 ticks away or more (with tick_ms 1 beyond about 24.8 days; with
 * tick_ms 2 only ms within a few of UINT_MAX; never with longer ticks). From the
 * connection's callbacks. (A tick is tick_ms, or longer when the timeouts are long: see
 * tick_ms.) */
CP_EXTERN int cp_conn_set_deadline(cp_conn *c, unsigned ms);

/* Framed mode: send one frame (header + payload, copied). Returns as cp_conn_send() (the
 * 4-byte header counts toward send_queue_limit); -EINVAL for a payload over
 * CP_FRAME_MAX_LIMIT, and on a server without options.framed (nothing sent; to send
 * length-prefixed messages over a stream server, build them with cp_frame_encode() and
 * send them with cp_conn_send()). Any thread. */
CP_EXTERN int cp_conn_send_frame(cp_conn *c, const void *payload, size_t len);

/* Framed mode: describe the connection's frame decoder for a log, as cp_frame_describe()
 * does with the server's limit, e.g. in on_close with CP_CLOSE_BAD_FRAME: "frame header
 * announces 16777216 bytes (0x01000000), over the 1048576-byte limit". The library logs
 * nothing itself: a peer sending bad frames must not be able to flood the server's log,
 * so what to log, and how often, is the application's choice. Writes at most size bytes
 * including the NUL and returns the length of the whole description (as snprintf), or
 * -EINVAL when the server is not framed (or c is NULL). Only inside the connection's own
 * callbacks (on_close included), which see the decoder at rest. */
CP_EXTERN int cp_conn_frame_state(cp_conn *c, char *buf, size_t size);

/* Stop reading from the connection, e.g. because the application cannot pass the data on
 * yet (a proxy whose upstream is slow); cp_conn_resume_recv() reads again. This pause
 * and the server's own (backpressure: max_pending_send) are separate: reading runs only
 * while neither holds. After the call returns no new receive starts; what receives
 * already hold is still delivered: on_data may still be called for the rest of a
 * delivery in progress (framed: the rest of the frames of that receive) and for the
 * receives outstanding (at most `recvs`, each up to recv_buffer bytes, or a pool buffer
 * with zero_byte). Nothing is lost: the peer's further data stays in the kernel's socket
 * buffer, and TCP's window stops the peer when that is full. A paused connection posts
 * no receive, so in zero-byte mode it holds no pool buffer beyond those receives (on
 * io_uring the socket's background receive is stopped too; chunks it had already taken
 * wait for the resume). The peer's end is noticed only when reading resumes (also one
 * a receive outstanding at the pause reports: recvs > 1, or a pause from another thread
 * while a receive waits), so what the application still holds can be answered first; a
 * reset such a receive reports closes the connection at once.
 * While paused, neither the handshake nor the idle timeout applies (the silence is the
 * application's doing): both count again from the resume. A deadline
 * (cp_conn_set_deadline) still fires. A close (cp_conn_close, a bad frame, shutdown)
 * reads on regardless, dropping the input, as a graceful close always does. Idempotent.
 * Returns 0, -EPIPE once the connection is closing, or -EINVAL (NULL). Any thread, while
 * the caller holds the connection (one of its callbacks, or a cp_conn_ref); also in
 * on_open, before the first receive. */
CP_EXTERN int cp_conn_pause_recv(cp_conn *c);

/* Read again after cp_conn_pause_recv() (unless backpressure still holds: then when the
 * replies have drained). Resuming a connection that is not paused does nothing and
 * returns 0. Returns 0, -EPIPE once the connection is closing, or -EINVAL (NULL); it
 * needs no memory and cannot fail otherwise: once it returns 0 reading resumes, also when
 * the receive must be posted by a worker (the call came from a callback of the
 * connection, or one ran). Any thread, while the caller holds the connection; it never
 * waits for the connection's callbacks. */
CP_EXTERN int cp_conn_resume_recv(cp_conn *c);

/* End the sending side: FIN to the peer once everything queued so far has been sent
 * (DisconnectEx without the close); reading goes on, and the connection stays open until
 * it is closed (cp_conn_close, or the peer's end without half_close). From the call on,
 * sends fail with -EPIPE (as does a send racing the call that the FIN would have
 * overtaken: a send either reaches the peer before the FIN or fails). Returns 0 (also
 * when called again), -EPIPE once the connection is closing, or -EINVAL (NULL). Any
 * thread, while the caller holds the connection. */
CP_EXTERN int cp_conn_shutdown_send(cp_conn *c);

/* Close after everything queued so far has been sent (bounded: see linger_ms). From the
 * call on on_data is not called again for the connection: in stream mode the rest of the
 * chunk the calling on_data holds is its own to ignore; in framed mode the frames after
 * the current one are dropped (a call already running on another thread finishes). Any
 * thread. */
CP_EXTERN void cp_conn_close(cp_conn *c);

/* Close now, with a reset (an abortive close, SO_LINGER {1, 0}): queued sends are
 * cancelled, what the kernel still holds unsent is discarded, and the peer gets a reset
 * (ECONNRESET), never an end of stream that would make a cut stream look whole. (Also
 * frees at once the kernel memory of a peer that stopped reading.) Any thread. */
CP_EXTERN void cp_conn_abort(cp_conn *c);

/* The connection's user area (conn_user_size bytes, zeroed at accept; 16-byte aligned),
 * or NULL if conn_user_size is 0. */
CP_EXTERN void *cp_conn_user(cp_conn *c);

/* The server the connection belongs to. */
CP_EXTERN cp_server *cp_conn_server(cp_conn *c);

/* The peer's address (getpeername); *len is set to its length. Its family is the
 * listener's: through a listener on "::" an IPv4 peer is AF_INET6, v4-mapped. Returns 0 or
 * a negative errno: -EINVAL for a NULL c, addr or len; -EBADF once the connection's socket
 * is being closed (a graceful close keeps it open while replies drain; in on_close it is
 * closed). Any thread, while the caller holds the connection (a callback of it, or a
 * cp_conn_ref). */
CP_EXTERN int cp_conn_peer(cp_conn *c, struct sockaddr_storage *addr, socklen_t *len);

/* setsockopt(2) / getsockopt(2) on the connection's socket (SO_SNDBUF, TCP_NODELAY,
 * TCP_KEEPIDLE, TCP_INFO, ...). Return 0 or a negative errno: -EINVAL for a NULL c; -EBADF
 * once the socket is being closed, as for cp_conn_peer(); the check and the call are made
 * under the socket's lock, so they never reach another socket. Any thread, while the
 * caller holds the connection. */
CP_EXTERN int cp_conn_setsockopt(cp_conn *c, int level, int name, const void *val, socklen_t len);
CP_EXTERN int cp_conn_getsockopt(cp_conn *c, int level, int name, void *val, socklen_t *len);

/* Bytes of sends queued on the connection whose operations have not completed. A send
 * completes once the kernel has taken all its bytes: on epoll as they are copied into the
 * socket; on io_uring a send request waiting for room counts until the kernel finishes it.
 * Sends taken whole inside the call are never counted. */
CP_EXTERN size_t cp_conn_pending(const cp_conn *c);

/* The connection's socket descriptor, for calls the functions above do not cover. Do not
 * read from it, write to it, shut it down or close it. The number is the connection's only
 * until its socket's close begins, which another thread may start at any moment
 * (cp_conn_close/abort, a timeout, the server's shutdown); from then on it may belong to a
 * socket accepted or opened since, and in on_close it always may. Prefer cp_conn_peer(),
 * cp_conn_setsockopt() and cp_conn_getsockopt(), which check under the socket's lock. */
CP_EXTERN int cp_conn_fd(const cp_conn *c);

/* Keep the connection's memory valid beyond on_close; call inside one of its callbacks
 * (or while already holding a reference). Drop it before cp_server_destroy(). */
CP_EXTERN void cp_conn_ref(cp_conn *c);

/* Drop a reference taken with cp_conn_ref(). Any thread. */
CP_EXTERN void cp_conn_unref(cp_conn *c);

#ifdef __cplusplus
}
#endif
#endif
