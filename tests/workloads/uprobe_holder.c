/* Holds a uprobe at a file offset of libc in one process, the way bcc makes
 * USDT-style probes: a perf_event_open uprobe that carries a reference
 * counter (ref_ctr_offset) and has a BPF program attached. Another uprobe
 * at the same place without the same counter is then refused by the kernel.
 *
 * usage: uprobe_holder PID OFFSET FILE
 * Prints "ready OFFSET" once the probe is in place, then holds it until
 * stdin closes.
 */
#define _GNU_SOURCE
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The counter sits in libc's ELF header, which is mapped read-only: the
 * kernel only updates counters in writable mappings, so the target's
 * memory is never touched. */
#define REF_CTR_OFFSET 0x10

static int load_program(void) {
    struct bpf_insn insns[] = {
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0},
        {.code = BPF_JMP | BPF_EXIT},
    };
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_KPROBE;
    attr.insns = (uint64_t)(uintptr_t)insns;
    attr.insn_cnt = 2;
    attr.license = (uint64_t)(uintptr_t)"GPL";
    return (int)syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr);
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int pid = atoi(argv[1]);
    uint64_t offset = strtoull(argv[2], NULL, 0);
    char path[4096];
    if (!realpath(argv[3], path)) return 4;

    FILE *f = fopen("/sys/bus/event_source/devices/uprobe/type", "r");
    int type;
    if (!f || fscanf(f, "%d", &type) != 1) return 5;
    fclose(f);
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.type = type;
    attr.config = (uint64_t)REF_CTR_OFFSET << 32; /* ref_ctr_offset: config:32-63 */
    attr.config1 = (uint64_t)(uintptr_t)path;     /* uprobe_path */
    attr.config2 = offset;                        /* probe_offset */
    attr.sample_period = 1;
    attr.wakeup_events = 1;
    int fd = (int)syscall(SYS_perf_event_open, &attr, pid, -1, -1, PERF_FLAG_FD_CLOEXEC);
    if (fd < 0) { perror("perf_event_open"); return 6; }
    int prog = load_program();
    if (prog < 0) { perror("BPF_PROG_LOAD"); return 7; }
    if (ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog) != 0) { perror("SET_BPF"); return 8; }
    if (ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) != 0) { perror("ENABLE"); return 9; }
    printf("ready %#lx\n", (unsigned long)offset);
    fflush(stdout);
    char buf[16];
    while (read(0, buf, sizeof buf) > 0) {}
    return 0;
}
