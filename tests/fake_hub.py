"""A minimal Hugging Face Hub on 127.0.0.1, for testing real huggingface_hub calls.

Point ``HF_ENDPOINT`` at ``FakeHub.url``. It implements the few endpoints bitquant's Hub
code reaches: repo creation, branches, the "preupload" and "commit" steps of an upload
(every file as a regular, base64-inlined blob, so neither LFS nor Xet is involved), and
model info for downloads, answering with the error codes the real Hub uses for missing,
private and gated repositories. Everything it receives is kept in memory for assertions.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, gated: set[str] = frozenset(), private: set[str] = frozenset(), token: str = "hf_write"):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}, "prs": [...]}
        self.gated = set(gated)
        self.private = set(private)
        self.token = token
        self.requests: list[tuple[str, str]] = []
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, body: dict | None = None, headers: dict | None = None):
                data = json.dumps(body or {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    data = gzip.decompress(data)
                return data

            def _authorized(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {hub.token}"

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                d = re.match(r"^/api/models/([^/]+/[^/]+)/discussions/(\d+)", self.path)
                if d and d.group(1) in hub.repos:
                    pr = hub.repos[d.group(1)]["prs"][int(d.group(2)) - 1]
                    return self._send(200, {
                        "num": int(d.group(2)), "title": pr["title"], "createdAt": "2026-01-01T00:00:00.000Z",
                        "status": "draft", "repo": {"name": d.group(1), "type": "model"}, "isPullRequest": True,
                        "events": [], "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [],
                    })
                m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/?]+))?", self.path)
                if not m:
                    m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/", self.path)
                if not m:
                    return self._send(404, {"error": "not found"})
                repo = m.group(1)
                if repo in hub.gated and not self._authorized():
                    return self._send(401, {"error": f"Access to model {repo} is restricted."}, {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
                if repo in hub.private and not self._authorized():
                    return self._send(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
                return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                if not self._authorized() and self.path != "/api/validate-yaml":
                    return self._send(401, {"error": "Invalid credentials"}, {"X-Error-Message": "Invalid credentials in Authorization header"})
                if self.path == "/api/validate-yaml":  # the model card's front matter, checked before upload
                    body = json.loads(self._body())
                    hub.validated.append(body["content"])
                    return self._send(200, {"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    body = json.loads(self._body())
                    repo = f"{body.get('organization') or 'user'}/{body['name']}"
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                    hub.repos[repo] = {"private": body.get("visibility") == "private" or bool(body.get("private")), "branches": {"main": {}}, "prs": []}
                    return self._send(200, {"url": f"{hub.url}/{repo}"})
                d = re.match(r"^/api/models/([^/]+/[^/]+)/discussions$", self.path)
                if d and d.group(1) in hub.repos:
                    prs = hub.repos[d.group(1)]["prs"]
                    prs.append({"title": json.loads(self._body())["title"], "files": {}})
                    return self._send(200, {"num": len(prs)})
                m = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/([^?]+)(\?.*)?$", self.path)
                if not m or m.group(1) not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                repo, action, rev = m.group(1), m.group(2), m.group(3)
                state = hub.repos[repo]
                body = self._body()
                if action == "branch":
                    state["branches"].setdefault(rev, dict(state["branches"]["main"]))
                    return self._send(200, {})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                files, header = {}, {}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        header = item["value"]
                    elif item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                oid = f"{len(hub.requests):040x}"
                pr = re.match(r"^refs(?:/|%2F)pr(?:/|%2F)(\d+)$", rev)
                if pr:
                    num = int(pr.group(1))
                    state["prs"][num - 1]["files"].update(files)
                    return self._send(200, {"commitOid": oid, "commitUrl": f"{hub.url}/{repo}/commit/{oid}",
                                            "pullRequestUrl": f"{hub.url}/{repo}/discussions/{num}"})
                state["branches"].setdefault(rev, {}).update(files)
                state.setdefault("messages", []).append(header.get("summary"))
                return self._send(200, {"commitOid": oid, "commitUrl": f"{hub.url}/{repo}/commit/{oid}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
