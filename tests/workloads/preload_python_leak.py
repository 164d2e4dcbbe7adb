# HEAPPROFILE workload: keeps 400 bytearrays of 64 KiB (25.6 MB) from a
# known chain: remember <- handle <- serve <- <module>.
keep = []


def remember(n):
    keep.append(bytearray(n))  # LEAK-SITE


def handle(i):
    remember(64 * 1024)  # HANDLE-CALL


def serve():
    for i in range(400):
        handle(i)  # SERVE-CALL


serve()
