// JIT symbolization test program: "compiles" a function into anonymous
// executable memory, describes it in /tmp/perf-PID.map as JIT compilers do,
// prints "SITE site_jit <address inside it>" and "SITE site_anon <address
// in the same mapping but outside every perf map entry>", then "ready"; exits
// on a line on stdin (removing the map file).
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned char *code = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED)
        return 1;
    memset(code, 0xc3, 4096); // ret
    char path[64];
    snprintf(path, sizeof path, "/tmp/perf-%d.map", getpid());
    FILE *map = fopen(path, "w");
    if (!map)
        return 1;
    fprintf(map, "%lx 40 jit_compiled_fn\n", (unsigned long)(code + 0x100));
    fclose(map);
    printf("SITE site_jit %p\n", (void *)(code + 0x110));
    printf("SITE site_anon %p\n", (void *)(code + 0x800));
    puts("ready");
    char line[64];
    if (fgets(line, sizeof line, stdin)) {
    }
    unlink(path);
    return 0;
}
