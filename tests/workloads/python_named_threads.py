# Two named threads and the main thread burn CPU for SECONDS (argv[1]),
# for the `python_thread` label of CPU samples.
import sys
import threading
import time

end = time.monotonic() + float(sys.argv[1])


def spin():
    x = 0
    while time.monotonic() < end:
        x += 1


threads = [threading.Thread(target=spin, name=n) for n in ("alpha", "beta")]
for t in threads:
    t.start()
spin()
for t in threads:
    t.join()
