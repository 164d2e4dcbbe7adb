// A stand-in for "another allocator" with the OpenTelemetry memory
// probes: it wraps the C library's malloc, samples by itself (uniform byte
// distances in [1, 2 * MEAN], so that the mean is MEAN), remembers the
// sampled pointers and fires otel_memory:alloc(ptr, size, weight) and
// otel_memory:free(ptr) through <sys/sdt.h> (1-byte nop sites: a probe
// traps). weight = MEAN * (sampling points the allocation crossed).
//   usdt_alloc N SIZE MEAN: prints "ready", waits for a line on stdin,
//   allocates N objects of SIZE bytes, frees every other one, then prints
//   "sampled A freed F weight W" (the probes it fired) and exits.
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/sdt.h>

#define TABLE 65536
static void *sampled[TABLE];
static long countdown, mean;
static unsigned long rng = 0x9e3779b97f4a7c15UL;
static long n_alloc, n_free;
static unsigned long total_weight;

static long distance(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return 1 + (long)(rng % (unsigned long)(2 * mean));
}

static unsigned slot_of(void *p) { return (unsigned)(((unsigned long)p >> 4) * 2654435761u) % TABLE; }

__attribute__((noinline)) void *test_malloc(size_t size) {
    void *p = malloc(size);
    long crossed = 0;
    countdown -= (long)size;
    while (countdown <= 0) {
        crossed++;
        countdown += distance();
    }
    if (p && crossed) {
        unsigned long weight = (unsigned long)(crossed * mean);
        unsigned i = slot_of(p);
        while (sampled[i]) i = (i + 1) % TABLE;
        sampled[i] = p;
        n_alloc++;
        total_weight += weight;
        STAP_PROBE3(otel_memory, alloc, p, size, weight);
    }
    return p;
}

__attribute__((noinline)) void test_free(void *p) {
    if (!p) return;
    for (unsigned i = slot_of(p); sampled[i]; i = (i + 1) % TABLE) {
        if (sampled[i] == p) {
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
                i = j;
            }
        done:
            n_free++;
            STAP_PROBE1(otel_memory, free, p);
            break;
        }
    }
    free(p);
}

int main(int argc, char **argv) {
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
    void **objs = malloc(n * sizeof *objs);
    for (long i = 0; i < n; i++) objs[i] = test_malloc(size);
    for (long i = 0; i < n; i += 2) test_free(objs[i]);
    printf("sampled %ld freed %ld weight %lu\n", n_alloc, n_free, total_weight);
    return 0;
}
