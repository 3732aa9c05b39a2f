"""The `extproc-router` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from extproc_router import __version__
from extproc_router.argtypes import positive_int

if TYPE_CHECKING:
    from extproc_router.stack import LocalStack, StackOptions

CURL_LINES = """\
  # no routing-strategy header: random
  curl -s -i {url}/v1/chat/completions -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "temperature": 0.7}}'

  # least-request, streaming
  curl -s -N {url}/v1/chat/completions -H "routing-strategy: least-request" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "stream": true, "messages": [{{"role": "user", "content": "Summarize: ..."}}]}}'

  # config profile: demo-model's "low-latency" profile routes with least-request
  curl -s -i {url}/v1/chat/completions -H "config-profile: low-latency" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "temperature": 0.7}}'

  # completions API, models list, router metrics
  curl -s {url}/v1/completions -H "routing-strategy: random" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "prompt": "Say this is a test", "max_tokens": 8}}'
  curl -s {url}/v1/models
  curl -s {metrics}/metrics | grep ^extproc_
"""


PD_CURL = """\
  # prefill/decode disaggregation: the router sends the prefill call, then routes to the decode pod
  curl -s -i {url}/v1/chat/completions -H "routing-strategy: pd" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Explain quantum entanglement."}}]}}'
"""


# What `up` prints for its model-timed pods, and the README's first screen: one minute of random
# against prefix-cache on the same seeded requests, each arm on cold caches (the pods' KV caches and
# the router's prefix index are reset before it). The loadtest prints the table and writes
# report.json, summary.md and the plots to .run/loadtest/.
COMPARE_LINES = """\
  # routing quality in one minute: random vs prefix-cache on the same requests (table; plots in .run/loadtest/)
  {prog} loadtest --target {url} --compare random,prefix-cache \\
    --workload shared-prefix --rate {rate:g} --duration {duration:g} --grace 10 \\
    {pod_resets} \\
    {router_resets}
"""
COMPARE_RATE = 8.0  # Poisson requests per second: 150 requests, ~19 s of sending per arm
COMPARE_DURATION_S = 25.0  # sending time per arm, at most


def compare_command(stack: LocalStack, prog: str = "extproc-router") -> str:
    """The one-minute routing comparison against `stack` (COMPARE_LINES, filled in)."""
    pods = [f"http://127.0.0.1:{pod.port}" for pod in stack.pods if pod.model == stack.opts.model]
    routers = [f"{r.http_url}/flush_cache" for r in stack.routers]
    return COMPARE_LINES.format(prog=prog, url=stack.url, rate=COMPARE_RATE, duration=COMPARE_DURATION_S,
                                pod_resets=" ".join(f"--reset-url {u}" for u in pods),
                                router_resets=" ".join(f"--reset-url {u}" for u in routers))


def _prog_name() -> str:
    """How the user reaches this CLI: `extproc-router` when it is on PATH, else the venv's script."""
    import shutil
    from pathlib import Path

    if shutil.which("extproc-router"):
        return "extproc-router"
    script = Path(sys.executable).parent / "extproc-router"
    return os.path.relpath(script) if script.exists() else "extproc-router"


