/* Line I/O for the workloads driven over stdin/stdout: raw read/write only,
 * so that no stdio buffer is allocated while a profiler watches the heap. */
#ifndef LINE_IO_H
#define LINE_IO_H

#include <string.h>
#include <unistd.h>

static void say(const char *s) {
    if (write(1, s, strlen(s)) < 0) _exit(1);
}

/* Reads one line (without its newline) into buf; -1 at end of input. */
static long read_line(char *buf, long cap) {
    long n = 0;
    while (n < cap - 1) {
        long r = read(0, buf + n, 1);
        if (r <= 0) return -1;
        if (buf[n] == '\n') break;
        n++;
    }
    buf[n] = 0;
    return n;
}

/* Writes prefix, v in decimal and a newline. */
static void say_number(const char *prefix, unsigned long v) {
    char out[64], digits[32];
    int n = 0;
    do digits[n++] = (char)('0' + v % 10); while ((v /= 10) && n < 31);
    size_t len = strlen(prefix);
    memcpy(out, prefix, len);
    while (n) out[len++] = digits[--n];
    out[len++] = '\n';
    if (write(1, out, len) < 0) _exit(1);
}

#endif
