"""An allocation made from the evaluation loop's cold part on Debian's
/usr/bin/python3.11: with a trace function set, a method descriptor called
with *args (CALL_FUNCTION_EX) is called by do_call_core's traced path, which
the build's profile-guided optimization placed in the cold part. The call
is `bytes.join(b"", parts)`: one bytes object of PARTS * PART bytes (plus
its 33-byte header), from malloc, under join_traced <- handle <- serve <-
<module>.

Prints "ready", then for each line "go N" makes N such objects (kept) and
prints "done"."""
import sys

PART = b"x" * 4096
PARTS = 256
kept = []


def tracer(frame, event, arg):
    # No local tracing: the trace function only has to be set.
    return None


def join_traced():
    join = bytes.join
    kept.append(join(*(b"", [PART] * PARTS)))  # JOIN-SITE


def handle():
    join_traced()  # HANDLE-CALL


def serve(rounds):
    sys.settrace(tracer)
    try:
        for _ in range(rounds):
            handle()  # SERVE-CALL
    finally:
        sys.settrace(None)


print("ready", flush=True)
for line in sys.stdin:
    serve(int(line.split()[1]))  # MODULE-CALL
    print("done", flush=True)
