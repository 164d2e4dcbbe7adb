// Threads for the heap checker: the dynamic loader allocates each new
// thread's dynamic thread vector (calloc from allocate_dtv, in
// pthread_create), and glibc keeps it with the thread's cached stack once
// the thread is joined or has exited, where no scan can see it. None of
// that is a leak. At exit:
//   leak_in_thread:  4 x 777 B   one per joined thread, pointer dropped -> leaked
//   leak_in_main:    2 x 1234 B  pointers dropped                       -> leaked
//   churn:        1000 x 100 B   all freed
//   everything else is freed, or reachable from a global
// JOINED threads are joined, DETACHED ones detached and have exited
// before main leaks its objects.
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
// Makes a pointer escape, so the compiler keeps the allocation.
#define ESCAPE(p) __asm__ volatile("" : : "r"(p) : "memory")
#define JOINED 4
#define DETACHED 3

void *kept[JOINED]; // not static: the compiler must keep the stores
static int detached_done;

NOINLINE static void leak_in_thread(void) { char *p = malloc(777); ESCAPE(p); }
NOINLINE static void *joined(void *arg) {
    leak_in_thread();
    char *q = malloc(5000);
    ESCAPE(q);
    free(q);
    kept[(long)arg] = malloc(64);
    return NULL;
}
NOINLINE static void *detached(void *arg) {
    (void)arg;
    char *q = malloc(100);
    ESCAPE(q);
    free(q);
    __atomic_add_fetch(&detached_done, 1, __ATOMIC_SEQ_CST);
    return NULL;
}
static volatile int main_leaks = 2; // volatile: one call site, one stack
NOINLINE static void leak_in_main(void) {
    for (int i = 0; i < main_leaks; i++) { char *p = malloc(1234); ESCAPE(p); }
}
NOINLINE static void churn(void) {
    for (int i = 0; i < 1000; i++) { char *p = malloc(100); ESCAPE(p); free(p); }
}
// Overwrites the dead part of the stack, where stale copies of pointers
// would otherwise keep objects alive for a conservative scan.
NOINLINE static void scrub_stack(void) { volatile char buf[1 << 16]; memset((char *)buf, 0, sizeof buf); }

int main(void) {
    for (long i = 0; i < JOINED; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, joined, (void *)i) || pthread_join(t, NULL)) return 2;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 0; i < DETACHED; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, detached, NULL)) return 2;
    }
    pthread_attr_destroy(&attr);
    while (__atomic_load_n(&detached_done, __ATOMIC_SEQ_CST) < DETACHED) usleep(100);
    usleep(20000); // the detached threads finish exiting
    leak_in_main();
    churn();
    scrub_stack();
    return 0;
}
