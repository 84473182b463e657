"""The durable-mode benchmark (``python -m bench --only jobs``) and P10 run,
with tiny counts: their scenarios measure what they say, on real workers,
PostgreSQL and Redis.  The figures themselves are the benchmark's business,
not the suite's."""

import subprocess
import sys
import time
import uuid

import redis
import sqlalchemy
import transaction

from bench import dashboard, dispatch, jobs
from bench.worker import Bench
from pyramid_tasks.jobs import Job


def test_the_durable_scenarios_run_with_tiny_counts(redis_url, database_url):
    bench = Bench(redis_url, database_url)  # its own schema, its own queues
    try:
        scenarios = jobs.run(False, sizes=((2, 3), (2, 5), (2, 20)), bench=bench)
        table = Job.__table__
        with bench.engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'SET search_path TO "{bench.schema}"'))
            drained = connection.execute(
                sqlalchemy.select(sqlalchemy.func.count())
                .select_from(table)
                .where(table.c.name == "bench.insert", table.c.state == "succeeded")
            ).scalar_one()
    finally:
        bench.close()
    names = [scenario.name.split(":")[0] for scenario in scenarios]
    rounds = [(len(s.baseline), len(s.ours)) for s in scenarios]
    print(f"scenarios {names}, rounds {rounds}, durable jobs drained {drained}")
    assert names == ["P5 web", "P5 web", "P5 web", "P5 worker", "P9"]
    assert rounds == [(2, 2)] * 5
    assert all(value > 0 for s in scenarios for value in s.baseline + s.ours)
    # CPU time counted in each round of the P5 scenarios (not P9's).
    cpu = [(len(s.cpu_baseline), len(s.cpu_ours)) for s in scenarios]
    assert cpu == [(2, 2)] * 4 + [(0, 0)]
    assert all(
        value > 0 for s in scenarios[:4] for value in s.cpu_baseline + s.cpu_ours
    )
    # The durable worker ran and marked every job it drained: a warm-up of 5,
    # then two rounds of 5 (P9 checks its own rows: all queued).
    assert drained == 5 + 2 * 5


def test_p10_runs_with_tiny_counts(redis_url):
    """P10 checks its own count at the broker each round (it raises
    otherwise)."""
    client = redis.Redis.from_url(redis_url)
    task = dispatch.our_task(f"bench_{uuid.uuid4().hex[:10]}")
    tm = transaction.TransactionManager(explicit=True)
    try:
        scenario = dispatch.bulk(client, task, tm, rounds=2, count=30)
    finally:
        task.app.close()
    print(scenario.name, scenario.note)
    assert (len(scenario.baseline), len(scenario.ours)) == (2, 2)
    assert all(value > 0 for value in scenario.baseline + scenario.ours)
    assert scenario.note.startswith("on commit ")


def test_the_dashboard_bench_runs_with_tiny_counts(database_url, tmp_path):
    schema = f"bench_dashboard_{uuid.uuid4().hex[:8]}"  # its own, dropped after
    figures = dashboard.run(
        rows=800, rounds=2, schema=schema, explain=True, results=tmp_path
    )
    pages = [figure["page"] for figure in figures]
    print(f"pages {pages}")
    assert pages[:3] == ["overview count badges", "overview", "list, unfiltered"]
    assert len(pages) == 1 + len(dashboard.pages(dashboard.datetime.now()))
    assert all(0 < figure["p50_ms"] <= figure["max_ms"] for figure in figures)
    [plans] = tmp_path.glob("dashboard-*-plans.txt")
    assert plans.read_text().count("Index") > len(pages)
    engine = sqlalchemy.create_engine(database_url)
    with engine.connect() as connection:
        left = connection.execute(
            sqlalchemy.text("SELECT to_regnamespace(:s)"), {"s": schema}
        ).scalar()
    engine.dispose()
    assert left is None


def test_the_paired_ratio_reads_each_round_beside_its_baseline():
    """A machine that slows down across a run moves both rounds of a pair:
    two pairs of three read 1.25 here, while the two medians, taken from
    different rounds, read 1.5."""
    from bench.harness import Scenario

    slow = Scenario("t", "<= 1.30", ours=[1.25, 2.5, 5.0], baseline=[1.0, 2.0, 4.0])
    assert (slow.ratio, slow.paired) == (1.25, 1.25)
    drift = Scenario("t", "<= 1.30", ours=[1.25, 1.5, 10.0], baseline=[1.0, 1.0, 8.0])
    assert (drift.ratio, drift.paired) == (1.5, 1.25)
    assert "(paired 1.250)" in drift.row()
    speed = Scenario(
        "t", ">= 0.80", ours=[5.0, 1.0], baseline=[4.0, 0.5], higher_is_better=True
    )
    assert speed.paired == (0.8 + 0.5) / 2


_SPINNER = """
import sys, time
print("ready", flush=True)
for line in sys.stdin:
    end = time.process_time() + 0.1
    while time.process_time() < end:
        pass
    print("done", flush=True)
"""


def test_the_cpu_meter_reads_each_process_on_its_own_clock(monkeypatch):
    """CPUMeter reads the CPU time of the processes it is given, each on its
    own clock (a child's 100 ms of work, not this process's), and a process
    that ends meanwhile counts nothing; the ratio reads as the time's."""
    from bench.harness import CPUMeter, Scenario

    monkeypatch.setattr(CPUMeter, "SERVICES", ())  # the child alone
    child = subprocess.Popen(
        [sys.executable, "-c", _SPINNER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def spin_child():
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "done\n"

    try:
        assert child.stdout.readline() == "ready\n"  # its start-up done
        meter = CPUMeter(child.pid)
        meter.start()
        spin_child()  # 100 ms of the child's CPU, this process waiting
        child_busy = meter.stop(1)
        meter.start()
        spin_until = time.process_time() + 0.1  # this process busy instead
        while time.process_time() < spin_until:
            pass
        child_idle = meter.stop(1)
        meter.start()
        spin_child()
        child.stdin.close()
        child.wait()
        child_ended = meter.stop(1)
    finally:
        child.kill()
        child.wait()
    print(f"busy {child_busy:.1f}, idle {child_idle:.1f}, ended {child_ended} ms")
    assert 100 <= child_busy < 250  # its 100 ms of spinning, and a little more
    assert child_idle < 10
    assert child_ended == 0

    slow = Scenario(
        "t", "<= 1.30", ours=[1.0], baseline=[1.0], cpu_ours=[3.0], cpu_baseline=[2.0]
    )
    assert slow.cpu_ratio == 1.5
    assert slow.row().endswith("(paired 1.000) (cpu 1.500)")
    speed = Scenario(
        "t",
        ">= 0.80",
        ours=[1.0],
        baseline=[1.0],
        cpu_ours=[4.0],
        cpu_baseline=[2.0],
        higher_is_better=True,
    )
    assert speed.cpu_ratio == 0.5
    assert Scenario("t", "<= 1.30", ours=[1.0], baseline=[1.0]).cpu_ratio is None
