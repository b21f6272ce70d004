/* cport-httpd: the I/O-free HTTP/1.1 layer of the static-file server.
 *
 * Everything here is pure computation on caller-provided memory, except http_open_beneath()
 * (which opens a file). No function allocates, none touches global mutable state, and all
 * are thread-safe (dates are converted with integer arithmetic, not gmtime/strptime).
 *
 *   1. http_parse()           incremental, resumable request-head parser (pipelining aware)
 *   2. http_resolve_path()    request path -> safe relative path (decoding, traversal refusal)
 *      http_open_beneath()    open it beneath the document root with openat2(RESOLVE_BENEATH)
 *   3. http_mime_type()       Content-Type from the file extension
 *   4. http_date_format()     IMF-fixdate;  http_date_parse(): all three RFC 9110 formats
 *   5. http_format_head()     response head into a caller buffer;  http_format_error(): a
 *                             complete small error response
 *      http_request_range()   Range (+ If-Range) resolution against the file;
 *      http_preconditions()   If-Match, If-Unmodified-Since, If-None-Match and
 *                             If-Modified-Since evaluation (http_not_modified(): the last two)
 *
 * A typical request on a connection whose received, not yet consumed bytes are buf[0..len):
 *
 *     http_request req;
 *     switch (http_parse(&conn->parser, buf, len, &req)) {
 *     case HTTP_PARSE_NEED_MORE:   // receive more, append, call again (buffer may move)
 *         break;
 *     case HTTP_PARSE_ERROR:       // answer req.status, then close (req.keep_alive is false)
 *         n = http_format_error(&(http_response){.status = req.status, .date = now},
 *                               true, out, sizeof out);
 *         break;
 *     case HTTP_PARSE_DONE:        // serve it; the next request starts at buf + req.head_len
 *         if (req.method == HTTP_METHOD_OTHER) -> 405 (keep-alive allowed)
 *         http_resolve_path(req.path.ptr, req.path.len, &path)     -> 400/414 or ok
 *         http_open_beneath(root_fd, &path, &file)                 -> 301/403/404/500 or ok
 *         http_preconditions(&req, file.mtime)                     -> 412 / 304
 *         http_request_range(&req, file.size, file.mtime, now, &a, &b) -> 200 / 206 / 416
 *         http_format_head(&(http_response){...}, out, sizeof out)
 *     }
 *
 * Protocol decisions (where RFC 9110/9112 leave a choice), all enforced by http_parse():
 *   - Line endings: CRLF, and leniently a bare LF (RFC 9112 2.2 allows it). A CR anywhere
 *     else ("bare CR") is rejected with 400, as are NUL and every other control character
 *     except HTAB in field values. Empty lines before the request line are skipped (2.2).
 *   - Request line: exactly "method SP request-target SP HTTP-version" with single spaces.
 *     The method is a token; GET and HEAD (case-sensitive) are recognised, any other valid
 *     token parses successfully as HTTP_METHOD_OTHER so the server can answer 405.
 *   - Request-target: visible US-ASCII only (0x21-0x7E; raw UTF-8 -> 400). For GET/HEAD it
 *     must be origin-form ("/path?query") or absolute-form ("http://host/path", scheme http
 *     or https, case-insensitive; userinfo or an empty host -> 400); its authority then
 *     becomes req.host (RFC 9112 3.2.2), though HTTP/1.1 still requires a Host field. Other
 *     methods may use any form ("*", authority-form) since they only get a 405 anyway.
 *   - Version: "HTTP/1.0" and "HTTP/1.1"; "HTTP/1.x" with x > 1 is treated as 1.1 (RFC 9110
 *     2.5); any other major version (HTTP/0.9, HTTP/2.0, ...) -> 505; anything that is not
 *     exactly "HTTP/" DIGIT "." DIGIT -> 400.
 *   - Fields: the name is a token immediately followed by ':' (whitespace before the colon,
 *     an empty or invalid name -> 400); obs-fold (a line starting with SP/HTAB) -> 400.
 *     Values are trimmed of surrounding SP/HTAB; obs-text (bytes >= 0x80) is allowed.
 *   - Host: required in HTTP/1.1 (missing -> 400); more than one -> 400 (any version); a
 *     value that is not a valid uri-host[:port] -> 400. An empty value is valid.
 *   - Body: not supported. Any Transfer-Encoding, or Content-Length > 0 -> 413. A
 *     Content-Length that is not 1*DIGIT (or a list of identical ones, RFC 9110 8.6), two
 *     different values, or Content-Length together with Transfer-Encoding -> 400.
 *     Content-Length: 0 is fine. (A huge all-digit value saturates and is a 413.) These
 *     body checks come before the Host check: a 413 also for a request without Host.
 *   - Connection: a comma list of tokens; "close" and "keep-alive" are recognised
 *     (case-insensitive), everything else is ignored; close wins over keep-alive.
 *     Keep-alive: HTTP/1.1 unless "close"; HTTP/1.0 only with "keep-alive" and no "close".
 *   - If-Modified-Since: ignored when invalid, when sent more than once, and when the
 *     request also has If-None-Match (RFC 9110 13.1.3; this server sends no ETags, so the
 *     server should treat If-None-Match as not matching and serve normally). The one
 *     exception is If-None-Match: * (one field, exactly "*"): it matches any current
 *     representation, so a GET or HEAD of an existing file gets 304 (RFC 9110 13.1.2).
 *   - If-Match: "*" (one field, exactly) matches any existing file; anything else (an
 *     entity-tag list, an empty or repeated field) never matches, since no ETags are sent:
 *     412 Precondition Failed. If-Unmodified-Since: ignored with If-Match, when invalid and
 *     when repeated (RFC 9110 13.1.4); a file modified after the date gets 412. Both come
 *     before If-None-Match and If-Modified-Since (RFC 9110 13.2.2): a 412 beats a 304.
 *   - Range: honoured only for GET (RFC 9110 14.2), only "bytes=" (unit case-insensitive)
 *     with exactly one range-spec (empty list elements are skipped). Several ranges, a bad
 *     syntax, first > last, other units or a repeated Range field -> the field is ignored
 *     (a 200 with the whole file). If-Range: a date must equal the file's mtime exactly,
 *     and the mtime must be at least one second before the response's Date (else the date
 *     is a weak validator, RFC 9110 8.8.2.2); an entity-tag never matches (we send none);
 *     when it does not match, Range is ignored.
 *   - Errors: every HTTP_PARSE_ERROR means the connection must be closed after answering
 *     (req.keep_alive is false): after a malformed head the framing cannot be trusted. The
 *     method of a refused request is unknown, so error responses carry their small body.
 *
 * Limits. Each is checked as soon as the bytes received prove it exceeded, so an endless
 * line or head is refused after at most the limit's worth of bytes, not at its end:
 *   HTTP_MAX_REQUEST_LINE  request line, including its CRLF -> 414 when the request-target
 *                          is what made it too long (the limit struck inside the target,
 *                          or at most a version's worth of bytes after it), else 400
 *   HTTP_MAX_FIELD_LINE    one field line, including its CRLF -> 431
 *   HTTP_MAX_FIELDS        number of field lines -> 431
 *   HTTP_MAX_HEAD          the whole head (leading empty lines, request line, fields and the
 *                          final empty line) -> 431
 * So a receive buffer of HTTP_MAX_HEAD bytes always suffices to reach a verdict.
 */
