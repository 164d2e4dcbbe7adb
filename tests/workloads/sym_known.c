// Symbolization test program: prints return addresses taken at known call
// sites ("SITE <name> <address>"), prints "ready", and waits for a line on
// stdin before exiting. Built with -O1 -g.
//   site_outer:   return address inside outer_function
//   site_middle:  return address inside middle_function
//   site_inlined: return address inside inlined_helper, inlined into
//                 with_inlined_caller
//   site_pc:      an address inside leaf_function (a sampled pc)
#include <stdio.h>

__attribute__((noinline)) void report(const char *site) {
    printf("SITE %s %p\n", site, __builtin_return_address(0));
}

__attribute__((noinline)) void leaf_function(void) {
pc:
    printf("SITE site_pc %p\n", &&pc);
    report("site_leaf");
}

__attribute__((noinline)) void middle_function(void) {
    report("site_middle");
    leaf_function();
}

__attribute__((noinline)) void outer_function(void) {
    report("site_outer");
    middle_function();
}

static inline __attribute__((always_inline)) void inlined_helper(void) {
    report("site_inlined");
}

__attribute__((noinline)) void with_inlined_caller(void) {
    inlined_helper();
    __asm__ volatile("" ::: "memory");
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    outer_function();
    with_inlined_caller();
    puts("ready");
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 0;
    return 0;
}
