/* Addresses in the programs: which --bind values cp_server_start() takes (IPv4, or IPv6
 * bare or in brackets) and how an address and port are printed. Header-only, shared by
 * cport-echo and cport-httpd. */
#ifndef CPORT_TOOLS_ADDRESS_H
#define CPORT_TOOLS_ADDRESS_H

#include <arpa/inet.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

/* Whether s is an address cp_server_start() takes: IPv4, or IPv6 bare or in brackets. */
static inline bool bind_address_ok(const char *s)
{
    struct in6_addr a;
    char text[INET6_ADDRSTRLEN];
    size_t n = strlen(s);
    if (inet_pton(AF_INET, s, &a) == 1 || inet_pton(AF_INET6, s, &a) == 1)
        return true;
    if (n < 2 || n - 2 >= sizeof text || s[0] != '[' || s[n - 1] != ']')
        return false;
    memcpy(text, s + 1, n - 2);
    text[n - 2] = 0;
    return inet_pton(AF_INET6, text, &a) == 1;
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
