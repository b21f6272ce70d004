/* Length-prefixed framing: see cport/frame.h.
 *
 * State encoding (16 bytes: a pointer and two 32-bit words). cp__st holds the phase in its
 * top two bits and a count in the rest; the meaning of cp__len and cp__buf depends on the
 * phase:
 *   HDR    between frames or inside a header: count = header bytes seen (0..3),
 *          cp__len = those bytes accumulated big-endian, cp__buf = NULL.
 *   BODY   header complete, payload incomplete: cp__len = payload length (> 0),
 *          count = payload bytes assembled (0..len-1); cp__buf = NULL while count == 0
 *          (the buffer is allocated only when payload bytes have to be kept), else a
 *          buffer of cp__len bytes.
 *   DONE   an assembled frame was delivered by cp_frame_next() and its buffer (cp__buf,
 *          cp__len bytes) is still the decoder's; the next call releases it.
 *   ERR    sticky error: count = the positive errno, cp__len = the announced length.
 * An all-zero decoder is HDR with nothing seen.
 */
#include "cport/frame.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

_Static_assert(sizeof(cp_frame_decoder) <= 16, "the per-connection decoder must stay tiny");

enum { CP__FR_HDR = 0, CP__FR_BODY = 1, CP__FR_DONE = 2, CP__FR_ERR = 3 };

#define CP__FR_SHIFT 30
#define CP__FR_COUNT 0x3fffffffu

_Static_assert(CP_FRAME_MAX_LIMIT <= CP__FR_COUNT, "payload counts must fit the count bits");

static inline unsigned cp__fr_phase(const cp_frame_decoder *d)
{
    return d->cp__st >> CP__FR_SHIFT;
}

static inline uint32_t cp__fr_count(const cp_frame_decoder *d)
{
    return d->cp__st & CP__FR_COUNT;
}

static inline void cp__fr_set(cp_frame_decoder *d, unsigned phase, uint32_t count)
{
    d->cp__st = ((uint32_t)phase << CP__FR_SHIFT) | count;
}

/* The effective limit of a configuration, or 0 if the configuration is invalid. */
static uint32_t cp__fr_limit(const cp_frame_config *cfg)
{
    if (!cfg || cfg->max_frame > CP_FRAME_MAX_LIMIT || (cfg->flags & ~CP_FRAME_REJECT_EMPTY) ||
        (cfg->alloc == NULL) != (cfg->free == NULL))
        return 0;
    return cfg->max_frame ? cfg->max_frame : CP_FRAME_DEFAULT_MAX;
}

static void *cp__fr_alloc(const cp_frame_config *cfg, size_t size)
{
    return cfg->alloc ? cfg->alloc(cfg->alloc_ctx, size) : malloc(size);
}

static void cp__fr_free(const cp_frame_config *cfg, void *p, size_t size)
{
    if (cfg->free)
        cfg->free(cfg->alloc_ctx, p, size);
    else
        free(p);
}

/* Release whatever buffer the decoder holds and go back to the initial state. */
static void cp__fr_clear(cp_frame_decoder *d, const cp_frame_config *cfg)
{
    if (d->cp__buf)
        cp__fr_free(cfg, d->cp__buf, d->cp__len);
    d->cp__buf = NULL;
    d->cp__len = 0;
    d->cp__st = 0;
}

static int cp__fr_fail(cp_frame_decoder *d, int err, uint32_t announced)
{
    d->cp__buf = NULL; /* only called from HDR, which holds no buffer */
    d->cp__len = announced;
    cp__fr_set(d, CP__FR_ERR, (uint32_t)err);
    return -err;
}

int cp_frame_config_check(const cp_frame_config *cfg)
{
    return cp__fr_limit(cfg) ? 0 : -EINVAL;
}

void cp_frame_decoder_init(cp_frame_decoder *d)
{
    d->cp__buf = NULL;
    d->cp__len = 0;
    d->cp__st = 0;
}

