"""``python -m demo_app.web CONFIG --host H --port N``: the demo's web server."""

import argparse
import contextlib
import signal

import waitress
from pyramid.paster import get_app, setup_logging


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo_app.web")
    parser.add_argument("config")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6543)
    args = parser.parse_args(argv)
    setup_logging(args.config)
    app = get_app(args.config)
    # Both stop the server, whatever disposition was inherited (a shell's
    # ``&`` leaves SIGINT ignored, and Python then keeps it so).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        waitress.serve(app, host=args.host, port=args.port, threads=4)


if __name__ == "__main__":
    main()
