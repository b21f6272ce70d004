/* cport-httpd: a static-file HTTP/1.1 server on cport's server layer.
 *
 * The protocol (parsing, paths, ranges, dates, response heads) lives in http.c; the server
 * layer (cport/server.h) accepts, receives, orders sends and shuts down. This file joins
 * them: per connection it parses requests in arrival order (keep-alive and pipelining),
 * opens each file beneath the document root with openat2(RESOLVE_BENEATH) and hands it to
 * cp_conn_send_file() (TransmitFile: the head, then the file, without copying it through
 * user space). The file's descriptor is closed in on_sent when the transmit completes.
 *
 * Per connection (all callbacks of a connection run one at a time, so no locking):
 *   - unparsed bytes (a partial head, or pipelined requests not yet served) are kept in a
 *     small heap buffer; complete requests are parsed straight from the receive buffer;
 *   - at most MAX_INFLIGHT file transmits are outstanding; further pipelined requests wait
 *     in that buffer and are served from on_sent as transmits complete (bounds the
 *     descriptors one client can pin), as do requests whose responses the server layer
 *     cannot queue yet (its 4 GiB per connection are taken: see defer()), and a client
 *     that pipelines more than IN_MAX bytes of requests without reading the answers is cut;
 *   - one deadline (cp_conn_set_deadline): --header-timeout from the first byte of a
 *     request head (then 408 and close; empty lines before a request are dropped and start
 *     none, nor does a CR that may begin one more), --keepalive-timeout while idle between
 *     requests (then a quiet close). While responses are being sent (file transmits, and
 *     keep-alive responses built in memory until the kernel has taken them), neither: the
 *     deadline is a keep-alive period from the first one's start, and when it passes the
 *     peer is cut if it acknowledged nothing since the last such check (it stopped
 *     reading), else it runs again; bytes received meanwhile do not move it. The header
 *     timeout of a pipelined head that is still partial starts when the last of them
 *     completes.
 *
 * Signals: SIGINT/SIGTERM/SIGHUP shut down gracefully (stop accepting and reading, let
 * responses already queued go out, close; exit 0); SIGUSR1 prints the counters on stderr.
 * The access log (common log format, one line per request) goes to stdout. Workers never
 * write it themselves: a pipe whose reader stalls, or a terminal stopped with Ctrl-S, would
 * block each of them in write(2) in turn and the server would stop answering. They queue
 * lines in a bounded buffer that one logger thread writes out (whole lines per write(2));
 * when it is full, lines are dropped and counted (SIGUSR1's counters and the exit report
 * them). stdout stays blocking (it may be the shell's terminal, shared). At exit what is
 * queued is written as long as stdout takes it. If stdout is a regular file it is switched
 * to append mode: otherwise, on a file whose position the kernel does not serialise
 * between threads (a memfd, for one), the logger and main's own lines written at once can
 * land at the same offset and one overwrites the other. */
#include "common/address.h"
#include "cport.h"
#include "http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum {
    MAX_INFLIGHT = 16,       /* file transmits outstanding per connection */
    IN_MAX = 256 * 1024,     /* unserved pipelined bytes kept per connection */
    IN_MIN = 4096,           /* first size of that buffer */
    HEAD_CAP = 640,          /* response heads (http.h: 512 always suffice) */
    ERR_CAP = 768,           /* error responses with their body */
    SETTLE_MS = 100,         /* last response of a connection: how often to look whether the
                                peer has (nearly) all of it */
    SETTLE_LEFT = 64 * 1024, /* ...and how much it may still lack when the close begins */
};

typedef struct config {
    cp_server_options so;
    const char *root;
    int root_fd;
    bool access_log;
    bool dotfiles; /* serve paths with a segment starting with '.' (default: 404) */
    unsigned header_ms, keepalive_ms, shutdown_ms;
} config;

/* The per-connection state (the server's user area, zeroed at accept). */
typedef struct hconn {
    http_parser parser;
    char *in; /* bytes received and not yet served: in[0..in_len) */
    uint32_t in_len, in_cap;
    /* The peer's address as text, for the log: IPv4, or IPv6 (an IPv4 peer of a listener
     * on "::": ::ffff:a.b.c.d). */
    char peer[INET6_ADDRSTRLEN];
    uint32_t inflight; /* responses outstanding (not yet all handed to the kernel): file
                          transmits and keep-alive responses built in memory */
    uint16_t files;    /* file transmits among them (MAX_INFLIGHT bounds these) */
    bool closing;      /* the last response is queued: ignore what else arrives */
    bool head_started; /* a request head is partly received (the header deadline runs) */
    bool settling;     /* closing while responses are outstanding (the last ones include a
                          file, or many in memory); close once the peer has (nearly) all */
    bool sending;      /* the progress deadline runs: responses are outstanding */
    bool blocked;      /* a response could not be queued yet (see defer()): serve no more
                          until one of those outstanding completes */
    uint64_t acked;    /* the peer's tcpi_bytes_acked at the last deadline while sending */
    int64_t acked_ms;  /* settling: when acked last grew (monotonic ms) */
} hconn;

static const config *cfg_of(cp_conn *c)
{
    return cp_server_user(cp_conn_server(c));
}

/* ---- access log ------------------------------------------------------------------------ */

/* "[10/Oct/2000:13:55:36 +0000]" for now, cached per thread for the current second. */
static const char *log_time(void)
{
    static _Thread_local time_t last = -1;
    static _Thread_local char text[40];
    time_t now = time(NULL);
    if (now != last) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(text, sizeof text, "[%d/%b/%Y:%H:%M:%S +0000]", &tm);
        last = now;
    }
    return text;
}