int cp_frame_next(cp_frame_decoder *d, const cp_frame_config *cfg, const void **data, size_t *len,
                  cp_frame *frame)
{
    uint32_t limit = cp__fr_limit(cfg);
    if (!limit || !d || !data || !len || !frame || (*len && !*data))
        return -EINVAL;

    switch (cp__fr_phase(d)) {
    case CP__FR_ERR:
        return -(int)cp__fr_count(d);
    case CP__FR_DONE:
        cp__fr_clear(d, cfg);
        break;
    default:
        break;
    }

    const uint8_t *p = *data;
    size_t n = *len;
    int ret = 0;

    if (cp__fr_phase(d) == CP__FR_HDR) {
        uint32_t seen = cp__fr_count(d), hdr;
        if (seen == 0 && n >= CP_FRAME_HEADER_SIZE) {
            hdr = cp_frame_header_len(p);
            p += CP_FRAME_HEADER_SIZE;
            n -= CP_FRAME_HEADER_SIZE;
        } else {
            hdr = d->cp__len;
            while (seen < CP_FRAME_HEADER_SIZE && n > 0) {
                hdr = (hdr << 8) | *p++;
                n--;
                seen++;
            }
            if (seen < CP_FRAME_HEADER_SIZE) {
                d->cp__len = hdr;
                cp__fr_set(d, CP__FR_HDR, seen);
                goto out;
            }
        }
        if (hdr > limit) {
            ret = cp__fr_fail(d, EMSGSIZE, hdr);
            goto out;
        }
        if (hdr == 0) {
            if (cfg->flags & CP_FRAME_REJECT_EMPTY) {
                ret = cp__fr_fail(d, EBADMSG, 0);
                goto out;
            }
            d->cp__len = 0;
            cp__fr_set(d, CP__FR_HDR, 0);
            frame->data = p; /* one past the header's last byte: valid, never read */
            frame->len = 0;
            ret = 1;
            goto out;
        }
        d->cp__len = hdr;
        cp__fr_set(d, CP__FR_BODY, 0);
    }

    /* BODY: the header is complete and cp__len payload bytes are expected. */
    uint32_t flen = d->cp__len, have = cp__fr_count(d);
    if (have == 0) {
        if (n >= flen) { /* the whole payload is in this chunk: zero-copy */
            frame->data = p;
            frame->len = flen;
            p += flen;
            n -= flen;
            d->cp__len = 0;
            cp__fr_set(d, CP__FR_HDR, 0);
            ret = 1;
            goto out;
        }
        if (n == 0)
            goto out;
        d->cp__buf = cp__fr_alloc(cfg, flen);
        if (!d->cp__buf) {
            ret = -ENOMEM;
            goto out;
        }
    }
    if (n == 0)
        goto out;
    uint32_t take = flen - have;
    if (n < take)
        take = (uint32_t)n;
    memcpy(d->cp__buf + have, p, take);
    p += take;
    n -= take;
    have += take;
    if (have < flen) {
        cp__fr_set(d, CP__FR_BODY, have);
        goto out;
    }
    frame->data = d->cp__buf;
    frame->len = flen;
    cp__fr_set(d, CP__FR_DONE, 0);
    ret = 1;

out:
    *data = p;
    *len = n;
    return ret;
}

int cp_frame_feed(cp_frame_decoder *d, const cp_frame_config *cfg, const void *data, size_t len,
                  cp_frame_fn fn, void *user, size_t *consumed)
{
    const void *p = data;
    size_t n = len;
    int r;

    if (!fn) {
        r = -EINVAL;
    } else {
        for (;;) {
            cp_frame f;
            r = cp_frame_next(d, cfg, &p, &n, &f);
            if (r <= 0)
                break;
            int stop = fn(d, &f, user);
            if (cp__fr_phase(d) == CP__FR_DONE) /* an assembled frame not taken */
                cp__fr_clear(d, cfg);
            if (stop) {
                r = CP_FRAME_STOPPED;
                break;
            }
        }
    }
    if (consumed)
        *consumed = len - n;
    return r;
}

uint8_t *cp_frame_take(cp_frame_decoder *d, const cp_frame *frame)
{
    if (!d || !frame || cp__fr_phase(d) != CP__FR_DONE || frame->data != d->cp__buf)
        return NULL;
    uint8_t *buf = d->cp__buf;
    d->cp__buf = NULL;
    d->cp__len = 0;
    d->cp__st = 0;
    return buf;
}

void cp_frame_buffer_free(const cp_frame_config *cfg, void *buf, size_t size)
{
    if (buf)
        cp__fr_free(cfg, buf, size);
}

void cp_frame_reset(cp_frame_decoder *d, const cp_frame_config *cfg)
{
    cp__fr_clear(d, cfg);
}

void cp_frame_decoder_free(cp_frame_decoder *d, const cp_frame_config *cfg)
{
    cp__fr_clear(d, cfg);
}

