"""One process of a two-process run of the preemption guard alone (used by
test_multihost.py): process 1 gets a SIGTERM at step 3; both must stop at the same
step, the first at which the hosts compare (every preemption.SYNC_EVERY_STEPS).

usage: python preemption_worker.py PROCESS_ID PORT
"""

import os
import signal
import sys

process_id, port = (int(a) for a in sys.argv[1:3])
os.environ['XLA_FLAGS'] = (  # after the caller's flags, which may hold another count
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=1').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                           process_id=process_id)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepdigits.preemption import PreemptionGuard  # pylint: disable=g-import-not-at-top

with PreemptionGuard() as guard:
  for step in range(1, 41):
    if process_id == 1 and step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    if guard.should_stop(step):
      print(f'stopped after step {step} by {guard.signal_name}', flush=True)
      break
  else:
    print('never stopped', flush=True)
jax.distributed.shutdown()
