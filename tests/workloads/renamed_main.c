// Renames its main thread to argv[1] (prctl PR_SET_NAME, as servers do to
// label their threads), says "ready", and waits for the end of its stdin.
#include <sys/prctl.h>

#include "line_io.h"

int main(int argc, char **argv) {
    if (argc > 1 && prctl(PR_SET_NAME, argv[1], 0, 0, 0) != 0) return 1;
    say("ready\n");
    char line[64];
    while (read_line(line, sizeof line) >= 0) {
    }
    return 0;
}
