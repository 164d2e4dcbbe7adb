# HEAPCHECK workload: one C-level leak of 123457 bytes (malloc'd through
# ctypes, address dropped) under lose_it <- middle <- <module>; the
# Python objects (in pymalloc arenas and in malloc) all stay reachable.
import ctypes
import sys

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]


def lose_it():
    libc.malloc(123457)  # C-LEAK


def middle():
    lose_it()


data = [bytearray(100) for _ in range(1000)] + [str(i) * 3 for i in range(5000)]
table = {i: (i, str(i)) for i in range(2000)}
if sys.argv[1:] == ["leak"]:
    middle()
