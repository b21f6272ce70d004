/* Tests of the lookaside slabs (src/lookaside.c): objects carved from 1 MiB chunks, reused
 * without new chunks, every live object found by a walk. */
/* test-backends: none */
#include "harness.h"

#include "lookaside.h"

#include <errno.h>
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
    CHECK_OK(cp__slab_init(&s, BIG));
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

/* An object must fit its chunk: a slab of bigger objects is refused (before, the first
 * allocation was carved past the chunk's end), and one of the largest size gets objects
 * that lie wholly inside their chunk, one per chunk. */
TEST(objects_bigger_than_a_chunk_are_refused)
{
    cp__slab s;
    CHECK_EQ(cp__slab_init(&s, CP__SLAB_MAX_OBJECT + 1), -EINVAL);
    CHECK_EQ(cp__slab_init(&s, 2 * CHUNK), -EINVAL);
    CHECK_EQ(cp__slab_init(&s, SIZE_MAX), -EINVAL); /* no wrap when rounding up */
    CHECK_OK(cp__slab_init(&s, CP__SLAB_MAX_OBJECT));
    char *objs[2];
    for (int i = 0; i < 2; i++) {
        objs[i] = cp__slab_alloc(&s);
        CHECK(objs[i] != NULL);
        uintptr_t chunk = (uintptr_t)objs[i] & ~((uintptr_t)CHUNK - 1);
        CHECK((uintptr_t)objs[i] + CP__SLAB_MAX_OBJECT <= chunk + CHUNK);
        memset(objs[i], 0xab, CP__SLAB_MAX_OBJECT);
    }
    CHECK_EQ(s.allocations, 2);
    for (int i = 0; i < 2; i++)
        cp__slab_free(&s, objs[i]);
    cp__slab_fini(&s);
}
