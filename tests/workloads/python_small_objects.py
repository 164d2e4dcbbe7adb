"""Grows a list of small tuples from grow_tuples(), under a 3-deep chain
(level1 -> level2 -> grow_tuples): objects of 512 bytes or less come from
pymalloc's arenas, which it maps with mmap, never from malloc.
Arguments: the number of tuples (default 1000000), "trace" to measure
with tracemalloc, and "steps=N" to grow in N steps STEP_PAUSE apart. Prints "ready", waits for a line on stdin, makes the
tuples, prints "grown", waits for a line, and prints "done COUNT BLOCKS
TRACED": the pymalloc blocks of one tuple and
its int (sizes, the tuple's with its GC header, rounded to pymalloc's
16-byte alignment) and
tracemalloc's bytes for grow_tuples' lines (0 without "trace"), then
waits for another line."""
import sys
import time
import tracemalloc

kept = []
# With "steps=N", the list grows in N steps this far apart (seconds).
STEP_PAUSE = 0.4


def grow_tuples():
    for step in range(steps):
        for i in range(step * count // steps, (step + 1) * count // steps):
            kept.append((None, i))
        if step + 1 < steps:
            time.sleep(STEP_PAUSE)


def level2():
    grow_tuples()


def level1():
    level2()


def main():
    global count, steps
    trace = "trace" in sys.argv[1:]
    count = next((int(a) for a in sys.argv[1:] if a.isdigit()), 1_000_000)
    steps = next((int(a[6:]) for a in sys.argv[1:] if a.startswith("steps=")), 1)
    print("ready", flush=True)
    sys.stdin.readline()
    if trace:
        tracemalloc.start()
    level1()
    # The profiler stops here: tracemalloc's statistics below make many
    # objects of their own.
    print("grown", flush=True)
    sys.stdin.readline()
    traced = 0
    if trace:
        first = grow_tuples.__code__.co_firstlineno
        last = level2.__code__.co_firstlineno - 1
        for stat in tracemalloc.take_snapshot().statistics("lineno"):
            frame = stat.traceback[0]
            if frame.filename == __file__ and first <= frame.lineno <= last:
                traced += stat.size
        tracemalloc.stop()
    def block(obj):
        return (sys.getsizeof(obj) + 15) // 16 * 16

    print("done", count, block((None, count)) + block(count), traced, flush=True)
    sys.stdin.readline()


main()
