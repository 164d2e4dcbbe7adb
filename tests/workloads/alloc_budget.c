/* The thread caches' budget.
 *   alloc_budget THREADS        THREADS threads each allocate 3000 objects of
 *                               16-1024 bytes and free them all (filling their
 *                               caches), then wait while the main thread reads
 *                               the allocator's statistics. Prints `threads N
 *                               cached_bytes B` (B: bytes in all thread caches
 *                               then).
 *   alloc_budget steal THREADS  THREADS threads each allocate 3000 such objects
 *                               and keep them (their caches reserve budget but
 *                               hold little), then wait, idle; 300 ms later one
 *                               more thread allocates and frees 3000 and waits. Prints
 *                               `idle_cached_bytes I cached_bytes B`: bytes in
 *                               all thread caches before and after it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct profalloc_stats {
    uint64_t in_use, thread_caches, central, page_heap, returned, mapped, metadata, sampled;
};

static pthread_barrier_t filled, done, late_done, late_exit;

static void *fill(void *arg) {
    uint64_t rng = 0x9e3779b97f4a7c15ull * ((uintptr_t)arg + 1);
    enum { N = 3000 };
    static __thread void *objs[N];
    for (int i = 0; i < N; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        objs[i] = malloc(16 + rng % 1009);
        ((char *)objs[i])[0] = 1;
    }
    for (int i = 0; i < N; i++) free(objs[i]);
    pthread_barrier_wait(&filled);
    pthread_barrier_wait(&done);
    return NULL;
}

static void *hoard(void *arg) {
    uint64_t rng = 0x9e3779b97f4a7c15ull * ((uintptr_t)arg + 1);
    enum { N = 3000 };
    static __thread void *objs[N];
    for (int i = 0; i < N; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        objs[i] = malloc(16 + rng % 1009);
        ((char *)objs[i])[0] = 1;
    }
    pthread_barrier_wait(&filled);
    pthread_barrier_wait(&done);
    for (int i = 0; i < N; i++) free(objs[i]);
    return NULL;
}

static void *churn_once(void *arg) {
    (void)arg;
    uint64_t rng = 12345;
    enum { N = 3000 };
    static __thread void *objs[N];
    for (int i = 0; i < N; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        objs[i] = malloc(16 + rng % 1009);
        ((char *)objs[i])[0] = 1;
    }
    for (int i = 0; i < N; i++) free(objs[i]);
    /* Stay alive (an exiting thread flushes its cache) while main reads. */
    pthread_barrier_wait(&late_done);
    pthread_barrier_wait(&late_exit);
    return NULL;
}

static int steal(int threads, void (*stats)(struct profalloc_stats *)) {
    pthread_barrier_init(&filled, NULL, threads + 1);
    pthread_barrier_init(&done, NULL, threads + 1);
    pthread_barrier_init(&late_done, NULL, 2);
    pthread_barrier_init(&late_exit, NULL, 2);
    pthread_t *t = calloc(threads, sizeof *t), late;
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&t[i], NULL, hoard, (void *)(uintptr_t)i)) { fprintf(stderr, "alloc_budget: pthread_create failed\n"); return 1; }
    }
    pthread_barrier_wait(&filled);
    usleep(300 * 1000);
    struct profalloc_stats before, after;
    stats(&before);
    if (pthread_create(&late, NULL, churn_once, NULL)) { fprintf(stderr, "alloc_budget: pthread_create failed\n"); return 1; }
    pthread_barrier_wait(&late_done);
    stats(&after);
    pthread_barrier_wait(&late_exit);
    pthread_join(late, NULL);
    pthread_barrier_wait(&done);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    printf("idle_cached_bytes %llu cached_bytes %llu\n", (unsigned long long)before.thread_caches,
           (unsigned long long)after.thread_caches);
    return 0;
}

int main(int argc, char **argv) {
    int stealing = argc > 1 && strcmp(argv[1], "steal") == 0;
    if (stealing) argv++, argc--;
    int threads = argc > 1 ? atoi(argv[1]) : 0;
    if (threads < 1 || threads > 1024) { fprintf(stderr, "usage: alloc_budget THREADS (1-1024)\n"); return 2; }
    void (*stats)(struct profalloc_stats *) =
        (void (*)(struct profalloc_stats *))dlsym(RTLD_DEFAULT, "profalloc_stats");
    if (!stats) { fprintf(stderr, "alloc_budget: profalloc_stats not found (not preloaded?)\n"); return 2; }
    if (stealing) return steal(threads, stats);
    pthread_barrier_init(&filled, NULL, threads + 1);
    pthread_barrier_init(&done, NULL, threads + 1);
    pthread_t *t = calloc(threads, sizeof *t);
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&t[i], NULL, fill, (void *)(uintptr_t)i)) { fprintf(stderr, "alloc_budget: pthread_create failed\n"); return 1; }
    }
    pthread_barrier_wait(&filled);
    struct profalloc_stats s;
    stats(&s);
    pthread_barrier_wait(&done);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    printf("threads %d cached_bytes %llu\n", threads, (unsigned long long)s.thread_caches);
    return 0;
}
