// Workloads for `cargo xtask bench preload`.
//   churn N:  N malloc/free pairs of mixed small sizes (16..1024 B), with a
//             small live window; prints "ops N seconds S".
//   rate N:   N allocations of 64..2048 B (about 1 KiB on average), each
//             after a fixed slice of computation sized so that the program
//             allocates about 100 MiB/s; 4096 objects stay live. Prints
//             "ops N seconds S bytes B".
// With PRELOAD_BENCH_WAIT set, prints "ready" and waits for a line on stdin
// before starting (so that a profiler can attach first).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned long rng = 88172645463325252UL;
static unsigned long next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    long n = atol(argv[2]);
    void *live[4096] = {0};
    volatile unsigned long sink = 0;
    unsigned long bytes = 0;
    if (getenv("PRELOAD_BENCH_WAIT")) {
        char line[16];
        printf("ready\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 3;
    }
    double t0 = now();
    if (strcmp(argv[1], "churn") == 0) {
        for (long i = 0; i < n; i++) {
            size_t size = 16 + (next() & 1008);
            unsigned k = next() & 63;
            free(live[k]);
            live[k] = malloc(size);
            *(char *)live[k] = 1;
        }
    } else {
        for (long i = 0; i < n; i++) {
            unsigned long x = i;
            for (int j = 0; j < 8400; j++) x = x * 6364136223846793005UL + 1442695040888963407UL;
            sink += x;
            size_t size = 64 + (next() & 1983);
            unsigned k = next() & 4095;
            free(live[k]);
            live[k] = malloc(size);
            memset(live[k], 0, 64);
            bytes += size;
        }
    }
    double t = now() - t0;
    for (int k = 0; k < 4096; k++) free(live[k]);
    printf("ops %ld seconds %.6f bytes %lu\n", n, t, bytes);
    return 0;
}
