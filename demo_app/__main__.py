"""``python -m demo_app [CONFIG] [--port N]``: the demo's web server, worker and beat.

A small supervisor: it starts ``tasks-celery CONFIG -- worker -B`` and the web
server as child processes (each in its own process group), prints the URL, and
on Ctrl+C or SIGTERM, or as soon as one of them exits, stops them all and waits
until none of their processes is left.
"""

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from plaster import get_settings


def _commands(config, host, port):
    settings = get_settings(config, "app:main")
    var_dir = Path(settings.get("demo.var_dir", "var"))
    var_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    worker = [
        str(bin_dir / "tasks-celery"),
        config,
        "--",
        "worker",
        "--beat",
        "--schedule",
        str(var_dir / "celerybeat-schedule"),
        "--concurrency",
        "2",
        "--hostname",
        "demo@%h",
        "--loglevel",
        "info",
    ]
    web = [
        sys.executable,
        "-m",
        "demo_app.web",
        config,
        "--host",
        host,
        "--port",
        str(port),
    ]
    return {"worker and beat": worker, "web server": web}


def _stop(children, timeout=15):
    """Stop each child, then wait until no process of its group is left.

    Only the leaders get SIGTERM: the worker stops its own pool and beat
    (signalling those directly would race its warm shutdown).  Each child
    leads its own group, so what they started is waited for too, and killed
    if it outlives the timeout.
    """
    for process in children.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for name, process in children.items():
        while _group_alive(process):
            if time.monotonic() > deadline:
                print(f"demo: the {name} did not stop; killing it", file=sys.stderr)
                _signal_group(process.pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
            time.sleep(0.05)


def _signal_group(pgid, signum):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _group_alive(process):
    process.poll()  # reap the leader once it exits
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo_app", description=__doc__)
    parser.add_argument("config", nargs="?", default="conf/local.ini")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6543)
    args = parser.parse_args(argv)
    config = os.path.abspath(args.config)
    if not os.path.isfile(config):
        parser.error(f"config file {args.config} not found")

    # SIGTERM stops us the way Ctrl+C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    children = {}
    status = 0
    try:
        for name, command in _commands(config, args.host, args.port).items():
            children[name] = subprocess.Popen(command, start_new_session=True)
        print(
            f"demo: http://{args.host}:{args.port}/ (Ctrl+C stops the web server, "
            "the worker and beat)",
            flush=True,
        )
        pid, _ = os.wait()  # until one of them ends, or Ctrl+C
        ended = next(name for name, p in children.items() if p.pid == pid)
        print(f"demo: the {ended} exited; stopping the others", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("demo: stopping", flush=True)
    finally:
        _stop(children)
    return status


if __name__ == "__main__":
    sys.exit(main())
