#!/usr/bin/env python3
"""Reference-client adapter: run python-tuf's ngclient against a local repo.

Usage:
  ngclient_download.py --repo-dir DIR --trusted-root FILE --work-dir DIR
                       [--target NAME ...]

DIR must contain metadata/ and targets/ as published by a TUF repository
(consistent snapshots or not: ngclient picks the file names from root). DIR is
served on 127.0.0.1 by an in-process HTTP server; the trusted root is copied to
WORK_DIR/metadata/root.json and used to bootstrap
tuf.ngclient.Updater(metadata_dir=WORK_DIR/metadata,
                     target_dir=WORK_DIR/targets, ...).
After refresh(), every --target is looked up and downloaded, in order.

Prints exactly one JSON object on stdout:
  {"ok": bool, "error": str|null, "error_type": str|null, "root_version": int,
   "targets": {name: {"path": str, "length": int, "sha256": str}},
   "requests": [request paths served, in order]}
and exits 0 when ok, 1 otherwise (2 for usage errors). ngclient's own log
output, if any, goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import shutil
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tuf.ngclient import Updater


class _RecordingHandler(SimpleHTTPRequestHandler):
    """Static file handler that records request paths and logs nothing."""

    def __init__(self, *args: Any, request_log: list[str], **kwargs: Any):
        self._request_log = request_log
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._request_log.append(self.path)
        super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        self._request_log.append(self.path)
        super().do_HEAD()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve `directory` on 127.0.0.1:<ephemeral>; yield (base URL, request log)."""
    request_log: list[str] = []
    handler = functools.partial(
        _RecordingHandler, directory=str(directory), request_log=request_log
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="tuf-repo-http", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}", request_log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _root_version(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_bytes())["signed"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _file_info(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"path": str(path), "length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _describe(exc: BaseException) -> str:
    """Return "Type: message" for `exc` and its causes (python-tuf often
    wraps the informative error with "raise ... from", e.g.
    DeserializationError <- ValueError)."""
    parts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__
    return " <- ".join(parts)


def run(repo_dir: Path, trusted_root: Path, work_dir: Path, targets: list[str]) -> dict[str, Any]:
    """Refresh and download `targets` with ngclient; never raises for TUF errors."""
    result: dict[str, Any] = {
        "ok": False,
        "error": None,
        "error_type": None,
        "root_version": 0,
        "targets": {},
        "requests": [],
    }
    metadata_dir = work_dir / "metadata"
    target_dir = work_dir / "targets"

    with serve(repo_dir) as (base_url, request_log):
        try:
            root_bytes = trusted_root.read_bytes()
            metadata_dir.mkdir(parents=True, exist_ok=True)
            target_dir.mkdir(parents=True, exist_ok=True)
            # ngclient leaves root.json as a symlink into root_history/; unlink
            # it so the copy cannot write through into a cached root version.
            local_root = metadata_dir / "root.json"
            local_root.unlink(missing_ok=True)
            shutil.copyfile(trusted_root, local_root)

            updater = Updater(
                metadata_dir=str(metadata_dir),
                metadata_base_url=f"{base_url}/metadata/",
                target_dir=str(target_dir),
                target_base_url=f"{base_url}/targets/",
                bootstrap=root_bytes,
            )
            updater.refresh()
            for name in targets:
                info = updater.get_targetinfo(name)
                if info is None:
                    raise LookupError(f"target {name!r} not found in any trusted targets role")
                path = Path(updater.download_target(info)).resolve()
                result["targets"][name] = _file_info(path)
            result["ok"] = True
        except Exception as e:  # noqa: BLE001  report any failure as JSON
            result["error_type"] = type(e).__name__
            result["error"] = _describe(e)
    # The server has been shut down and joined, so the log is complete.
    result["requests"] = list(request_log)

    # The root the client ended up trusting (after any rotation); fall back to
    # the bootstrap root when refresh never got that far.
    version = _root_version(metadata_dir / "root.json") or _root_version(trusted_root)
    result["root_version"] = version or 0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download TUF targets with python-tuf ngclient.")
    parser.add_argument("--repo-dir", required=True, type=Path,
                        help="directory holding metadata/ and targets/")
    parser.add_argument("--trusted-root", required=True, type=Path,
                        help="root metadata file to trust initially")
    parser.add_argument("--work-dir", required=True, type=Path,
                        help="client state directory (metadata/ and targets/ are created)")
    parser.add_argument("--target", action="append", default=[], metavar="NAME",
                        help="target path to look up and download (repeatable, in order)")
    args = parser.parse_args(argv)

    result = run(args.repo_dir.resolve(), args.trusted_root, args.work_dir, args.target)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