/* Make stdout append, if it is a regular file (see the file comment). */
static void log_appends(void)
{
    struct stat st;
    int fl = fcntl(STDOUT_FILENO, F_GETFL);
    if (fl < 0 || (fl & O_APPEND) || fstat(STDOUT_FILENO, &st) < 0 || !S_ISREG(st.st_mode))
        return;
    if (fcntl(STDOUT_FILENO, F_SETFL, fl | O_APPEND) < 0)
        fprintf(stderr,
                "cport-httpd: cannot put stdout in append mode (%s); access-log lines "
                "written at once may overwrite each other\n",
                strerror(errno));
}

/* The queue between the workers and the logger thread (see the file comment). */
enum {
    LOG_QUEUE = 256 * 1024, /* bytes queued at most */
    LOG_CHUNK = 16 * 1024,  /* written at once at most (lines are shorter) */
    LOG_STALL_MS = 1000,    /* at exit: give up when stdout takes no chunk for this long */
};

static char log_ring[LOG_QUEUE];
static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;     /* for the logger: lines queued, or stop */
    pthread_cond_t progress; /* for main at exit: a chunk written, or the logger ended */
    size_t head, len;        /* the queued bytes: log_ring[head..head+len), wrapping */
    uint64_t held;           /* lines the logger took off the queue and is writing */
    uint64_t dropped;        /* lines dropped: the queue was full, or stdout failed */
    uint64_t chunks;         /* chunks written */
    bool stop, ended;
    pthread_t thread;
} lq = {.mu = PTHREAD_MUTEX_INITIALIZER};

static uint64_t count_lines(const char *s, size_t n)
{
    uint64_t k = 0;
    for (const char *e = s + n; (s = memchr(s, '\n', (size_t)(e - s))) != NULL; s++)
        k++;
    return k;
}

/* Queue one line; never blocks on I/O (a full queue drops it). */
static void log_push(const char *line, size_t n)
{
    pthread_mutex_lock(&lq.mu);
    if (LOG_QUEUE - lq.len < n) {
        lq.dropped++;
    } else {
        size_t tail = (lq.head + lq.len) % LOG_QUEUE;
        size_t k = LOG_QUEUE - tail < n ? LOG_QUEUE - tail : n;
        memcpy(log_ring + tail, line, k);
        memcpy(log_ring, line + k, n - k);
        lq.len += n;
        pthread_cond_signal(&lq.wake);
    }
    pthread_mutex_unlock(&lq.mu);
}

/* The logger thread: the only one that blocks on stdout. */
static void *logger_main(void *arg)
{
    (void)arg;
    static char chunk[LOG_CHUNK];
    pthread_mutex_lock(&lq.mu);
    for (;;) {
        while (lq.len == 0 && !lq.stop)
            pthread_cond_wait(&lq.wake, &lq.mu);
        if (lq.len == 0)
            break; /* stopped and drained */
        size_t n = lq.len < LOG_CHUNK ? lq.len : LOG_CHUNK;
        size_t k = LOG_QUEUE - lq.head < n ? LOG_QUEUE - lq.head : n;
        memcpy(chunk, log_ring + lq.head, k);
        memcpy(chunk + k, log_ring, n - k);
        const char *nl = memrchr(chunk, '\n', n);
        if (nl)
            n = (size_t)(nl + 1 - chunk); /* whole lines (each is shorter than a chunk) */
        lq.head = (lq.head + n) % LOG_QUEUE;
        lq.len -= n;
        lq.held = count_lines(chunk, n);
        pthread_mutex_unlock(&lq.mu);
        size_t done = 0;
        while (done < n) {
            ssize_t w = write(STDOUT_FILENO, chunk + done, n - done);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                break; /* EPIPE, ENOSPC, ...: these lines are lost */
            done += (size_t)w;
        }
        pthread_mutex_lock(&lq.mu);
        lq.dropped += count_lines(chunk + done, n - done);
        lq.held = 0;
        lq.chunks++;
        pthread_cond_signal(&lq.progress);
    }
    lq.ended = true;
    pthread_cond_signal(&lq.progress);
    pthread_mutex_unlock(&lq.mu);
    return NULL;
}

static int log_start(void)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&lq.wake, NULL);
    pthread_cond_init(&lq.progress, &ca);
    pthread_condattr_destroy(&ca);
    return -pthread_create(&lq.thread, NULL, logger_main, NULL);
}

/* At exit (no worker logs any more): let the logger write what is queued as long as stdout
 * takes it. Returns false if no chunk was written for LOG_STALL_MS: the logger is then left
 * blocked in write(2), to end with the process, and *unwritten counts the lines it had not
 * written (at most). *dropped: the lines dropped. */
