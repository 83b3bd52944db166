"""Freed host memory is kept for the next step: the speed of XLA's CPU steps relies on it
(every command calls keep_freed_memory before JAX starts, and so does conftest)."""

import subprocess
import sys

import pytest

from deepdigits import host_memory

# A fresh process frees a 128 MiB buffer, allocates it again and prints how many pages
# the OS had to map in for the second one (numpy's huge-page advice is off, so that
# every 4 KiB page counts, as for XLA's buffers).
FAULTS_OF_A_REALLOCATION = '''
import resource, sys
import numpy as np
from deepdigits import host_memory
np._core.multiarray._set_madvise_hugepage(False)
if sys.argv[1] == 'keep':
  assert host_memory.keep_freed_memory()
size = 128 * 2**20
first = np.ones(size, np.uint8)
del first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
second = np.ones(size, np.uint8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def faults_of_a_reallocation(mode: str) -> int:
  out = subprocess.run([sys.executable, '-c', FAULTS_OF_A_REALLOCATION, mode],
                       capture_output=True, text=True, check=True).stdout
  return int(out)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_a_freed_buffer_is_reused_without_faulting_its_pages_in_again():
  pages = 128 * 2**20 // 4096
  assert faults_of_a_reallocation('default') > pages // 2  # glibc unmapped it
  assert faults_of_a_reallocation('keep') < pages // 50


def test_the_environment_can_turn_it_off_for_ab_timing(monkeypatch):
  monkeypatch.setenv('DEEPDIGITS_KEEP_FREED_MEMORY', '0')
  assert not host_memory.keep_freed_memory()


def test_memory_figures():
  host_memory.release_free_host_memory()
  assert host_memory.host_memory_mib() > 10
