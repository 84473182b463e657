"""``python -m bench [--quick]``: pyramid_tasks side by side with plain Celery.

Needs the Redis (and, for the worker scenarios, PostgreSQL) the test suite uses.
"""

import argparse

from . import dispatch, worker
from .harness import header, save


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args(argv)
    scenarios = []
    print(header())
    for run in (dispatch.run, worker.run, worker.run_peer):
        for scenario in run(args.quick):
            scenarios.append(scenario)
            print(scenario.row(), flush=True)
    print(f"\nresults: {save(scenarios, args.quick)}")


if __name__ == "__main__":
    main()
