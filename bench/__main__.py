"""``python -m bench [--quick]``: pyramid_tasks side by side with plain Celery.

Needs the Redis (and, for the worker scenarios, PostgreSQL; for R, RabbitMQ)
the test suite uses.
"""

import argparse

from . import dashboard, dispatch, jobs, rabbitmq, worker
from .harness import header, save

GROUPS = {
    "dispatch": dispatch.run,  # 3, 4
    "worker": worker.run,  # 1, 2, 6, 7
    "peer": worker.run_peer,  # 8
    "jobs": jobs.run,  # P5, P9: durable mode against not
    "rabbitmq": rabbitmq.run,  # R: publisher confirms per batch, per message, none
}
#: Not an A/B: the dashboard's pages at 10,000,000 jobs (bench/dashboard.py).
SOLO = {"dashboard": dashboard.main}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted({*GROUPS, *SOLO}),
        help="run only this group of scenarios (repeatable)",
    )
    args = parser.parse_args(argv)
    for name, run in SOLO.items():
        if args.only and name in args.only:
            run(["--rounds", "5"] if args.quick else [])
    if args.only and not set(args.only) & set(GROUPS):
        return
    scenarios = []
    print(header())
    for name, run in GROUPS.items():
        if args.only and name not in args.only:
            continue
        for scenario in run(args.quick):
            scenarios.append(scenario)
            print(scenario.row(), flush=True)
            if scenario.note:
                print(f"    {scenario.note}", flush=True)
    print(f"\nresults: {save(scenarios, args.quick)}")


if __name__ == "__main__":
    main()
