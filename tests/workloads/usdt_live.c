// Known live sets for libprofalloc.so's live heap and USDT probes.
// Nothing is allocated before "go": the only output before it goes
// through write(2) and input through read(2), so that a tracer attached
// at "ready" sees every sampled allocation of the process.
//   prints "ready", waits for a line; then keeps SMALL_N objects of
//   SMALL_SIZE bytes from small_site() and LARGE_N of LARGE_SIZE from
//   large_site(), allocates and frees CHURN_N objects of CHURN_SIZE bytes
//   from churn_site(); prints "allocated", waits for a line and exits
//   without freeing the live sets (HEAPPROFILE dumps them at exit).
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SMALL_N 60000
#define SMALL_SIZE 1000
#define LARGE_N 64
#define LARGE_SIZE 300000
#define CHURN_N 200000
#define CHURN_SIZE 2000

static void *small[SMALL_N];
static void *large[LARGE_N];

__attribute__((noinline)) void small_site(void) {
    for (int i = 0; i < SMALL_N; i++) {
        small[i] = malloc(SMALL_SIZE);
        memset(small[i], 1, 16);
    }
}

__attribute__((noinline)) void large_site(void) {
    for (int i = 0; i < LARGE_N; i++) {
        large[i] = malloc(LARGE_SIZE);
        memset(large[i], 1, 16);
    }
}

__attribute__((noinline)) void churn_site(void) {
    for (int i = 0; i < CHURN_N; i++) {
        void *volatile p = malloc(CHURN_SIZE);
        free(p);
    }
}

static void say(const char *s) {
    if (write(1, s, strlen(s)) < 0) _exit(4);
}

static void wait_line(void) {
    char c;
    do {
        if (read(0, &c, 1) != 1) _exit(3);
    } while (c != '\n');
}

int main(void) {
    say("ready\n");
    wait_line();
    small_site();
    churn_site();
    large_site();
    say("allocated\n");
    wait_line();
    return 0;
}
