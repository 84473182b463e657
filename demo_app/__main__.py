"""``python -m demo_app [CONFIG] [--host H] [--port N]``: web server, worker and beat.

A small supervisor: it starts ``tasks-celery CONFIG -- worker -B`` and the web
server as child processes (each in its own process group), prints the URL, and
on Ctrl+C, SIGTERM or SIGHUP, or as soon as one of them exits, stops them all
and waits until none of their processes is left.  It serves where the INI's
``tasks.site_url`` says unless ``--host`` or ``--port`` say otherwise; the
tasks' links then follow (``SITE_URL`` in the children's environment).
Exits 0 when stopped by a signal, 1 when a child exited on its own or had
to be killed, 2 when it could not start (a bad argument, a port in use).
A closed terminal stops it as SIGHUP does: what it can no longer print is
dropped.
"""

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from plaster import get_settings

# Each of these stops the demo, whatever disposition we inherited: a shell
# starting us in the background with ``&`` leaves SIGINT ignored (and Python
# then installs no handler of its own); a closed terminal sends SIGHUP, which
# would kill only us and leave the children (in their own groups) running.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """Turns the first stop signal into :class:`_Stop`, once, when armed.

    Installed first thing, so no stop signal is lost while the settings are
    read.  Until :meth:`arm` a signal is only remembered, so a child is never
    started without being recorded; after the first one, further signals are
    only remembered, so stopping the children is never cut short.
    """

    def __init__(self):
        self.received = []
        self.armed = False
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received.append(signum)
        if self.armed:
            self.armed = False
            raise _Stop(signum)

    def check(self):
        """Raise :class:`_Stop` for a signal already received."""
        if self.received:
            raise _Stop(self.received[0])

    def arm(self):
        self.check()
        self.armed = True


def _say(text, stream=None):
    """Print ``text``, or nothing if it cannot be printed (a closed terminal).

    Unbuffered: a line that failed is not left to fail again at exit.
    """
    stream = stream or sys.stdout
    with contextlib.suppress(OSError, ValueError):
        os.write(stream.fileno(), f"{text}\n".encode())


def _adopt_orphans():
    """Be the parent of whatever the children leave behind (Linux only).

    A worker whose main process dies orphans its pool and beat.  Re-parented
    to us rather than to init, they are reaped here as soon as they end, so
    their process group is seen gone at once: an init that reaps late (or
    never, as in a container) would otherwise leave it "running" as zombies.
    """
    if sys.platform == "linux":
        PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


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


def _address(config, host, port):
    """Where to serve, its URL, and the environment telling the tasks' links so."""
    site = urlsplit(get_settings(config, "app:main").get("tasks.site_url", ""))
    host = host or site.hostname or "127.0.0.1"
    port = port or site.port or 6543
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    # The demo_app's own environment override (demo_app.ENVIRONMENT); one the
    # user exported wins.
    return host, port, url, {"SITE_URL": url, **os.environ}


def _port(text):
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1 to 65535)")
    return int(text)


def _bind_error(host, port):
    """Why the web server could not listen on ``host:port``, or None.

    Checked before anything starts: the demo then stops with one line, not
    the web server's traceback and a worker started for nothing.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # waitress's
            probe.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _stop(children, timeout):
    """Stop each child, then wait until no process of its group is left.

    A child still running gets SIGTERM, itself only: the worker stops its own
    pool and beat (signalling those directly would race its warm shutdown).
    A child that has ended (on its own, or since) may have left processes in
    its group: the group gets SIGTERM, each second.  Each child leads its own group, so
    what they started is waited for too, and killed if it outlives the
    timeout.  Returns the names of the children killed.
    """
    for process in children.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout  # all were sent SIGTERM at once
    next_sigterm = {}
    killed = []
    for name, process in children.items():
        while _group_alive(children, process):
            if process.returncode is not None and (
                time.monotonic() >= next_sigterm.get(name, 0)
            ):
                # Orphans: no parent stops them in order, and Celery's beat
                # can lose a SIGTERM during its start-up: one each second.
                _signal_group(process.pid, signal.SIGTERM)
                next_sigterm[name] = time.monotonic() + 1
            elif time.monotonic() > deadline:
                # Kill first: saying so may fail (a closed terminal).
                leader_ran = process.returncode is None
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
                if leader_ran:
                    _say(
                        f"demo: the {name} did not stop within {timeout:g} s of "
                        "SIGTERM; killed its process group",
                        sys.stderr,
                    )
                else:
                    _say(
                        f"demo: processes the {name} left behind still ran "
                        f"{timeout:g} s after the stop began; killed them",
                        sys.stderr,
                    )
                killed.append(name)
                break
            else:
                time.sleep(0.05)
    # SIGKILL cannot be refused: the rest of a killed group ends at once.
    # Reaped here, none is left a zombie for an init that may never reap.
    end = time.monotonic() + 1
    while time.monotonic() < end and any(
        _group_alive(children, children[name]) for name in killed
    ):
        time.sleep(0.05)
    return killed


def _signal_group(pgid, signum):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _reap(children):
    """Reap every process of ours that has ended: a child, or an adopted orphan."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        _ended(children, pid, status)


def _ended(children, pid, status):
    """The name of the child ``pid`` (None for an orphan), its status recorded."""
    for name, process in children.items():
        if process.pid == pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return name
    return None


def _group_alive(children, process):
    _reap(children)
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def _how(returncode):
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def main(argv=None):
    signals = _Signals()
    parser = argparse.ArgumentParser(prog="python -m demo_app", description=__doc__)
    parser.add_argument("config", nargs="?", default="conf/local.ini")
    parser.add_argument(
        "--host", help="default: the host of tasks.site_url, else 127.0.0.1"
    )
    parser.add_argument(
        "--port", type=_port, help="default: the port of tasks.site_url, else 6543"
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30,
        metavar="SECONDS",
        help="how long each child may take to stop before it is killed "
        "(default: %(default)s; the worker's warm shutdown takes about 6 s)",
    )
    args = parser.parse_args(argv)
    config = os.path.abspath(args.config)
    if not os.path.isfile(config):
        parser.error(f"config file {args.config} not found")
    host, port, url, environ = _address(config, args.host, args.port)
    error = _bind_error(host, port)
    if error:
        parser.error(f"cannot serve on {url}/: {error} (see --host and --port)")

    _adopt_orphans()
    children = {}
    status = 0
    try:
        signals.check()  # one received so far: nothing to start
        for name, command in _commands(config, host, port).items():
            children[name] = subprocess.Popen(
                command, start_new_session=True, env=environ
            )
        _say(f"demo: {url}/ (Ctrl+C stops the web server, the worker and beat)")
        signals.arm()
        ended = None
        while ended is None:  # until a child ends, or a stop signal
            ended = _ended(children, *os.wait())
        signals.armed = False
        others = " and ".join(name for name in children if name != ended)
        how = _how(children[ended].returncode)
        _say(f"demo: the {ended} {how}; stopping the {others}", sys.stderr)
        status = 1
    except _Stop as stop:
        name = signal.Signals(stop.signum).name
        if children:
            _say(f"demo: {name}: stopping the web server, the worker and beat")
        else:
            _say(f"demo: {name}: nothing started")
    finally:
        signals.armed = False
        if _stop(children, args.stop_timeout):
            status = 1
    _say("demo: stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
