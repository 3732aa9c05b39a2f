"""``extproc-router envoy-config``: print the Envoy bootstrap for a values.yaml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from extproc_router.envoyconfig.render import load_values, render_bootstrap, to_yaml
from extproc_router.envoyconfig.values import ValuesError, read_values_file

__all__ = ["add_arguments", "main", "register", "run"]

_DESCRIPTION = """\
Render the Envoy bootstrap (YAML) for the gateway: listener, ext_proc filter pointing at the
router replicas, ORIGINAL_DST cluster for the model pods keyed on the `target-pod` header, and
OpenAI-shaped JSON errors for Envoy's own local replies.

The Envoy knobs come from the seed's values.yaml keys (defaults in brackets):
  gateway.clientTrafficPolicy.connection.bufferLimit            [4194304] request-body limit, bytes
  gateway.clientTrafficPolicy.connection.connectionLimit.value  [no limit]
  gateway.clientTrafficPolicy.http2.maxConcurrentStreams        [1024]
  gateway.backendTrafficPolicy.circuitBreaker.{maxConnections,maxParallelRequests,
      maxPendingRequests,maxParallelRetries,maxRequestsPerConnection}   [1024 each]
  gateway.backendTrafficPolicy.http2.maxConcurrentStreams       [1024]  (h2 pods only; pods speak HTTP/1.1)
  gateway.envoyPatchPolicy.route.timeout                        [120s]  (0 = none)
  gateway.envoyPatchPolicy.route.connectTimeout                 [6s]
  gateway.envoyPatchPolicy.circuitBreakers.{maxConnections,maxRequests,maxPendingRequests}
      [1024 each; when set, they win over backendTrafficPolicy]
Other keys of a Helm values file are ignored; unknown keys inside the three policies are errors.
"""

_EPILOG = """\
examples:
  extproc-router envoy-config > envoy.yaml
  extproc-router envoy-config -f values.yaml --extproc 10.0.0.5:50052 --extproc 10.0.0.6:50052 -o envoy.yaml
  envoy --mode validate -c envoy.yaml
"""


def _host_port(text: str) -> tuple[str, int]:
    """argparse type for HOST:PORT (IPv6 as [::1]:PORT)."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port in 1..65535, got {text!r}")
    return host, int(port_text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the envoy-config options to ``parser``."""
    parser.add_argument(
        "-f", "--values", metavar="FILE", type=Path, help="values.yaml with the gateway.* knobs (default: the defaults)"
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=_host_port,
        default=("127.0.0.1", 8888),
        help="Envoy's client listener (default 127.0.0.1:8888)",
    )
    parser.add_argument(
        "--admin-port", metavar="PORT", type=_port, default=9901, help="Envoy admin port on 127.0.0.1 (default 9901)"
    )
    parser.add_argument(
        "--extproc",
        metavar="HOST:PORT",
        type=_host_port,
        action="append",
        help="a router's ext_proc gRPC address; repeat for several replicas (default 127.0.0.1:50052)",
    )
    parser.add_argument(
        "--router-http",
        metavar="HOST:PORT",
        type=_host_port,
        default=("127.0.0.1", 8080),
        help="the router's HTTP server, which answers GET /v1/models (default 127.0.0.1:8080)",
    )
    parser.add_argument("-o", "--output", metavar="FILE", type=Path, help="write here instead of stdout")


def register(subparsers: Any) -> None:
    """Register the ``envoy-config`` subcommand on an ``add_subparsers()`` object."""
    parser = subparsers.add_parser(
        "envoy-config",
        help="print the Envoy bootstrap YAML for a values.yaml",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"extproc-router envoy-config: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Render and print (or write) the bootstrap; 2 with a message on stderr for bad values."""
    try:
        data = read_values_file(args.values)
    except ValuesError as exc:
        return _fail(str(exc))
    try:
        values = load_values(data)
    except ValuesError as exc:
        where = f"{args.values}: " if args.values is not None else ""
        return _fail(f"{where}{exc}")
    listen_host, listen_port = args.listen
    text = to_yaml(
        render_bootstrap(
            values,
            listen_host=listen_host,
            listen_port=listen_port,
            admin_port=args.admin_port,
            extproc_endpoints=args.extproc or [("127.0.0.1", 50052)],
            router_http=args.router_http,
        )
    )
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        args.output.write_text(text, encoding="utf-8")
    except OSError as exc:
        return _fail(f"cannot write {args.output}: {exc.strerror or exc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m extproc_router.envoyconfig``: the envoy-config subcommand on its own."""
    parser = argparse.ArgumentParser(
        prog="python -m extproc_router.envoyconfig",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
