#!/usr/bin/env python3
"""python-tuf's reference client (tuf.ngclient.Updater) behind Tern's client CLI.

One scenario harness can drive either client by swapping the command prefix:

  tuf_client.py --metadata-dir DIR init TRUSTED_ROOT_FILE
  tuf_client.py --metadata-dir DIR --metadata-url URL refresh
  tuf_client.py --metadata-dir DIR --metadata-url URL \\
                --target-name PATH [--target-name PATH ...] \\
                --target-base-url URL --target-dir DIR download

Global options come before the subcommand.

init      Copy TRUSTED_ROOT_FILE to DIR/root.json (DIR is created if needed).
          No network request, no validation, nothing else is written.
refresh   Updater(metadata_dir=DIR, metadata_base_url=URL, bootstrap=None)
          .refresh(): the trust anchor is the cached DIR/root.json.
download  One Updater (also given target_dir/target_base_url); refresh(); then
          for each --target-name in order: get_targetinfo() (None is a
          failure), find_cached_target(), download_target() when not cached.
          Stops at the first failure. Files are named by python-tuf's default,
          parse.quote(target_path, "") inside --target-dir.

URLs without a trailing slash get one. UpdaterConfig is python-tuf's default;
the only deviation from ngclient's default fetcher is that proxy environment
variables (http_proxy, https_proxy, all_proxy, no_proxy, ...) are ignored.

Exit status: 0 on success, 1 on any failure, 2 on usage errors (argparse).
Output: stdout is empty except after a successful download, which prints one
line per target, in order: "<name> <local path>". On failure exactly one line
goes to stderr: "tuf_client: <ExceptionClassName>: <message>", the class being
the most specific one raised (python-tuf's, e.g. UnsignedMetadataError,
ExpiredMetadataError, LengthOrHashMismatchError, DownloadHTTPError; an OSError
subclass for local I/O problems; TargetNotFoundError, defined here, when no
trusted targets role lists a requested target). Causes chained with
"raise ... from" are appended to the message as "(caused by Type: message)".

Python logging and warnings are silenced so that stderr stays one line; set
TUF_CLIENT_DEBUG=1 to get python-tuf's debug log on stderr instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import urllib3

import tuf
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

PROG = "tuf_client"


class TargetNotFoundError(Exception):
    """No trusted targets role lists the requested target path.

    python-tuf signals this only by get_targetinfo() returning None, so the
    type is ours (Tern's equivalent variant is TargetNotFound).
    """


class _NoProxyFetcher(Urllib3Fetcher):
    """ngclient's default urllib3 fetcher, minus proxies from the environment.

    Urllib3Fetcher routes requests through a ProxyEnvironment that reads
    *_proxy variables at construction; swap it for a plain PoolManager built
    with the same arguments (only the User-Agent header), so timeouts,
    retries, chunking and error mapping stay exactly as in _fetch().
    """

    def __init__(self, app_user_agent: str | None = None) -> None:
        super().__init__(app_user_agent=app_user_agent)
        proxy_env = getattr(self, "_proxy_env", None)
        if proxy_env is None:  # pragma: no cover - guards a python-tuf upgrade
            raise RuntimeError(
                f"python-tuf {tuf.__version__}: Urllib3Fetcher has no _proxy_env; "
                "update _NoProxyFetcher"
            )
        user_agent = f"python-tuf/{tuf.__version__}"
        if app_user_agent is not None:
            user_agent = f"{app_user_agent} {user_agent}"
        kw_args = getattr(proxy_env, "_kw_args", {"headers": {"User-Agent": user_agent}})
        # PoolManager.request(method, url, **kw) is what _fetch() calls.
        self._proxy_env = urllib3.PoolManager(**kw_args)


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe(exc: BaseException) -> str:
    """`Type: message` for exc, plus its "raise ... from" causes."""
    message = str(exc)
    causes = []
    seen = {id(exc)}
    cause = exc.__cause__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = str(cause)
        causes.append(f"{type(cause).__name__}: {text}" if text else type(cause).__name__)
        cause = cause.__cause__
    if causes:
        suffix = "(caused by " + " <- ".join(causes) + ")"
        message = f"{message} {suffix}" if message else suffix
    if not message and exc.__doc__:
        message = exc.__doc__.strip().splitlines()[0]
    return _one_line(f"{type(exc).__name__}: {message}")


def _new_updater(args: argparse.Namespace, with_targets: bool) -> Updater:
    config = UpdaterConfig()  # python-tuf's defaults, limits unchanged
    kwargs = {}
    if with_targets:
        kwargs["target_dir"] = args.target_dir
        kwargs["target_base_url"] = _with_slash(args.target_base_url)
    return Updater(
        metadata_dir=args.metadata_dir,
        metadata_base_url=_with_slash(args.metadata_url),
        fetcher=_NoProxyFetcher(app_user_agent=config.app_user_agent),
        config=config,
        bootstrap=None,  # trust anchor: the cached <metadata-dir>/root.json
        **kwargs,
    )


def cmd_init(args: argparse.Namespace) -> list[str]:
    data = Path(args.trusted_root).read_bytes()
    metadata_dir = Path(args.metadata_dir)
    metadata_dir.mkdir(parents=True, exist_ok=True)
    # Write a temp file and rename it over root.json: os.replace() replaces a
    # root.json symlink (ngclient leaves one into root_history/) instead of
    # writing through it into a cached root version.
    fd, tmp = tempfile.mkstemp(dir=metadata_dir, prefix=".root.json.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp() creates 0600; give root.json the mode a plain copy gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, metadata_dir / "root.json")
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return []


def cmd_refresh(args: argparse.Namespace) -> list[str]:
    _new_updater(args, with_targets=False).refresh()
    return []


def cmd_download(args: argparse.Namespace) -> list[str]:
    updater = _new_updater(args, with_targets=True)
    updater.refresh()
    lines = []
    for name in args.target_name:
        info = updater.get_targetinfo(name)
        if info is None:
            raise TargetNotFoundError(
                f"target {name!r} is not listed by any trusted targets role"
            )
        path = updater.find_cached_target(info)
        if path is None:
            path = updater.download_target(info)
        lines.append(f"{name} {path}")
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuf_client.py",
        description="python-tuf ngclient behind Tern's client CLI.",
    )
    parser.add_argument("--metadata-dir", required=True, metavar="DIR",
                        help="local metadata directory (holds the trusted root.json)")
    parser.add_argument("--metadata-url", metavar="URL",
                        help="base URL of the repository's metadata")
    parser.add_argument("--target-name", action="append", default=[], metavar="PATH",
                        help="target path to download (repeatable, kept in order)")
    parser.add_argument("--target-base-url", metavar="URL",
                        help="base URL of the repository's targets")
    parser.add_argument("--target-dir", metavar="DIR",
                        help="directory downloaded targets are written to")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_init = sub.add_parser("init", help="install TRUSTED_ROOT_FILE as DIR/root.json")
    p_init.add_argument("trusted_root", metavar="TRUSTED_ROOT_FILE")
    p_init.set_defaults(func=cmd_init, needs=())
    p_refresh = sub.add_parser("refresh", help="update top-level metadata")
    p_refresh.set_defaults(func=cmd_refresh, needs=("metadata_url",))
    p_download = sub.add_parser("download", help="refresh, then download targets")
    p_download.set_defaults(
        func=cmd_download,
        needs=("metadata_url", "target_name", "target_base_url", "target_dir"),
    )
    return parser


def _quiet_python_logging() -> None:
    if os.environ.get("TUF_CLIENT_DEBUG"):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                            format=f"{PROG}: debug: %(name)s: %(message)s")
        return
    # No handler at all would make logging's lastResort print WARNING+ records
    # to stderr; route warnings into logging and drop everything.
    logging.getLogger().addHandler(logging.NullHandler())
    logging.captureWarnings(True)
    warnings.simplefilter("ignore")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    missing = [
        "--" + name.replace("_", "-") for name in args.needs if not getattr(args, name)
    ]
    if missing:
        parser.error(f"{args.command} requires {', '.join(missing)}")

    _quiet_python_logging()
    try:
        lines = args.func(args)
    except Exception as e:  # noqa: BLE001  every failure is reported the same way
        sys.stderr.write(f"{PROG}: {_describe(e)}\n")
        sys.stderr.flush()
        return 1
    if lines:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
