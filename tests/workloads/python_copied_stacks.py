"""Allocates from a C extension right after importing it: make_buffers()
imports _json (mapping _json.so, whose unwind tables the profiler has not
loaded yet) and at once makes BUFFERS strings of more than BUFFER bytes
with it, whose malloc stacks pass through _json.so; the kernel copies those
stacks to be unwound once the tables are there. Prints "ready", waits for
a line, allocates, prints "grown", waits for a line."""
import sys

BUFFERS = 20
BUFFER = 1 << 16


def make_buffers():
    import _json

    return [_json.encode_basestring_ascii("x" * BUFFER) for _ in range(BUFFERS)]


def level1():
    return make_buffers()


print("ready", flush=True)
sys.stdin.readline()
kept = level1()
print("grown", flush=True)
sys.stdin.readline()
