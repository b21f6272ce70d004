/* Error names and descriptions for the negative errno values cport returns. */
#include "cport/common.h"

#include <errno.h>
#include <limits.h>
#include <string.h>

/* The errno values cport returns and its callers meet most (every one the headers name:
 * test api.every_error_the_headers_name_has_a_name); with glibc 2.32 or later every other
 * errno it knows has its name and text too, elsewhere they are "UNKNOWN" and "Unknown
 * error". */
/* clang-format off */
#define CP__ERRNO_MAP(X)                                                                         \
    X(EPERM) X(ENOENT) X(EINTR) X(EIO) X(EBADF) X(EAGAIN) X(ENOMEM) X(EACCES) X(EFAULT)        \
    X(EBUSY) X(EEXIST) X(EINVAL) X(ENFILE) X(EMFILE) X(ENOSPC) X(EPIPE) X(ERANGE) X(ENOSYS)     \
    X(ENOTSOCK) X(EMSGSIZE) X(EOPNOTSUPP) X(EADDRINUSE) X(EADDRNOTAVAIL) X(ENETUNREACH)         \
    X(ECONNABORTED) X(ECONNRESET) X(ENOBUFS) X(EISCONN) X(ENOTCONN) X(ESHUTDOWN) X(ETIMEDOUT)   \
    X(ECONNREFUSED) X(EHOSTUNREACH) X(EALREADY) X(EINPROGRESS) X(ECANCELED) X(EOVERFLOW)        \
    X(EPROTO) X(EBADMSG) X(E2BIG) X(ENAMETOOLONG) X(ELOOP) X(EISDIR) X(ENOTDIR) X(ESPIPE)       \
    X(EDEADLK)
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
#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 32)
    {
        /* Any other errno a system call passed through (EDQUOT from a file write, ...):
         * glibc's static table. */
        const char *name = strerrorname_np(err);
        if (name)
            return name;
    }
#endif
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
         * strings in glibc (strerrordesc_np() hands them out for every errno it knows), and
         * unknown ones get one fixed text here. */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 32)
    const char *desc = strerrordesc_np(err);
    return desc ? desc : "Unknown error";
#else
    if (strcmp(cp_err_name(err), "UNKNOWN") == 0)
        return "Unknown error";
    return strerror(err);
#endif
}

const char *cp_version(void)
{
#define CP__STR2(x) #x
#define CP__STR(x)  CP__STR2(x)
    return CP__STR(CPORT_VERSION_MAJOR) "." CP__STR(CPORT_VERSION_MINOR) "." CP__STR(
        CPORT_VERSION_PATCH);
}
