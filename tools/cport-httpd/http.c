/* cport-httpd's HTTP/1.1 layer: see http.h for the contract and the protocol decisions. */
#include "cport-httpd/http.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* ---- character classes ----------------------------------------------------------------------- */

enum {
    C_TCHAR = 1,  /* token: ALPHA DIGIT ! # $ % & ' * + - . ^ _ ` | ~ */
    C_HEAD = 2,   /* may appear inside a head line: SP HTAB VCHAR obs-text */
    C_TARGET = 4, /* may appear in a request-target: VCHAR (0x21-0x7E) */
    C_HOST = 8,   /* uri-host [":" port]: unreserved sub-delims % : [ ] */
    C_HEX = 16,   /* HEXDIG */
    C_PLAIN = 32, /* copied as is into a resolved path: 0x20-0x7E except % / \ */
};

static const uint8_t cls[256] = {
    0,  0,  0,  0,  0,  0,  0,  0,  0,  2,  0,  0,  0,  0,  0,  0,  /* 00 */
    0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  /* 10 */
    34, 47, 38, 39, 47, 15, 47, 47, 46, 46, 47, 47, 46, 47, 47, 6,  /* 20 */
    63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 46, 46, 38, 46, 38, 38, /* 30 */
    38, 63, 63, 63, 63, 63, 63, 47, 47, 47, 47, 47, 47, 47, 47, 47, /* 40 */
    47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 46, 6,  46, 39, 47, /* 50 */
    39, 63, 63, 63, 63, 63, 63, 47, 47, 47, 47, 47, 47, 47, 47, 47, /* 60 */
    47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 38, 39, 38, 47, 0,  /* 70 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* 80 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* 90 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* a0 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* b0 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* c0 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* d0 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* e0 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* f0 */
};

static inline unsigned char lower(unsigned char c)
{
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c + 32) : c;
}

/* s[0..n) equals the lowercase ASCII string `lc`, ignoring case. */
static inline bool eq_nocase(const unsigned char *s, const char *lc, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (lower(s[i]) != (unsigned char)lc[i])
            return false;
    return true;
}

/* The index of the first byte in u[i..end) that may need a closer look (a control
 * character, CR, LF, HTAB or DEL; the SSE2 variant also stops at bytes >= 0x80), scanning
 * whole blocks only: a shorter tail is returned unscanned, at its start. */
#if defined(__SSE2__)
static inline size_t skip_plain(const unsigned char *u, size_t i, size_t end)
{
    const __m128i sp = _mm_set1_epi8(0x20), del = _mm_set1_epi8(0x7f);
    while (end - i >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(u + i));
        /* a signed compare: below 0x20 or >= 0x80 */
        __m128i odd = _mm_or_si128(_mm_cmplt_epi8(v, sp), _mm_cmpeq_epi8(v, del));
        unsigned m = (unsigned)_mm_movemask_epi8(odd);
        if (m)
            return i + (size_t)__builtin_ctz(m);
        i += 16;
    }
    return i;
}
#else
static inline size_t skip_plain(const unsigned char *u, size_t i, size_t end)
{
    /* Eight bytes at a time: subtracting 0x20 from every byte borrows into a byte's top bit
     * when that byte is below 0x20 (bytes >= 0x80 are masked out by "& ~w"), and no borrow
     * reaches a byte below the first such one, so the lowest flagged byte is exact. 0x7F is
     * found the same way, as a zero byte of w ^ 0x7F7F... */
    const uint64_t ones = 0x0101010101010101u, highs = 0x8080808080808080u;
    while (end - i >= 8) {
        uint64_t w;
        memcpy(&w, u + i, 8);
        uint64_t del = w ^ (ones * 0x7f);
        uint64_t m = (((w - ones * 0x20) & ~w) | ((del - ones) & ~del)) & highs;
        if (m) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            return i + (size_t)__builtin_ctzll(m) / 8;
#else
            return i;
#endif
        }
        i += 8;
    }
    return i;
}
#endif

/* The field name s[0..n) (tchars) is `lc` (lowercase letters and '-'), ignoring case. For a
 * tchar c, c | 0x20 equals a lowercase letter only for that letter in either case, and equals
 * '-' only for '-' (the other candidate, CR, is no tchar). */
static inline bool name_is(const unsigned char *s, const char *lc, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((s[i] | 0x20) != (unsigned char)lc[i])
            return false;
    return true;
}

static inline bool is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

static inline bool is_ows(unsigned char c)
{
    return c == ' ' || c == '\t';
}

static inline int hexval(unsigned char c)
{
    if (c <= '9')
        return c - '0';
    return (c | 0x20) - 'a' + 10;
}

/* Trim SP/HTAB around [*a, *b). */
static inline void trim(const unsigned char *u, size_t *a, size_t *b)
{
    while (*a < *b && is_ows(u[*a]))
        (*a)++;
    while (*b > *a && is_ows(u[*b - 1]))
        (*b)--;
}

/* 1*DIGIT, saturating at UINT64_MAX. */
static bool parse_u64(const unsigned char *s, size_t n, uint64_t *out)
{
    if (n == 0)
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (!is_digit(s[i]))
            return false;
        unsigned d = s[i] - '0';
        v = v > (UINT64_MAX - d) / 10 ? UINT64_MAX : v * 10 + d;
    }
    *out = v;
    return true;
}

/* ---- request parsing ------------------------------------------------------------------------- */

enum { ST_START, ST_FIELDS, ST_ERROR };

#define NO_OFF SIZE_MAX

void http_parser_init(http_parser *p)
{
    memset(p, 0, sizeof *p);
    p->state = ST_START;
    p->query_off = p->host_off = p->authority_off = NO_OFF;
}

static http_parse_status fail(http_parser *p, http_request *req, int status)
{
    p->state = ST_ERROR;
    p->error = status;
    memset(req, 0, sizeof *req);
    req->status = status;
    req->keep_alive = false;
    return HTTP_PARSE_ERROR;
}

