/* Allocations whose caller is called back from Debian's glibc, which is
 * built without frame pointers: a frame-pointer walk from malloc passes
 * through qsort's frames, where rbp is not a frame pointer.
 *
 * usage: heap_qsort
 * Prints "ready", waits for a line, sorts N integers with a comparison
 * function that leaks malloc(24) on every call, prints "done calls C" and
 * waits for a line before exiting.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N 2000
static long calls;
static void *volatile sink;

__attribute__((noinline)) int cmp_leak(const void *a, const void *b) {
    sink = malloc(24);
    calls++;
    return *(const int *)a - *(const int *)b;
}

__attribute__((noinline)) void sort_and_leak(int *v) {
    qsort(v, N, sizeof *v, cmp_leak);
}

int main(void) {
    static int v[N];
    for (int i = 0; i < N; i++) v[i] = (i * 7919) % N;
    char c;
    if (write(1, "ready\n", 6) != 6) return 1;
    while (read(0, &c, 1) == 1 && c != '\n') {}
    sort_and_leak(v);
    char out[48] = "done calls ";
    int len = (int)strlen(out), n = 0;
    char digits[24];
    long x = calls;
    do digits[n++] = (char)('0' + x % 10); while ((x /= 10) && n < 23);
    while (n) out[len++] = digits[--n];
    out[len++] = '\n';
    if (write(1, out, len) != len) return 1;
    while (read(0, &c, 1) == 1 && c != '\n') {}
    return 0;
}
