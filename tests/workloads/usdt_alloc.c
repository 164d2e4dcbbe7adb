// A stand-in for "another allocator" with the OpenTelemetry memory
// probes: it wraps the C library's malloc, samples by itself (uniform byte
// distances in [1, 2 * MEAN], so that the mean is MEAN), remembers the
// sampled pointers and fires otel_memory:alloc(ptr, size, weight) and
// otel_memory:free(ptr) through <sys/sdt.h> (1-byte nop sites: a probe
// traps). weight = MEAN * (sampling points the allocation crossed).
//
// Built as a program:
//   usdt_alloc N SIZE MEAN [PLUGIN]: prints "ready", waits for a line on
//   stdin; with PLUGIN (this file built with -DPLUGIN -shared -fPIC), it
//   dlopens it, prints "loaded" and waits for another line. Then it
//   allocates N objects of SIZE bytes (and N of 64 bytes through the
//   plugin), frees every other one of each, prints
//   "sampled A freed F weight W live L program A0 F0 W0" (the probes it
//   fired, in both objects; L = the weight of the sampled objects still
//   live; A0 F0 W0 = the program's own part), waits for a line and exits.
//   usdt_alloc rate N MEAN: `cargo xtask bench preload`'s trap-site cell,
//   preload_bench.c's `rate N` through this sampler (the same computation,
//   sizes and live window); with PRELOAD_BENCH_WAIT set, prints "ready"
//   and waits for a line first. Prints "ops N seconds S bytes B", and
//   "sampled allocations: A" on stderr.
// Built with -DFLOAT_WEIGHT: the weight is passed as a double (`8f@`),
// against the contract.
// Built with -DPLUGIN: the same sampler in a library, whose alloc probe
// passes a constant size and the weight from a global (`-4@$64`,
// `8@last_weight(%rip)`): the argument forms other than registers.
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/sdt.h>

#define TABLE 65536
static void *sampled[TABLE];
static unsigned long sampled_weight[TABLE];
static long countdown, mean = 1;
static unsigned long rng = 0x9e3779b97f4a7c15UL;
static long n_alloc, n_free;
static unsigned long total_weight, live_weight;

static long distance(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return 1 + (long)(rng % (unsigned long)(2 * mean));
}

static unsigned slot_of(void *p) { return (unsigned)(((unsigned long)p >> 4) * 2654435761u) % TABLE; }

// The weight of `size` more bytes (0: not sampled).
static unsigned long sample(size_t size) {
    long crossed = 0;
    countdown -= (long)size;
    while (countdown <= 0) {
        crossed++;
        countdown += distance();
    }
    return (unsigned long)(crossed * mean);
}

static void remember(void *p, unsigned long weight) {
    unsigned i = slot_of(p);
    while (sampled[i]) i = (i + 1) % TABLE;
    sampled[i] = p;
    sampled_weight[i] = weight;
    n_alloc++;
    total_weight += weight;
    live_weight += weight;
}

// Whether p was sampled; forgets it if so.
static int forget(void *p) {
    for (unsigned i = slot_of(p); sampled[i]; i = (i + 1) % TABLE) {
        if (sampled[i] != p) continue;
        live_weight -= sampled_weight[i];
        // Backward-shift deletion keeps the probe chains intact.
        unsigned j = i;
        for (;;) {
            sampled[i] = 0;
            for (;;) {
                j = (j + 1) % TABLE;
                if (!sampled[j]) goto done;
                unsigned k = slot_of(sampled[j]);
                if ((j > i && (k <= i || k > j)) || (j < i && k <= i && k > j)) break;
            }
            sampled[i] = sampled[j];
            sampled_weight[i] = sampled_weight[j];
            i = j;
        }
    done:
        n_free++;
        return 1;
    }
    return 0;
}

#ifdef PLUGIN
static volatile unsigned long last_weight;

__attribute__((noinline)) void *plugin_alloc64(void) {
    void *p = malloc(64);
    unsigned long weight = sample(64);
    if (p && weight) {
        remember(p, weight);
        last_weight = weight;
        STAP_PROBE3(otel_memory, alloc, p, 64, last_weight);
    }
    return p;
}

__attribute__((noinline)) void plugin_free(void *p) {
    if (p && forget(p)) STAP_PROBE1(otel_memory, free, p);
    free(p);
}

