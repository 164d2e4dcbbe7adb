/* Known anonymous mappings, on demand (prof-bpf heap --mmap).
 *
 * usage: heap_mmap [once]
 * With "once", runs one round, prints "done" and exits (launch mode).
 * Otherwise prints "ready" and obeys stdin lines (raw read/write only, so
 * nothing is allocated or mapped between rounds):
 *   go R   runs R rounds, then prints "done"
 *   sum    prints "sum N": a checksum of what the rounds wrote
 *   overlay  maps 8 MiB (map_overlaid), then MAP_FIXED anonymous mappings
 *          over parts of it, kept: 2 MiB over its middle from 3 MiB
 *          (overlay_middle), 1 MiB over its start (overlay_start), 1 MiB
 *          over its end (overlay_end); prints "overlaid". 8 MiB are mapped:
 *          4 MiB the original's, 4 MiB the overlays'.
 *   unmap  unmaps the whole 8 MiB of the last overlay; prints "unmapped"
 *   move   maps 4 MiB (map_move_target) and 2 MiB (map_moved), then moves
 *          the 2 MiB onto the first one's start with mremap(MREMAP_FIXED)
 *          (move_over); then maps 4 MiB (map_shared_target) and moves a
 *          2 MiB shared memfd mapping onto its start (move_shared_over);
 *          prints "moved". 8 MiB are mapped: 2 MiB of each 4 MiB target,
 *          the 2 MiB moved, and the 2 MiB shared (not heap).
 * Each round, by construction (MiB = 1048576 bytes):
 *   map_leak    maps 3 x 1 MiB anonymous, kept                (main;run_round;map_leak)
 *   map_churn   maps and unmaps 64 KiB, 100 times: nothing kept
 *   map_grow    maps 1 MiB and grows it by mremap to 3 MiB, kept
 *   map_trim    maps 1 MiB and unmaps its first 256 KiB: 768 KiB kept
 *   map_hole    maps 1 MiB and unmaps 64 KiB in its middle: 960 KiB kept
 *   map_file    maps one page of a file (not heap), kept
 *   big_malloc  malloc(1 MiB), kept: glibc serves it by mmap, which is
 *               the allocator's own mapping
 * Built with frame pointers and -fno-builtin; functions are noinline so the
 * call chains are exactly the ones above.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "line_io.h"

#define NOINLINE __attribute__((noinline))
#define MIB (1024 * 1024)
#define KIB 1024

static void *volatile sink;
static unsigned long checksum;

static void touch(void *p, size_t n) {
    memset(p, 1, n);
    checksum += n;
}

NOINLINE void map_leak(void) {
    for (int i = 0; i < 3; i++) {
        void *p = mmap(NULL, MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) _exit(2);
        touch(p, MIB);
        sink = p;
    }
}

NOINLINE void map_churn(void) {
    for (int i = 0; i < 100; i++) {
        void *p = mmap(NULL, 64 * KIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) _exit(2);
        touch(p, 64 * KIB);
        munmap(p, 64 * KIB);
    }
}

NOINLINE void map_grow(void) {
    void *p = mmap(NULL, MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) _exit(2);
    touch(p, MIB);
    p = mremap(p, MIB, 3 * MIB, MREMAP_MAYMOVE);
    if (p == MAP_FAILED) _exit(2);
    touch((char *)p + MIB, 2 * MIB);
    sink = p;
}

NOINLINE void map_trim(void) {
    char *p = mmap(NULL, MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) _exit(2);
    munmap(p, 256 * KIB);
    touch(p + 256 * KIB, 768 * KIB);
    sink = p;
}

NOINLINE void map_hole(void) {
    char *p = mmap(NULL, MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) _exit(2);
    munmap(p + 512 * KIB, 64 * KIB);
    touch(p, 512 * KIB);
    sink = p;
}

NOINLINE void map_file(void) {
    int fd = open("/proc/self/exe", O_RDONLY);
    if (fd < 0) _exit(3);
    void *p = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) _exit(2);
    close(fd);
    checksum += ((unsigned char *)p)[1];
    sink = p;
}

NOINLINE void big_malloc(void) {
    void *p = malloc(MIB);
    touch(p, MIB);
    sink = p;
}

static char *overlaid;

/* A macro, so that mmap's caller is the overlay_* function itself. */
#define MAP_OVER(at, n)                                                                 \
    do {                                                                                \
        void *p = mmap((at), (n), PROT_READ | PROT_WRITE,                               \
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);                 \
        if (p != (void *)(at)) _exit(2);                                                \
        touch(p, (n));                                                                  \
    } while (0)

NOINLINE void map_overlaid(void) {
    overlaid = mmap(NULL, 8 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (overlaid == MAP_FAILED) _exit(2);
    touch(overlaid, 8 * MIB);
}

NOINLINE void overlay_middle(void) { MAP_OVER(overlaid + 3 * MIB, 2 * MIB); }

NOINLINE void overlay_start(void) { MAP_OVER(overlaid, MIB); }

NOINLINE void overlay_end(void) { MAP_OVER(overlaid + 7 * MIB, MIB); }

static char *move_target, *moved, *shared_target;

/* A macro, so that mmap's caller is the map_* function itself. */
#define MAP_TOUCHED(var, n)                                                             \
    do {                                                                                \
        var = mmap(NULL, (n), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); \
        if (var == MAP_FAILED) _exit(2);                                                \
        touch(var, (n));                                                                \
    } while (0)

NOINLINE void map_move_target(void) { MAP_TOUCHED(move_target, 4 * MIB); }

NOINLINE void map_moved(void) { MAP_TOUCHED(moved, 2 * MIB); }

NOINLINE void move_over(void) {
    void *p = mremap(moved, 2 * MIB, 2 * MIB, MREMAP_MAYMOVE | MREMAP_FIXED, move_target);
    if (p != move_target) _exit(2);
}

NOINLINE void map_shared_target(void) { MAP_TOUCHED(shared_target, 4 * MIB); }

NOINLINE void move_shared_over(void) {
    int fd = memfd_create("heap_mmap", 0);
    if (fd < 0 || ftruncate(fd, 2 * MIB)) _exit(2);
    void *s = mmap(NULL, 2 * MIB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (s == MAP_FAILED) _exit(2);
    close(fd);
    void *p = mremap(s, 2 * MIB, 2 * MIB, MREMAP_MAYMOVE | MREMAP_FIXED, shared_target);
    if (p != shared_target) _exit(2);
    touch(p, 2 * MIB);
}

NOINLINE void run_round(void) {
    map_leak();
    map_churn();
    map_grow();
    map_trim();
    map_hole();
    map_file();
    big_malloc();
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "once")) {
        run_round();
        say("done\n");
        _exit(0);
    }
    say("ready\n");
    char line[64];
    while (read_line(line, sizeof line) >= 0) {
        if (!strncmp(line, "go ", 3)) {
            for (int r = atoi(line + 3); r > 0; r--) run_round();
            say("done\n");
        } else if (!strcmp(line, "overlay")) {
            map_overlaid();
            overlay_middle();
            overlay_start();
            overlay_end();
            say("overlaid\n");
        } else if (!strcmp(line, "unmap")) {
            munmap(overlaid, 8 * MIB);
            say("unmapped\n");
        } else if (!strcmp(line, "move")) {
            map_move_target();
            map_moved();
            move_over();
            map_shared_target();
            move_shared_over();
            say("moved\n");
        } else if (!strcmp(line, "sum")) {
            say_number("sum ", checksum);
        }
    }
    return 0;
}
