"""``tasks-celery CONFIG_URI jobs COMMAND`` over the job service: each
command's output, its refusals (one line on stderr, exit status 1, nothing
changed) and ``drain`` with the real worker it starts.

The commands run in-process through ``main`` on the probe app's INI (a
PostgreSQL schema, Redis and a queue of the test's own); the service tests
(tests/test_jobs_service.py) cover what the commands do to the jobs.
"""

import io
import json
import re
import textwrap
import time
from datetime import UTC, datetime, timedelta

import pytest

from pyramid_tasks.cli import main
from pyramid_tasks.jobs import cli as jobs_cli
from pyramid_tasks.jobs.service import JOB_KEYS, JobService

from .conftest import free_port, overlay_ini, wait_for
from .test_jobs_cli import celery_app_option  # noqa: F401 (a fixture)
from .test_jobs_service import add_jobs
from .test_jobs_worker import SECTION, Probe, web_app


@pytest.fixture
def ini(tmp_path, ini_vars):
    settings = {"probe.redis_url": ini_vars["redis_url"]}
    return overlay_ini(tmp_path / "jobs.ini", SECTION, ini_vars, settings)


@pytest.fixture
def app(tmp_path, ini_vars, ini):
    # The INI's app, loaded once more by each command; it makes the schema.
    app = web_app(tmp_path, ini_vars, "web")
    yield app
    app.close()


@pytest.fixture
def service(app):
    return JobService.from_registry(app.pyramid_registry)


# A line of the INI's logging (the service logs each action at INFO).
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO) ")


# The commands set up the INI's logging in this process: its handler writes to
# the test's captured stderr, closed once the test ends; undone after each.
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def jobs(ini, capsys):
    """Run ``jobs ARGS...``: ``(status, stdout, stderr without log lines)``."""

    def run(*args):
        status = main([str(ini), "jobs", *args])
        out, err = capsys.readouterr()
        err = "".join(
            line for line in err.splitlines(keepends=True) if not LOG_LINE.match(line)
        )
        return status, out, err

    return run


def refused(jobs, *args):
    """The one line of a refused command (exit status 1, nothing printed)."""
    status, out, err = jobs(*args)
    assert (status, out) == (1, "")
    assert err.count("\n") == 1, err
    return err.removeprefix("tasks-celery: error: ").rstrip("\n")


NOW = datetime(2026, 12, 2, 3, 20, 11, 123456, tzinfo=UTC)


def test_list_one_line_a_job_newest_first(jobs, service, app):
    queue = app.conf.task_default_queue
    assert jobs("list") == (0, "There are no jobs.\n", "")
    add_jobs(
        service,
        {"id": "old", "created_at": NOW - timedelta(hours=1), "state": "failed"},
        {"id": "new", "created_at": NOW, "title": "Monthly report"},
        {"id": "other", "created_at": NOW, "queue": "q", "state": "succeeded"},
    )
    status, out, err = jobs("list")
    assert (status, err) == (0, "")
    pad = " " * (len(queue) - 1)
    assert out == textwrap.dedent(f"""\
        2026-12-02 03:20:11  other  q{pad}  succeeded  tests.jobs_probe_app.plain
        2026-12-02 03:20:11  new  {queue}  queued     Monthly report
        2026-12-02 02:20:11  old  {queue}  failed     tests.jobs_probe_app.plain
        """)
    # Every option reaches the service.
    assert (
        jobs("list", "--state", "queued", "--state", "failed", "--limit", "1")[
            1
        ].split()[2]
        == "new"
    )
    assert jobs("list", "--before", "new")[1].split()[2] == "old"
    assert jobs("list", "--queue", "q", "--name", "tests.jobs_probe_app.plain")[
        1
    ].split()[2] == ("other")
    assert jobs("list", "--title", "MONTHLY")[1].split()[2] == "new"

    status, out, err = jobs("list", "--json", "--limit", "2")
    found = json.loads(out)
    assert [job["id"] for job in found] == ["other", "new"]
    assert [tuple(job) for job in found] == [JOB_KEYS] * 2
    assert found == service.list(limit=2)
    assert jobs("list", "--json", "--state", "dead") == (0, "[]\n", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--state", "done"], "jobs list: unknown state 'done': expected one of "),
        (["--limit", "0"], "jobs list: bad limit 0: expected 1 to 1000"),
        (["--limit", "x"], "jobs list: bad limit 'x': not a whole number"),
        (["--queue", "nowhere"], "jobs list: unknown queue 'nowhere': not configured"),
        (["--before", "nope"], "jobs list: bad before 'nope': no job has that id"),
    ],
)
def test_list_refuses_bad_options(jobs, app, args, message):
    assert refused(jobs, "list", *args).startswith(message)


