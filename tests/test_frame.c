/* Tests of length-prefixed framing (src/frame.c, cport/frame.h): every split point of a
 * stream (headers split at every byte), many frames per chunk, the size limit at header
 * time, zero-length frames per flag, sticky errors and reset, release of partial buffers,
 * allocation counts (none unless a payload straddles receives), stopping mid-chunk and
 * resuming, cp_frame_take(), -ENOMEM recovery, the encoder, a sweep of every frame size
 * around the limit (and bad headers behind good frames) at every split point, and a
 * randomized differential test against the source list of frames. */
/* test-backends: none */
#include "harness.h"

#include "cport/frame.h"

#include <errno.h>
#include <limits.h>
#include <string.h>

/* ---- a counting allocator ------------------------------------------------------------ */

/* Each block carries its size in front so that free() can check the size it is given. */
typedef struct counter {
    long allocs, frees;
    size_t live;     /* bytes currently allocated */
    size_t largest;  /* largest request seen */
    long fail_after; /* > 0: the fail_after-th allocation from now fails (one-shot) */
    bool fail_all;   /* every allocation fails */
} counter;

enum { HDR_PAD = 16 };

static void *count_alloc(void *ctx, size_t size)
{
    counter *c = ctx;
    CHECK(size > 0);
    if (c->fail_all)
        return NULL;
    if (c->fail_after > 0 && --c->fail_after == 0)
        return NULL;
    uint8_t *p = malloc(size + HDR_PAD);
    CHECK(p != NULL);
    memcpy(p, &size, sizeof size);
    c->allocs++;
    c->live += size;
    if (size > c->largest)
        c->largest = size;
    return p + HDR_PAD;
}

static void count_free(void *ctx, void *ptr, size_t size)
{
    counter *c = ctx;
    CHECK(ptr != NULL);
    uint8_t *p = (uint8_t *)ptr - HDR_PAD;
    size_t stored;
    memcpy(&stored, p, sizeof stored);
    CHECK_EQ(stored, size);
    CHECK(c->live >= size);
    c->frees++;
    c->live -= size;
    free(p);
}

static cp_frame_config counting_cfg(counter *c, uint32_t max_frame, uint32_t flags)
{
    memset(c, 0, sizeof *c);
    cp_frame_config cfg = {.max_frame = max_frame,
                           .flags = flags,
                           .alloc = count_alloc,
                           .free = count_free,
                           .alloc_ctx = c};
    return cfg;
}

/* ---- streams ------------------------------------------------------------------------- */

static uint64_t rnd_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static uint64_t rnd_below(uint64_t *s, uint64_t n)
{
    return n ? rnd_next(s) % n : 0;
}

/* A byte stream of frames: payload i starts at off[i] and is lens[i] bytes. */
typedef struct stream {
    uint8_t *bytes;
    size_t size;
    size_t n;
    size_t *off;
    uint32_t *lens;
} stream;

/* Build the stream of the given payload lengths; payload bytes are pseudo-random so that a
 * frame delivered from the wrong place never compares equal. */
static stream make_stream(const uint32_t *lens, size_t n, uint64_t seed)
{
    stream s = {.n = n};
    for (size_t i = 0; i < n; i++)
        s.size += 4 + (size_t)lens[i];
    s.bytes = malloc(s.size ? s.size : 1);
    s.off = malloc((n ? n : 1) * sizeof *s.off);
    s.lens = malloc((n ? n : 1) * sizeof *s.lens);
    CHECK(s.bytes && s.off && s.lens);
    uint64_t r = seed | 1;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        cp_frame_header(s.bytes + at, lens[i]);
        at += 4;
        s.off[i] = at;
        s.lens[i] = lens[i];
        for (uint32_t k = 0; k < lens[i]; k++)
            s.bytes[at + k] = (uint8_t)rnd_next(&r);
        at += lens[i];
    }
    CHECK_EQ(at, s.size);
    return s;
}

static void free_stream(stream *s)
{
    free(s->bytes);
    free(s->off);
    free(s->lens);
}

/* Frames whose payload has a chunk boundary strictly inside it (those that must be
 * assembled). bounds[] are the stream offsets where chunks end. */
static long straddlers(const stream *s, const size_t *bounds, size_t nb)
{
    long n = 0;
    for (size_t i = 0; i < s->n; i++) {
        for (size_t b = 0; b < nb; b++) {
            if (bounds[b] > s->off[i] && bounds[b] < s->off[i] + s->lens[i]) {
                n++;
                break;
            }
        }
    }
    return n;
}

/* ---- a checking consumer --------------------------------------------------------------- */

typedef struct checker {
    const stream *s;
    size_t next;          /* index of the next expected frame */
    const uint8_t *chunk; /* the chunk being fed (a private copy) */
    size_t chunk_len;
    size_t chunk_pos;  /* stream offset of the chunk's first byte */
    long zero_copy;    /* frames delivered pointing into the chunk */
    long assembled;    /* frames delivered from an assembly buffer */
    long stop_at;      /* feed callback: stop after the frame with this index (-1: never) */
    bool take;         /* feed callback: take assembled buffers */
    uint8_t **taken;   /* taken buffers (to be freed by the test) */
    size_t *taken_len; /* and their sizes */
    size_t ntaken;
    uint64_t rnd;                  /* for random stops/takes when stop_prob/take_prob are set */
    unsigned stop_prob, take_prob; /* percent */
} checker;

/* Check one delivered frame against the source list, including where it points. */
static void check_frame(checker *c, const cp_frame *f)
{
    const stream *s = c->s;
    CHECK(c->next < s->n);
    size_t i = c->next++;
    CHECK_EQ(f->len, s->lens[i]);
    CHECK(f->data != NULL);
    if (f->len == 0)
        return;
    CHECK(memcmp(f->data, s->bytes + s->off[i], f->len) == 0);
    if (s->off[i] >= c->chunk_pos) {
        /* the payload starts in this chunk: it must be delivered in place */
        CHECK(f->data == c->chunk + (s->off[i] - c->chunk_pos));
        CHECK(s->off[i] + f->len <= c->chunk_pos + c->chunk_len);
        c->zero_copy++;
    } else {
        CHECK(c->chunk == NULL || f->data + f->len <= c->chunk ||
              f->data >= c->chunk + c->chunk_len);
        c->assembled++;
    }
}

static void remember_taken(checker *c, uint8_t *buf, size_t len)
{
    c->taken = realloc(c->taken, (c->ntaken + 1) * sizeof *c->taken);
    c->taken_len = realloc(c->taken_len, (c->ntaken + 1) * sizeof *c->taken_len);
    CHECK(c->taken && c->taken_len);
    c->taken[c->ntaken] = buf;
    c->taken_len[c->ntaken] = len;
    c->ntaken++;
}

static void free_taken(checker *c, const cp_frame_config *cfg)
{
    for (size_t i = 0; i < c->ntaken; i++) {
        /* a taken buffer still holds its frame and is writable */
        CHECK(memcmp(c->taken[i], c->taken[i], c->taken_len[i]) == 0);
        memset(c->taken[i], 0xa5, c->taken_len[i]);
        cp_frame_buffer_free(cfg, c->taken[i], c->taken_len[i]);
    }
    free(c->taken);
    free(c->taken_len);
    c->taken = NULL;
    c->taken_len = NULL;
    c->ntaken = 0;
}

static int on_frame(cp_frame_decoder *d, const cp_frame *f, void *user)
{
    checker *c = user;
    size_t idx = c->next;
    check_frame(c, f);
    bool take = c->take || (c->take_prob && rnd_below(&c->rnd, 100) < c->take_prob);
    if (take) {
        uint8_t *buf = cp_frame_take(d, f);
        bool assembled = f->len > 0 && c->s->off[idx] < c->chunk_pos;
        CHECK_EQ(buf != NULL, assembled);
        if (buf) {
            CHECK(buf == f->data);
            CHECK_EQ(cp_frame_held(d), 0);
            CHECK(cp_frame_take(d, f) == NULL); /* only once */
            remember_taken(c, buf, f->len);
        }
    }
    if (c->stop_at >= 0 && (size_t)c->stop_at == idx)
        return 1;
    if (c->stop_prob && rnd_below(&c->rnd, 100) < c->stop_prob)
        return 1;
    return 0;
}

static checker make_checker(const stream *s)
{
    checker c = {.s = s, .stop_at = -1, .rnd = 0x9e3779b97f4a7c15ull};
    return c;
}

/* The bytes of the incomplete frame at stream offset pos (0 at a frame boundary), and the
 * memory the decoder must hold there (the payload size when pos is strictly inside a
 * payload and the payload began before the chunk that ended at pos... i.e. whenever pos is
 * strictly inside a payload). */
