"""Leaks bytearrays of 1 MiB from a known 5-deep Python chain, for the leak
mode's tests. Each round, keep() (under level1 -> level2 -> level3 ->
level4) keeps one bytearray of BLOCK bytes (BLOCK + 1 allocated: the NUL),
and churn() allocates one and frees it. The blocks go into a list made
beforehand, so that keeping them allocates nothing else.
Prints "ready"; a line "go N" runs N rounds 0.1 s apart, then prints "done";
a line "exit" (or the end of stdin) ends the program."""
import sys
import time

BLOCK = 1 << 20
kept = [None] * 10000
count = 0


def keep():
    global count
    kept[count] = bytearray(BLOCK)
    count += 1


def churn():
    block = bytearray(BLOCK)
    del block


def level4():
    keep()
    churn()


def level3():
    level4()


def level2():
    level3()


def level1():
    level2()


def main():
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] != ["go"]:
            return
        for _ in range(int(words[1])):
            level1()
            time.sleep(0.1)
        print("done", flush=True)


main()