void plugin_start(long m) {
    mean = m;
    rng = 0x2545f4914f6cdd1dUL;
    countdown = distance();
}

void plugin_stats(long *a, long *f, unsigned long *w, unsigned long *l) {
    *a += n_alloc; *f += n_free; *w += total_weight; *l += live_weight;
}
#else
__attribute__((noinline)) void *test_malloc(size_t size) {
    void *p = malloc(size);
    unsigned long weight = sample(size);
    if (p && weight) {
        remember(p, weight);
#ifdef FLOAT_WEIGHT
        STAP_PROBE3(otel_memory, alloc, p, size, (double)weight);
#else
        STAP_PROBE3(otel_memory, alloc, p, size, weight);
#endif
    }
    return p;
}

__attribute__((noinline)) void test_free(void *p) {
    if (p && forget(p)) STAP_PROBE1(otel_memory, free, p);
    free(p);
}

static unsigned long bench_rng = 88172645463325252UL;
static unsigned long bench_next(void) {
    bench_rng ^= bench_rng << 13; bench_rng ^= bench_rng >> 7; bench_rng ^= bench_rng << 17;
    return bench_rng;
}

// preload_bench.c's `rate` loop, allocating through test_malloc/test_free.
static int rate(long n) {
    void *live[4096] = {0};
    volatile unsigned long sink = 0;
    unsigned long bytes = 0;
    struct timespec t0, t1;
    if (getenv("PRELOAD_BENCH_WAIT")) {
        char line[16];
        printf("ready\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 3;
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) {
        unsigned long x = i;
        for (int j = 0; j < 8400; j++) x = x * 6364136223846793005UL + 1442695040888963407UL;
        sink += x;
        size_t size = 64 + (bench_next() & 1983);
        unsigned k = bench_next() & 4095;
        test_free(live[k]);
        live[k] = test_malloc(size);
        memset(live[k], 0, 64);
        bytes += size;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    for (int k = 0; k < 4096; k++) test_free(live[k]);
    double t = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("ops %ld seconds %.6f bytes %lu\n", n, t, bytes);
    fprintf(stderr, "sampled allocations: %ld\n", n_alloc);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "rate") == 0) {
        mean = atol(argv[3]);
        if (mean <= 0) return 2;
        countdown = distance();
        return rate(atol(argv[2]));
    }
    if (argc < 4) return 2;
    long n = atol(argv[1]);
    size_t size = (size_t)atol(argv[2]);
    mean = atol(argv[3]);
    if (n <= 0 || n > TABLE / 2 || mean <= 0) return 2;
    countdown = distance();
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 3;
    void *(*alloc64)(void) = 0;
    void (*pfree)(void *) = 0;
    void (*stats)(long *, long *, unsigned long *, unsigned long *) = 0;
    if (argc > 4) {
        void *lib = dlopen(argv[4], RTLD_NOW);
        if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 4; }
        void (*start)(long) = (void (*)(long))dlsym(lib, "plugin_start");
        alloc64 = (void *(*)(void))dlsym(lib, "plugin_alloc64");
        pfree = (void (*)(void *))dlsym(lib, "plugin_free");
        stats = (void (*)(long *, long *, unsigned long *, unsigned long *))dlsym(lib, "plugin_stats");
        if (!start || !alloc64 || !pfree || !stats) return 4;
        start(mean);
        printf("loaded\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 3;
    }
    void **objs = malloc(n * sizeof *objs);
    void **plugged = malloc(n * sizeof *plugged);
    for (long i = 0; i < n; i++) {
        objs[i] = test_malloc(size);
        plugged[i] = alloc64 ? alloc64() : 0;
    }
    for (long i = 0; i < n; i += 2) {
        test_free(objs[i]);
        if (pfree) pfree(plugged[i]);
    }
    long a = n_alloc, f = n_free;
    unsigned long w = total_weight, l = live_weight;
    if (stats) stats(&a, &f, &w, &l);
    printf("sampled %ld freed %ld weight %lu live %lu program %ld %ld %lu\n", a, f, w, l,
           n_alloc, n_free, total_weight);
    fflush(stdout);
    // Waits so that the profiler can read the end state.
    if (!fgets(line, sizeof line, stdin)) return 0;
    return 0;
}
#endif
