/* Tests of the lookaside slabs (src/lookaside.c): objects carved from 1 MiB chunks, reused
 * without new chunks, every live object found by a walk. */
/* test-backends: none */
#include "harness.h"

#include "lookaside.h"

#include <string.h>

enum { BIG = 64 * 1024, CHUNK = 1 << 20 };

static void count_obj(void *obj, void *arg)
{
    (void)obj;
    (*(size_t *)arg)++;
}

/* More objects than two chunks hold: three chunks, all distinct and inside their chunk, a
 * walk sees each once, and after freeing them all the same number comes back without a
 * new chunk. */
TEST(objects_fill_chunks_and_are_reused)
{
    enum { N = 40 }; /* a 1 MiB chunk holds 15 objects of 64 KiB beside its header */
    cp__slab s;
    cp__slab_init(&s, BIG);
    char *objs[N];
    for (int i = 0; i < N; i++) {
        objs[i] = cp__slab_alloc(&s);
        CHECK(objs[i] != NULL);
        memset(objs[i], i, BIG); /* would corrupt a neighbour if objects overlapped */
    }
    CHECK_EQ(s.allocations, 3);
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
    CHECK_EQ(s.allocations, 3);
    for (int i = 0; i < N; i++)
        cp__slab_free(&s, objs[i]);
    cp__slab_fini(&s);
}
