"""`lora-scripts ui`: serve the web UI (config, data, jobs, compare) on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ui command's options."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                        "any other needs --token)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--token", help="secret every request must carry (header X-LoRA-Token or ?token=)")
    parser.add_argument("--state-dir", type=Path, help="where the job queue (SQLite), job configs and logs live "
                        "(default ~/.local/state/lora-scripts-ui)")
    parser.add_argument("--allow-root", type=Path, action="append", default=[], metavar="DIR",
                        help="another folder the UI may read and write (the working directory and --state-dir always; repeatable)")
    parser.add_argument("--max-parallel", type=int, help="jobs run at once (default: the stored setting, at first 1)")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; running jobs go on after the UI stops."""
    import uvicorn

    from lora_scripts.ui.app import create_app, default_state_dir
    from lora_scripts.ui.context import UiSettings
    from lora_scripts.ui.security import check_bind

    check_bind(args.host, args.token)
    settings = UiSettings(state_dir=(args.state_dir or default_state_dir()).resolve(), token=args.token,
                          allowed_roots=[p.resolve() for p in args.allow_root], max_parallel=args.max_parallel)
    app = create_app(settings)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"lora-scripts UI on http://{shown_host}:{args.port}/" + ("?token=…" if args.token else ""), flush=True)
    print(f"state: {settings.state_dir}; folders it may use: {', '.join(str(r) for r in app.state.ui.guard.roots)}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
