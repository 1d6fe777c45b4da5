"""glibc malloc settings for CPU runs: without them glibc maps and unmaps every ~1 MB activation,
and the page faults eat the hand-derived gradient's gain (docs/design.md)."""


def tune_malloc():
    """glibc: keep freed blocks up to 32 MB in the heap, so large CPU tensors are not page-faulted
    in again at every step. Called by the command lines, not the library. Returns the same settings
    as environment variables."""
    env = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
           "MALLOC_TOP_PAD_": str(64 << 20)}
    libc = _libc()
    if libc is not None:
        for opt, key in ((-3, "MALLOC_MMAP_THRESHOLD_"), (-1, "MALLOC_TRIM_THRESHOLD_"),
                         (-2, "MALLOC_TOP_PAD_")):
            libc.mallopt(opt, int(env[key]))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD
    return env


def _libc():
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_memory():
    """Give the heap's free memory back to the OS (glibc malloc_trim), e.g. between checkpoints of a
    sweep."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
