"""Keeps bytearrays from two Python functions, known bytes by construction:
keep_big() allocates BIG_COUNT blocks of BLOCK bytes, keep_small()
SMALL_COUNT, both under a 5-deep chain (level1 -> ... -> level4 -> keep_*).
Prints "ready", waits for a line on stdin, allocates, prints "done" with
tracemalloc's bytes per function, then waits for another line."""
import sys
import tracemalloc

BLOCK = 64 * 1024
BIG_COUNT = 300
SMALL_COUNT = 100
kept = []


def keep_big():
    for _ in range(BIG_COUNT):
        kept.append(bytearray(BLOCK))


def keep_small():
    for _ in range(SMALL_COUNT):
        kept.append(bytearray(BLOCK))


def level4(f):
    f()


def level3(f):
    level4(f)


def level2(f):
    level3(f)


def level1(f):
    level2(f)


def main():
    print("ready", flush=True)
    sys.stdin.readline()
    tracemalloc.start()
    level1(keep_big)
    level1(keep_small)
    snapshot = tracemalloc.take_snapshot()
    by_function = {"keep_big": 0, "keep_small": 0}
    for stat in snapshot.statistics("traceback"):
        for frame in stat.traceback:
            for name, (first, last) in LINES.items():
                if frame.filename == __file__ and first <= frame.lineno <= last:
                    by_function[name] += stat.size
    print("done", by_function["keep_big"], by_function["keep_small"], flush=True)
    sys.stdin.readline()


LINES = {
    "keep_big": (keep_big.__code__.co_firstlineno, keep_small.__code__.co_firstlineno - 1),
    "keep_small": (keep_small.__code__.co_firstlineno, level4.__code__.co_firstlineno - 1),
}
main()
