/* Known leaks, known churn and the allocator corner cases, on demand.
 *
 * usage: heap_leaks [ROUNDS]
 * With ROUNDS, runs that many rounds at once, prints "done" and exits
 * (launch mode). Otherwise:
 * Allocates PREALLOC blocks, starts a background churn thread and a consumer
 * thread, prints "ready" and then obeys stdin lines (raw read/write only, so
 * no stdio buffer is allocated while profiled):
 *   go R   runs R rounds, ROUND_US apart, then prints "done"
 *   sum    prints "sum N": a checksum of what the rounds wrote (the same
 *          with or without a profiler attached)
 *   exit   exits at once (_exit: no exit handlers run)
 *   quit   exits through exit(), so exit handlers run (a preloaded
 *          allocator's final heap profile)
 * Each round, by construction:
 *   leak_small      leaks SMALL_PER_ROUND blocks of 1000 bytes  (main;run_round;leak_path;leak_small)
 *   leak_calloc     leaks calloc(10, 300)        = 3000 bytes
 *   leak_big_calloc leaks calloc(1, 200000)      (glibc serves it by mmap)
 *   realloc_null    leaks realloc(NULL, 500)     (glibc's realloc calls malloc)
 *   realloc_zero    malloc(700) then realloc(p, 0): freed
 *   churn           CHURN blocks of 64 bytes, freed at once
 *   handoff         malloc(333) freed by the consumer thread
 *   cache_fill      (first CACHE_ROUNDS rounds only) keeps 2048 bytes in a
 *                   global cache that then stops growing
 *   free_prealloc   frees one block allocated before "ready"
 * and the background thread churns 48-byte blocks all the time.
 * Built with frame pointers and -fno-builtin; functions are noinline so the
 * call chains are exactly the ones above.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "line_io.h"

#define NOINLINE __attribute__((noinline))
#define SMALL_PER_ROUND 20
#define CHURN 1000
#define CACHE_ROUNDS 3
#define PREALLOC 1000
#define ROUND_US 50000

static void *volatile sink;
static unsigned long checksum;
static void *prealloc[PREALLOC];
static int prealloc_next;
static void *cache[4096];
static int cache_len;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static void *slot;

static void touch(void *p, size_t n) {
    memset(p, 1, n);
    checksum += n;
}

NOINLINE void leak_small(void) {
    void *p = malloc(1000);
    touch(p, 1000);
    sink = p;
}

NOINLINE void leak_path(void) {
    for (int i = 0; i < SMALL_PER_ROUND; i++) leak_small();
}

NOINLINE void leak_calloc(void) {
    void *p = calloc(10, 300);
    checksum += 3000;
    sink = p;
}

NOINLINE void leak_big_calloc(void) {
    void *p = calloc(1, 200000);
    checksum += 200000;
    sink = p;
}

NOINLINE void realloc_null(void) {
    void *p = realloc(NULL, 500);
    touch(p, 500);
    sink = p;
}

NOINLINE void realloc_zero(void) {
    void *p = malloc(700);
    touch(p, 700);
    sink = realloc(p, 0);
}

NOINLINE void churn(void) {
    for (int i = 0; i < CHURN; i++) {
        void *p = malloc(64);
        touch(p, 64);
        free(p);
    }
}

NOINLINE void handoff(void) {
    void *p = malloc(333);
    touch(p, 333);
    pthread_mutex_lock(&lock);
    slot = p;
    pthread_cond_broadcast(&cond);
    while (slot) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
}

NOINLINE void cache_fill(void) {
    void *p = malloc(2048);
    touch(p, 2048);
    cache[cache_len++ % 4096] = p;
}

NOINLINE void free_prealloc(void) {
    if (prealloc_next < PREALLOC) free(prealloc[prealloc_next++]);
}

NOINLINE void run_round(int round) {
    leak_path();
    leak_calloc();
    leak_big_calloc();
    realloc_null();
    realloc_zero();
    churn();
    handoff();
    if (round < CACHE_ROUNDS) cache_fill();
    free_prealloc();
}

static void *consumer(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    for (;;) {
        while (!slot) pthread_cond_wait(&cond, &lock);
        free(slot);
        slot = NULL;
        pthread_cond_broadcast(&cond);
    }
    return NULL;
}

NOINLINE void churn_background(void) {
    void *p = malloc(48);
    memset(p, 2, 48);
    free(p);
}

static void *background(void *arg) {
    (void)arg;
    for (;;) {
        churn_background();
        usleep(100);
    }
    return NULL;
}

NOINLINE void run_rounds(int rounds) {
    for (int r = 0; r < rounds; r++) {
        run_round(r);
        usleep(ROUND_US);
    }
}

int main(int argc, char **argv) {
    for (int i = 0; i < PREALLOC; i++) prealloc[i] = malloc(4000);
    pthread_t t;
    pthread_create(&t, NULL, consumer, NULL);
    pthread_create(&t, NULL, background, NULL);
    if (argc > 1) {
        run_rounds(atoi(argv[1]));
        say("done\n");
        _exit(0);
    }
    say("ready\n");
    char line[64];
    while (read_line(line, sizeof line) >= 0) {
        if (!strncmp(line, "go ", 3)) {
            run_rounds(atoi(line + 3));
            say("done\n");
        } else if (!strcmp(line, "sum")) {
            say_number("sum ", checksum);
        } else if (!strcmp(line, "exit")) {
            _exit(0);
        } else if (!strcmp(line, "quit")) {
            exit(0);
        }
    }
    return 0;
}