static void expected_at(const stream *s, size_t pos, size_t *partial, size_t *held)
{
    *partial = 0;
    *held = 0;
    for (size_t i = 0; i < s->n; i++) {
        size_t start = s->off[i] - 4, end = s->off[i] + s->lens[i];
        if (pos > start && pos < end) {
            *partial = pos - start;
            if (pos > s->off[i])
                *held = s->lens[i];
            return;
        }
    }
}

enum mode { VIA_FEED, VIA_NEXT };

/* Feed s to d in the chunks ending at bounds[0..nb-1] (ascending, the last == s->size) and
 * check every frame, the partial/held counters after each chunk, and that nothing is left
 * over. Each chunk is a private heap copy of exactly its size (so a read outside it is an
 * ASan/valgrind error). */
static void run_chunks(cp_frame_decoder *d, const cp_frame_config *cfg, const stream *s,
                       const size_t *bounds, size_t nb, enum mode mode, checker *c)
{
    size_t pos = 0;
    for (size_t b = 0; b < nb; b++) {
        size_t len = bounds[b] - pos;
        uint8_t *chunk = len ? malloc(len) : NULL;
        if (len) {
            CHECK(chunk != NULL);
            memcpy(chunk, s->bytes + pos, len);
        }
        c->chunk = chunk;
        c->chunk_len = len;
        c->chunk_pos = pos;
        if (mode == VIA_FEED) {
            size_t used = 12345;
            CHECK_EQ(cp_frame_feed(d, cfg, chunk, len, on_frame, c, &used), 0);
            CHECK_EQ(used, len);
        } else {
            const void *p = chunk;
            size_t n = len;
            cp_frame f;
            int r;
            while ((r = cp_frame_next(d, cfg, &p, &n, &f)) == 1)
                check_frame(c, &f);
            CHECK_EQ(r, 0);
            CHECK_EQ(n, 0);
        }
        pos = bounds[b];
        size_t partial, held;
        expected_at(s, pos, &partial, &held);
        CHECK_EQ(cp_frame_partial(d), partial);
        CHECK_EQ(cp_frame_held(d), held);
        CHECK_EQ(cp_frame_error(d), 0);
        free(chunk);
        c->chunk = NULL;
    }
    CHECK_EQ(pos, s->size);
    CHECK_EQ(c->next, s->n);
}

/* ---- tests ----------------------------------------------------------------------------- */

TEST(state_is_tiny)
{
    CHECK(sizeof(cp_frame_decoder) <= 16);
    /* a zero-filled decoder and a zero-filled configuration work as they are */
    cp_frame_decoder d;
    memset(&d, 0, sizeof d);
    cp_frame_config cfg;
    memset(&cfg, 0, sizeof cfg);
    CHECK_EQ(cp_frame_config_check(&cfg), 0);
    uint8_t buf[4 + 3];
    CHECK_EQ(cp_frame_encode(buf, sizeof buf, "abc", 3), 7);
    const void *p = buf;
    size_t n = sizeof buf;
    cp_frame f;
    CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 1);
    CHECK_EQ(f.len, 3);
    CHECK(memcmp(f.data, "abc", 3) == 0);
    CHECK(f.data == buf + 4);
    CHECK_EQ(n, 0);
    CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 0);
    /* init == zero */
    cp_frame_decoder z;
    memset(&z, 0xff, sizeof z);
    cp_frame_decoder_init(&z);
    CHECK(memcmp(&z, &d, sizeof d) == 0);
}

/* Frames of assorted sizes (empty ones too), split into three chunks at every pair of
 * points (which includes every single split point and every header byte), decoded through
 * both APIs: the same frames, in place when possible, one allocation per straddling payload
 * and none otherwise, and exact partial/held counters after each chunk. */
TEST(every_split_point)
{
    static const uint32_t lens[] = {5, 0, 1, 3, 4, 7, 2, 16, 0, 0, 33, 1, 6};
    const size_t nf = sizeof lens / sizeof lens[0];
    stream s = make_stream(lens, nf, 42);
    for (int mode = VIA_FEED; mode <= VIA_NEXT; mode++) {
        long combos = 0;
        for (size_t i = 0; i <= s.size; i++) {
            for (size_t j = i; j <= s.size; j++) {
                counter cnt;
                cp_frame_config cfg = counting_cfg(&cnt, 64, 0);
                cp_frame_decoder d = {0};
                checker c = make_checker(&s);
                size_t bounds[3] = {i, j, s.size};
                run_chunks(&d, &cfg, &s, bounds, 3, (enum mode)mode, &c);
                long expect = straddlers(&s, bounds, 3);
                CHECK_EQ(cnt.allocs, expect);
                CHECK_EQ(cnt.frees, expect);
                CHECK_EQ(cnt.live, 0);
                CHECK_EQ(c.assembled, expect);
                CHECK_EQ(c.zero_copy + c.assembled, 10); /* the non-empty frames */
                CHECK(cnt.largest <= 33);
                combos++;
            }
        }
        CHECK_EQ(combos, (long)((s.size + 1) * (s.size + 2) / 2));
    }
    free_stream(&s);
}

/* One byte at a time: every header split at every byte, every payload assembled. */
TEST(one_byte_at_a_time)
{
    static const uint32_t lens[] = {1, 0, 2, 300, 0, 4, 5, 1};
    const size_t nf = sizeof lens / sizeof lens[0];
    stream s = make_stream(lens, nf, 7);
    size_t *bounds = malloc(s.size * sizeof *bounds);
    CHECK(bounds != NULL);
    for (size_t i = 0; i < s.size; i++)
        bounds[i] = i + 1;
    for (int mode = VIA_FEED; mode <= VIA_NEXT; mode++) {
        counter cnt;
        cp_frame_config cfg = counting_cfg(&cnt, 300, 0);
        cp_frame_decoder d;
        cp_frame_decoder_init(&d);
        checker c = make_checker(&s);
        run_chunks(&d, &cfg, &s, bounds, s.size, (enum mode)mode, &c);
        /* payloads of 1 byte fit in a 1-byte chunk (in place); longer ones are assembled */
        CHECK_EQ(c.zero_copy, 2);
        CHECK_EQ(c.assembled, 4);
        CHECK_EQ(cnt.allocs, 4);
        CHECK_EQ(cnt.live, 0);
        CHECK_EQ(cnt.largest, 300);
    }
    free(bounds);
    free_stream(&s);
}

/* Thousands of frames in one chunk: all delivered in place by one call, no allocation. Then
 * the same stream in 4 KiB chunks: only the payloads crossing a 4 KiB boundary allocate. */
TEST(many_frames_per_chunk)
{
    enum { N = 5000 };
    uint32_t *lens = malloc(N * sizeof *lens);
    CHECK(lens != NULL);
    uint64_t r = 3;
    for (size_t i = 0; i < N; i++)
        lens[i] = (uint32_t)rnd_below(&r, 24);
    stream s = make_stream(lens, N, 9);
    for (int mode = VIA_FEED; mode <= VIA_NEXT; mode++) {
        counter cnt;
        cp_frame_config cfg = counting_cfg(&cnt, 100, 0);
        cp_frame_decoder d = {0};
        checker c = make_checker(&s);
        size_t one = s.size;
        run_chunks(&d, &cfg, &s, &one, 1, (enum mode)mode, &c);
        CHECK_EQ(c.next, N);
        CHECK_EQ(cnt.allocs, 0);
        CHECK_EQ(c.assembled, 0);

        size_t nb = (s.size + 4095) / 4096;
        size_t *bounds = malloc(nb * sizeof *bounds);
        CHECK(bounds != NULL);
        for (size_t i = 0; i < nb; i++)
            bounds[i] = (i + 1) * 4096 < s.size ? (i + 1) * 4096 : s.size;
        checker c2 = make_checker(&s);
        run_chunks(&d, &cfg, &s, bounds, nb, (enum mode)mode, &c2);
        long expect = straddlers(&s, bounds, nb);
        CHECK(expect > 0);
        CHECK_EQ(cnt.allocs, expect);
        CHECK_EQ(c2.assembled, expect);
        CHECK_EQ(cnt.live, 0);
        free(bounds);
    }
    free_stream(&s);
    free(lens);
}

/* Every frame size around the limit at every split point, for several limits (1, 2, 7,
 * 64) and both zero-length policies: frames of max-2 .. max bytes (and 0 where allowed)
 * are decoded in place or assembled exactly as their chunking requires, through both APIs
 * and with every pair of split points. Then a header announcing one byte over the limit
 * (and 0xffffffff; a zero length where rejected), behind good frames and followed by
 * payload-looking bytes, split at every single point: every good frame before it is
 * delivered once, the error comes exactly when the header's 4th byte is fed, with exactly
 * the stream up to that byte consumed, nothing held after it, and it stays sticky. */