def test_show_every_field(jobs, service):
    [job_id] = add_jobs(
        service,
        {
            "id": "j1",
            "created_at": NOW,
            "args": [1, {"a": [2, 3]}],
            "state": "failed",
            "error": "ValueError: it fails",
            "traceback": "Traceback (most recent call last):\n  ...\n"
            "ValueError: it fails\n",
            "progress": 40,
            "progress_message": "two of five",
        },
    )
    status, out, err = jobs("show", job_id)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[:2] == [
        "id:               j1",
        "name:             tests.jobs_probe_app.plain",
    ]
    assert "title:            -" in lines
    text = "\n".join(lines)
    assert (
        'args:\n  [\n    1,\n    {\n      "a": [\n        2,\n        3\n      ]\n'
        "    }\n  ]\n"
    ) in text
    assert "kwargs:           {}" in lines and "options:          {}" in lines
    assert "created_at:       2026-12-02T03:20:11.123456+00:00" in lines
    assert "error:            ValueError: it fails" in lines
    assert (
        "traceback:\n  Traceback (most recent call last):\n    ...\n"
        "  ValueError: it fails\nprogress:         40 % (two of five)"
    ) in text
    assert [line.split(":")[0] for line in lines if not line.startswith(" ")] == list(
        JOB_KEYS
    )

    status, out, err = jobs("show", job_id, "--json")
    assert json.loads(out) == service.get(job_id)
    assert refused(jobs, "show", "nope") == "jobs show: no job has the id 'nope'"


def test_cancel_retry_and_their_refusals(jobs, service, redis_client, ini, capsys):
    queued, done, failed = add_jobs(
        service, {}, {"state": "succeeded"}, {"state": "failed", "lost": 2}
    )
    assert refused(jobs, "cancel", queued, "nope") == (
        "jobs cancel: no job has the id 'nope'"
    )
    assert refused(jobs, "retry", failed, queued) == (
        f"jobs retry: job {queued} is queued: only a failed, cancelled or dead "
        "job is retried"
    )
    assert service.get(queued)["state"] == "queued"
    assert service.get(failed)["state"] == "failed"

    assert jobs("cancel", queued, done) == (
        0,
        f"Cancelled job {queued} (it was queued).\n"
        f"Job {done} is already succeeded: left as it is.\n",
        "",
    )
    assert jobs("cancel", queued) == (
        0,
        f"Job {queued} is already cancelled: left as it is.\n",
        "",
    )
    assert main([str(ini), "jobs", "retry", queued, failed]) == 0
    out, err = capsys.readouterr()
    assert out == (
        f"Job {queued} (it was cancelled) is queued again.\n"
        f"Job {failed} (it was failed) is queued again.\n"
    )
    # One line a job on the step's own logger, named as every job line is.
    queue = service.app.conf.task_default_queue
    assert [
        line.split("] ", 1)[1] for line in err.splitlines() if ".retried]" in line
    ] == [
        f"Job tests.jobs_probe_app.plain[{queued}] retried by an operator (it was "
        f"cancelled), queued: queue {queue}",
        f"Job tests.jobs_probe_app.plain[{failed}] retried by an operator (it was "
        f"failed), queued: queue {queue}",
    ]
    row = service.get(failed)
    assert (row["state"], row["lost"], row["finished_at"]) == ("queued", 0, None)
    assert redis_client.llen(service.app.conf.task_default_queue) == 2
    redis_client.delete(service.app.conf.task_default_queue)


def test_cancel_names_a_job_deleted_meanwhile():
    # The service found no row left (pruned between its read and its UPDATE).
    class Deleted:
        def cancel(self, ids):
            return [
                {"id": i, "state_before": None, "state": None, "cancelled": False}
                for i in ids
            ]

    out = io.StringIO()
    options = jobs_cli.parse(["cancel", "gone"])
    assert jobs_cli.cancel(Deleted(), options, out) == 0
    assert out.getvalue() == "Job gone no longer exists: not cancelled.\n"


