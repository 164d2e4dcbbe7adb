// Workload for reading gperftools profiles: known heap sites and a known
// CPU split. Run under LD_PRELOAD=libtcmalloc.so HEAPPROFILE=... (heap) or
// libprofiler.so CPUPROFILE=... (cpu).
//   heap: keep_blocks() keeps 10 blocks of 100000 bytes (in use at exit);
//         churn_blocks() allocates and frees 1000 blocks of 100 bytes.
//   heap2: the same plus keep_more(), which keeps 5 blocks of 200000 bytes
//         (a second profile whose difference from `heap` is keep_more).
//   cpu:  burn_long() spins about twice as long as burn_short().
// Usage: report_gperf heap | heap2 | cpu
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void *volatile kept[10];

__attribute__((noinline)) void keep_blocks(void) {
    for (int i = 0; i < 10; i++) {
        kept[i] = malloc(100000);
        memset(kept[i], 1, 100000);
    }
}

__attribute__((noinline)) void churn_blocks(void) {
    for (int i = 0; i < 1000; i++) {
        char *volatile p = malloc(100);
        p[0] = 1;
        free(p);
    }
}

void *volatile kept_more[5];

__attribute__((noinline)) void keep_more(void) {
    for (int i = 0; i < 5; i++) {
        kept_more[i] = malloc(200000);
        memset(kept_more[i], 1, 200000);
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

volatile unsigned long sink;

__attribute__((noinline)) void spin(double seconds) {
    double end = now() + seconds;
    while (now() < end)
        for (int i = 0; i < 1000; i++)
            sink += i;
}

__attribute__((noinline)) void burn_long(void) { spin(0.8); }
__attribute__((noinline)) void burn_short(void) { spin(0.4); }

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "cpu") == 0) {
        burn_long();
        burn_short();
    } else {
        keep_blocks();
        churn_blocks();
        if (argc > 1 && strcmp(argv[1], "heap2") == 0)
            keep_more();
    }
    return 0;
}
