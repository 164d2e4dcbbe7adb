# Allocates large buffers (served by libc malloc, not pymalloc) from a few
# levels of Python calls, for the unwinder's test with Debian's stripped
# python3.11. Prints "ready", waits for a "go" line, runs for SECONDS
# (argv[1]), prints "done" and "calls N", then waits for stdin to close.
import sys
import time


def allocate(n):
    buf = bytearray(1 << 20)
    buf[n % len(buf)] = 1
    return len(buf)


def middle(n):
    return allocate(n) + 1


def outer(seconds):
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        for i in range(100):
            middle(i)
        count += 100
    return count


print("ready", flush=True)
sys.stdin.readline()
count = outer(float(sys.argv[1]))
print("done", flush=True)
print("calls", count, flush=True)
sys.stdin.read()
