// CPU split known by construction: func_a, func_b and func_c each call the
// same work function `burn` for 5, 3 and 2 units, so their shares of the CPU
// are 50%, 30% and 20% whatever the machine. Unit sizes are pseudo-random so
// the switching is not locked to any sampling period.
//
// usage: cpu_split SECONDS MIN_CPU_SECONDS [threads]
//   runs for at least SECONDS of wall time and, on a busy machine, until
//   each worker has had MIN_CPU_SECONDS of CPU; one thread (named
//   "splitmain"), or with "threads" two workers named "split-w1"
//   (a/b/c = 50/30/20) and "split-w2" (a/b/c = 20/30/50).
// Prints "ready", waits for a line on stdin, runs, prints "done".
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

static volatile uint64_t sink;

__attribute__((noinline)) uint64_t burn(uint64_t n, uint64_t x) {
    for (uint64_t i = 0; i < n; i++)
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return x;
}

__attribute__((noinline)) void func_a(uint64_t n) { sink = burn(n, sink); }
__attribute__((noinline)) void func_b(uint64_t n) { sink = burn(n, sink + 1); }
__attribute__((noinline)) void func_c(uint64_t n) { sink = burn(n, sink + 2); }

static double clock_seconds(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct job {
    const char *name;
    int shares[3];
    double seconds;
    double cpu_seconds;
};

static void *run(void *arg) {
    struct job *job = arg;
    prctl(PR_SET_NAME, job->name);
    uint64_t rng = (uintptr_t)job ^ 0x9e3779b97f4a7c15ULL;
    double end = clock_seconds(CLOCK_MONOTONIC) + job->seconds;
    double cpu_end = clock_seconds(CLOCK_THREAD_CPUTIME_ID) + job->cpu_seconds;
    while (clock_seconds(CLOCK_MONOTONIC) < end || clock_seconds(CLOCK_THREAD_CPUTIME_ID) < cpu_end) {
        // 20k..60k iterations per unit: tens of microseconds, varying.
        rng = rng * 6364136223846793005ULL + 1;
        uint64_t unit = 20000 + (rng >> 33) % 40000;
        func_a(unit * job->shares[0]);
        func_b(unit * job->shares[1]);
        func_c(unit * job->shares[2]);
    }
    return NULL;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 10;
    double cpu_seconds = argc > 2 ? atof(argv[2]) : 0;
    int threads = argc > 3 && strcmp(argv[3], "threads") == 0;
    prctl(PR_SET_NAME, "splitmain");
    printf("ready\n");
    fflush(stdout);
    // Start when told, so that the profiler is attached for the whole run.
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    if (!threads) {
        struct job job = {"splitmain", {5, 3, 2}, seconds, cpu_seconds};
        run(&job);
    } else {
        struct job jobs[2] = {{"split-w1", {5, 3, 2}, seconds, cpu_seconds},
                              {"split-w2", {2, 3, 5}, seconds, cpu_seconds}};
        pthread_t t[2];
        for (int i = 0; i < 2; i++)
            pthread_create(&t[i], NULL, run, &jobs[i]);
        for (int i = 0; i < 2; i++)
            pthread_join(t[i], NULL);
    }
    printf("done\n");
    fflush(stdout);
    return 0;
}
