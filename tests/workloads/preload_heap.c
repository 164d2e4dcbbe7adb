// Known heap for the preload-mode tests (HEAPPROFILE and HEAPCHECK).
// Built with -O2 -fomit-frame-pointer: stacks come from the CFI.
//
// At exit:
//   leak_pages:    20000 x 4096 B   pointers dropped      -> leaked
//   leak_big:         30 x 1 MiB    pointers dropped      -> leaked
//   lose_list:       500 x 48 B     list head dropped     -> leaked (all nodes)
//   keep_global:   10000 x 2048 B   held by a global array -> reachable
//   keep_list:      1000 x 64 B     list from a global    -> reachable
//   keep_in_thread:    1 x 777 B    only on a running thread's stack -> reachable
//   churn:        100000 x 1000 B   all freed             -> not in use
// Prints "ready" once everything is allocated (argument "wait": then
// waits for a line on stdin before exiting).
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
// Makes a pointer escape, so the compiler keeps the allocation.
#define ESCAPE(p) __asm__ volatile("" : : "r"(p) : "memory")

struct node { struct node *next; char pad[40]; };
struct big_node { struct big_node *next; char pad[56]; };

void *kept[10000]; // not static: the compiler must keep the stores
struct big_node *kept_list;
static volatile int stop;

NOINLINE static void *alloc_page(void) { void *p = malloc(4096); ESCAPE(p); return p; }
NOINLINE static void leak_pages(void) { for (int i = 0; i < 20000; i++) ESCAPE(alloc_page()); }
NOINLINE static void leak_big(void) { for (int i = 0; i < 30; i++) { char *p = malloc(1 << 20); ESCAPE(p); } }
NOINLINE static void lose_list(void) {
    struct node *head = NULL;
    for (int i = 0; i < 500; i++) { struct node *n = malloc(sizeof *n); ESCAPE(n); n->next = head; head = n; }
    ESCAPE(head);
}
NOINLINE static void keep_global(void) { for (int i = 0; i < 10000; i++) { kept[i] = malloc(2048); ESCAPE(kept[i]); } }
NOINLINE static void keep_list(void) {
    for (int i = 0; i < 1000; i++) { struct big_node *n = malloc(sizeof *n); ESCAPE(n); n->next = kept_list; kept_list = n; }
}
NOINLINE static void churn(void) {
    for (int i = 0; i < 100000; i++) { char *p = malloc(1000); ESCAPE(p); free(p); }
}
NOINLINE static void *keep_in_thread(void *arg) {
    volatile char *p = malloc(777);
    ESCAPE(p);
    __atomic_store_n((int *)arg, 1, __ATOMIC_SEQ_CST);
    while (!stop) usleep(1000);
    return (void *)p;
}
// Overwrites the dead part of the stack, where stale copies of pointers
// (left by the calls above, printf's included) would otherwise keep
// objects alive for a conservative scan, as for any conservative checker.
NOINLINE static void scrub_stack(void) { volatile char buf[1 << 16]; memset((char *)buf, 0, sizeof buf); }

int main(int argc, char **argv) {
    static int started;
    pthread_t t;
    pthread_create(&t, NULL, keep_in_thread, &started);
    while (!__atomic_load_n(&started, __ATOMIC_SEQ_CST)) usleep(100);
    leak_pages();
    leak_big();
    lose_list();
    keep_global();
    keep_list();
    churn();
    printf("ready\n");
    fflush(stdout);
    if (argc > 1 && strcmp(argv[1], "wait") == 0) {
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 2;
    }
    scrub_stack();
    return 0; // the thread is still running at exit
}
