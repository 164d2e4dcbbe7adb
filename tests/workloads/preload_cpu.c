// Known CPU split for the CPUPROFILE test, by construction: each function
// spins until its thread has used a given amount of CPU time.
//   main thread:  burn_a 300 ms, then burn_b 700 ms
//   thread 1:     burn_t1 400 ms
//   thread 2:     burn_t2 800 ms   (threads run concurrently with main)
// Prints the thread ids as "tids MAIN T1 T2". Built -O2 -fomit-frame-pointer.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
// The empty asm after each call keeps the caller's frame (no tail call).

static double thread_cpu_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static volatile unsigned long sink;

NOINLINE static void spin_for(double ms) {
    double end = thread_cpu_ms() + ms;
    unsigned long x = 1;
    while (thread_cpu_ms() < end)
        for (int i = 0; i < 1000; i++) x = x * 6364136223846793005UL + 1;
    sink = x;
}
NOINLINE static void burn_a(void) { spin_for(300); __asm__ volatile(""); }
NOINLINE static void burn_b(void) { spin_for(700); __asm__ volatile(""); }
NOINLINE static void burn_t1(void) { spin_for(400); __asm__ volatile(""); }
NOINLINE static void burn_t2(void) { spin_for(800); __asm__ volatile(""); }

static int tids[2];
static void *t1(void *arg) { (void)arg; tids[0] = gettid(); burn_t1(); return NULL; }
static void *t2(void *arg) { (void)arg; tids[1] = gettid(); burn_t2(); return NULL; }

int main(void) {
    pthread_t a, b;
    pthread_create(&a, NULL, t1, NULL);
    pthread_create(&b, NULL, t2, NULL);
    burn_a();
    burn_b();
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    printf("tids %d %d %d\n", gettid(), tids[0], tids[1]);
    return 0;
}