static void sweep_bad(uint32_t max, uint32_t flags, uint32_t announced, enum mode mode)
{
    int want = announced == 0 ? -EBADMSG : -EMSGSIZE;
    uint32_t big = max < 100 ? max : 100; /* (at the hard cap: small frames before it) */
    uint32_t good[] = {big, big > 1 ? big - 1 : 1, 1, big};
    stream s = make_stream(good, 4, max * 7 + announced);
    size_t bad_at = s.size, total = s.size + 4 + 9;
    uint8_t *all = malloc(total);
    CHECK(all != NULL);
    memcpy(all, s.bytes, s.size);
    cp_frame_header(all + bad_at, announced);
    memset(all + bad_at + 4, 0x5a, 9);
    for (size_t k = 0; k <= total; k++) {
        counter cnt;
        cp_frame_config cfg = counting_cfg(&cnt, max, flags);
        cp_frame_decoder d = {0};
        checker c = make_checker(&s);
        size_t pos = 0, consumed = 0;
        int errors = 0;
        size_t bounds[2] = {k, total};
        for (int b = 0; b < 2; b++) {
            size_t len = bounds[b] - pos;
            uint8_t *chunk = malloc(len ? len : 1);
            CHECK(chunk != NULL);
            memcpy(chunk, all + pos, len);
            c.chunk = chunk;
            c.chunk_len = len;
            c.chunk_pos = pos;
            size_t used;
            int r;
            if (mode == VIA_FEED) {
                used = 12345;
                r = cp_frame_feed(&d, &cfg, chunk, len, on_frame, &c, &used);
            } else {
                const void *p = chunk;
                size_t n = len;
                cp_frame f;
                while ((r = cp_frame_next(&d, &cfg, &p, &n, &f)) == 1)
                    check_frame(&c, &f);
                used = len - n;
                CHECK(p == chunk + used);
            }
            free(chunk);
            c.chunk = NULL;
            consumed += used;
            bool reaches = bounds[b] >= bad_at + 4; /* this chunk holds the 4th header byte */
            if (errors) {
                CHECK_EQ(r, want); /* sticky: nothing more consumed */
                CHECK_EQ(used, 0);
            } else if (reaches) {
                CHECK_EQ(r, want);
                CHECK_EQ(consumed, bad_at + 4);
                errors++;
            } else {
                CHECK_EQ(r, 0);
                CHECK_EQ(used, len);
                size_t in_hdr = bounds[b] > bad_at ? bounds[b] - bad_at : 0;
                if (in_hdr) /* only part of the bad header: not an error yet */
                    CHECK_EQ(cp_frame_partial(&d), in_hdr);
            }
            pos = bounds[b];
        }
        CHECK_EQ(errors, 1);
        CHECK_EQ(c.next, 4); /* every good frame, once */
        CHECK_EQ(cp_frame_error(&d), want);
        CHECK_EQ(cp_frame_partial(&d), 0);
        CHECK_EQ(cp_frame_held(&d), 0);
        CHECK_EQ(cnt.live, 0); /* the good straddlers' buffers were released */
        CHECK_EQ(cnt.allocs, cnt.frees);
        char text[160];
        int tl = cp_frame_describe(&d, &cfg, text, sizeof text);
        CHECK(tl > 0 && (size_t)tl < sizeof text);
        if (want == -EMSGSIZE) {
            char num[32];
            snprintf(num, sizeof num, "announces %u bytes", (unsigned)announced);
            CHECK(strstr(text, num) != NULL);
        }
        cp_frame_reset(&d, &cfg);
        CHECK_EQ(cp_frame_error(&d), 0);
        checker c2 = make_checker(&s);
        size_t one = s.size;
        run_chunks(&d, &cfg, &s, &one, 1, mode, &c2); /* decodes afresh after the reset */
        CHECK_EQ(c2.next, 4);
    }
    free(all);
    free_stream(&s);
}

TEST(sizes_around_the_limit_at_every_split_point)
{
    static const uint32_t maxes[] = {1, 2, 7, 64};
    long runs = 0;
    for (size_t m = 0; m < sizeof maxes / sizeof maxes[0]; m++) {
        uint32_t max = maxes[m];
        for (uint32_t flags = 0; flags <= CP_FRAME_REJECT_EMPTY; flags += CP_FRAME_REJECT_EMPTY) {
            /* the good frames: max-2 .. max (those >= 1), empty ones where allowed */
            uint32_t lens[8];
            size_t nf = 0;
            for (uint32_t l = max > 2 ? max - 2 : 1; l <= max; l++)
                lens[nf++] = l;
            if (!flags)
                lens[nf++] = 0;
            lens[nf++] = max;
            lens[nf++] = 1;
            stream s = make_stream(lens, nf, max + flags);
            long nonempty = 0;
            for (size_t i = 0; i < nf; i++)
                nonempty += lens[i] > 0;
            for (int mode = VIA_FEED; mode <= VIA_NEXT; mode++) {
                for (size_t i = 0; i <= s.size; i++) {
                    for (size_t j = i; j <= s.size; j++) {
                        counter cnt;
                        cp_frame_config cfg = counting_cfg(&cnt, max, flags);
                        cp_frame_decoder d = {0};
                        checker c = make_checker(&s);
                        size_t bounds[3] = {i, j, s.size};
                        run_chunks(&d, &cfg, &s, bounds, 3, (enum mode)mode, &c);
                        long expect = straddlers(&s, bounds, 3);
                        CHECK_EQ(c.next, nf);
                        CHECK_EQ(cnt.allocs, expect);
                        CHECK_EQ(cnt.live, 0);
                        CHECK_EQ(c.assembled, expect);
                        CHECK_EQ(c.zero_copy + c.assembled, nonempty);
                        CHECK(cnt.largest <= max);
                        runs++;
                    }
                }
                sweep_bad(max, flags, max + 1, (enum mode)mode);
                sweep_bad(max, flags, 0xffffffffu, (enum mode)mode);
                sweep_bad(max, flags, CP_FRAME_MAX_LIMIT + 1, (enum mode)mode);
                if (flags)
                    sweep_bad(max, flags, 0, (enum mode)mode);
            }
            free_stream(&s);
        }
    }
    CHECK(runs > 0);
    /* At the hard cap: one byte over it is refused at every split of its header, and so is
     * every length from there up to 0xffffffff's neighbourhood (no wrap in the check). */
    static const uint32_t over[] = {CP_FRAME_MAX_LIMIT + 1,
                                    CP_FRAME_MAX_LIMIT + 2,
                                    0x7fffffffu,
                                    0x80000000u,
                                    0xfffffffbu,
                                    0xfffffffcu,
                                    0xfffffffeu,
                                    0xffffffffu};
    for (size_t k = 0; k < sizeof over / sizeof over[0]; k++)
        for (int mode = VIA_FEED; mode <= VIA_NEXT; mode++)
            sweep_bad(CP_FRAME_MAX_LIMIT, 0, over[k], (enum mode)mode);
}

/* Header of max+1 bytes (and larger): -EMSGSIZE once the 4th header byte is fed, whether
 * the header arrives whole or byte by byte, with nothing allocated or buffered, and only the
 * header consumed. Exactly max bytes is accepted, in place and assembled. */
