/* Addresses in the programs: the address strings they take (IPv4, or IPv6 bare or in
 * brackets: what cp_server_start() takes as bind) and how an address and port are
 * printed; a listening socket for the examples that listen on their own. Header-only,
 * shared by cport-echo, cport-httpd, cport-bench and examples/. */
#ifndef CPORT_TOOLS_ADDRESS_H
#define CPORT_TOOLS_ADDRESS_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* *ss and *len from s (IPv4, or IPv6 bare or in brackets) and port; false if s is
 * neither (no names). */
static inline bool address_parse(const char *s, uint16_t port, struct sockaddr_storage *ss,
                                 socklen_t *len)
{
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *in = (struct sockaddr_in *)ss;
    if (inet_pton(AF_INET, s, &in->sin_addr) == 1) {
        in->sin_family = AF_INET;
        in->sin_port = htons(port);
        *len = sizeof *in;
        return true;
    }
    char text[INET6_ADDRSTRLEN];
    size_t n = strlen(s);
    if (n >= 2 && s[0] == '[' && s[n - 1] == ']') {
        if (n - 2 >= sizeof text)
            return false;
        memcpy(text, s + 1, n - 2);
        text[n - 2] = 0;
        s = text;
    }
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET6, s, &in6->sin6_addr) != 1)
        return false;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(port);
    *len = sizeof *in6;
    return true;
}

/* Whether s is an address cp_server_start() takes as bind. */
static inline bool bind_address_ok(const char *s)
{
    struct sockaddr_storage ss;
    socklen_t len;
    return address_parse(s, 0, &ss, &len);
}

/* What a program says of a --bind it refuses (a name, or not an address): after `prog: `. */
static inline void bind_address_refused(const char *prog, const char *s)
{
    fprintf(stderr,
            "%s: --bind takes an IPv4 or IPv6 address (such as 0.0.0.0, 127.0.0.1, :: or ::1), "
            "not %s\n",
            prog, s);
}

/* "ADDR:PORT" for an IPv4 address, "[ADDR]:PORT" for an IPv6 one (addr bare, or already
 * in brackets as --bind may take it). Returns buf. */
static inline const char *address_port_text(char *buf, size_t size, const char *addr, unsigned port)
{
    bool brackets = strchr(addr, ':') != NULL && addr[0] != '[';
    snprintf(buf, size, brackets ? "[%s]:%u" : "%s:%u", addr, port);
    return buf;
}

/* A listening TCP socket (close-on-exec) on addr (as address_parse() takes it) and port
 * (0: any; the port taken goes to *port_out), with SO_REUSEADDR. As cport's server layer
 * (cp_server_start) does: "::" takes IPv4 clients too, whatever the system's default
 * (net.ipv6.bindv6only) says, and any other IPv6 address takes IPv6 only. On failure it
 * says why on stderr, after `prog: `, and returns -1. For the examples that listen
 * without the server layer. */
static inline int address_listen(const char *prog, const char *addr, int port, int backlog,
                                 int *port_out)
{
    struct sockaddr_storage sa;
    socklen_t salen;
    if (!address_parse(addr, (uint16_t)port, &sa, &salen)) {
        bind_address_refused(prog, addr);
        return -1;
    }
    int fd = socket(sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    int v6only = 0;
    if (sa.ss_family == AF_INET6) {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)&sa)->sin6_addr;
        v6only = !IN6_IS_ADDR_UNSPECIFIED(a6) && !IN6_IS_ADDR_V4MAPPED(a6);
    }
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        (sa.ss_family == AF_INET6 &&
         setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only) < 0) ||
        bind(fd, (struct sockaddr *)&sa, salen) < 0 || listen(fd, backlog) < 0) {
        int err = errno;
        char at[INET6_ADDRSTRLEN + 16];
        fprintf(stderr, "%s: cannot listen on %s: %s\n", prog,
                address_port_text(at, sizeof at, addr, (unsigned)port), strerror(err));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    socklen_t len = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &len);
    *port_out = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port
                                               : ((struct sockaddr_in *)&sa)->sin_port);
    return fd;
}

#endif
