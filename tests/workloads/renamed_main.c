// Renames its main thread to argv[1] (prctl PR_SET_NAME, as servers do to
// label their threads) and says "ready". Then it waits for the end of its
// stdin, or with argv[2] = "spin" it burns CPU until killed.
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>

#include "line_io.h"

static volatile uint64_t sink;

__attribute__((noinline)) static void spin(void) {
    uint64_t x = 1;
    for (;;) {
        for (int i = 0; i < 1000000; i++)
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        sink = x;
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && prctl(PR_SET_NAME, argv[1], 0, 0, 0) != 0) return 1;
    say("ready\n");
    if (argc > 2 && strcmp(argv[2], "spin") == 0) spin();
    char line[64];
    while (read_line(line, sizeof line) >= 0) {
    }
    return 0;
}
