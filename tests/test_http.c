/* Tests of cport-httpd's HTTP layer (tools/cport-httpd/http.c): the incremental request
 * parser (every split point, pipelining, limits, errors, keep-alive), Range and
 * If-Modified-Since handling, path resolution against traversal, opening beneath a root
 * (symlinks, special files), MIME types, HTTP dates and response formatting. */
/* test-backends: none */
/* test-sources: tools/cport-httpd/http.c */
#include "harness.h"

#include "cport-httpd/http.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- helpers --------------------------------------------------------------------------------- */

static bool slice_is(http_slice s, const char *want)
{
    if (!want)
        return s.ptr == NULL;
    return s.ptr && s.len == strlen(want) && memcmp(s.ptr, want, s.len) == 0;
}

static http_parse_status parse(const char *s, http_request *req)
{
    return http_parse_request(s, strlen(s), req);
}

/* The one-shot parse of s must fail with `status` and demand a close. */
static void expect_error_at(const char *s, size_t len, int status, int line)
{
    http_request req;
    http_parse_status r = http_parse_request(s, len, &req);
    if (r != HTTP_PARSE_ERROR || req.status != status || req.keep_alive) {
        fprintf(stderr, "line %d: request %.80s...: got %d status %d, want error %d\n", line, s,
                (int)r, req.status, status);
        exit(1);
    }
}
#define EXPECT_ERROR(s, status) expect_error_at((s), strlen(s), (status), __LINE__)

static void expect_done_at(const char *s, int line)
{
    http_request req;
    http_parse_status r = parse(s, &req);
    if (r != HTTP_PARSE_DONE) {
        fprintf(stderr, "line %d: request %.80s...: got %d status %d, want DONE\n", line, s, (int)r,
                req.status);
        exit(1);
    }
}
#define EXPECT_DONE(s) expect_done_at((s), __LINE__)

/* Offset of a slice inside the head, or -1 if absent, -2 if it is a constant string. */
static int64_t slice_off(const http_request *req, http_slice s)
{
    if (!s.ptr)
        return -1;
    if (s.ptr < req->head || s.ptr > req->head + req->head_len)
        return -2;
    return s.ptr - req->head;
}

/* Two parse results describe the same request (slices compared by offset and length). */
static bool same_request(const http_request *a, const http_request *b)
{
    if (a->status != b->status || a->keep_alive != b->keep_alive)
        return false;
    if (a->status != 0)
        return true;
    const http_slice *sa[] = {&a->method_name, &a->target, &a->path, &a->query, &a->host};
    const http_slice *sb[] = {&b->method_name, &b->target, &b->path, &b->query, &b->host};
    for (size_t i = 0; i < sizeof sa / sizeof sa[0]; i++)
        if (slice_off(a, *sa[i]) != slice_off(b, *sb[i]) || sa[i]->len != sb[i]->len)
            return false;
    return a->method == b->method && a->minor_version == b->minor_version &&
           a->has_if_modified_since == b->has_if_modified_since &&
           a->if_modified_since == b->if_modified_since &&
           a->has_if_none_match == b->has_if_none_match &&
           a->if_none_match_any == b->if_none_match_any && a->has_if_match == b->has_if_match &&
           a->if_match_any == b->if_match_any &&
           a->has_if_unmodified_since == b->has_if_unmodified_since &&
           a->if_unmodified_since == b->if_unmodified_since &&
           a->range.present == b->range.present && a->range.suffix == b->range.suffix &&
           a->range.first == b->range.first && a->range.last == b->range.last &&
           a->range.suffix_len == b->range.suffix_len && a->if_range == b->if_range &&
           a->if_range_date == b->if_range_date && a->content_length == b->content_length &&
           a->head_len == b->head_len && a->nfields == b->nfields;
}

/* Feed s[0..len) to one parser at every split point k (first k bytes, then all), byte by
 * byte, and byte by byte through a buffer that moves on every call; each must agree with
 * the one-shot result, and a DONE must come exactly when the head is complete. */
static void check_incremental(const char *s, size_t len)
{
    http_request whole, req;
    http_parse_status rw = http_parse_request(s, len, &whole);

    for (size_t k = 0; k <= len; k++) {
        http_parser p;
        http_parser_init(&p);
        http_parse_status r1 = http_parse(&p, s, k, &req);
        if (r1 == HTTP_PARSE_DONE) {
            CHECK(rw == HTTP_PARSE_DONE);
            CHECK(req.head_len <= k);
            CHECK(same_request(&req, &whole));
            continue;
        }
        if (r1 == HTTP_PARSE_ERROR) {
            CHECK(rw == HTTP_PARSE_ERROR);
            CHECK_EQ(req.status, whole.status);
            continue;
        }
        http_parse_status r2 = http_parse(&p, s, len, &req);
        CHECK_EQ(r2, rw);
        if (r2 != HTTP_PARSE_NEED_MORE)
            CHECK(same_request(&req, &whole));
    }

    /* byte by byte, the buffer relocated at every step */
    http_parser p;
    http_parser_init(&p);
    char *prev = NULL;
    http_parse_status r = HTTP_PARSE_NEED_MORE;
    size_t k;
    for (k = 1; k <= len; k++) {
        char *cur = malloc(k);
        CHECK(cur != NULL);
        memcpy(cur, s, k);
        free(prev);
        prev = cur;
        r = http_parse(&p, cur, k, &req);
        if (r != HTTP_PARSE_NEED_MORE)
            break;
    }
    CHECK_EQ(r, rw);
    if (r == HTTP_PARSE_DONE) {
        CHECK_EQ(k, whole.head_len); /* not a byte later than necessary */
        CHECK(req.head == prev);
        CHECK(same_request(&req, &whole));
        CHECK(slice_off(&req, req.path) != -2 || slice_is(req.path, "/"));
    } else if (r == HTTP_PARSE_ERROR) {
        CHECK_EQ(req.status, whole.status);
    }
    free(prev);
}

