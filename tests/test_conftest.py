"""The suite's own setup: the compile flags every process of it uses."""

import os

from conftest import COMPILE_FLAGS_VARIABLE, TEST_COMPILE_FLAGS, known_to_xla, xla_flags


def test_a_flag_xla_does_not_know_is_found_before_any_process_is_given_it():
  # XLA aborts a process on such a flag: the suite must see it and set none.
  assert not known_to_xla(('--xla_backend_optimization_level=1', '--xla_no_such_flag=1'))
  assert known_to_xla(('--xla_backend_optimization_level=1',))


def test_every_process_of_the_suite_compiles_with_the_same_flags_but_the_end_to_end_run():
  assert os.environ.get(COMPILE_FLAGS_VARIABLE, '').split() == list(TEST_COMPILE_FLAGS)
  for devices in (1, 4, 8):
    flags = xla_flags(devices).split()
    assert flags[:len(TEST_COMPILE_FLAGS)] == list(TEST_COMPILE_FLAGS)
    assert flags[-1] == f'--xla_force_host_platform_device_count={devices}'
    assert [f for f in flags if f.startswith('--xla_force_host')] == [flags[-1]]
  as_a_user = xla_flags(1, test_compile=False).split()
  assert not set(TEST_COMPILE_FLAGS) & set(as_a_user)
  assert as_a_user[-1] == '--xla_force_host_platform_device_count=1'