int cp_frame_error(const cp_frame_decoder *d)
{
    return cp__fr_phase(d) == CP__FR_ERR ? -(int)cp__fr_count(d) : 0;
}

size_t cp_frame_partial(const cp_frame_decoder *d)
{
    switch (cp__fr_phase(d)) {
    case CP__FR_HDR:
        return cp__fr_count(d);
    case CP__FR_BODY:
        return CP_FRAME_HEADER_SIZE + (size_t)cp__fr_count(d);
    default:
        return 0;
    }
}

size_t cp_frame_held(const cp_frame_decoder *d)
{
    return d->cp__buf ? d->cp__len : 0;
}

const char *cp_frame_strerror(int err)
{
    if (err == INT_MIN)
        return "Unknown error"; /* not negatable, and no errno anyway */
    switch (err < 0 ? -err : err) {
    case 0:
        return "no error";
    case EMSGSIZE:
        return "frame header announces more bytes than the maximum frame size";
    case EBADMSG:
        return "zero-length frame received but not allowed";
    case ENOMEM:
        return "out of memory for a frame that straddles receives";
    case EINVAL:
        return "invalid argument or frame configuration";
    default:
        return cp_strerror(err);
    }
}

int cp_frame_describe(const cp_frame_decoder *d, const cp_frame_config *cfg, char *buf, size_t size)
{
    uint32_t count = cp__fr_count(d), len = d->cp__len;
    switch (cp__fr_phase(d)) {
    case CP__FR_ERR:
        if (count == EMSGSIZE) {
            uint32_t limit = cfg ? cp__fr_limit(cfg) : 0;
            if (limit)
                return snprintf(buf, size,
                                "frame header announces %" PRIu32 " bytes (0x%08" PRIx32
                                "), over the %" PRIu32 "-byte limit",
                                len, len, limit);
            return snprintf(buf, size,
                            "frame header announces %" PRIu32 " bytes (0x%08" PRIx32
                            "), over the limit",
                            len, len);
        }
        if (count == EBADMSG)
            return snprintf(buf, size, "frame header announces an empty frame, not allowed");
        return snprintf(buf, size, "framing error: %s", cp_frame_strerror(-(int)count));
    case CP__FR_HDR:
        if (count)
            return snprintf(buf, size, "incomplete frame header: %" PRIu32 " of 4 bytes", count);
        return snprintf(buf, size, "between frames");
    case CP__FR_BODY:
        return snprintf(buf, size, "incomplete frame: %" PRIu32 " of %" PRIu32 " payload bytes",
                        count, len);
    default:
        return snprintf(buf, size, "between frames (a delivered %" PRIu32 "-byte frame held)", len);
    }
}

void cp_frame_header(uint8_t out[4], uint32_t len)
{
    out[0] = (uint8_t)(len >> 24);
    out[1] = (uint8_t)(len >> 16);
    out[2] = (uint8_t)(len >> 8);
    out[3] = (uint8_t)len;
}

uint32_t cp_frame_header_len(const uint8_t in[4])
{
    return ((uint32_t)in[0] << 24) | ((uint32_t)in[1] << 16) | ((uint32_t)in[2] << 8) |
           (uint32_t)in[3];
}

int cp_frame_encode_iov(struct iovec iov[2], uint8_t hdr[4], const void *payload, size_t len)
{
    if (!iov || !hdr || (len && !payload))
        return -EINVAL;
    if (len > CP_FRAME_MAX_LIMIT)
        return -EMSGSIZE;
    cp_frame_header(hdr, (uint32_t)len);
    iov[0].iov_base = hdr;
    iov[0].iov_len = CP_FRAME_HEADER_SIZE;
    if (len == 0)
        return 1;
    iov[1].iov_base = (void *)(uintptr_t)payload;
    iov[1].iov_len = len;
    return 2;
}

int64_t cp_frame_encode(void *out, size_t size, const void *payload, size_t len)
{
    if (!out || (len && !payload))
        return -EINVAL;
    if (len > CP_FRAME_MAX_LIMIT)
        return -EMSGSIZE;
    if (size < CP_FRAME_HEADER_SIZE + len)
        return -ENOBUFS;
    cp_frame_header(out, (uint32_t)len);
    if (len)
        memcpy((uint8_t *)out + CP_FRAME_HEADER_SIZE, payload, len);
    return (int64_t)(CP_FRAME_HEADER_SIZE + len);
}