static bool log_stop(uint64_t *dropped, uint64_t *unwritten)
{
    pthread_mutex_lock(&lq.mu);
    lq.stop = true;
    pthread_cond_signal(&lq.wake);
    while (!lq.ended) {
        uint64_t seen = lq.chunks;
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += LOG_STALL_MS / 1000;
        until.tv_nsec += (LOG_STALL_MS % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        while (!lq.ended && lq.chunks == seen)
            if (pthread_cond_timedwait(&lq.progress, &lq.mu, &until) != 0)
                break; /* ETIMEDOUT */
        if (!lq.ended && lq.chunks == seen)
            break; /* stdout is stuck */
    }
    bool ended = lq.ended;
    *dropped = lq.dropped;
    *unwritten = 0;
    if (!ended) {
        size_t k = LOG_QUEUE - lq.head < lq.len ? LOG_QUEUE - lq.head : lq.len;
        *unwritten =
            count_lines(log_ring + lq.head, k) + count_lines(log_ring, lq.len - k) + lq.held;
    }
    pthread_mutex_unlock(&lq.mu);
    if (ended)
        pthread_join(lq.thread, NULL);
    return ended;
}

static uint64_t log_dropped(void)
{
    pthread_mutex_lock(&lq.mu);
    uint64_t d = lq.dropped;
    pthread_mutex_unlock(&lq.mu);
    return d;
}

/* s[0..n) for the quoted request field, into out (4 * n bytes suffice): '"', '\\', control
 * characters and bytes >= 0x7F as \xHH (as nginx does), so that a request-target cannot
 * end the field early and forge the rest of the line, or split it. Returns the length. */
static size_t log_escape(char *out, const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\' || ch < 0x20 || ch >= 0x7f) {
            out[k++] = '\\';
            out[k++] = 'x';
            out[k++] = hex[ch >> 4];
            out[k++] = hex[ch & 15];
        } else {
            out[k++] = (char)ch;
        }
    }
    return k;
}