#ifndef CPORT_HTTPD_HTTP_H
#define CPORT_HTTPD_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HTTP_MAX_REQUEST_LINE 8192 /* bytes, including the line terminator */
#define HTTP_MAX_FIELD_LINE   8192 /* bytes, including the line terminator */
#define HTTP_MAX_FIELDS       100  /* field lines per request */
#define HTTP_MAX_HEAD         16384
#define HTTP_PATH_MAX         4096 /* http_path buffer size (the path is at most 4095 bytes) */
#define HTTP_DATE_LEN         29   /* strlen("Sun, 06 Nov 1994 08:49:37 GMT") */
#define HTTP_SERVER_NAME      "cport-httpd"

/* ---- request parsing ------------------------------------------------------------------------- */

/* A piece of the caller's buffer (or of a constant string). ptr is NULL when absent. */
typedef struct http_slice {
    const char *ptr;
    size_t len;
} http_slice;

typedef enum http_method {
    HTTP_METHOD_GET,
    HTTP_METHOD_HEAD,
    HTTP_METHOD_OTHER, /* a valid token that is neither: answer 405 with Allow: GET, HEAD */
} http_method;

/* One syntactically valid "bytes=" range-spec (see http_range_parse()). */
typedef struct http_range {
    bool present;        /* one usable range (in a request: and the method is GET) */
    bool suffix;         /* "-n": the last suffix_len bytes; else "first-last" or "first-" */
    uint64_t first;      /* not suffix: the first byte's offset */
    uint64_t last;       /* not suffix: the last byte's offset; UINT64_MAX for "first-" */
    uint64_t suffix_len; /* suffix: number of bytes (may be 0: unsatisfiable) */
} http_range;

