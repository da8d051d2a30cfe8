"""`fleet-dashboard` (also `fleetctl dashboard`): serve the dashboard until SIGINT/SIGTERM;
`--check` asks a running one for /healthz and exits 0 or 1, for container health checks."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import urllib.error
import urllib.request

from fleet_common import compat
from fleet_common.cli import base_parser, load, run_main, stop_event
from fleet_common.config import Config
from fleet_store import open_store

from .exposition import is_loopback, serves_metrics

log = logging.getLogger("fleet.dashboard")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="address to listen on (default dashboard.host)")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default dashboard.port)")


def with_overrides(cfg: Config, args: argparse.Namespace) -> Config:
    changes = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return cfg.replace("dashboard", **changes) if changes else cfg


def local_url(cfg: Config) -> str:
    host = cfg.dashboard.host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://{host}:{cfg.dashboard.port}"


def check(cfg: Config, timeout_s: float = 3.0) -> int:
    url = local_url(cfg) + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            doc = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        reason = exc.read().decode(errors="replace")[:200] if isinstance(exc, urllib.error.HTTPError) else exc
        print(f"fleet-dashboard: not healthy at {url}: {reason}", file=sys.stderr)
        return 1
    print(f"fleet-dashboard: healthy at {url} (store {doc.get('store')})")
    return 0


def metrics_note(cfg: Config) -> str:
    d = cfg.dashboard
    if not serves_metrics(d):
        return "/metrics off"
    if not d.metrics_token and not is_loopback(d.host):
        log.warning("/metrics is served beyond this host without a token: set dashboard.metrics_token, or let only "
                    "Prometheus reach port %d", d.port)
    return f"/metrics every {d.metrics_refresh_s:g} s" + (", token required" if d.metrics_token else "")


def serve(cfg: Config, stop: threading.Event) -> int:
    """Serve until `stop` is set; the store is opened once and shared by the server's threads."""
    from waitress.server import create_server

    from .app import create_app

    store = open_store(cfg.persister)
    try:
        app = create_app(cfg, store)
        server = create_server(app, host=cfg.dashboard.host, port=cfg.dashboard.port, threads=8,
                               ident="fleet-dashboard")
        # read the fleet once now, so the first viewer of a large fleet does not wait for it
        threading.Thread(target=app.extensions["fleet"].snapshot, name="dashboard-warm", daemon=True).start()
        metrics = app.extensions["fleet_metrics"]
        refresher = threading.Thread(target=metrics.run, args=(stop,), name="dashboard-metrics", daemon=True)
        refresher.start()
        thread = threading.Thread(target=server.run, name="dashboard-http", daemon=True)
        thread.start()
        asking = "on, for operators" if cfg.dashboard.ask_enabled else "off (read-only)"
        log.info("dashboard at %s (store %s; ask now %s; %s)", local_url(cfg), cfg.persister.store, asking,
                 metrics_note(cfg))
        stop.wait()
        log.info("stopping the dashboard")
        server.close()
        thread.join(5.0)
        refresher.join(5.0)
    finally:
        store.close()
    return 0


def fleetctl_command(cfg: Config, args: argparse.Namespace) -> int:
    """`fleetctl dashboard`: fleetctl finds it through the `fleetctl.commands` entry point."""
    return serve(with_overrides(cfg, args), stop_event())


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("fleet-dashboard", "Serve the read-only fleet dashboard over the store.")
    add_arguments(parser)
    parser.add_argument("--check", action="store_true", help="exit 0 if a running dashboard answers /healthz, else 1")
    args = parser.parse_args(argv)
    cfg = with_overrides(load(args, "fleet-dashboard"), args)
    if args.check:
        return check(cfg)
    compat.apply()  # the operators' "ask now" goes over MQTT (fleetctl.request)
    return serve(cfg, stop_event())


def entry() -> None:
    sys.exit(run_main("fleet-dashboard", main))
