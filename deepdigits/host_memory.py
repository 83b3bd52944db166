"""The host process's heap: kept mapped between steps, trimmed once per epoch, measured.

XLA's CPU runtime allocates each step's temporary buffers (hundreds of MB for this
network) and frees them when the step ends. glibc hands every allocation above 32 MB,
and every large one from a worker thread's arena, straight back to the OS, so the next
step faulted the same memory in again, page by page: 75,000 page faults a step at batch
128 on the 2-core development machine, a quarter of the step's time (docs/speed.md).
"""

import ctypes
import os

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _libc():
  try:
    return ctypes.CDLL('libc.so.6')
  except OSError:  # not glibc (macOS, musl): nothing to tune
    return None


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of unmapping it: one arena
  for all threads, no per-allocation mmap, no automatic trimming (the training loop
  trims once per epoch). Call before JAX starts its threads; returns False where glibc
  is not the allocator, or with DEEPDIGITS_KEEP_FREED_MEMORY=0 in the environment (for
  A/B timing). Only where memory is returned to the OS changes, not any result.
  """
  libc = _libc()
  if (libc is None or not hasattr(libc, 'mallopt')
      or os.environ.get('DEEPDIGITS_KEEP_FREED_MEMORY', '1') == '0'):
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))  # -1: never trim


def release_free_host_memory() -> None:
  """Returns freed heap pages to the OS (glibc's malloc_trim), once per epoch.

  glibc keeps freed memory (the more so after keep_freed_memory): without this,
  resident memory crept up with every checkpoint save, whose buffers Orbax's background
  threads free (+39 MiB over 200 saves; with it, flat within 7 MiB after the first 60;
  see README). The next step maps what it needs in again, once.
  """
  libc = _libc()
  if libc is not None and hasattr(libc, 'malloc_trim'):
    libc.malloc_trim(0)


def host_memory_mib() -> float:
  """This process's resident memory now (Linux), for spotting leaks in long runs."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
  except OSError:
    return float('nan')
