/* cport: file I/O through the completion port (I7: overlapped ReadFile/WriteFile).
 *
 * A regular file associated with a port reads and writes at explicit offsets; each
 * operation completes on the port like a socket operation (cport/socket.h has the rules
 * for cp_op lifetime, cancel and close). Unlike socket operations, several operations on
 * one file run at once and may complete in any order.
 *
 * On io_uring these are native reads and writes. epoll cannot wait for regular files, so
 * the epoll backend runs them on a small pool of blocking threads (port option
 * file_threads) that posts their completions to the port. Those threads start with the
 * port's first file operation, block every signal (whichever thread started them) and
 * are named "cport-file".
 *
 * Threads: as for sockets, every function here may be called from any thread. The
 * starts fail as socket starts do: -EBUSY for an op still in use, -EINVAL for bad
 * arguments or a misaligned op, -EBADF once the file's close has begun, -ENOMEM for a timed
 * one (cp_op.timeout_ms) when the port's timer heap cannot grow.
 *
 * NULL arguments: only where a function's comment allows them (see cport/common.h).
 */
#ifndef CPORT_FILE_H
#define CPORT_FILE_H

#include "cport/socket.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A file associated with a port. */
typedef struct cp_handle cp_file;

/* A file operation's context: a cp_op plus the file offset (OVERLAPPED.Offset). */
typedef struct cp_file_op {
    cp_op op;
    uint64_t offset; /* set by cp_file_read/write; read-only while in use */
    struct cp_file_op *cp__job_next;
} cp_file_op;

/* Associate the open file `fd` with `port` under `key`; the handle owns fd from now on
 * (cp_file_close closes it). fd must be a regular file or a block device (else -EINVAL;
 * sockets go to cp_socket_associate()); it is not made non-blocking. Returns 0, -EINVAL
 * (also for a NULL f or port, a negative fd, a misaligned f), -EBADF for an fd that is
 * not open, or another error of fstat(2); on error fd stays the caller's. */
CP_EXTERN int cp_file_associate(cp_file *f, cp_port *port, int fd, uintptr_t key);

/* Read up to len bytes at offset into buf. Result: bytes read (0 at end of file) or a
 * negative errno. 0 < len < 4 GiB, offset <= INT64_MAX (else -EINVAL; the kernel also
 * refuses, with -EINVAL, a read whose offset + len passes INT64_MAX, rather than report
 * the end of the file). */
CP_EXTERN int cp_file_read(cp_file *f, cp_file_op *op, void *buf, size_t len, uint64_t offset);

/* Write len bytes from buf at offset, in full (short writes are continued). Result: len,
 * or a negative errno. 0 < len < 4 GiB, offset <= INT64_MAX (else -EINVAL). A write that
 * fails after part of it was written (-EFBIG at the file size limit, -ENOSPC) reports
 * the errno, and cp_op_transferred() the bytes written before it. */
CP_EXTERN int cp_file_write(cp_file *f, cp_file_op *op, const void *buf, size_t len,
                            uint64_t offset);

/* Close the file: outstanding operations complete (cancelled where possible; a read or
 * write a blocking thread already runs finishes normally), then op completes (opcode
 * CP_OP_CLOSE); after that the handle's memory may be reused. Returns as
 * cp_socket_close(): 0, -EBADF if already closing, -EBUSY, -EINVAL. */
CP_EXTERN int cp_file_close(cp_file *f, cp_op *op);

#ifdef __cplusplus
}
#endif
#endif
