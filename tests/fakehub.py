"""A stand-in for the Hugging Face Hub on 127.0.0.1, so `pull` is tested with real HTTP,
real huggingface-hub and a real file, and no internet. It speaks the few endpoints pull
uses (file metadata, file download with Range, repo tree) and can cut a download short."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    files: dict[str, dict[str, Path]]  # repo -> {path in repo: local file}
    cut_after: int | None = None  # bytes served before the next download is cut off
    ranges: list[str] = field(default_factory=list)  # Range headers of GET requests
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def sha(self, local: Path) -> str:
        return hashlib.sha256(local.read_bytes()).hexdigest()

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _file(self) -> Path | None:
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, rel = "/".join(parts[:2]), "/".join(parts[4:])
                    return hub.files.get(repo, {}).get(rel)
                return None

            def _meta_headers(self, local: Path) -> None:
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hub.sha(local)}"')
                self.send_header("X-Linked-Etag", f'"{hub.sha(local)}"')
                self.send_header("X-Linked-Size", str(local.stat().st_size))

            def do_HEAD(self) -> None:
                local = self._file()
                if local is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                self.send_response(200)
                self._meta_headers(local)
                self.send_header("Content-Length", str(local.stat().st_size))
                self.end_headers()

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path.startswith("/api/models/") and "/tree/" in path:
                    repo = "/".join(path.split("/")[3:5])
                    items = [{"type": "file", "path": rel, "size": p.stat().st_size,
                              "oid": hub.sha(p)[:40]} for rel, p in hub.files.get(repo, {}).items()]
                    found = repo in hub.files
                    body = json.dumps(items if found else {"error": "Repository not found"}).encode()
                    self.send_response(200 if found else 404)
                    if not found:
                        self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                local = self._file()
                if local is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = local.read_bytes()
                rng = self.headers.get("Range")
                hub.ranges.append(rng or "")
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                self._meta_headers(local)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if hub.cut_after is not None:
                    body, hub.cut_after = body[: hub.cut_after], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the network drops mid-download
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
