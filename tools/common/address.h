/* Addresses in the programs: the address strings they take (IPv4, or IPv6 bare or in
 * brackets: what cp_server_start() takes as bind) and how an address and port are
 * printed. Header-only, shared by cport-echo, cport-httpd and cport-bench. */
#ifndef CPORT_TOOLS_ADDRESS_H
#define CPORT_TOOLS_ADDRESS_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

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

/* "ADDR:PORT" for an IPv4 address, "[ADDR]:PORT" for an IPv6 one (addr bare, or already
 * in brackets as --bind may take it). Returns buf. */
static inline const char *address_port_text(char *buf, size_t size, const char *addr, unsigned port)
{
    bool brackets = strchr(addr, ':') != NULL && addr[0] != '[';
    snprintf(buf, size, brackets ? "[%s]:%u" : "%s:%u", addr, port);
    return buf;
}

#endif
