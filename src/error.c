/* Error names and descriptions for the negative errno values cport returns. */
#include "cport/common.h"

#include <errno.h>
#include <limits.h>
#include <string.h>

/* The errno values cport and its callers meet most; others still get strerror() text. */
/* clang-format off */
#define CP__ERRNO_MAP(X)                                                                         \
    X(EPERM) X(ENOENT) X(EINTR) X(EIO) X(EBADF) X(EAGAIN) X(ENOMEM) X(EACCES) X(EFAULT)        \
    X(EBUSY) X(EEXIST) X(EINVAL) X(ENFILE) X(EMFILE) X(ENOSPC) X(EPIPE) X(ERANGE) X(ENOSYS)     \
    X(ENOTSOCK) X(EMSGSIZE) X(EOPNOTSUPP) X(EADDRINUSE) X(EADDRNOTAVAIL) X(ENETUNREACH)         \
    X(ECONNABORTED) X(ECONNRESET) X(ENOBUFS) X(EISCONN) X(ENOTCONN) X(ESHUTDOWN) X(ETIMEDOUT)   \
    X(ECONNREFUSED) X(EHOSTUNREACH) X(EALREADY) X(EINPROGRESS) X(ECANCELED) X(EOVERFLOW)        \
    X(EPROTO) X(EBADMSG) X(E2BIG) X(ENAMETOOLONG) X(ELOOP) X(EISDIR) X(ENOTDIR) X(ESPIPE)
/* clang-format on */

const char *cp_err_name(int err)
{
    if (err == INT_MIN)
        return "UNKNOWN"; /* not negatable, and no errno anyway */
    if (err < 0)
        err = -err;
    switch (err) {
#define CP__NAME_CASE(e)                                                                           \
    case e:                                                                                        \
        return #e;
        CP__ERRNO_MAP(CP__NAME_CASE)
#undef CP__NAME_CASE
    default:
        return "UNKNOWN";
    }
}

const char *cp_strerror(int err)
{
    if (err == INT_MIN)
        return "Unknown error"; /* not negatable, and no errno anyway */
    if (err < 0)
        err = -err;
    if (err == 0)
        return "Success";
    /* strerror() may use a shared buffer for unknown values; known values map to static
     * strings in glibc, and unknown ones get one fixed text here. */
    if (strcmp(cp_err_name(err), "UNKNOWN") == 0)
        return "Unknown error";
    return strerror(err);
}

const char *cp_version(void)
{
#define CP__STR2(x) #x
#define CP__STR(x)  CP__STR2(x)
    return CP__STR(CPORT_VERSION_MAJOR) "." CP__STR(CPORT_VERSION_MINOR) "." CP__STR(
        CPORT_VERSION_PATCH);
}