/* Values of http_request.if_range. */
typedef enum http_if_range {
    HTTP_IF_RANGE_NONE,    /* no If-Range field */
    HTTP_IF_RANGE_DATE,    /* If-Range: HTTP-date, in if_range_date */
    HTTP_IF_RANGE_NOMATCH, /* an entity-tag, an invalid value or repeated: never matches */
} http_if_range;

/* The result of a successful parse. Slices point into the buffer given to the http_parse()
 * call that returned HTTP_PARSE_DONE and are valid as long as those bytes are. On
 * HTTP_PARSE_ERROR only `status` and `keep_alive` (false) are meaningful. */
typedef struct http_request {
    http_method method;
    int minor_version; /* 0 or 1 (HTTP/1.x with x > 1 is reported as 1) */
    bool keep_alive;   /* the connection may stay open after the response */
    int status;        /* HTTP_PARSE_ERROR: the status to answer (400 413 414 431 505) */

    http_slice method_name; /* the method token as sent */
    http_slice target;      /* the request-target as sent */
    /* The target's path, still percent-encoded, without the query: "/a/b.html" for GET and
     * HEAD (never empty); for other methods the whole target minus an origin-form query. */
    http_slice path;
    http_slice query; /* after '?' (may be empty); ptr NULL if there was no '?' */
    http_slice host;  /* absolute-form authority, else the Host value; ptr NULL if neither */

    bool has_if_modified_since; /* one valid If-Modified-Since and no If-None-Match */
    time_t if_modified_since;
    bool has_if_none_match;
    bool if_none_match_any;       /* If-None-Match: * (one field): any file matches */
    bool has_if_match;            /* If-Match, one field or more */
    bool if_match_any;            /* If-Match: * (one field): any file matches */
    bool has_if_unmodified_since; /* one valid If-Unmodified-Since and no If-Match */
    time_t if_unmodified_since;
    http_range range;        /* range.present only for GET with one valid Range field */
    http_if_range if_range;  /* only meaningful if range.present */
    time_t if_range_date;    /* HTTP_IF_RANGE_DATE */
    uint64_t content_length; /* 0 (anything else is refused) */

    const char *head; /* start of the head (== the buffer given) */
    size_t head_len;  /* bytes consumed: the next pipelined request starts at head + head_len */
    unsigned nfields; /* number of field lines */
} http_request;

typedef enum http_parse_status {
    HTTP_PARSE_ERROR = -1,    /* req->status says what to answer; then close */
    HTTP_PARSE_NEED_MORE = 0, /* the head is incomplete and within limits so far */
    HTTP_PARSE_DONE = 1,      /* *req holds the request; req->head_len bytes were consumed */
} http_parse_status;

/* Parser state for one request head in progress; embed one per connection. Its members
 * are private. It remembers offsets, never pointers, so the caller may move or reallocate
 * the buffer between calls as long as the bytes already passed stay the same. */
typedef struct http_parser {
    size_t pos;  /* start of the current, incomplete line */
    size_t scan; /* bytes [pos, scan) of that line have been checked */
    int state;
    int error; /* sticky error status */
    unsigned nfields;
    unsigned hosts, ims_count, range_count, if_range_count, inm_count, im_count, ius_count;
    size_t method_off, method_len, target_off, target_len, path_off, path_len;
    size_t query_off, query_len, host_off, host_len, authority_off, authority_len;
    http_method method;
    int minor_version;
    bool conn_close, conn_keep_alive, te, cl_seen, ims_valid, inm, inm_any, range_valid, path_root;
    bool im_any, ius_valid;
    uint64_t content_length;
    time_t ims, ius;
    http_range range;
    http_if_range if_range;
    time_t if_range_date;
} http_parser;

