"""Code objects freed before anything attaches: 40 functions make_0 ..
make_39, each compiled by exec from a source of its own, keep one
bytearray of 128 KiB (131073 bytes with the NUL) each; each function, its
code object, its module's code and its file name are freed (gc.collect
breaks the function <-> globals cycle) before the next source is compiled,
so the next code objects most likely take the same addresses. Prints
"ready", then waits for a line (or the end of stdin)."""
import gc
import sys

keep = []
SOURCE = """
def make_{i}():
    keep.append(bytearray(128 * 1024))
make_{i}()
"""

for i in range(40):
    exec(compile(SOURCE.format(i=i), f"<make_{i}>", "exec"), {"keep": keep})  # EXEC-SITE
    gc.collect()
print("ready", flush=True)
sys.stdin.readline()
