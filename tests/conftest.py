import os

# Triton kernels run on the CPU through Triton's interpreter in tests; set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
