/* Memory given back: allocates 800 MiB in 4 KiB objects, frees the first
 * 90% of them (whole spans become free), calls malloc_trim(0) and prints
 * `base_kib B live_kib L before_kib R0 after_kib R1`: resident KiB before
 * allocating, live KiB, resident KiB before and after the trim. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long rss_kib(void) {
    long pages = 0, resident = -1;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

int main(void) {
    enum { SIZE = 4096, N = 800 * 256 };
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