/* Is [s, s+n) a valid uri-host [":" port] as far as this server cares: only the characters
 * of reg-name, IP-literal and port. */
static bool valid_host(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!(cls[s[i]] & C_HOST))
            return false;
    return true;
}

/* The request-target [t, e) of a request whose method is known. Returns 0 or a status. */
static int parse_target(http_parser *p, const unsigned char *u, size_t t, size_t e)
{
    if (p->method == HTTP_METHOD_OTHER) {
        /* Only a 405 is coming: any form will do, but split an origin-form query anyway. */
        p->path_off = t;
        p->path_len = e - t;
        if (u[t] == '/') {
            const unsigned char *q = memchr(u + t, '?', e - t);
            if (q) {
                p->path_len = (size_t)(q - u) - t;
                p->query_off = (size_t)(q - u) + 1;
                p->query_len = e - p->query_off;
            }
        }
        return 0;
    }
    if (memchr(u + t, '#', e - t))
        return 400; /* a fragment is never part of a request-target */
    size_t path = t;
    if (u[t] != '/') {
        /* absolute-form: "http://" or "https://" authority [path-abempty] ["?" query] */
        size_t a;
        if (e - t >= 7 && eq_nocase(u + t, "http://", 7))
            a = t + 7;
        else if (e - t >= 8 && eq_nocase(u + t, "https://", 8))
            a = t + 8;
        else
            return 400;
        size_t ae = a;
        while (ae < e && u[ae] != '/' && u[ae] != '?')
            ae++;
        if (ae == a || memchr(u + a, '@', ae - a) || !valid_host(u + a, ae - a))
            return 400; /* empty host, userinfo (RFC 9110 4.2.4), bad characters */
        p->authority_off = a;
        p->authority_len = ae - a;
        path = ae;
    }
    const unsigned char *q = memchr(u + path, '?', e - path);
    size_t pe = q ? (size_t)(q - u) : e;
    if (pe == path) {
        p->path_root = true; /* "http://host" or "http://host?q": the path is "/" */
    } else {
        p->path_off = path;
        p->path_len = pe - path;
    }
    if (q) {
        p->query_off = pe + 1;
        p->query_len = e - pe - 1;
    }
    return 0;
}

/* The request line [s, e) (not empty; u[e] is its CR or LF). Returns 0 or a status. */
static int parse_request_line(http_parser *p, const unsigned char *u, size_t s, size_t e)
{
    size_t i = s;
    while (cls[u[i]] & C_TCHAR) /* u[e] is CR or LF: it stops the loop */
        i++;
    if (i == s || i == e || u[i] != ' ')
        return 400;
    p->method_off = s;
    p->method_len = i - s;
    if (i - s == 3 && memcmp(u + s, "GET", 3) == 0)
        p->method = HTTP_METHOD_GET;
    else if (i - s == 4 && memcmp(u + s, "HEAD", 4) == 0)
        p->method = HTTP_METHOD_HEAD;
    else
        p->method = HTTP_METHOD_OTHER;

    size_t t = ++i;
    while (cls[u[i]] & C_TARGET) /* u[e] is CR or LF */
        i++;
    if (i == t || i == e || u[i] != ' ')
        return 400;
    size_t te = i++;

    if (e - i != 8 || memcmp(u + i, "HTTP/", 5) != 0 || !is_digit(u[i + 5]) || u[i + 6] != '.' ||
        !is_digit(u[i + 7]))
        return 400;
    if (u[i + 5] != '1')
        return 505;
    p->minor_version = u[i + 7] == '0' ? 0 : 1;
    p->target_off = t;
    p->target_len = te - t;
    return parse_target(p, u, t, te);
}

static void parse_connection(http_parser *p, const unsigned char *u, size_t vs, size_t ve)
{
    size_t i = vs;
    while (i < ve) {
        size_t a = i;
        while (i < ve && u[i] != ',')
            i++;
        size_t b = i++;
        trim(u, &a, &b);
        if (b - a == 5 && eq_nocase(u + a, "close", 5))
            p->conn_close = true;
        else if (b - a == 10 && eq_nocase(u + a, "keep-alive", 10))
            p->conn_keep_alive = true;
    }
}

/* Content-Length: 1*DIGIT, or a list of identical ones. Returns 0 or 400. */
static int parse_content_length(http_parser *p, const unsigned char *u, size_t vs, size_t ve)
{
    size_t i = vs;
    do {
        size_t a = i;
        while (i < ve && u[i] != ',')
            i++;
        size_t b = i++;
        trim(u, &a, &b);
        uint64_t v;
        if (!parse_u64(u + a, b - a, &v))
            return 400;
        if (p->cl_seen && v != p->content_length)
            return 400;
        p->cl_seen = true;
        p->content_length = v;
    } while (i <= ve);
    return 0;
}

static void parse_if_range(http_parser *p, const char *v, size_t n)
{
    p->if_range_count++;
    if (p->if_range_count == 1 && http_date_parse(v, n, &p->if_range_date))
        p->if_range = HTTP_IF_RANGE_DATE;
    else
        p->if_range = HTTP_IF_RANGE_NOMATCH; /* entity-tag, garbage, or repeated */
}

