"""Grows a list of small tuples from grow_tuples(), under a 3-deep chain
(level1 -> level2 -> grow_tuples): objects of 512 bytes or less come from
pymalloc's arenas, which it maps with mmap, never from malloc.
Arguments: the number of tuples (default 1000000), and "trace" to measure
with tracemalloc. Prints "ready", waits for a line on stdin, makes the
tuples, prints "grown", waits for a line, and prints "done COUNT BLOCKS
TRACED": the pymalloc blocks of one tuple and
its int (sizes, the tuple's with its GC header, rounded to pymalloc's
16-byte alignment) and
tracemalloc's bytes for grow_tuples' lines (0 without "trace"), then
waits for another line."""
import sys
import tracemalloc

kept = []


def grow_tuples():
    for i in range(count):
        kept.append((None, i))


def level2():
    grow_tuples()


def level1():
    level2()


def main():
    global count
    trace = "trace" in sys.argv[1:]
    count = next((int(a) for a in sys.argv[1:] if a.isdigit()), 1_000_000)
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