/* Prepare a parser for the first request of a connection. */
void http_parser_init(http_parser *p);

/* Parse the request head at the start of buf[0..len). buf holds every byte received for
 * this request so far, contiguously (and possibly bytes of later pipelined requests): each
 * call passes the same bytes as the previous one plus whatever arrived since. Work already done is
 * not repeated, so feeding a head byte by byte costs O(head length) in total. HTTP_PARSE_NEED_MORE:
 * *req is unspecified; call again when more bytes arrived. HTTP_PARSE_DONE:      *req is filled in;
 * the parser is reset, ready for the next request, whose first byte is buf[req->head_len].
 *   HTTP_PARSE_ERROR:     req->status and req->keep_alive (false) are set; the error is
 *                         sticky until http_parser_init().
 * Passing fewer bytes than before restarts the parse from scratch. */
http_parse_status http_parse(http_parser *p, const char *buf, size_t len, http_request *req);

/* One-shot convenience: parse a head from a fresh parser. */
http_parse_status http_parse_request(const char *buf, size_t len, http_request *req);

/* Find the first field named `name` (case-insensitive) in a parsed request's head and
 * point *value at its trimmed value. For the fields the parser does not interpret
 * (User-Agent, Accept-Encoding, ...). O(head length); returns false if absent. */
bool http_header_get(const http_request *req, const char *name, http_slice *value);

/* ---- ranges and conditionals ----------------------------------------------------------------- */

/* Parse a Range field value. Returns true and fills *r (present = true) only for exactly one
 * valid "bytes=" range-spec; false means "ignore the field". Numbers saturate at
 * UINT64_MAX. */
bool http_range_parse(const char *value, size_t len, http_range *r);

typedef enum http_range_result {
    HTTP_RANGE_FULL = 0,          /* serve the whole file (200) */
    HTTP_RANGE_PARTIAL = 1,       /* serve [*first, *last] (206) */
    HTTP_RANGE_UNSATISFIABLE = 2, /* 416, with the size in Content-Range */
} http_range_result;

/* Resolve a range against a file of `size` bytes (RFC 9110 14.1.2):
 *   "a-b": partial if a < size, last clamped to size - 1; "a-": partial if a < size;
 *   "-n": n > 0 -> the last min(n, size) bytes; n == 0 -> unsatisfiable;
 *   first >= size -> unsatisfiable. On an empty file every "a-b"/"a-" is unsatisfiable and
 *   "-n" (n > 0) gives FULL (there is no byte to name in a Content-Range).
 * A range that covers the whole file is still PARTIAL (a valid 206). */
http_range_result http_range_resolve(const http_range *r, uint64_t size, uint64_t *first,
                                     uint64_t *last);

/* The request's Range after If-Range, resolved against the file: FULL when the request had
 * no usable Range or If-Range does not match. A date matches only when it equals `mtime`
 * exactly and mtime is at least one second before `now` (the response's Date): only then
 * is it a strong validator (RFC 9110 8.8.2.2, 13.1.5). mtime has whole seconds, so a file
 * modified in the current second may change again within it and keep its date; a range
 * of the new version spliced onto the old would corrupt the client's copy. */
http_range_result http_request_range(const http_request *req, uint64_t size, time_t mtime,
                                     time_t now, uint64_t *first, uint64_t *last);

/* True when the request has a usable If-Modified-Since and the file (modified at `mtime`,
 * whole seconds) has not changed since, or has If-None-Match: * (the file exists): answer
 * 304. Only meaningful for GET and HEAD of an existing file. Steps 3 and 4 of
 * http_preconditions(), which a server should call instead. */
bool http_not_modified(const http_request *req, time_t mtime);

