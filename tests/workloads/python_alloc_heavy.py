# Allocation-heavy Python workload for `cargo xtask bench python`'s preload
# cell: 300,000 bytearrays of 2 KiB (each through malloc, pymalloc keeps
# only objects of 512 bytes or less), a few frames deep, the last 1,000
# kept alive.
import sys


def make(n):
    return bytearray(n)


def step(keep, i):
    keep[i % len(keep)] = make(2048)


def run(count):
    keep = [None] * 1000
    for i in range(count):
        step(keep, i)


run(int(sys.argv[1]) if len(sys.argv) > 1 else 300_000)
