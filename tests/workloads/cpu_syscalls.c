// Spends most of its time in the kernel: reads /dev/zero (the kernel clears
// the buffer) from `read_zeros`. usage: cpu_syscalls SECONDS
// Prints "ready", waits for a line on stdin, runs, prints "done".
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static char buf[1 << 20];

__attribute__((noinline)) long read_zeros(int fd) {
    long total = 0;
    for (int i = 0; i < 64; i++)
        total += read(fd, buf, sizeof buf);
    return total;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 5;
    prctl(PR_SET_NAME, "syscallwork");
    int fd = open("/dev/zero", O_RDONLY);
    if (fd < 0)
        return 1;
    printf("ready\n");
    fflush(stdout);
    // Start when told, so that the profiler is attached for the whole run.
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    struct timespec start, t;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        read_zeros(fd);
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - start.tv_sec) + (t.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    printf("done\n");
    fflush(stdout);
    return 0;
}