/* Evaluate the preconditions of a GET or HEAD of an existing file modified at `mtime`
 * (RFC 9110 13.2.2; a request that would not get a 2xx without them, e.g. a 404 or 301,
 * ignores them, 13.2.1): returns 412 when
 *   1. If-Match is present and false: anything but "*" (one field, exactly) is false, as
 *      this server sends no ETags, so no entity-tag can match;
 *   2. else (no If-Match) If-Unmodified-Since is usable and the file was modified after it;
 * else 304 when http_not_modified() (3. If-None-Match, 4. If-Modified-Since); else 0: go
 * on to Range and If-Range (step 5, http_request_range()). */
int http_preconditions(const http_request *req, time_t mtime);

/* ---- paths ----------------------------------------------------------------------------------- */

/* A request path made safe: relative to the document root, no leading '/', segments
 * separated by one '/', NUL-terminated. "" is the root directory itself. */
typedef struct http_path {
    char buf[HTTP_PATH_MAX];
    size_t len;
    bool is_dir; /* the path ended in '/' (or "/."): serve the directory's index.html */
} http_path;

/* Turn a request path into a relative path beneath the document root, or refuse it.
 * Returns 0, or the HTTP status to answer:
 *   400  not starting with '/'; a malformed %-escape; after decoding: NUL, '/' (%2F), '\'
 *        (raw or %5C), any control character (< 0x20, 0x7F), a ".." segment (however it is
 *        spelled: "..", "%2e%2e", ".%2E", ...), bytes that are not well-formed UTF-8
 *        (so overlong forms like %c0%ae are refused rather than passed to the filesystem).
 *   414  the decoded path does not fit in HTTP_PATH_MAX - 1 bytes.
 * Everything from the first '?' (or '#') is ignored. Empty segments ("//") and "."
 * segments are dropped, so "//etc/passwd" is "etc/passwd" beneath the root. No ".." is ever
 * resolved, not even one that would stay inside. On refusal *out is the empty path. */
int http_resolve_path(const char *path, size_t len, http_path *out);

/* Whether a resolved path names a dotfile: some segment starts with '.' (".git/config",
 * ".env", "a/.htpasswd"). A first segment ".well-known" (exactly) is not one: RFC 8615
 * reserves that name for public site metadata (ACME http-01 challenges, security.txt), so
 * it is meant to be served; a dot segment below it (".well-known/.x") still is one.
 * cport-httpd refuses dotfiles with 404 unless --dotfiles. */
bool http_path_is_dotfile(const http_path *path);

/* A file opened for serving. */
typedef struct http_file {
    int fd; /* O_RDONLY | O_CLOEXEC, blocking; -1 on failure */
    uint64_t size;
    time_t mtime; /* whole seconds, for Last-Modified / If-Modified-Since / If-Range */
    int err;      /* on failure: the errno behind the status (for logs); 0 when the status
                     comes from the file type */
    bool index;   /* the file is a directory's index.html (its Content-Type is HTML) */
} http_file;

/* Open `path` beneath the directory `root_fd` so that nothing can escape the root:
 * openat2() with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS (Linux >= 5.6). Relative symlinks
 * that stay inside the root are followed; symlinks leading outside it, absolute symlinks
 * (even to a place inside the root), "/proc" magic links and mount crossings that escape
 * are refused. Directories (path->is_dir, or a path that turns out to be a directory) are
 * served through their "index.html", opened beneath the root too; there is no listing.
 * Only regular files are served. Returns 0 with file->fd open, or the status to answer:
 *   301  a directory with an index.html named without its trailing '/' (path->is_dir
 *        false): redirect to the request path with a '/' appended, or relative links in
 *        the index would resolve against the parent directory (file->fd is -1)
 *   403  EACCES EPERM EXDEV ELOOP ENXIO ENODEV; not a regular file (FIFO, socket, device,
 *        directory named index.html); a directory without an index.html
 *   404  ENOENT ENOTDIR ENAMETOOLONG
 *   500  anything else (EMFILE, ENOMEM, ENOSYS on old kernels, ...)
 * Files are opened with O_NONBLOCK (so a FIFO cannot block the thread) which is cleared
 * again on success. Note that a device node placed beneath the root would be opened (then
 * refused); the root must not contain device nodes. The caller closes file->fd. */
