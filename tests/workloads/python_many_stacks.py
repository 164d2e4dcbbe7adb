# Python stacks by the thousand, for the stack maps' capacity: every
# allocation is made under a distinct Python chain. `walk(depth, path)`
# descends through `left` or `right` by the bits of `path`, so the 2**DEPTH
# paths give 2**DEPTH distinct stacks, each allocating one 1 KiB bytearray
# (malloc, not pymalloc) and keeping it. Prints "ready", allocates on each
# line read from stdin, printing "done" after each round.
import sys

DEPTH = int(sys.argv[1]) if len(sys.argv) > 1 else 15
kept = []


def left(depth, path):
    return walk(depth, path)


def right(depth, path):
    return walk(depth, path)


def walk(depth, path):
    if depth == 0:
        kept.append(bytearray(1024))
        return
    step = right if path & 1 else left
    step(depth - 1, path >> 1)


print("ready", flush=True)
for _ in sys.stdin:
    for path in range(2**DEPTH):
        walk(DEPTH, path)
    print("done", flush=True)
