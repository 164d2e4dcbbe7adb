/* Loads LIBRARY with dlopen only after a "go" line (so after the profiler
 * attached), then calls its dl_level1 about once per millisecond for
 * SECONDS: main -> call_lib -> dl_level1 -> dl_level2 -> dl_leaf -> malloc.
 *
 *   unwind_dlopen LIBRARY SECONDS
 *
 * Prints "ready", then "done N" and waits for stdin to close. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile int sink;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) int call_lib(int (*fn)(int), int n) {
    int r = fn(n);
    sink += r;
    return r;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LIBRARY SECONDS\n", argv[0]);
        return 2;
    }
    char line[64];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    int (*fn)(int) = (int (*)(int))dlsym(lib, "dl_level1");
    if (!fn) return 1;
    /* One call, then a pause: the walker meets the new library's code, asks
     * for the process's tables to be refreshed, and the agent loads the
     * library's rows. The samples of that first call end in [truncated]
     * (visibly); every later one must be complete. */
    call_lib(fn, 0);
    struct timespec settle = {0, 300000000};
    nanosleep(&settle, NULL);
    double end = now() + atof(argv[2]);
    long calls = 0;
    struct timespec pause = {0, 1000000};
    while (now() < end) {
        call_lib(fn, (int)calls);
        calls++;
        nanosleep(&pause, NULL);
    }
    printf("done\ncalls %ld\n", calls);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
    }
    return 0;
}
