"""`promptserve loadtest` / `python -m loadtest`: flags -> LoadConfig -> run -> table, JSON, PNG."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from rich.console import Console

from loadtest.config import DEFAULT_NOISY_FACTOR, ConfigError, LoadConfig, TaskSetup
from loadtest.cpu import ProcessError
from loadtest.distributions import Distribution
from loadtest.progress import NullProgress, RichProgress
from loadtest.report import write_json
from loadtest.safety import TargetError
from loadtest.tasks import TaskSetupError
from loadtest.tenants import TenantsFileError, load_tenants

HELP = "load a running promptserve (or TGI-compatible) server on a loopback address and report"


def distribution(spec: str) -> Distribution:
    """argparse type for length distributions."""
    try:
        return Distribution.parse(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def int_list(spec: str) -> list[int]:
    """argparse type for `1,2,4,8`."""
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, not {spec!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("positive integers expected")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The loadtest flags."""
    add_load_arguments(p)
    add_task_arguments(p)
    add_tenant_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--out", help="write the JSON report here")
    out.add_argument("--plot", help="write a PNG here (latency distribution + throughput; a sweep: throughput vs p99)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """Target, load shape and request shape."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only; default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("PROMPTSERVE_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $PROMPTSERVE_API_KEY)")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=8,
                      help="closed loop: requests in flight (default 8; with --noisy-tenant: per steady tenant)")
    load.add_argument("--rate", type=float, help="open loop instead: Poisson arrivals, requests per second "
                                                 "(with --noisy-tenant: per steady tenant)")
    load.add_argument("--duration", type=float, help="seconds to issue requests for")
    load.add_argument("--requests", type=int, help="number of requests to issue (the first bound reached ends the run)")
    load.add_argument("--sweep", type=int_list, help="closed loop at each concurrency, e.g. 1,2,4,8,16,32")
    load.add_argument("--max-inflight", type=int, default=1024, help="open loop: client-side cap on requests in flight")
    load.add_argument("--server-pid", type=int,
                      help="pid of the (local) server: report its CPU seconds and tokens per CPU second")
    load.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    shape = p.add_argument_group("requests")
    shape.add_argument("--prompt-tokens", type=distribution, default=Distribution.fixed(32),
                       help="prompt length in words: N, uniform:LO,HI, normal:MEAN,STD, lognormal:MEDIAN,SIGMA")
    shape.add_argument("--max-new-tokens", type=distribution, default=Distribution.fixed(16),
                       help="max_new_tokens per request, same forms (default 16)")
    shape.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                       help="use /generate_stream (time to first token, inter-token latency) or /generate")
    shape.add_argument("--ignore-eos", action="store_true",
                       help="send parameters.ignore_eos_token: every request generates its max_new_tokens")
    shape.add_argument("--seed", type=int, default=0, help="workload seed (prompts, lengths, task choice)")


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """Which tasks the requests go to."""
    tasks = p.add_argument_group("tasks")
    tasks.add_argument("--task-ids", help="comma-separated existing task ids to spread requests over")
    tasks.add_argument("--num-tasks", type=int, default=0, help="use the first N tasks the server lists")
    tasks.add_argument("--setup-tasks", type=int, default=0, help="create N tasks before the run, delete them after")
    tasks.add_argument("--task-init", choices=("random", "text", "sample_vocab"), default="random")
    tasks.add_argument("--num-virtual-tokens", type=int, default=8)
    tasks.add_argument("--popularity", choices=("uniform", "zipf"), default="uniform")
    tasks.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (default 1.1)")


def add_tenant_arguments(p: argparse.ArgumentParser) -> None:
    """Whose API keys the requests carry, and the noisy-neighbour scenario."""
    tenants = p.add_argument_group("tenants")
    tenants.add_argument("--tenants", metavar="FILE",
                         help="YAML/JSON: 'tenants: [{name, key, popularity}]' or the server's --api-keys file "
                              "(each tenant's first key, popularity 1). Requests carry their tenant's key, "
                              "spread by popularity; --api-key stays the key of the harness's own calls "
                              "(/metrics, task setup). Task ids must be usable by every tenant's key")
    tenants.add_argument("--noisy-tenant", metavar="NAME",
                         help="noisy neighbour: every tenant gets its own load; each steady tenant sends --rate "
                              "req/s (closed loop: --concurrency in flight), NAME that times --noisy-factor; "
                              "popularity is not used")
    tenants.add_argument("--noisy-factor", type=float, metavar="X",
                         help="the noisy tenant's rate (or concurrency, rounded) over a steady tenant's "
                              f"(default {DEFAULT_NOISY_FACTOR:g}, at least 1)")


def build_config(args: argparse.Namespace) -> LoadConfig:
    """The LoadConfig the flags describe (validated)."""
    duration, num_requests = args.duration, args.requests
    if duration is None and num_requests is None:
        duration = 30.0
    if args.noisy_factor is not None and args.noisy_tenant is None:
        raise ConfigError("--noisy-factor needs --noisy-tenant NAME")
    return LoadConfig(
        url=args.url, mode="open" if args.rate else "closed", concurrency=args.concurrency, rate=args.rate or 0.0,
        duration_s=duration, num_requests=num_requests,
        task_ids=tuple(t.strip() for t in (args.task_ids or "").split(",") if t.strip()),
        num_existing_tasks=args.num_tasks, popularity=args.popularity, zipf_s=args.zipf_s,
        prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens, is_stream=args.stream,
        api_key=args.api_key, request_timeout_s=args.request_timeout, max_inflight=args.max_inflight,
        seed=args.seed, ignore_eos=args.ignore_eos, server_pid=args.server_pid,
        setup=TaskSetup(num_tasks=args.setup_tasks, init=args.task_init, num_virtual_tokens=args.num_virtual_tokens),
        tenants=load_tenants(args.tenants) if args.tenants else (), noisy_tenant=args.noisy_tenant,
        noisy_factor=DEFAULT_NOISY_FACTOR if args.noisy_factor is None else args.noisy_factor,
    ).validate()


def run(args: argparse.Namespace) -> int:
    """The `loadtest` command: 0 when requests succeeded, 1 when none did, 2 for a refused config or target."""
    from loadtest.plot import plot_run, plot_sweep
    from loadtest.session import run_session
    from loadtest.table import render

    console = Console(stderr=False)
    try:
        config = build_config(args)
        if args.sweep and config.mode != "closed":
            raise ConfigError("--sweep varies concurrency: it needs a closed loop (no --rate)")
        progress = NullProgress() if args.quiet else RichProgress(console)
        reports = asyncio.run(run_session(config, args.sweep or (), progress))
    except (ConfigError, TargetError, TaskSetupError, ProcessError, TenantsFileError) as exc:
        console.print(f"[red]loadtest: {exc}[/red]")
        return 2
    for report in reports:
        render(report, console)
    if args.out:
        write_json({"sweep": reports} if args.sweep else reports[0], args.out)
        console.print(f"report: {args.out}")
    if args.plot:
        (plot_sweep(reports, args.plot) if args.sweep else plot_run(reports[0], args.plot))
        console.print(f"plot: {args.plot}")
    return 0 if any(r.client.num_ok for r in reports) else 1


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Register `loadtest` on an argparse subparsers object (used by `promptserve`'s CLI)."""
    parser = subparsers.add_parser("loadtest", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest ...`."""
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