/* One line: host ident authuser [date] "request line" status bytes. req NULL: "-". */
static void access_log(cp_conn *c, const http_request *req, int status, uint64_t bytes)
{
    const config *cfg = cfg_of(c);
    if (!cfg->access_log)
        return;
    hconn *h = cp_conn_user(c);
    const char *ip = h->peer[0] ? h->peer : "-";
    char line[8900];
    int n;
    if (req) {
        /* The method is a token; the target is visible ASCII, which includes '"' and '\\'. */
        char target[4 * 2048];
        size_t tl = req->target.len > 2048 ? 2048 : req->target.len;
        int ml = req->method_name.len > 64 ? 64 : (int)req->method_name.len;
        n = snprintf(line, sizeof line, "%s - - %s \"%.*s %.*s%s HTTP/1.%d\" %d %llu\n", ip,
                     log_time(), ml, req->method_name.ptr,
                     (int)log_escape(target, req->target.ptr, tl), target,
                     tl < req->target.len ? "..." : "", req->minor_version, status,
                     (unsigned long long)bytes);
    } else {
        n = snprintf(line, sizeof line, "%s - - %s \"-\" %d %llu\n", ip, log_time(), status,
                     (unsigned long long)bytes);
    }
    if (n > 0)
        log_push(line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* ---- responses ------------------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The peer's TCP state: false if it cannot be read (the connection is going away). */
static bool tcp_state(cp_conn *c, struct tcp_info *ti)
{
    socklen_t tl = sizeof(*ti);
    return cp_conn_getsockopt(c, IPPROTO_TCP, TCP_INFO, ti, &tl) == 0 &&
           tl >= offsetof(struct tcp_info, tcpi_notsent_bytes) + sizeof(ti->tcpi_notsent_bytes);
}

/* The last responses of a connection include a file (or responses built in memory were
 * still outstanding when the last one was queued). A graceful close started while it is
 * queued, or while the socket buffer still holds much of it, is bounded by the server
 * layer's linger (a reset once the replies made no progress for linger_ms), which cuts a
 * peer that reads slowly but steadily (a small window: Linux counts zero-window probes as
 * no progress though every probe is answered). So the close waits until the file is
 * sent and the peer lacks at most SETTLE_LEFT bytes of it (a tiny response closes at
 * once, as before); a peer that acknowledged nothing for a keep-alive period (it stopped
 * reading) is cut. Looked at every SETTLE_MS. */
static void settle(cp_conn *c, hconn *h)
{
    const config *cfg = cfg_of(c);
    struct tcp_info ti;
    if (!tcp_state(c, &ti)) {
        cp_conn_abort(c);
        return;
    }
    int64_t now = now_ms();
    uint64_t left = (uint64_t)ti.tcpi_notsent_bytes + (uint64_t)ti.tcpi_unacked * ti.tcpi_snd_mss;
    if (h->inflight == 0 && left <= SETTLE_LEFT) {
        h->settling = false;
        cp_conn_close(c); /* the peer has (nearly) all of it */
        return;
    }
    if (ti.tcpi_bytes_acked != h->acked) {
        h->acked = ti.tcpi_bytes_acked;
        h->acked_ms = now;
    } else if (now - h->acked_ms >= (int64_t)cfg->keepalive_ms) {
        cp_conn_abort(c);
        return;
    }
    cp_conn_set_deadline(c, SETTLE_MS);
}

/* The last response is queued: close once it has gone out (see settle() while earlier
 * responses of this connection are still being sent). */
static void finish(cp_conn *c, hconn *h)
{
    h->closing = true;
    if (h->inflight == 0) {
        cp_conn_close(c);
        return;
    }
    h->settling = true;
    h->acked = 0;
    h->acked_ms = now_ms();
    cp_conn_set_deadline(c, SETTLE_MS);
}

/* on_sent's ctx: a file transmit's is (fd << 1) | 1; a response built in memory sent with
 * cp_conn_send_ref() passes its malloc'ed copy (aligned: low bit 0). */
#define FILE_CTX(fd)     ((void *)(((uintptr_t)(unsigned)(fd) << 1) | 1))
#define IS_FILE_CTX(ctx) (((uintptr_t)(ctx)&1) != 0)

/* A response refused with -ENOBUFS while others are outstanding: the server layer counts
 * at most 4 GiB queued per connection, a transmit as up to 2 GiB, so two pipelined
 * downloads of 2 GiB or more fill it (and a third request used to reset the connection,
 * cutting the downloads under way). That is a full queue, not a failure: the request is
 * left unserved, in h->in, and tried again each time a response completes (on_sent, by
 * which the finished one no longer counts): at the last one outstanding it fits at the
 * latest. True if deferred; nothing was sent or logged for it. */
static bool defer(hconn *h, int err)
{
    if (err != -ENOBUFS || h->inflight == 0)
        return false;
    h->blocked = true;
    return true;
}

/* A response built in memory (304, 301, a HEAD's head, an error page). One the connection
 * stays open after is outstanding until the kernel has taken it, as a file transmit is:
 * the header timeout of a head pipelined behind it starts after it, and a client that
 * stops reading it is governed by the progress rule. cp_conn_send() would report nothing
 * when a copy it queued has gone out, so it is sent from a copy of ours with
 * cp_conn_send_ref(), and on_sent frees it. A last response needs no tracking (the close
 * waits for it); nor does one that finds no memory for the copy: sent untracked. Returns
 * false when the response is deferred (defer()), else true (sent, or the connection is
 * closing). */
static bool send_mem(cp_conn *c, hconn *h, const void *buf, size_t len, bool keep_alive)
{
    void *copy = keep_alive ? malloc(len) : NULL;
    int r;
    if (copy) {
        memcpy(copy, buf, len);
        r = cp_conn_send_ref(c, copy, len, copy);
        if (r < 0)
            free(copy);
        else
            h->inflight++;
    } else {
        r = cp_conn_send(c, buf, len);
    }
    if (r < 0) {
        if (defer(h, r))
            return false;
        h->closing = true;
        if (r != -EPIPE)
            cp_conn_abort(c);
    }
    return true;
}

/* A small error response (its body unless for HEAD); closes after it unless keep_alive.
 * false: deferred (see defer()). */
static bool respond_error(cp_conn *c, hconn *h, const http_request *req, int status,
                          bool keep_alive, bool with_body, uint64_t complete_length)
{
    char buf[ERR_CAP];
    http_response r = {.status = status,
                       .keep_alive = keep_alive,
                       .date = time(NULL),
                       .complete_length = complete_length};
    int n = http_format_error(&r, with_body, buf, sizeof buf);
    if (n < 0) { /* cannot happen with the statuses used here */
        h->closing = true;
        cp_conn_abort(c);
        return true;
    }
    const char *nl = memmem(buf, (size_t)n, "\r\n\r\n", 4);
    uint64_t body = nl ? (uint64_t)n - (uint64_t)(nl + 4 - buf) : 0;
    if (!send_mem(c, h, buf, (size_t)n, keep_alive))
        return false;
    access_log(c, req, status, body);
    if (!keep_alive && !h->closing)
        finish(c, h);
    return true;
}

/* 301 to the request's path with a '/' appended (a directory named without it), query
 * kept. Leading slashes are collapsed to one: "//dir/" would be a host name, not a path.
 * false: deferred (see defer()). */
static bool redirect_to_dir(cp_conn *c, hconn *h, const http_request *req, bool keep)
{
    char loc[HTTP_MAX_REQUEST_LINE + 2], head[HEAD_CAP + sizeof loc];
    const char *p = req->path.ptr;
    size_t pl = req->path.len, n = 0;
    while (pl > 0 && *p == '/') {
        p++;
        pl--;
    }
    loc[n++] = '/';
    memcpy(loc + n, p, pl); /* path and query are parts of the request line: they fit */
    n += pl;
    loc[n++] = '/';
    if (req->query.ptr) {
        loc[n++] = '?';
        memcpy(loc + n, req->query.ptr, req->query.len);
        n += req->query.len;
    }
    http_response r = {.status = 301,
                       .keep_alive = keep,
                       .date = time(NULL),
                       .has_content_length = true,
                       .location = {loc, n}};
    int len = http_format_head(&r, head, sizeof head);
    if (len < 0) /* cannot happen: the parser let only visible ASCII through */
        return respond_error(c, h, req, 500, false, req->method != HTTP_METHOD_HEAD, 0);
    if (!send_mem(c, h, head, (size_t)len, keep))
        return false;
    access_log(c, req, 301, 0);
    if (!keep && !h->closing)
        finish(c, h);
    return true;
}

/* Serve one parsed request. false: deferred, nothing sent (see defer()); serve it again
 * when a response completes. */
static bool serve(cp_conn *c, hconn *h, const http_request *req)
{
    const config *cfg = cfg_of(c);
    bool head_only = req->method == HTTP_METHOD_HEAD;
    bool keep = req->keep_alive;
    if (req->method == HTTP_METHOD_OTHER)
        return respond_error(c, h, req, 405, keep, true, 0);
    http_path path;
    int st = http_resolve_path(req->path.ptr, req->path.len, &path);
    if (st)
        return respond_error(c, h, req, st, keep, !head_only, 0);
    /* .git/, .env, .htpasswd: not published by default; 404 says no more than that (a 403,
     * or a 301 for a directory, would tell that it exists). */
    if (!cfg->dotfiles && http_path_is_dotfile(&path))
        return respond_error(c, h, req, 404, keep, !head_only, 0);
    http_file f;
    st = http_open_beneath(cfg->root_fd, &path, &f);
    if (st == 301)
        return redirect_to_dir(c, h, req, keep);
    if (st)
        return respond_error(c, h, req, st, keep, !head_only, 0);

    http_response r = {.status = 200,
                       .keep_alive = keep,
                       .date = time(NULL),
                       .content_type = f.index ? "text/html; charset=utf-8"
                                               : http_mime_type(path.buf, path.len),
                       .has_content_length = true,
                       .content_length = f.size,
                       .has_last_modified = true,
                       .last_modified = f.mtime,
                       .accept_ranges = true};
    /* A modification time in the future (written under a clock that was ahead, or copied
     * with its times kept) is sent as the Date (RFC 9110 8.8.2.1, a MUST): else a client
     * revalidates with that future date, and every change before then gets a 304, the
     * stale copy kept. The conditionals below still compare the file's own mtime. */
    if (r.last_modified > r.date)
        r.last_modified = r.date;
    uint64_t first = 0, len = f.size;
    int pre = http_preconditions(req, f.mtime);
    if (pre == 412) {
        close(f.fd);
        return respond_error(c, h, req, 412, keep, !head_only, 0);
    }
    if (pre == 304) {
        r.status = 304;
        len = 0;
    } else {
        uint64_t a, b;
        switch (http_request_range(req, f.size, f.mtime, r.date, &a, &b)) {
        case HTTP_RANGE_PARTIAL:
            r.status = 206;
            r.range_first = first = a;
            r.range_last = b;
            r.complete_length = f.size;
            len = b - a + 1;
            break;
        case HTTP_RANGE_UNSATISFIABLE:
            close(f.fd);
            return respond_error(c, h, req, 416, keep, true, f.size);
        case HTTP_RANGE_FULL:
            break;
        }
    }
    char head[HEAD_CAP];
    int n = http_format_head(&r, head, sizeof head);
    if (n < 0) {
        close(f.fd);
        return respond_error(c, h, req, 500, false, !head_only, 0);
    }
    if (head_only)
        len = 0;
    if (len == 0) {
        close(f.fd);
        if (!send_mem(c, h, head, (size_t)n, keep))
            return false;
    } else {
        /* ctx carries the descriptor; on_sent closes it. */
        int e = cp_conn_send_file(c, head, (size_t)n, f.fd, (int64_t)first, len, FILE_CTX(f.fd));
        if (e < 0) {
            close(f.fd);
            if (defer(h, e))
                return false;
            h->closing = true;
            if (e != -EPIPE)
                cp_conn_abort(c);
        } else {
            h->inflight++;
            h->files++;
        }
    }
    access_log(c, req, r.status, len);
    if (!keep && !h->closing)
        finish(c, h);
    return true;
}

/* The bytes of the complete empty lines ("\r\n" or "\n") at the start of buf[0..len). */
static size_t empty_lines(const char *buf, size_t len)
{
    size_t i = 0;
    for (;;) {
        if (i < len && buf[i] == '\n')
            i++;
        else if (len - i >= 2 && buf[i] == '\r' && buf[i + 1] == '\n')
            i += 2;
        else
            return i;
    }
}

/* No request has begun in buf[0..len): it is only empty lines, perhaps ending with a lone
 * CR, the first half of one more whose LF has not arrived yet. A CR cannot start a request
 * line (RFC 9112 2.2): when the next byte is an LF it was an empty line, and anything else
 * makes it a bare CR, which the parser refuses (400). */
static bool no_request(const char *buf, size_t len)
{
    size_t i = empty_lines(buf, len);
    return i == len || (i + 1 == len && buf[i] == '\r');
}

/* h->in holds only such a lone CR. */
static bool lone_cr(const hconn *h)
{
    return h->in_len == 1 && h->in[0] == '\r';
}

/* Serve the complete requests at the start of buf[0..len), in order, while the transmit
 * limit allows and no response is deferred. Returns the bytes consumed; what is left is a partial
 * head or requests that wait for transmits to complete. */
static size_t process(cp_conn *c, hconn *h, const char *buf, size_t len)
{
    size_t off = 0;
    while (off < len && !h->closing && h->files < MAX_INFLIGHT && !h->blocked) {
        /* Empty lines before a request (a stray CRLF some clients send after one) are
         * dropped here rather than kept as a partial head, which would start the header
         * timeout and end an idle connection with a 408 (RFC 9112 2.2: ignore them). The
         * parser never sees a request's start moved: it has seen at most a lone CR. */
        off += empty_lines(buf + off, len - off);
        if (off == len)
            break;
        http_request req;
        http_parse_status ps = http_parse(&h->parser, buf + off, len - off, &req);
        if (ps == HTTP_PARSE_NEED_MORE)
            break;
        if (ps == HTTP_PARSE_ERROR) {
            if (respond_error(c, h, NULL, req.status, false, true, 0))
                off = len; /* else deferred: the parser's error is sticky, it comes again */
            break;
        }
        h->head_started = false;
        if (!serve(c, h, &req))
            break; /* deferred: parsed again (the parser was reset) and served from on_sent */
        off += req.head_len;
    }
    return off;
}

/* Keep buf[0..len) (not served yet) in h->in, after what is there. false: over IN_MAX. */
static bool keep_bytes(hconn *h, const char *buf, size_t len)
{
    size_t need = (size_t)h->in_len + len;
    if (need > IN_MAX)
        return false;
    if (need > h->in_cap) {
        size_t cap = h->in_cap ? h->in_cap : IN_MIN;
        while (cap < need)
            cap *= 2;
        char *p = realloc(h->in, cap);
        if (!p)
            return false;
        h->in = p;
        h->in_cap = (uint32_t)cap;
    }
    memcpy(h->in + h->in_len, buf, len);
    h->in_len += (uint32_t)len;
    return true;
}

/* Serve what h->in holds, as far as possible, and drop what was served. */
static void pump(cp_conn *c, hconn *h)
{
    size_t used = process(c, h, h->in, h->in_len);
    if (h->closing) {
        h->in_len = 0;
        return;
    }
    if (used) {
        memmove(h->in, h->in + used, h->in_len - used);
        h->in_len -= (uint32_t)used;
    }
    if (h->in_len == 0 && h->in_cap > 4 * IN_MIN) {
        free(h->in); /* a burst of pipelining is over: back to nothing */
        h->in = NULL;
        h->in_cap = 0;
    }
}

/* After serving: which deadline runs now. */
static void arm_deadline(cp_conn *c, hconn *h)
{
    if (h->closing)
        return;
    const config *cfg = cfg_of(c);
    if (h->inflight > 0) {
        /* A response is being sent: only the progress rule applies (on_timeout, every
         * keep-alive period from the send's start). What arrives meanwhile, a pipelined
         * head complete or not, changes nothing: a partial head's header timeout starts when
         * the last response is sent (the client may wait for the response before sending
         * the rest), and a reader that stopped is cut for that, not by the header timeout.
         * Re-arming here would also let a non-reader that trickles bytes escape the check. */
        if (!h->sending) {
            h->sending = true;
            cp_conn_set_deadline(c, cfg->keepalive_ms);
        }
        h->head_started = false;
        return;
    }
    h->sending = false;
    if (h->in_len > 0 && !lone_cr(h)) {
        /* A partial head: the header timeout runs from its first byte, not its last. */
        if (!h->head_started) {
            h->head_started = true;
            cp_conn_set_deadline(c, cfg->header_ms);
        }
    } else {
        h->head_started = false;
        cp_conn_set_deadline(c, cfg->keepalive_ms);
    }
}

/* ---- callbacks --------------------------------------------------------------------------- */

static int on_open(cp_conn *c)
{
    hconn *h = cp_conn_user(c);
    http_parser_init(&h->parser);
    if (cfg_of(c)->access_log) {
        struct sockaddr_storage ss;
        socklen_t sl;
        if (cp_conn_peer(c, &ss, &sl) == 0) {
            if (ss.ss_family == AF_INET)
                inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, h->peer, sizeof h->peer);
            else if (ss.ss_family == AF_INET6)
                inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, h->peer,
                          sizeof h->peer);
        }
    }
    /* The first request must start arriving within the header timeout. */
    cp_conn_set_deadline(c, cfg_of(c)->header_ms);
    return 0;
}

