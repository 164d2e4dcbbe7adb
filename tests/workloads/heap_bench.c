/* malloc-heavy benchmark workload: several threads, mixed sizes.
 *
 * usage: heap_bench churn THREADS ITERATIONS
 *   prints "ready", waits for a line on stdin, then every thread runs
 *   ITERATIONS steps of: free the block in a slot of a 256-slot ring and
 *   malloc a new one of a size from a fixed mixed pattern (16 B .. 32 KiB).
 *   Prints "elapsed_ns N calls C" (C = malloc + free calls made) and waits
 *   for another line before exiting.
 * usage: heap_bench hold COUNT
 *   prints "ready", waits for a line, allocates COUNT 32-byte blocks and keeps
 *   them, prints "held", waits for a line and exits.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 256

static long iterations;
static const size_t sizes[16] = {16, 32, 48, 64, 96, 128, 256, 24, 512, 1024, 40, 2048, 80, 4096, 200, 32768};

static void *worker(void *arg) {
    void *ring[SLOTS] = {0};
    unsigned long seed = (unsigned long)arg * 2654435761u + 1;
    for (long i = 0; i < iterations; i++) {
        seed = seed * 6364136223846793005ul + 1442695040888963407ul;
        unsigned slot = (unsigned)(seed >> 33) % SLOTS;
        free(ring[slot]);
        size_t n = sizes[(seed >> 45) & 15];
        char *p = malloc(n);
        p[0] = (char)i;
        ring[slot] = p;
    }
    for (int s = 0; s < SLOTS; s++) free(ring[s]);
    return NULL;
}

static void wait_line(void) {
    char c;
    while (read(0, &c, 1) == 1 && c != '\n') {}
}

static void say(const char *s) {
    if (write(1, s, strlen(s)) < 0) _exit(1);
}

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000l + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "churn")) {
        int threads = atoi(argv[2]);
        iterations = atol(argv[3]);
        pthread_t tids[64];
        if (threads < 1 || threads > 64) return 2;
        say("ready\n");
        wait_line();
        long start = now_ns();
        for (long t = 0; t < threads; t++) pthread_create(&tids[t], NULL, worker, (void *)t);
        for (int t = 0; t < threads; t++) pthread_join(tids[t], NULL);
        long elapsed = now_ns() - start;
        char out[96];
        long calls = 2 * iterations * threads + SLOTS * threads;
        int len = 0;
        /* no stdio: format two numbers by hand */
        const char *parts[2] = {"elapsed_ns ", " calls "};
        long values[2] = {elapsed, calls};
        for (int k = 0; k < 2; k++) {
            size_t pl = strlen(parts[k]);
            memcpy(out + len, parts[k], pl);
            len += (int)pl;
            char digits[24];
            int n = 0;
            long v = values[k];
            do digits[n++] = (char)('0' + v % 10); while ((v /= 10) && n < 23);
            while (n) out[len++] = digits[--n];
        }
        out[len++] = '\n';
        if (write(1, out, len) < 0) return 1;
        wait_line();
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "hold")) {
        long count = atol(argv[2]);
        say("ready\n");
        wait_line();
        void **blocks = malloc(sizeof(void *) * count);
        for (long i = 0; i < count; i++) blocks[i] = malloc(32);
        say("held\n");
        wait_line();
        return blocks[0] == NULL;
    }
    say("usage: heap_bench churn THREADS ITERATIONS | hold COUNT\n");
    return 2;
}