static char *repeat(char c, size_t n)
{
    char *s = malloc(n + 1);
    CHECK(s != NULL);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

/* ---- request line ---------------------------------------------------------------------------- */

TEST(parse_simple_get)
{
    const char *s = "GET /index.html?x=1 HTTP/1.1\r\nHost: example.com\r\n"
                    "User-Agent: test\r\n\r\nGET /next";
    http_request req;
    CHECK_EQ(parse(s, &req), HTTP_PARSE_DONE);
    CHECK_EQ(req.method, HTTP_METHOD_GET);
    CHECK(slice_is(req.method_name, "GET"));
    CHECK(slice_is(req.target, "/index.html?x=1"));
    CHECK(slice_is(req.path, "/index.html"));
    CHECK(slice_is(req.query, "x=1"));
    CHECK(slice_is(req.host, "example.com"));
    CHECK_EQ(req.minor_version, 1);
    CHECK(req.keep_alive);
    CHECK_EQ(req.status, 0);
    CHECK_EQ(req.nfields, 2);
    CHECK_EQ(req.head_len, strlen(s) - strlen("GET /next"));
    CHECK(req.head == s);
    CHECK(!req.has_if_modified_since);
    CHECK(!req.range.present);
    CHECK_EQ(req.if_range, HTTP_IF_RANGE_NONE);
    CHECK_EQ(req.content_length, 0);
    CHECK(slice_off(&req, req.path) == 4);
}

TEST(parse_methods)
{
    http_request req;
    CHECK_EQ(parse("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK_EQ(req.method, HTTP_METHOD_HEAD);
    CHECK(req.keep_alive);
    /* other valid tokens parse (the server answers 405), keep-alive is allowed */
    const char *others[] = {"POST", "PUT",   "DELETE", "OPTIONS",  "get",
                            "Get",  "HEADX", "GE",     "M-SEARCH", "X!#$%&'*+-.^_`|~9"};
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        char buf[128];
        snprintf(buf, sizeof buf, "%s /x HTTP/1.1\r\nHost: a\r\n\r\n", others[i]);
        CHECK_EQ(parse(buf, &req), HTTP_PARSE_DONE);
        CHECK_EQ(req.method, HTTP_METHOD_OTHER);
        CHECK(slice_is(req.method_name, others[i]));
        CHECK(req.keep_alive);
    }
    /* a POST without a body is a 405 case, with a body a 413 */
    CHECK_EQ(parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", &req),
             HTTP_PARSE_DONE);
    EXPECT_ERROR("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc", 413);
    /* other methods may use any target form */
    CHECK_EQ(parse("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.path, "*"));
    CHECK_EQ(parse("CONNECT example.com:443 HTTP/1.1\r\nHost: a\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK_EQ(req.method, HTTP_METHOD_OTHER);
    /* but GET and HEAD may not */
    EXPECT_ERROR("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400);
    EXPECT_ERROR("HEAD example.com:443 HTTP/1.1\r\nHost: a\r\n\r\n", 400);
    EXPECT_ERROR("GET index.html HTTP/1.1\r\nHost: a\r\n\r\n", 400);
    /* invalid method tokens */
    EXPECT_ERROR("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400);
    EXPECT_ERROR("GE\"T / HTTP/1.1\r\nHost: a\r\n\r\n", 400);
    EXPECT_ERROR(" / HTTP/1.1\r\nHost: a\r\n\r\n", 400);
    EXPECT_ERROR("G\x80T / HTTP/1.1\r\nHost: a\r\n\r\n", 400);
}

TEST(parse_targets)
{
    http_request req;
    CHECK_EQ(parse("GET /a?b=c&d HTTP/1.1\r\nHost: h\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.path, "/a"));
    CHECK(slice_is(req.query, "b=c&d"));
    CHECK_EQ(parse("GET /a? HTTP/1.1\r\nHost: h\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.path, "/a"));
    CHECK(slice_is(req.query, ""));
    CHECK_EQ(parse("GET /a HTTP/1.1\r\nHost: h\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.query, NULL));
    CHECK_EQ(parse("GET /?q?r HTTP/1.1\r\nHost: h\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.path, "/"));
    CHECK(slice_is(req.query, "q?r"));
    CHECK_EQ(parse("GET /%2e%2E/x%00 HTTP/1.1\r\nHost: h\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.path, "/%2e%2E/x%00")); /* raw: refusing is http_resolve_path's job */

    /* absolute-form: the authority is the host */
    CHECK_EQ(parse("GET http://example.com:8080/x/y?z HTTP/1.1\r\nHost: other\r\n\r\n", &req),
             HTTP_PARSE_DONE);
    CHECK(slice_is(req.host, "example.com:8080"));
    CHECK(slice_is(req.path, "/x/y"));
    CHECK(slice_is(req.query, "z"));
    CHECK(slice_is(req.target, "http://example.com:8080/x/y?z"));
    CHECK_EQ(parse("GET HTTPS://[::1] HTTP/1.1\r\nHost: x\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.host, "[::1]"));
    CHECK(slice_is(req.path, "/"));
    CHECK(slice_is(req.query, NULL));
    CHECK_EQ(parse("HEAD http://h?q=1 HTTP/1.0\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.host, "h"));
    CHECK(slice_is(req.path, "/"));
    CHECK(slice_is(req.query, "q=1"));
    EXPECT_ERROR("GET http:///x HTTP/1.1\r\nHost: h\r\n\r\n", 400);      /* empty host */
    EXPECT_ERROR("GET http://u:p@h/x HTTP/1.1\r\nHost: h\r\n\r\n", 400); /* userinfo */
    EXPECT_ERROR("GET ftp://h/x HTTP/1.1\r\nHost: h\r\n\r\n", 400);      /* scheme */
    EXPECT_ERROR("GET http:/h/x HTTP/1.1\r\nHost: h\r\n\r\n", 400);      /* syntax */
    EXPECT_ERROR("GET http://h\"/x HTTP/1.1\r\nHost: h\r\n\r\n", 400);   /* host chars */
    EXPECT_ERROR("GET http://example.com/ HTTP/1.1\r\n\r\n", 400);       /* 1.1 still needs Host */

    /* target characters: visible ASCII only, no fragment */
    EXPECT_ERROR("GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    EXPECT_ERROR("GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    EXPECT_ERROR("GET /a\tb HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    EXPECT_ERROR("GET /a\x7f HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    EXPECT_ERROR("GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    EXPECT_ERROR("GET / a HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    EXPECT_ERROR("GET  HTTP/1.1\r\nHost: h\r\n\r\n", 400);
}

TEST(parse_versions)
{
    http_request req;
    CHECK_EQ(parse("GET / HTTP/1.0\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK_EQ(req.minor_version, 0);
    CHECK(slice_is(req.host, NULL)); /* Host is optional in 1.0 */
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK_EQ(req.minor_version, 1);
    CHECK_EQ(parse("GET / HTTP/1.9\r\nHost: a\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK_EQ(req.minor_version, 1); /* a higher minor version is served as 1.1 */
    CHECK(req.keep_alive);
    EXPECT_ERROR("GET / HTTP/1.9\r\n\r\n", 400); /* ... including its Host requirement */
    EXPECT_ERROR("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505);
    EXPECT_ERROR("GET / HTTP/0.9\r\n\r\n", 505);
    EXPECT_ERROR("GET / HTTP/3.0\r\n\r\n", 505);
    EXPECT_ERROR("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505); /* the HTTP/2 preface */
    EXPECT_ERROR("GET / HTTP/1.10\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/11\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1\r\n\r\n", 400);
    EXPECT_ERROR("GET / http/1.1\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.x\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\t\r\nHost: a\r\n\r\n", 400);
    EXPECT_ERROR("GET /\r\n\r\n", 400); /* HTTP/0.9 simple request */
    EXPECT_ERROR("GET\r\n\r\n", 400);
}

TEST(parse_line_endings)
{
    http_request req;
    /* bare LF accepted anywhere, mixed with CRLF */
    CHECK_EQ(parse("GET / HTTP/1.1\nHost: a\n\n", &req), HTTP_PARSE_DONE);
    CHECK_EQ(req.head_len, strlen("GET / HTTP/1.1\nHost: a\n\n"));
    CHECK(slice_is(req.host, "a"));
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK_EQ(parse("GET / HTTP/1.1\nHost: a\r\n\n", &req), HTTP_PARSE_DONE);
    /* leading empty lines are skipped but consumed */
    const char *s = "\r\n\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n";
    CHECK_EQ(parse(s, &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.path, "/x"));
    CHECK_EQ(req.head_len, strlen(s));
    /* bare CR anywhere */
    EXPECT_ERROR("GET / HTTP/1.1\rHost: a\r\n\r\n", 400);
    EXPECT_ERROR("GET /\r HTTP/1.1\r\nHost: a\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\n\r\r\n", 400);
    EXPECT_ERROR("\rGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400);
    /* NUL and other controls */
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nX: a\x01z\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nX: \x7f\r\n\r\n", 400);
    expect_error_at("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n", 35, 400, __LINE__);
    expect_error_at("GET /\0 HTTP/1.1\r\nHost: a\r\n\r\n", 28, 400, __LINE__);
    /* TLS ClientHello and binary junk: refused on the first byte */
    http_parser p;
    http_parser_init(&p);
    CHECK_EQ(http_parse(&p, "\x16\x03\x01", 3, &req), HTTP_PARSE_ERROR);
    CHECK_EQ(req.status, 400);
}

TEST(parse_field_syntax)
{
    http_request req;
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n", 400);  /* obs-fold */
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\tfolded\r\n\r\n", 400); /* obs-fold */
    EXPECT_ERROR("GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400); /* space after start line */
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400); /* space before colon */
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\n: empty-name\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nX(y): 1\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nX\xc3\xa9: 1\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nX y: 1\r\n\r\n", 400);
    /* values: trimmed, may be empty, may hold HTAB and obs-text */
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost:\t a \t\r\nX-E:\r\nX-T: a\tb\xff\r\n\r\n", &req),
             HTTP_PARSE_DONE);
    CHECK(slice_is(req.host, "a"));
    http_slice v;
    CHECK(http_header_get(&req, "x-e", &v));
    CHECK_EQ(v.len, 0);
    CHECK(http_header_get(&req, "X-T", &v));
    CHECK(slice_is(v, "a\tb\xff"));
    CHECK_EQ(req.nfields, 3);
}

TEST(parse_header_get)
{
    http_request req;
    const char *s = "\r\nGET /ua: HTTP/1.1\r\nHost: a\r\nUser-Agent:  curl/8 \r\nX-Dup: 1\r\n"
                    "x-dup: 2\nAccept: */*\r\n\r\nGET / HTTP/1.1\r\nX-Later: 1\r\n\r\n";
    CHECK_EQ(parse(s, &req), HTTP_PARSE_DONE);
    http_slice v;
    CHECK(http_header_get(&req, "user-agent", &v));
    CHECK(slice_is(v, "curl/8"));
    CHECK(http_header_get(&req, "X-DUP", &v));
    CHECK(slice_is(v, "1"));
    CHECK(http_header_get(&req, "Accept", &v));
    CHECK(slice_is(v, "*/*"));
    CHECK(!http_header_get(&req, "X-Later", &v)); /* the next request is not ours */
    CHECK(!http_header_get(&req, "User", &v));
    CHECK(!http_header_get(&req, "GET /ua", &v)); /* the request line is not a field */
    CHECK(!http_header_get(&req, "Accept-Encoding", &v));
}

/* Every byte value in a method, a target, a field name and a field value is accepted or
 * refused as the RFC grammar (written out again here) says. */
TEST(parse_char_classes)
{
    const char *tchar_extra = "!#$%&'*+-.^_`|~";
    for (int c = 0; c < 256; c++) {
        bool alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        bool tchar = alnum || (c != 0 && strchr(tchar_extra, c));
        bool vchar = c >= 0x21 && c <= 0x7e;
        char buf[128];
        http_request req;
        int n;

        n = snprintf(buf, sizeof buf, "G%cT /x HTTP/1.1\r\nHost: a\r\n\r\n", 'X');
        buf[1] = (char)c;
        http_parse_status r = http_parse_request(buf, (size_t)n, &req);
        if (c == ' ')
            CHECK(r == HTTP_PARSE_ERROR); /* "G T": extra SP */
        else
            CHECK_EQ(r == HTTP_PARSE_DONE, tchar);

        n = snprintf(buf, sizeof buf, "GET /aXb HTTP/1.1\r\nHost: a\r\n\r\n");
        buf[6] = (char)c;
        r = http_parse_request(buf, (size_t)n, &req);
        CHECK_EQ(r == HTTP_PARSE_DONE, vchar && c != '#');

        n = snprintf(buf, sizeof buf, "GET / HTTP/1.1\r\nHost: a\r\nX-aXb: 1\r\n\r\n");
        buf[28] = (char)c;
        r = http_parse_request(buf, (size_t)n, &req);
        if (c == '\n')
            CHECK(r == HTTP_PARSE_ERROR); /* "X-a" without colon */
        else if (c == ':')
            CHECK(r == HTTP_PARSE_DONE); /* "X-a: b: 1" */
        else
            CHECK_EQ(r == HTTP_PARSE_DONE, tchar);

        n = snprintf(buf, sizeof buf, "GET / HTTP/1.1\r\nHost: a\r\nX-v: aXb\r\n\r\n");
        buf[31] = (char)c;
        r = http_parse_request(buf, (size_t)n, &req);
        bool field_ok = vchar || c == ' ' || c == '\t' || c >= 0x80;
        if (c == '\n')
            CHECK(r == HTTP_PARSE_ERROR); /* "b" becomes a line without a colon */
        else
            CHECK_EQ(r == HTTP_PARSE_DONE, field_ok);
        if (r == HTTP_PARSE_DONE) {
            http_slice v;
            CHECK(http_header_get(&req, "x-v", &v));
            CHECK_EQ(v.len, 3);
            CHECK_EQ((unsigned char)v.ptr[1], c);
        }
    }
}

/* ---- fields with meaning --------------------------------------------------------------------- */

TEST(parse_host)
{
    http_request req;
    EXPECT_ERROR("GET / HTTP/1.1\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nX: y\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400);
    EXPECT_DONE("GET / HTTP/1.1\r\nHost: a,b\r\n\r\n"); /* sub-delims are reg-name */
    CHECK_EQ(parse("GET / HTTP/1.1\r\nhOsT: Example.COM:8080\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.host, "Example.COM:8080"));
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.host, "[2001:db8::1]:80"));
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost:\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.host, ""));
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHosts: x\r\nHost: y\r\nXHost: z\r\n\r\n", &req),
             HTTP_PARSE_DONE);
    CHECK(slice_is(req.host, "y"));
}

TEST(parse_keep_alive)
{
    static const struct {
        const char *version;
        const char *fields;
        bool keep;
    } cases[] = {
        {"1.1", "", true},
        {"1.1", "Connection: close\r\n", false},
        {"1.1", "Connection: Close\r\n", false},
        {"1.1", "Connection: keep-alive\r\n", true},
        {"1.1", "Connection: Keep-Alive\r\n", true},
        {"1.1", "Connection: upgrade, CLOSE\r\n", false},
        {"1.1", "Connection: , ,close ,\r\n", false},
        {"1.1", "Connection: closed\r\n", true},
        {"1.1", "Connection: clos\r\n", true},
        {"1.1", "Connection: close-ish\r\n", true},
        {"1.1", "Connection: keep-alive\r\nConnection: close\r\n", false},
        {"1.1", "Connection: keep-alive, close\r\n", false},
        {"1.1", "X-Connection: close\r\n", true},
        {"1.0", "", false},
        {"1.0", "Connection: keep-alive\r\n", true},
        {"1.0", "Connection: KEEP-ALIVE\r\n", true},
        {"1.0", "Connection: foo,keep-alive\r\n", true},
        {"1.0", "Connection: keep-alive\t, upgrade\r\n", true},
        {"1.0", "Connection: keep-alive, close\r\n", false},
        {"1.0", "Connection: close\r\nConnection: keep-alive\r\n", false},
        {"1.0", "Connection: close\r\n", false},
        {"1.0", "Connection: keepalive\r\n", false},
        {"1.0", "Keep-Alive: timeout=5\r\n", false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char buf[256];
        snprintf(buf, sizeof buf, "GET / HTTP/%s\r\nHost: a\r\n%s\r\n", cases[i].version,
                 cases[i].fields);
        http_request req;
        CHECK_EQ(parse(buf, &req), HTTP_PARSE_DONE);
        if (req.keep_alive != cases[i].keep) {
            fprintf(stderr, "case %zu: %s", i, buf);
            CHECK(false);
        }
    }
}

TEST(parse_body_framing)
{
    http_request req;
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", &req),
             HTTP_PARSE_DONE);
    CHECK_EQ(req.content_length, 0);
    CHECK(req.keep_alive);
    EXPECT_DONE("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 000\r\n\r\n");
    EXPECT_DONE("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 0\r\n\r\n");
    EXPECT_DONE("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n");
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx", 413);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", 413);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\ncontent-length: 99999999999999999999999\r\n\r\n",
                 413);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 1\r\n\r\n", 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n",
                 400);
    const char *bad[] = {"", "abc", "-1", "+1", "1 2", "0x10", "1.0", "0,", ",0", "0,,0", "1e3"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char buf[128];
        snprintf(buf, sizeof buf, "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: %s\r\n\r\n",
                 bad[i]);
        EXPECT_ERROR(buf, 400);
    }
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 413);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 413);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nTRANSFER-ENCODING:\r\n\r\n", 413);
    EXPECT_ERROR("GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 413);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                 "Content-Length: 0\r\n\r\n",
                 400);
    EXPECT_ERROR("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n",
                 400);
    /* a body-framing error outranks a missing Host: both close */
    EXPECT_ERROR("GET / HTTP/1.1\r\nContent-Length: 7\r\n\r\n", 413);
}

TEST(parse_if_modified_since)
{
    const time_t t = 784111777; /* Sun, 06 Nov 1994 08:49:37 GMT */
    const char *dates[] = {"Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
                           "Sun Nov  6 08:49:37 1994"};
    for (size_t i = 0; i < 3; i++) {
        char buf[256];
        snprintf(buf, sizeof buf, "GET / HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: %s\r\n\r\n",
                 dates[i]);
        http_request req;
        CHECK_EQ(parse(buf, &req), HTTP_PARSE_DONE);
        CHECK(req.has_if_modified_since);
        CHECK_EQ(req.if_modified_since, t);
        CHECK(http_not_modified(&req, t));
        CHECK(http_not_modified(&req, t - 1));
        CHECK(!http_not_modified(&req, t + 1));
    }
    http_request req;
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nif-modified-since: \t Sun, 06 Nov 1994 "
                   "08:49:37 GMT \r\n\r\n",
                   &req),
             HTTP_PARSE_DONE);
    CHECK(req.has_if_modified_since);
    /* invalid: ignored, not an error */
    const char *bad[] = {"yesterday", "Sun, 06 Nov 1994 08:49:37 UTC",
                         "Sun, 31 Feb 1994 08:49:37 GMT", "",
                         "Sun, 06 Nov 1994 08:49:37 GMT, Mon, 07 Nov 1994 08:49:37 GMT"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char buf[256];
        snprintf(buf, sizeof buf, "GET / HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: %s\r\n\r\n",
                 bad[i]);
        CHECK_EQ(parse(buf, &req), HTTP_PARSE_DONE);
        CHECK(!req.has_if_modified_since);
        CHECK(!http_not_modified(&req, 0));
    }
    /* repeated: ignored */
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 "
                   "GMT\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n",
                   &req),
             HTTP_PARSE_DONE);
    CHECK(!req.has_if_modified_since);
    /* with If-None-Match: ignored (RFC 9110 13.1.3) */
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"x\"\r\nIf-Modified-Since: Sun, "
                   "06 Nov 1994 08:49:37 GMT\r\n\r\n",
                   &req),
             HTTP_PARSE_DONE);
    CHECK(!req.has_if_modified_since);
    CHECK(req.has_if_none_match);
    CHECK(!req.if_none_match_any);
    CHECK(!http_not_modified(&req, 0));
    /* If-None-Match: * matches any file: 304 whatever the dates (RFC 9110 13.1.2). It
     * used to be treated as any other If-None-Match: never matching, a 200. */
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nIf-None-Match:  * \r\nIf-Modified-Since: Sun, "
                   "06 Nov 1994 08:49:37 GMT\r\n\r\n",
                   &req),
             HTTP_PARSE_DONE);
    CHECK(req.if_none_match_any);
    CHECK(!req.has_if_modified_since);
    CHECK(http_not_modified(&req, 0));
    CHECK(http_not_modified(&req, (time_t)4000000000));
    static const char *const not_any[] = {
        "If-None-Match: \"*\"\r\n",
        "If-None-Match: *, \"x\"\r\n",
        "If-None-Match: **\r\n",
        "If-None-Match: *\r\nIf-None-Match: \"x\"\r\n",
        "If-None-Match: *\r\nIf-None-Match: *\r\n",
        "If-None-Match:\r\n",
    };
    for (size_t i = 0; i < sizeof not_any / sizeof not_any[0]; i++) {
        char head[256];
        snprintf(head, sizeof head, "GET / HTTP/1.1\r\nHost: a\r\n%s\r\n", not_any[i]);
        CHECK_EQ(parse(head, &req), HTTP_PARSE_DONE);
        CHECK(req.has_if_none_match);
        CHECK(!req.if_none_match_any);
        CHECK(!http_not_modified(&req, 0));
    }
}

/* If-Match and If-Unmodified-Since (RFC 9110 13.1.1, 13.1.4) and the order of all four
 * preconditions (13.2.2): a failed If-Match, or without it a failed If-Unmodified-Since,
 * is a 412 whatever If-None-Match and If-Modified-Since say. Both used to be ignored: a
 * client guarding a download (or the resumption of one) against a changed file got it. */
TEST(parse_if_match_and_if_unmodified_since)
{
    http_request req;
    const time_t d = 784111777; /* Sun, 06 Nov 1994 08:49:37 GMT */
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(!req.has_if_match && !req.if_match_any && !req.has_if_unmodified_since);
    CHECK_EQ(http_preconditions(&req, d), 0);
    /* If-Match: * matches any existing file; any entity-tag fails (no ETags are sent) */
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nIf-Match:  *\t\r\n\r\n", &req), HTTP_PARSE_DONE);
    CHECK(req.has_if_match && req.if_match_any);
    CHECK_EQ(http_preconditions(&req, d), 0);
    static const char *const fail[] = {
        "If-Match: \"x\"\r\n",    "If-Match: W/\"x\"\r\n",          "If-Match: \"*\"\r\n",
        "If-Match: *, \"x\"\r\n", "If-Match: *\r\nIf-Match: *\r\n", "If-Match:\r\n",
        "if-match: **\r\n",
    };
    for (size_t i = 0; i < sizeof fail / sizeof fail[0]; i++) {
        char head[256];
        snprintf(head, sizeof head, "HEAD / HTTP/1.1\r\nHost: a\r\n%s\r\n", fail[i]);
        CHECK_EQ(parse(head, &req), HTTP_PARSE_DONE);
        CHECK(req.has_if_match && !req.if_match_any);
        CHECK_EQ(http_preconditions(&req, d), 412);
    }
    /* If-Unmodified-Since: 412 only for a file modified after the date */
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nIf-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 "
                   "GMT\r\n\r\n",
                   &req),
             HTTP_PARSE_DONE);
    CHECK(req.has_if_unmodified_since);
    CHECK_EQ(req.if_unmodified_since, d);
    CHECK_EQ(http_preconditions(&req, d), 0);
    CHECK_EQ(http_preconditions(&req, d - 100), 0);
    CHECK_EQ(http_preconditions(&req, d + 1), 412);
    /* the other two formats */
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nIF-UNMODIFIED-SINCE: Sun Nov  6 08:49:37 1994"
                   "\r\n\r\n",
                   &req),
             HTTP_PARSE_DONE);
    CHECK(req.has_if_unmodified_since && req.if_unmodified_since == d);
    /* invalid, a list, repeated: ignored */
    static const char *const ignored[] = {
        "If-Unmodified-Since: yesterday\r\n",
        "If-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT, Mon, 07 Nov 1994 08:49:37 GMT\r\n",
        ("If-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
         "If-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n"),
        "If-Unmodified-Since:\r\n",
    };
    for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++) {
        char head[256];
        snprintf(head, sizeof head, "GET / HTTP/1.1\r\nHost: a\r\n%s\r\n", ignored[i]);
        CHECK_EQ(parse(head, &req), HTTP_PARSE_DONE);
        CHECK(!req.has_if_unmodified_since);
        CHECK_EQ(http_preconditions(&req, d + 1), 0);
    }
    /* with If-Match: ignored (13.1.4), whether If-Match matches or not */
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nIf-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 "
                   "GMT\r\nIf-Match: *\r\n\r\n",
                   &req),
             HTTP_PARSE_DONE);
    CHECK(!req.has_if_unmodified_since);
    CHECK_EQ(http_preconditions(&req, d + 1), 0);
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nIf-Match: \"x\"\r\nIf-Unmodified-Since: Sun, 06 "
                   "Nov 1994 08:49:37 GMT\r\n\r\n",
                   &req),
             HTTP_PARSE_DONE);
    CHECK(!req.has_if_unmodified_since);
    CHECK_EQ(http_preconditions(&req, d), 412);
    /* order: 412 beats 304 (If-None-Match: *, If-Modified-Since) */
    static const struct {
        const char *fields;
        time_t mtime;
        int want;
    } order[] = {
        {"If-Match: \"x\"\r\nIf-None-Match: *\r\n", d, 412},
        {"If-None-Match: *\r\nIf-Unmodified-Since: Sun, 06 Nov 1994 08:49:36 GMT\r\n", d, 412},
        {"If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\nIf-Match: \"x\"\r\n", d, 412},
        {"If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
         "If-Unmodified-Since: Sun, 06 Nov 1994 08:49:36 GMT\r\n",
         d, 412},
        {"If-Match: *\r\nIf-None-Match: *\r\n", d, 304},
        {"If-Match: *\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n", d, 304},
        {"If-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
         "If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n",
         d, 304},
        {"If-Match: *\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:36 GMT\r\n", d, 0},
    };
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
        char head[512];
        snprintf(head, sizeof head, "GET / HTTP/1.1\r\nHost: a\r\n%s\r\n", order[i].fields);
        CHECK_EQ(parse(head, &req), HTTP_PARSE_DONE);
        if (http_preconditions(&req, order[i].mtime) != order[i].want)
            fprintf(stderr, "%s-> %d\n", order[i].fields, http_preconditions(&req, order[i].mtime));
        CHECK_EQ(http_preconditions(&req, order[i].mtime), order[i].want);
    }
}

/* "now" for If-Range: long after every date the tests use */
#define NOW ((time_t)2000000000)

TEST(parse_range_fields)
{
    http_request req;
    uint64_t a = 0, b = 0;
    CHECK_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nRange: bytes=10-19\r\n\r\n", &req),
             HTTP_PARSE_DONE);
    CHECK(req.range.present);
    CHECK_EQ(req.range.first, 10);
    CHECK_EQ(req.range.last, 19);
    CHECK_EQ(http_request_range(&req, 100, 5, NOW, &a, &b), HTTP_RANGE_PARTIAL);
    CHECK_EQ(a, 10);
    CHECK_EQ(b, 19);
    CHECK_EQ(http_request_range(&req, 5, 5, NOW, &a, &b), HTTP_RANGE_UNSATISFIABLE);
    /* HEAD and other methods: Range is ignored (RFC 9110 14.2) */
    CHECK_EQ(parse("HEAD / HTTP/1.1\r\nHost: a\r\nRange: bytes=10-19\r\n\r\n", &req),
             HTTP_PARSE_DONE);
    CHECK(!req.range.present);
    CHECK_EQ(http_request_range(&req, 100, 5, NOW, &a, &b), HTTP_RANGE_FULL);
    /* several ranges, bad syntax, repeated: ignored */
    const char *ignored[] = {"Range: bytes=0-1,5-6\r\n", "Range: bytes=5-1\r\n",
                             "Range: items=0-1\r\n",     "Range: bytes=0-1\r\nRange: bytes=0-1\r\n",
                             "Range: bytes 0-1\r\n",     "Range: bytes=\r\n"};
    for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++) {
        char buf[256];
        snprintf(buf, sizeof buf, "GET / HTTP/1.1\r\nHost: a\r\n%s\r\n", ignored[i]);
        CHECK_EQ(parse(buf, &req), HTTP_PARSE_DONE);
        CHECK(!req.range.present);
        CHECK_EQ(http_request_range(&req, 100, 5, NOW, &a, &b), HTTP_RANGE_FULL);
    }
    /* If-Range: an exactly matching date lets the range through, anything else does not */
    const char *ims = "Sun, 06 Nov 1994 08:49:37 GMT";
    char buf[256];
    snprintf(buf, sizeof buf,
             "GET / HTTP/1.1\r\nHost: a\r\nIf-Range: %s\r\nRange: bytes=-5\r\n\r\n", ims);
    CHECK_EQ(parse(buf, &req), HTTP_PARSE_DONE);
    CHECK_EQ(req.if_range, HTTP_IF_RANGE_DATE);
    CHECK_EQ(req.if_range_date, 784111777);
    CHECK_EQ(http_request_range(&req, 100, 784111777, NOW, &a, &b), HTTP_RANGE_PARTIAL);
    CHECK_EQ(a, 95);
    CHECK_EQ(b, 99);
    CHECK_EQ(http_request_range(&req, 100, 784111778, NOW, &a, &b), HTTP_RANGE_FULL);
    CHECK_EQ(http_request_range(&req, 100, 784111776, NOW, &a, &b), HTTP_RANGE_FULL);
    /* ...and only when the file's mtime is at least a second before now (RFC 9110 8.8.2.2:
     * modified within the current second, it may change again and keep its date) */
    CHECK_EQ(http_request_range(&req, 100, 784111777, 784111778, &a, &b), HTTP_RANGE_PARTIAL);
    CHECK_EQ(http_request_range(&req, 100, 784111777, 784111777, &a, &b), HTTP_RANGE_FULL);
    CHECK_EQ(http_request_range(&req, 100, 784111777, 784111700, &a, &b), HTTP_RANGE_FULL);
    const char *no[] = {"\"etag\"", "W/\"etag\"", "garbage"};
    for (size_t i = 0; i < 3; i++) {
        snprintf(buf, sizeof buf,
                 "GET / HTTP/1.1\r\nHost: a\r\nRange: bytes=0-0\r\nIf-Range: %s\r\n\r\n", no[i]);
        CHECK_EQ(parse(buf, &req), HTTP_PARSE_DONE);
        CHECK_EQ(req.if_range, HTTP_IF_RANGE_NOMATCH);
        CHECK_EQ(http_request_range(&req, 100, 784111777, NOW, &a, &b), HTTP_RANGE_FULL);
    }
    snprintf(
        buf, sizeof buf,
        "GET / HTTP/1.1\r\nHost: a\r\nRange: bytes=0-0\r\nIf-Range: %s\r\nIf-Range: %s\r\n\r\n",
        ims, ims);
    CHECK_EQ(parse(buf, &req), HTTP_PARSE_DONE);
    CHECK_EQ(http_request_range(&req, 100, 784111777, NOW, &a, &b), HTTP_RANGE_FULL);
}

/* ---- ranges ---------------------------------------------------------------------------------- */

TEST(range_parse)
{
    static const struct {
        const char *v;
        bool ok, suffix;
        uint64_t first, last, suffix_len;
    } cases[] = {
        {"bytes=0-0", true, false, 0, 0, 0},
        {"bytes=0-499", true, false, 0, 499, 0},
        {"BYTES=1-2", true, false, 1, 2, 0},
        {"Bytes=9500-", true, false, 9500, UINT64_MAX, 0},
        {"bytes=-500", true, true, 0, 0, 500},
        {"bytes=-0", true, true, 0, 0, 0},
        {"bytes= 5-6 ", true, false, 5, 6, 0},
        {"bytes=,5-6,", true, false, 5, 6, 0},
        {"bytes=, ,5-6 ,\t,", true, false, 5, 6, 0},
        {"bytes=007-008", true, false, 7, 8, 0},
        {"bytes=0-99999999999999999999999", true, false, 0, UINT64_MAX, 0},
        {"bytes=-99999999999999999999999", true, true, 0, 0, UINT64_MAX},
        {"bytes=18446744073709551615-", true, false, UINT64_MAX, UINT64_MAX, 0},
        {"bytes=5-5", true, false, 5, 5, 0},
        {"bytes=6-5", false, false, 0, 0, 0},
        {"bytes=0-1,2-3", false, false, 0, 0, 0},
        {"bytes=0-1, -5", false, false, 0, 0, 0},
        {"bytes=", false, false, 0, 0, 0},
        {"bytes=,", false, false, 0, 0, 0},
        {"bytes=-", false, false, 0, 0, 0},
        {"bytes=--1", false, false, 0, 0, 0},
        {"bytes=1--2", false, false, 0, 0, 0},
        {"bytes=a-b", false, false, 0, 0, 0},
        {"bytes=1-2-3", false, false, 0, 0, 0},
        {"bytes=1", false, false, 0, 0, 0},
        {"bytes=+1-2", false, false, 0, 0, 0},
        {"bytes=1 -2", false, false, 0, 0, 0},
        {"bytes=0x1-2", false, false, 0, 0, 0},
        {"bytes =0-1", false, false, 0, 0, 0},
        {"bytes0-1", false, false, 0, 0, 0},
        {"bits=0-1", false, false, 0, 0, 0},
        {"", false, false, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        http_range r;
        bool ok = http_range_parse(cases[i].v, strlen(cases[i].v), &r);
        if (ok != cases[i].ok || r.present != ok ||
            (ok && (r.suffix != cases[i].suffix ||
                    (!r.suffix && (r.first != cases[i].first || r.last != cases[i].last)) ||
                    (r.suffix && r.suffix_len != cases[i].suffix_len)))) {
            fprintf(stderr, "range case %zu \"%s\"\n", i, cases[i].v);
            CHECK(false);
        }
    }
}

static http_range_result resolve(const char *v, uint64_t size, uint64_t *a, uint64_t *b)
{
    http_range r;
    CHECK(http_range_parse(v, strlen(v), &r));
    *a = *b = 12345;
    return http_range_resolve(&r, size, a, b);
}

TEST(range_resolve_edges)
{
    uint64_t a, b;
    CHECK_EQ(resolve("bytes=0-0", 100, &a, &b), HTTP_RANGE_PARTIAL); /* first byte */
    CHECK_EQ(a, 0);
    CHECK_EQ(b, 0);
    CHECK_EQ(resolve("bytes=99-99", 100, &a, &b), HTTP_RANGE_PARTIAL); /* last byte */
    CHECK_EQ(a, 99);
    CHECK_EQ(b, 99);
    CHECK_EQ(resolve("bytes=-1", 100, &a, &b), HTTP_RANGE_PARTIAL); /* last byte, suffix */
    CHECK_EQ(a, 99);
    CHECK_EQ(b, 99);
    CHECK_EQ(resolve("bytes=99-", 100, &a, &b), HTTP_RANGE_PARTIAL);
    CHECK_EQ(a, 99);
    CHECK_EQ(b, 99);
    CHECK_EQ(resolve("bytes=50-1000", 100, &a, &b), HTTP_RANGE_PARTIAL); /* last clamped */
    CHECK_EQ(a, 50);
    CHECK_EQ(b, 99);
    CHECK_EQ(resolve("bytes=0-", 100, &a, &b), HTTP_RANGE_PARTIAL); /* whole file: still 206 */
    CHECK_EQ(a, 0);
    CHECK_EQ(b, 99);
    CHECK_EQ(resolve("bytes=0-18446744073709551615", 100, &a, &b), HTTP_RANGE_PARTIAL);
    CHECK_EQ(b, 99);
    CHECK_EQ(resolve("bytes=100-", 100, &a, &b), HTTP_RANGE_UNSATISFIABLE); /* == size */
    CHECK_EQ(resolve("bytes=100-100", 100, &a, &b), HTTP_RANGE_UNSATISFIABLE);
    CHECK_EQ(resolve("bytes=1000-2000", 100, &a, &b), HTTP_RANGE_UNSATISFIABLE);
    CHECK_EQ(resolve("bytes=-0", 100, &a, &b), HTTP_RANGE_UNSATISFIABLE);
    CHECK_EQ(resolve("bytes=-100", 100, &a, &b), HTTP_RANGE_PARTIAL);
    CHECK_EQ(a, 0);
    CHECK_EQ(b, 99);
    CHECK_EQ(resolve("bytes=-1000", 100, &a, &b), HTTP_RANGE_PARTIAL); /* suffix > size */
    CHECK_EQ(a, 0);
    CHECK_EQ(b, 99);
    CHECK_EQ(resolve("bytes=-99999999999999999999", 100, &a, &b), HTTP_RANGE_PARTIAL);
    CHECK_EQ(a, 0);
    CHECK_EQ(resolve("bytes=18446744073709551615-", UINT64_MAX, &a, &b), HTTP_RANGE_UNSATISFIABLE);
    CHECK_EQ(resolve("bytes=18446744073709551614-", UINT64_MAX, &a, &b), HTTP_RANGE_PARTIAL);
    CHECK(a == UINT64_MAX - 1 && b == UINT64_MAX - 1);
    /* an empty file */
    CHECK_EQ(resolve("bytes=0-0", 0, &a, &b), HTTP_RANGE_UNSATISFIABLE);
    CHECK_EQ(resolve("bytes=0-", 0, &a, &b), HTTP_RANGE_UNSATISFIABLE);
    CHECK_EQ(resolve("bytes=-5", 0, &a, &b), HTTP_RANGE_FULL);
    CHECK_EQ(resolve("bytes=-0", 0, &a, &b), HTTP_RANGE_UNSATISFIABLE);
    /* a one-byte file */
    CHECK_EQ(resolve("bytes=0-0", 1, &a, &b), HTTP_RANGE_PARTIAL);
    CHECK_EQ(resolve("bytes=1-1", 1, &a, &b), HTTP_RANGE_UNSATISFIABLE);
    CHECK_EQ(resolve("bytes=-2", 1, &a, &b), HTTP_RANGE_PARTIAL);
    CHECK(a == 0 && b == 0);
    /* start > end is not a range at all */
    http_range r;
    CHECK(!http_range_parse("bytes=10-5", 10, &r));
    CHECK_EQ(http_range_resolve(&r, 100, &a, &b), HTTP_RANGE_FULL);

    /* exhaustively for small sizes: every PARTIAL is within the file and as specified */
    for (uint64_t size = 0; size < 12; size++) {
        for (uint64_t f = 0; f < 14; f++) {
            for (uint64_t l = f; l < 14; l++) {
                char v[64];
                snprintf(v, sizeof v, "bytes=%" PRIu64 "-%" PRIu64, f, l);
                http_range_result rr = resolve(v, size, &a, &b);
                CHECK_EQ(rr, f < size ? HTTP_RANGE_PARTIAL : HTTP_RANGE_UNSATISFIABLE);
                if (rr == HTTP_RANGE_PARTIAL)
                    CHECK(a == f && b == (l < size ? l : size - 1));
            }
            char v[64];
            snprintf(v, sizeof v, "bytes=-%" PRIu64, f);
            http_range_result rr = resolve(v, size, &a, &b);
            if (f == 0)
                CHECK_EQ(rr, HTTP_RANGE_UNSATISFIABLE);
            else if (size == 0)
                CHECK_EQ(rr, HTTP_RANGE_FULL);
            else
                CHECK(rr == HTTP_RANGE_PARTIAL && b == size - 1 &&
                      b - a + 1 == (f < size ? f : size));
        }
    }
}

/* ---- incremental parsing and pipelining ------------------------------------------------------ */

static const char *const corpus[] = {
    "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "GET /index.html?x=1&y=%2F HTTP/1.1\r\nHost: example.com:8080\r\nUser-Agent: curl/8.0\r\n"
    "Accept: */*\r\nConnection: keep-alive\r\nRange: bytes=0-99\r\n"
    "If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n",
    "\r\n\r\nHEAD /a HTTP/1.0\nConnection: keep-alive\n\n",
    "GET http://h:1/p?q HTTP/1.1\r\nHost: h\r\nIf-Range: \"e\"\r\nRange: bytes=-5\r\n\r\n",
    "OPTIONS * HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nIf-Range: Sun Nov  6 08:49:37 1994\r\nRange: bytes=5-\r\n\r\n",
    "HEAD / HTTP/1.1\r\nHost: a\r\nIf-Match: *\r\nIf-Unmodified-Since: Sun Nov 6 1994\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nIf-Unmodified-Since: Sun Nov  6 08:49:37 1994\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\r\n\r\n",
    "GET / HTTP/2.0\r\n\r\n",
    "GET / HTTP/1.1\r\nContent-Length: 10\r\nHost: a\r\n\r\n0123456789",
    "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "GET / HTTP/1.1\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    "GET /\x01 HTTP/1.1\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
    "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "GET / HTTP/1.1\r\nHost: a\r\n",
    "GET / HTTP/1.1\r",
};

TEST(incremental_every_split)
{
    for (size_t i = 0; i < sizeof corpus / sizeof corpus[0]; i++)
        check_incremental(corpus[i], strlen(corpus[i]));
    /* and whole pipelines of them */
    char big[4096];
    size_t n = 0;
    for (size_t i = 0; i < 7; i++) {
        size_t l = strlen(corpus[i]);
        memcpy(big + n, corpus[i], l);
        n += l;
    }
    check_incremental(big, n);
}

TEST(incremental_done_exactly_at_end)
{
    const char *s = corpus[1];
    size_t len = strlen(s);
    http_parser p;
    http_parser_init(&p);
    http_request req;
    for (size_t k = 0; k < len; k++)
        CHECK_EQ(http_parse(&p, s, k, &req), HTTP_PARSE_NEED_MORE);
    CHECK_EQ(http_parse(&p, s, len, &req), HTTP_PARSE_DONE);
    CHECK_EQ(req.head_len, len);
    CHECK(slice_is(req.path, "/index.html"));
    CHECK(req.range.present && req.range.first == 0 && req.range.last == 99);
    CHECK(req.has_if_modified_since);
    /* the parser is reset: the same bytes parse again */
    CHECK_EQ(http_parse(&p, s, len, &req), HTTP_PARSE_DONE);
    /* giving fewer bytes than before restarts cleanly */
    http_parser_init(&p);
    CHECK_EQ(http_parse(&p, s, len - 3, &req), HTTP_PARSE_NEED_MORE);
    CHECK_EQ(http_parse(&p, "GET /z HTTP/1.0\r\n\r\n", 19, &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.path, "/z"));
}

TEST(incremental_sticky_error)
{
    http_parser p;
    http_parser_init(&p);
    http_request req;
    const char *s = "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
    CHECK_EQ(http_parse(&p, s, strlen(s), &req), HTTP_PARSE_ERROR);
    CHECK_EQ(req.status, 400);
    CHECK_EQ(http_parse(&p, "GET / HTTP/1.0\r\n\r\n", 18, &req), HTTP_PARSE_ERROR);
    CHECK_EQ(req.status, 400);
    CHECK(!req.keep_alive);
    http_parser_init(&p);
    CHECK_EQ(http_parse(&p, "GET / HTTP/1.0\r\n\r\n", 18, &req), HTTP_PARSE_DONE);
}

TEST(pipelining)
{
    const char *s = "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                    "HEAD /2 HTTP/1.1\nHost: a\n\n"
                    "\r\nGET /3?x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                    "GET /4 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                    "GET /5 HTTP/1.1\r\nHo";
    const char *paths[] = {"/1", "/2", "/3", "/4"};
    const http_method methods[] = {HTTP_METHOD_GET, HTTP_METHOD_HEAD, HTTP_METHOD_GET,
                                   HTTP_METHOD_GET};
    const bool keep[] = {true, true, true, false};
    size_t len = strlen(s), off = 0;
    http_parser p;
    http_parser_init(&p);
    for (int i = 0; i < 4; i++) {
        http_request req;
        CHECK_EQ(http_parse(&p, s + off, len - off, &req), HTTP_PARSE_DONE);
        CHECK(req.head == s + off);
        CHECK(slice_is(req.path, paths[i]));
        CHECK_EQ(req.method, methods[i]);
        CHECK_EQ(req.keep_alive, keep[i]);
        off += req.head_len;
    }
    CHECK(strncmp(s + off, "GET /5", 6) == 0);
    http_request req;
    CHECK_EQ(http_parse(&p, s + off, len - off, &req), HTTP_PARSE_NEED_MORE);

    /* a bad request behind good ones fails only when reached */
    const char *t = "GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
    http_parser_init(&p);
    CHECK_EQ(http_parse(&p, t, strlen(t), &req), HTTP_PARSE_DONE);
    CHECK(slice_is(req.path, "/a"));
    CHECK_EQ(http_parse(&p, t + req.head_len, strlen(t) - req.head_len, &req), HTTP_PARSE_ERROR);
    CHECK_EQ(req.status, 400);
}

/* ---- limits ---------------------------------------------------------------------------------- */

/* Build "GET /aaa...a HTTP/1.1\r\n" of exactly `total` bytes (CRLF included). */
static char *request_line_of(size_t total)
{
    const char *pre = "GET /", *post = " HTTP/1.1\r\n";
    size_t fill = total - strlen(pre) - strlen(post);
    char *s = malloc(total + 64);
    CHECK(s != NULL);
    strcpy(s, pre);
    memset(s + strlen(pre), 'a', fill);
    strcpy(s + strlen(pre) + fill, post);
    strcat(s, "Host: a\r\n\r\n");
    return s;
}

TEST(limit_request_line)
{
    http_request req;
    char *s = request_line_of(HTTP_MAX_REQUEST_LINE);
    CHECK_EQ(parse(s, &req), HTTP_PARSE_DONE);
    CHECK_EQ(req.path.len, HTTP_MAX_REQUEST_LINE - 15);
    free(s);
    s = request_line_of(HTTP_MAX_REQUEST_LINE + 1);
    EXPECT_ERROR(s, 414);
    free(s);

    /* an endless target: refused as soon as the limit is reached, without a line end */
    char *t = repeat('a', HTTP_MAX_REQUEST_LINE + 100);
    memcpy(t, "GET /", 5);
    http_parser p;
    http_parser_init(&p);
    for (size_t k = 0; k < HTTP_MAX_REQUEST_LINE; k += 97)
        CHECK_EQ(http_parse(&p, t, k, &req), HTTP_PARSE_NEED_MORE);
    CHECK_EQ(http_parse(&p, t, HTTP_MAX_REQUEST_LINE - 1, &req), HTTP_PARSE_NEED_MORE);
    CHECK_EQ(http_parse(&p, t, HTTP_MAX_REQUEST_LINE, &req), HTTP_PARSE_ERROR);
    CHECK_EQ(req.status, 414);
    CHECK(!req.keep_alive);
    /* the same with a trailing CR exactly at the limit */
    t[HTTP_MAX_REQUEST_LINE - 1] = '\r';
    expect_error_at(t, HTTP_MAX_REQUEST_LINE, 414, __LINE__);
    http_parser_init(&p);
    CHECK_EQ(http_parse(&p, t, HTTP_MAX_REQUEST_LINE - 1, &req), HTTP_PARSE_NEED_MORE);
    CHECK_EQ(http_parse(&p, t, HTTP_MAX_REQUEST_LINE, &req), HTTP_PARSE_ERROR);

    /* an endless method, or junk after the target: 400 */
    memset(t, 'G', HTTP_MAX_REQUEST_LINE + 100);
    expect_error_at(t, HTTP_MAX_REQUEST_LINE, 400, __LINE__);
    memset(t, 'a', HTTP_MAX_REQUEST_LINE + 100);
    memcpy(t, "GET / HTTP/1.1", 14);
    expect_error_at(t, HTTP_MAX_REQUEST_LINE, 400, __LINE__);
    /* a long target followed by a long version: 400; by a normal one: 414 */
    memset(t, 'a', HTTP_MAX_REQUEST_LINE + 100);
    memcpy(t, "GET /", 5);
    memcpy(t + HTTP_MAX_REQUEST_LINE - 30, " HTTP/1.1", 9);
    expect_error_at(t, HTTP_MAX_REQUEST_LINE, 400, __LINE__);
    memset(t + 5, 'a', HTTP_MAX_REQUEST_LINE);
    memcpy(t + HTTP_MAX_REQUEST_LINE - 9, " HTTP/1.1\r\n", 11);
    expect_error_at(t, HTTP_MAX_REQUEST_LINE, 414, __LINE__);
    expect_error_at(t, HTTP_MAX_REQUEST_LINE + 2, 414, __LINE__);
    free(t);
}

TEST(limit_field_line)
{
    http_request req;
    const char *pre = "GET / HTTP/1.1\r\nHost: a\r\n";
    size_t pl = strlen(pre);
    /* a field line of exactly the limit (CRLF included) is fine, one more byte is not */
    for (int extra = 0; extra <= 1; extra++) {
        size_t fl = HTTP_MAX_FIELD_LINE + (size_t)extra;
        char *s = repeat('v', pl + fl + 2);
        memcpy(s, pre, pl);
        memcpy(s + pl, "X: ", 3);
        memcpy(s + pl + fl - 2, "\r\n\r\n", 4);
        if (extra == 0) {
            CHECK_EQ(parse(s, &req), HTTP_PARSE_DONE);
            http_slice v;
            CHECK(http_header_get(&req, "x", &v));
            CHECK_EQ(v.len, HTTP_MAX_FIELD_LINE - 5);
        } else {
            EXPECT_ERROR(s, 431);
        }
        free(s);
    }
    /* an endless field line: NEED_MORE up to the limit, 431 the moment it is reached */
    size_t total = pl + HTTP_MAX_FIELD_LINE + 1000;
    char *s = repeat('z', total);
    memcpy(s, pre, pl);
    memcpy(s + pl, "X-Endless: ", 11);
    http_parser p;
    http_parser_init(&p);
    size_t k;
    http_parse_status r = HTTP_PARSE_NEED_MORE;
    for (k = 1; k <= total && r == HTTP_PARSE_NEED_MORE; k++)
        r = http_parse(&p, s, k, &req);
    CHECK_EQ(r, HTTP_PARSE_ERROR);
    CHECK_EQ(req.status, 431);
    CHECK_EQ(k - 1, pl + HTTP_MAX_FIELD_LINE);
    free(s);
}

TEST(limit_field_count)
{
    http_request req;
    char *s = malloc(64 * 1024);
    CHECK(s != NULL);
    for (int nf = HTTP_MAX_FIELDS - 1; nf <= HTTP_MAX_FIELDS + 1; nf++) {
        size_t n = (size_t)sprintf(s, "GET / HTTP/1.1\r\nHost: a\r\n");
        for (int i = 1; i < nf; i++)
            n += (size_t)sprintf(s + n, "X-%d: %d\r\n", i, i);
        strcpy(s + n, "\r\n");
        if (nf <= HTTP_MAX_FIELDS) {
            CHECK_EQ(parse(s, &req), HTTP_PARSE_DONE);
            CHECK_EQ(req.nfields, nf);
        } else {
            EXPECT_ERROR(s, 431);
            /* detected at the extra field's line, before the head ends */
            expect_error_at(s, n, 431, __LINE__);
        }
    }
    /* empty fields count too */
    size_t n = (size_t)sprintf(s, "GET / HTTP/1.0\r\n");
    for (int i = 0; i <= HTTP_MAX_FIELDS; i++)
        n += (size_t)sprintf(s + n, "X:\r\n");
    strcpy(s + n, "\r\n");
    EXPECT_ERROR(s, 431);
    free(s);
}

/* A head of exactly `total` bytes made of a request line and 4000-byte fields. */
static char *head_of(size_t total)
{
    char *s = malloc(total + 1);
    CHECK(s != NULL);
    size_t n = (size_t)sprintf(s, "GET / HTTP/1.1\r\nHost: a\r\n");
    while (total - n - 2 > 0) {
        size_t fl = total - n - 2;
        if (fl > 4000)
            fl = 4000;
        if (fl < 5) {
            /* too short for a field: lengthen the previous one instead */
            memmove(s + n - 2 + fl, s + n - 2, 2);
            memset(s + n - 2, 'y', fl);
            n += fl;
            break;
        }
        memcpy(s + n, "F: ", 3);
        memset(s + n + 3, 'x', fl - 5);
        memcpy(s + n + fl - 2, "\r\n", 2);
        n += fl;
    }
    memcpy(s + n, "\r\n", 2);
    s[total] = '\0';
    return s;
}

TEST(limit_head)
{
    http_request req;
    char *s = head_of(HTTP_MAX_HEAD);
    CHECK_EQ(strlen(s), HTTP_MAX_HEAD);
    CHECK_EQ(parse(s, &req), HTTP_PARSE_DONE);
    CHECK_EQ(req.head_len, HTTP_MAX_HEAD);
    free(s);
    s = head_of(HTTP_MAX_HEAD + 1);
    CHECK_EQ(strlen(s), HTTP_MAX_HEAD + 1);
    EXPECT_ERROR(s, 431);
    /* detected once HTTP_MAX_HEAD bytes are in, not at the end of the head */
    http_parser p;
    http_parser_init(&p);
    CHECK_EQ(http_parse(&p, s, HTTP_MAX_HEAD - 1, &req), HTTP_PARSE_NEED_MORE);
    CHECK_EQ(http_parse(&p, s, HTTP_MAX_HEAD, &req), HTTP_PARSE_ERROR);
    CHECK_EQ(req.status, 431);
    free(s);
    /* endless empty lines before the request line */
    s = repeat('\n', HTTP_MAX_HEAD + 10);
    expect_error_at(s, HTTP_MAX_HEAD, 431, __LINE__);
    http_parser_init(&p);
    CHECK_EQ(http_parse(&p, s, HTTP_MAX_HEAD - 1, &req), HTTP_PARSE_NEED_MORE);
    free(s);
    /* endless small fields */
    s = malloc(HTTP_MAX_HEAD * 2);
    size_t n = (size_t)sprintf(s, "GET / HTTP/1.0\r\n");
    while (n < HTTP_MAX_HEAD + 100)
        n += (size_t)sprintf(s + n, "X-Field-Name-Long: %0100d\r\n", 7);
    expect_error_at(s, n, 431, __LINE__);
    free(s);
}

/* ---- paths ----------------------------------------------------------------------------------- */

static void expect_path_at(const char *in, const char *want, bool dir, int line)
{
    http_path p;
    int r = http_resolve_path(in, strlen(in), &p);
    if (r != 0 || strcmp(p.buf, want) != 0 || p.len != strlen(want) || p.is_dir != dir) {
        fprintf(stderr, "line %d: resolve \"%s\": %d \"%s\" dir=%d, want \"%s\" dir=%d\n", line, in,
                r, p.buf, p.is_dir, want, dir);
        exit(1);
    }
}
#define EXPECT_PATH(in, want, dir) expect_path_at((in), (want), (dir), __LINE__)

static void expect_refused_at(const char *in, size_t len, int status, int line)
{
    http_path p;
    int r = http_resolve_path(in, len, &p);
    if (r != status) {
        fprintf(stderr, "line %d: resolve \"%s\": %d \"%s\", want %d\n", line, in, r, p.buf,
                status);
        exit(1);
    }
}
#define EXPECT_REFUSED(in) expect_refused_at((in), strlen(in), 400, __LINE__)

TEST(resolve_path_ok)
{
    EXPECT_PATH("/", "", true);
    EXPECT_PATH("/index.html", "index.html", false);
    EXPECT_PATH("/a/b/c.txt", "a/b/c.txt", false);
    EXPECT_PATH("/a//b///c", "a/b/c", false);
    EXPECT_PATH("/a/./b/.", "a/b", true);
    EXPECT_PATH("/a/b/", "a/b", true);
    EXPECT_PATH("/./", "", true);
    EXPECT_PATH("/.", "", true);
    EXPECT_PATH("//", "", true);
    EXPECT_PATH("/%2e", "", true);
    EXPECT_PATH("/a/%2E/b", "a/b", false);
    EXPECT_PATH("/a%20b", "a b", false);
    EXPECT_PATH("/%41%62c", "Abc", false);
    EXPECT_PATH("/a?x=/../../etc/passwd", "a", false);
    EXPECT_PATH("/dir/?q", "dir", true);
    EXPECT_PATH("/a#../../x", "a", false);
    EXPECT_PATH("/caf%C3%A9.html", "caf\xc3\xa9.html", false);
    EXPECT_PATH("/%F0%9F%98%80", "\xf0\x9f\x98\x80", false);
    EXPECT_PATH("/.hidden", ".hidden", false);
    EXPECT_PATH("/...", "...", false);
    EXPECT_PATH("/a..b/..c/c..", "a..b/..c/c..", false);
    EXPECT_PATH("/a+b;c=d@e:f", "a+b;c=d@e:f", false);
    /* "//etc/passwd" names etc/passwd inside the root, never /etc/passwd */
    EXPECT_PATH("//etc/passwd", "etc/passwd", false);
    EXPECT_PATH("/%2e/%2e/etc", "etc", false);
}

TEST(resolve_path_traversal)
{
    static const char *const attacks[] = {
        "/../etc/passwd",
        "/..",
        "/../",
        "/a/..",
        "/a/../b",
        "/a/../../",
        "/a/b/../../../../etc/passwd",
        "/%2e%2e/",
        "/%2e%2e",
        "/%2E%2E/etc/passwd",
        "/%2E%2E%2F",
        "/%2e%2e%2fetc%2fpasswd",
        "/..%2f",
        "/..%2F..%2Fetc%2Fpasswd",
        "/.%2e/",
        "/%2e./",
        "/.%2E",
        "/a/%2e%2E",
        "/%00",
        "/a%00.html",
        "/index.html%00.txt",
        "/..\\",
        "/..\\..\\etc\\passwd",
        "/a\\b",
        "/\\",
        "/%5c",
        "/%5C..%5C",
        "/a%2fb",
        "/a%2Fb",
        "/%2f",
        "/%c0%ae%c0%ae/", /* overlong "." */
        "/%c0%ae%c0%ae%c0%af",
        "/%c0%af",             /* overlong "/" */
        "/%e0%80%ae%e0%80%ae", /* 3-byte overlong "." */
        "/%f0%80%80%ae",
        "/%c1%9c",       /* overlong "\" */
        "/%ed%a0%80",    /* surrogate */
        "/%f4%90%80%80", /* > U+10FFFF */
        "/%ff",
        "/%80",
        "/%c3", /* truncated sequence */
        "/%c3%28",
        "/%01",
        "/%0a",
        "/%0d%0a",
        "/%1f",
        "/%7f",
        "/a\tb",
        "/%",
        "/%2",
        "/%zz",
        "/%g0",
        "/%0g",
        "/a%",
        "",
        "a/b",
        "../etc/passwd",
        "?/a",
        "http://h/",
        "*",
    };
    for (size_t i = 0; i < sizeof attacks / sizeof attacks[0]; i++)
        expect_refused_at(attacks[i], strlen(attacks[i]), 400, __LINE__);
    /* raw bytes a direct caller might pass */
    expect_refused_at("/a\0b", 4, 400, __LINE__);
    expect_refused_at("/\xc0\xae\xc0\xae", 5, 400, __LINE__);
    expect_refused_at("/a\x7f", 3, 400, __LINE__);
    EXPECT_PATH("/\xc3\xa9", "\xc3\xa9", false); /* valid raw UTF-8 is fine */
}

/* Every byte value, raw and percent-encoded, inside a path segment. */
TEST(resolve_path_bytes)
{
    for (int c = 0; c < 256; c++) {
        char raw[8] = {'/', 'a', (char)c, 'b'}, enc[16];
        snprintf(enc, sizeof enc, "/a%%%02Xb", c);
        http_path p;
        int r = http_resolve_path(raw, 4, &p);
        bool plain = c >= 0x20 && c <= 0x7e && c != '%' && c != '\\';
        if (c == '/') {
            CHECK(r == 0 && strcmp(p.buf, "a/b") == 0);
        } else if (c == '?' || c == '#') {
            CHECK(r == 0 && strcmp(p.buf, "a") == 0);
        } else if (plain) {
            CHECK(r == 0 && p.len == 3 && (unsigned char)p.buf[1] == c);
        } else {
            CHECK_EQ(r, 400); /* controls, DEL, backslash, a lone %, a lone byte >= 0x80 */
        }
        r = http_resolve_path(enc, strlen(enc), &p);
        bool ok = c >= 0x20 && c <= 0x7e && c != '/' && c != '\\';
        CHECK_EQ(r == 0, ok);
        if (ok)
            CHECK(p.len == 3 && (unsigned char)p.buf[1] == c);
        /* lowercase hex digits too */
        snprintf(enc, sizeof enc, "/a%%%02xb", c);
        CHECK_EQ(http_resolve_path(enc, strlen(enc), &p) == 0, ok);
    }
}

static bool dotfile(const char *in)
{
    http_path p;
    CHECK_EQ(http_resolve_path(in, strlen(in), &p), 0);
    return http_path_is_dotfile(&p);
}

/* A segment starting with '.', however it is spelled, is a dotfile; ".well-known" only as
 * the first segment, exactly, is not (the files below it are checked as well). */
TEST(path_dotfiles)
{
    static const char *const dot[] = {
        "/.env",
        "/.git/config",
        "/.git/",
        "/.git",
        "/%2egit/config",
        "/%2Egit.x",
        "/a/.htpasswd",
        "/a/b/.c/d",
        "/./.env",
        "//.env",
        "/a//.b",
        "/...",
        "/..a",
        "/.well-known/.git",
        "/.well-known/a/.b",
        "/.well-knownx/a",
        "/.well-know/a",
        "/.Well-Known/a",
        "/a/.well-known/x",
        "/.well-known%2e/a",
    };
    for (size_t i = 0; i < sizeof dot / sizeof dot[0]; i++) {
        if (!dotfile(dot[i]))
            fprintf(stderr, "%s: not a dotfile\n", dot[i]);
        CHECK(dotfile(dot[i]));
    }
    static const char *const plain[] = {
        "/",
        "/index.html",
        "/a.b/c.d",
        "/a./b",
        "/a/b.",
        "/.well-known",
        "/.well-known/",
        "/.well-known/acme-challenge/tok.en",
        "/%2ewell-known/security.txt",
        "/./a",
        "/a/./b/.",
    };
    for (size_t i = 0; i < sizeof plain / sizeof plain[0]; i++) {
        if (dotfile(plain[i]))
            fprintf(stderr, "%s: a dotfile\n", plain[i]);
        CHECK(!dotfile(plain[i]));
    }
}

TEST(resolve_path_length)
{
    /* the decoded path may be HTTP_PATH_MAX - 1 bytes */
    char *s = repeat('a', HTTP_PATH_MAX + 10);
    s[0] = '/';
    http_path p;
    CHECK_EQ(http_resolve_path(s, HTTP_PATH_MAX, &p), 0);
    CHECK_EQ(p.len, HTTP_PATH_MAX - 1);
    CHECK_EQ(p.buf[p.len], '\0');
    CHECK_EQ(http_resolve_path(s, HTTP_PATH_MAX + 1, &p), 414);
    /* separators count, collapsed slashes do not */
    for (size_t i = 2; i < HTTP_PATH_MAX + 10; i += 2)
        s[i] = '/';
    CHECK_EQ(http_resolve_path(s, HTTP_PATH_MAX, &p), 0);
    CHECK_EQ(http_resolve_path(s, HTTP_PATH_MAX + 2, &p), 414);
    free(s);
    /* percent-encoding is decoded before measuring */
    char *e = malloc(3 * HTTP_PATH_MAX + 2);
    e[0] = '/';
    for (size_t i = 0; i < HTTP_PATH_MAX - 1; i++)
        memcpy(e + 1 + 3 * i, "%41", 3);
    CHECK_EQ(http_resolve_path(e, 1 + 3 * (HTTP_PATH_MAX - 1), &p), 0);
    CHECK_EQ(p.len, HTTP_PATH_MAX - 1);
    CHECK_EQ(p.buf[0], 'A');
    memcpy(e + 1 + 3 * (HTTP_PATH_MAX - 1), "%41", 3);
    CHECK_EQ(http_resolve_path(e, 1 + 3 * HTTP_PATH_MAX, &p), 414);
    free(e);
}

/* Random paths over a hostile alphabet: whatever is accepted is a clean relative path. */
TEST(resolve_path_random)
{
    static const char alpha[] = "/./.%2e%2E%2f%5c\\a%00%c0%ae%%e9x?#";
    uint64_t x = 0x9e3779b97f4a7c15u;
    int64_t iters = cpt_scaled(300000, 10000), accepted = 0;
    for (int64_t it = 0; it < iters; it++) {
        char in[40];
        size_t n = 0;
        in[n++] = '/';
        size_t want = 1 + (size_t)(x % 30);
        while (n < want) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            in[n++] = alpha[x % (sizeof alpha - 1)];
        }
        http_path p;
        if (http_resolve_path(in, n, &p) != 0)
            continue;
        accepted++;
        CHECK_EQ(strlen(p.buf), p.len);
        CHECK(p.len == 0 || (p.buf[0] != '/' && p.buf[p.len - 1] != '/'));
        CHECK(strstr(p.buf, "//") == NULL);
        CHECK(strchr(p.buf, '\\') == NULL);
        for (size_t i = 0; i < p.len; i++)
            CHECK((unsigned char)p.buf[i] >= 0x20 && p.buf[i] != 0x7f);
        /* no "." or ".." segment */
        char *seg = p.buf;
        while (p.len) {
            char *sl = strchr(seg, '/');
            size_t l = sl ? (size_t)(sl - seg) : strlen(seg);
            CHECK(l > 0);
            CHECK(!(l == 1 && seg[0] == '.'));
            CHECK(!(l == 2 && seg[0] == '.' && seg[1] == '.'));
            if (!sl)
                break;
            seg = sl + 1;
        }
    }
    CHECK(accepted > iters / 50);
}

/* ---- opening beneath a root ------------------------------------------------------------------ */

typedef struct tree {
    char base[64]; /* holds outside.txt and www/ */
    char www[96];
    int root;
} tree;

static void write_file(const char *path, const char *content)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    CHECK(fd >= 0);
    CHECK_EQ(write(fd, content, strlen(content)), (int64_t)strlen(content));
    close(fd);
}

static void at(char *out, size_t cap, const char *dir, const char *name)
{
    int n = snprintf(out, cap, "%s/%s", dir, name);
    CHECK(n > 0 && (size_t)n < cap);
}

static void make_tree(tree *t)
{
    char p[256], q[256];
    strcpy(t->base, "/tmp/cport-http-XXXXXX");
    CHECK(mkdtemp(t->base) != NULL);
    at(t->www, sizeof t->www, t->base, "www");
    CHECK_EQ(mkdir(t->www, 0755), 0);
    at(p, sizeof p, t->base, "outside.txt");
    write_file(p, "secret");
#define W(name) (at(p, sizeof p, t->www, name), p)
    write_file(W("file.txt"), "hello");
    write_file(W("UPPER.HTML"), "<p>");
    CHECK_EQ(mkdir(W("dir"), 0755), 0);
    write_file(W("dir/index.html"), "<h1>dir</h1>");
    write_file(W("dir/page.css"), "body{}");
    CHECK_EQ(mkdir(W("dir/sub"), 0755), 0);
    CHECK_EQ(mkdir(W("emptydir"), 0755), 0);
    CHECK_EQ(mkdir(W("dirindex"), 0755), 0);
    CHECK_EQ(mkdir(W("dirindex/index.html"), 0755), 0);
    CHECK_EQ(mkdir(W("badindex"), 0755), 0);
    CHECK_EQ(symlink("/etc/passwd", W("badindex/index.html")), 0);
    CHECK_EQ(mkdir(W("upindex"), 0755), 0);
    CHECK_EQ(symlink("../file.txt", W("upindex/index.html")), 0); /* still inside the root */
    CHECK_EQ(symlink("file.txt", W("link_in")), 0);
    CHECK_EQ(symlink("dir/../file.txt", W("link_in_dotdot")), 0);
    CHECK_EQ(symlink("dir", W("link_dir")), 0);
    CHECK_EQ(symlink("/etc/passwd", W("link_passwd")), 0);
    CHECK_EQ(symlink("../outside.txt", W("link_up")), 0);
    CHECK_EQ(symlink("dir/../../outside.txt", W("link_up2")), 0);
    CHECK_EQ(symlink("..", W("link_parent")), 0);
    CHECK_EQ(symlink("/", W("link_slash")), 0);
    CHECK_EQ(symlink("/proc/self/root/etc/passwd", W("link_proc")), 0);
    CHECK_EQ(symlink("missing", W("link_dangling")), 0);
    CHECK_EQ(symlink("loop", W("loop")), 0);
    at(q, sizeof q, t->www, "file.txt");
    CHECK_EQ(symlink(q, W("link_abs_inside")), 0); /* absolute, even though inside */
    CHECK_EQ(mkfifo(W("fifo"), 0644), 0);
    write_file(W("noperm.txt"), "x");
    CHECK_EQ(chmod(p, 0), 0);
    write_file(W("empty.txt"), "");
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(s >= 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    at(sa.sun_path, sizeof sa.sun_path, t->www, "sock");
    CHECK_EQ(bind(s, (struct sockaddr *)&sa, sizeof sa), 0);
    close(s);
#undef W
    t->root = open(t->www, O_PATH | O_DIRECTORY | O_CLOEXEC);
    CHECK(t->root >= 0);
}

static void remove_tree(tree *t)
{
    char cmd[256];
    close(t->root);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", t->base);
    CHECK_EQ(system(cmd), 0);
}

/* Resolve and open a request path; returns the status (0 = opened) and the content. */
static int fetch(const tree *t, const char *req_path, char *content, size_t cap, http_file *f)
{
    http_path p;
    memset(f, 0, sizeof *f);
    f->fd = -1;
    int st = http_resolve_path(req_path, strlen(req_path), &p);
    if (st != 0)
        return st;
    st = http_open_beneath(t->root, &p, f);
    if (st != 0) {
        CHECK_EQ(f->fd, -1);
        return st;
    }
    CHECK(f->fd >= 0);
    ssize_t n = pread(f->fd, content, cap - 1, 0);
    CHECK(n >= 0);
    content[n] = '\0';
    CHECK_EQ((uint64_t)n, f->size);
    close(f->fd);
    return 0;
}

static void expect_fetch_at(const tree *t, const char *path, int status, const char *content,
                            int line)
{
    char buf[256];
    http_file f;
    int st = fetch(t, path, buf, sizeof buf, &f);
    if (st != status || (status == 0 && strcmp(buf, content) != 0)) {
        fprintf(stderr, "line %d: %s: status %d (errno %d) content \"%s\", want %d \"%s\"\n", line,
                path, st, f.err, st == 0 ? buf : "", status, content ? content : "");
        exit(1);
    }
}
#define EXPECT_FETCH(t, path, status, content)                                                     \
    expect_fetch_at((t), (path), (status), (content), __LINE__)

TEST(open_files_and_dirs)
{
    alarm(20); /* a FIFO open that blocked would hang here */
    tree t;
    make_tree(&t);
    EXPECT_FETCH(&t, "/file.txt", 0, "hello");
    EXPECT_FETCH(&t, "/UPPER.HTML", 0, "<p>");
    EXPECT_FETCH(&t, "/empty.txt", 0, "");
    EXPECT_FETCH(&t, "/dir/page.css", 0, "body{}");
    EXPECT_FETCH(&t, "/./dir//page.css?x=1", 0, "body{}");
    /* directories are served through index.html; without the slash, a 301 to it (the index
     * used to be served there, and its relative links resolved against the parent) */
    EXPECT_FETCH(&t, "/dir/", 0, "<h1>dir</h1>");
    EXPECT_FETCH(&t, "/dir", 301, NULL);
    EXPECT_FETCH(&t, "//dir", 301, NULL);
    EXPECT_FETCH(&t, "/upindex", 301, NULL);
    EXPECT_FETCH(&t, "/dir/.", 0, "<h1>dir</h1>");
    EXPECT_FETCH(&t, "/dir/index.html", 0, "<h1>dir</h1>");
    EXPECT_FETCH(&t, "/upindex/", 0, "hello"); /* index symlink to ../file.txt, inside */
    /* a directory without index.html: 403, never a listing */
    EXPECT_FETCH(&t, "/dir/sub/", 403, NULL);
    EXPECT_FETCH(&t, "/dir/sub", 403, NULL);
    EXPECT_FETCH(&t, "/emptydir/", 403, NULL);
    EXPECT_FETCH(&t, "/", 403, NULL);          /* the root has no index.html (yet) */
    EXPECT_FETCH(&t, "/dirindex/", 403, NULL); /* index.html is a directory */
    EXPECT_FETCH(&t, "/dirindex", 403, NULL);
    EXPECT_FETCH(&t, "/badindex/", 403, NULL); /* index.html leads outside */
    /* missing things */
    EXPECT_FETCH(&t, "/missing", 404, NULL);
    EXPECT_FETCH(&t, "/missing/", 404, NULL);
    EXPECT_FETCH(&t, "/missing/x.html", 404, NULL);
    EXPECT_FETCH(&t, "/file.txt/", 404, NULL);
    EXPECT_FETCH(&t, "/file.txt/x", 404, NULL);
    EXPECT_FETCH(&t, "//etc/passwd", 404, NULL);
    EXPECT_FETCH(&t, "/outside.txt", 404, NULL);
    /* a name longer than NAME_MAX */
    char longname[400] = "/";
    memset(longname + 1, 'n', 300);
    EXPECT_FETCH(&t, longname, 404, NULL);

    /* the root gets an index */
    char p[256];
    at(p, sizeof p, t.www, "index.html");
    write_file(p, "root");
    EXPECT_FETCH(&t, "/", 0, "root");
    EXPECT_FETCH(&t, "/?q", 0, "root");

    /* metadata and fd flags */
    http_path hp;
    http_file f;
    CHECK_EQ(http_resolve_path("/file.txt", 9, &hp), 0);
    CHECK_EQ(http_open_beneath(t.root, &hp, &f), 0);
    struct stat st;
    at(p, sizeof p, t.www, "file.txt");
    CHECK_EQ(stat(p, &st), 0);
    CHECK_EQ(f.size, 5);
    CHECK_EQ(f.mtime, st.st_mtim.tv_sec);
    CHECK_EQ(f.err, 0);
    int fl = fcntl(f.fd, F_GETFL);
    CHECK(fl >= 0 && (fl & O_ACCMODE) == O_RDONLY && !(fl & O_NONBLOCK));
    CHECK(fcntl(f.fd, F_GETFD) & FD_CLOEXEC);
    close(f.fd);
    remove_tree(&t);
}

TEST(open_symlinks)
{
    tree t;
    make_tree(&t);
    EXPECT_FETCH(&t, "/link_in", 0, "hello");
    EXPECT_FETCH(&t, "/link_in_dotdot", 0, "hello");
    EXPECT_FETCH(&t, "/link_dir/", 0, "<h1>dir</h1>");
    EXPECT_FETCH(&t, "/link_dir", 301, NULL); /* a directory: to "/link_dir/" */
    EXPECT_FETCH(&t, "/link_dir/page.css", 0, "body{}");
    /* everything that leads outside the root is refused */
    EXPECT_FETCH(&t, "/link_passwd", 403, NULL);
    EXPECT_FETCH(&t, "/link_up", 403, NULL);
    EXPECT_FETCH(&t, "/link_up2", 403, NULL);
    EXPECT_FETCH(&t, "/link_parent/outside.txt", 403, NULL);
    EXPECT_FETCH(&t, "/link_parent/", 403, NULL);
    EXPECT_FETCH(&t, "/link_slash/etc/passwd", 403, NULL);
    EXPECT_FETCH(&t, "/link_proc", 403, NULL);
    EXPECT_FETCH(&t, "/link_abs_inside", 403, NULL); /* absolute symlinks: refused */
    EXPECT_FETCH(&t, "/loop", 403, NULL);
    EXPECT_FETCH(&t, "/link_dangling", 404, NULL);
    http_file f;
    char buf[64];
    CHECK_EQ(fetch(&t, "/link_passwd", buf, sizeof buf, &f), 403);
    CHECK_EQ(f.err, EXDEV);
    CHECK_EQ(fetch(&t, "/loop", buf, sizeof buf, &f), 403);
    CHECK_EQ(f.err, ELOOP);

    /* defence in depth: paths that http_resolve_path() would refuse are still confined */
    static const char *const raw[] = {"../outside.txt", "/etc/passwd", "dir/../../outside.txt",
                                      "..", "link_parent/www/file.txt"};
    for (size_t i = 0; i < sizeof raw / sizeof raw[0]; i++) {
        http_path hp = {.len = strlen(raw[i])};
        strcpy(hp.buf, raw[i]);
        CHECK_EQ(http_open_beneath(t.root, &hp, &f), 403);
        CHECK_EQ(f.err, EXDEV);
        CHECK_EQ(f.fd, -1);
        hp.is_dir = true;
        CHECK_EQ(http_open_beneath(t.root, &hp, &f), 403);
    }
    /* a malformed http_path (not NUL-terminated at len) */
    http_path bad = {.len = 3};
    memcpy(bad.buf, "file.txt", 9);
    CHECK_EQ(http_open_beneath(t.root, &bad, &f), 500);
    remove_tree(&t);
}

TEST(open_special_files)
{
    alarm(20); /* a FIFO open that blocked would hang here */
    tree t;
    make_tree(&t);
    http_file f;
    char buf[64];
    CHECK_EQ(fetch(&t, "/fifo", buf, sizeof buf, &f), 403);
    CHECK_EQ(f.err, 0); /* refused for its type */
    EXPECT_FETCH(&t, "/sock", 403, NULL);
    /* a device node (needs CAP_MKNOD) */
    char p[256];
    at(p, sizeof p, t.www, "null");
    if (mknod(p, S_IFCHR | 0666, makedev(1, 3)) == 0) {
        EXPECT_FETCH(&t, "/null", 403, NULL);
    } else {
        fprintf(stderr, "note: mknod: %s, device case not run\n", strerror(errno));
    }
    /* unreadable file: root bypasses permissions */
    if (geteuid() != 0)
        EXPECT_FETCH(&t, "/noperm.txt", 403, NULL);
    else
        EXPECT_FETCH(&t, "/noperm.txt", 0, "x");
    /* a root fd that is not a directory */
    http_path hp;
    CHECK_EQ(http_resolve_path("/x", 2, &hp), 0);
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    CHECK_EQ(http_open_beneath(fd, &hp, &f), 404); /* ENOTDIR */
    close(fd);
    CHECK_EQ(http_open_beneath(-1, &hp, &f), 500); /* EBADF */
    remove_tree(&t);
}

TEST(status_from_errno)
{
    CHECK_EQ(http_status_from_errno(ENOENT), 404);
    CHECK_EQ(http_status_from_errno(ENOTDIR), 404);
    CHECK_EQ(http_status_from_errno(ENAMETOOLONG), 404);
    CHECK_EQ(http_status_from_errno(EACCES), 403);
    CHECK_EQ(http_status_from_errno(EPERM), 403);
    CHECK_EQ(http_status_from_errno(EXDEV), 403);
    CHECK_EQ(http_status_from_errno(ELOOP), 403);
    CHECK_EQ(http_status_from_errno(ENXIO), 403);
    CHECK_EQ(http_status_from_errno(EMFILE), 500);
    CHECK_EQ(http_status_from_errno(ENOMEM), 500);
    CHECK_EQ(http_status_from_errno(ENOSYS), 500);
    CHECK_EQ(http_status_from_errno(EIO), 500);
}

/* ---- MIME types ------------------------------------------------------------------------------ */

TEST(mime_types)
{
    static const struct {
        const char *path, *type;
    } cases[] = {
        {"/index.html", "text/html; charset=utf-8"},
        {"a.htm", "text/html; charset=utf-8"},
        {"a.HTML", "text/html; charset=utf-8"},
        {"a.HtM", "text/html; charset=utf-8"},
        {"s.css", "text/css; charset=utf-8"},
        {"s.js", "text/javascript; charset=utf-8"},
        {"s.mjs", "text/javascript; charset=utf-8"},
        {"d.json", "application/json"},
        {"r.txt", "text/plain; charset=utf-8"},
        {"x.xml", "application/xml"},
        {"i.svg", "image/svg+xml"},
        {"i.png", "image/png"},
        {"i.PNG", "image/png"},
        {"i.jpg", "image/jpeg"},
        {"i.jpeg", "image/jpeg"},
        {"i.JPEG", "image/jpeg"},
        {"i.gif", "image/gif"},
        {"i.webp", "image/webp"},
        {"favicon.ico", "image/x-icon"},
        {"d.pdf", "application/pdf"},
        {"m.wasm", "application/wasm"},
        {"v.mp4", "video/mp4"},
        {"v.webm", "video/webm"},
        {"a.mp3", "audio/mpeg"},
        {"f.woff", "font/woff"},
        {"f.woff2", "font/woff2"},
        {"f.ttf", "font/ttf"},
        {"f.otf", "font/otf"},
        {"t.csv", "text/csv; charset=utf-8"},
        {"README.md", "text/markdown; charset=utf-8"},
        {"a.zip", "application/zip"},
        {"a.tar.gz", "application/gzip"},
        {"a.tar", "application/x-tar"},
        {"dir.d/a.txt", "text/plain; charset=utf-8"},
        {"dir.html/file", "application/octet-stream"},
        {"noext", "application/octet-stream"},
        {"trailing.", "application/octet-stream"},
        {"a.unknown", "application/octet-stream"},
        {"a.woff22", "application/octet-stream"},
        {"a.htmlx", "application/octet-stream"},
        {"a.ht", "application/octet-stream"},
        {"a.verylongextension", "application/octet-stream"},
        {"dir/", "application/octet-stream"},
        {"", "application/octet-stream"},
        {".html", "text/html; charset=utf-8"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *got = http_mime_type(cases[i].path, strlen(cases[i].path));
        if (strcmp(got, cases[i].type) != 0) {
            fprintf(stderr, "%s: %s, want %s\n", cases[i].path, got, cases[i].type);
            CHECK(false);
        }
    }
    /* the length is honoured, not the NUL */
    CHECK(strcmp(http_mime_type("a.css.png", 5), "text/css; charset=utf-8") == 0);
}

/* ---- dates ----------------------------------------------------------------------------------- */

static void expect_format(time_t t, const char *want)
{
    char buf[HTTP_DATE_LEN + 1];
    CHECK_EQ(http_date_format(t, buf), HTTP_DATE_LEN);
    if (strcmp(buf, want) != 0) {
        fprintf(stderr, "format %lld: \"%s\", want \"%s\"\n", (long long)t, buf, want);
        CHECK(false);
    }
}

TEST(date_format)
{
    expect_format(0, "Thu, 01 Jan 1970 00:00:00 GMT");
    expect_format(784111777, "Sun, 06 Nov 1994 08:49:37 GMT");
    expect_format(951782400, "Tue, 29 Feb 2000 00:00:00 GMT");
    expect_format(951868800, "Wed, 01 Mar 2000 00:00:00 GMT");
    expect_format(4107542400, "Mon, 01 Mar 2100 00:00:00 GMT"); /* 2100 is no leap year */
    expect_format(4107542399, "Sun, 28 Feb 2100 23:59:59 GMT");
    expect_format(1700000000, "Tue, 14 Nov 2023 22:13:20 GMT");
    expect_format(2147483647, "Tue, 19 Jan 2038 03:14:07 GMT");
    expect_format(2147483648, "Tue, 19 Jan 2038 03:14:08 GMT");
    expect_format(253402300799, "Fri, 31 Dec 9999 23:59:59 GMT");
    expect_format(253402300800, "Fri, 31 Dec 9999 23:59:59 GMT"); /* clamped */
    expect_format(-1, "Thu, 01 Jan 1970 00:00:00 GMT");           /* clamped */

    /* against gmtime_r over the whole range */
    static const char *const wd[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *const mo[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                     "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    uint64_t x = 88172645463325252u;
    int64_t iters = cpt_scaled(200000, 20000);
    for (int64_t i = 0; i < iters; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        time_t t = (time_t)(x % 253402300800u);
        if (i < 3000)
            t = (time_t)(i * 86399 * 37 % 253402300800); /* some day boundaries */
        struct tm tm;
        CHECK(gmtime_r(&t, &tm) != NULL);
        char want[64], got[HTTP_DATE_LEN + 1];
        snprintf(want, sizeof want, "%s, %02d %s %04d %02d:%02d:%02d GMT", wd[tm.tm_wday],
                 tm.tm_mday, mo[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
        http_date_format(t, got);
        if (strcmp(want, got) != 0) {
            fprintf(stderr, "%lld: %s vs %s\n", (long long)t, got, want);
            CHECK(false);
        }
        time_t back;
        CHECK(http_date_parse(got, HTTP_DATE_LEN, &back));
        CHECK_EQ(back, t);
    }
}

static bool pd(const char *s, time_t *t)
{
    return http_date_parse(s, strlen(s), t);
}

TEST(date_parse_formats)
{
    time_t t;
    CHECK(pd("Sun, 06 Nov 1994 08:49:37 GMT", &t));
    CHECK_EQ(t, 784111777);
    CHECK(pd("Sunday, 06-Nov-94 08:49:37 GMT", &t));
    CHECK_EQ(t, 784111777);
    CHECK(pd("Sun Nov  6 08:49:37 1994", &t));
    CHECK_EQ(t, 784111777);
    CHECK(pd("Sun Nov 06 08:49:37 1994", &t));
    CHECK_EQ(t, 784111777);
    CHECK(pd("Wed Nov 16 08:49:37 1994", &t));
    CHECK_EQ(t, 784111777 + 10 * 86400);
    CHECK(pd("Wednesday, 16-Nov-94 08:49:37 GMT", &t));
    CHECK_EQ(t, 784111777 + 10 * 86400);
    CHECK(pd("Thu, 01 Jan 1970 00:00:00 GMT", &t));
    CHECK_EQ(t, 0);
    CHECK(pd("Tue, 29 Feb 2000 00:00:00 GMT", &t));
    CHECK_EQ(t, 951782400);
    CHECK(pd("Fri, 31 Dec 9999 23:59:59 GMT", &t));
    CHECK_EQ(t, 253402300799);
    CHECK(pd("Wed, 31 Dec 1969 23:59:59 GMT", &t)); /* before the epoch */
    CHECK_EQ(t, -1);
    CHECK(pd("Sat, 31 Dec 2016 23:59:60 GMT", &t)); /* a leap second */
    CHECK_EQ(t, 1483228800);
    CHECK(pd("Mon, 06 Nov 1994 08:49:37 GMT", &t)); /* the weekday is not cross-checked */
    /* every weekday name in every format */
    static const char *const shortn[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *const longn[] = {"Sunday",   "Monday", "Tuesday", "Wednesday",
                                        "Thursday", "Friday", "Saturday"};
    for (int i = 0; i < 7; i++) {
        char b[64];
        snprintf(b, sizeof b, "%s, 06 Nov 1994 08:49:37 GMT", shortn[i]);
        CHECK(pd(b, &t));
        snprintf(b, sizeof b, "%s, 06-Nov-94 08:49:37 GMT", longn[i]);
        CHECK(pd(b, &t));
        snprintf(b, sizeof b, "%s Nov  6 08:49:37 1994", shortn[i]);
        CHECK(pd(b, &t));
    }

    static const char *const bad[] = {
        "",
        "Sun, 06 Nov 1994 08:49:37 GM",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 06 Nov 1994 08:49:37 gmt",
        "sun, 06 Nov 1994 08:49:37 GMT",
        "Sun, 06 nov 1994 08:49:37 GMT",
        "Sun, 6 Nov 1994 08:49:37 GMT ",
        "Sun,  6 Nov 1994 08:49:37 GMT",
        "Sun 06 Nov 1994 08:49:37 GMT ",
        "Sun, 06 Nov 1994 08:49:37 GMT ",
        " Sun, 06 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 94 08:49:37 GMT",
        "Sunday, 06 Nov 1994 08:49:37 GMT",
        "Sun, 06-Nov-94 08:49:37 GMT",
        "Sunday, 06-Nov-1994 08:49:37 GMT",
        "Sundae, 06-Nov-94 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 UTC",
        "Sunday, 6-Nov-94 08:49:37 GMT ",
        "Sun Nov 6 08:49:37 1994 ",
        "Sun Nov  6 08:49:37 94  ",
        "Sun Nov  6 08:49:37 1994 GMT",
        "Sun, 32 Nov 1994 08:49:37 GMT",
        "Sun, 31 Nov 1994 08:49:37 GMT",
        "Sun, 00 Nov 1994 08:49:37 GMT",
        "Sun, 29 Feb 1900 08:49:37 GMT",
        "Sun, 29 Feb 1995 08:49:37 GMT",
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "Sun, 06 Nov 1994 08:60:00 GMT",
        "Sun, 06 Nov 1994 08:49:61 GMT",
        "Sun, 06 Nov 1994 08-49-37 GMT",
        "Sun, 06 Nov 0000 08:49:37 GMT",
        "Sun, 06 Nov 19x4 08:49:37 GMT",
        "Sun, 06 Nov -994 08:49:37 GMT",
        "Sun, +6 Nov 1994 08:49:37 GMT",
        "Sun Nov  0 08:49:37 1994",
        "Sun Nov 31 08:49:37 1994",
        "Sun Nox  6 08:49:37 1994",
        "Sun Nov  x 08:49:37 1994",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (pd(bad[i], &t)) {
            fprintf(stderr, "accepted \"%s\"\n", bad[i]);
            CHECK(false);
        }
    }
    /* the length is honoured */
    CHECK(http_date_parse("Sun, 06 Nov 1994 08:49:37 GMTxyz", 29, &t));
    CHECK(!http_date_parse("Sun, 06 Nov 1994 08:49:37 GMT", 28, &t));
}

TEST(date_parse_rfc850_century)
{
    time_t t, now2025 = 1735689600; /* 2025-01-01 */
    CHECK(http_date_parse_at("Sunday, 06-Nov-94 08:49:37 GMT", 30, now2025, &t));
    CHECK_EQ(t, 784111777); /* 2094 is > 50 years ahead: 1994 */
    CHECK(http_date_parse_at("Thursday, 01-Jan-70 00:00:00 GMT", 32, now2025, &t));
    char b[HTTP_DATE_LEN + 1];
    http_date_format(t, b);
    CHECK(strcmp(b, "Wed, 01 Jan 2070 00:00:00 GMT") == 0); /* 45 years ahead: kept */
    CHECK(http_date_parse_at("Friday, 01-Jan-76 00:00:00 GMT", 30, now2025, &t));
    http_date_format(t, b);
    CHECK(strcmp(b, "Thu, 01 Jan 1976 00:00:00 GMT") == 0); /* 51 years ahead: 1976 */
    CHECK(http_date_parse_at("Monday, 01-Jan-24 00:00:00 GMT", 30, now2025, &t));
    http_date_format(t, b);
    CHECK(strcmp(b, "Mon, 01 Jan 2024 00:00:00 GMT") == 0);
    /* in 2090, "05" is 2105 (15 years ahead, not 85 years ago), "50" is 2050 */
    time_t now2090 = 3786912000; /* 2090-01-01 */
    CHECK(http_date_parse_at("Monday, 01-Jan-05 00:00:00 GMT", 30, now2090, &t));
    http_date_format(t, b);
    CHECK(strcmp(b, "Thu, 01 Jan 2105 00:00:00 GMT") == 0);
    CHECK(http_date_parse_at("Monday, 01-Jan-50 00:00:00 GMT", 30, now2090, &t));
    http_date_format(t, b);
    CHECK(strcmp(b, "Sat, 01 Jan 2050 00:00:00 GMT") == 0);
    CHECK(http_date_parse_at("Sunday, 01-Jan-39 00:00:00 GMT", 30, now2090, &t));
    http_date_format(t, b);
    CHECK(strcmp(b, "Thu, 01 Jan 2139 00:00:00 GMT") == 0); /* 51 years ago: next century */
    CHECK(http_date_parse_at("Sunday, 01-Jan-41 00:00:00 GMT", 30, now2090, &t));
    http_date_format(t, b);
    CHECK(strcmp(b, "Tue, 01 Jan 2041 00:00:00 GMT") == 0);
    /* Feb 29 of "00": 2000 is a leap year */
    CHECK(http_date_parse_at("Tuesday, 29-Feb-00 00:00:00 GMT", 31, now2025, &t));
    CHECK_EQ(t, 951782400);
}

TEST(date_round_trip_all_formats)
{
    static const char *const wd[] = {"Sunday",   "Monday", "Tuesday", "Wednesday",
                                     "Thursday", "Friday", "Saturday"};
    static const char *const mo[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                     "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    uint64_t x = 0x2545F4914F6CDD1Du;
    int64_t iters = cpt_scaled(100000, 10000);
    time_t now = time(NULL);
    for (int64_t i = 0; i < iters; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        time_t t = (time_t)(x % 4102444800u); /* 1970 .. 2100 */
        struct tm tm;
        CHECK(gmtime_r(&t, &tm) != NULL);
        char a[64], r[64];
        snprintf(a, sizeof a, "%.3s %s %2d %02d:%02d:%02d %04d", wd[tm.tm_wday], mo[tm.tm_mon],
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, tm.tm_year + 1900);
        time_t back;
        CHECK(http_date_parse(a, strlen(a), &back));
        CHECK_EQ(back, t);
        snprintf(r, sizeof r, "%s, %02d-%s-%02d %02d:%02d:%02d GMT", wd[tm.tm_wday], tm.tm_mday,
                 mo[tm.tm_mon], tm.tm_year % 100, tm.tm_hour, tm.tm_min, tm.tm_sec);
        CHECK(http_date_parse_at(r, strlen(r), now, &back));
        /* same moment modulo the century rule */
        CHECK_EQ((back - t) % 86400, 0);
        struct tm tb;
        CHECK(gmtime_r(&back, &tb) != NULL);
        CHECK(tb.tm_year % 100 == tm.tm_year % 100 && tb.tm_mon == tm.tm_mon &&
              tb.tm_mday == tm.tm_mday);
        if (t <= now + (time_t)50 * 31556952 && t >= now - (time_t)40 * 31556952)
            CHECK_EQ(back, t);
    }
}

/* ---- responses ------------------------------------------------------------------------------- */

static void expect_head(const http_response *r, const char *want)
{
    char buf[512];
    int n = http_format_head(r, buf, sizeof buf);
    CHECK(n > 0);
    if ((size_t)n != strlen(want) || memcmp(buf, want, (size_t)n) != 0) {
        fprintf(stderr, "got:\n%.*s\nwant:\n%s\n", n, buf, want);
        CHECK(false);
    }
    /* every cap below the length fails cleanly and writes nothing past cap */
    for (int cap = 0; cap < n; cap++) {
        char small[512];
        memset(small, 0x5a, sizeof small);
        CHECK_EQ(http_format_head(r, small, (size_t)cap), -ENOSPC);
        for (size_t i = (size_t)cap; i < sizeof small; i++)
            CHECK_EQ(small[i], 0x5a);
    }
    CHECK_EQ(http_format_head(r, buf, (size_t)n), n);
}

TEST(format_head_statuses)
{
    http_response r = {
        .status = 200,
        .keep_alive = true,
        .date = 784111777,
        .content_type = "text/html; charset=utf-8",
        .has_content_length = true,
        .content_length = 1234,
        .has_last_modified = true,
        .last_modified = 0,
        .accept_ranges = true,
    };
    expect_head(&r, "HTTP/1.1 200 OK\r\nServer: cport-httpd\r\n"
                    "Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
                    "Content-Type: text/html; charset=utf-8\r\nContent-Length: 1234\r\n"
                    "Last-Modified: Thu, 01 Jan 1970 00:00:00 GMT\r\nAccept-Ranges: bytes\r\n"
                    "Connection: keep-alive\r\n\r\n");
    r.keep_alive = false;
    r.has_last_modified = false;
    r.accept_ranges = false;
    r.content_type = NULL;
    r.content_length = 0;
    expect_head(&r, "HTTP/1.1 200 OK\r\nServer: cport-httpd\r\n"
                    "Date: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\n"
                    "Connection: close\r\n\r\n");
    /* 206: Content-Range, and the Content-Length is the range's */
    http_response p = {.status = 206,
                       .keep_alive = true,
                       .date = 0,
                       .content_type = "image/png",
                       .has_content_length = false,
                       .accept_ranges = true,
                       .range_first = 10,
                       .range_last = 19,
                       .complete_length = 18446744073709551615u};
    expect_head(&p, "HTTP/1.1 206 Partial Content\r\nServer: cport-httpd\r\n"
                    "Date: Thu, 01 Jan 1970 00:00:00 GMT\r\nContent-Type: image/png\r\n"
                    "Content-Length: 10\r\nAccept-Ranges: bytes\r\n"
                    "Content-Range: bytes 10-19/18446744073709551615\r\n"
                    "Connection: keep-alive\r\n\r\n");
    char buf[512];
    p.range_last = p.complete_length = 19; /* last must be < complete length */
    CHECK_EQ(http_format_head(&p, buf, sizeof buf), -EINVAL);
    p.complete_length = 20;
    p.range_first = 20;
    CHECK_EQ(http_format_head(&p, buf, sizeof buf), -EINVAL);
    /* 304: no body framing fields even when given */
    http_response nm = {.status = 304,
                        .keep_alive = true,
                        .date = 0,
                        .content_type = "text/plain",
                        .has_content_length = true,
                        .content_length = 5,
                        .has_last_modified = true,
                        .last_modified = 784111777};
    expect_head(&nm, "HTTP/1.1 304 Not Modified\r\nServer: cport-httpd\r\n"
                     "Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
                     "Last-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
                     "Connection: keep-alive\r\n\r\n");
    /* 301 with its Location; a location that could end the field is refused */
    http_response mv = {.status = 301,
                        .keep_alive = true,
                        .date = 0,
                        .has_content_length = true,
                        .location = {"/dir/?q=1", 9}};
    expect_head(&mv, "HTTP/1.1 301 Moved Permanently\r\nServer: cport-httpd\r\n"
                     "Date: Thu, 01 Jan 1970 00:00:00 GMT\r\nContent-Length: 0\r\n"
                     "Location: /dir/?q=1\r\nConnection: keep-alive\r\n\r\n");
    static const char *const bad_loc[] = {"/a\r\nSet-Cookie: x", "/a b", "/a\x7f", "/\xc3\xa9"};
    for (size_t i = 0; i < sizeof bad_loc / sizeof bad_loc[0]; i++) {
        mv.location = (http_slice){bad_loc[i], strlen(bad_loc[i])};
        CHECK_EQ(http_format_head(&mv, buf, sizeof buf), -EINVAL);
    }
    /* 416 and 405 */
    http_response un = {.status = 416, .date = 0, .complete_length = 500};
    expect_head(&un, "HTTP/1.1 416 Range Not Satisfiable\r\nServer: cport-httpd\r\n"
                     "Date: Thu, 01 Jan 1970 00:00:00 GMT\r\nContent-Range: bytes */500\r\n"
                     "Connection: close\r\n\r\n");
    http_response na = {.status = 405, .keep_alive = true, .date = 0};
    expect_head(&na, "HTTP/1.1 405 Method Not Allowed\r\nServer: cport-httpd\r\n"
                     "Date: Thu, 01 Jan 1970 00:00:00 GMT\r\nAllow: GET, HEAD\r\n"
                     "Connection: keep-alive\r\n\r\n");
    /* unsupported statuses */
    static const int unknown[] = {0, 1, 99, 100, 201, 302, 401, 418, 503, 600, 1000, -200};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        http_response u = {.status = unknown[i]};
        CHECK_EQ(http_format_head(&u, buf, sizeof buf), -EINVAL);
        CHECK(http_reason(unknown[i]) == NULL);
    }
}

TEST(format_reasons)
{
    static const struct {
        int status;
        const char *reason;
    } all[] = {{200, "OK"},
               {206, "Partial Content"},
               {301, "Moved Permanently"},
               {304, "Not Modified"},
               {400, "Bad Request"},
               {403, "Forbidden"},
               {404, "Not Found"},
               {405, "Method Not Allowed"},
               {408, "Request Timeout"},
               {412, "Precondition Failed"},
               {413, "Content Too Large"},
               {414, "URI Too Long"},
               {416, "Range Not Satisfiable"},
               {431, "Request Header Fields Too Large"},
               {500, "Internal Server Error"},
               {501, "Not Implemented"},
               {505, "HTTP Version Not Supported"}};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        CHECK(strcmp(http_reason(all[i].status), all[i].reason) == 0);
        /* the largest head fits in 512 bytes */
        http_response r = {.status = all[i].status,
                           .keep_alive = true,
                           .date = 253402300799,
                           .content_type = "application/vnd.openxmlformats-officedocument."
                                           "spreadsheetml.sheet; charset=utf-8",
                           .has_content_length = true,
                           .content_length = UINT64_MAX,
                           .has_last_modified = true,
                           .last_modified = 253402300799,
                           .accept_ranges = true,
                           .range_first = UINT64_MAX - 2,
                           .range_last = UINT64_MAX - 1,
                           .complete_length = UINT64_MAX};
        char buf[512];
        int n = http_format_head(&r, buf, sizeof buf);
        CHECK(n > 0);
        char line[64];
        snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\n", all[i].status, all[i].reason);
        CHECK(strncmp(buf, line, strlen(line)) == 0);
        CHECK(memcmp(buf + n - 4, "\r\n\r\n", 4) == 0);
        /* well-formed: every LF preceded by CR, no other controls */
        for (int k = 0; k < n; k++) {
            if (buf[k] == '\n')
                CHECK(k > 0 && buf[k - 1] == '\r');
            else if (buf[k] == '\r')
                CHECK(k + 1 < n && buf[k + 1] == '\n');
            else
                CHECK((unsigned char)buf[k] >= 0x20 && buf[k] != 0x7f);
        }
        /* and it parses back as fields */
        CHECK(strstr(buf, "\r\nServer: cport-httpd\r\n") != NULL);
        CHECK(strstr(buf, "\r\nConnection: keep-alive\r\n") != NULL);
    }
}

TEST(format_error_responses)
{
    char buf[512];
    http_response r = {.status = 404, .date = 784111777};
    int n = http_format_error(&r, true, buf, sizeof buf);
    const char *want = "HTTP/1.1 404 Not Found\r\nServer: cport-httpd\r\n"
                       "Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
                       "Content-Type: text/plain; charset=utf-8\r\nContent-Length: 14\r\n"
                       "Connection: close\r\n\r\n404 Not Found\n";
    CHECK_EQ(n, (int)strlen(want));
    CHECK(memcmp(buf, want, (size_t)n) == 0);
    /* HEAD: same head, no body */
    int h = http_format_error(&r, false, buf, sizeof buf);
    CHECK_EQ(h, n - 14);
    CHECK(memcmp(buf, want, (size_t)h) == 0);
    /* content fields of r are ignored */
    r.content_type = "image/png";
    r.has_content_length = true;
    r.content_length = 99;
    r.keep_alive = true;
    CHECK_EQ(http_format_error(&r, true, buf, sizeof buf), n + 5); /* "keep-alive" vs "close" */
    CHECK(strstr(buf, "image/png") == NULL);
    CHECK(strstr(buf, "Content-Length: 14\r\n") != NULL);

    static const int statuses[] = {400, 403, 404, 405, 408, 412, 413, 414, 416, 431, 500, 501, 505};
    for (size_t i = 0; i < sizeof statuses / sizeof statuses[0]; i++) {
        http_response e = {.status = statuses[i], .date = 0, .complete_length = 1000};
        n = http_format_error(&e, true, buf, sizeof buf);
        CHECK(n > 0);
        buf[n] = '\0';
        char *body = strstr(buf, "\r\n\r\n");
        CHECK(body != NULL);
        body += 4;
        char expect_body[64];
        snprintf(expect_body, sizeof expect_body, "%d %s\n", statuses[i], http_reason(statuses[i]));
        CHECK(strcmp(body, expect_body) == 0);
        char cl[64];
        snprintf(cl, sizeof cl, "\r\nContent-Length: %zu\r\n", strlen(expect_body));
        CHECK(strstr(buf, cl) != NULL);
        CHECK_EQ(strstr(buf, "Allow: GET, HEAD\r\n") != NULL, statuses[i] == 405);
        CHECK_EQ(strstr(buf, "Content-Range: bytes */1000\r\n") != NULL, statuses[i] == 416);
        /* too small buffers */
        for (int cap = 0; cap < n; cap++) {
            char small[512];
            memset(small, 0x5a, sizeof small);
            CHECK_EQ(http_format_error(&e, true, small, (size_t)cap), -ENOSPC);
            for (size_t k = (size_t)cap; k < sizeof small; k++)
                CHECK_EQ(small[k], 0x5a);
        }
    }
    http_response ok = {.status = 200};
    CHECK_EQ(http_format_error(&ok, true, buf, sizeof buf), -EINVAL);
    http_response nm = {.status = 304};
    CHECK_EQ(http_format_error(&nm, true, buf, sizeof buf), -EINVAL);
    http_response bad = {.status = 499};
    CHECK_EQ(http_format_error(&bad, true, buf, sizeof buf), -EINVAL);
}

/* ---- a request's whole journey, as the server will do it ------------------------------------- */

TEST(end_to_end)
{
    tree t;
    make_tree(&t);
    const char *s = "GET /dir/page.css HTTP/1.1\r\nHost: x\r\nRange: bytes=1-3\r\n\r\n";
    http_request req;
    CHECK_EQ(parse(s, &req), HTTP_PARSE_DONE);
    http_path p;
    CHECK_EQ(http_resolve_path(req.path.ptr, req.path.len, &p), 0);
    http_file f;
    CHECK_EQ(http_open_beneath(t.root, &p, &f), 0);
    CHECK(!http_not_modified(&req, f.mtime));
    uint64_t a, b;
    CHECK_EQ(http_request_range(&req, f.size, f.mtime, time(NULL), &a, &b), HTTP_RANGE_PARTIAL);
    http_response r = {.status = 206,
                       .keep_alive = req.keep_alive,
                       .date = time(NULL),
                       .content_type = http_mime_type(p.buf, p.len),
                       .has_last_modified = true,
                       .last_modified = f.mtime,
                       .accept_ranges = true,
                       .range_first = a,
                       .range_last = b,
                       .complete_length = f.size};
    char out[512];
    int n = http_format_head(&r, out, sizeof out);
    CHECK(n > 0);
    out[n] = '\0';
    CHECK(strstr(out, "Content-Type: text/css; charset=utf-8\r\n") != NULL);
    CHECK(strstr(out, "Content-Length: 3\r\n") != NULL);
    CHECK(strstr(out, "Content-Range: bytes 1-3/6\r\n") != NULL);
    char body[8] = {0};
    CHECK_EQ(pread(f.fd, body, b - a + 1, (off_t)a), 3);
    CHECK(strcmp(body, "ody") == 0);
    close(f.fd);
    remove_tree(&t);
}