/* One field line [s, e) (not empty; u[e] is its CR or LF). Returns 0 or a status. */
static int parse_field(http_parser *p, const unsigned char *u, size_t s, size_t e)
{
    size_t i = s;
    while (cls[u[i]] & C_TCHAR) /* u[e] is CR or LF: it stops the loop */
        i++;
    /* Covers obs-fold and whitespace after the start line (no name), whitespace before the
     * colon and invalid name characters (the name stops early on a non-colon). */
    if (i == s || i == e || u[i] != ':')
        return 400;
    size_t nlen = i - s;
    size_t vs = i + 1, ve = e;
    trim(u, &vs, &ve);
    const char *v = (const char *)u + vs;
    size_t vn = ve - vs;
    const unsigned char *name = u + s;

    switch (nlen) {
    case 4:
        if (name_is(name, "host", 4)) {
            if (++p->hosts > 1 || !valid_host(u + vs, vn))
                return 400;
            p->host_off = vs;
            p->host_len = vn;
        }
        break;
    case 5:
        if (name_is(name, "range", 5)) {
            p->range_count++;
            p->range_valid = http_range_parse(v, vn, &p->range);
        }
        break;
    case 8:
        if (name_is(name, "if-range", 8)) {
            parse_if_range(p, v, vn);
        } else if (name_is(name, "if-match", 8)) {
            /* No ETags are sent, so only "*" (one field, exactly) can match. */
            p->im_any = ++p->im_count == 1 && vn == 1 && v[0] == '*';
        }
        break;
    case 10:
        if (name_is(name, "connection", 10))
            parse_connection(p, u, vs, ve);
        break;
    case 13:
        if (name_is(name, "if-none-match", 13)) {
            p->inm = true;
            p->inm_any = ++p->inm_count == 1 && vn == 1 && v[0] == '*'; /* "*, ..." is no "*" */
        }
        break;
    case 14:
        if (name_is(name, "content-length", 14))
            return parse_content_length(p, u, vs, ve);
        break;
    case 17:
        if (name_is(name, "transfer-encoding", 17)) {
            p->te = true;
        } else if (name_is(name, "if-modified-since", 17)) {
            p->ims_count++;
            p->ims_valid = http_date_parse(v, vn, &p->ims);
        }
        break;
    case 19:
        if (name_is(name, "if-unmodified-since", 19)) {
            p->ius_count++;
            p->ius_valid = http_date_parse(v, vn, &p->ius);
        }
        break;
    default:
        break;
    }
    return 0;
}

static http_slice slice(const char *buf, size_t off, size_t len)
{
    http_slice s = {NULL, 0};
    if (off != NO_OFF) {
        s.ptr = buf + off;
        s.len = len;
    }
    return s;
}

/* The empty line ending the head was found; its LF is at end - 1. */
static http_parse_status finish(http_parser *p, const char *buf, size_t end, http_request *req)
{
    if (p->te)
        return fail(p, req, p->cl_seen ? 400 : 413);
    if (p->content_length > 0)
        return fail(p, req, 413);
    if (p->minor_version == 1 && p->hosts == 0)
        return fail(p, req, 400);

    req->method = p->method;
    req->minor_version = p->minor_version;
    if (p->minor_version == 1)
        req->keep_alive = !p->conn_close;
    else
        req->keep_alive = p->conn_keep_alive && !p->conn_close;
    req->status = 0;
    req->method_name = slice(buf, p->method_off, p->method_len);
    req->target = slice(buf, p->target_off, p->target_len);
    if (p->path_root) {
        req->path.ptr = "/";
        req->path.len = 1;
    } else {
        req->path = slice(buf, p->path_off, p->path_len);
    }
    req->query = slice(buf, p->query_off, p->query_len);
    if (p->authority_off != NO_OFF)
        req->host = slice(buf, p->authority_off, p->authority_len);
    else
        req->host = slice(buf, p->host_off, p->host_len);
    req->has_if_none_match = p->inm;
    req->if_none_match_any = p->inm_any;
    req->has_if_modified_since = p->ims_count == 1 && p->ims_valid && !p->inm;
    req->if_modified_since = req->has_if_modified_since ? p->ims : 0;
    req->has_if_match = p->im_count > 0;
    req->if_match_any = p->im_count == 1 && p->im_any;
    /* RFC 9110 13.1.4: ignored with If-Match, when invalid, or a list (repeated) */
    req->has_if_unmodified_since = p->ius_count == 1 && p->ius_valid && p->im_count == 0;
    req->if_unmodified_since = req->has_if_unmodified_since ? p->ius : 0;
    memset(&req->range, 0, sizeof req->range);
    if (p->method == HTTP_METHOD_GET && p->range_count == 1 && p->range_valid)
        req->range = p->range;
    req->if_range = p->if_range;
    req->if_range_date = p->if_range == HTTP_IF_RANGE_DATE ? p->if_range_date : 0;
    req->content_length = p->content_length;
    req->head = buf;
    req->head_len = end;
    req->nfields = p->nfields;
    http_parser_init(p);
    return HTTP_PARSE_DONE;
}

/* The line starting at pos cannot end before `lim`: which status says so. */
static int limit_status(const http_parser *p, const unsigned char *u, size_t pos, size_t lim)
{
    if (p->state == ST_FIELDS || lim < pos + HTTP_MAX_REQUEST_LINE)
        return 431; /* a field line, or the head as a whole */
    const unsigned char *sp1 = memchr(u + pos, ' ', lim - pos);
    if (!sp1)
        return 400; /* an endless method */
    const unsigned char *t = sp1 + 1;
    const unsigned char *sp2 = memchr(t, ' ', (size_t)(u + lim - t));
    /* 414 while still inside the request-target, or when only the version was left (the
     * target is what made the line long); 400 for junk after the target. */
    if (!sp2 || u + lim - (sp2 + 1) <= (ptrdiff_t)sizeof "HTTP/1.1\r")
        return 414;
    return 400;
}

