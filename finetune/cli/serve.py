"""``finetune serve``: the HTTP API (and, as they land, the queue and web app) on uvicorn.

Localhost by default: binding another address is the user's explicit choice. Nothing here imports torch, so
the server answers within about a second of starting; training and inference load it in their own processes.
uvicorn handles Ctrl-C and SIGTERM: it stops accepting, finishes requests in flight, then stops the services.

Starting is all or nothing: the registry's server lock (one server per registry, see
:mod:`finetune.server.instance`) and the port are taken before anything is printed or started, so a busy port or
a registry served already is one line and exit 1, and touches no training.
"""

from __future__ import annotations

import argparse
import errno
import math
import signal
import socket
from pathlib import Path

from ..cluster.options import ClusterOptions, PredictOptions
from ..errors import ConflictError, FinetuneError, UsageError
from ..server.settings import (
    DEFAULT_MAX_TRAINING_STEPS,
    DEFAULT_MAX_TRAINING_TIME_S,
    DEFAULT_MAX_TRAININGS_PER_ACCOUNT,
    DEFAULT_MAX_UPLOAD_BYTES,
    ServerSettings,
)
from ..server.webhook_targets import parse_allowed
from .common import add_command, open_registry

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}


def parse_size(text: str) -> int:
    """``100M``, ``2GB``, ``512k`` or a plain number of bytes."""
    value = text.strip().lower()
    digits = value.rstrip("kmgb")
    unit = value[len(digits):]
    if not digits.isdigit() or unit not in _UNITS:
        raise UsageError(f"invalid size {text!r}", "use a number of bytes, or one with K, M or G (e.g. 100M)")
    return int(digits) * _UNITS[unit]


_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, flag: str) -> float | None:
    """``24h``, ``90m``, ``45s``, ``2d`` or a plain number of seconds; ``0`` or ``none``: no limit (None)."""
    value = text.strip().lower()
    if value in ("0", "none"):
        return None
    number, unit = value.rstrip("smhd"), value[len(value.rstrip("smhd")):]
    try:
        seconds = float(number) * _SECONDS[unit]
    except (ValueError, KeyError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"{flag} {text!r} is not a duration", "use e.g. 24h, 90m, 600s or 0 for no limit")
    return seconds


