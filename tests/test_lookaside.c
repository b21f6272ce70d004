/* Tests of the lookaside slabs (src/lookaside.c): objects carved from 2 MiB chunks, reused
 * LIFO without new chunks, every live object found by a walk, and chunks of big objects
 * (buffers) advised as transparent huge pages while chunks of small ones are not. */
/* test-backends: none */
#include "harness.h"

#include "lookaside.h"

#include <stdio.h>
#include <string.h>

enum { BIG = 64 * 1024, SMALL = 128, CHUNK = 2 << 20 };

static void count_obj(void *obj, void *arg)
{
    (void)obj;
    (*(size_t *)arg)++;
}

/* More objects than one chunk holds: two chunks, all distinct and inside their chunk, a
 * walk sees each once, and after freeing them all the same number comes back without a
 * new chunk. */
TEST(objects_fill_chunks_and_are_reused)
{
    enum { N = 40 }; /* a 2 MiB chunk holds 31 objects of 64 KiB beside its header */
    cp__slab s;
    cp__slab_init(&s, BIG);
    char *objs[N];
    for (int i = 0; i < N; i++) {
        objs[i] = cp__slab_alloc(&s);
        CHECK(objs[i] != NULL);
        memset(objs[i], i, BIG); /* would corrupt a neighbour if objects overlapped */
    }
    CHECK_EQ(s.allocations, 2);
    for (int i = 0; i < N; i++) {
        uintptr_t chunk = (uintptr_t)objs[i] & ~((uintptr_t)CHUNK - 1);
        CHECK((uintptr_t)objs[i] + BIG <= chunk + CHUNK);
        for (int j = 0; j < BIG; j += 4096)
            CHECK_EQ(objs[i][j], (char)i);
    }
    size_t seen = 0;
    cp__slab_walk(&s, count_obj, &seen);
    CHECK_EQ(seen, N);
    for (int i = 0; i < N; i++)
        cp__slab_free(&s, objs[i]);
    seen = 0;
    cp__slab_walk(&s, count_obj, &seen);
    CHECK_EQ(seen, 0);
    for (int i = 0; i < N; i++)
        CHECK((objs[i] = cp__slab_alloc(&s)) != NULL);
    CHECK_EQ(s.allocations, 2);
    for (int i = 0; i < N; i++)
        cp__slab_free(&s, objs[i]);
    cp__slab_fini(&s);
}

/* The system's transparent huge page mode: the bracketed word of
 * /sys/kernel/mm/transparent_hugepage/enabled ("always", "madvise", "never"), or "". */
static void thp_mode(char *out, size_t len)
{
    out[0] = 0;
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f)
        return;
    char line[128];
    if (fgets(line, sizeof line, f)) {
        char *open = strchr(line, '['), *close = open ? strchr(open, ']') : NULL;
        if (open && close && (size_t)(close - open) < len) {
            memcpy(out, open + 1, (size_t)(close - open - 1));
            out[close - open - 1] = 0;
        }
    }
    fclose(f);
}

/* THPeligible of the mapping that holds addr (/proc/self/smaps), or -1 if not found. */
static int thp_eligible(const void *addr)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    CHECK(f != NULL);
    char line[512];
    bool inside = false;
    int r = -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2) { /* a mapping's first line */
            inside = (uintptr_t)addr >= lo && (uintptr_t)addr < hi;
            continue;
        }
        int v;
        if (inside && sscanf(line, "THPeligible: %d", &v) == 1) {
            r = v;
            break;
        }
    }
    fclose(f);
    return r;
}

TEST(buffer_chunks_are_advised_as_huge_pages)
{
    char mode[32];
    thp_mode(mode, sizeof mode);
    if (strcmp(mode, "always") != 0 && strcmp(mode, "madvise") != 0)
        SKIP("transparent huge pages are off on this system");
    cp__slab big, small;
    cp__slab_init(&big, BIG);
    cp__slab_init(&small, SMALL);
    void *b = cp__slab_alloc(&big), *s = cp__slab_alloc(&small);
    CHECK(b != NULL && s != NULL);
    int eb = thp_eligible(b), es = thp_eligible(s);
    fprintf(stderr, "THP mode %s: THPeligible %d for 64 KiB objects, %d for 128 B objects\n", mode,
            eb, es);
    CHECK_EQ(eb, 1);
    if (strcmp(mode, "madvise") == 0)
        CHECK_EQ(es, 0); /* not advised: untouched memory stays free */
    cp__slab_free(&big, b);
    cp__slab_free(&small, s);
    cp__slab_fini(&big);
    cp__slab_fini(&small);
}
