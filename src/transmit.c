/* TransmitFile / TransmitPackets (I5): the engine shared by both backends.
 *
 * A transmit walks its elements in order. Memory goes out with send(2) (MSG_MORE while
 * more follows, so a header and the start of a body share segments); file ranges go
 * through the backend's file leg (epoll: sendfile; io_uring: splice through a pooled pipe),
 * or on a datagram socket are read and sent here (dgram_file_piece: one datagram).
 * Everything is a nonblocking syscall on the socket side: when the socket is full the
 * engine returns CP__AGAIN and the backend waits for writability (an epoll edge or an
 * io_uring poll) before calling it again. No thread ever blocks on a slow reader.
 */
#include "handle.h"
#include "inject.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define END_UNKNOWN UINT64_MAX

/* t->cp__pad caches whether any element after the current one holds bytes, so that
 * memory goes out with MSG_MORE (and the io_uring leg splices with SPLICE_F_MORE) only
 * when more really follows: a corked tail with nothing behind it would sit in the socket
 * until the kernel's cork timer (200 ms) fires. The backends' file legs read it. */
enum { MORE_UNKNOWN = 0, MORE_NO = 1, MORE_YES = 2 /* backend_io_uring.c tests for 2 */ };

/* The size of the file fd whose fstat is *st: st_size for a regular file; a block
 * device's st_size is 0, its size comes from BLKGETSIZE64. Returns 0 or a negative errno. */
static int file_size(int fd, const struct stat *st, uint64_t *size)
{
    if (S_ISBLK(st->st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, size) < 0)
            return -errno;
        return 0;
    }
    *size = (uint64_t)st->st_size;
    return 0;
}

/* The length of the current element, resolving "to the end of the file". A file element
 * must name a regular file (or a block device): anything else (a socket, a pipe) would
 * have its data consumed by the splice/sendfile legs. */
static int element_end(cp_transmit_op *t, const cp_packet *e)
{
    if (t->cp__end != END_UNKNOWN)
        return 0;
    if (e->fd < 0) {
        t->cp__end = e->len;
        return 0;
    }
    struct stat st;
    if (fstat(e->fd, &st) < 0)
        return -errno;
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
        return -EINVAL;
    /* O_DIRECT: the kernel's splice/sendfile reads such a file with direct I/O, which
     * fails (-EINVAL) at the first offset or length that is not block-aligned, typically
     * the last piece of the file, after the rest went out: refuse it whole, up front. */
    int fl = fcntl(e->fd, F_GETFL);
    if (fl < 0)
        return -errno;
    if (fl & O_DIRECT)
        return -EINVAL;
    if (e->len) {
        t->cp__end = e->len;
        return 0;
    }
    uint64_t size;
    int r = file_size(e->fd, &st, &size);
    if (r < 0)
        return r;
    t->cp__end = size > (uint64_t)e->offset ? size - (uint64_t)e->offset : 0;
    return 0;
}

/* Does any element after the current one hold bytes? */
static bool more_follows(cp_transmit_op *t)
{
    if (t->cp__pad == MORE_UNKNOWN) {
        t->cp__pad = MORE_NO;
        for (uint32_t i = t->cp__idx + 1; i < t->cp__n; i++) {
            const cp_packet *e = &t->cp__elems[i];
            struct stat st;
            uint64_t size = 0;
            if (e->len ||
                (e->fd >= 0 && (fstat(e->fd, &st) < 0 || file_size(e->fd, &st, &size) < 0 ||
                                size > (uint64_t)e->offset))) {
                t->cp__pad = MORE_YES; /* (a failing fstat fails the element later) */
                break;
            }
        }
    }
    return t->cp__pad == MORE_YES;
}

/* A UDP socket keeps what was sent with MSG_MORE (or SPLICE_F_MORE) as the start of one
 * datagram (the kernel's cork) until a send without it ends the datagram. A transmit that
 * fails, is cancelled or times out after corking bytes must not leave them there: the
 * socket's next send would end that datagram, and its peer would receive the two glued
 * together. (UDP_CORK off would send them.) Linux discards a UDP socket's corked datagram
 * when an append to it fails (udp_sendmsg, udpv6_sendmsg: udp_flush_pending_frames after
 * ip_append_data fails): an append of 65535 bytes, the most one send may ask for, always
 * does (-EMSGSIZE: no datagram holds that much and its headers; checked before a byte is
 * read). With nothing corked the send fails the same way and sends nothing. (A socket
 * that asked for local error reports, IP_RECVERR / IPV6_RECVERR, gets one for it.) Only
 * UDP (and UDP-Lite): other datagram sockets do not cork (AF_UNIX), or could send the
 * 65535 bytes (raw sockets). Failure and cancel paths only: it asks the socket's type and
 * protocol. Returns whether h is a datagram socket (SOCK_DGRAM), which has no sending side
 * to shut down. */