static void on_data(cp_conn *c, const void *data, size_t len)
{
    hconn *h = cp_conn_user(c);
    if (h->closing || len == 0)
        return;
    const char *d = data;
    if (h->in_len == 0 || lone_cr(h)) {
        /* Only empty lines (with a lone CR kept from before, or a lone CR at the end): no
         * request has started and nothing is served, so the deadline running (keep-alive,
         * or the first request's) stays as it is. A lone CR used to be kept as a partial
         * head, which started the header timeout: an idle connection got a 408 early. */
        size_t skip = h->in_len && d[0] == '\n' ? 1 : 0; /* a kept CR's LF */
        if ((h->in_len == 0 || skip) && no_request(d + skip, len - skip)) {
            bool cr = empty_lines(d + skip, len - skip) < len - skip; /* it ends with one */
            h->in_len = 0;
            if (cr && !keep_bytes(h, "\r", 1)) {
                h->closing = true;
                cp_conn_abort(c);
            }
            return;
        }
    }
    if (h->in_len == 0) {
        size_t used = process(c, h, data, len);
        if (!h->closing && used < len && !keep_bytes(h, (const char *)data + used, len - used)) {
            h->closing = true;
            cp_conn_abort(c);
            return;
        }
    } else {
        if (!keep_bytes(h, data, len)) {
            h->closing = true; /* pipelining far ahead of reading the answers */
            cp_conn_abort(c);
            return;
        }
        pump(c, h);
    }
    arm_deadline(c, h);
}

