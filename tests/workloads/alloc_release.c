/* Memory given back.
 *   alloc_release        allocates 800 MiB in 4 KiB objects, frees the first
 *                        90% of them (whole spans become free), calls
 *                        malloc_trim(0) and prints `base_kib B live_kib L
 *                        before_kib R0 after_kib R1`: resident KiB before
 *                        allocating, live KiB, resident KiB before and after
 *                        the trim.
 *   alloc_release decay  frees 3 MiB of 384 KiB blocks (less than any
 *                        size-driven release), then keeps allocating and
 *                        freeing one such block every 10 ms for at most 10 s,
 *                        until the freed memory left the resident set; prints
 *                        `base_kib B freed_kib F held_kib H ms T
 *                        final_kib R`: resident KiB before, freed, resident
 *                        KiB above the base just after the frees, the time
 *                        it took and resident KiB above the base at the end. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long rss_kib(void) {
    long pages = 0, resident = -1;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int decay(void) {
    enum { SIZE = 384 << 10, N = 8 };
    static char *blocks[N];
    long base = rss_kib();
    for (int i = 0; i < N; i++) {
        blocks[i] = malloc(SIZE);
        if (!blocks[i]) { fprintf(stderr, "alloc_release: out of memory\n"); return 1; }
        memset(blocks[i], 1, SIZE);
    }
    for (int i = 0; i < N; i++) free(blocks[i]);
    long held = rss_kib() - base;
    double start = now(), seconds = 0;
    long final = held;
    while (seconds < 10) {
        char *p = malloc(SIZE);
        if (!p) { fprintf(stderr, "alloc_release: out of memory\n"); return 1; }
        p[0] = 1;
        free(p);
        final = rss_kib() - base;
        seconds = now() - start;
        if (final * 4 < (long)N * SIZE / 1024) break;
        usleep(10000);
    }
    printf("base_kib %ld freed_kib %ld held_kib %ld ms %ld final_kib %ld\n", base,
           (long)N * SIZE / 1024, held, (long)(seconds * 1000), final);
    return 0;
}

int main(int argc, char **argv) {
    enum { SIZE = 4096, N = 800 * 256 };
    if (argc > 1 && strcmp(argv[1], "decay") == 0) return decay();
    static char *objs[N];
    long base = rss_kib();
    for (int i = 0; i < N; i++) {
        objs[i] = malloc(SIZE);
        if (!objs[i]) { fprintf(stderr, "alloc_release: out of memory\n"); return 1; }
        memset(objs[i], 1, SIZE);
    }
    int keep_from = N - N / 10;
    for (int i = 0; i < keep_from; i++) free(objs[i]);
    long before = rss_kib();
    malloc_trim(0);
    long after = rss_kib();
    long live = (long)(N - keep_from) * SIZE / 1024;
    printf("base_kib %ld live_kib %ld before_kib %ld after_kib %ld\n", base, live, before, after);
    for (int i = keep_from; i < N; i++) free(objs[i]);
    return 0;
}
