/* Delay points for race tests.
 *
 * A race that needs one thread to stop inside a window of a few instructions cannot be
 * tested by load alone. In a build configured with -DCPORT_INJECT=ON (the ASan+UBSan build
 * of scripts/test.sh; never a release), CP__INJECT_DELAY("point") sleeps for the
 * microseconds that the environment variable CPORT_INJECT_DELAY names for that point
 * ("point:usec", or a comma-separated list of them), so that a test can hold one thread
 * in the window while the others act, and the sanitizer or the test's counts catch what
 * goes wrong. Elsewhere the macro is nothing. The environment is read at each pass: no
 * state is kept. Tests set it before they start any thread.
 *
 * "point:usec@fd" is a gate instead of a fixed hold: the thread waits until the
 * descriptor fd (a pipe's read end the test owns) is readable, at most usec. A fixed hold
 * assumes the test's other threads get where they must within it, which a stalled thread
 * (a loaded machine, a sanitizer) may not; with a gate the test opens it (writes a byte)
 * once it has seen what it needs, and usec only bounds a test that never does. The byte
 * is not read here: the gate stays open for every later pass until the test reads it.
 *
 * Failure points work the same way for paths that only a resource shortage reaches
 * (realloc failing, a full submission queue): CP__INJECT_FAIL("point") is true at every
 * pass while CPORT_INJECT_FAIL names that point (a comma-separated list of names), and
 * false in every other build.
 */
#ifndef CPORT_INJECT_H
#define CPORT_INJECT_H

#ifdef CPORT_INJECT
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline void cp__inject_delay(const char *point)
{
    const char *e = getenv("CPORT_INJECT_DELAY");
    size_t n = strlen(point);
    /* A comma-separated list: a race between two threads may need both held. */
    while (e && *e && (strncmp(e, point, n) != 0 || e[n] != ':')) {
        e = strchr(e, ',');
        if (e)
            e++;
    }
    if (!e || !*e)
        return;
    char *end;
    long us = strtol(e + n + 1, &end, 10);
    if (us <= 0)
        return;
    if (*end == '@') {
        struct pollfd g = {.fd = (int)strtol(end + 1, NULL, 10), .events = POLLIN};
        while (poll(&g, 1, (int)(us / 1000)) < 0 && errno == EINTR)
            ;
        return;
    }
    struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static inline int cp__inject_fail(const char *point)
{
    const char *e = getenv("CPORT_INJECT_FAIL");
    size_t n = strlen(point);
    while (e && *e) {
        if (strncmp(e, point, n) == 0 && (e[n] == ',' || e[n] == '\0'))
            return 1;
        e = strchr(e, ',');
        if (e)
            e++;
    }
    return 0;
}
#define CP__INJECT_DELAY(point) cp__inject_delay(point)
#define CP__INJECT_FAIL(point)  cp__inject_fail(point)
#else
#define CP__INJECT_DELAY(point) ((void)0)
#define CP__INJECT_FAIL(point)  0
#endif

#endif