static void on_sent(cp_conn *c, void *ctx, int64_t result)
{
    hconn *h = cp_conn_user(c);
    if (IS_FILE_CTX(ctx)) {
        close((int)((uintptr_t)ctx >> 1));
        h->files--;
    } else {
        free(ctx); /* send_mem()'s copy */
    }
    h->inflight--;
    h->blocked = false; /* room for a deferred response, perhaps (see defer()) */
    /* A failed transmit (the file shrank, the peer went away) left its response short: the
     * server layer closes the connection after this callback, and no later response may
     * follow the hole, so serve no more. */
    if (result < 0)
        h->closing = true;
    if (h->settling && h->inflight == 0 && result >= 0) {
        settle(c, h); /* the peer may have it all already */
        return;
    }
    if (!h->closing) {
        if (h->in_len > 0)
            pump(c, h);
        /* The keep-alive period runs from the end of the response, not from its request. */
        arm_deadline(c, h);
    }
}

static void on_timeout(cp_conn *c, cp_close_reason reason)
{
    hconn *h = cp_conn_user(c);
    const config *cfg = cfg_of(c);
    if (reason == CP_CLOSE_DEADLINE && h->settling) {
        settle(c, h);
        return;
    }
    if (reason != CP_CLOSE_DEADLINE || h->closing) {
        h->closing = true;
        cp_conn_abort(c);
        return;
    }
    if (h->inflight > 0) {
        /* Still sending: not idle as long as the peer takes bytes. One that acknowledged
         * nothing for a whole keep-alive period (it stopped reading: a zero window, which
         * TCP would probe forever) is cut, and its open files and queued responses with it. */
        struct tcp_info ti;
        socklen_t tl = sizeof(ti);
        if (cp_conn_getsockopt(c, IPPROTO_TCP, TCP_INFO, &ti, &tl) == 0 &&
            tl >= offsetof(struct tcp_info, tcpi_bytes_acked) + sizeof(ti.tcpi_bytes_acked)) {
            if (ti.tcpi_bytes_acked == h->acked) {
                h->closing = true;
                cp_conn_abort(c);
                return;
            }
            h->acked = ti.tcpi_bytes_acked;
        }
        cp_conn_set_deadline(c, cfg->keepalive_ms);
    } else if (h->head_started) {
        respond_error(c, h, NULL, 408, false, true, 0);
    } else {
        finish(c, h); /* idle keep-alive connection (or one that never sent a byte) */
    }
}