http_parse_status http_parse(http_parser *p, const char *buf, size_t len, http_request *req)
{
    const unsigned char *u = (const unsigned char *)buf;
    if (p->state == ST_ERROR)
        return fail(p, req, p->error);
    if (len < p->scan)
        http_parser_init(p); /* the caller went back: start over */

    for (;;) {
        size_t pos = p->pos;
        size_t lim = pos + (p->state == ST_FIELDS ? HTTP_MAX_FIELD_LINE : HTTP_MAX_REQUEST_LINE);
        if (lim > HTTP_MAX_HEAD)
            lim = HTTP_MAX_HEAD;
        size_t end = len < lim ? len : lim;
        size_t i = p->scan;

        /* Find the LF ending this line, checking every byte on the way (once): a block at a
         * time while they are all plain, one at a time around anything else. */
        for (;;) {
            i = skip_plain(u, i, end);
            if (i >= end)
                goto incomplete;
            unsigned char c = u[i];
            if (cls[c] & C_HEAD) {
                i++;
                continue;
            }
            if (c == '\n')
                break;
            if (c == '\r') {
                if (i + 1 >= end)
                    goto incomplete; /* look at this CR again with the next byte */
                if (u[i + 1] != '\n')
                    return fail(p, req, 400); /* bare CR */
                i++;
                break;
            }
            return fail(p, req, 400); /* NUL, DEL or another control character */
        }

        size_t eol = i, cend = i;
        if (cend > pos && u[cend - 1] == '\r')
            cend--;
        p->pos = p->scan = eol + 1;
        int st;
        if (p->state == ST_START) {
            if (cend == pos)
                continue; /* an empty line before the request line (RFC 9112 2.2) */
            st = parse_request_line(p, u, pos, cend);
            p->state = ST_FIELDS;
        } else {
            if (cend == pos)
                return finish(p, buf, eol + 1, req);
            if (p->nfields == HTTP_MAX_FIELDS)
                return fail(p, req, 431);
            p->nfields++;
            st = parse_field(p, u, pos, cend);
        }
        if (st)
            return fail(p, req, st);
        continue;

    incomplete:
        if (end == lim)
            return fail(p, req, limit_status(p, u, pos, lim));
        p->scan = i;
        return HTTP_PARSE_NEED_MORE;
    }
}

http_parse_status http_parse_request(const char *buf, size_t len, http_request *req)
{
    http_parser p;
    http_parser_init(&p);
    return http_parse(&p, buf, len, req);
}

bool http_header_get(const http_request *req, const char *name, http_slice *value)
{
    const unsigned char *u = (const unsigned char *)req->head;
    size_t n = req->head_len, nlen = strlen(name);
    bool first = true;
    for (size_t pos = 0; pos < n;) {
        const unsigned char *lf = memchr(u + pos, '\n', n - pos);
        size_t eol = lf ? (size_t)(lf - u) : n;
        size_t e = eol > pos && u[eol - 1] == '\r' ? eol - 1 : eol;
        size_t s = pos;
        pos = eol + 1;
        if (e == s)
            continue; /* leading empty lines, the final empty line */
        if (first) {
            first = false; /* the request line */
            continue;
        }
        if (e - s > nlen && u[s + nlen] == ':') {
            size_t i = 0;
            while (i < nlen && lower(u[s + i]) == lower((unsigned char)name[i]))
                i++;
            if (i == nlen) {
                size_t vs = s + nlen + 1, ve = e;
                trim(u, &vs, &ve);
                value->ptr = (const char *)u + vs;
                value->len = ve - vs;
                return true;
            }
        }
    }
    return false;
}

/* ---- ranges and conditionals ----------------------------------------------------------------- */

bool http_range_parse(const char *value, size_t len, http_range *r)
{
    const unsigned char *u = (const unsigned char *)value;
    memset(r, 0, sizeof *r);
    if (len < 6 || !eq_nocase(u, "bytes=", 6))
        return false;
    unsigned count = 0;
    size_t i = 6;
    while (i < len) {
        size_t a = i;
        while (i < len && u[i] != ',')
            i++;
        size_t b = i++;
        trim(u, &a, &b);
        if (a == b)
            continue; /* an empty list element */
        if (++count > 1)
            return false; /* several ranges: ignore the field */
        const unsigned char *dash = memchr(u + a, '-', b - a);
        if (!dash)
            return false;
        size_t d = (size_t)(dash - u);
        if (d == a) {
            if (!parse_u64(u + d + 1, b - d - 1, &r->suffix_len))
                return false;
            r->suffix = true;
        } else {
            if (!parse_u64(u + a, d - a, &r->first))
                return false;
            r->last = UINT64_MAX;
            if (d + 1 < b && !parse_u64(u + d + 1, b - d - 1, &r->last))
                return false;
            if (r->last < r->first)
                return false; /* an invalid range-spec makes the whole field invalid */
        }
    }
    if (count != 1) {
        memset(r, 0, sizeof *r);
        return false;
    }
    r->present = true;
    return true;
}

http_range_result http_range_resolve(const http_range *r, uint64_t size, uint64_t *first,
                                     uint64_t *last)
{
    if (!r->present)
        return HTTP_RANGE_FULL;
    if (r->suffix) {
        if (r->suffix_len == 0)
            return HTTP_RANGE_UNSATISFIABLE;
        if (size == 0)
            return HTTP_RANGE_FULL;
        *first = r->suffix_len >= size ? 0 : size - r->suffix_len;
        *last = size - 1;
        return HTTP_RANGE_PARTIAL;
    }
    if (r->first >= size)
        return HTTP_RANGE_UNSATISFIABLE;
    *first = r->first;
    *last = r->last >= size ? size - 1 : r->last;
    return HTTP_RANGE_PARTIAL;
}

http_range_result http_request_range(const http_request *req, uint64_t size, time_t mtime,
                                     time_t now, uint64_t *first, uint64_t *last)
{
    if (!req->range.present)
        return HTTP_RANGE_FULL;
    /* A date is a strong validator only if the file was not modified in the second it was
     * looked at (RFC 9110 8.8.2.2): mtime has whole seconds, so a second change within
     * that second would keep the date, and the client would splice two versions. */
    if (req->if_range == HTTP_IF_RANGE_NOMATCH ||
        (req->if_range == HTTP_IF_RANGE_DATE && (req->if_range_date != mtime || mtime >= now)))
        return HTTP_RANGE_FULL;
    return http_range_resolve(&req->range, size, first, last);
}

bool http_not_modified(const http_request *req, time_t mtime)
{
    if (req->if_none_match_any)
        return true; /* RFC 9110 13.1.2: "*" is false when a representation exists */
    return req->has_if_modified_since && mtime <= req->if_modified_since;
}

