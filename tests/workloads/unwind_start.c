/* Call chains known by construction, for the stacks of processes whose
 * unwind tables are not loaded yet. Built with -O2 -fomit-frame-pointer.
 *
 *   unwind_start spin SECONDS
 *       burns CPU in main -> busy1 -> busy2 -> busy_leaf for SECONDS (from
 *       its start), printing "ready" first.
 *   unwind_start early MS SECONDS
 *       burns CPU in main -> early1 -> early2 -> early_leaf for its first MS
 *       milliseconds, then in main -> late_leaf for SECONDS.
 *   unwind_start dlopen LIBRARY CALLS
 *       prints "ready", waits for a "go" line, loads LIBRARY with dlopen and
 *       calls its dl_spin_level1 CALLS times (main -> call_lib ->
 *       dl_spin_level1 -> dl_spin_leaf, about 2 ms of CPU each, or
 *       dl_level1 -> dl_level2 -> dl_leaf -> malloc with "alloc" as a 5th
 *       argument), prints "done", and waits for stdin to close.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static volatile unsigned long sink;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Burns CPU until `end`; every level does work after its call, so no call
 * becomes a tail call. */
#define SPIN_UNTIL(end)                                                            \
    do {                                                                           \
        unsigned long x = sink;                                                    \
        while (now() < (end))                                                      \
            for (int i = 0; i < 2000; i++) x = x * 6364136223846793005UL + 1;      \
        sink = x;                                                                  \
    } while (0)

__attribute__((noinline)) void busy_leaf(double end) { SPIN_UNTIL(end); }
__attribute__((noinline)) void busy2(double end) { busy_leaf(end); sink += 2; }
__attribute__((noinline)) void busy1(double end) { busy2(end); sink += 1; }

__attribute__((noinline)) void early_leaf(double end) { SPIN_UNTIL(end); }
__attribute__((noinline)) void early2(double end) { early_leaf(end); sink += 2; }
__attribute__((noinline)) void early1(double end) { early2(end); sink += 1; }

__attribute__((noinline)) void late_leaf(double end) { SPIN_UNTIL(end); }

__attribute__((noinline)) int call_lib(int (*fn)(int), int n) {
    int r = fn(n);
    sink += r;
    return r;
}

static int dlopen_mode(const char *path, long calls, int alloc) {
    char line[64];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    void *lib = dlopen(path, RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    int (*fn)(int) = (int (*)(int))dlsym(lib, alloc ? "dl_level1" : "dl_spin_level1");
    if (!fn) return 1;
    for (long i = 0; i < calls; i++) call_lib(fn, (int)i);
    printf("done\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "spin")) {
        double end = now() + atof(argv[2]);
        printf("ready\n");
        fflush(stdout);
        busy1(end);
        return 0;
    }
    if (argc >= 4 && !strcmp(argv[1], "early")) {
        double start = now();
        early1(start + atof(argv[2]) / 1000);
        late_leaf(now() + atof(argv[3]));
        return 0;
    }
    if (argc >= 4 && !strcmp(argv[1], "dlopen"))
        return dlopen_mode(argv[2], atol(argv[3]), argc >= 5 && !strcmp(argv[4], "alloc"));
    fprintf(stderr, "usage: %s spin SECONDS | early MS SECONDS | dlopen LIBRARY CALLS [alloc]\n",
            argv[0]);
    return 2;
}
