/* Memory given back.
 *   alloc_release        allocates 800 MiB in 4 KiB objects, frees the first
 *                        90% of them (whole spans become free), calls
 *                        malloc_trim(0) and prints `base_kib B live_kib L
 *                        before_kib R0 after_kib R1`: resident KiB before
 *                        allocating, live KiB, resident KiB before and after
 *                        the trim.
 *   alloc_release active the same without the trim: allocates and frees one
 *                        object every 10 ms for at most 10 s, until the heap
 *                        is within 1.2x of the live bytes; prints `base_kib B
 *                        live_kib L before_kib R0 ms T final_kib R1`.
 *   alloc_release decay  frees 3 MiB of 384 KiB blocks (less than any
 *                        size-driven release), then keeps allocating and
 *                        freeing one such block every 10 ms for at most 10 s,
 *                        until the freed memory left the resident set; prints
 *                        `base_kib B freed_kib F held_kib H ms T
 *                        final_kib R`: resident KiB before, freed, resident
 *                        KiB above the base just after the frees, the time
 *                        it took and resident KiB above the base at the end.
 *   alloc_release idle S allocates 80 MiB in 1 MiB blocks, frees the first
 *                        90% of them, then makes no allocator call while it
 *                        polls its resident set every 50 ms, for at most S
 *                        seconds or until the heap is within 1.2x of the
 *                        live bytes; prints `base_kib B live_kib L held_kib H
 *                        ms T final_kib R` (resident KiB above the base just
 *                        after the frees and at the end). Then a forked
 *                        child trims the inherited free pages, does the
 *                        same and prints its line prefixed `child `. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

static long rss_kib(void) {
    long pages = 0, resident = -1;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One allocator call of a busy program: allocates, touches and frees a
 * block of `size` bytes; 1 (with a message) when out of memory. */
static int call_allocator(size_t size) {
    char *p = malloc(size);
    if (!p) { fprintf(stderr, "alloc_release: out of memory\n"); return 1; }
    p[0] = 1;
    free(p);
    return 0;
}

static int decay(void) {
    enum { SIZE = 384 << 10, N = 8 };
    static char *blocks[N];
    long base = rss_kib();
    for (int i = 0; i < N; i++) {
        blocks[i] = malloc(SIZE);
        if (!blocks[i]) { fprintf(stderr, "alloc_release: out of memory\n"); return 1; }
        memset(blocks[i], 1, SIZE);
    }
    for (int i = 0; i < N; i++) free(blocks[i]);
    long held = rss_kib() - base;
    double start = now(), seconds = 0;
    long final = held;
    while (seconds < 10) {
        if (call_allocator(SIZE)) return 1;
        final = rss_kib() - base;
        seconds = now() - start;
        if (final * 4 < (long)N * SIZE / 1024) break;
        usleep(10000);
    }
    printf("base_kib %ld freed_kib %ld held_kib %ld ms %ld final_kib %ld\n", base,
           (long)N * SIZE / 1024, held, (long)(seconds * 1000), final);
    return 0;
}

/* Resident KiB, read without calling the allocator. */
static long rss_kib_raw(void) {
    char buf[128];
    int fd = open("/proc/self/statm", O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = buf;
    strtol(p, &p, 10);
    return strtol(p, NULL, 10) * (sysconf(_SC_PAGESIZE) / 1024);
}

static int idle(double limit, const char *prefix) {
    enum { SIZE = 1 << 20, N = 80 };
    static char *blocks[N];
    long base = rss_kib_raw();
    for (int i = 0; i < N; i++) {
        blocks[i] = malloc(SIZE);
        if (!blocks[i]) { fprintf(stderr, "alloc_release: out of memory\n"); return 1; }
        memset(blocks[i], 1, SIZE);
    }
    int keep_from = N - N / 10;
    for (int i = 0; i < keep_from; i++) free(blocks[i]);
    long live = (long)(N - keep_from) * SIZE / 1024;
    long held = rss_kib_raw() - base, final = held;
    double start = now(), seconds = 0;
    while (seconds < limit) {
        final = rss_kib_raw() - base;
        seconds = now() - start;
        if (final * 10 <= live * 12) break;
        usleep(50000);
    }
    printf("%sbase_kib %ld live_kib %ld held_kib %ld ms %ld final_kib %ld\n", prefix, base,
           live, held, (long)(seconds * 1000), final);
    fflush(stdout);
    for (int i = keep_from; i < N; i++) free(blocks[i]);
    return 0;
}

static int idle_and_fork(double limit) {
    if (idle(limit, "")) return 1;
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 1; }
    if (pid == 0) {
        malloc_trim(0); /* the parent's free pages are not the child's heap */
        _exit(idle(limit, "child "));
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status)) {
        fprintf(stderr, "alloc_release: child failed (status %d)\n", status);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    enum { SIZE = 4096, N = 800 * 256 };
    if (argc > 1 && strcmp(argv[1], "decay") == 0) return decay();
    if (argc > 2 && strcmp(argv[1], "idle") == 0) return idle_and_fork(atof(argv[2]));
    static char *objs[N];
    long base = rss_kib();
    for (int i = 0; i < N; i++) {
        objs[i] = malloc(SIZE);
        if (!objs[i]) { fprintf(stderr, "alloc_release: out of memory\n"); return 1; }
        memset(objs[i], 1, SIZE);
    }
    int keep_from = N - N / 10;
    for (int i = 0; i < keep_from; i++) free(objs[i]);
    long before = rss_kib();
    long live = (long)(N - keep_from) * SIZE / 1024;
    if (argc > 1 && strcmp(argv[1], "active") == 0) {
        /* No trim: the program keeps calling the allocator, one 4 KiB
         * object every 10 ms, for at most 10 s or until the heap is
         * within 1.2x of the live bytes. */
        double start = now(), seconds = 0;
        long final = before;
        while (seconds < 10) {
            if (call_allocator(SIZE)) return 1;
            final = rss_kib();
            seconds = now() - start;
            if ((final - base) * 10 <= live * 12) break;
            usleep(10000);
        }
        printf("base_kib %ld live_kib %ld before_kib %ld ms %ld final_kib %ld\n", base, live,
               before, (long)(seconds * 1000), final);
    } else {
        malloc_trim(0);
        long after = rss_kib();
        printf("base_kib %ld live_kib %ld before_kib %ld after_kib %ld\n", base, live, before,
               after);
    }
    for (int i = keep_from; i < N; i++) free(objs[i]);
    return 0;
}