int http_preconditions(const http_request *req, time_t mtime)
{
    /* RFC 9110 13.2.2, in its order: a failed If-Match or If-Unmodified-Since (412) wins
     * over a 304 from If-None-Match or If-Modified-Since. */
    if (req->has_if_match) {
        if (!req->if_match_any)
            return 412; /* an entity-tag: we send none, so none matches */
    } else if (req->has_if_unmodified_since && mtime > req->if_unmodified_since) {
        return 412;
    }
    return http_not_modified(req, mtime) ? 304 : 0;
}

/* ---- paths ----------------------------------------------------------------------------------- */

/* Is s[0..n) well-formed UTF-8 (RFC 3629: shortest form, no surrogates, <= U+10FFFF)? */
static bool valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            if (c == 0xE0)
                lo = 0xA0; /* overlong */
            else if (c == 0xED)
                hi = 0x9F; /* surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            if (c == 0xF0)
                lo = 0x90; /* overlong */
            else if (c == 0xF4)
                hi = 0x8F; /* > U+10FFFF */
        } else {
            return false; /* continuation byte, C0/C1 (overlong), F5..FF */
        }
        if (n - i <= k)
            return false;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return false;
        for (size_t j = 2; j <= k; j++)
            if (s[i + j] < 0x80 || s[i + j] > 0xBF)
                return false;
        i += k + 1;
    }
    return true;
}

static int resolve(const unsigned char *u, size_t len, http_path *out)
{
    const unsigned char *cut = memchr(u, '?', len);
    if (cut)
        len = (size_t)(cut - u);
    if ((cut = memchr(u, '#', len)))
        len = (size_t)(cut - u);
    if (len == 0 || u[0] != '/')
        return 400;

    char *o = out->buf;
    size_t n = 0, i = 0;
    bool dir = false, high = false;
    for (;;) {
        while (i < len && u[i] == '/')
            i++;
        if (i == len) {
            dir = true; /* the path ended with '/' */
            break;
        }
        /* Decode one segment, after a separator if it is not the first. */
        size_t mark = n;
        if (n > 0) {
            if (n >= HTTP_PATH_MAX - 1)
                return 414;
            o[n++] = '/';
        }
        size_t seg = n;
        while (i < len) {
            unsigned char c = u[i];
            if (cls[c] & C_PLAIN) {
                if (n >= HTTP_PATH_MAX - 1)
                    return 414;
                o[n++] = (char)c;
                i++;
                continue;
            }
            if (c == '/')
                break;
            if (c == '%') {
                if (len - i < 3 || !(cls[u[i + 1]] & C_HEX) || !(cls[u[i + 2]] & C_HEX))
                    return 400;
                c = (unsigned char)(hexval(u[i + 1]) << 4 | hexval(u[i + 2]));
                i += 3;
            } else {
                i++;
            }
            if (c < 0x20 || c == 0x7F || c == '/' || c == '\\')
                return 400; /* NUL and controls, an encoded slash, any backslash */
            high |= c >= 0x80;
            if (n >= HTTP_PATH_MAX - 1)
                return 414;
            o[n++] = (char)c;
        }
        size_t sl = n - seg;
        if (sl == 2 && o[seg] == '.' && o[seg + 1] == '.')
            return 400;
        if (sl == 1 && o[seg] == '.') {
            n = mark; /* drop "." */
            if (i == len) {
                dir = true; /* "/a/." names the directory */
                break;
            }
            continue;
        }
        if (i == len)
            break;
    }
    if (high && !valid_utf8((const unsigned char *)o, n))
        return 400;
    o[n] = '\0';
    out->len = n;
    out->is_dir = dir;
    return 0;
}

int http_resolve_path(const char *path, size_t len, http_path *out)
{
    int st = resolve((const unsigned char *)path, len, out);
    if (st != 0) {
        out->buf[0] = '\0';
        out->len = 0;
        out->is_dir = false;
    }
    return st;
}

bool http_path_is_dotfile(const http_path *path)
{
    static const char wk[] = ".well-known";
    const char *s = path->buf, *e = path->buf + path->len;
    if ((size_t)(e - s) >= sizeof wk - 1 && memcmp(s, wk, sizeof wk - 1) == 0 &&
        (s + sizeof wk - 1 == e || s[sizeof wk - 1] == '/'))
        s += sizeof wk - 1; /* the first segment, exactly (see http.h) */
    for (; s < e; s++)
        if (*s == '.' && (s == path->buf || s[-1] == '/'))
            return true;
    return false;
}

int http_status_from_errno(int err)
{
    switch (err) {
    case ENOENT:
    case ENOTDIR:
    case ENAMETOOLONG:
        return 404;
    case EACCES:
    case EPERM:
    case EXDEV:
    case ELOOP:
    case ENXIO:
    case ENODEV:
        return 403;
    default:
        return 500;
    }
}

/* openat2() beneath dirfd; returns the fd or -errno. Retries the transient EAGAIN a
 * concurrent rename can cause with RESOLVE_BENEATH, and EINTR. */
static int open_beneath(int dirfd, const char *path, uint64_t flags)
{
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = flags;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
    for (int tries = 0;; tries++) {
        long r = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
        if (r >= 0)
            return (int)r;
        int e = errno;
        if ((e != EAGAIN && e != EINTR) || tries == 16)
            return e > 0 ? -e : -EIO;
    }
}

/* Open rel beneath root (O_NONBLOCK so a FIFO cannot block) and fstat it: the fd or -errno. */
static int open_stat(int root, const char *rel, struct stat *st)
{
    int fd = open_beneath(root, *rel ? rel : ".", O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd >= 0 && fstat(fd, st) < 0) {
        int e = errno;
        close(fd);
        return e > 0 ? -e : -EIO;
    }
    return fd;
}

