/* Stress test for a malloc implementation (run under LD_PRELOAD).
 *
 * usage: alloc_stress THREADS OPS_PER_THREAD [fork]
 *
 * Each thread does random malloc/calloc/realloc/memalign/posix_memalign/
 * aligned_alloc/free operations on its own slots and on a shared exchange
 * array (so objects are freed by other threads). Every block is filled
 * with a pattern derived from a unique tag and checked before it is freed
 * or resized: overlapping blocks, lost data in realloc, wrong alignment or
 * short usable sizes are reported and make the program exit 1. With
 * `fork`, the main thread forks children while the workers run; each child
 * allocates and frees, and must exit 0. Prints `ok OPS` at the end. */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define SLOTS 4096
#define EXCHANGE 1024

struct block {
    unsigned char *p;
    size_t size;
    uint64_t tag;
};

static _Atomic(struct block *) exchange_slots[EXCHANGE];
static atomic_int failures;
static atomic_int stop_forking;

static void fail(const char *what, size_t size) {
    fprintf(stderr, "alloc_stress: %s (size %zu)\n", what, size);
    atomic_fetch_add(&failures, 1);
}

static uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Blocks up to 16 KiB are filled and checked whole; larger ones at both
 * ends and every 64th byte, which still catches any overlap. */
static size_t step_for(size_t n, size_t i) {
    return n <= 16384 || i < 1024 || i + 1024 >= n ? 1 : 64;
}

static void fill(unsigned char *p, size_t n, uint64_t tag) {
    for (size_t i = 0; i < n; i += step_for(n, i)) p[i] = (unsigned char)(tag * 31 + i * 7);
}

static int check(const unsigned char *p, size_t n, uint64_t tag) {
    for (size_t i = 0; i < n; i += step_for(n, i))
        if (p[i] != (unsigned char)(tag * 31 + i * 7)) return 0;
    return 1;
}

/* Sizes: mostly small, some medium, a few large and huge. */
static size_t random_size(uint64_t *rng) {
    uint64_t r = rng_next(rng);
    switch (r % 16) {
    case 0: return r >> 40 & 0xffff;           /* up to 64 KiB */
    case 1: return (r >> 40) % (600 << 10);    /* up to 600 KiB */
    case 2: if ((r >> 20) % 256 == 0) return (r >> 40) % (3 << 20); /* huge */
            return (r >> 40) % 4096;
    default: return (r >> 40) % 1024;
    }
}

static void verify_new(unsigned char *p, size_t size, size_t align) {
    if (!p) { fail("allocation failed", size); return; }
    if ((uintptr_t)p % align) fail("misaligned", size);
    if (malloc_usable_size(p) < size) fail("usable size too small", size);
}

static void release(struct block *b) {
    if (!check(b->p, b->size, b->tag)) fail("block corrupted (overlap?)", b->size);
    free(b->p);
    b->p = NULL;
}

static void *worker(void *arg) {
    uint64_t rng = (uintptr_t)arg * 0x9e3779b97f4a7c15ull + 1;
    long ops = (long)((uintptr_t)arg >> 16);
    struct block *slots = calloc(SLOTS, sizeof *slots);
    uint64_t tag = (uintptr_t)arg << 32;
    for (long i = 0; i < ops; i++) {
        uint64_t r = rng_next(&rng);
        struct block *b = &slots[r % SLOTS];
        unsigned op = (r >> 32) % 10;
        if (b->p && op < 4) {
            release(b);
        } else if (b->p && op < 6) {
            /* realloc: the old contents must survive. */
            size_t n = random_size(&rng);
            unsigned char *q = realloc(b->p, n);
            if (n == 0) { b->p = NULL; continue; } /* glibc: freed */
            if (!q) { fail("realloc failed", n); continue; }
            size_t keep = n < b->size ? n : b->size;
            for (size_t k = 0; k < keep; k += step_for(b->size, k))
                if (q[k] != (unsigned char)(b->tag * 31 + k * 7)) { fail("realloc lost data", n); break; }
            verify_new(q, n, 16);
            b->p = q; b->size = n; b->tag = ++tag;
            fill(q, n, b->tag);
        } else if (b->p && op < 8) {
            /* Hand the block to another thread through the exchange. */
            struct block *h = malloc(sizeof *h);
            *h = *b;
            b->p = NULL;
            h = atomic_exchange(&exchange_slots[(r >> 8) % EXCHANGE], h);
            if (h) { release(h); free(h); }
        } else if (!b->p) {
            size_t n = random_size(&rng);
            size_t align = 16;
            unsigned char *p;
            switch (op) {
            case 0: case 1: case 2: p = malloc(n); break;
            case 3: p = calloc(1, n);
                for (size_t k = 0; p && k < n; k += step_for(n, k))
                    if (p[k]) { fail("calloc not zeroed", n); break; }
                break;
            case 4: align = (size_t)1 << (4 + (r >> 50) % 10); p = memalign(align, n); break;
            case 5: align = (size_t)1 << (3 + (r >> 50) % 14);
                if (posix_memalign((void **)&p, align, n)) p = NULL;
                if (align < 16) align = 8;
                break;
            case 6: align = 4096; p = aligned_alloc(align, n); break;
            default: p = malloc(n); break;
            }
            verify_new(p, n, align);
            if (!p) continue;
            b->p = p; b->size = n; b->tag = ++tag;
            fill(p, n, b->tag);
        }
    }
    for (int i = 0; i < SLOTS; i++)
        if (slots[i].p) release(&slots[i]);
    free(slots);
    return NULL;
}

static void *forker(void *arg) {
    (void)arg;
    int forks = 0;
    while (!atomic_load(&stop_forking) && forks < 20) {
        pid_t pid = fork();
        if (pid == 0) {
            /* The child can allocate, even though other threads were in
             * the allocator when it forked. */
            void *ptrs[1000];
            for (int i = 0; i < 1000; i++) { ptrs[i] = malloc(i * 13 + 1); memset(ptrs[i], 1, i * 13 + 1); }
            for (int i = 0; i < 1000; i++) free(ptrs[i]);
            char *s = strdup("child ok");
            _exit(strcmp(s, "child ok") != 0);
        }
        int status;
        if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail("forked child failed", 0);
        forks++;
        usleep(2000);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: alloc_stress THREADS OPS [fork]\n"); return 2; }
    int threads = atoi(argv[1]);
    long ops = atol(argv[2]);
    int do_fork = argc > 3 && strcmp(argv[3], "fork") == 0;
    pthread_t t[64], f;
    if (do_fork) pthread_create(&f, NULL, forker, NULL);
    for (int i = 0; i < threads && i < 64; i++)
        pthread_create(&t[i], NULL, worker, (void *)(((uintptr_t)ops << 16) | (uintptr_t)(i + 1)));
    for (int i = 0; i < threads && i < 64; i++) pthread_join(t[i], NULL);
    atomic_store(&stop_forking, 1);
    if (do_fork) pthread_join(f, NULL);
    for (int i = 0; i < EXCHANGE; i++) {
        struct block *h = atomic_load(&exchange_slots[i]);
        if (h) { release(h); free(h); }
    }
    if (atomic_load(&failures)) return 1;
    printf("ok %ld\n", ops * threads);
    return 0;
}
