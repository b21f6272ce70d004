/* syscall_tax: how much *user* CPU time a system call costs on this machine, as the kernel
 * accounts it.
 *
 * The echo benchmark compares servers by the user and system CPU time the kernel reports
 * for them (/proc/PID/stat). With tick-based accounting (CONFIG_TICK_CPU_ACCOUNTING, the
 * usual setting) a tick that fires while interrupts are off inside a system call is taken
 * when they come back on, often in user mode right after the call returns, so every system
 * call shows up as some user time even when the program around it does almost nothing.
 * This program makes system calls that do next to nothing in a tight loop and prints the
 * user and system time per call, so that a server's user time per message can be split
 * into "its system calls" and "its own work".
 *
 *   syscall_tax [--calls N]
 *
 * Three loops, each N calls (default 5 000 000): recv() on an empty non-blocking socket
 * (fails with EAGAIN), getppid(), and write()+read() of 64 bytes through a socketpair (two
 * calls per iteration). Pin it to one CPU (taskset -c 0) for stable figures. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

static void times(double *user, double *sys)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
    *sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void report(const char *what, long calls, double u0, double s0)
{
    double u1, s1;
    times(&u1, &s1);
    printf("%-34s user %.4f us/call  system %.4f us/call\n", what, (u1 - u0) / (double)calls * 1e6,
           (s1 - s0) / (double)calls * 1e6);
}

int main(int argc, char **argv)
{
    long n = 5000000;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--calls") == 0 && i + 1 < argc) {
            n = atol(argv[++i]);
        } else {
            fprintf(stderr, "usage: syscall_tax [--calls N]\n");
            return strcmp(argv[i], "--help") == 0 ? 0 : 2;
        }
    }
    if (n <= 0)
        n = 1;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) < 0) {
        perror("socketpair");
        return 1;
    }
    char buf[64] = {0};
    double u, s;

    times(&u, &s);
    for (long i = 0; i < n; i++)
        if (recv(sv[0], buf, sizeof buf, 0) >= 0 || errno != EAGAIN)
            return 1;
    report("recv on an empty socket (EAGAIN)", n, u, s);

    times(&u, &s);
    for (long i = 0; i < n; i++)
        if (getppid() < 0)
            return 1;
    report("getppid", n, u, s);

    times(&u, &s);
    for (long i = 0; i < n / 2; i++)
        if (write(sv[1], buf, sizeof buf) != sizeof buf ||
            read(sv[0], buf, sizeof buf) != sizeof buf)
            return 1;
    report("write + read of 64 B (per call)", n, u, s);
    return 0;
}