static void on_close(cp_conn *c, cp_close_reason reason, int err)
{
    (void)reason;
    (void)err;
    hconn *h = cp_conn_user(c);
    free(h->in);
    h->in = NULL;
    h->in_len = h->in_cap = 0;
}

/* ---- command line ------------------------------------------------------------------------ */

static void usage(FILE *f)
{
    fprintf(f, "usage: cport-httpd --root DIR [options]\n"
               "  --root DIR              document root (required)\n"
               "  --port N                TCP port (default 8080; 0 = any, printed at start)\n"
               "  --bind ADDR             IPv4 or IPv6 address to listen on (default 0.0.0.0;\n"
               "                          :: is every address of both families)\n"
               "  --threads N             worker threads (default: online CPUs)\n"
               "  --backend B             auto, io_uring or epoll (default auto)\n"
               "  --no-access-log         no access log lines on stdout (a stdout that\n"
               "                          does not take them blocks no worker: lines past\n"
               "                          a 256 KiB queue are dropped and counted)\n"
               "  --header-timeout MS     a request head must arrive within MS of its first\n"
               "                          byte (default 10000), else 408 and close; for a head\n"
               "                          pipelined behind responses still being sent, within\n"
               "                          MS of the last one's end\n"
               "  --keepalive-timeout MS  close a connection idle this long between requests\n"
               "                          (default 30000); while responses are being sent,\n"
               "                          cut a client that acknowledged nothing for a period\n"
               "                          (checked every MS: cut 1 to 2 periods after its last\n"
               "                          progress)\n"
               "  --max-conns N           connections beyond N are closed at once (default: none)\n"
               "  --dotfiles              also serve paths with a segment starting with '.'\n"
               "                          (.git/, .env, ...); by default they get 404, except\n"
               "                          /.well-known/ (RFC 8615: public site metadata)\n"
               "  --shutdown-deadline MS  how long SIGTERM lets responses drain (default 5000)\n"
               "  --help                  this text\n"
               "SIGINT/SIGTERM/SIGHUP shut down gracefully and exit 0; SIGUSR1 prints the\n"
               "counters.\n");
}

static int parse_uint(const char *s, unsigned long max, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *s == 0 || *end || v > max || *s == '-')
        return -1;
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->so.port = 8080;
    cfg->so.bind = "0.0.0.0";
    cfg->access_log = true;
    cfg->header_ms = 10000;
    cfg->keepalive_ms = 30000;
    cfg->shutdown_ms = 5000;
    cfg->root_fd = -1;
    enum {
        O_ROOT = 1,
        O_PORT,
        O_BIND,
        O_THREADS,
        O_BACKEND,
        O_NOLOG,
        O_HEADER,
        O_KEEPALIVE,
        O_MAXCONNS,
        O_SHUTDOWN,
        O_DOTFILES,
        O_HELP
    };
    static const struct option opts[] = {{"root", required_argument, 0, O_ROOT},
                                         {"port", required_argument, 0, O_PORT},
                                         {"bind", required_argument, 0, O_BIND},
                                         {"threads", required_argument, 0, O_THREADS},
                                         {"backend", required_argument, 0, O_BACKEND},
                                         {"no-access-log", no_argument, 0, O_NOLOG},
                                         {"header-timeout", required_argument, 0, O_HEADER},
                                         {"keepalive-timeout", required_argument, 0, O_KEEPALIVE},
                                         {"max-conns", required_argument, 0, O_MAXCONNS},
                                         {"shutdown-deadline", required_argument, 0, O_SHUTDOWN},
                                         {"dotfiles", no_argument, 0, O_DOTFILES},
                                         {"help", no_argument, 0, O_HELP},
                                         {0, 0, 0, 0}};
    int ch;
    unsigned long v;
    cp_server_options *o = &cfg->so;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        bool ok = true;
        switch (ch) {
        case O_ROOT:
            cfg->root = optarg;
            break;
        case O_PORT:
            ok = parse_uint(optarg, 65535, &v) == 0;
            o->port = (uint16_t)v;
            break;
        case O_BIND:
            ok = bind_address_ok(optarg); /* not a name */
            o->bind = optarg;
            break;
        case O_THREADS:
            ok = parse_uint(optarg, 1024, &v) == 0 && v > 0;
            o->threads = (unsigned)v;
            break;
        case O_BACKEND:
            if (strcmp(optarg, "io_uring") == 0)
                o->backend = CP_BACKEND_IO_URING;
            else if (strcmp(optarg, "epoll") == 0)
                o->backend = CP_BACKEND_EPOLL;
            else if (strcmp(optarg, "auto") == 0)
                o->backend = CP_BACKEND_AUTO;
            else
                ok = false;
            break;
        case O_NOLOG:
            cfg->access_log = false;
            break;
        case O_HEADER:
            ok = parse_uint(optarg, 86400000, &v) == 0 && v > 0;
            cfg->header_ms = (unsigned)v;
            break;
        case O_KEEPALIVE:
            ok = parse_uint(optarg, 86400000, &v) == 0 && v > 0;
            cfg->keepalive_ms = (unsigned)v;
            break;
        case O_MAXCONNS:
            ok = parse_uint(optarg, 100000000, &v) == 0;
            o->max_conns = (unsigned)v;
            break;
        case O_SHUTDOWN:
            ok = parse_uint(optarg, 3600000, &v) == 0;
            cfg->shutdown_ms = (unsigned)v;
            break;
        case O_DOTFILES:
            cfg->dotfiles = true;
            break;
        case O_HELP:
            usage(stdout);
            exit(0);
        default:
            ok = false;
        }
        if (!ok) {
            if (ch != '?')
                fprintf(stderr, "cport-httpd: bad value for --%s: %s\n", opts[ch - 1].name,
                        optarg ? optarg : "");
            return -1;
        }
    }
    if (optind != argc)
        return -1;
    if (!cfg->root) {
        fprintf(stderr, "cport-httpd: --root is required\n");
        return -1;
    }
    return 0;
}