def setup_logging(level: str) -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    try:  # rich comes with the [bench] extra; a bare router install logs plain lines
        from rich.logging import RichHandler
    except ImportError:
        RichHandler = None
    if sys.stderr.isatty() and RichHandler is not None:
        logging.basicConfig(level=lvl, format="%(message)s", datefmt="%H:%M:%S",
                            handlers=[RichHandler(show_path=False, rich_tracebacks=True)])
    else:
        logging.basicConfig(level=lvl, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def _non_negative_seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


class _ServeHelpFormatter(argparse.HelpFormatter):
    """Ends the help of a `serve` flag that sets a RouterConfig field with the config's default. The
    flags themselves default to None, so the pod file's and the environment's values apply beneath
    them; the config is imported only when help is shown (it brings the routing core and statesync)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        from extproc_router.config import RouterConfig
        from routing.router import DEFAULT_STRATEGY

        value = getattr(RouterConfig(), action.dest, None)
        if value is None and action.dest == "routing_algorithm":
            value = DEFAULT_STRATEGY  # what the config's None stands for
        if action.help is None or value is None:
            return action.help
        return f"{action.help} (default {value:g})" if isinstance(value, float) else f"{action.help} (default {value})"


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc_router.config import ConfigError, build_config
    from extproc_router.discovery.static_file import DiscoveryError, read_pod_file
    from extproc_router.serve import serve

    setup_logging(args.log_level or os.environ.get("EXTPROC_ROUTER_LOG_LEVEL", "info"))
    log = logging.getLogger("extproc_router")
    if args.discovery == "file" and not args.config:
        log.error("serve: --config FILE is required with --discovery file")
        return 2
    try:
        section = read_pod_file(args.config).router if args.config else {}
        cfg = build_config(section, flags={
            "pods_file": args.config, "grpc_listen": args.grpc_listen, "http_listen": args.http_listen,
            "routing_algorithm": args.routing_algorithm, "max_body_bytes": args.max_body_bytes,
            "health_interval": args.health_interval, "shutdown_grace": args.shutdown_grace,
            "log_level": args.log_level, "protocol": args.protocol})
    except (ConfigError, DiscoveryError) as exc:
        log.error("%s", exc)
        return 2
    make_discovery = None
    if args.inference_pool and args.discovery != "kubernetes":
        log.error("serve: --inference-pool needs --discovery kubernetes")
        return 2
    if args.inference_pool and len(set(args.namespace or ())) > 1:
        log.error("serve: --inference-pool takes one --namespace (the pool's; default: default)")
        return 2
    if args.discovery == "kubernetes":
        from functools import partial

        from extproc_router.discovery.kubernetes import KubernetesDiscovery
        make_discovery = partial(KubernetesDiscovery, namespaces=tuple(args.namespace or ()),
                                 inference_pool=args.inference_pool,
                                 inference_pool_version=args.inference_pool_version)
    _install_uvloop()
    return asyncio.run(serve(cfg, make_discovery, drain_delay=args.drain_delay))


def up_options(args: argparse.Namespace) -> StackOptions:
    """The local stack `up` starts for its parsed flags."""
    from extproc_router.stack import StackOptions

    host, _, port = args.listen.rpartition(":")
    opts = StackOptions(listen_host=host or "127.0.0.1", listen_port=int(port), admin_port=args.admin_port,
                        grpc_port=args.grpc_port, http_port=args.http_port, pods=args.pods,
                        first_pod_port=args.first_pod_port, ttft_ms=args.ttft_ms, itl_ms=args.itl_ms,
                        run_dir=args.run_dir, values_file=args.values, pd=args.pd, replicas=args.replicas,
                        redis=args.redis, redis_port=args.redis_port, supervise=True, timing=args.timing,
                        kv_events=args.kv_events)
    if args.routing_algorithm:
        opts.router_env["ROUTING_ALGORITHM"] = args.routing_algorithm
    return opts


def cmd_up(args: argparse.Namespace) -> int:
    from extproc_router.stack import LocalStack

    setup_logging("info")
    log = logging.getLogger("extproc_router.up")
    if args.kv_events and args.timing != "model":
        log.error("up: --kv-events needs --timing model (KV events follow the simulated KV cache)")
        return 2
    opts = up_options(args)
    stack = LocalStack(opts)
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    timing = (f"model timing: KV cache {opts.model_timing.kv_capacity_tokens} tokens"
              + (", publishing KV events" if opts.kv_events else "") if opts.timing == "model"
              else f"fixed timing: TTFT {opts.ttft_ms:g} ms, ITL {opts.itl_ms:g} ms")
    log.info("starting %d simulated pods of %s (%s), %s%s and Envoy (logs in %s/)", args.pods, opts.model, timing,
             ("the router" if args.replicas == 1 else f"{args.replicas} router replicas")
             + (" (precise prefix-cache: subscribed to the pods' KV events)" if opts.kv_events else ""),
             ", Redis (statesync on)" if args.redis else "", opts.run_dir)
    try:
        stack.start()
    except Exception as exc:
        log.error("start-up failed: %s (see the logs in %s/)", exc, opts.run_dir)
        return 1
    metrics = ", ".join(f"{r.http_url}/metrics" for r in stack.routers)
    print(f"\nextproc-router is up: Envoy on {stack.url}, router metrics on {metrics}, "
          f"Envoy admin on {stack.admin_url}" + (f", Redis on 127.0.0.1:{stack.redis_port}" if stack.redis_port else "")
          + "\n", flush=True)
    print("Try:\n" + CURL_LINES.format(url=stack.url, model=opts.model, metrics=stack.router_http), flush=True)
    if opts.pd:
        print(PD_CURL.format(url=stack.url, model=opts.pd_model), flush=True)
    if opts.timing == "model":
        print(compare_command(stack, _prog_name()), flush=True)
    print("Ctrl-C stops everything.", flush=True)
    # A router that exits is the supervisor's (stack.supervisor): it restarts it with backoff, as
    # systemd or Kubernetes would, and Envoy routes around it meanwhile. Any other process exiting
    # (a pod, Envoy, Redis) stops the stack.
    routers = {r.name for r in stack.routers}
    try:
        while not stopping:
            dead = [(name, code) for name, code in stack.dead_children() if name not in routers]
            if dead:
                for name, code in dead:
                    log.error("%s exited with code %s; stopping the stack (see %s/%s.log)", name, code,
                              opts.run_dir, name)
                return 1
            time.sleep(0.2)
    finally:
        log.info("stopping every process")
        stack.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc-router",
        description="An Envoy ext_proc routing gateway for OpenAI-style LLM inference: picks the model pod "
                    "for each request (random, least-request, ...) and tells Envoy through `target-pod`.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the router (ext_proc gRPC service + metrics HTTP port)",
                       description="Run one router process. Pods and models come from --config, which is "
                                   "re-read when it changes. Env: ROUTING_ALGORITHM (default strategy), "
                                   "AIBRIX_GRPC_MAX_MESSAGE_SIZE_BYTES (body limit).",
                       formatter_class=_ServeHelpFormatter)
    p.add_argument("--config", "-c", metavar="FILE",
                   help="gateway file (YAML): models and their pods, users, API keys, router settings; "
                        "required with --discovery file, optional with kubernetes (pods are then ignored)")
    p.add_argument("--discovery", choices=["file", "kubernetes"], default="file",
                   help="where pods come from: --config (default), or the Kubernetes API: pods labelled "
                        "model.aibrix.ai/name, in-cluster service account or KUBECONFIG")
    p.add_argument("--namespace", action="append", metavar="NS",
                   help="kubernetes discovery: watch this namespace; repeat for several (default: all)")
    p.add_argument("--inference-pool", metavar="NAME",
                   help="kubernetes discovery: route to the pods the InferencePool NAME (of the one --namespace, "
                        "default: default) selects, on its target port; models it does not know go to them too")
    p.add_argument("--inference-pool-version", choices=["v1", "v1alpha2"], default="v1",
                   help="InferencePool API: v1 (inference.networking.k8s.io) or v1alpha2 "
                        "(inference.networking.x-k8s.io) (default %(default)s)")
    # Flags that set a RouterConfig field have no default of their own (the help shows the config's).
    p.add_argument("--grpc-listen", metavar="HOST:PORT", help="ext_proc gRPC address")
    p.add_argument("--http-listen", metavar="HOST:PORT", help="/metrics, /v1/models, /health, /ready")
    p.add_argument("--routing-algorithm", metavar="NAME", help="default strategy when no header or profile selects one")
    p.add_argument("--max-body-bytes", type=int, metavar="N",
                   help="largest request body; keep equal to Envoy's bufferLimit")
    p.add_argument("--health-interval", type=float, metavar="SECONDS", help="pod health-check period")
    p.add_argument("--shutdown-grace", type=float, metavar="SECONDS", help="time in-flight requests get on SIGTERM")
    # 2 s: longer than Envoy's ext_proc health check (1 s interval + 1 s timeout in the rendered
    # bootstrap). With 0, requests Envoy sent in that window were refused and answered 503 (measured:
    # 6 of 563 in bench/chaos.py's router SIGTERM scenario; 0 with 2 s).
    p.add_argument("--drain-delay", type=_non_negative_seconds, default=2.0, metavar="SECONDS",
                   help="on SIGTERM, readiness goes false this long before new streams are refused, so "
                        "Envoy and Kubernetes can move traffic first (default %(default)g)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log verbosity")
    p.add_argument("--protocol", choices=["aibrix", "gie"],
                   help="how the picked pod reaches Envoy: aibrix (the target-pod header), or gie (also the "
                        "Gateway API Inference Extension endpoint-picker protocol: x-gateway-destination-endpoint "
                        "header and envoy.lb metadata, subset hints honoured)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("up", help="run the local stack: Envoy + router + simulated pods",
                       description="Start simulated vLLM pods of demo-model, the router and Envoy as real "
                                   "processes, print curl lines, and stop them all on Ctrl-C or SIGTERM. "
                                   "A router replica that exits is restarted (after 0.5 s, longer while it "
                                   "keeps crashing); a pod, Envoy or Redis that exits stops the stack.")
    p.add_argument("--listen", default="127.0.0.1:8888", metavar="HOST:PORT", help="Envoy's listener")
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--grpc-port", type=int, default=50052, help="router ext_proc port")
    p.add_argument("--http-port", type=int, default=8080, help="router metrics port")
    p.add_argument("--pods", type=int, default=3, help="simulated pods of demo-model")
    p.add_argument("--first-pod-port", type=int, default=8101)
    p.add_argument("--timing", choices=["model", "fixed"], default="model",
                   help="the pods' timing: model (default: a prefix-caching KV cache and continuous batching, "
                        "sized so that routing shows in latency and cached_tokens), or fixed (--ttft-ms, --itl-ms)")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="simulated time to first token (--timing fixed)")
    p.add_argument("--itl-ms", type=float, default=5.0, help="simulated inter-token latency (--timing fixed)")
    p.add_argument("--kv-events", action="store_true",
                   help="precise prefix-cache: the pods publish their KV-cache events (vLLM's ZeroMQ format, "
                        "free ports), the pod file declares them and the router subscribes")
    p.add_argument("--values", "-f", metavar="FILE", help="values.yaml with the gateway.* Envoy knobs")
    p.add_argument("--routing-algorithm", metavar="NAME", help="the router's default strategy")
    p.add_argument("--run-dir", default=".run", help="where configs and logs go")
    p.add_argument("--pd", action="store_true",
                   help="also start a prefill and a decode pod of demo-pd-model (routing-strategy: pd)")
    p.add_argument("--replicas", type=positive_int, default=1, metavar="N",
                   help="router processes behind Envoy (one ext_proc endpoint each); replica i listens on "
                        "--grpc-port + i and --http-port + i")
    p.add_argument("--redis", action="store_true",
                   help="start a local redis-server and share routing state between the replicas through it "
                        "(REDIS_HOST, AIBRIX_STATESYNC_ENABLED=true), as the seed's multi-replica setup")
    p.add_argument("--redis-port", type=int, default=6379, help="port of the local redis-server (with --redis)")
    p.set_defaults(func=cmd_up)

    from extproc_router.envoyconfig.cli import register as register_envoy_config
    from extproc_router.loadtest.cli import register as register_loadtest
    from extproc_router.manifests import register as register_manifests
    from extproc_router.simulator.cli import register as register_sim
    register_sim(sub)
    register_envoy_config(sub)
    register_manifests(sub)
    register_loadtest(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