TEST(max_size_boundary)
{
    enum { MAX = 1000 };
    static const uint32_t ok_lens[] = {MAX, 0, MAX};
    stream s = make_stream(ok_lens, 3, 11);
    {
        counter cnt;
        cp_frame_config cfg = counting_cfg(&cnt, MAX, 0);
        cp_frame_decoder d = {0};
        checker c = make_checker(&s);
        size_t bounds[] = {s.size};
        run_chunks(&d, &cfg, &s, bounds, 1, VIA_FEED, &c);
        CHECK_EQ(cnt.allocs, 0);
        checker c2 = make_checker(&s);
        size_t split[] = {500, 1500, s.size};
        run_chunks(&d, &cfg, &s, split, 3, VIA_FEED, &c2);
        CHECK_EQ(cnt.allocs, 2);
        CHECK_EQ(cnt.largest, MAX);
        CHECK_EQ(cnt.live, 0);
    }
    free_stream(&s);

    static const uint32_t bad[] = {MAX + 1,    MAX + 2,     0x10000,    CP_FRAME_MAX_LIMIT,
                                   0x7fffffff, 0x80000000u, 0xffffffffu};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        /* whole: a good frame, then the bad header followed by payload-looking bytes */
        uint8_t chunk[4 + 2 + 4 + 64];
        memset(chunk, 0x5a, sizeof chunk);
        cp_frame_header(chunk, 2);
        cp_frame_header(chunk + 6, bad[k]);
        counter cnt;
        cp_frame_config cfg = counting_cfg(&cnt, MAX, 0);
        cp_frame_decoder d = {0};
        uint32_t one = 2;
        stream s1 = make_stream(&one, 1, 1);
        memcpy(chunk, s1.bytes, 6);
        checker c = make_checker(&s1);
        c.chunk = chunk;
        c.chunk_len = sizeof chunk;
        size_t used = 0;
        CHECK_EQ(cp_frame_feed(&d, &cfg, chunk, sizeof chunk, on_frame, &c, &used), -EMSGSIZE);
        CHECK_EQ(c.next, 1);   /* the good frame before it was delivered */
        CHECK_EQ(used, 6 + 4); /* ... and exactly the bad header consumed */
        CHECK_EQ(cp_frame_held(&d), 0);
        CHECK_EQ(cp_frame_partial(&d), 0);
        CHECK_EQ(cp_frame_error(&d), -EMSGSIZE);
        CHECK_EQ(cnt.allocs, 0);
        char text[160];
        int tl = cp_frame_describe(&d, &cfg, text, sizeof text);
        CHECK(tl > 0 && (size_t)tl < sizeof text);
        char num[32];
        snprintf(num, sizeof num, "%u bytes", (unsigned)bad[k]);
        CHECK(strstr(text, num) != NULL);
        CHECK(strstr(text, "1000-byte limit") != NULL);
        free_stream(&s1);

        /* byte by byte through cp_frame_next(): the first three bytes are accepted */
        cp_frame_decoder d2 = {0};
        uint8_t hdr[4];
        cp_frame_header(hdr, bad[k]);
        for (int b = 0; b < 4; b++) {
            const void *p = hdr + b;
            size_t n = 1;
            cp_frame f;
            int r = cp_frame_next(&d2, &cfg, &p, &n, &f);
            CHECK_EQ(r, b < 3 ? 0 : -EMSGSIZE);
            CHECK_EQ(n, 0);
            CHECK_EQ(cp_frame_partial(&d2), b < 3 ? b + 1 : 0);
        }
        CHECK_EQ(cp_frame_held(&d2), 0);
        CHECK_EQ(cnt.allocs, 0);
    }
}

/* The limit's extremes: the default (max_frame == 0 means 1 MiB) and the hard cap, which a
 * configuration cannot exceed. The largest legal frame is decoded both in place and
 * assembled (a 64 MiB allocation, made only when payload bytes straddle). */
TEST(limit_defaults_and_hard_cap)
{
    cp_frame_config def = {0};
    uint8_t hdr[4];
    cp_frame f;
    for (int k = 0; k < 2; k++) {
        cp_frame_decoder d = {0};
        cp_frame_header(hdr, CP_FRAME_DEFAULT_MAX + (uint32_t)k);
        const void *p = hdr;
        size_t n = 4;
        CHECK_EQ(cp_frame_next(&d, &def, &p, &n, &f), k ? -EMSGSIZE : 0);
        CHECK_EQ(cp_frame_partial(&d), k ? 0 : 4);
        cp_frame_decoder_free(&d, &def);
    }
    CHECK_EQ(CP_FRAME_DEFAULT_MAX, 1024 * 1024);
    CHECK_EQ(CP_FRAME_MAX_LIMIT, 64 * 1024 * 1024 - 1);

    cp_frame_config over = {.max_frame = CP_FRAME_MAX_LIMIT + 1};
    CHECK_EQ(cp_frame_config_check(&over), -EINVAL);

    counter cnt;
    cp_frame_config cap = counting_cfg(&cnt, CP_FRAME_MAX_LIMIT, 0);
    CHECK_EQ(cp_frame_config_check(&cap), 0);
    cp_frame_decoder d = {0};
    cp_frame_header(hdr, CP_FRAME_MAX_LIMIT + 1u);
    const void *p = hdr;
    size_t n = 4;
    CHECK_EQ(cp_frame_next(&d, &cap, &p, &n, &f), -EMSGSIZE);
    cp_frame_reset(&d, &cap);

    size_t total = 4 + (size_t)CP_FRAME_MAX_LIMIT;
    uint8_t *big = malloc(total);
    CHECK(big != NULL);
    cp_frame_header(big, CP_FRAME_MAX_LIMIT);
    for (size_t i = 4; i < total; i++)
        big[i] = (uint8_t)(i * 31);
    /* in place */
    p = big;
    n = total;
    CHECK_EQ(cp_frame_next(&d, &cap, &p, &n, &f), 1);
    CHECK(f.data == big + 4);
    CHECK_EQ(f.len, CP_FRAME_MAX_LIMIT);
    CHECK_EQ(cnt.allocs, 0);
    /* header alone: nothing allocated yet; then the payload in two halves */
    p = big;
    n = 4;
    CHECK_EQ(cp_frame_next(&d, &cap, &p, &n, &f), 0);
    CHECK_EQ(cnt.allocs, 0);
    CHECK_EQ(cp_frame_held(&d), 0);
    size_t half = total / 2;
    p = big + 4;
    n = half - 4;
    CHECK_EQ(cp_frame_next(&d, &cap, &p, &n, &f), 0);
    CHECK_EQ(cnt.allocs, 1);
    CHECK_EQ(cp_frame_held(&d), CP_FRAME_MAX_LIMIT);
    p = big + half;
    n = total - half;
    CHECK_EQ(cp_frame_next(&d, &cap, &p, &n, &f), 1);
    CHECK_EQ(f.len, CP_FRAME_MAX_LIMIT);
    CHECK(memcmp(f.data, big + 4, f.len) == 0);
    CHECK_EQ(cp_frame_next(&d, &cap, &p, &n, &f), 0); /* releases it */
    CHECK_EQ(cnt.frees, 1);
    CHECK_EQ(cnt.live, 0);
    free(big);
}

/* Zero-length frames: delivered by default (whether the header is whole or split), a sticky
 * -EBADMSG with CP_FRAME_REJECT_EMPTY. */
TEST(zero_length_frames)
{
    static const uint32_t lens[] = {0, 3, 0, 0, 2, 0};
    stream s = make_stream(lens, 6, 5);
    cp_frame_config def = {0};
    CHECK_EQ(def.flags & CP_FRAME_REJECT_EMPTY, 0);
    for (size_t cut = 0; cut <= s.size; cut++) {
        cp_frame_decoder d = {0};
        checker c = make_checker(&s);
        size_t bounds[] = {cut, s.size};
        run_chunks(&d, &def, &s, bounds, 2, VIA_FEED, &c);
        CHECK_EQ(c.next, 6);
    }

    counter cnt;
    cp_frame_config rej = counting_cfg(&cnt, 100, CP_FRAME_REJECT_EMPTY);
    /* 3-byte frame then an empty one: the first is delivered, then -EBADMSG */
    static const uint32_t lens2[] = {3, 0, 2};
    stream s2 = make_stream(lens2, 3, 6);
    for (size_t cut = 0; cut <= s2.size; cut++) {
        cp_frame_decoder d = {0};
        checker c = make_checker(&s2);
        c.chunk = s2.bytes;
        c.chunk_len = cut;
        size_t used;
        int r = cp_frame_feed(&d, &rej, s2.bytes, cut, on_frame, &c, &used);
        if (cut < 11) { /* 7 bytes of the first frame + 4 of the empty one's header */
            CHECK_EQ(r, 0);
            CHECK_EQ(used, cut);
            c.chunk = s2.bytes + cut;
            c.chunk_len = s2.size - cut;
            c.chunk_pos = cut;
            r = cp_frame_feed(&d, &rej, s2.bytes + cut, s2.size - cut, on_frame, &c, &used);
            CHECK_EQ(used, 11 - cut);
        } else {
            CHECK_EQ(used, 11);
        }
        CHECK_EQ(r, -EBADMSG);
        CHECK_EQ(c.next, 1);
        CHECK_EQ(cp_frame_error(&d), -EBADMSG);
        CHECK_EQ(cp_frame_held(&d), 0);
        char text[100];
        cp_frame_describe(&d, &rej, text, sizeof text);
        CHECK(strstr(text, "empty") != NULL);
        /* still refused */
        CHECK_EQ(cp_frame_feed(&d, &rej, s2.bytes + 11, s2.size - 11, on_frame, &c, &used),
                 -EBADMSG);
        CHECK_EQ(used, 0);
        cp_frame_decoder_free(&d, &rej);
    }
    CHECK_EQ(cnt.live, 0);
    free_stream(&s);
    free_stream(&s2);
}