static bool udp_discard_corked(cp_handle *h)
{
    int type = 0, proto = 0;
    socklen_t len = sizeof(type);
    if (getsockopt(h->fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_DGRAM)
        return false;
    len = sizeof(proto);
    if (getsockopt(h->fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) < 0 ||
        (proto != IPPROTO_UDP && proto != IPPROTO_UDPLITE))
        return true;
    /* Real, readable bytes (zeros), though the kernel refuses them unread. */
    static const char filler[1024];
    struct iovec iov[64];
    for (size_t i = 0; i < 64; i++)
        iov[i] = (struct iovec){.iov_base = (void *)(uintptr_t)filler, .iov_len = sizeof(filler)};
    iov[63].iov_len--; /* 65535 in all: 65536 would be refused before the append */
    struct msghdr m = {.msg_iov = iov, .msg_iovlen = 64};
    while (sendmsg(h->fd, &m, MSG_MORE | MSG_DONTWAIT | MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
    return true;
}

/* A transmit that fails after part of it went out (a file that ended before its range did
 * or could not be read; a socket error; no room to wait for writability) leaves a hole in
 * the stream: whatever is queued behind it would follow the hole and be taken by the peer
 * for the missing bytes. The socket's sending side is shut down, so that those sends fail
 * (-EPIPE) instead. With CP__TF_STREAM (the server's connections) the connection is reset
 * instead, also when it fails before its first byte: the bytes sent ahead of it expect it.
 * A datagram socket has no stream to cut, but a UDP one may hold the datagram the transmit
 * had begun: that is discarded (udp_discard_corked). The socket layer calls this when the
 * transmit finishes with an error, whichever step failed; a cancelled (or timed-out) one
 * goes to cp__transmit_cancelled instead. */
void cp__transmit_failed(cp_handle *h, cp_transmit_op *t)
{
    if (t->cp__flags & CP__TF_STREAM) {
        cp__stream_cut(h);
    } else if (t->sent > 0) {
        /* (A datagram socket's type is asked once: cp__shutdown_sending would ask again
         * only to skip it.) */
        if (!(h->cp__flags & CP__H_DGRAM) || !udp_discard_corked(h))
            cp__shutdown_sending(h);
    }
}

/* A transmit cancelled (or timed out, or cut by the socket's close) after part of it went
 * out. On a stream socket.h leaves the next step to the caller: the socket stays as it
 * is (cp_socket_cancel). On UDP the caller has no such choice: the datagram the transmit
 * had begun sits corked, and the socket's next send, whoever makes it, would end it, the
 * peer receiving the two glued together as one corrupted datagram. So it is discarded, as
 * after a failure. (A datagram already ended is whole; the discard then sends nothing.) */
void cp__transmit_cancelled(cp_handle *h, cp_transmit_op *t)
{
    if (!(t->cp__flags & CP__TF_STREAM) && t->sent > 0 && (h->cp__flags & CP__H_DGRAM))
        udp_discard_corked(h);
}

/* Send buf[0..len) as the transmit's next bytes, with MSG_MORE if more follows them:
 * 0 with the bytes the kernel took counted, CP__AGAIN when it took none for want of room,
 * or a negative errno. */
static int send_piece(cp_handle *h, cp_transmit_op *t, const void *buf, size_t len, bool more)
{
    ssize_t n;
    while ((n = send(h->fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT | (more ? MSG_MORE : 0))) < 0 &&
           errno == EINTR)
        ;
    if (n < 0)
        return errno == EAGAIN ? CP__AGAIN : -errno;
    t->cp__off += (uint64_t)n;
    t->sent += (uint64_t)n;
    return 0;
}

/* A file range on a datagram socket: the backends' legs end the datagram there.
 * sendfile(2) (epoll's leg, and io_uring's when its pipes run out) sends a range's last
 * piece without "more to follow", whatever comes after it: {header, file, trailer} on UDP
 * went out as two datagrams on epoll, and as one on io_uring (a splice with
 * SPLICE_F_MORE). Here the range is read and sent a piece at a time, each with MSG_MORE
 * unless it is the transmit's last byte, so that a transmit is one datagram on every
 * backend. (A UDP datagram holds at most 64 KiB: the copy is small. A piece is sent whole
 * or not at all; only a datagram's first one can find no room.) Sends one piece; returns
 * as send_piece(). */
static int dgram_file_piece(cp_handle *h, cp_transmit_op *t, int fd, int64_t offset, uint64_t len,
                            bool more_after)
{
    char piece[4096];
    size_t want = len < sizeof(piece) ? (size_t)len : sizeof(piece);
    ssize_t got;
    while ((got = pread(fd, piece, want, (off_t)offset)) < 0 && errno == EINTR)
        ;
    if (got < 0)
        return -errno;
    if (got == 0)
        return -EIO; /* the file ended before the range did */
    return send_piece(h, t, piece, (size_t)got, (uint64_t)got < len || more_after);
}

int cp__transmit_run(cp_handle *h, cp_transmit_op *t)
{
    const cp__backend *be = h->cp__port->be;
    for (;;) {
        if (t->cp__idx == t->cp__n) {
            if ((t->cp__flags & CP_TF_DISCONNECT) && !(t->op.cp__flags & CP__OPF_DISCONNECTED)) {
                if (shutdown(h->fd, SHUT_WR) < 0)
                    return -errno;
                t->op.cp__flags |= CP__OPF_DISCONNECTED;
            }
            return 0;
        }
        const cp_packet *e = &t->cp__elems[t->cp__idx];
        int r = element_end(t, e);
        if (r < 0)
            return r;
        if (t->cp__off >= t->cp__end && t->cp__inpipe == 0) {
            t->cp__idx++;
            t->cp__off = 0;
            t->cp__end = END_UNKNOWN;
            t->cp__pad = MORE_UNKNOWN;
            continue;
        }
        /* Fail point transmit_full_midway (a CPORT_INJECT build): the socket takes nothing
         * more once the transmit's first bytes went out, so that the transmit waits for
         * writability, again and again, with a UDP datagram begun and corked, until a test
         * cancels it or its timeout expires. (A real UDP socket never makes a transmit wait
         * there: an append to a corked datagram that finds no room fails, -ENOBUFS.) */
        if (t->sent > 0 && CP__INJECT_FAIL("transmit_full_midway"))
            return CP__AGAIN;
        bool more = more_follows(t);
        uint64_t left = t->cp__end - t->cp__off;
        if (e->fd < 0)
            r = send_piece(h, t, (const char *)e->buf + t->cp__off,
                           left > INT_MAX ? INT_MAX : (size_t)left, more);
        else if (h->cp__flags & CP__H_DGRAM)
            r = dgram_file_piece(h, t, e->fd, e->offset + (int64_t)t->cp__off, left, more);
        else
            r = be->file_leg(h, t, e->fd, e->offset + (int64_t)t->cp__off, left);
        if (r != 0)
            return r;
    }
}

/* cp_socket_transmit_packets with flags already checked (CP__TF_STREAM allowed). */
static int transmit_start(cp_socket *s, cp_transmit_op *t, const cp_packet *elems, unsigned n,
                          unsigned flags)
{
    if (!t || !elems || n == 0)
        return -EINVAL;
    for (unsigned i = 0; i < n; i++) {
        if (elems[i].fd < 0 && elems[i].len && !elems[i].buf)
            return -EINVAL;
        if (elems[i].fd >= 0 &&
            (elems[i].offset < 0 || elems[i].len > (uint64_t)(INT64_MAX - elems[i].offset)))
            return -EINVAL;
    }
    if (cp__op_misaligned(t))
        return -EINVAL;
    if (cp__op_in_use(&t->op))
        return -EBUSY;
    t->cp__elems = elems;
    t->cp__n = n;
    t->cp__flags = flags;
    t->cp__idx = 0;
    t->cp__off = 0;
    t->cp__end = END_UNKNOWN;
    t->cp__inpipe = 0;
    t->cp__pipe = -1;
    t->cp__pad = MORE_UNKNOWN;
    t->sent = 0;
    t->op.u.buf = NULL;
    t->op.cp__len = 0;
    t->op.cp__flags = 0;
    return cp__submit(s, &t->op, CP_OP_TRANSMIT, 1);
}

int cp_socket_transmit_packets(cp_socket *s, cp_transmit_op *t, const cp_packet *elems, unsigned n,
                               unsigned flags)
{
    if (flags & ~CP_TF_DISCONNECT)
        return -EINVAL;
    return transmit_start(s, t, elems, n, flags);
}

static int transmit_file(cp_socket *s, cp_transmit_op *t, int fd, int64_t offset, uint64_t len,
                         const void *head, size_t head_len, const void *tail, size_t tail_len,
                         unsigned flags)
{
    if (!t || fd < 0 || offset < 0 || (head_len && !head) || (tail_len && !tail))
        return -EINVAL;
    if (cp__op_misaligned(t))
        return -EINVAL;
    if (cp__op_in_use(&t->op))
        return -EBUSY;
    unsigned n = 0;
    if (head_len)
        t->cp__inline[n++] = (cp_packet){.buf = head, .len = head_len, .fd = -1};
    t->cp__inline[n++] = (cp_packet){.len = len, .fd = fd, .offset = offset};
    if (tail_len)
        t->cp__inline[n++] = (cp_packet){.buf = tail, .len = tail_len, .fd = -1};
    return transmit_start(s, t, t->cp__inline, n, flags);
}

int cp_socket_transmit_file(cp_socket *s, cp_transmit_op *t, int fd, int64_t offset, uint64_t len,
                            const void *head, size_t head_len, const void *tail, size_t tail_len,
                            unsigned flags)
{
    if (flags & ~CP_TF_DISCONNECT)
        return -EINVAL;
    return transmit_file(s, t, fd, offset, len, head, head_len, tail, tail_len, flags);
}

int cp__transmit_file_stream(cp_socket *s, cp_transmit_op *t, int fd, int64_t offset, uint64_t len,
                             const void *head, size_t head_len)
{
    return transmit_file(s, t, fd, offset, len, head, head_len, NULL, 0, CP__TF_STREAM);
}
