/* Makes an exact, known number of malloc and free calls when told to.
 *
 * usage: malloc_count N
 * Prints "ready", waits for a line on stdin, then calls malloc(100 + i % 7)
 * and free() N times, prints "done" and exits with _exit so that no exit-time
 * library code allocates. Only raw read/write are used (no stdio buffers).
 * Built with -fno-builtin so that the compiler keeps every malloc/free pair.
 */
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    long n = atol(argv[1]);
    char buf[16];
    if (write(1, "ready\n", 6) != 6) return 1;
    if (read(0, buf, sizeof buf) <= 0) return 1;
    for (long i = 0; i < n; i++) {
        volatile char *p = malloc(100 + i % 7);
        if (!p) return 3;
        p[0] = (char)i;
        free((void *)p);
    }
    if (write(1, "done\n", 5) != 5) return 1;
    _exit(0);
}
