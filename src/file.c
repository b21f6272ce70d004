/* File reads and writes at offsets through the port (I7; see cport/file.h). The
 * operations reuse the socket layer's state machine: a file handle is a cp_handle with
 * CP__H_FILE, whose operations start at once instead of queueing behind each other. */
#include "handle.h"

#include "cport/file.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

int cp_file_associate(cp_file *f, cp_port *port, int fd, uintptr_t key)
{
    struct stat st;
    if (!f || !port || fd < 0 || ((uintptr_t)f & (_Alignof(cp_file) - 1)) != 0)
        return -EINVAL;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
        return -EINVAL; /* sockets, pipes and the like belong to cp_socket_associate */
    memset(f, 0, sizeof(*f));
    f->fd = fd;
    f->key = key;
    f->cp__port = port;
    f->cp__flags = CP__H_FILE;
    f->cp__stash_head = CP__STASH_END;
    cp__lock_init(&f->cp__lock);
    cp__port_handle_added(port);
    return 0;
}

static int file_op(cp_file *f, cp_file_op *fop, uint8_t opcode, const void *buf, size_t len,
                   uint64_t offset)
{
    if (!f || !fop || !buf || len == 0 || len > UINT32_MAX || offset > (uint64_t)INT64_MAX)
        return -EINVAL;
    /* The flags are the handle lock's: a close finishing on another thread (an epoll
     * file job) writes them. */
    if (!f->cp__port)
        return -EINVAL;
    cp__h_lock(f);
    bool is_file = (f->cp__flags & CP__H_FILE) != 0;
    cp__h_unlock(f);
    if (!is_file)
        return -EINVAL;
    if (cp__op_misaligned(fop))
        return -EINVAL;
    if (cp__op_in_use(&fop->op))
        return -EBUSY;
    fop->op.u.buf = (void *)(uintptr_t)buf;
    fop->op.cp__len = (uint32_t)len;
    fop->op.cp__flags = 0;
    fop->offset = offset;
    return cp__submit(f, &fop->op, opcode, 0);
}

int cp_file_read(cp_file *f, cp_file_op *op, void *buf, size_t len, uint64_t offset)
{
    return file_op(f, op, CP_OP_READ, buf, len, offset);
}

int cp_file_write(cp_file *f, cp_file_op *op, const void *buf, size_t len, uint64_t offset)
{
    return file_op(f, op, CP_OP_WRITE, buf, len, offset);
}

int cp_file_close(cp_file *f, cp_op *op)
{
    return cp_socket_close(f, op);
}
