/* Memory allocated before a profiler attaches, and a little after.
 *
 * usage: heap_before_attach
 * Allocates and touches BEFORE_BLOCKS blocks of BLOCK bytes (64 MiB in all;
 * glibc serves each by its own anonymous mapping), prints "ready", then
 * obeys stdin lines (raw read/write only):
 *   go     leaks AFTER_BLOCKS blocks of AFTER_SIZE bytes from
 *          `allocate_after` (main;allocate_after), prints "done"
 *   exit   exits at once
 * Built with -fno-builtin; allocate_after is noinline.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "line_io.h"

#define BLOCK (1024 * 1024)
#define BEFORE_BLOCKS 64
#define AFTER_BLOCKS 10
#define AFTER_SIZE 1000

static void *volatile keep[BEFORE_BLOCKS + AFTER_BLOCKS];

__attribute__((noinline)) void allocate_after(void) {
    for (int i = 0; i < AFTER_BLOCKS; i++) {
        void *p = malloc(AFTER_SIZE);
        if (!p) _exit(3);
        memset(p, 1, AFTER_SIZE);
        keep[BEFORE_BLOCKS + i] = p;
    }
}

int main(void) {
    for (int i = 0; i < BEFORE_BLOCKS; i++) {
        void *p = malloc(BLOCK);
        if (!p) return 3;
        memset(p, 1, BLOCK);
        keep[i] = p;
    }
    say("ready\n");
    char line[64];
    while (read_line(line, sizeof line) >= 0) {
        if (!strcmp(line, "go")) {
            allocate_after();
            say("done\n");
        } else if (!strcmp(line, "exit")) {
            _exit(0);
        }
    }
    return 0;
}
