/* A library loaded with dlopen by unwind_dlopen.c after the profiler has
 * attached: dl_level1 -> dl_level2 -> dl_leaf -> malloc. Built with
 * -O2 -fomit-frame-pointer -shared -fPIC; unwind_start.c calls
 * dl_spin_level1 -> dl_spin_leaf, which burn CPU. */
#include <stdlib.h>
#include <time.h>

static void *volatile sink;
static volatile int dl_sink;

__attribute__((noinline)) int dl_leaf(int n) {
    sink = malloc(200 + n % 100);
    int r = ((char *)sink)[0] = (char)n;
    free(sink);
    return r;
}

__attribute__((noinline)) int dl_level2(int n) { int r = dl_leaf(n + 1); dl_sink += r; return r + 2; }
__attribute__((noinline)) int dl_level1(int n) { int r = dl_level2(n + 1); dl_sink += r; return r + 1; }

/* dl_spin_level1 -> dl_spin_leaf: about 2 ms of CPU per call. */
static double dl_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) int dl_spin_leaf(int n) {
    unsigned long x = (unsigned long)n;
    double end = dl_now() + 0.002;
    while (dl_now() < end)
        for (int i = 0; i < 2000; i++) x = x * 6364136223846793005UL + 1;
    dl_sink += (int)(x & 1);
    return (int)(x & 1);
}

__attribute__((noinline)) int dl_spin_level1(int n) { int r = dl_spin_leaf(n + 1); dl_sink += r; return r + 1; }