static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void print_stats(cp_server *sv, FILE *f)
{
    cp_server_stats s;
    cp_server_get_stats(sv, &s);
    fprintf(f,
            "cport-httpd: conns_open=%llu conns_total=%llu conns_rejected=%llu "
            "conns_reaped=%llu bytes_in=%llu bytes_out=%llu completions=%llu "
            "backpressure_events=%llu allocations=%llu access_log_dropped=%llu\n",
            (unsigned long long)s.conns_open, (unsigned long long)s.conns_total,
            (unsigned long long)s.conns_rejected, (unsigned long long)s.conns_reaped,
            (unsigned long long)s.bytes_in, (unsigned long long)s.bytes_out,
            (unsigned long long)s.completions, (unsigned long long)s.backpressure_events,
            (unsigned long long)s.allocations, (unsigned long long)log_dropped());
    fflush(f);
}

int main(int argc, char **argv)
{
    config cfg;
    if (parse_args(argc, argv, &cfg) < 0) {
        usage(stderr);
        return 2;
    }
    int r;
    cfg.root_fd = open(cfg.root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cfg.root_fd < 0) {
        fprintf(stderr, "cport-httpd: cannot open the root %s: %s\n", cfg.root, strerror(errno));
        return 1;
    }
    raise_fd_limit();
    if (cfg.access_log)
        log_appends();
    /* Signals are taken synchronously by main; workers never see them. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGHUP); /* the terminal went away: shut down cleanly, not die */
    sigaddset(&sigs, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (cfg.access_log && (r = log_start()) < 0) {
        fprintf(stderr, "cport-httpd: cannot start the logger thread: %s\n", strerror(-r));
        close(cfg.root_fd);
        return 1;
    }

    cp_server_callbacks cb = {.on_open = on_open,
                              .on_data = on_data,
                              .on_sent = on_sent,
                              .on_close = on_close,
                              .on_timeout = on_timeout};
    cfg.so.user = &cfg;
    cfg.so.conn_user_size = sizeof(hconn);
    cfg.so.conn_deadlines = true;
    cp_server *sv;
    r = cp_server_create(&sv, &cfg.so, &cb);
    if (r == 0)
        r = cp_server_start(sv);
    if (r < 0) {
        fprintf(stderr, "cport-httpd: cannot start: %s\n", cp_strerror(r));
        close(cfg.root_fd);
        return 1;
    }
    const cp_server_options *o = &cfg.so;
    printf("cport-httpd: backend=%s threads=%u bind=%s port=%u root=%s access-log=%s "
           "header-timeout=%ums keepalive-timeout=%ums max-conns=%u dotfiles=%s\n",
           cp_port_backend_name(cp_server_port(sv)),
           o->threads ? o->threads : (unsigned)sysconf(_SC_NPROCESSORS_ONLN), o->bind,
           cp_server_listen_port(sv), cfg.root, cfg.access_log ? "on" : "off", cfg.header_ms,
           cfg.keepalive_ms, o->max_conns, cfg.dotfiles ? "on" : "off");
    char at[INET6_ADDRSTRLEN + 16];
    printf("listening on %s\n",
           address_port_text(at, sizeof at, o->bind, cp_server_listen_port(sv)));
    fflush(stdout);

    int sig;
    for (;;) {
        sigwait(&sigs, &sig);
        if (sig != SIGUSR1)
            break;
        print_stats(sv, stderr);
    }
    r = cp_server_shutdown(sv, cfg.shutdown_ms);
    /* The access log first; if stdout is stuck, the last lines go to stderr instead. */
    uint64_t dropped = 0, unwritten = 0;
    FILE *out = stdout;
    if (cfg.access_log && !log_stop(&dropped, &unwritten))
        out = stderr;
    print_stats(sv, out);
    cp_server_stats st;
    cp_server_get_stats(sv, &st);
    fprintf(out, "cport-httpd: %s: accepted=%llu rejected=%llu closed=%llu; shut down %s\n",
            strsignal(sig), (unsigned long long)st.conns_total,
            (unsigned long long)st.conns_rejected,
            (unsigned long long)(st.conns_total - st.conns_open),
            r == 0 ? "cleanly" : "at the deadline (connections cut)");
    fflush(out);
    if (dropped)
        fprintf(stderr, "cport-httpd: access log: %llu lines dropped (stdout did not keep up)\n",
                (unsigned long long)dropped);
    if (out == stderr)
        fprintf(stderr,
                "cport-httpd: access log: %llu lines not written at exit (stdout blocked for "
                "%d ms)\n",
                (unsigned long long)unwritten, LOG_STALL_MS);
    cp_server_destroy(sv);
    close(cfg.root_fd);
    return 0;
}
