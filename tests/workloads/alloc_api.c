/* Checks of a preloaded malloc that need a C program. One mode per run:
 *
 *   dladdr       print the object that defines malloc, free and new
 *   stats        allocate a known live set, print profalloc_stats' in-use
 *                delta and the expected bytes (run with the sampler off)
 *   threads      threads fill their caches and exit; print the cached bytes
 *                while they run and after they exited
 *   sampled      allocate 64 MiB in small objects; print the sample count
 *   signal       allocate in a loop while a 20 kHz timer signal's handler
 *                allocates and frees too; print `ok` (a deadlock hangs)
 *   api          glibc API corner cases; print `ok` or the failed check
 *   double-free  free the same object twice (must abort)
 *   foreign      free a stack address (must abort)
 *
 * A constructor allocates before main, as many libraries do. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

struct profalloc_stats {
    uint64_t in_use, thread_caches, central, page_heap, returned, mapped, metadata, sampled;
};

static struct profalloc_stats get_stats(void) {
    static void (*fn)(struct profalloc_stats *);
    struct profalloc_stats s = {0};
    if (!fn) fn = (void (*)(struct profalloc_stats *))dlsym(RTLD_DEFAULT, "profalloc_stats");
    if (!fn) { fprintf(stderr, "alloc_api: profalloc_stats not found (not preloaded?)\n"); exit(2); }
    fn(&s);
    return s;
}

static char *early;
__attribute__((constructor)) static void before_main(void) {
    early = strdup("allocated before main");
}

#define CHECK(cond) do { if (!(cond)) { printf("FAILED %s (line %d)\n", #cond, __LINE__); return 1; } } while (0)

static int api(void) {
    CHECK(strcmp(early, "allocated before main") == 0);
    free(NULL);
    void *p = malloc(0);
    CHECK(p != NULL);
    free(p);
    /* realloc(p, 0) frees and returns NULL, as glibc does. */
    p = malloc(10);
    CHECK(realloc(p, 0) == NULL);
    p = realloc(NULL, 0);
    CHECK(p != NULL);
    free(p);
    errno = 0;
    CHECK(calloc(SIZE_MAX / 2, 3) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(malloc(SIZE_MAX - 4096) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(reallocarray(NULL, SIZE_MAX / 2, 3) == NULL && errno == ENOMEM);
    p = reallocarray(NULL, 10, 10);
    CHECK(p != NULL && malloc_usable_size(p) >= 100);
    free(p);
    CHECK(malloc_usable_size(NULL) == 0);
    CHECK(posix_memalign(&p, 3, 10) == EINVAL);
    CHECK(posix_memalign(&p, 4, 10) == EINVAL);
    CHECK(posix_memalign(&p, 1 << 20, 10) == 0 && (uintptr_t)p % (1 << 20) == 0);
    free(p);
    errno = 0;
    CHECK(aligned_alloc(24, 48) == NULL && errno == EINVAL);
    p = aligned_alloc(64, 100);
    CHECK(p && (uintptr_t)p % 64 == 0);
    free(p);
    p = memalign(48, 100); /* rounded up to 64, as glibc does */
    CHECK(p && (uintptr_t)p % 64 == 0);
    free(p);
    p = valloc(5000);
    CHECK(p && (uintptr_t)p % 4096 == 0);
    free(p);
    p = pvalloc(5000);
    CHECK(p && (uintptr_t)p % 4096 == 0 && malloc_usable_size(p) >= 8192);
    free(p);
    CHECK(mallopt(M_ARENA_MAX, 1) == 1);
    p = malloc(1 << 20);
    struct mallinfo2 mi = mallinfo2();
    CHECK(mi.uordblks >= 1 << 20);
    free(p);
    for (int i = 0; i < 1000; i++) free(malloc(100000));
    CHECK(malloc_trim(0) == 1);
    free(early);
    printf("ok\n");
    return 0;
}

static int stats(void) {
    enum { SMALL = 1000, MEDIUM = 20, HUGE = 3 };
    static void *small[SMALL], *medium[MEDIUM], *huge[HUGE];
    printf("start\n");
    fflush(stdout);
    struct profalloc_stats before = get_stats();
    /* Sizes that are exact size classes / page multiples, so the
     * allocator's rounding adds nothing. */
    for (int i = 0; i < SMALL; i++) small[i] = malloc(i % 2 ? 4096 : 64);
    for (int i = 0; i < MEDIUM; i++) medium[i] = malloc(50 * 8192);
    for (int i = 0; i < HUGE; i++) huge[i] = malloc(4 << 20);
    struct profalloc_stats during = get_stats();
    uint64_t expected = (uint64_t)SMALL / 2 * (4096 + 64) + MEDIUM * 50 * 8192 + HUGE * (4 << 20);
    for (int i = 0; i < SMALL; i++) free(small[i]);
    for (int i = 0; i < MEDIUM; i++) free(medium[i]);
    for (int i = 0; i < HUGE; i++) free(huge[i]);
    struct profalloc_stats after = get_stats();
    printf("live %llu expected %llu\n", (unsigned long long)(during.in_use - before.in_use),
           (unsigned long long)expected);
    printf("after %lld\n", (long long)(after.in_use - before.in_use));
    return 0;
}

static pthread_barrier_t barrier;
static void *cache_filler(void *arg) {
    (void)arg;
    void *p[2000];
    for (int i = 0; i < 2000; i++) p[i] = malloc(100);
    for (int i = 0; i < 2000; i++) free(p[i]);
    pthread_barrier_wait(&barrier); /* caches full */
    pthread_barrier_wait(&barrier); /* main has measured */
    return NULL;
}

static int threads(void) {
    enum { N = 4 };
    pthread_t t[N];
    pthread_barrier_init(&barrier, NULL, N + 1);
    for (int i = 0; i < N; i++) pthread_create(&t[i], NULL, cache_filler, NULL);
    pthread_barrier_wait(&barrier);
    struct profalloc_stats running = get_stats();
    pthread_barrier_wait(&barrier);
    for (int i = 0; i < N; i++) pthread_join(t[i], NULL);
    struct profalloc_stats exited = get_stats();
    printf("running %llu exited %llu\n", (unsigned long long)running.thread_caches,
           (unsigned long long)exited.thread_caches);
    return 0;
}

static int sampled(void) {
    for (int i = 0; i < (64 << 20) / 64; i++) free(malloc(64));
    printf("sampled %llu\n", (unsigned long long)get_stats().sampled);
    return 0;
}

static volatile sig_atomic_t handled;
static void on_alarm(int sig) {
    (void)sig;
    /* Sizes from several tiers: small, large (page heap lock), huge. */
    static const size_t sizes[] = {24, 700, 9000, 300000, 2 << 20};
    void *p = malloc(sizes[handled % 5]);
    if (p) memset(p, 1, 16);
    free(p);
    handled++;
}

static int signal_mode(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 50}, {0, 50}};
    setitimer(ITIMER_REAL, &it, NULL);
    void *keep[256] = {0};
    for (long i = 0; i < 3000000 && handled < 20000; i++) {
        size_t n = (i * 7919) % 5 == 0 ? 200000 + i % 100000 : 16 + i % 2000;
        int k = i % 256;
        free(keep[k]);
        keep[k] = malloc(n);
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    for (int k = 0; k < 256; k++) free(keep[k]);
    printf("ok %d\n", handled > 0);
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "dladdr")) {
        Dl_info info;
        void *new_fn = dlsym(RTLD_DEFAULT, "_Znwm");
        if (dladdr((void *)malloc, &info)) printf("malloc %s\n", info.dli_fname);
        if (dladdr((void *)free, &info)) printf("free %s\n", info.dli_fname);
        if (new_fn && dladdr(new_fn, &info)) printf("new %s\n", info.dli_fname);
        return 0;
    }
    if (!strcmp(mode, "api")) return api();
    if (!strcmp(mode, "stats")) return stats();
    if (!strcmp(mode, "threads")) return threads();
    if (!strcmp(mode, "sampled")) return sampled();
    if (!strcmp(mode, "signal")) return signal_mode();
    if (!strcmp(mode, "double-free")) {
        char *p = malloc(64);
        free(p);
        free(p);
        printf("survived\n");
        return 0;
    }
    if (!strcmp(mode, "foreign")) {
        char buf[64];
        free(buf + 16);
        printf("survived\n");
        return 0;
    }
    fprintf(stderr, "usage: alloc_api dladdr|api|stats|threads|sampled|signal|double-free|foreign\n");
    return 2;
}