/* After an error the decoder refuses all input (both APIs, any length, also empty) without
 * consuming or calling back, until cp_frame_reset(); then it decodes a fresh stream. */
TEST(error_is_sticky_until_reset)
{
    counter cnt;
    cp_frame_config cfg = counting_cfg(&cnt, 16, 0);
    cp_frame_decoder d = {0};
    uint8_t bad[4];
    cp_frame_header(bad, 17);
    size_t used = 99;
    CHECK_EQ(cp_frame_feed(&d, &cfg, bad, 4, on_frame, NULL, &used), -EMSGSIZE);
    CHECK_EQ(used, 4);

    static const uint32_t lens[] = {3, 16, 0};
    stream s = make_stream(lens, 3, 8);
    checker c = make_checker(&s);
    for (int k = 0; k < 3; k++) {
        CHECK_EQ(cp_frame_feed(&d, &cfg, s.bytes, s.size, on_frame, &c, &used), -EMSGSIZE);
        CHECK_EQ(used, 0);
        CHECK_EQ(cp_frame_feed(&d, &cfg, NULL, 0, on_frame, &c, &used), -EMSGSIZE);
        const void *p = s.bytes;
        size_t n = s.size;
        cp_frame f;
        CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), -EMSGSIZE);
        CHECK(p == s.bytes);
        CHECK_EQ(n, s.size);
        CHECK_EQ(c.next, 0);
    }
    CHECK_EQ(cnt.allocs, 0);
    CHECK_EQ(cp_frame_error(&d), -EMSGSIZE);

    cp_frame_reset(&d, &cfg);
    CHECK_EQ(cp_frame_error(&d), 0);
    size_t bounds[] = {5, s.size};
    run_chunks(&d, &cfg, &s, bounds, 2, VIA_NEXT, &c);
    CHECK_EQ(cnt.allocs, 1);
    CHECK_EQ(cnt.live, 0);
    free_stream(&s);
}

/* Reset in every state: mid-header, header complete with no payload yet, mid-payload (an
 * assembly buffer, released), after an assembled frame was delivered by cp_frame_next() and
 * not yet released, after an error. Each time a new stream then decodes from scratch. */
TEST(reset_in_every_state)
{
    counter cnt;
    cp_frame_config cfg = counting_cfg(&cnt, 64, 0);
    static const uint32_t lens[] = {10, 20};
    stream s = make_stream(lens, 2, 13);
    static const size_t cuts[] = {2, 4, 9, 16, 18, 30};
    for (size_t k = 0; k < sizeof cuts / sizeof cuts[0] + 1; k++) {
        cp_frame_decoder d = {0};
        const void *p = s.bytes;
        size_t n;
        cp_frame f;
        if (k < sizeof cuts / sizeof cuts[0]) {
            n = cuts[k];
            int r;
            while ((r = cp_frame_next(&d, &cfg, &p, &n, &f)) == 1)
                ;
            CHECK_EQ(r, 0);
            size_t partial, held;
            expected_at(&s, cuts[k], &partial, &held);
            CHECK_EQ(cp_frame_partial(&d), partial);
            CHECK_EQ(cp_frame_held(&d), held);
            CHECK(partial > 0);
        } else {
            /* frame 0 assembled and delivered, still held */
            n = 9;
            CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 0);
            p = s.bytes + 9;
            n = s.size - 9;
            CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 1);
            CHECK_EQ(f.len, 10);
            CHECK_EQ(cp_frame_held(&d), 10);
            CHECK_EQ(cp_frame_partial(&d), 0);
        }
        cp_frame_reset(&d, &cfg);
        CHECK_EQ(cnt.live, 0);
        CHECK_EQ(cp_frame_held(&d), 0);
        CHECK_EQ(cp_frame_partial(&d), 0);
        checker c = make_checker(&s);
        size_t bounds[] = {7, s.size};
        run_chunks(&d, &cfg, &s, bounds, 2, VIA_FEED, &c);
        CHECK_EQ(cnt.live, 0);
    }
    CHECK_EQ(cnt.allocs, cnt.frees);
    free_stream(&s);
}

/* cp_frame_decoder_free() releases a partial frame's buffer and a delivered-but-unreleased
 * one; with the default allocator a leak here fails the ASan / valgrind runs. */
TEST(free_releases_partial_buffers)
{
    static const uint32_t lens[] = {1000, 50};
    stream s = make_stream(lens, 2, 17);
    cp_frame_config def = {0};
    cp_frame f;
    for (int k = 0; k < 3; k++) {
        cp_frame_decoder d = {0};
        const void *p = s.bytes;
        size_t n = k == 0 ? 10 : 600;
        CHECK_EQ(cp_frame_next(&d, &def, &p, &n, &f), 0);
        CHECK_EQ(cp_frame_held(&d), 1000);
        if (k == 2) { /* complete it: delivered, held until the next call */
            p = s.bytes + 600;
            n = 1004 - 600 + 2; /* the rest of the frame and 2 bytes of the next header */
            CHECK_EQ(cp_frame_next(&d, &def, &p, &n, &f), 1);
            CHECK_EQ(n, 2);
            CHECK_EQ(cp_frame_held(&d), 1000);
        }
        cp_frame_decoder_free(&d, &def);
        CHECK_EQ(cp_frame_held(&d), 0);
        cp_frame_decoder_free(&d, &def); /* twice is harmless */
    }
    /* and with the counting allocator: each buffer freed exactly once, with its size */
    counter cnt;
    cp_frame_config cfg = counting_cfg(&cnt, 2000, 0);
    cp_frame_decoder d = {0};
    CHECK_EQ(cp_frame_feed(&d, &cfg, s.bytes, 500, on_frame, NULL, NULL), 0);
    CHECK_EQ(cnt.allocs, 1);
    cp_frame_decoder_free(&d, &cfg);
    CHECK_EQ(cnt.frees, 1);
    CHECK_EQ(cnt.live, 0);
    free_stream(&s);
}

/* Steady state without straddling costs no allocation at all, whatever the chunking of
 * headers; each straddling payload costs exactly one allocation of exactly its size,
 * released right after delivery. */
TEST(allocation_counts)
{
    enum { N = 200 };
    uint32_t lens[N];
    uint64_t r = 77;
    for (size_t i = 0; i < N; i++)
        lens[i] = (uint32_t)rnd_below(&r, 500);
    stream s = make_stream(lens, N, 21);
    counter cnt;
    cp_frame_config cfg = counting_cfg(&cnt, 500, 0);
    cp_frame_decoder d = {0};

    /* chunks at frame boundaries, at header ends, and inside headers: nothing allocated */
    size_t *bounds = malloc((3 * N + 1) * sizeof *bounds);
    CHECK(bounds != NULL);
    size_t nb = 0;
    for (size_t i = 0; i < N; i++) {
        size_t start = s.off[i] - 4;
        if (start)
            bounds[nb++] = start;
        bounds[nb++] = start + 1 + i % 3; /* inside the header */
        bounds[nb++] = s.off[i];          /* header end */
    }
    bounds[nb++] = s.size;
    checker c = make_checker(&s);
    run_chunks(&d, &cfg, &s, bounds, nb, VIA_FEED, &c);
    CHECK_EQ(cnt.allocs, 0);
    checker c2 = make_checker(&s);
    run_chunks(&d, &cfg, &s, bounds, nb, VIA_NEXT, &c2);
    CHECK_EQ(cnt.allocs, 0);
    CHECK_EQ(c2.zero_copy, c.zero_copy);

    /* now cut every non-empty payload in the middle */
    nb = 0;
    long nonempty = 0;
    for (size_t i = 0; i < N; i++) {
        if (lens[i] >= 2) {
            bounds[nb++] = s.off[i] + lens[i] / 2;
            nonempty++;
        }
    }
    bounds[nb++] = s.size;
    checker c3 = make_checker(&s);
    run_chunks(&d, &cfg, &s, bounds, nb, VIA_FEED, &c3);
    CHECK_EQ(cnt.allocs, nonempty);
    CHECK_EQ(cnt.frees, nonempty);
    CHECK_EQ(c3.assembled, nonempty);
    CHECK_EQ(cnt.live, 0);
    free(bounds);
    free_stream(&s);
}

/* The callback stops after frame k: *consumed ends exactly after that frame, the decoder
 * holds nothing (an assembled frame is released when the callback returns), and feeding the
 * rest later resumes with frame k+1. Also stopping on the chunk's last frame. */