def _limit(value: int, flag: str) -> int | None:
    """A count limit from the command line: 0 means no limit."""
    if value < 0:
        raise UsageError(f"{flag} must be 0 (no limit) or more, not {value}")
    return value or None


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The server settings the command line asks for; each allowed data folder must exist."""
    dirs = []
    for folder in args.allow_data_dir or []:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise UsageError(f"--allow-data-dir {folder}: not a folder")
        dirs.append(path)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be 1 or more, not {args.workers}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, not {args.port}")
    if args.predict_workers < 1:
        raise UsageError(f"--predict-workers must be 1 or more, not {args.predict_workers}")
    if args.predict_max_batch < 1:
        raise UsageError(f"--predict-max-batch must be 1 or more, not {args.predict_max_batch}")
    memory = parse_size(args.predict_memory) / 2**20 if args.predict_memory else None
    webhook_hosts = tuple(args.allow_webhook_host or ())
    parse_allowed(webhook_hosts)  # a bad value fails the start, not the first webhook
    for flag, value in (("--predict-max-prompt-tokens", args.predict_max_prompt_tokens),
                        ("--predict-threads", args.predict_threads)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be 1 or more, not {value}")
    prompt_bytes = parse_size(args.predict_max_prompt_size)
    if prompt_bytes < 1:
        raise UsageError(f"--predict-max-prompt-size must be 1 byte or more, not {args.predict_max_prompt_size}")
    cluster = cluster_options(args)
    return ServerSettings(cluster=cluster, predict_cluster=predict_options(args), host=args.host, port=args.port,
                          workers=args.workers,
                          max_upload_bytes=parse_size(args.max_upload_size), allowed_data_dirs=tuple(dirs),
                          public_base_url=args.public_url.rstrip("/") if args.public_url else None,
                          allow_webhook_hosts=webhook_hosts, api_docs=args.api_docs,
                          predict_workers=args.predict_workers, predict_memory_mb=memory,
                          predict_device=args.predict_device, predict_max_batch=args.predict_max_batch,
                          predict_prestart=True, predict_max_prompt_bytes=prompt_bytes,
                          predict_max_prompt_tokens=args.predict_max_prompt_tokens,
                          predict_max_per_account=_limit(args.predict_max_per_account, "--predict-max-per-account"),
                          predict_threads=args.predict_threads,
                          max_trainings_per_account=_limit(args.max_trainings_per_account,
                                                           "--max-trainings-per-account"),
                          max_training_steps=_limit(args.max_training_steps, "--max-training-steps"),
                          max_training_time_s=parse_duration(args.max_training_time, "--max-training-time"))


def bind(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now (as uvicorn would bind it), or one line saying why it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConflictError(f"port {port} on {host} is already in use",
                                "stop what listens there, or choose another --port") from None
        if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"--host {host}: cannot listen there ({err.strerror or err})",
                             "give an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
        raise FinetuneError(f"cannot listen on {host}:{port} ({err.strerror or err})",
                            "choose another --port (below 1024 needs privileges)") from None
    return sock


def cluster_options(args: argparse.Namespace) -> ClusterOptions | None:
    """The Ray executor's options, or None for the local one; Ray's options without ``--executor ray`` are errors."""
    from ..cluster.options import parse_resource, require_ray

    ray_only = {"--gpus-per-training": args.gpus_per_training,
                "--cpus-per-process": args.cpus_per_process, "--max-retries": args.max_retries,
                "--ray-resource": args.ray_resource, "--warm-actors": args.warm_actors}
    if args.executor != "ray":
        if args.ray_address is not None and args.predict_executor != "ray":
            ray_only["--ray-address"] = args.ray_address
        given = [flag for flag, value in ray_only.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --executor ray")
        return None
    require_ray()
    defaults = ClusterOptions()
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return ClusterOptions(address=args.ray_address,
                          gpus_per_training=pick(args.gpus_per_training, defaults.gpus_per_training),
                          cpus_per_process=pick(args.cpus_per_process, defaults.cpus_per_process),
                          max_retries=pick(args.max_retries, defaults.max_retries),
                          resources=dict(parse_resource(r) for r in args.ray_resource or []),
                          warm_actors=pick(args.warm_actors, defaults.warm_actors))


def predict_options(args: argparse.Namespace) -> PredictOptions | None:
    """Inference on Ray's options, or None for local worker processes; their options alone are errors."""
    from ..cluster.options import parse_resource, require_ray

    if args.predict_executor != "ray":
        given = [flag for flag, value in (("--predict-cpus", args.predict_cpus), ("--predict-gpus", args.predict_gpus),
                                          ("--predict-ray-resource", args.predict_ray_resource)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --predict-executor ray")
        return None
    require_ray("--predict-executor ray")
    if args.predict_gpus is not None and args.predict_gpus < 0:
        raise UsageError(f"--predict-gpus must be 0 or more, not {args.predict_gpus:g}")
    return PredictOptions(address=args.ray_address, cpus=1.0 if args.predict_cpus is None else args.predict_cpus,
                          gpus=args.predict_gpus,
                          resources=dict(parse_resource(r, "--predict-ray-resource")
                                         for r in args.predict_ray_resource or []))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..app import create_app

    settings = settings_from_args(args)
    reg = open_registry(args)
    app = create_app(reg, settings)
    lock = app.state.server_lock
    lock.acquire()  # one server per registry: a second one stops here, having touched nothing
    try:
        sock = bind(settings.host, settings.port)
        ray_options = settings.cluster or settings.predict_cluster
        if ray_options is not None:  # join the cluster now: a bad address is one line, not a failed startup
            from ..cluster.session import connect

            connect(ray_options.address, reg.root)
    except BaseException:
        if "sock" in locals():
            sock.close()
        lock.release()
        raise
    print(f"finetune: serving {reg.root} on http://{settings.host}:{settings.port} (Ctrl-C stops)", flush=True)
    if args.open_browser:
        _open_browser(app, settings, args.web_user)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handlers it found: make
    # those note it, so that a requested stop ends with "stopped" and status 0, not a KeyboardInterrupt.
    stopped_by: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                                           access_log=args.access_log, timeout_graceful_shutdown=10))
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's way to say that the app did not start (it logged why)
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        lock.release()
    if not server.started and not stopped_by:
        raise FinetuneError("the server did not start (the lines above say why)")
    if stopped_by:
        print(f"finetune: server stopped ({signal.Signals(stopped_by[0]).name})", flush=True)
    return 0


