"""A cosmic-ray filter that keeps a seeded random sample of a session's pending mutants
and marks the others skipped, for modules whose tests take too long on a laptop to run
every mutant: `python tests/mutation/sample.py SESSION N [--seed S]`.

A uniform sample estimates the module's kill rate without bias (its survivors are a
sample of all survivors); the count kept and the seed go in the report.
"""

import argparse
import random

from cosmic_ray.work_db import use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('session')
  parser.add_argument('count', type=int, help='mutants to keep')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  with use_db(args.session) as db:
    # In the order of the mutations themselves (job ids are random), so that the same
    # module, operators and seed give the same sample.
    pending = [item.job_id for item in sorted(
        db.pending_work_items, key=lambda item: [
            (m.operator_name, m.occurrence, tuple(m.start_pos)) for m in item.mutations])]
    kept = set(random.Random(args.seed).sample(pending, min(args.count, len(pending))))
    for job_id in pending:
      if job_id not in kept:
        db.set_result(job_id, WorkResult(output=f'not in the sample (seed {args.seed})',
                                         worker_outcome=WorkerOutcome.SKIPPED))
  print(f'{args.session}: kept {len(kept)} of {len(pending)} pending mutants')


if __name__ == '__main__':
  main()