TEST(stop_mid_chunk_and_resume)
{
    static const uint32_t lens[] = {3, 0, 40, 1, 0, 7, 12, 5};
    const size_t nf = sizeof lens / sizeof lens[0];
    stream s = make_stream(lens, nf, 23);
    for (size_t k = 0; k < nf; k++) {
        for (size_t split = 0; split <= s.size; split += 3) {
            counter cnt;
            cp_frame_config cfg = counting_cfg(&cnt, 64, 0);
            cp_frame_decoder d = {0};
            checker c = make_checker(&s);
            c.stop_at = (long)k;
            size_t pos = 0;
            bool stopped = false;
            /* chunk 1: [0, split), chunk 2: [split, size), each fed until used up */
            size_t ends[] = {split, s.size};
            for (int ch = 0; ch < 2; ch++) {
                c.chunk = s.bytes + pos;
                c.chunk_len = ends[ch] - pos;
                c.chunk_pos = pos;
                while (pos < ends[ch]) {
                    size_t used;
                    int r =
                        cp_frame_feed(&d, &cfg, s.bytes + pos, ends[ch] - pos, on_frame, &c, &used);
                    CHECK(r == 0 || r == CP_FRAME_STOPPED);
                    pos += used;
                    if (r == CP_FRAME_STOPPED) {
                        CHECK(!stopped);
                        stopped = true;
                        CHECK_EQ(c.next, k + 1);
                        CHECK_EQ(pos, s.off[k] + lens[k]); /* right after frame k */
                        CHECK_EQ(cp_frame_held(&d), 0);
                        CHECK_EQ(cp_frame_partial(&d), 0);
                    } else {
                        CHECK_EQ(pos, ends[ch]);
                    }
                }
            }
            CHECK(stopped);
            CHECK_EQ(c.next, nf);
            CHECK_EQ(cnt.live, 0);
        }
    }
    /* the iterator form: stop after an assembled frame; it stays valid and held until the
     * next call, which resumes with the rest */
    counter cnt;
    cp_frame_config cfg = counting_cfg(&cnt, 64, 0);
    cp_frame_decoder d = {0};
    const void *p = s.bytes;
    size_t n = 20; /* frame 0 (7 bytes), frame 1 (4), and 9 bytes of frame 2 */
    cp_frame f;
    CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 1);
    CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 1);
    CHECK_EQ(f.len, 0);
    CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 0);
    p = s.bytes + 20;
    n = s.size - 20;
    CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 1);
    CHECK_EQ(f.len, 40);
    CHECK_EQ(cp_frame_held(&d), 40);
    /* pause: the frame stays readable */
    CHECK(memcmp(f.data, s.bytes + s.off[2], 40) == 0);
    const void *rest = p;
    size_t nrest = n;
    CHECK(rest == s.bytes + s.off[2] + 40);
    CHECK_EQ(cp_frame_next(&d, &cfg, &rest, &nrest, &f), 1); /* releases, then frame 3 */
    CHECK_EQ(cp_frame_held(&d), 0);
    CHECK_EQ(cnt.frees, 1);
    CHECK_EQ(f.len, 1);
    cp_frame_decoder_free(&d, &cfg);
    free_stream(&s);
}

/* cp_frame_take(): the caller keeps assembled buffers (released later with
 * cp_frame_buffer_free(), with the right size); zero-copy and empty frames cannot be taken;
 * a stale frame cannot be taken. */
TEST(take_assembled_buffers)
{
    static const uint32_t lens[] = {30, 0, 31, 2, 32};
    stream s = make_stream(lens, 5, 29);
    counter cnt;
    cp_frame_config cfg = counting_cfg(&cnt, 64, 0);
    cp_frame_decoder d = {0};
    checker c = make_checker(&s);
    c.take = true;
    size_t bounds[] = {10, 40, 50, 60, 90, s.size};
    run_chunks(&d, &cfg, &s, bounds, 6, VIA_FEED, &c);
    CHECK_EQ(c.ntaken, 3);
    CHECK_EQ(cnt.allocs, 3);
    CHECK_EQ(cnt.frees, 0);
    CHECK_EQ(cnt.live, 30 + 31 + 32);
    for (size_t i = 0; i < c.ntaken; i++)
        CHECK_EQ(c.taken_len[i], 30 + i);
    free_taken(&c, &cfg);
    CHECK_EQ(cnt.frees, 3);
    CHECK_EQ(cnt.live, 0);

    /* iterator: take after next() returned it; a later frame's take does not see it */
    const void *p = s.bytes;
    size_t n = 20;
    cp_frame f, f0;
    CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 0);
    p = s.bytes + 20;
    n = s.size - 20;
    CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f0), 1);
    uint8_t *own = cp_frame_take(&d, &f0);
    CHECK(own != NULL && own == f0.data);
    CHECK_EQ(cp_frame_held(&d), 0);
    CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 1); /* the empty frame */
    CHECK(cp_frame_take(&d, &f) == NULL);
    CHECK(cp_frame_take(&d, &f0) == NULL);
    CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 1); /* zero-copy frame */
    CHECK_EQ(f.len, 31);
    CHECK(cp_frame_take(&d, &f) == NULL);
    CHECK(memcmp(own, s.bytes + s.off[0], 30) == 0);
    cp_frame_buffer_free(&cfg, own, 30);
    cp_frame_buffer_free(&cfg, NULL, 0);
    cp_frame_decoder_free(&d, &cfg);
    CHECK_EQ(cnt.live, 0);
    CHECK_EQ(cnt.allocs, cnt.frees);
    free_stream(&s);
}

/* A failed allocation: -ENOMEM, not sticky, the frames before it delivered and the header
 * consumed; feeding the unconsumed rest again (allocator healthy) completes the stream. */
TEST(enomem_is_recoverable)
{
    static const uint32_t lens[] = {4, 50, 6};
    stream s = make_stream(lens, 3, 31);
    for (int mode = VIA_FEED; mode <= VIA_NEXT; mode++) {
        counter cnt;
        cp_frame_config cfg = counting_cfg(&cnt, 64, 0);
        cp_frame_decoder d = {0};
        checker c = make_checker(&s);
        c.chunk = s.bytes;
        c.chunk_len = 30;
        cnt.fail_all = true;
        size_t used;
        if (mode == VIA_FEED) {
            CHECK_EQ(cp_frame_feed(&d, &cfg, s.bytes, 30, on_frame, &c, &used), -ENOMEM);
        } else {
            const void *p = s.bytes;
            size_t n = 30;
            cp_frame f;
            CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 1);
            check_frame(&c, &f);
            CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), -ENOMEM);
            used = 30 - n;
        }
        CHECK_EQ(c.next, 1);
        CHECK_EQ(used, 8 + 4); /* frame 0 and frame 1's header */
        CHECK_EQ(cp_frame_error(&d), 0);
        CHECK_EQ(cp_frame_partial(&d), 4);
        CHECK_EQ(cp_frame_held(&d), 0);
        /* retry while still failing: same answer, nothing more consumed */
        CHECK_EQ(cp_frame_feed(&d, &cfg, s.bytes + used, 30 - used, on_frame, &c, &used), -ENOMEM);
        CHECK_EQ(used, 0);
        cnt.fail_all = false;
        c.chunk_pos = 12;
        c.chunk = s.bytes + 12;
        c.chunk_len = 18;
        CHECK_EQ(cp_frame_feed(&d, &cfg, s.bytes + 12, 18, on_frame, &c, &used), 0);
        CHECK_EQ(used, 18);
        c.chunk_pos = 30;
        c.chunk = s.bytes + 30;
        c.chunk_len = s.size - 30;
        CHECK_EQ(cp_frame_feed(&d, &cfg, s.bytes + 30, s.size - 30, on_frame, &c, &used), 0);
        CHECK_EQ(c.next, 3);
        CHECK_EQ(c.assembled, 1);
        CHECK_EQ(cnt.allocs, 1);
        CHECK_EQ(cnt.live, 0);
    }
    free_stream(&s);
}

