/* A known 6-deep call chain, main -> level1 -> ... -> level5 -> leaf, for
 * the stack unwinder's tests. Built with -O2 -fomit-frame-pointer.
 *
 *   unwind_chain alloc SECONDS   leaf calls malloc/free in a loop
 *   unwind_chain spin SECONDS    leaf burns CPU
 *   unwind_chain signal SECONDS  as spin, and a SIGALRM handler interrupts
 *                                the chain every 2 ms to burn CPU in
 *                                on_signal -> signal_leaf
 *
 * Prints "ready", waits for a "go" line, runs for SECONDS, prints "done" and "calls N",
 * then waits for stdin to close (so its stacks can still be symbolized). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static void *volatile sink;
static volatile unsigned long spin_sink;
static int mode_alloc;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Each level does work after its call, so no call becomes a tail call and
 * every frame stays on the stack. */
__attribute__((noinline)) int leaf(int n) {
    if (mode_alloc) {
        char buf[64];
        memset(buf, n, sizeof buf);
        sink = malloc(100 + n % 200);
        ((char *)sink)[0] = buf[n % 64];
        free(sink);
        return buf[3];
    }
    unsigned long x = n;
    for (int i = 0; i < 300; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
    spin_sink = x;
    return (int)(x & 1);
}

__attribute__((noinline)) int level5(int n) { int r = leaf(n + 1); spin_sink += r; return r + 5; }
__attribute__((noinline)) int level4(int n) { int r = level5(n + 1); spin_sink += r; return r + 4; }
__attribute__((noinline)) int level3(int n) { int r = level4(n + 1); spin_sink += r; return r + 3; }
__attribute__((noinline)) int level2(int n) { int r = level3(n + 1); spin_sink += r; return r + 2; }
__attribute__((noinline)) int level1(int n) { int r = level2(n + 1); spin_sink += r; return r + 1; }

__attribute__((noinline)) void signal_leaf(void) {
    unsigned long x = spin_sink;
    for (int i = 0; i < 200000; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
    spin_sink = x;
}

__attribute__((noinline)) void on_signal(int sig) {
    signal_leaf();
    spin_sink += sig;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s alloc|spin SECONDS\n", argv[0]);
        return 2;
    }
    mode_alloc = strcmp(argv[1], "alloc") == 0;
    double seconds = atof(argv[2]);
    char line[64];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    if (strcmp(argv[1], "signal") == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sa.sa_flags = SA_RESTART;
        sigaction(SIGALRM, &sa, NULL);
        struct itimerval it = {{0, 2000}, {0, 2000}};
        setitimer(ITIMER_REAL, &it, NULL);
    }
    double end = now() + seconds;
    long calls = 0;
    while (now() < end) {
        for (int i = 0; i < 100; i++) level1(i);
        calls += 100;
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("done\ncalls %ld\n", calls);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
    }
    return 0;
}
