"""Command line for the local stack: ``python -m services.stack {up,down,status,env,trace}`` (also ``lp-stack``).

    up       start every stand-in detached (they keep running after the command exits); no-op if healthy
    down     stop everything recorded in <state>/stack.json; exit 0 when nothing runs
    status   per component: running/dead, pid, port, log
    env      ``export K=V`` lines for a shell: eval "$(python -m services.stack env)"
    trace    one event's trace from the last ``make run`` as a tree with per-hop timings (no id: list them)

Settings come from ``LP_*`` environment variables (see services/stack/settings.py); ``--state-dir``
overrides ``LP_STATE_DIR``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from services.kit.config import load_settings
from services.kit.exits import ExitCode
from services.stack.components import ComponentError, Postgres, tcp_open
from services.stack.settings import StackSettings
from services.stack.stack import LocalStack, StackError
from services.stack.traces import build_trace, format_trace, list_traces, read_spans, trace_id_for, traces_file


def _settings(args: argparse.Namespace) -> StackSettings:
    overrides = {"state_dir": Path(args.state_dir).resolve()} if args.state_dir else {}
    return load_settings(StackSettings, **overrides)  # a bad LP_* variable: one message, exit 2


def _print_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")


def _live_stack(settings: StackSettings) -> LocalStack | None:
    """The stack recorded under the state dir if any of its processes still runs, else None."""
    stack = LocalStack.from_state(settings.state_dir)
    if stack is None or not any(comp.is_running() for comp in stack.components):
        return None
    return stack


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings(args)
    existing = _live_stack(settings)
    if existing is not None and not existing.is_orphaned():
        problems = {name: err for name, err in existing.health().items() if err}
        if not problems:
            print(f"Local stack is already up (started {existing.started_at}, state in {existing.state_dir}).")
            if not existing.detached and existing.owner_pid is not None:
                print(f"Note: it belongs to process {existing.owner_pid} (e.g. `make run`) and stops with it.")
            print(f"Logs: {existing.log_dir}")
            _print_env(existing.env())
            return ExitCode.OK
        for name, err in problems.items():
            print(f"{name} is unhealthy: {err}", file=sys.stderr)
        print("Restarting the local stack.", file=sys.stderr)
        existing.stop()

    stack = LocalStack(settings)
    t0 = time.monotonic()
    print(f"Starting the local stack in {stack.state_dir} ...", flush=True)
    stack.start(detach=not args.foreground, timeout=args.timeout)
    print(f"Local stack is up in {time.monotonic() - t0:.1f}s.")
    for row in stack.status():
        print(f"  {row['name']:<10} pid {row['pid']:<8} port {row['port']:<6} log {row['log']}")
    for name, why in stack.skipped.items():
        print(f"  {name:<10} {why}")
    if stack.prometheus_running:
        print(f"Prometheus: {stack.prometheus.url} (alerts: {stack.prometheus.url}/alerts)")
    print(f"Logs: {stack.log_dir}")
    print('Environment for the services (or: eval "$(python -m services.stack env)"):')
    _print_env(stack.env())
    if not args.foreground:
        print("Stop it with: python -m services.stack down")
        return ExitCode.OK

    print("Running in the foreground; Ctrl+C stops everything.", flush=True)
    try:
        while True:
            stack.check()
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nStopping ...", file=sys.stderr)
    finally:
        stack.stop()
    return ExitCode.OK


def cmd_down(args: argparse.Namespace) -> int:
    settings = _settings(args)
    stack = LocalStack.from_state(settings.state_dir)
    stopped: list[str] = []
    if stack is not None:
        stopped = [comp.name for comp in stack.components if comp.is_running()]
        stack.stop()
    # A postgres whose stack.json was lost still holds its data dir and port.
    if Postgres(settings).stop_orphan():
        stopped.append("postgres (orphan)")
    if stopped:
        print(f"Stopped: {', '.join(stopped)}.")
    elif stack is not None:
        print("Local stack was not running (cleaned up a stale stack.json).")
    else:
        print("Local stack is not running.")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    stack = LocalStack.from_state(settings.state_dir)
    if stack is None:
        print(f"Local stack is not running (no {settings.state_dir / 'stack.json'}).")
        return ExitCode.NOT_RUNNING
    print(f"Local stack in {stack.state_dir}, started {stack.started_at}")
    all_up = True
    for comp in stack.components:
        running = comp.is_running()
        state = "running" if running else "dead"
        if running and not tcp_open(comp.port):
            state = "running (port not answering)"
        all_up = all_up and state == "running"
        pid = comp.pid if comp.pid else "-"
        print(f"  {comp.name:<10} {state:<29} pid {pid!s:<8} port {comp.port:<6} log {comp.log_path}")
    if stack.is_orphaned():
        print("Its owner process is gone; `python -m services.stack down` cleans it up.")
    return ExitCode.OK if all_up else ExitCode.FAILED


def cmd_env(args: argparse.Namespace) -> int:
    settings = _settings(args)
    data = LocalStack.read_state(settings.state_dir)
    if data is not None and data.get("env"):
        _print_env(data["env"])
    else:
        print("# local stack is not running; values from the current settings", file=sys.stderr)
        _print_env(LocalStack(settings).env())
    return ExitCode.OK


def cmd_trace(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else traces_file(_settings(args).state_dir)
    if not path.exists():
        print(f"error: no spans at {path}: `make run` writes them there", file=sys.stderr)
        return ExitCode.FAILED
    spans = read_spans(path)
    if not args.id:
        print(list_traces(spans))
        return ExitCode.OK
    trace_id = trace_id_for(spans, args.id)
    if trace_id is None:
        print(f"error: no trace or event {args.id!r} in {path} (only sampled events are traced)", file=sys.stderr)
        return ExitCode.FAILED
    print(format_trace(build_trace(spans, trace_id)))
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.stack",
        description="Start, check and stop the local embedded stack (Kafka, PostgreSQL, S3, Snowflake, Prometheus).",
    )
    state_help = "state dir (default: $LP_STATE_DIR or <repo>/.local)"
    parser.add_argument("--state-dir", help=state_help)
    # Also accepted after the subcommand; SUPPRESS keeps a subparser from resetting the global value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=argparse.SUPPRESS, help=state_help)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="start everything (detached) and print the environment to use")
    up.add_argument("--timeout", type=float, default=None, help="seconds to wait for each component")
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl+C stops everything")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", parents=[common], help="stop everything").set_defaults(func=cmd_down)
    sub.add_parser("status", parents=[common], help="show each component").set_defaults(func=cmd_status)
    sub.add_parser("env", parents=[common], help="print export lines for a shell").set_defaults(func=cmd_env)
    trace = sub.add_parser(
        "trace", parents=[common], help="print one event's trace as a tree with per-hop timings (no id: list them)"
    )
    trace.add_argument("id", nargs="?", help="an event id or a trace id (32 hex digits)")
    trace.add_argument("--file", help="spans file (default: <state dir>/traces/spans.jsonl, written by `make run`)")
    trace.set_defaults(func=cmd_trace)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ComponentError, StackError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except BrokenPipeError:
        # Output piped into `head` & co.: not an error; keep Python from complaining again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