/* Bad arguments and configurations: -EINVAL, and nothing changes. */
TEST(invalid_arguments)
{
    counter cnt;
    cp_frame_config good = counting_cfg(&cnt, 64, 0);
    cp_frame_config bads[4];
    for (int i = 0; i < 4; i++)
        bads[i] = good;
    bads[0].max_frame = CP_FRAME_MAX_LIMIT + 1;
    bads[1].flags = 0x80;
    bads[2].alloc = NULL;
    bads[3].free = NULL;
    uint8_t chunk[4 + 10 + 4];
    CHECK_EQ(cp_frame_encode(chunk, sizeof chunk, "0123456789", 10), 14);
    cp_frame_header(chunk + 14, 1);
    cp_frame_decoder d = {0};
    /* a partial frame in progress, so that "nothing changes" is visible */
    const void *p = chunk;
    size_t n = 9;
    cp_frame f;
    CHECK_EQ(cp_frame_next(&d, &good, &p, &n, &f), 0);
    cp_frame_decoder before = d;
    for (int i = 0; i < 4; i++) {
        CHECK_EQ(cp_frame_config_check(&bads[i]), -EINVAL);
        p = chunk + 9;
        n = 9;
        CHECK_EQ(cp_frame_next(&d, &bads[i], &p, &n, &f), -EINVAL);
        CHECK(p == chunk + 9);
        CHECK_EQ(n, 9);
        size_t used = 7;
        CHECK_EQ(cp_frame_feed(&d, &bads[i], chunk + 9, 9, on_frame, NULL, &used), -EINVAL);
        CHECK_EQ(used, 0);
        CHECK(memcmp(&d, &before, sizeof d) == 0);
    }
    CHECK_EQ(cp_frame_next(&d, NULL, &p, &n, &f), -EINVAL);
    CHECK_EQ(cp_frame_next(NULL, &good, &p, &n, &f), -EINVAL);
    CHECK_EQ(cp_frame_next(&d, &good, NULL, &n, &f), -EINVAL);
    CHECK_EQ(cp_frame_next(&d, &good, &p, NULL, &f), -EINVAL);
    CHECK_EQ(cp_frame_next(&d, &good, &p, &n, NULL), -EINVAL);
    const void *nul = NULL;
    n = 3;
    CHECK_EQ(cp_frame_next(&d, &good, &nul, &n, &f), -EINVAL);
    n = 0;
    CHECK_EQ(cp_frame_next(&d, &good, &nul, &n, &f), 0); /* empty input is fine */
    CHECK_EQ(cp_frame_feed(&d, &good, chunk + 9, 9, NULL, NULL, NULL), -EINVAL);
    CHECK(memcmp(&d, &before, sizeof d) == 0);
    CHECK_EQ(cp_frame_error(&d), 0);
    /* the decoder is still fine */
    checker c = {.stop_at = -1};
    uint32_t lens[] = {10, 1};
    stream s = make_stream(lens, 2, 1);
    memcpy(s.bytes, chunk, 14); /* same frame 0 as fed so far */
    c.s = &s;
    c.chunk = s.bytes + 9;
    c.chunk_len = s.size - 9;
    c.chunk_pos = 9;
    size_t used;
    CHECK_EQ(cp_frame_feed(&d, &good, s.bytes + 9, s.size - 9, on_frame, &c, &used), 0);
    CHECK_EQ(c.next, 2);
    CHECK_EQ(cnt.live, 0);
    CHECK_EQ(cnt.allocs, 1);
    free_stream(&s);
}

/* The encoder: big-endian header, iovec preparation and contiguous encoding, checked by
 * decoding what they produce. */
TEST(encoder)
{
    uint8_t h[4];
    cp_frame_header(h, 0x01020304u);
    CHECK(h[0] == 1 && h[1] == 2 && h[2] == 3 && h[3] == 4);
    static const uint32_t vals[] = {
        0, 1, 255, 256, 0xffff, 0x10000, 0xffffff, 0x1000000, 0x7fffffff, 0x80000000u, 0xffffffffu};
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        cp_frame_header(h, vals[i]);
        CHECK_EQ(cp_frame_header_len(h), vals[i]);
        CHECK_EQ(h[0], vals[i] >> 24);
        CHECK_EQ(h[3], vals[i] & 0xff);
    }

    struct iovec iov[2];
    uint8_t hdr[4];
    CHECK_EQ(cp_frame_encode_iov(iov, hdr, "hello", 5), 2);
    CHECK(iov[0].iov_base == hdr && iov[0].iov_len == 4);
    CHECK(iov[1].iov_len == 5 && memcmp(iov[1].iov_base, "hello", 5) == 0);
    CHECK_EQ(cp_frame_header_len(hdr), 5);
    iov[1].iov_len = 77;
    CHECK_EQ(cp_frame_encode_iov(iov, hdr, NULL, 0), 1);
    CHECK_EQ(cp_frame_header_len(hdr), 0);
    CHECK_EQ(iov[1].iov_len, 77); /* untouched */
    CHECK_EQ(cp_frame_encode_iov(iov, hdr, "x", (size_t)CP_FRAME_MAX_LIMIT + 1), -EMSGSIZE);
    CHECK_EQ(cp_frame_encode_iov(iov, hdr, NULL, 3), -EINVAL);

    uint8_t out[16];
    CHECK_EQ(cp_frame_encode(out, sizeof out, "0123456789ab", 12), 16);
    CHECK_EQ(cp_frame_encode(out, 15, "0123456789ab", 12), -ENOBUFS);
    CHECK_EQ(cp_frame_encode(out, 3, NULL, 0), -ENOBUFS);
    CHECK_EQ(cp_frame_encode(out, 4, NULL, 0), 4);
    CHECK_EQ(cp_frame_encode(out, 16, NULL, 2), -EINVAL);
    CHECK_EQ(cp_frame_encode(NULL, 16, "a", 1), -EINVAL);
    CHECK_EQ(cp_frame_encode(out, 16, "a", (size_t)CP_FRAME_MAX_LIMIT + 1), -EMSGSIZE);

    /* round trip: encode a few frames into one buffer, decode them */
    uint8_t buf[64];
    size_t at = 0;
    static const char *msgs[] = {"", "a", "bc", "defghijk"};
    for (int i = 0; i < 4; i++) {
        int64_t w = cp_frame_encode(buf + at, sizeof buf - at, msgs[i], strlen(msgs[i]));
        CHECK_EQ(w, 4 + (int64_t)strlen(msgs[i]));
        at += (size_t)w;
    }
    cp_frame_config cfg = {.max_frame = 8};
    cp_frame_decoder d = {0};
    const void *p = buf;
    size_t n = at;
    cp_frame f;
    for (int i = 0; i < 4; i++) {
        CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 1);
        CHECK_EQ(f.len, strlen(msgs[i]));
        CHECK(memcmp(f.data, msgs[i], f.len) == 0);
    }
    CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 0);
}

/* Error descriptions for the log: specific texts, snprintf() semantics. */
/* Any int is a valid argument of cp_frame_strerror(): INT_MIN was negated (signed
 * overflow: UBSan aborts the ASan build). */
TEST(error_text_of_int_min)
{
    CHECK(cp_frame_strerror(INT_MIN) != NULL);
    CHECK(cp_frame_strerror(INT_MAX) != NULL);
    /* The library's own texts too (cport/common.h), under UBSan. */
    CHECK(strcmp(cp_strerror(INT_MIN), "Unknown error") == 0);
    CHECK(strcmp(cp_err_name(INT_MIN), "UNKNOWN") == 0);
    CHECK(strcmp(cp_err_name(-ECONNRESET), "ECONNRESET") == 0);
}

TEST(error_texts)
{
    static const int errs[] = {0, -EMSGSIZE, -EBADMSG, -ENOMEM, -EINVAL, -ECONNRESET, 12345};
    for (size_t i = 0; i < sizeof errs / sizeof errs[0]; i++) {
        const char *t = cp_frame_strerror(errs[i]);
        CHECK(t != NULL && t[0] != '\0');
    }
    CHECK(strstr(cp_frame_strerror(-EMSGSIZE), "maximum frame size") != NULL);
    CHECK(strstr(cp_frame_strerror(EMSGSIZE), "maximum frame size") != NULL);
    CHECK(strstr(cp_frame_strerror(-EBADMSG), "zero-length") != NULL);
    CHECK(strcmp(cp_frame_strerror(-EMSGSIZE), cp_frame_strerror(-EBADMSG)) != 0);

    cp_frame_config cfg = {.max_frame = 100};
    cp_frame_decoder d = {0};
    char buf[128];
    cp_frame_describe(&d, &cfg, buf, sizeof buf);
    CHECK(strcmp(buf, "between frames") == 0);
    uint8_t chunk[4 + 100];
    cp_frame_header(chunk, 100);
    memset(chunk + 4, 1, 100);
    cp_frame_feed(&d, &cfg, chunk, 2, on_frame, NULL, NULL);
    cp_frame_describe(&d, &cfg, buf, sizeof buf);
    CHECK(strcmp(buf, "incomplete frame header: 2 of 4 bytes") == 0);
    cp_frame_feed(&d, &cfg, chunk + 2, 30, on_frame, NULL, NULL);
    cp_frame_describe(&d, &cfg, buf, sizeof buf);
    CHECK(strcmp(buf, "incomplete frame: 28 of 100 payload bytes") == 0);
    cp_frame_decoder_free(&d, &cfg);

    cp_frame_header(chunk, 0x01000000);
    CHECK_EQ(cp_frame_feed(&d, &cfg, chunk, 4, on_frame, NULL, NULL), -EMSGSIZE);
    int len = cp_frame_describe(&d, &cfg, buf, sizeof buf);
    const char *want =
        "frame header announces 16777216 bytes (0x01000000), over the 100-byte limit";
    CHECK(strcmp(buf, want) == 0);
    CHECK_EQ(len, strlen(want));
    /* truncation and size 0 */
    char small[8];
    memset(small, 'x', sizeof small);
    CHECK_EQ(cp_frame_describe(&d, &cfg, small, sizeof small), len);
    CHECK(strcmp(small, "frame h") == 0);
    CHECK_EQ(cp_frame_describe(&d, &cfg, NULL, 0), len);
    /* without a configuration the limit is not shown */
    cp_frame_describe(&d, NULL, buf, sizeof buf);
    CHECK(strcmp(buf, "frame header announces 16777216 bytes (0x01000000), over the limit") == 0);
}

