// Spends its time creating and joining threads: the caller waits in
// glibc's clone3 syscall while the kernel builds the thread, and each new
// thread starts right after it. glibc's CFI ends before that syscall (the
// new thread's frame differs), so the code there has no FDE.
// usage: unwind_clone SECONDS
// Prints "ready", waits for a line on stdin, runs, prints "done".
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile long threads;

static double elapsed(const struct timespec *start) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - start->tv_sec) + (t.tv_nsec - start->tv_nsec) / 1e9;
}

static void *nothing(void *arg) {
    return arg;
}

__attribute__((noinline)) static void clone_loop(double seconds) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        for (int i = 0; i < 64; i++) {
            pthread_t t;
            if (pthread_create(&t, NULL, nothing, NULL) != 0)
                exit(1);
            pthread_join(t, NULL);
            threads++;
        }
    } while (elapsed(&start) < seconds);
}

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    double seconds = atof(argv[1]);
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    clone_loop(seconds);
    printf("done\nthreads %ld\n", threads);
    fflush(stdout);
    return 0;
}
