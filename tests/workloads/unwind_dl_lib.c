/* A library loaded with dlopen by unwind_dlopen.c after the profiler has
 * attached: dl_level1 -> dl_level2 -> dl_leaf -> malloc. Built with
 * -O2 -fomit-frame-pointer -shared -fPIC. */
#include <stdlib.h>

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