/* Randomized differential test: random frame sizes (empty, tiny, around the chunk sizes, up
 * to and including the limit), random chunkings (single bytes to many frames), both APIs
 * mixed, random stops with resumption, random takes, random allocation failures with
 * retries. The decoded frames must equal the source list byte for byte, in order, in place
 * whenever possible, and every allocation must be released. */
TEST(randomized_differential)
{
    uint64_t rnd = 0x243f6a8885a308d3ull;
    int64_t rounds = cpt_scaled(2000, 100);
    long zero_copy = 0, assembled = 0, stops = 0, enomems = 0, takes = 0, bad_tails = 0;
    for (int64_t round = 0; round < rounds; round++) {
        uint32_t max_frame;
        switch (rnd_below(&rnd, 4)) {
        case 0:
            max_frame = 1 + (uint32_t)rnd_below(&rnd, 8);
            break;
        case 1:
            max_frame = 1 + (uint32_t)rnd_below(&rnd, 300);
            break;
        case 2:
            max_frame = 4096;
            break;
        default:
            max_frame = 1 + (uint32_t)rnd_below(&rnd, 70000);
            break;
        }
        uint32_t flags = rnd_below(&rnd, 4) == 0 ? CP_FRAME_REJECT_EMPTY : 0;
        size_t nf = (size_t)rnd_below(&rnd, 120);
        uint32_t *lens = malloc((nf ? nf : 1) * sizeof *lens);
        CHECK(lens != NULL);
        for (size_t i = 0; i < nf; i++) {
            switch (rnd_below(&rnd, 6)) {
            case 0:
                lens[i] = 0;
                break;
            case 1:
                lens[i] = (uint32_t)rnd_below(&rnd, max_frame < 4 ? max_frame + 1 : 5);
                break;
            case 2:
                lens[i] = max_frame;
                break;
            default:
                lens[i] = (uint32_t)rnd_below(&rnd, (uint64_t)max_frame + 1);
                break;
            }
            if (lens[i] == 0 && (flags & CP_FRAME_REJECT_EMPTY))
                lens[i] = 1;
        }
        stream s = make_stream(lens, nf, rnd_next(&rnd));
        counter cnt;
        cp_frame_config cfg = counting_cfg(&cnt, max_frame, flags);
        cp_frame_decoder d = {0};
        checker c = make_checker(&s);
        c.rnd = rnd_next(&rnd) | 1;
        c.stop_prob = (unsigned)rnd_below(&rnd, 3) * 10;
        c.take_prob = (unsigned)rnd_below(&rnd, 2) * 30;
        unsigned fail_prob = (unsigned)rnd_below(&rnd, 2) * 5;
        size_t chunk_scale = 1 + (size_t)rnd_below(&rnd, 3 * (uint64_t)max_frame + 40);

        size_t pos = 0;
        while (pos < s.size) {
            size_t clen;
            switch (rnd_below(&rnd, 5)) {
            case 0:
                clen = 1 + (size_t)rnd_below(&rnd, 4);
                break;
            case 1:
                clen = s.size - pos;
                break;
            default:
                clen = 1 + (size_t)rnd_below(&rnd, chunk_scale);
                break;
            }
            if (clen > s.size - pos)
                clen = s.size - pos;
            uint8_t *chunk = malloc(clen);
            CHECK(chunk != NULL);
            memcpy(chunk, s.bytes + pos, clen);
            c.chunk = chunk;
            c.chunk_len = clen;
            c.chunk_pos = pos;
            size_t done = 0;
            bool via_next = rnd_below(&rnd, 2);
            while (done < clen) {
                if (fail_prob && rnd_below(&rnd, 100) < fail_prob)
                    cnt.fail_after = 1;
                size_t used;
                int r;
                if (!via_next) {
                    r = cp_frame_feed(&d, &cfg, chunk + done, clen - done, on_frame, &c, &used);
                } else {
                    const void *p = chunk + done;
                    size_t n = clen - done;
                    cp_frame f;
                    while ((r = cp_frame_next(&d, &cfg, &p, &n, &f)) == 1) {
                        size_t idx = c.next;
                        check_frame(&c, &f);
                        if (c.take_prob && rnd_below(&rnd, 100) < c.take_prob) {
                            uint8_t *own = cp_frame_take(&d, &f);
                            CHECK_EQ(own != NULL, f.len > 0 && s.off[idx] < pos);
                            if (own)
                                remember_taken(&c, own, f.len);
                        }
                        if (rnd_below(&rnd, 100) < c.stop_prob) {
                            r = CP_FRAME_STOPPED;
                            break;
                        }
                    }
                    used = clen - done - n;
                }
                CHECK(r == 0 || r == CP_FRAME_STOPPED || r == -ENOMEM);
                if (r == CP_FRAME_STOPPED)
                    stops++;
                if (r == -ENOMEM) {
                    enomems++;
                    CHECK_EQ(cp_frame_error(&d), 0);
                    CHECK_EQ(cp_frame_partial(&d), 4);
                }
                done += used;
                if (r == 0)
                    CHECK_EQ(done, clen);
                cnt.fail_after = 0;
            }
            /* at a chunk's end, only a partial payload may hold memory (a frame delivered by
             * the iterator is released by the next call, which may not have happened yet) */
            size_t partial, held;
            expected_at(&s, pos + clen, &partial, &held);
            CHECK_EQ(cp_frame_partial(&d), partial);
            if (held)
                CHECK_EQ(cp_frame_held(&d), held);
            free(chunk);
            c.chunk = NULL;
            pos += clen;
        }
        /* a final empty call releases a frame the iterator left held */
        const void *p = NULL;
        size_t n = 0;
        cp_frame f;
        CHECK_EQ(cp_frame_next(&d, &cfg, &p, &n, &f), 0);
        CHECK_EQ(c.next, nf);
        CHECK_EQ(cp_frame_held(&d), 0);
        CHECK_EQ(cp_frame_partial(&d), 0);
        CHECK(cnt.largest <= max_frame);

        /* sometimes the peer then sends a bad header (too long, or empty when rejected),
         * in pieces, followed by more bytes: the error comes exactly with its 4th byte */
        if (rnd_below(&rnd, 3) == 0) {
            uint32_t bad = max_frame + 1 + (uint32_t)rnd_below(&rnd, 1000);
            if ((flags & CP_FRAME_REJECT_EMPTY) && rnd_below(&rnd, 2))
                bad = 0;
            if (rnd_below(&rnd, 4) == 0)
                bad = 0xffffffffu;
            int want = bad ? -EMSGSIZE : -EBADMSG;
            uint8_t tail[4 + 8];
            cp_frame_header(tail, bad);
            memset(tail + 4, 0, 8);
            size_t at = 0;
            int r = 0;
            while (at < 4) {
                size_t piece = 1 + (size_t)rnd_below(&rnd, sizeof tail - at);
                size_t used;
                r = cp_frame_feed(&d, &cfg, tail + at, piece, on_frame, &c, &used);
                at += used;
                if (at < 4) {
                    CHECK_EQ(r, 0);
                    CHECK_EQ(used, piece);
                }
            }
            CHECK_EQ(at, 4);
            CHECK_EQ(r, want);
            CHECK_EQ(cp_frame_error(&d), want);
            CHECK_EQ(cp_frame_held(&d), 0);
            CHECK_EQ(c.next, nf);
            bad_tails++;
        }
        zero_copy += c.zero_copy;
        assembled += c.assembled;
        takes += (long)c.ntaken;
        free_taken(&c, &cfg);
        CHECK_EQ(cnt.live, 0);
        CHECK_EQ(cnt.allocs, cnt.frees);
        cp_frame_decoder_free(&d, &cfg);
        free_stream(&s);
        free(lens);
    }
    /* the random choices did cover every path */
    CHECK(zero_copy > 0 && assembled > 0 && stops > 0 && enomems > 0 && takes > 0 && bad_tails > 0);
}
