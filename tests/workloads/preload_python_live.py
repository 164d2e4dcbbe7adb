"""Live heap workload: keeps 500 bytearrays of 128 KiB (500 * 131073 bytes
allocated, with the NUL) from a known chain, remember <- handle <- serve <-
<module>, and makes and frees as many from churn(), before anything
attaches. Prints "ready", then waits for a line (or the end of stdin)."""
import sys

keep = []


def remember(n):
    keep.append(bytearray(n))  # KEEP-SITE


def churn(n):
    block = bytearray(n)  # CHURN-SITE
    del block


def handle(i):
    remember(128 * 1024)  # HANDLE-CALL
    churn(128 * 1024)


def serve():
    for i in range(500):
        handle(i)  # SERVE-CALL


serve()  # MODULE-CALL
print("ready", flush=True)
sys.stdin.readline()
