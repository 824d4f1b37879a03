"""A minimal Hugging Face Hub on 127.0.0.1, for testing real huggingface_hub calls.

Point ``HF_ENDPOINT`` at ``FakeHub.url``. It implements the few endpoints bitquant's Hub
code reaches: repo creation, branches, the "preupload" and "commit" steps of an upload
(every file as a regular, base64-inlined blob, so neither LFS nor Xet is involved), and
model info for downloads, answering with the error codes the real Hub uses for missing,
private and gated repositories. Data sets (``FakeHub.datasets``: repo id -> {path: bytes})
are served as the ``datasets`` library streams them: their info, file tree, paths-info and
file downloads. Everything it receives is kept in memory for assertions.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

#: The one commit every fake data set is at.
DATASET_SHA = "d" * 40


class FakeHub:
    def __init__(self, gated: set[str] = frozenset(), private: set[str] = frozenset(), token: str = "hf_write"):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}, "prs": [...]}
        self.datasets: dict[str, dict[str, bytes]] = {}  # repo_id -> {path: bytes}
        self.gated = set(gated)
        self.private = set(private)
        self.token = token
        self.requests: list[tuple[str, str]] = []
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, body: dict | list | None = None, headers: dict | None = None):
                self._raw(code, json.dumps({} if body is None else body).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _body(self) -> bytes:
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    data = gzip.decompress(data)
                return data

            def _authorized(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {hub.token}"

            def do_HEAD(self):
                self.do_GET()

            def _raw(self, code: int, data: bytes, headers: dict | None = None):
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _entry(self, path: str, data: bytes | None) -> dict:
                if data is None:
                    return {"type": "directory", "path": path, "oid": "0" * 40}
                return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}

            def _dataset(self) -> bool:
                """Answer a data-set request; False when the path is not one."""
                path = unquote(self.path.split("?")[0])
                routes = ((r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self._dataset_file),
                          (r"^/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)$", self._dataset_paths),
                          (r"^/api/datasets/([^/]+/[^/]+)/tree/([^/]+)/?(.*)$", self._dataset_tree),
                          (r"^/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?$", self._dataset_info))
                for pattern, answer in routes:
                    m = re.match(pattern, path)
                    if m:
                        files = hub.datasets.get(m.group(1))
                        if files is None:
                            self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                        else:
                            answer(m, files)
                        return True
                return False

            def _dataset_file(self, m, files: dict[str, bytes]) -> None:
                if m.group(3) not in files:
                    return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data = files[m.group(3)]
                self._raw(200, data, {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": DATASET_SHA,
                                      "Content-Type": "application/octet-stream"})

            def _dataset_paths(self, m, files: dict[str, bytes]) -> None:
                wanted = parse_qs(self._body().decode()).get("paths", [])
                dirs = {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}
                self._send(200, [self._entry(w, files.get(w)) for w in wanted if w in files or w in dirs])

            def _dataset_tree(self, m, files: dict[str, bytes]) -> None:
                prefix = m.group(3).strip("/")
                recursive = "recursive=true" in self.path.lower() or "recursive=1" in self.path
                out, seen = [], set()
                for f, data in sorted(files.items()):
                    if prefix and not f.startswith(prefix + "/"):
                        continue
                    rest = f[len(prefix) + 1:] if prefix else f
                    if "/" in rest and not recursive:
                        d = (prefix + "/" if prefix else "") + rest.split("/")[0]
                        if d not in seen:
                            seen.add(d)
                            out.append(self._entry(d, None))
                    else:
                        out.append(self._entry(f, data))
                self._send(200, out)

            def _dataset_info(self, m, files: dict[str, bytes]) -> None:
                self._send(200, {"id": m.group(1), "_id": "0" * 24, "sha": DATASET_SHA, "private": False, "gated": False,
                                 "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                                 "lastModified": "2026-01-01T00:00:00.000Z", "cardData": {},
                                 "siblings": [{"rfilename": f} for f in sorted(files)]})

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if self._dataset():
                    return
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
                if self.path.startswith("/api/datasets/") and self._dataset():
                    return
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
