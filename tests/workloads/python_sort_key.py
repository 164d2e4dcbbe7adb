"""Python -> C -> Python: sorted() (C) calls burn_key() (Python) for every
element, and burn_key does the work. Prints "ready" once running; runs for
argv[1] seconds (default 30)."""
import sys
import time


def burn_key(x):
    total = 0
    for i in range(2000):
        total += i ^ x
    return total


def sort_with_key():
    return sorted(range(200), key=burn_key)


def main():
    end = time.monotonic() + float(sys.argv[1] if len(sys.argv) > 1 else 30)
    print("ready", flush=True)
    while time.monotonic() < end:
        sort_with_key()


main()
