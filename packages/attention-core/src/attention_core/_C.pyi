"""Type stubs of the compiled extension (private: use attention_core's Python modules).

Every function takes the addresses (``tensor.data_ptr()``) of contiguous CPU buffers and their
sizes; the Python callers validate shapes, dtypes and devices before calling.
"""

def compute_hashes_f32(X: int, planes: int, hashes: int, n: int, d: int, bits: int) -> None: ...
def compute_hashes_f64(X: int, planes: int, hashes: int, n: int, d: int, bits: int) -> None: ...
