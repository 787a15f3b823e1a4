"""`qn serve`: a local server speaking TF Serving's REST and gRPC predict protocols.

    qn serve --model exports/qn [--port 8501] [--grpc-port 8500] [--host 127.0.0.1]

Serves the latest version under BASE/NAME (as written by `qn export`) for development and
testing clients; production deployments use tensorflow/serving (see serving/docker/).
Binds to 127.0.0.1 unless --host says otherwise: it has no authentication.
"""

from __future__ import annotations

import argparse


def register(subparsers):
    parser = subparsers.add_parser(
        "serve",
        help="serve an exported model over TF Serving's REST and gRPC APIs",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="BASE/NAME", help="exported model")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8501, help="REST port (default 8501)")
    parser.add_argument("--grpc-port", type=int, default=8500, help="gRPC port (default 8500)")
    parser.add_argument(
        "--max-request-mb", type=float, default=64.0, help="largest request accepted (MB)"
    )
    parser.add_argument("--threads", type=int, default=8, help="gRPC worker threads")
    parser.set_defaults(func=run)


def run(args) -> int:
    import signal
    import threading

    from serving.server import LocalModelServer, ServerConfig

    config = ServerConfig(
        host=args.host,
        rest_port=args.port,
        grpc_port=args.grpc_port,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        threads=args.threads,
    )
    server = LocalModelServer(args.model, config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    s = server.servable
    try:
        print(f"serving {s.name} version {s.version} from {s.version_dir}", flush=True)
        print(f"  REST: http://{args.host}:{server.rest_port}/v1/models/{s.name}:predict")
        print(f"  gRPC: {args.host}:{server.grpc_port}", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
