/* cport: length-prefixed message framing (the server layer's S7).
 *
 * Wire format. Every message (a "frame") is a 4-byte big-endian unsigned length L followed
 * by exactly L bytes of payload. There is no other header, padding or checksum.
 *
 * Decoding. A cp_frame_decoder holds the framing state of one connection; it is fed the
 * bytes of each receive, in stream order, in chunks of any size (one byte, or many frames
 * at once), and yields every complete frame:
 *   - zero-copy: when a frame's payload lies entirely inside the chunk being fed, the frame
 *     points into the caller's chunk (even if its header arrived in an earlier chunk);
 *   - assembled: when a payload straddles chunks, the decoder copies it into a buffer of
 *     exactly the payload's size, allocated when the first payload bytes have to be kept
 *     and released as soon as the frame has been delivered (or handed over to the caller,
 *     see cp_frame_take()).
 * So an idle decoder (between frames) owns no memory, and no allocation at all happens
 * while payloads do not straddle receives. The decoder is 16 bytes on 64-bit targets.
 *
 * Errors. A header announcing more than the configured max_frame bytes fails with
 * -EMSGSIZE as soon as its 4th byte is fed, before anything is allocated or buffered; a
 * zero-length frame fails with -EBADMSG if the configuration rejects those. Both errors are
 * sticky: the decoder refuses all further input with the same error until cp_frame_reset()
 * (the server layer closes the connection; cp_conn_frame_state() says why, for a log).
 * -ENOMEM (the allocator failed) is not sticky: nothing is lost, and feeding the unconsumed
 * rest again later retries. -EINVAL (bad arguments or configuration) changes nothing.
 *
 * Memory a split frame costs. Once a frame's payload straddles chunks, the decoder holds an
 * assembly buffer of the size its header announced (up to max_frame), from the first
 * payload byte it must keep until the frame completes or the decoder is reset or freed: a
 * peer that sends a header announcing 64 KiB and then 1 byte makes its connection hold a
 * 64 KiB buffer for as long as it stays silent. A header alone (up to 4 bytes) costs
 * nothing. So the worst case is max_frame per connection of a peer that sends headers
 * and stops. In the server's framed mode the buffers come from its lookaside size classes
 * (4, 16 or 64 KiB, the smallest that fits; lookaside memory is kept by the server, not
 * given back to the system) and are malloc'd above 64 KiB, where only the pages the
 * payload has reached are touched; the connection keeps it until the frame completes or
 * the connection closes (e.g. by idle_timeout_ms: set one, and size max_frame and
 * max_conns with this in mind).
 *
 * Configuration. Settings shared by every connection of a server (the limit, the flags and
 * the allocator) live in a cp_frame_config that the caller keeps and passes to every call;
 * this is what keeps the per-connection state at 16 bytes. Every call on one decoder must
 * get the same configuration (or one with the same allocator and limits) from its
 * initialisation or last reset until its release.
 *
 * Ownership. The caller allocates decoders and configurations (a decoder is usually
 * embedded in the per-connection struct). Zero-copy frames point into the caller's chunk
 * and are valid as long as the chunk is. Assembled frames belong to the decoder, see
 * cp_frame_next() and cp_frame_feed() for how long they stay valid.
 *
 * Threads. No function here touches global state. A decoder must be used by one thread at a
 * time (the server layer processes one connection's receives in order, one at a time); a
 * configuration may be shared by any number of threads and decoders as long as nobody
 * changes it meanwhile.
 *
 * Typical use on a receive completion (buf, n bytes):
 *
 *     size_t used;
 *     int r = cp_frame_feed(&conn->dec, &srv->framing, buf, n, on_frame, conn, &used);
 *     if (r < 0) {        // protocol error (log cp_frame_describe()) or -ENOMEM
 *         ...close...
 *     } else if (r == CP_FRAME_STOPPED) {
 *         ...keep buf + used, n - used and feed it again when the send queue drains...
 *     } else {
 *         ...post the next receive...
 *     }
 *
 * NULL arguments: only where a function's comment allows them (see cport/common.h).
 */
#ifndef CPORT_FRAME_H
#define CPORT_FRAME_H

#include "cport/common.h"

#include <stdbool.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Size of the length prefix in bytes. */
#define CP_FRAME_HEADER_SIZE 4u
/* The hard cap on max_frame (64 MiB - 1): no configuration may allow larger payloads. */
#define CP_FRAME_MAX_LIMIT 0x3ffffffu
/* max_frame used when cp_frame_config.max_frame is 0 (1 MiB). */
#define CP_FRAME_DEFAULT_MAX 0x100000u

/* Flags for cp_frame_config.flags. By default (flags == 0) zero-length frames are valid
 * messages and are delivered like any other (with len == 0). */
#define CP_FRAME_REJECT_EMPTY 0x1u /* a zero-length frame is a protocol error (-EBADMSG) */

