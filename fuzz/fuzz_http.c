/* Fuzz cport-httpd's HTTP layer (tools/cport-httpd/http.c).
 *
 * The input is used as: a stream of pipelined request heads (parsed one-shot, byte by byte
 * and in relocated chunks, which must all agree), a request path, an HTTP-date, a Range
 * value and a file name; every result is checked against the invariants the server relies
 * on (slices inside the head, verdicts within the limits, resolved paths that cannot climb,
 * ranges inside the file, well-formed response heads). Any violation traps. */
/* fuzz-sources: tools/cport-httpd/http.c */
#include "cport-httpd/http.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ASSERT(c)                                                                                  \
    do {                                                                                           \
        if (!(c))                                                                                  \
            __builtin_trap();                                                                      \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool within(http_slice s, const char *base, size_t len)
{
    return s.ptr >= base && s.ptr + s.len <= base + len;
}

static void check_path(const http_path *p)
{
    ASSERT(p->len < HTTP_PATH_MAX && p->buf[p->len] == '\0' && strlen(p->buf) == p->len);
    if (p->len == 0)
        return;
    ASSERT(p->buf[0] != '/' && p->buf[p->len - 1] != '/');
    const char *seg = p->buf, *end = p->buf + p->len;
    bool dot = false; /* some segment starts with '.', a first ".well-known" aside */
    while (seg < end) {
        const char *sl = memchr(seg, '/', (size_t)(end - seg));
        size_t l = sl ? (size_t)(sl - seg) : (size_t)(end - seg);
        ASSERT(l > 0);
        if (seg[0] == '.' && !(seg == p->buf && l == 11 && memcmp(seg, ".well-known", 11) == 0))
            dot = true;
        ASSERT(!(l == 1 && seg[0] == '.'));
        ASSERT(!(l == 2 && seg[0] == '.' && seg[1] == '.'));
        for (size_t i = 0; i < l; i++) {
            unsigned char c = (unsigned char)seg[i];
            ASSERT(c >= 0x20 && c != 0x7f && c != '\\');
        }
        seg += l + 1;
    }
    ASSERT(http_path_is_dotfile(p) == dot);
}

static void check_head(const char *buf, int n, size_t cap)
{
    if (n == -ENOSPC || n == -EINVAL)
        return;
    ASSERT(n > 0 && (size_t)n <= cap);
    ASSERT(memcmp(buf, "HTTP/1.1 ", 9) == 0);
}

static void check_formatting(const http_request *req, const uint8_t *data, size_t size)
{
    static const int statuses[] = {200, 206, 304, 400, 403, 404, 405, 408, 412,
                                   413, 414, 416, 431, 500, 501, 505, 302};
    uint64_t x = 0;
    memcpy(&x, data, size < 8 ? size : 8);
    http_response r = {
        .status = statuses[x % (sizeof statuses / sizeof statuses[0])],
        .keep_alive = req->keep_alive,
        .date = (time_t)(x >> 3) - (time_t)(1ull << 40),
        .content_type = http_mime_type(req->path.ptr, req->path.len),
        .has_content_length = x & 1,
        .content_length = x,
        .has_last_modified = x & 2,
        .last_modified = (time_t)x,
        .accept_ranges = x & 4,
        .range_first = x >> 8,
        .range_last = x >> 4,
        .complete_length = x,
    };
    char buf[512];
    size_t cap = (x >> 12) % (sizeof buf + 1);
    int n = http_format_head(&r, buf, sizeof buf);
    check_head(buf, n, sizeof buf);
    if (n > 0) {
        ASSERT(memcmp(buf + n - 4, "\r\n\r\n", 4) == 0);
        for (int i = 0; i < n; i++)
            ASSERT(buf[i] != '\n' || (i > 0 && buf[i - 1] == '\r'));
        int m = http_format_head(&r, buf, cap);
        ASSERT(m == ((size_t)n <= cap ? n : -ENOSPC));
    }
    n = http_format_error(&r, x & 8, buf, cap);
    check_head(buf, n, cap);
}

/* Everything the server does with a parsed request, minus the file system. */
static void check_request(const http_request *req, const char *base, size_t len,
                          const uint8_t *data, size_t size)
{
    ASSERT(req->head == base && req->head_len > 0 && req->head_len <= len);
    ASSERT(req->head_len <= HTTP_MAX_HEAD);
    ASSERT(base[req->head_len - 1] == '\n');
    ASSERT(req->status == 0 && req->content_length == 0);
    ASSERT(req->minor_version == 0 || req->minor_version == 1);
    ASSERT(req->nfields <= HTTP_MAX_FIELDS);
    size_t hl = req->head_len;
    ASSERT(within(req->method_name, base, hl) && req->method_name.len > 0);
    ASSERT(within(req->target, base, hl) && req->target.len > 0);
    ASSERT(req->path.ptr != NULL && req->path.len > 0);
    ASSERT(within(req->path, base, hl) || (req->path.len == 1 && req->path.ptr[0] == '/'));
    ASSERT(!req->query.ptr || within(req->query, req->target.ptr, req->target.len));
    ASSERT(!req->host.ptr || within(req->host, base, hl));
    if (req->minor_version == 1)
        ASSERT(req->host.ptr != NULL);
    if (req->method != HTTP_METHOD_OTHER) {
        ASSERT(req->path.ptr[0] == '/');
        ASSERT(!memchr(req->path.ptr, '?', req->path.len));
    }
    ASSERT(!req->range.present || req->method == HTTP_METHOD_GET);
    ASSERT(!(req->has_if_modified_since && req->has_if_none_match));
    ASSERT(!req->if_none_match_any || req->has_if_none_match);
    ASSERT(!req->if_match_any || req->has_if_match);
    ASSERT(!(req->has_if_unmodified_since && req->has_if_match));

    http_path p;
    int st = http_resolve_path(req->path.ptr, req->path.len, &p);
    ASSERT(st == 0 || st == 400 || st == 414);
    if (st == 0)
        check_path(&p);

    uint64_t fsize = 0, a = 0, b = 0;
    memcpy(&fsize, data, size < 8 ? size : 8);
    fsize >>= (fsize & 63);
    /* now: one second after the file's date (If-Range's date may match), or the same */
    http_range_result rr = http_request_range(req, fsize, req->if_range_date,
                                              req->if_range_date + (time_t)(fsize & 1), &a, &b);
    if (rr == HTTP_RANGE_PARTIAL)
        ASSERT(a <= b && b < fsize);
    if (!req->range.present)
        ASSERT(rr == HTTP_RANGE_FULL);
    (void)http_not_modified(req, (time_t)fsize);
    int pre = http_preconditions(req, (time_t)fsize);
    ASSERT(pre == 0 || pre == 304 || pre == 412);
    if (req->has_if_match && !req->if_match_any)
        ASSERT(pre == 412);
    if (pre != 412)
        ASSERT((pre == 304) == http_not_modified(req, (time_t)fsize));

    http_slice v;
    if (http_header_get(req, "host", &v))
        ASSERT(within(v, base, hl));
    if (http_header_get(req, "X", &v))
        ASSERT(within(v, base, hl));
    check_formatting(req, data, size);
}

static bool same(const http_request *a, const http_request *b)
{
    if (a->status != b->status || a->keep_alive != b->keep_alive)
        return false;
    if (a->status)
        return true;
#define OFF(r, f) ((r)->f.ptr ? (r)->f.ptr - (r)->head : -1)
    return a->head_len == b->head_len && a->method == b->method &&
           a->minor_version == b->minor_version && OFF(a, method_name) == OFF(b, method_name) &&
           OFF(a, target) == OFF(b, target) && a->target.len == b->target.len &&
           a->path.len == b->path.len && OFF(a, query) == OFF(b, query) &&
           a->query.len == b->query.len && OFF(a, host) == OFF(b, host) &&
           a->host.len == b->host.len && a->nfields == b->nfields &&
           a->has_if_modified_since == b->has_if_modified_since &&
           a->if_modified_since == b->if_modified_since && a->range.present == b->range.present &&
           a->range.first == b->range.first && a->range.last == b->range.last &&
           a->range.suffix_len == b->range.suffix_len && a->if_range == b->if_range &&
           a->has_if_match == b->has_if_match && a->if_match_any == b->if_match_any &&
           a->has_if_unmodified_since == b->has_if_unmodified_since &&
           a->if_unmodified_since == b->if_unmodified_since;
#undef OFF
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;

    /* 1. one-shot, through the pipeline */
    http_request first;
    http_parse_status rfirst = http_parse_request(s, size, &first);
    {
        http_parser p;
        http_parser_init(&p);
        size_t off = 0;
        for (int i = 0; i < 32; i++) {
            http_request req;
            http_parse_status r = http_parse(&p, s + off, size - off, &req);
            if (r == HTTP_PARSE_DONE) {
                check_request(&req, s + off, size - off, data, size);
                off += req.head_len;
                continue;
            }
            if (r == HTTP_PARSE_ERROR) {
                ASSERT(!req.keep_alive);
                ASSERT(req.status == 400 || req.status == 413 || req.status == 414 ||
                       req.status == 431 || req.status == 505);
            } else {
                ASSERT(size - off < HTTP_MAX_HEAD); /* a verdict within the limit */
            }
            break;
        }
    }

    /* 2. byte by byte: the same verdict, exactly when the head completes */
    {
        http_parser p;
        http_parser_init(&p);
        http_request req;
        http_parse_status r = HTTP_PARSE_NEED_MORE;
        size_t k;
        for (k = 0; k <= size; k++) {
            r = http_parse(&p, s, k, &req);
            if (r != HTTP_PARSE_NEED_MORE)
                break;
        }
        ASSERT(r == rfirst);
        if (r == HTTP_PARSE_DONE)
            ASSERT(k == first.head_len && same(&req, &first));
        if (r == HTTP_PARSE_ERROR)
            ASSERT(req.status == first.status);
    }

    /* 3. in chunks, each call on a fresh exact-size copy (the buffer moves; over-reads trap) */
    {
        http_parser p;
        http_parser_init(&p);
        http_request req;
        http_parse_status r = HTTP_PARSE_NEED_MORE;
        size_t k = 0, step = 1 + (size ? data[size - 1] % 64 : 0) * (size / 64 + 1);
        char *prev = NULL;
        while (r == HTTP_PARSE_NEED_MORE && k < size) {
            k = k + step < size ? k + step : size;
            char *cur = malloc(k ? k : 1);
            ASSERT(cur != NULL);
            memcpy(cur, s, k);
            free(prev);
            prev = cur;
            r = http_parse(&p, cur, k, &req);
        }
        if (size == 0)
            r = http_parse(&p, s, 0, &req);
        ASSERT(r == rfirst);
        if (r == HTTP_PARSE_DONE) {
            ASSERT(req.head == prev && same(&req, &first));
            check_request(&req, prev, k, data, size);
        }
        free(prev);
    }

    /* 4. the raw input as a request path */
    {
        http_path p;
        int st = http_resolve_path(s, size, &p);
        ASSERT(st == 0 || st == 400 || st == 414);
        if (st == 0)
            check_path(&p);
        const char *mt = http_mime_type(s, size);
        ASSERT(mt != NULL && strlen(mt) < 64);
    }

    /* 5. the raw input as an HTTP-date: round trip through IMF-fixdate */
    {
        time_t t;
        if (http_date_parse_at(s, size, 1735689600, &t)) {
            ASSERT(t >= -62135596800 && t <= 253402300800); /* 0001-01-01 .. 10000-01-01 */
            if (t >= 0 && t <= 253402300799) {
                char buf[HTTP_DATE_LEN + 1];
                ASSERT(http_date_format(t, buf) == HTTP_DATE_LEN && buf[HTTP_DATE_LEN] == 0);
                time_t back;
                ASSERT(http_date_parse(buf, HTTP_DATE_LEN, &back) && back == t);
            }
        }
    }

    /* 6. the raw input as a Range value */
    {
        http_range r;
        bool ok = http_range_parse(s, size, &r);
        ASSERT(ok == r.present);
        if (ok && !r.suffix)
            ASSERT(r.first <= r.last);
        uint64_t fsize = size ? (uint64_t)data[0] * 3 : 0, a = 0, b = 0;
        http_range_result rr = http_range_resolve(&r, fsize, &a, &b);
        if (rr == HTTP_RANGE_PARTIAL)
            ASSERT(ok && a <= b && b < fsize);
        if (!ok)
            ASSERT(rr == HTTP_RANGE_FULL);
    }
    return 0;
}
