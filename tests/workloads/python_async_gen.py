"""Burns CPU in a coroutine and in a generator, the same work in each, for
argv[1] seconds (default 30): asyncio runs serve() (a coroutine), which
awaits handle() (a coroutine) that calls spin(), then runs consume(), which
iterates produce() (a generator) that calls spin(). Prints "ready"."""
import asyncio
import sys
import time

WORK = 100000


def spin(n):
    total = 0
    for i in range(n):
        total += i * i
    return total


async def handle():
    return spin(WORK)


def produce():
    yield spin(WORK)


def consume():
    for _ in produce():
        pass


async def serve(end):
    print("ready", flush=True)
    while time.monotonic() < end:
        await handle()
        consume()
        await asyncio.sleep(0)


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 30
    asyncio.run(serve(time.monotonic() + seconds))


main()
