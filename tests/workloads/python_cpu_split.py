"""Burns CPU in two Python functions, 3:1 by construction: every round
calls heavy() for 3 units of work and light() for 1, each unit the same
loop. Prints "ready" once running; runs for argv[1] seconds (default 30)."""
import sys
import time

UNIT = 20000


def work(n):
    total = 0
    for i in range(n * UNIT):
        total += i * i
    return total


def heavy():
    return work(3)


def light():
    return work(1)


def main():
    end = time.monotonic() + float(sys.argv[1] if len(sys.argv) > 1 else 30)
    print("ready", flush=True)
    while time.monotonic() < end:
        heavy()
        light()


main()
