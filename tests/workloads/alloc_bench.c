/* Allocator benchmarks, run under LD_PRELOAD of each allocator by
 * `cargo xtask bench alloc`. Prints `ops N seconds S` (N operations in S
 * seconds of wall time).
 *
 *   churn THREADS OPS   each thread replaces random slots of a 4096-slot
 *                       array with new 16-1024 byte objects
 *   prodcons OPS        one thread allocates 16-1024 byte objects, another
 *                       frees them (through a lock-free ring)
 *   larson ROUNDS OPS   generations of 2 threads inherit the previous
 *                       generation's objects (freed by a thread that did not
 *                       allocate them), like the larson server benchmark
 *   realloc ROUNDS      64 buffers grown by small appends to 1 MiB, and one
 *                       grown to 64 MiB */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

#define SLOTS 4096

struct churn_arg { long ops; uint64_t seed; void **slots; };

static void *churn(void *p) {
    struct churn_arg *a = p;
    void **slots = a->slots ? a->slots : calloc(SLOTS, sizeof(void *));
    uint64_t rng = a->seed;
    for (long i = 0; i < a->ops; i++) {
        uint64_t r = rng_next(&rng);
        size_t k = r % SLOTS;
        free(slots[k]);
        size_t n = 16 + (r >> 32) % 1009;
        char *o = malloc(n);
        o[0] = (char)i; /* touch it, as a real program would */
        slots[k] = o;
    }
    if (!a->slots) {
        for (int k = 0; k < SLOTS; k++) free(slots[k]);
        free(slots);
    }
    return NULL;
}

/* Producer/consumer: batches of 256 objects handed over through a ring of
 * 64 batch slots (a thread waits with sched_yield, so the benchmark does
 * not depend on both threads having a CPU). */
#define RING 64
#define BATCH 256
static _Atomic(void **) ring[RING];

static void *producer(void *p) {
    long batches = *(long *)p / BATCH;
    uint64_t rng = 88172645463325252ull;
    for (long i = 0; i < batches; i++) {
        void **batch = malloc(BATCH * sizeof(void *));
        for (int k = 0; k < BATCH; k++) {
            size_t n = 16 + (rng_next(&rng) >> 32) % 1009;
            char *o = malloc(n);
            o[0] = 1;
            batch[k] = o;
        }
        _Atomic(void **) *slot = &ring[i % RING];
        while (atomic_load_explicit(slot, memory_order_acquire)) sched_yield();
        atomic_store_explicit(slot, batch, memory_order_release);
    }
    return NULL;
}

static void *consumer(void *p) {
    long batches = *(long *)p / BATCH;
    for (long i = 0; i < batches; i++) {
        _Atomic(void **) *slot = &ring[i % RING];
        void **batch;
        while (!(batch = atomic_load_explicit(slot, memory_order_acquire))) sched_yield();
        atomic_store_explicit(slot, NULL, memory_order_release);
        for (int k = 0; k < BATCH; k++) free(batch[k]);
        free(batch);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: alloc_bench churn|prodcons|larson|realloc ARGS\n"); return 2; }
    const char *mode = argv[1];
    double t0 = now();
    long total = 0;
    if (!strcmp(mode, "churn") && argc > 3) {
        int threads = atoi(argv[2]);
        long ops = atol(argv[3]);
        pthread_t t[16];
        struct churn_arg a[16];
        for (int i = 0; i < threads; i++) {
            a[i] = (struct churn_arg){ops, 0x9e3779b97f4a7c15ull * (i + 1), NULL};
            pthread_create(&t[i], NULL, churn, &a[i]);
        }
        for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
        total = ops * threads;
    } else if (!strcmp(mode, "prodcons")) {
        long ops = atol(argv[2]);
        pthread_t p, c;
        pthread_create(&p, NULL, producer, &ops);
        pthread_create(&c, NULL, consumer, &ops);
        pthread_join(p, NULL);
        pthread_join(c, NULL);
        total = ops / BATCH * BATCH;
    } else if (!strcmp(mode, "larson") && argc > 3) {
        int rounds = atoi(argv[2]);
        long ops = atol(argv[3]);
        void **slots[2] = {calloc(SLOTS, sizeof(void *)), calloc(SLOTS, sizeof(void *))};
        for (int r = 0; r < rounds; r++) {
            pthread_t t[2];
            struct churn_arg a[2];
            for (int i = 0; i < 2; i++) {
                /* Each generation takes the other thread's slots. */
                a[i] = (struct churn_arg){ops, 0x2545f4914f6cdd1dull * (r * 2 + i + 1), slots[(i + r) % 2]};
                pthread_create(&t[i], NULL, churn, &a[i]);
            }
            for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
        }
        for (int i = 0; i < 2; i++) {
            for (int k = 0; k < SLOTS; k++) free(slots[i][k]);
            free(slots[i]);
        }
        total = (long)rounds * ops * 2;
    } else if (!strcmp(mode, "realloc")) {
        int rounds = atoi(argv[2]);
        uint64_t rng = 1;
        for (int r = 0; r < rounds; r++) {
            char *buf[64] = {0};
            size_t len[64] = {0};
            for (int step = 0; step < 20000; step++) {
                for (int b = 0; b < 64; b++) {
                    if (len[b] >= (1 << 20)) continue;
                    size_t add = 1 + (rng_next(&rng) >> 40) % 100;
                    buf[b] = realloc(buf[b], len[b] + add);
                    memset(buf[b] + len[b], b, add);
                    len[b] += add;
                    total++;
                }
            }
            for (int b = 0; b < 64; b++) free(buf[b]);
            char *big = NULL;
            for (size_t n = 4096; n <= (64 << 20); n += n / 8) {
                big = realloc(big, n);
                big[n - 1] = 1;
                total++;
            }
            free(big);
        }
    } else {
        fprintf(stderr, "alloc_bench: unknown mode %s\n", mode);
        return 2;
    }
    printf("ops %ld seconds %.6f\n", total, now() - t0);
    return 0;
}
