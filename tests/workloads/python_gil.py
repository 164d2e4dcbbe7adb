"""Two busy threads, for `cpu --gil`: spin() runs Python code (it holds
the GIL), digest() hashes a 16 MiB buffer over and over in C with the GIL
released (hashlib lets it go for inputs over 2 KiB). Prints "thread ROLE
TID" for both, then "ready"; runs for argv[1] seconds (default 30)."""
import hashlib
import sys
import threading
import time

END = time.monotonic() + (float(sys.argv[1]) if len(sys.argv) > 1 else 30)
BUFFER = bytes(16 << 20)
tids = {}


def spin():
    tids["spin"] = threading.get_native_id()
    total = 0
    while time.monotonic() < END:
        for i in range(10000):
            total += i * i


def digest():
    tids["digest"] = threading.get_native_id()
    while time.monotonic() < END:
        hashlib.sha256(BUFFER).digest()


threads = [threading.Thread(target=f) for f in (spin, digest)]
for t in threads:
    t.start()
while len(tids) < 2:
    time.sleep(0.01)
for role, tid in tids.items():
    print(f"thread {role} {tid}")
print("ready", flush=True)
for t in threads:
    t.join()