static int file_error(http_file *file, int err)
{
    file->err = err;
    return http_status_from_errno(err);
}

/* fd is a regular file: hand it over, blocking again. */
static int serve(http_file *file, int fd, const struct stat *st)
{
    if (fcntl(fd, F_SETFL, 0) < 0) {
        int e = errno;
        close(fd);
        file->err = e;
        return 500;
    }
    file->fd = fd;
    file->size = (uint64_t)st->st_size;
    file->mtime = st->st_mtim.tv_sec;
    return 0;
}

int http_open_beneath(int root_fd, const http_path *path, http_file *file)
{
    static const char index_name[] = "index.html";
    struct stat st;
    int fd, r;

    file->fd = -1;
    file->size = 0;
    file->mtime = 0;
    file->err = 0;
    file->index = false;
    if (path->len >= HTTP_PATH_MAX || path->buf[path->len] != '\0')
        return file_error(file, EINVAL); /* not from http_resolve_path() */

    if (!path->is_dir) {
        fd = open_stat(root_fd, path->buf, &st);
        if (fd < 0)
            return file_error(file, -fd);
        if (S_ISREG(st.st_mode))
            return serve(file, fd, &st);
        close(fd);
        if (!S_ISDIR(st.st_mode))
            return 403; /* FIFO, socket, device */
    }

    char idx[HTTP_PATH_MAX + sizeof index_name];
    size_t n = path->len;
    memcpy(idx, path->buf, n);
    if (n > 0)
        idx[n++] = '/';
    memcpy(idx + n, index_name, sizeof index_name);

    fd = open_stat(root_fd, idx, &st);
    if (fd >= 0) {
        if (S_ISREG(st.st_mode) && !path->is_dir) {
            close(fd);
            return 301; /* "dir": links in its index are relative to "dir/" (see http.h) */
        }
        if (S_ISREG(st.st_mode)) {
            file->index = true;
            return serve(file, fd, &st);
        }
        close(fd);
        return 403;
    }
    if (fd != -ENOENT)
        return file_error(file, -fd);
    file->err = ENOENT;
    if (!path->is_dir)
        return 403; /* a directory without index.html: no listing */
    /* "dir/": 404 if dir does not exist, 403 if it is a directory without an index. */
    r = open_beneath(root_fd, path->len ? path->buf : ".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (r < 0)
        return file_error(file, -r);
    close(r);
    return 403;
}

/* ---- MIME types ------------------------------------------------------------------------------ */

static const struct {
    char ext[7];
    const char *type;
} mime_types[] = {
    {"html", "text/html; charset=utf-8"},
    {"htm", "text/html; charset=utf-8"},
    {"css", "text/css; charset=utf-8"},
    {"js", "text/javascript; charset=utf-8"},
    {"mjs", "text/javascript; charset=utf-8"},
    {"json", "application/json"},
    {"map", "application/json"},
    {"txt", "text/plain; charset=utf-8"},
    {"xml", "application/xml"},
    {"svg", "image/svg+xml"},
    {"png", "image/png"},
    {"jpg", "image/jpeg"},
    {"jpeg", "image/jpeg"},
    {"gif", "image/gif"},
    {"webp", "image/webp"},
    {"avif", "image/avif"},
    {"ico", "image/x-icon"},
    {"pdf", "application/pdf"},
    {"wasm", "application/wasm"},
    {"mp4", "video/mp4"},
    {"webm", "video/webm"},
    {"mp3", "audio/mpeg"},
    {"ogg", "audio/ogg"},
    {"woff", "font/woff"},
    {"woff2", "font/woff2"},
    {"ttf", "font/ttf"},
    {"otf", "font/otf"},
    {"csv", "text/csv; charset=utf-8"},
    {"md", "text/markdown; charset=utf-8"},
    {"zip", "application/zip"},
    {"gz", "application/gzip"},
    {"tar", "application/x-tar"},
};

const char *http_mime_type(const char *path, size_t len)
{
    size_t i = len;
    while (i > 0 && path[i - 1] != '.' && path[i - 1] != '/')
        i--;
    if (i == 0 || path[i - 1] != '.')
        return "application/octet-stream";
    size_t n = len - i;
    if (n == 0 || n >= sizeof mime_types[0].ext)
        return "application/octet-stream";
    char ext[sizeof mime_types[0].ext];
    for (size_t k = 0; k < n; k++)
        ext[k] = (char)lower((unsigned char)path[i + k]);
    for (size_t k = 0; k < sizeof mime_types / sizeof mime_types[0]; k++)
        if (memcmp(mime_types[k].ext, ext, n) == 0 && mime_types[k].ext[n] == '\0')
            return mime_types[k].type;
    return "application/octet-stream";
}

/* ---- dates ----------------------------------------------------------------------------------- */

static const char wday_short[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
static const char *const wday_long[7] = {"Sunday",   "Monday", "Tuesday", "Wednesday",
                                         "Thursday", "Friday", "Saturday"};
static const char month_name[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
/* Days before the first of each month in a common year. */
static const uint16_t month_start[12] = {0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334};

#define DATE_MAX ((time_t)253402300799) /* 9999-12-31 23:59:59 */

static bool is_leap(int64_t y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

/* Leap years in [1, y). */
static int64_t leaps_before(int64_t y)
{
    y--;
    return y / 4 - y / 100 + y / 400;
}

/* Days from 1970-01-01 to January 1st of year y (1 <= y <= 9999). */
static int64_t year_start(int64_t y)
{
    return (y - 1970) * 365 + leaps_before(y) - leaps_before(1970);
}

static int days_in_month(int64_t y, int m)
{
    static const uint8_t dim[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return m == 1 && is_leap(y) ? 29 : dim[m];
}

/* Split days since 1970-01-01 (>= 0) into year, month (0-11) and day (1-31). */
static void civil_from_days(int64_t days, int64_t *year, int *month, int *day)
{
    int64_t y = 1970 + days / 365; /* never too small, at most a few years too large */
    while (year_start(y) > days)
        y--;
    int yday = (int)(days - year_start(y)), m = 11;
    while (month_start[m] + (m >= 2 && is_leap(y)) > yday)
        m--;
    *year = y;
    *month = m;
    *day = yday - month_start[m] - (m >= 2 && is_leap(y)) + 1;
}

size_t http_date_format(time_t t, char out[HTTP_DATE_LEN + 1])
{
    if (t < 0)
        t = 0;
    if (t > DATE_MAX)
        t = DATE_MAX;
    int64_t days = t / 86400, secs = t % 86400, y;
    int wd = (int)((days + 4) % 7); /* 1970-01-01 was a Thursday */
    int m, d;
    civil_from_days(days, &y, &m, &d);
    int hh = (int)(secs / 3600), mi = (int)(secs / 60 % 60), ss = (int)(secs % 60);

    memcpy(out, wday_short[wd], 3);
    out[3] = ',';
    out[4] = ' ';
    out[5] = (char)('0' + d / 10);
    out[6] = (char)('0' + d % 10);
    out[7] = ' ';
    memcpy(out + 8, month_name[m], 3);
    out[11] = ' ';
    out[12] = (char)('0' + y / 1000);
    out[13] = (char)('0' + y / 100 % 10);
    out[14] = (char)('0' + y / 10 % 10);
    out[15] = (char)('0' + y % 10);
    out[16] = ' ';
    out[17] = (char)('0' + hh / 10);
    out[18] = (char)('0' + hh % 10);
    out[19] = ':';
    out[20] = (char)('0' + mi / 10);
    out[21] = (char)('0' + mi % 10);
    out[22] = ':';
    out[23] = (char)('0' + ss / 10);
    out[24] = (char)('0' + ss % 10);
    memcpy(out + 25, " GMT", 5);
    return HTTP_DATE_LEN;
}

/* n digits at s. */
static bool digits(const char *s, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (!is_digit((unsigned char)s[i]))
            return false;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return true;
}

static int find_name(const char *s, const char (*names)[4], int count)
{
    for (int i = 0; i < count; i++)
        if (memcmp(s, names[i], 3) == 0)
            return i;
    return -1;
}

/* "HH:MM:SS" */
static bool parse_clock(const char *s, int *hh, int *mi, int *ss)
{
    return digits(s, 2, hh) && s[2] == ':' && digits(s + 3, 2, mi) && s[5] == ':' &&
           digits(s + 6, 2, ss) && *hh <= 23 && *mi <= 59 && *ss <= 60;
}

static bool make_time(int64_t y, int m, int d, int hh, int mi, int ss, time_t *out)
{
    if (y < 1 || y > 9999 || m < 0 || d < 1 || d > days_in_month(y, m))
        return false;
    int64_t days = year_start(y) + month_start[m] + (m >= 2 && is_leap(y)) + d - 1;
    *out = (time_t)(days * 86400 + hh * 3600 + mi * 60 + ss);
    return true;
}

/* now_known: `now` holds the current time; otherwise it is read if an RFC 850 date needs it. */
static bool parse_date(const char *s, size_t len, bool now_known, time_t now, time_t *out)
{
    int d, m, y, hh, mi, ss;
    if (len == 29) { /* IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT */
        if (find_name(s, wday_short, 7) < 0 || s[3] != ',' || s[4] != ' ' ||
            !digits(s + 5, 2, &d) || s[7] != ' ' || (m = find_name(s + 8, month_name, 12)) < 0 ||
            s[11] != ' ' || !digits(s + 12, 4, &y) || s[16] != ' ' ||
            !parse_clock(s + 17, &hh, &mi, &ss) || memcmp(s + 25, " GMT", 4) != 0)
            return false;
        return make_time(y, m, d, hh, mi, ss, out);
    }
    if (len == 24) { /* asctime: Sun Nov  6 08:49:37 1994 */
        if (find_name(s, wday_short, 7) < 0 || s[3] != ' ' ||
            (m = find_name(s + 4, month_name, 12)) < 0 || s[7] != ' ')
            return false;
        if (s[8] == ' ') {
            if (!digits(s + 9, 1, &d))
                return false;
        } else if (!digits(s + 8, 2, &d)) {
            return false;
        }
        if (s[10] != ' ' || !parse_clock(s + 11, &hh, &mi, &ss) || s[19] != ' ' ||
            !digits(s + 20, 4, &y))
            return false;
        return make_time(y, m, d, hh, mi, ss, out);
    }
    /* RFC 850: Sunday, 06-Nov-94 08:49:37 GMT */
    const char *comma = memchr(s, ',', len < 10 ? len : 10);
    if (!comma)
        return false;
    size_t wl = (size_t)(comma - s);
    int wd;
    for (wd = 0; wd < 7; wd++)
        if (strlen(wday_long[wd]) == wl && memcmp(s, wday_long[wd], wl) == 0)
            break;
    const char *r = comma + 1;
    if (wd == 7 || len != wl + 24 || r[0] != ' ' || !digits(r + 1, 2, &d) || r[3] != '-' ||
        (m = find_name(r + 4, month_name, 12)) < 0 || r[7] != '-' || !digits(r + 8, 2, &y) ||
        r[10] != ' ' || !parse_clock(r + 11, &hh, &mi, &ss) || memcmp(r + 19, " GMT", 4) != 0)
        return false;
    /* The two-digit year: the one within 50 years of now. RFC 9110 demands that a year more
     * than 50 years ahead be taken from the previous century; symmetrically a year 50 or more
     * years ago is taken from the next one ("05" in 2090 is 2105, not 2005). */
    if (!now_known)
        now = time(NULL);
    int64_t cur;
    int cm, cd;
    civil_from_days((now < 0 ? 0 : now > DATE_MAX ? DATE_MAX : now) / 86400, &cur, &cm, &cd);
    int64_t full = cur - cur % 100 + y;
    time_t t;
    if (!make_time(full, m, d, hh, mi, ss, &t))
        return false;
    const time_t fifty = (time_t)50 * 31556952; /* 50 mean Gregorian years */
    if (t > now && t - now > fifty)
        full -= 100;
    else if (t <= now && now - t >= fifty)
        full += 100;
    return make_time(full, m, d, hh, mi, ss, out);
}

bool http_date_parse_at(const char *s, size_t len, time_t now, time_t *out)
{
    return parse_date(s, len, true, now, out);
}

bool http_date_parse(const char *s, size_t len, time_t *out)
{
    return parse_date(s, len, false, 0, out);
}

/* ---- responses ------------------------------------------------------------------------------- */

const char *http_reason(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 206:
        return "Partial Content";
    case 301:
        return "Moved Permanently";
    case 304:
        return "Not Modified";
    case 400:
        return "Bad Request";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 412:
        return "Precondition Failed";
    case 413:
        return "Content Too Large";
    case 414:
        return "URI Too Long";
    case 416:
        return "Range Not Satisfiable";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return NULL;
    }
}

typedef struct out_buf {
    char *buf;
    size_t len, cap;
    bool overflow;
} out_buf;

static void put(out_buf *w, const char *s, size_t n)
{
    if (w->overflow || w->cap - w->len < n) {
        w->overflow = true;
        return;
    }
    memcpy(w->buf + w->len, s, n);
    w->len += n;
}

#define PUT_LIT(w, lit) put((w), (lit), sizeof(lit) - 1)

static void put_str(out_buf *w, const char *s)
{
    put(w, s, strlen(s));
}

static void put_u64(out_buf *w, uint64_t v)
{
    char tmp[20];
    size_t i = sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put(w, tmp + i, sizeof tmp - i);
}

static void put_date(out_buf *w, time_t t)
{
    char d[HTTP_DATE_LEN + 1];
    put(w, d, http_date_format(t, d));
}

static int format_head(const http_response *r, const char *body_type, bool has_len,
                       uint64_t content_len, char *buf, size_t cap)
{
    const char *reason = http_reason(r->status);
    if (!reason)
        return -EINVAL;
    int status = r->status;
    if (status == 206 && (r->range_first > r->range_last || r->range_last >= r->complete_length))
        return -EINVAL;
    if (status == 206) {
        has_len = true;
        content_len = r->range_last - r->range_first + 1;
    }

    out_buf w = {buf, 0, cap, false};
    char sl[13] = {'H', 'T', 'T', 'P', '/', '1', '.', '1', ' '};
    sl[9] = (char)('0' + status / 100);
    sl[10] = (char)('0' + status / 10 % 10);
    sl[11] = (char)('0' + status % 10);
    sl[12] = ' ';
    put(&w, sl, sizeof sl);
    put_str(&w, reason);
    PUT_LIT(&w, "\r\nServer: " HTTP_SERVER_NAME "\r\nDate: ");
    put_date(&w, r->date);
    if (status != 304) {
        if (body_type) {
            PUT_LIT(&w, "\r\nContent-Type: ");
            put_str(&w, body_type);
        }
        if (has_len) {
            PUT_LIT(&w, "\r\nContent-Length: ");
            put_u64(&w, content_len);
        }
    }
    if (r->has_last_modified) {
        PUT_LIT(&w, "\r\nLast-Modified: ");
        put_date(&w, r->last_modified);
    }
    if (r->accept_ranges)
        PUT_LIT(&w, "\r\nAccept-Ranges: bytes");
    if (status == 206) {
        PUT_LIT(&w, "\r\nContent-Range: bytes ");
        put_u64(&w, r->range_first);
        PUT_LIT(&w, "-");
        put_u64(&w, r->range_last);
        PUT_LIT(&w, "/");
        put_u64(&w, r->complete_length);
    } else if (status == 416) {
        PUT_LIT(&w, "\r\nContent-Range: bytes */");
        put_u64(&w, r->complete_length);
    } else if (status == 405) {
        PUT_LIT(&w, "\r\nAllow: GET, HEAD");
    }
    if (r->location.ptr) {
        for (size_t i = 0; i < r->location.len; i++)
            if (!(cls[(unsigned char)r->location.ptr[i]] & C_TARGET))
                return -EINVAL; /* CR, LF, ...: would end the field */
        PUT_LIT(&w, "\r\nLocation: ");
        put(&w, r->location.ptr, r->location.len);
    }
    if (r->keep_alive)
        PUT_LIT(&w, "\r\nConnection: keep-alive\r\n\r\n");
    else
        PUT_LIT(&w, "\r\nConnection: close\r\n\r\n");
    if (w.overflow || w.len > (size_t)INT32_MAX)
        return -ENOSPC;
    return (int)w.len;
}

int http_format_head(const http_response *r, char *buf, size_t cap)
{
    return format_head(r, r->content_type, r->has_content_length, r->content_length, buf, cap);
}

int http_format_error(const http_response *r, bool with_body, char *buf, size_t cap)
{
    const char *reason = http_reason(r->status);
    if (!reason || r->status < 400)
        return -EINVAL;
    size_t rlen = strlen(reason);
    size_t body_len = 4 + rlen + 1; /* "404 Not Found\n" */
    http_response e = {
        .status = r->status,
        .keep_alive = r->keep_alive,
        .date = r->date,
        .complete_length = r->complete_length,
    };
    int n = format_head(&e, "text/plain; charset=utf-8", true, body_len, buf, cap);
    if (n < 0 || !with_body)
        return n;
    if (cap - (size_t)n < body_len)
        return -ENOSPC;
    char *b = buf + n;
    b[0] = (char)('0' + r->status / 100);
    b[1] = (char)('0' + r->status / 10 % 10);
    b[2] = (char)('0' + r->status % 10);
    b[3] = ' ';
    memcpy(b + 4, reason, rlen);
    b[4 + rlen] = '\n';
    return n + (int)body_len;
}
