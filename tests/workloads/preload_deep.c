// Stacks deeper than preload mode keeps (64 frames) next to shallow ones.
// Built with -O2 -fomit-frame-pointer: stacks come from the CFI.
//
// At exit, in use:
//   deep_alloc:    16 x 1 MiB  at the bottom of a 200-deep recursion
//   shallow_alloc:  8 x 2 MiB  called from main (another size, so the two
//                               functions are not folded into one)
#include <stdlib.h>

#define NOINLINE __attribute__((noinline))
#define ESCAPE(p) __asm__ volatile("" : : "r"(p) : "memory")

void *kept[32]; // not static: the compiler must keep the stores

NOINLINE static void *deep_alloc(void) { void *p = malloc(1 << 20); ESCAPE(p); return p; }
NOINLINE static void *shallow_alloc(void) { void *p = malloc(2 << 20); ESCAPE(p); return p; }

// Not a tail call: the result is used after the recursive call returns.
NOINLINE static void *deep(int n) {
    void *p = n == 0 ? deep_alloc() : deep(n - 1);
    ESCAPE(p);
    return p;
}

int main(void) {
    for (int i = 0; i < 16; i++) kept[i] = deep(200);
    for (int i = 16; i < 24; i++) kept[i] = shallow_alloc();
    return 0;
}
