// A process that spends measurable time inside exit_group after its memory
// is released: it touches MIB MiB of memory, prints "ready", waits for a
// line on stdin, then exits from `leave_now`. The kernel frees those pages
// (exit_mmap, tens of ms for a few hundred MiB) after the task's mm is
// gone, so no user stack can be read during that time.
// Usage: exit_release MIB [now] (now: exits at once, without waiting)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

__attribute__((noinline)) void leave_now(void) {
    _exit(0);
}

__attribute__((noinline)) char *fill(size_t bytes) {
    char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        exit(2);
    memset(p, 1, bytes);
    return p;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 256;
    volatile char *p = fill(mib << 20);
    (void)p;
    if (argc > 2 && strcmp(argv[2], "now") == 0)
        leave_now();
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    leave_now();
}