def local_user() -> str:
    """The account a local sign-in link is for: the OS user name when it is a valid owner name, else ``local``."""
    import getpass

    from ..errors import InvalidNameError
    from ..names import check_name

    try:
        return check_name(getpass.getuser().lower(), "owner")
    except (InvalidNameError, OSError, KeyError):
        return "local"


def _open_browser(app, settings: ServerSettings, user: str | None) -> None:
    """Print a one-time sign-in link for the web app (and open it in a browser, if this machine has one)."""
    import threading
    import webbrowser

    from ..names import check_name
    from ..web.app import signin_link_path

    owner = check_name(user, "owner") if user else local_user()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{host}:{settings.port}{signin_link_path(app, owner)}"
    print(f"finetune: sign in to the web app as {owner} (one use, 15 minutes): {url}", flush=True)
    threading.Timer(1.0, lambda: webbrowser.open(url)).start()


def add_commands(groups: argparse._SubParsersAction) -> None:
    p = add_command(groups, "serve", cmd_serve, "serve the registry over HTTP (Replicate-compatible API)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=None,
                   help="trainings at once (default: one per GPU, one on a CPU-only machine; with --executor ray, "
                        "what the cluster's usable nodes hold)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where trainings run: worker processes on this machine (local, the default), or anywhere "
                        "in a Ray cluster sharing the registry (ray: pip install 'finetune[ray]')")
    p.add_argument("--predict-executor", choices=("local", "ray"), default="local",
                   help="where inference workers run: processes on this machine (local, the default), or Ray "
                        "actors anywhere in a Ray cluster sharing the registry (ray; --predict-workers of them)")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="the Ray cluster to join (default: RAY_ADDRESS, else the one `ray start` ran here, else "
                        "a Ray started for this server)")
    p.add_argument("--predict-cpus", type=float, default=None, metavar="N",
                   help="CPUs each inference actor asks Ray for (--predict-executor ray; default 1)")
    p.add_argument("--predict-gpus", type=float, default=None, metavar="N",
                   help="GPUs each inference actor asks Ray for (default: 1 when --predict-device names a GPU, or "
                        "is auto and the cluster has GPUs; else 0)")
    p.add_argument("--predict-ray-resource", action="append", metavar="NAME=AMOUNT",
                   help="a custom Ray resource each inference actor asks for, e.g. predictor=1 to keep them on "
                        "the nodes started with --resources='{\"predictor\": N}' (repeatable)")
    p.add_argument("--gpus-per-training", type=int, default=None, metavar="N",
                   help="GPUs of a training on a gpu destination, one process each (default 1; a config's "
                        "train.processes overrides it)")
    p.add_argument("--cpus-per-process", type=float, default=None, metavar="N",
                   help="CPUs each training process asks Ray for (default 1; its torch threads follow)")
    p.add_argument("--max-retries", type=int, default=None, metavar="N",
                   help="times a training that lost its node starts again elsewhere, from its newest checkpoint "
                        "(default 2)")
    p.add_argument("--ray-resource", action="append", metavar="NAME=AMOUNT",
                   help="a custom Ray resource each training process asks for, e.g. trainer=1 to keep trainings "
                        "on the nodes started with --resources='{\"trainer\": N}' (repeatable)")
    p.add_argument("--warm-actors", type=int, default=None, metavar="N",
                   help="idle Ray actors kept started with the training code imported, so trainings start at "
                        "once (default 1)")
    p.add_argument("--allow-data-dir", action="append", metavar="DIR",
                   help="a server folder that training inputs may name as data (repeatable; default: none, "
                        "remote users upload files)")
    p.add_argument("--max-upload-size", default=f"{DEFAULT_MAX_UPLOAD_BYTES >> 20}M", metavar="SIZE",
                   help="largest file upload (default %(default)s)")
    p.add_argument("--public-url", default=None, metavar="URL",
                   help="the URL clients reach the server at, for links in responses (default: from each request)")
    p.add_argument("--allow-webhook-host", action="append", metavar="HOST|IP|CIDR",
                   help="let webhooks reach this host, address or network although it is not public (repeatable; "
                        "default: public addresses only)")
    p.add_argument("--api-docs", action="store_true",
                   help="serve the API's reference at /v1/docs and its schema at /v1/openapi.json (default: off)")
    p.add_argument("--open-browser", action="store_true",
                   help="print a one-time sign-in link for the web app (and open it in a browser)")
    p.add_argument("--web-user", default=None, metavar="OWNER",
                   help="the account --open-browser signs in (default: your OS user name, else 'local')")
    p.add_argument("--predict-workers", type=int, default=1, metavar="N",
                   help="inference worker processes (default 1; versions of one base always share one); with "
                        "--predict-executor ray, inference actors (a version goes to the one that holds it loaded)")
    p.add_argument("--predict-memory", default=None, metavar="SIZE",
                   help="each inference worker's budget for loaded model weights, e.g. 8G (default: no limit); "
                        "the least recently used versions are unloaded beyond it")
    p.add_argument("--predict-device", default="auto", help="auto (a GPU when present), cpu, gpu or cuda:N")
    p.add_argument("--predict-max-batch", type=int, default=32, metavar="N",
                   help="the most requests one inference worker decodes together (default 32)")
    p.add_argument("--max-trainings-per-account", type=int, default=DEFAULT_MAX_TRAININGS_PER_ACCOUNT, metavar="N",
                   help="trainings one account may have queued or running at once; more are refused with 429 "
                        "(default %(default)s; 0: no limit)")
    p.add_argument("--max-training-steps", type=int, default=DEFAULT_MAX_TRAINING_STEPS, metavar="N",
                   help="the largest train.max_steps a training may ask for; more is refused with 422 "
                        "(default %(default)s; 0: no limit)")
    p.add_argument("--max-training-time", default=f"{int(DEFAULT_MAX_TRAINING_TIME_S // 3600)}h", metavar="DURATION",
                   help="a training running longer is stopped and fails, e.g. 90m, 24h, 2d "
                        "(default %(default)s; 0: no limit)")
    p.add_argument("--predict-threads", type=int, default=None, metavar="N",
                   help="CPU threads of each inference worker (default: torch's, one per core); 1 keeps short "
                        "predictions fast on a small machine shared with trainings")
    p.add_argument("--predict-max-prompt-size", default=f"{ServerSettings.predict_max_prompt_bytes >> 10}K",
                   metavar="SIZE",
                   help="the largest prompt a prediction may send, in UTF-8 bytes (default %(default)s)")
    p.add_argument("--predict-max-prompt-tokens", type=int, default=None, metavar="N",
                   help="the most tokens a prediction's prompt may have (default: the model's context)")
    p.add_argument("--predict-max-per-account", type=int, default=ServerSettings.predict_max_per_account, metavar="N",
                   help="each account's predictions starting or running at once; more are refused with 429 "
                        "(default %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log one line per request")
