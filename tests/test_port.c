/* Tests of the completion port (src/port.c): concurrency limit, LIFO release, FIFO batch
 * dequeue, timeouts, close, post/dequeue accounting, blocking notification. */
#include "harness.h"

#include "cport.h"

TEST(create_destroy)
{
    cp_port *p;
    CHECK_OK(cp_port_create(&p, 0));
    CHECK(cp_port_concurrency(p) >= 1);
    cp_port_destroy(p);
}
