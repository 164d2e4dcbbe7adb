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
 *                       grown to 64 MiB
 *   xmalloc THREADS OPS a ring of threads: each allocates batches and hands
 *                       them to the next, and frees what the previous one
 *                       handed it (every object freed by a foreign thread)
 *   scratch THREADS OPS cache-scratch: each thread frees an object the main
 *                       thread allocated, then allocates, writes and frees
 *                       small objects (neighbouring objects handed to
 *                       different threads share cache lines)
 *   threads COUNT OPS   COUNT short-lived threads, two at a time, each doing
 *                       OPS random-size malloc/free pairs
 *   frag SCALE          phases of different sizes, each freeing most of the
 *                       previous; also prints `final_rss_kib K live_kib L`
 *                       (resident and live at the end) */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

/* xmalloc: thread i hands batches to thread i+1 through a one-slot-per-
 * batch ring; while its push waits it frees what it was handed, so the
 * ring cannot deadlock. */
#define XMAX 8
struct xthread { _Atomic(void **) inbox[RING]; long in_pos; };
static struct xthread xthreads[XMAX];
static int xcount;
static long xbatches;

static int xdrain_one(struct xthread *me) {
    _Atomic(void **) *slot = &me->inbox[me->in_pos % RING];
    void **batch = atomic_load_explicit(slot, memory_order_acquire);
    if (!batch) return 0;
    atomic_store_explicit(slot, NULL, memory_order_release);
    for (int k = 0; k < BATCH; k++) free(batch[k]);
    free(batch);
    me->in_pos++;
    return 1;
}

static void *xmalloc_thread(void *p) {
    long i = (long)p;
    struct xthread *me = &xthreads[i], *next = &xthreads[(i + 1) % xcount];
    uint64_t rng = 0x9e3779b97f4a7c15ull * (i + 1);
    for (long b = 0; b < xbatches; b++) {
        void **batch = malloc(BATCH * sizeof(void *));
        for (int k = 0; k < BATCH; k++) {
            char *o = malloc(16 + (rng_next(&rng) >> 32) % 241);
            o[0] = 1;
            batch[k] = o;
        }
        _Atomic(void **) *slot = &next->inbox[b % RING];
        while (atomic_load_explicit(slot, memory_order_acquire))
            if (!xdrain_one(me)) sched_yield();
        atomic_store_explicit(slot, batch, memory_order_release);
        xdrain_one(me);
    }
    while (me->in_pos < xbatches)
        if (!xdrain_one(me)) sched_yield();
    return NULL;
}

struct scratch_arg { char *handed; long ops; };
static void *scratch_thread(void *p) {
    struct scratch_arg *a = p;
    free(a->handed);
    for (long i = 0; i < a->ops / 64; i++) {
        volatile char *o = malloc(16);
        for (int w = 0; w < 64; w++) o[w % 16] += (char)w;
        free((void *)o);
    }
    return NULL;
}

struct short_arg { long ops; uint64_t seed; };
static void *short_thread(void *p) {
    struct short_arg *a = p;
    uint64_t rng = a->seed;
    void *keep[32] = {0};
    for (long i = 0; i < a->ops; i++) {
        uint64_t r = rng_next(&rng);
        free(keep[r % 32]);
        char *o = malloc(16 + (r >> 32) % 2000);
        o[0] = 1;
        keep[r % 32] = o;
    }
    for (int k = 0; k < 32; k++) free(keep[k]);
    return NULL;
}

static long rss_kib(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

/* Phases of small, medium and page-sized objects; each allocates SCALE MiB
 * and frees 90% of the previous phase's objects, at random. */
static long frag(int scale, long *live_bytes) {
    static const size_t lo[3] = {16, 200, 3000}, span[3] = {48, 800, 9000};
    void **prev = NULL;
    size_t *prev_size = NULL;
    long prev_n = 0, ops = 0, live = 0;
    uint64_t rng = 7;
    for (int phase = 0; phase < 6; phase++) {
        int kind = phase % 3;
        long n = (long)scale * (1 << 20) / (long)(lo[kind] + span[kind] / 2);
        void **cur = malloc(n * sizeof(void *));
        size_t *cur_size = malloc(n * sizeof(size_t));
        for (long i = 0; i < n; i++) {
            cur_size[i] = lo[kind] + (rng_next(&rng) >> 32) % span[kind];
            cur[i] = malloc(cur_size[i]);
            memset(cur[i], 1, cur_size[i] < 64 ? cur_size[i] : 64);
            live += cur_size[i];
            ops++;
        }
        for (long i = 0; i < prev_n; i++) {
            if (prev[i] && rng_next(&rng) % 10 != 0) {
                free(prev[i]);
                live -= prev_size[i];
                prev[i] = NULL;
                ops++;
            }
        }
        /* The survivors of older phases stay live to the end. */
        free(prev_size);
        prev = cur, prev_size = cur_size, prev_n = n;
    }
    for (long i = 0; i < prev_n; i++) {
        if (rng_next(&rng) % 10 != 0) {
            free(prev[i]);
            live -= prev_size[i];
            ops++;
        }
    }
    *live_bytes = live;
    return ops;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: alloc_bench churn|prodcons|larson|realloc|xmalloc|scratch|threads|frag ARGS\n"); return 2; }
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
    } else if (!strcmp(mode, "xmalloc") && argc > 3) {
        xcount = atoi(argv[2]);
        if (xcount < 2 || xcount > XMAX) { fprintf(stderr, "alloc_bench: xmalloc wants 2-%d threads\n", XMAX); return 2; }
        xbatches = atol(argv[3]) / BATCH / xcount;
        pthread_t t[XMAX];
        for (long i = 0; i < xcount; i++) pthread_create(&t[i], NULL, xmalloc_thread, (void *)i);
        for (int i = 0; i < xcount; i++) pthread_join(t[i], NULL);
        total = xbatches * BATCH * xcount;
    } else if (!strcmp(mode, "scratch") && argc > 3) {
        int threads = atoi(argv[2]);
        long ops = atol(argv[3]);
        pthread_t t[16];
        struct scratch_arg a[16];
        if (threads < 1 || threads > 16) { fprintf(stderr, "alloc_bench: scratch wants 1-16 threads\n"); return 2; }
        for (int i = 0; i < threads; i++) a[i] = (struct scratch_arg){malloc(16), ops};
        for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, scratch_thread, &a[i]);
        for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
        total = ops / 64 * threads;
    } else if (!strcmp(mode, "threads") && argc > 3) {
        long count = atol(argv[2]), ops = atol(argv[3]);
        for (long i = 0; i + 1 < count; i += 2) {
            pthread_t t[2];
            struct short_arg a[2] = {{ops, 0x2545f4914f6cdd1dull * (i + 1)}, {ops, 0x9e3779b97f4a7c15ull * (i + 2)}};
            for (int k = 0; k < 2; k++) pthread_create(&t[k], NULL, short_thread, &a[k]);
            for (int k = 0; k < 2; k++) pthread_join(t[k], NULL);
        }
        total = count / 2 * 2 * ops;
    } else if (!strcmp(mode, "frag")) {
        long live = 0;
        total = frag(atoi(argv[2]), &live);
        printf("final_rss_kib %ld live_kib %ld ", rss_kib(), live / 1024);
    } else {
        fprintf(stderr, "alloc_bench: unknown mode %s\n", mode);
        return 2;
    }
    printf("ops %ld seconds %.6f\n", total, now() - t0);
    return 0;
}
