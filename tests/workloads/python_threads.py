# Threads parked in known Python call chains, for the Python frame walker's
# tests. Three threads block in three distinct 4-deep chains (time.sleep,
# threading.Event.wait, and a chain that runs through a generator), one
# thread burns CPU in a 2-deep chain, and the main thread waits on stdin.
# Two names are not ASCII (Latin-1 and Cyrillic), for the string decoder.
#
# A line ending in a `# at:NAME` marker is where the chain's frame NAME
# stands while it is blocked; the test reads the line numbers from these
# markers. Once every thread is in place, prints "thread ROLE NATIVE_TID"
# for each, then "ready", then exits when stdin closes (or a line arrives).
import sys
import threading
import time

stop = threading.Event()
started = threading.Barrier(5)


def sleep_a4():
    started.wait()
    time.sleep(3600)  # at:sleep_a4


def sleep_a3():
    sleep_a4()  # at:sleep_a3


def sleep_a2():
    sleep_a3()  # at:sleep_a2


def sleep_a1():
    sleep_a2()  # at:sleep_a1


def event_b4():
    started.wait()
    stop.wait()  # at:event_b4


def évènement_b3():
    event_b4()  # at:évènement_b3


def событие_b2():
    évènement_b3()  # at:событие_b2


def event_b1():
    событие_b2()  # at:event_b1


def gen_c4():
    started.wait()
    time.sleep(3600)  # at:gen_c4


def gen_c3():
    gen_c4()  # at:gen_c3
    yield 1


def gen_c2():
    for _ in gen_c3():  # at:gen_c2
        pass


def gen_c1():
    gen_c2()  # at:gen_c1


def burn_d2():
    started.wait()
    total = 0
    while not stop.is_set():  # burn:first
        for i in range(1000):
            total += i * i
    return total  # burn:last


def burn_d1():
    burn_d2()  # at:burn_d1


tids = {}
idents = {}


def spawn(role, target):
    def run():
        tids[role] = threading.get_native_id()
        idents[role] = threading.get_ident()
        target()  # at:run

    thread = threading.Thread(target=run, name=role, daemon=True)
    thread.start()
    return thread


for role, target in [
    ("sleep", sleep_a1),
    ("event", event_b1),
    ("gen", gen_c1),
    ("burn", burn_d1),
]:
    spawn(role, target)
started.wait()


def in_place(role, leaf, past):
    """Whether thread ROLE runs LEAF at least PAST lines after its `def`."""
    frame = sys._current_frames().get(idents[role])
    while frame is not None:
        code = leaf.__code__
        if frame.f_code is code and frame.f_lineno >= code.co_firstlineno + past:
            return True
        frame = frame.f_back
    return False


# Leaving the barrier takes a while: wait until every thread blocks (or
# burns) where its chain says.
while not (
    in_place("sleep", sleep_a4, 2)
    and in_place("event", event_b4, 2)
    and in_place("gen", gen_c4, 2)
    and in_place("burn", burn_d2, 3)
):
    time.sleep(0.01)
tids["main"] = threading.get_native_id()
for role, tid in tids.items():
    print(f"thread {role} {tid}")
print("ready", flush=True)
sys.stdin.readline()  # at:main
stop.set()
