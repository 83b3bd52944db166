"""One process of a multi-process CPU run (used by test_multihost.py).

usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES DATA_DIR WORKDIR OUT FEED
With NUM_PROCESSES=1 it is the single-process reference run.
"""

import os
import sys

process_id, num_processes, port, devices = (int(a) for a in sys.argv[1:5])
data_dir, workdir, out, feed = sys.argv[5:9]
os.environ['XLA_FLAGS'] = (  # after the caller's flags, which may hold another count
    os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

if num_processes > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{port}',
                             num_processes=num_processes, process_id=process_id)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # pylint: disable=g-import-not-at-top
from deepdigits import checkpointing, model_factory, sharding, train, train_state  # pylint: disable=g-import-not-at-top

config = default.get_config()
config.data_dir = data_dir
# One step of 32. After a second, the float rounding in which the runs differ (their
# all-reduces sum in other orders) has grown past any tight comparison: on an AVX-512 Xeon,
# 0.5-0.9 million of the 2.6 million parameters differed by over 1e-6 between any two of
# one process with 4 devices, one with 1 device, and two processes.
config.train_subset = 32
config.batch_size = 32
config.eval_batch_size = 64
config.num_epochs = 1
config.feed = feed
config.model_summary = False
# XLA's own convolutions: this test is about processes, and on several devices a process
# they compile in about half the time of the CPU's training choice (Winograd's tiles).
config.conv_impl = 'native'
record = train.train_and_evaluate(config, workdir)

fresh = train_state.abstract_train_state(config, model_factory.make_model(config),
                                         sharding.make_mesh())
state = checkpointing.restore_latest(checkpointing.make_manager(workdir, 3), fresh)
leaves = jax.tree_util.tree_flatten_with_path(
    (state.params, state.batch_stats, state.opt_state))[0]
np.savez(out, **{jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
                 for path, leaf in leaves},
         train_loss=record['train_loss'], test_loss=record['test_loss'],
         devices=jax.device_count(), processes=jax.process_count())
