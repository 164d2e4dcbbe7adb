// Spends its time switching stacks by hand: `longjmp` back to a `setjmp`
// in a tight loop, or `setcontext` back to a `getcontext`. The last
// instructions of glibc's `__longjmp` and `setcontext` have CFI whose rules
// name the sampled frame's registers (rdi, rdx, r8, r9).
// usage: unwind_longjmp longjmp|setcontext SECONDS
// Prints "ready", waits for a line on stdin, runs, prints "done".
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <ucontext.h>

static jmp_buf env;
static ucontext_t context;
static volatile long switches;

static double elapsed(const struct timespec *start) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - start->tv_sec) + (t.tv_nsec - start->tv_nsec) / 1e9;
}

__attribute__((noinline)) static void jump_back(void) {
    longjmp(env, 1);
}

__attribute__((noinline)) static void longjmp_loop(double seconds) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        for (int i = 0; i < 4096; i++) {
            if (setjmp(env) == 0)
                jump_back();
            switches++;
        }
    } while (elapsed(&start) < seconds);
}

__attribute__((noinline)) static void setcontext_loop(double seconds) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    static volatile long n;
    n = 0;
    getcontext(&context);
    // setcontext returns here, as getcontext's second return.
    switches++;
    if ((++n & 1023) != 0 || elapsed(&start) < seconds)
        setcontext(&context);
}

int main(int argc, char **argv) {
    if (argc < 3)
        return 2;
    double seconds = atof(argv[2]);
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    if (strcmp(argv[1], "longjmp") == 0)
        longjmp_loop(seconds);
    else
        setcontext_loop(seconds);
    printf("done\nswitches %ld\n", switches);
    fflush(stdout);
    return 0;
}
