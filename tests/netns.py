"""Hosts of a test's own in Linux network namespaces (tests/test_multihost.py).

:func:`network` builds a bridge with an address on a private subnet
(``10.231.X.0/24``, X picked at random among those not in use here) and one
network namespace per host, joined to the bridge by a veth pair.  The root
namespace keeps the bridge's address (``.1``): the services the hosts use
listen there, a ``redis-server`` of the test's own (:func:`redis_server`)
and forwarders (:class:`Forwarder`) to the PostgreSQL and RabbitMQ that
listen on 127.0.0.1 only.  Every name carries a token of the run, and all of
it is removed on the way out, failure or not.

Namespaces need root (CAP_NET_ADMIN) and iproute2.  Where they cannot be
made the tests skip, and under ``CI=true`` fail: CI runs as root on these
machines (``.ci/run`` installs packages), so it can make them.
"""

import os
import random
import shutil
import socket
import subprocess
import threading
import uuid
from contextlib import ExitStack, contextmanager, suppress

import pytest

from . import conftest

IP = shutil.which("ip", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or "ip"


def _ip(*args):
    return subprocess.run(
        [IP, *map(str, args)], check=True, capture_output=True, text=True
    )


class Host:
    """One host: a network namespace with one address on the bridge."""

    def __init__(self, name, namespace, address, veth):
        self.name = name
        self.namespace = namespace
        self.address = address
        self.veth = veth  # the root namespace's end of its veth pair

    def command(self, *argv):
        """``argv`` run in this host's namespace (environment and working
        folder pass through ``ip netns exec``, so does coverage)."""
        return [IP, "netns", "exec", self.namespace, *map(str, argv)]

    @contextmanager
    def cut(self):
        """The host's cable pulled: its veth down at the bridge, then up.

        Its packets are dropped meanwhile; no connection is closed, so each
        side's TCP resends what was lost once the link is back.
        """
        _ip("link", "set", self.veth, "down")
        try:
            yield
        finally:
            _ip("link", "set", self.veth, "up")


class Network:
    """The bridge and the hosts named ``names``, on a /24 of their own."""

    def __init__(self, stack, names):
        self.token = uuid.uuid4().hex[:6]
        used = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
        third = next(
            n for n in random.sample(range(256), 256) if f"10.231.{n}." not in used
        )
        self.subnet = f"10.231.{third}.0/24"
        self.address = f"10.231.{third}.1"  # the bridge's: the services'
        self.bridge = f"ptb{self.token}"
        _ip("link", "add", self.bridge, "type", "bridge")
        stack.callback(_ip, "link", "del", self.bridge)
        _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.hosts = {}
        for index, name in enumerate(names):
            namespace = f"pt-{self.token}-{name}"
            _ip("netns", "add", namespace)
            stack.callback(_ip, "netns", "del", namespace)
            outer, inner = f"pt{self.token}{index}r", f"pt{self.token}{index}n"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            # Deleting either end deletes the pair; the namespace's end goes
            # with the namespace, so this runs first (last in, first out).
            stack.callback(_ip, "link", "del", outer)
            _ip("link", "set", inner, "netns", namespace)
            _ip("link", "set", outer, "master", self.bridge, "up")
            address = f"10.231.{third}.{10 + index}"
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inner)
            _ip("-n", namespace, "link", "set", inner, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            self.hosts[name] = Host(name, namespace, address, outer)

    def __getitem__(self, name):
        return self.hosts[name]

    def by_address(self, address):
        """The name of the host whose address is ``address``."""
        return {host.address: name for name, host in self.hosts.items()}[address]


def cannot_make_namespaces(error):
    message = (
        f"network namespaces cannot be made here ({error}): the multi-host "
        "tests need root (CAP_NET_ADMIN) and iproute2's ip"
    )
    if conftest.IN_CI:
        pytest.fail(f"{message} (CI=true: CI runs as root and can make them)")
    pytest.skip(message)


@contextmanager
def network(names):
    """A :class:`Network` of the hosts ``names``, removed on the way out."""
    with ExitStack() as stack:
        try:
            built = Network(stack, names)
        except (OSError, subprocess.CalledProcessError) as exc:
            stack.close()  # what was made before the failure
            cannot_make_namespaces(getattr(exc, "stderr", None) or exc)
        yield built


@contextmanager
def redis_server(address, folder):
    """The URL of a ``redis-server`` of the caller's own listening on
    ``address`` (the bridge's: every host reaches it), ended by its PID on
    the way out."""
    with conftest.redis_server(folder, address) as (url, _process):
        yield url


def _pump(source, target):
    """Copy ``source`` to ``target`` until either side ends, then end both:
    a client that died (its kernel closed its socket) closes the server's
    connection too, so PostgreSQL rolls back its transaction and frees its
    locks, and RabbitMQ requeues its unacknowledged messages."""
    with suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    for sock in (source, target):
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Forwarder:
    """A TCP forwarder in the root namespace, from ``(address, self.port)``
    to ``target``: how the hosts reach a service listening on 127.0.0.1."""

    def __init__(self, address, target):
        self.target = target
        self.listener = socket.create_server((address, 0))
        self.address = address
        self.port = self.listener.getsockname()[1]
        self.sockets = set()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        with suppress(OSError):  # the listener shut down: stop
            while True:
                client, _ = self.listener.accept()
                threading.Thread(
                    target=self._serve, args=(client,), daemon=True
                ).start()

    def _serve(self, client):
        with client, socket.create_connection(self.target) as upstream:
            with self.lock:
                self.sockets |= {client, upstream}
            back = threading.Thread(target=_pump, args=(upstream, client))
            back.start()
            _pump(client, upstream)
            back.join()
            with self.lock:
                self.sockets -= {client, upstream}

    def close(self):
        """Stop accepting and end every connection still open."""
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join()
        with self.lock:
            for sock in self.sockets:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