int http_open_beneath(int root_fd, const http_path *path, http_file *file);

/* The status http_open_beneath() answers for an errno value. */
int http_status_from_errno(int err);

/* ---- MIME types ------------------------------------------------------------------------------ */

/* Content-Type for a path's extension (after the last '.' of the last segment, compared
 * case-insensitively); "application/octet-stream" when unknown or absent. Textual types
 * carry "; charset=utf-8". Returns a constant string. */
const char *http_mime_type(const char *path, size_t len);

/* ---- dates ----------------------------------------------------------------------------------- */

/* Format t as IMF-fixdate into out (HTTP_DATE_LEN characters plus a NUL). Times before
 * 1970 are formatted as the epoch, times after 9999-12-31 23:59:59 as that. Returns
 * HTTP_DATE_LEN. */
size_t http_date_format(time_t t, char out[HTTP_DATE_LEN + 1]);

/* Parse an HTTP-date in any of the three formats of RFC 9110 5.6.7, exactly
 * (case-sensitive, no surrounding whitespace):
 *   IMF-fixdate  "Sun, 06 Nov 1994 08:49:37 GMT"
 *   RFC 850      "Sunday, 06-Nov-94 08:49:37 GMT" (the two-digit year is taken within 50
 *                years of now: one more than 50 years ahead is in the previous century,
 *                as RFC 9110 requires, and one 50 or more years ago in the next)
 *   asctime      "Sun Nov  6 08:49:37 1994"
 * Fields are range-checked (the day must exist in that month, seconds may be 60); the
 * weekday name must be valid but is not checked against the date. Returns false if
 * invalid. http_date_parse_at() takes "now" for the RFC 850 century rule. */
bool http_date_parse(const char *s, size_t len, time_t *out);
bool http_date_parse_at(const char *s, size_t len, time_t now, time_t *out);

/* ---- responses ------------------------------------------------------------------------------- */

/* The reason phrase of a supported status (200 206 301 304 400 403 404 405 408 412 413 414
 * 416 431 500 501 505), or NULL. */
const char *http_reason(int status);

/* What goes into a response head. Zero-initialise, then set what applies. */
typedef struct http_response {
    int status;
    bool keep_alive;          /* "Connection: keep-alive", else "Connection: close" */
    time_t date;              /* the Date field (the current time) */
    const char *content_type; /* NULL: no Content-Type */
    bool has_content_length;  /* Content-Length: content_length (computed for 206) */
    uint64_t content_length;
    bool has_last_modified; /* Last-Modified: last_modified */
    time_t last_modified;
    bool accept_ranges;   /* "Accept-Ranges: bytes" */
    uint64_t range_first; /* 206: Content-Range: bytes first-last/complete_length */
    uint64_t range_last;
    uint64_t complete_length; /* 206 and 416: the file size in Content-Range */
    http_slice location;      /* Location: location (visible ASCII only); ptr NULL: none */
} http_response;

/* Write the response head (status line, fields, final CRLF) into buf[0..cap). Fields, in
 * order: Server, Date, Content-Type, Content-Length, Last-Modified, Accept-Ranges,
 * Content-Range (206, 416), Allow: GET, HEAD (405), Location, Connection. The status line
 * always says HTTP/1.1. For 206 the Content-Length is last - first + 1 whatever
 * has_content_length says; a 304 never gets Content-Type, Content-Length or Content-Range.
 * Returns the length, -EINVAL for an unsupported status, a 206 whose range is not within
 * complete_length or a location with a byte outside 0x21-0x7E (no field can be injected),
 * -ENOSPC if it does not fit (buf then holds garbage). 512 bytes plus the location's length
 * always suffice with a Content-Type from http_mime_type(). No NUL is written. */
int http_format_head(const http_response *r, char *buf, size_t cap);

/* Write a complete error response for r->status: the head (as http_format_head(), with
 * Content-Type: text/plain; charset=utf-8 and the right Content-Length; r's content fields
 * are ignored, complete_length is used for a 416) and, when with_body (false for HEAD
 * requests), the body "<status> <reason>\n". Returns the total length or -EINVAL/-ENOSPC. */
int http_format_error(const http_response *r, bool with_body, char *buf, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