/* What cp_frame_feed() returns when the callback stopped decoding. */
#define CP_FRAME_STOPPED 1

/* Settings shared by many decoders. Zero-initialise, then set what you need: every zero
 * field means the default described next to it. */
typedef struct cp_frame_config {
    uint32_t max_frame; /* largest payload accepted, 1..CP_FRAME_MAX_LIMIT;
                           0 = CP_FRAME_DEFAULT_MAX */
    uint32_t flags;     /* CP_FRAME_* */
    /* Allocator for assembly buffers; both NULL (the default) = malloc()/free(). `alloc`
     * gets the payload size (1..max_frame) and returns NULL on failure; `free` gets the same
     * size back, so a size-class (lookaside) allocator needs no header. They may be called
     * on any thread that uses a decoder with this configuration. */
    void *(*alloc)(void *ctx, size_t size);
    void (*free)(void *ctx, void *ptr, size_t size);
    void *alloc_ctx; /* first argument of alloc and free */
} cp_frame_config;

/* One connection's decoder state. Caller-allocated; zero-initialise it (or call
 * cp_frame_decoder_init()) before first use. Its fields are private. */
typedef struct cp_frame_decoder {
    uint8_t *cp__buf;
    uint32_t cp__len;
    uint32_t cp__st;
} cp_frame_decoder;

/* One decoded frame. */
typedef struct cp_frame {
    /* The payload: a pointer into the chunk being fed (zero-copy) or into the decoder's
     * assembly buffer. Never NULL; when len == 0 it must not be read. */
    const uint8_t *data;
    size_t len; /* payload bytes, 0..max_frame */
} cp_frame;

/* Check a configuration: returns 0, or -EINVAL if max_frame > CP_FRAME_MAX_LIMIT, if flags
 * holds unknown bits, or if exactly one of alloc and free is set. Every decoding call
 * performs the same check; a server may call this once when it starts. Thread-safe. */
CP_EXTERN int cp_frame_config_check(const cp_frame_config *cfg);

/* Put a decoder in its initial state (same as zero-filling it). Any buffer it held is NOT
 * released: use this on fresh memory only, cp_frame_reset() otherwise. */
CP_EXTERN void cp_frame_decoder_init(cp_frame_decoder *d);

/* Decode the next frame from the chunk *data (*len bytes), which continues the stream fed
 * so far. Consumed bytes are removed from the chunk (*data advances, *len shrinks).
 * Returns:
 *   1          a frame is in *frame. Nothing after it has been consumed, so the caller may
 *              stop here (backpressure) and call again later with the rest of the chunk.
 *   0          the chunk is used up (*len == 0) without completing a frame; any incomplete
 *              frame is kept (its header in the decoder, its payload in an assembly buffer).
 *   -EMSGSIZE  a header announced more than max_frame bytes (its 4 bytes are consumed);
 *   -EBADMSG   a zero-length frame arrived and the configuration rejects them;
 *              both are sticky: every later call returns the same error, consuming nothing,
 *              until cp_frame_reset().
 *   -ENOMEM    an assembly buffer could not be allocated. The bytes before the payload are
 *              consumed; the decoder is otherwise unchanged and calling again with the rest
 *              retries.
 *   -EINVAL    invalid arguments or configuration (nothing changed).
 * A zero-copy frame is valid as long as the chunk is. An assembled frame is valid until the
 * next call on the decoder, which releases its buffer first (so in a loop that runs until
 * 0 is returned no buffer outlives the loop), unless cp_frame_take() took it. *len may be 0
 * (*data may then be NULL): that only releases a delivered buffer or reports a sticky error.
 */
CP_EXTERN int cp_frame_next(cp_frame_decoder *d, const cp_frame_config *cfg, const void **data,
                            size_t *len, cp_frame *frame);

/* A frame callback of cp_frame_feed(): return 0 to go on decoding, anything else to stop
 * after this frame. The frame is valid during the call; an assembled frame's buffer is
 * released when the callback returns unless it calls cp_frame_take(d, frame). The callback
 * may call cp_frame_take() and the read-only queries on d, but no other function on d. */
typedef int (*cp_frame_fn)(cp_frame_decoder *d, const cp_frame *frame, void *user);

/* Feed one chunk (len bytes at data) to the decoder, calling fn(d, frame, user) for each
 * complete frame, in order, until the chunk is used up, fn asks to stop, or an error.
 * *consumed (if consumed is not NULL) receives the number of bytes of the chunk used, in
 * every case, errors included: data + *consumed is where to resume. Returns
 *   0                 the whole chunk was consumed (*consumed == len);
 *   CP_FRAME_STOPPED  fn returned non-zero: the bytes after that frame were not consumed
 *                     (there may be none). Feed them later to continue;
 *   a negative errno  as cp_frame_next(): -EMSGSIZE / -EBADMSG (sticky), -ENOMEM (retry by
 *                     feeding the rest again), -EINVAL.
 * No assembly buffer outlives a cp_frame_feed() call except the one holding an incomplete
 * frame. len may be 0. */
