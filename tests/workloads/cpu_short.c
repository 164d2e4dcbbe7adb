// A short-lived process: 100 ms of CPU in `short_lived_work`, then exit.
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static volatile uint64_t sink;

__attribute__((noinline)) void short_lived_work(double seconds) {
    struct timespec start, t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &start);
    uint64_t x = 1;
    do {
        for (int i = 0; i < 100000; i++)
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        sink = x;
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    } while ((t.tv_sec - start.tv_sec) + (t.tv_nsec - start.tv_nsec) / 1e9 < seconds);
}

int main(void) {
    short_lived_work(0.1);
    return 0;
}
