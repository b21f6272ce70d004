/* cport: common definitions shared by every part of the public API.
 *
 * Conventions used throughout cport:
 *   - Functions that can fail return 0 (or a non-negative count) on success and a
 *     negative errno value (-EINVAL, -ENOMEM, ...) on failure. cp_strerror() names them.
 *   - An operation that fails at submission returns the error at once and never
 *     completes later. An operation that was accepted produces exactly one completion.
 *   - Public names carry the prefix cp_ (macros CP_). Names with cp__ are private:
 *     they appear in headers only because structs are caller-allocated.
 *   - NULL: a pointer argument may be NULL only where the function's comment says what
 *     it does with one (returns -EINVAL, does nothing, ...). Elsewhere, notably in the
 *     getters (cp_port_concurrency, cp_pool_threads, cp_server_listen_port, cp_conn_user,
 *     cp_conn_pending, cp_frame_error, ...) and in the functions that return nothing
 *     (cp_conn_close, cp_conn_ref, cp_frame_reset, ...), it must not be NULL: they have no
 *     way to report it, and do not check.
 */
#ifndef CPORT_COMMON_H
#define CPORT_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Marks the library's exported functions (everything else is hidden in libcport.so). */
#define CP_EXTERN __attribute__((visibility("default")))

#define CPORT_VERSION_MAJOR 0
#define CPORT_VERSION_MINOR 1
#define CPORT_VERSION_PATCH 0

/* Recover a pointer to the enclosing struct from a pointer to one of its members.
 * The usual way to get from a completion's cp_op* back to the caller's per-I/O struct:
 *     struct my_io *io = CP_CONTAINER_OF(c.op, struct my_io, op);
 */
#define CP_CONTAINER_OF(ptr, type, member) ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

/* Return a static, human-readable description of a cport error: err may be a negative
 * errno value (as cport returns them) or a positive one. Never returns NULL. Thread-safe. */
CP_EXTERN const char *cp_strerror(int err);

/* Return the symbolic name of a negative (or positive) errno value, e.g. "ECANCELED";
 * "UNKNOWN" for values it does not know (with glibc 2.32+, only values that are no errno;
 * 0 gives "0" there). Thread-safe. */
CP_EXTERN const char *cp_err_name(int err);

/* Return the library version as "major.minor.patch". */
CP_EXTERN const char *cp_version(void);

#ifdef __cplusplus
}
#endif
#endif
