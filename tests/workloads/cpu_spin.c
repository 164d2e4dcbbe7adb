// A fixed amount of CPU-bound work on N threads, for overhead benchmarks.
// usage: cpu_spin THREADS MILLION_ITERATIONS_PER_THREAD
// Prints "ready", waits for a line on stdin, runs, then prints the elapsed
// wall time in seconds ("elapsed 1.234").
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile uint64_t sink;
static uint64_t iterations;

__attribute__((noinline)) uint64_t spin(uint64_t n, uint64_t x) {
    for (uint64_t i = 0; i < n; i++)
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return x;
}

static void *worker(void *arg) {
    sink = spin(iterations, (uintptr_t)arg);
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    iterations = (uint64_t)(argc > 2 ? atof(argv[2]) : 1000) * 1000000;
    if (threads < 1 || threads > 64)
        return 2;
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pthread_t t[64];
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("elapsed %.6f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
