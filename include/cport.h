/* cport: the completion-port server model on Linux (io_uring, with an epoll fallback).
 *
 * Include this one header. The API is split by concept:
 *   cport/common.h  errors, CP_CONTAINER_OF, version
 *   cport/port.h    the completion port (create, post, dequeue, close, concurrency)
 *   cport/socket.h  overlapped socket I/O through a port, TransmitFile/TransmitPackets
 *   cport/file.h    file reads and writes at offsets through a port
 *   cport/pool.h    the thread pool on a port: work items, timers, bound I/O callbacks
 *   cport/frame.h   length-prefixed message framing (decoder, encoder)
 *   cport/server.h  the scalable server layer: accept pool, timeouts, limits, callbacks
 */
#ifndef CPORT_H
#define CPORT_H

#include "cport/common.h"
#include "cport/port.h"
#include "cport/socket.h"
#include "cport/file.h"
#include "cport/pool.h"
#include "cport/frame.h"
#include "cport/server.h"

#endif
