// Known heap for the agent tests: blocks of 64 KiB leaked in rounds on
// command, and the same amount allocated and freed at once (churn), so
// that every round's allocations and what stays in use are known.
//
// usage: agent_heap BEFORE
//   leaks BEFORE blocks at start (before any profiler attaches), prints
//   "ready", then for each line "N" on stdin leaks N blocks, churns N
//   blocks, and prints "leaked TOTAL" (blocks leaked since start).
#include <stdio.h>
#include <stdlib.h>

#define BLOCK (64 * 1024)
#define NOINLINE __attribute__((noinline))
// Makes a pointer escape, so the compiler keeps the allocation.
#define ESCAPE(p) __asm__ volatile("" : : "r"(p) : "memory")

NOINLINE void leak_block(void) {
    char *p = malloc(BLOCK);
    p[0] = 1;
    ESCAPE(p);
}

NOINLINE void churn_block(void) {
    char *p = malloc(BLOCK);
    p[0] = 1;
    ESCAPE(p);
    free(p);
}

NOINLINE void leak_before(int n) {
    for (int i = 0; i < n; i++) leak_block();
}

int main(int argc, char **argv) {
    int total = argc > 1 ? atoi(argv[1]) : 0;
    leak_before(total);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    int n;
    while (scanf("%d", &n) == 1) {
        for (int i = 0; i < n; i++) leak_block();
        for (int i = 0; i < n; i++) churn_block();
        total += n;
        printf("leaked %d\n", total);
    }
    return 0;
}
