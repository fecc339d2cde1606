"""`sparta serve`: many SpaRTA adapters on one base model, swapped in place, behind an OpenAI-style API.

One copy of the base weights; each adapter is resident as its (indices, fp32 deltas) and head
(`swap.SparseSwap`). A scheduler batches requests for one worker thread (`scheduler.Scheduler`): a
batch of one adapter runs with it written into the weights, a batch of several SpaRTA adapters on the
base weights with each row's delta added by hooks (`mixed.row_adapters`); FastAPI answers HTTP
(`app.create_app`). Design: docs/serve.md.
"""

from __future__ import annotations

from pathlib import Path

from sparta_cli.console import console, errors
from sparta_cli.errors import SpartaError


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


MAX_WAIT_MS = 60_000  # --max-wait-ms: a batch waits at most a minute to fill
MAX_BATCH = 4096  # --max-batch: past what one forward of any model here holds (vLLM defaults to 256 sequences)


def read_api_key(path: Path) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpartaError(f"--api-key-file {path} does not exist: write the key (one line) to a file only you can read")
    try:
        key = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise SpartaError(f"--api-key-file {path} is not UTF-8 text: write the key as one line of text") from None
    if not key or len(key.splitlines()) > 1:
        raise SpartaError(f"--api-key-file {path} must hold the key on one line")
    return key


def check_port(host: str, port: int) -> None:
    """Refuse, before the model loads, an address this process cannot listen on (uvicorn would find out
    only after the load, and say so in a log line of its own with exit 1). A port taken between this
    check and uvicorn's bind still fails there."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SpartaError(f"--host {host} does not resolve ({exc.strerror}): give an address of this machine, e.g. 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SpartaError(f"--port {port} is in use on {host}: stop what listens there, or pass another --port") from None
            if exc.errno == errno.EACCES:
                raise SpartaError(f"--port {port} needs privileges this user lacks: pass a --port of 1024 or above") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise SpartaError(f"--host {host} is not an address of this machine: give one of its own, e.g. 127.0.0.1 or 0.0.0.0") from None
            raise SpartaError(f"cannot listen on {host}:{port} ({exc.strerror}): pass another --host or --port") from None


def check_adapters_dir(adapters_dir: Path, host: str, has_key: bool) -> Path:
    """The folder runs may be loaded from at run time; refused beyond loopback without a key, where
    anyone who reaches the port could make the server read (and serve) its runs."""
    folder = Path(adapters_dir).expanduser()
    if not folder.is_dir():
        raise SpartaError(f"--adapters-dir {folder} is not a folder: give the folder that holds the run folders to serve")
    if not is_loopback(host) and not has_key:
        raise SpartaError(f"--adapters-dir on {host} without an API key would let anyone load and unload adapters: "
                          "pass --api-key-file, or serve on 127.0.0.1")
    return folder


def serve(target: str, *, adapters: list[str], host: str = "127.0.0.1", port: int = 8000, api_key_file: Path | None = None,
          max_batch: int = 8, max_wait_ms: float = 5.0, adapters_dir: Path | None = None) -> None:
    """Load the base once and every adapter beside it, then answer HTTP until SIGINT/SIGTERM (which drains)."""
    if not 1 <= max_batch <= MAX_BATCH:  # warm_up runs a batch this size before the server starts
        raise SpartaError(f"--max-batch {max_batch}: give 1 to {MAX_BATCH}")
    if not 0 <= max_wait_ms <= MAX_WAIT_MS:  # nan fails too; an infinite wait would hang every request
        raise SpartaError(f"--max-wait-ms {max_wait_ms}: give 0 to {MAX_WAIT_MS:,} (a minute)")
    if not 0 < port < 65536:
        raise SpartaError(f"--port {port}: give a port from 1 to 65535")
    check_port(host, port)
    try:
        import uvicorn
    except ImportError:
        raise SpartaError("sparta serve needs FastAPI and uvicorn: pip install 'sparta[serve]'") from None
    from sparta_cli.serve.app import create_app
    from sparta_cli.serve.registry import load_served, parse_adapter_specs

    api_key = read_api_key(api_key_file) if api_key_file is not None else None
    folder = check_adapters_dir(adapters_dir, host, api_key is not None) if adapters_dir is not None else None
    served = load_served(target, parse_adapter_specs(adapters), folder)
    if not is_loopback(host) and api_key is None:
        errors.print(f"warning: serving on {host} without an API key: anyone who can reach this port can use it "
                     "(pass --api-key-file)", markup=False, soft_wrap=True)
    names = [name for name in served.entries if served.entries[name].swap]
    if folder is not None:
        console.print(f"POST /v1/adapters loads runs from {folder.resolve()}; DELETE /v1/adapters/NAME unloads", soft_wrap=True)
    mib = 1 << 20
    console.print(f"serving {len(names)} adapter(s) ({', '.join(names)}) on one base on {served.device}: base {served.base_bytes / mib:.1f} MiB "
                  f"+ adapters {served.adapter_bytes() / mib:.2f} MiB", soft_wrap=True)
    served.warm_up(max_batch)
    app = create_app(served, max_batch=max_batch, max_wait_s=max_wait_ms / 1000, api_key=api_key)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)).run()