CP_EXTERN int cp_frame_feed(cp_frame_decoder *d, const cp_frame_config *cfg, const void *data,
                            size_t len, cp_frame_fn fn, void *user, size_t *consumed);

/* Take ownership of the assembly buffer of `frame`, the frame last returned by
 * cp_frame_next() or being passed to a cp_frame_fn: returns the buffer (equal to
 * frame->data, len bytes, writable), which the caller releases with cp_frame_buffer_free()
 * when done. Returns NULL when the frame is zero-copy (copy it if it must outlive the
 * chunk), empty, or not the decoder's current frame; nothing changes then. */
CP_EXTERN uint8_t *cp_frame_take(cp_frame_decoder *d, const cp_frame *frame);

/* Release a buffer obtained from cp_frame_take(): `size` is the frame's len, `cfg` a
 * configuration with the allocator of the decoder it came from. NULL buf is ignored. */
CP_EXTERN void cp_frame_buffer_free(const cp_frame_config *cfg, void *buf, size_t size);

/* Forget the stream: release any assembly buffer, clear a sticky error and any partial
 * frame. The decoder is then as after cp_frame_decoder_init(). */
CP_EXTERN void cp_frame_reset(cp_frame_decoder *d, const cp_frame_config *cfg);

/* Release everything the decoder holds (the partial frame's buffer, a delivered buffer not
 * yet released). Call it when the connection goes away. The decoder may be reused
 * afterwards; it is in its initial state. */
CP_EXTERN void cp_frame_decoder_free(cp_frame_decoder *d, const cp_frame_config *cfg);

/* The decoder's sticky error (-EMSGSIZE or -EBADMSG), or 0. */
CP_EXTERN int cp_frame_error(const cp_frame_decoder *d);

/* Bytes of an incomplete frame received so far (header bytes plus payload bytes), 0 when
 * the decoder is between frames. At end of stream, non-zero means the peer's last
 * message was truncated. 0 after an error. */
CP_EXTERN size_t cp_frame_partial(const cp_frame_decoder *d);

/* Bytes of memory the decoder owns right now (its assembly buffer), 0 when none. */
CP_EXTERN size_t cp_frame_held(const cp_frame_decoder *d);

/* A static description, for a log, of an error returned by this API (-EMSGSIZE,
 * -EBADMSG, -ENOMEM, -EINVAL; other values get cp_strerror()'s text; 0 "no error").
 * Never NULL. Thread-safe. */
CP_EXTERN const char *cp_frame_strerror(int err);

/* Describe the decoder's state for a log, with details: for a sticky error the announced
 * length and the limit, e.g. "frame header announces 16777216 bytes (0x01000000), over the
 * 1048576-byte limit"; otherwise a summary such as "incomplete frame: 100 of 4100 payload
 * bytes" or "between frames". Writes at most size bytes including the terminating NUL (nothing
 * when size == 0) and returns the length of the whole description, as snprintf() does.
 * cfg gives the limit (NULL: not shown). */
CP_EXTERN int cp_frame_describe(const cp_frame_decoder *d, const cp_frame_config *cfg, char *buf,
                                size_t size);

/* ---- encoding ----------------------------------------------------------------------- */

/* Write the 4-byte big-endian header announcing `len` payload bytes (any 32-bit value). */
CP_EXTERN void cp_frame_header(uint8_t out[4], uint32_t len);

/* Read the payload length from a 4-byte header. */
CP_EXTERN uint32_t cp_frame_header_len(const uint8_t in[4]);

/* Prepare a frame for a gathered send (cp_socket_sendv) without copying the payload:
 * writes the header into hdr, then iov[0] = {hdr, 4} and iov[1] = {payload, len}. Returns
 * the number of iovecs to send: 2, or 1 when len == 0 (iov[1] is left untouched);
 * -EMSGSIZE if len > CP_FRAME_MAX_LIMIT; -EINVAL if payload is NULL while len > 0.
 * hdr and payload must stay valid until the send completes. */
CP_EXTERN int cp_frame_encode_iov(struct iovec iov[2], uint8_t hdr[4], const void *payload,
                                  size_t len);

/* Write header and payload contiguously into out (size bytes; payload may be NULL when
 * len == 0; it must not overlap out). Returns the bytes written (4 + len); -ENOBUFS if size
 * < 4 + len; -EMSGSIZE if len > CP_FRAME_MAX_LIMIT; -EINVAL for NULL pointers. */
CP_EXTERN int64_t cp_frame_encode(void *out, size_t size, const void *payload, size_t len);

#ifdef __cplusplus
}
#endif
#endif
