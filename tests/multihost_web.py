"""The "web" host of tests/test_multihost.py: ``python -m tests.multihost_web
INI TOKEN COUNT`` loads the app of INI, waits for the test's word (the Redis
list ``TOKEN:start``), then makes COUNT requests, each committing a row of
its own and scheduling ``effect("TOKEN:<n>")``, and prints their task ids."""

import sys

import redis
from pyramid.paster import get_app
from webtest import TestApp


def main(ini, token, count):
    app = get_app(ini)
    url = app.registry.settings["multihost.redis_url"]
    with redis.Redis.from_url(url, socket_timeout=None) as client:
        client.blpop([f"{token}:start"], timeout=120)
    browser = TestApp(app)
    for index in range(count):
        print(browser.post(f"/effect/{token}:{index}").json["id"], flush=True)


main(sys.argv[1], sys.argv[2], int(sys.argv[3]))  # python -m tests.multihost_web