def test_retry_with_the_broker_down_leaves_the_job_to_the_relay(
    tmp_path, ini_vars, service, capsys
):
    down = dict(ini_vars, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    settings = {"probe.redis_url": ini_vars["redis_url"]}
    ini = overlay_ini(tmp_path / "down.ini", SECTION, down, settings)
    [failed] = add_jobs(service, {"state": "failed"})

    assert main([str(ini), "jobs", "retry", failed]) == 0
    out = capsys.readouterr().out
    assert out == (
        f"Job {failed} (it was failed) is pending: the relay sends it when the "
        "broker takes it.\n"
    )
    status = main([str(ini), "jobs", "depth"])
    out = capsys.readouterr().out
    queue = service.app.conf.task_default_queue
    assert (status, out.splitlines()[1].split()[:3]) == (0, [queue, "1", "?"])


def test_clear_and_test(jobs, service, app, redis_client):
    queue = app.conf.task_default_queue
    assert refused(jobs, "clear", queue, "nowhere") == (
        "jobs clear: unknown queue 'nowhere': not configured and no job has it"
    )
    assert refused(jobs, "test", "--queue", "nowhere").startswith(
        "jobs test: unknown queue 'nowhere'"
    )
    status, out, err = jobs("test")
    test_id = out.strip()
    assert (status, out, err) == (0, f"{test_id}\n", "")
    row = service.get(test_id)
    assert (row["name"], row["queue"], row["state"]) == (
        "pyramid_tasks.jobs.test",
        queue,
        "queued",
    )
    assert redis_client.llen(queue) == 1
    add_jobs(service, {"state": "pending"}, {"queue": "second"})
    assert jobs("clear", queue) == (
        0,
        f"Queue {queue}: 2 waiting job(s) cancelled, 1 message(s) purged at the "
        "broker.\n",
        "",
    )
    assert jobs("clear") == (
        0,
        f"Queue {queue}: 0 waiting job(s) cancelled, 0 message(s) purged at the "
        "broker.\nQueue second: 1 waiting job(s) cancelled, 0 message(s) purged "
        "at the broker.\n",
        "",
    )
    add_jobs(service, {"state": "scheduled"}, {"state": "pending"})
    assert jobs("clear", queue) == (
        0,
        f"Queue {queue}: 1 waiting job(s) cancelled, not purged at the broker: 1 "
        "scheduled job(s) have their messages there (workers drop the cancelled "
        "ones).\n",
        "",
    )


def test_clear_with_the_broker_down(tmp_path, ini_vars, service, capsys):
    down = dict(ini_vars, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    settings = {"probe.redis_url": ini_vars["redis_url"]}
    ini = overlay_ini(tmp_path / "down.ini", SECTION, down, settings)
    add_jobs(service, {})
    assert main([str(ini), "jobs", "clear"]) == 0
    queue = service.app.conf.task_default_queue
    assert capsys.readouterr().out == (
        f"Queue {queue}: 1 waiting job(s) cancelled, the broker did not answer.\n"
    )


def test_depth_table_and_json(jobs, service, app, redis_client):
    queue = app.conf.task_default_queue
    probe = Probe(app, redis_client)
    probe.commit("record_once", (probe.key(),), (probe.key(),))
    ages = (150, 3 * 3600, 3 * 86400)
    add_jobs(
        service,
        *(
            {
                "queue": q,
                "state": "pending",
                "created_at": datetime.now(UTC) - timedelta(seconds=s),
            }
            for q, s in zip(("a", "bb", "c"), ages, strict=True)
        ),
        {"queue": "a", "state": "scheduled"},
        {"queue": "d", "state": "succeeded"},
    )
    status, out, err = jobs("depth", "--include-scheduled")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    width = len(queue)
    assert lines[0] == f"{'QUEUE':<{width}}  WAITING  BROKER  OLDEST  SCHEDULED"
    assert [line.split() for line in lines[1:]] == [
        ["a", "1", "0", "2.5m", "1"],
        ["bb", "1", "0", "3.0h", "0"],
        ["c", "1", "0", "3.0d", "0"],
        ["d", "0", "0", "-", "0"],
        [queue, "2", "2", lines[5].split()[3], "0"],
    ]
    assert lines[5].split()[3].endswith("s")
    assert jobs("depth")[1].splitlines()[0].endswith("OLDEST")

    status, out, err = jobs("depth", "--json")
    found = json.loads(out)
    assert [tuple(entry) for entry in found] == [
        ("queue", "waiting", "broker", "oldest_waiting_age")
    ] * 5
    assert [(e["queue"], e["waiting"], e["broker"]) for e in found] == [
        ("a", 1, 0),
        ("bb", 1, 0),
        ("c", 1, 0),
        ("d", 0, 0),
        (queue, 2, 2),
    ]
    assert (
        "scheduled" in json.loads(jobs("depth", "--json", "--include-scheduled")[1])[0]
    )
    redis_client.delete(queue)
    probe.close()


def test_prune_prints_the_counts(jobs, service):
    old = datetime.now(UTC) - timedelta(days=10)
    add_jobs(
        service,
        *(
            {"state": "succeeded", "created_at": old, "finished_at": old}
            for _ in range(3)
        ),
        {"state": "failed", "created_at": old, "finished_at": old},
        {"state": "queued", "created_at": old},
    )
    assert refused(jobs, "prune", "--older-than", "soon") == (
        "jobs prune: bad older_than 'soon': expected a duration such as 90, 30s, "
        "15m, 12h, 7d"
    )
    assert refused(jobs, "prune", "--state", "queued").startswith(
        "jobs prune: unknown finished state 'queued'"
    )
    assert jobs("prune", "--older-than", "30d") == (
        0,
        "Deleted 0 finished job(s): 0 succeeded, 0 failed, 0 cancelled, 0 dead.\n",
        "",
    )
    assert jobs("prune", "--state", "failed") == (
        0,
        "Deleted 1 finished job(s): 1 failed.\n",
        "",
    )
    assert jobs("prune")[1] == (
        "Deleted 3 finished job(s): 3 succeeded, 0 failed, 0 cancelled, 0 dead.\n"
    )
    assert [job["state"] for job in service.list()] == ["queued"]


def test_usage_errors_name_the_commands(jobs):
    status, out, err = jobs("nope")
    assert (status, out) == (1, "")
    assert "invalid choice: 'nope' (choose from 'list', 'show', 'cancel'" in err
    status, _out, err = jobs("cancel")
    assert "the following arguments are required: ID" in err


# -- drain ------------------------------------------------------------------------


def test_drain_runs_a_worker_until_the_queue_is_empty(jobs, app, service, redis_client):
    probe = Probe(app, redis_client)
    keys = [probe.key() for _ in range(5)]
    ids = probe.commit("record_once", *((key,) for key in keys))
    started = time.monotonic()
    status, out, err = jobs("drain", "--timeout", "1m")
    elapsed = time.monotonic() - started
    print(f"drain of 5 jobs: {elapsed:.1f} s\n{err[-3000:]}")
    queue = app.conf.task_default_queue
    assert (status, out) == (0, f"Drained {queue}: nothing waits or runs.\n")
    assert [service.get(i)["state"] for i in ids] == ["succeeded"] * 5
    assert [probe.effects(key) for key in keys] == [1] * 5
    assert redis_client.llen(queue) == 0
    probe.close()


def test_drain_times_out_naming_what_is_left(jobs, app, service, capsys):
    # Pending, of a task no worker knows: the relay never sends it.
    add_jobs(service, {"state": "pending", "name": "no.such.task"})
    queue = app.conf.task_default_queue
    status, out, err = jobs("drain", "--queue", queue, "--timeout", "2s")
    assert (status, out) == (1, "")
    assert err.splitlines()[-1] == (
        f"tasks-celery: error: jobs drain: timed out after 2s: queue {queue}: 1 "
        "job(s) waiting or running, 0 message(s) at the broker"
    )
    assert refused(jobs, "drain", "--timeout", "later").startswith(
        "jobs drain: bad timeout 'later'"
    )
    assert refused(jobs, "drain", "--queue", "nowhere").startswith(
        "jobs drain: unknown queue 'nowhere'"
    )


def test_drain_does_not_wait_for_scheduled_or_retrying_jobs(jobs, app, service):
    # Both wait for an eta an hour away; neither has a message in the queue.
    later = datetime.now(UTC) + timedelta(hours=1)
    add_jobs(service, {"state": "scheduled", "eta": later})
    add_jobs(service, {"state": "retrying", "eta": later})
    queue = app.conf.task_default_queue
    status, out, _err = jobs("drain", "--timeout", "20s")
    assert (status, out) == (0, f"Drained {queue}: nothing waits or runs.\n")


def test_drain_waits_while_the_broker_does_not_answer(tmp_path, ini_vars, app, capsys):
    # The table shows nothing left; the broker (a closed port) cannot say.
    down = dict(ini_vars, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    settings = {"probe.redis_url": ini_vars["redis_url"]}
    ini = overlay_ini(tmp_path / "down.ini", SECTION, down, settings)
    queue = app.conf.task_default_queue
    status = main([str(ini), "jobs", "drain", "--timeout", "1s"])
    out, err = capsys.readouterr()
    assert (status, out) == (1, "")
    assert err.splitlines()[-1] == (
        f"tasks-celery: error: jobs drain: timed out after 1s: queue {queue}: 0 "
        "job(s) waiting or running, the broker did not answer"
    )


def test_drain_without_the_job_table_says_so_as_the_other_commands(
    tmp_path, ini_vars, capsys
):
    # The demo's app on a fresh schema, told not to create its tables.
    settings = {"demo.create_tables": "false", "pyramid.includes": "pyramid_tasks.jobs"}
    ini = overlay_ini(tmp_path / "bare.ini", "main", ini_vars, settings)
    errors = []
    for command in (["depth"], ["drain", "--timeout", "1m"]):
        status = main([str(ini), "jobs", *command])
        out, err = capsys.readouterr()
        assert (status, out) == (1, "")
        errors.append(err.splitlines()[-1].split(": ", 3)[-1])
    assert errors[0] == errors[1]
    assert errors[0].startswith("The job table pyramid_tasks_job does not exist in ")


def test_drain_when_its_worker_exits(app, monkeypatch, ini, capsys):
    monkeypatch.setattr(jobs_cli, "_WORKER", "import sys; sys.exit(3)")
    add_jobs(JobService.from_registry(app.pyramid_registry), {})
    status = main([str(ini), "--var", "unused=1", "jobs", "drain", "--timeout", "1m"])
    out, err = capsys.readouterr()
    assert (status, out) == (1, "")
    assert err == "tasks-celery: error: jobs drain: its worker exited with status 3\n"


def test_drain_stops_a_worker_that_ignores_sigterm(monkeypatch):
    import subprocess
    import sys

    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            # Deaf to SIGTERM, waiting for signals until it is killed.
            "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True)\nwhile True: signal.pause()",
        ],
        stdout=subprocess.PIPE,
    )
    assert worker.stdout.readline() == b"ready\n"
    jobs_cli._stop(worker, timeout=0.5)
    assert worker.returncode == -9
    wait_for(lambda: worker.poll() is not None)


def test_the_documented_json_keys_are_the_keys(jobs, service):
    """docs/operating.rst lists the keys of a job's JSON in their order, and
    shows a real ``show --json``: both are what the command prints."""
    from .conftest import ROOT

    doc = (ROOT / "docs" / "operating.rst").read_text()
    listed = doc.split(
        "each an\nobject with every column of the table, always these keys"
    )[1]
    listed = listed.split("\n\n")[1]
    assert tuple(re.findall(r"``(\w+)``", listed)) == JOB_KEYS
    shown = doc.split("jobs show 9a70c1e6-e815-4892-a46c-50d05fb3955c --json\n")[1]
    shown = json.loads(textwrap.dedent(shown.split("\n\n")[0]))
    [job_id] = add_jobs(service, {})
    assert tuple(shown) == tuple(json.loads(jobs("show", job_id, "--json")[1]))
    depth = doc.split("jobs depth --json --include-scheduled\n")[1]
    depth = json.loads(textwrap.dedent(depth.split("\n\n")[0]))
    assert tuple(depth[0]) == tuple(
        json.loads(jobs("depth", "--json", "--include-scheduled")[1])[0]
    )
