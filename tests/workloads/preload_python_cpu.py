# CPUPROFILE workload: burns about 1.5 s of CPU in spin <- burn <- <module>.
import time


def spin(deadline):
    n = 0
    while time.process_time() < deadline:  # SPIN-LOOP
        n += 1
    return n


def burn():
    return spin(time.process_time() + 1.5)


burn()
