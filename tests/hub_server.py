"""A small Hugging Face Hub look-alike for the tests: just enough of the Hub's HTTP API for
huggingface_hub's ``create_repo``, ``create_branch``, ``upload_folder`` / ``create_commit`` (README
validation, preupload, the LFS batch + basic transfer, ndjson commit, pull requests), ``model_info`` /
``repo_info``, ``file_exists`` and ``hf_hub_download`` (HEAD + GET on ``resolve``).

It binds 127.0.0.1 only, keeps everything in memory, stops itself after ``max_lifetime`` seconds, and
records every request so that a test can check what a client did (or that it did nothing, offline).
Point a client at it with ``HF_ENDPOINT=server.url`` and ``HF_HUB_DISABLE_XET=1`` (no Xet service here).

Only model repos with an ``owner/name`` id are supported. Files of 10 MB or more, and the usual binary
extensions, go through LFS (as the Hub's default ``.gitattributes`` would send them).
"""
import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ['HubServer']

LFS_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.h5', '.onnx', '.tar', '.zip', '.npz', '.msgpack')
GITATTRIBUTES = b''.join(f'*{s} filter=lfs diff=lfs merge=lfs -text\n'.encode() for s in LFS_SUFFIXES)
_REPO = r'(?P<repo>[\w.-]+/[\w.-]+)'
_REV = r'(?P<rev>[^/]+)'


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass
class RepoFile:
    size: int
    content: Optional[bytes] = None  # regular (git) file
    lfs_oid: Optional[str] = None    # LFS file: sha256 of the content, kept in the server's LFS store

    @property
    def oid(self) -> str:
        """What the Hub's preupload answers as the remote oid: sha256 for LFS, git sha1 otherwise."""
        return self.lfs_oid if self.lfs_oid else git_blob_sha1(self.content)

    @property
    def etag(self) -> str:
        return self.oid


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    files: Dict[str, RepoFile]
    title: str
    created: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: Dict[str, str] = field(default_factory=dict)   # branch or 'refs/pr/N' -> commit oid
    commits: Dict[str, Commit] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    num_prs: int = 0

    def resolve(self, revision: str) -> Optional[Commit]:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """``with HubServer(token='t') as hub: ...``; ``hub.url`` is the endpoint, ``hub.requests`` the log."""

    def __init__(self, token: Optional[str] = None, max_lifetime: float = 600.0) -> None:
        self.token = token
        self.max_lifetime = max_lifetime
        self.repos: Dict[str, Repo] = {}
        self.lfs: Dict[str, bytes] = {}
        self.requests: List[Tuple[str, str]] = []
        self.unhandled: List[Tuple[str, str]] = []
        self.lock = threading.RLock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._timer: Optional[threading.Timer] = None

    # ---- lifecycle -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f'http://{host}:{port}'

    def start(self) -> 'HubServer':
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={'poll_interval': 0.1},
                                        name='hub-server', daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime, self.stop)  # never outlive a stuck test
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        httpd = self._httpd
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if httpd is not None and self._thread is not None and self._thread.is_alive():
            httpd.shutdown()
            httpd.server_close()
            self._thread.join(timeout=10)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> 'HubServer':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- state helpers for tests ----------------------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self.lock:
            if repo_id in self.repos:
                return self.repos[repo_id]
            repo = Repo(repo_id, private)
            self._commit(repo, 'main', {'.gitattributes': RepoFile(len(GITATTRIBUTES), content=GITATTRIBUTES)},
                         'initial commit')
            self.repos[repo_id] = repo
            return repo

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, RepoFile]:
        return dict(self.repos[repo_id].resolve(revision).files)

    def num_commits(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits)

    def _commit(self, repo: Repo, ref: str, files: Dict[str, RepoFile], title: str) -> Commit:
        parent = repo.refs.get(ref)
        seed = f'{repo.repo_id}|{parent}|{title}|{time.time_ns()}|{sorted((p, f.oid) for p, f in files.items())}'
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, files, title)
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = 'HTTP/1.1'
    server_version = 'TestHub/1.0'

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # ---- plumbing --------------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch('GET')

    def do_HEAD(self):
        self._dispatch('HEAD')

    def do_POST(self):
        self._dispatch('POST')

    def do_PUT(self):
        self._dispatch('PUT')

    def _read_body(self) -> bytes:
        if 'chunked' in (self.headers.get('Transfer-Encoding') or '').lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b';')[0].strip() or b'0', 16)
                if size == 0:
                    while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                        pass
                    return b''.join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else b''

    def _send(self, status: int, body: bytes = b'', headers: Optional[dict] = None,
              content_type: str = 'application/json') -> None:
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD' and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        body = self._read_body() if method in ('POST', 'PUT') else b''
        with hub.lock:
            hub.requests.append((method, path))
        try:
            for route_method, pattern, handler in _ROUTES:
                if route_method == method or (route_method == 'GET' and method == 'HEAD'):
                    m = re.fullmatch(pattern, path)
                    if m:
                        groups = {k: unquote(v) for k, v in m.groupdict().items()}
                        return handler(self, body=body, query=query, **groups)
            with hub.lock:
                hub.unhandled.append((method, path))
            raise HubError(404, f'No route for {method} {path}')
        except HubError as e:
            headers = dict(e.headers)
            if e.code:
                headers['X-Error-Code'] = e.code
            headers['X-Error-Message'] = e.message
            self._json(e.status, {'error': e.message}, headers)
        except Exception as e:  # a bug in the test server: make it visible to the client as a 500
            self._json(500, {'error': f'test hub server error: {type(e).__name__}: {e}'})

    # ---- auth and lookups ------------------------------------------------------------------------------
    def _authorized(self) -> bool:
        token = self.hub.token
        return token is None or self.headers.get('Authorization') == f'Bearer {token}'

    def _require_write(self) -> None:
        if not self._authorized():
            raise HubError(401, 'Invalid credentials in Authorization header')

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404, 'Repository not found', 'RepoNotFound')
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f'Invalid rev id: {revision}', 'RevisionNotFound')
        return commit

    # ---- endpoints -------------------------------------------------------------------------------------
    def create_repo(self, body, query):
        self._require_write()
        payload = json.loads(body or b'{}')
        if payload.get('type', 'model') not in (None, 'model'):
            raise HubError(400, 'only model repos are supported by the test hub')
        name, org = payload.get('name'), payload.get('organization')
        if not org or not name:
            raise HubError(400, 'the test hub needs a namespace: owner/name')
        repo_id = f'{org}/{name}'
        url = f'{self._base()}/{repo_id}'
        with self.hub.lock:
            if repo_id in self.hub.repos:  # huggingface_hub reads 'url' from the 409 body with exist_ok=True
                return self._json(409, {'error': 'You already created this model repo', 'url': url},
                                  {'X-Error-Message': 'You already created this model repo'})
            private = payload.get('visibility') == 'private' or bool(payload.get('private'))
            self.hub.create_repo(repo_id, private=private)
        self._json(200, {'url': url, 'name': repo_id, 'id': repo_id})

    def validate_yaml(self, body, query):
        content = json.loads(body).get('content', '')
        errors = []
        if content.startswith('---'):
            parts = content.split('\n---', 1)
            try:
                meta = yaml.safe_load(parts[0][3:]) if len(parts) == 2 else None
                if len(parts) != 2 or not isinstance(meta, dict):
                    errors.append({'message': 'metadata must be a YAML mapping between --- lines'})
            except yaml.YAMLError as e:
                errors.append({'message': f'YAML error: {e}'})
        self._json(400 if errors else 200, {'errors': errors, 'warnings': []})

    def model_info(self, body, query, repo, rev='main'):
        repo_ = self._repo(repo)
        commit = self._commit_at(repo_, rev)
        readme = commit.files.get('README.md')
        card = None
        if readme is not None and readme.content and readme.content.startswith(b'---'):
            card = yaml.safe_load(readme.content.decode().split('\n---', 1)[0][3:])
        siblings = []
        for p, f in sorted(commit.files.items()):
            sib = {'rfilename': p}
            if 'blobs' in query:
                sib.update(size=f.size, blobId=git_blob_sha1(f.content or b''))
                if f.lfs_oid:
                    sib['lfs'] = {'size': f.size, 'sha256': f.lfs_oid, 'pointerSize': 134}
            siblings.append(sib)
        iso = time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(commit.created))
        info = {'id': repo, 'modelId': repo, 'author': repo.split('/')[0], 'sha': commit.oid, 'private': repo_.private,
                'lastModified': iso, 'createdAt': iso, 'siblings': siblings, 'tags': (card or {}).get('tags', []),
                'library_name': (card or {}).get('library_name'), 'cardData': card, 'disabled': False,
                'gated': False, 'downloads': 0, 'likes': 0}
        self._json(200, info)

    def create_branch(self, body, query, repo, rev):
        self._require_write()
        repo_ = self._repo(repo)
        start = json.loads(body or b'{}').get('startingPoint') or 'main'
        with self.hub.lock:
            if rev in repo_.refs:
                raise HubError(409, f'Reference already exists: {rev}')
            repo_.refs[rev] = self._commit_at(repo_, start).oid
        self._json(200, {})

    def preupload(self, body, query, repo, rev):
        self._require_write()
        repo_ = self._repo(repo)
        commit = self._commit_at(repo_, rev)
        out = []
        for f in json.loads(body)['files']:
            lfs = f['size'] >= LFS_THRESHOLD or f['path'].endswith(LFS_SUFFIXES)
            existing = commit.files.get(f['path'])
            out.append({'path': f['path'], 'uploadMode': 'lfs' if lfs else 'regular', 'shouldIgnore': False,
                        'oid': existing.oid if existing is not None else None})
        self._json(200, {'files': out, 'commitOid': commit.oid})

    def lfs_batch(self, body, query, repo):
        self._require_write()
        self._repo(repo)
        payload = json.loads(body)
        if payload.get('operation') != 'upload':
            raise HubError(400, 'only uploads are supported by the test hub')
        objects = []
        for obj in payload['objects']:
            item = {'oid': obj['oid'], 'size': obj['size'], 'authenticated': True}
            if obj['oid'] not in self.hub.lfs:
                href = f"{self._base()}/_lfs/{obj['oid']}"
                item['actions'] = {'upload': {'href': href, 'header': {}}, 'verify': {'href': href + '/verify'}}
            objects.append(item)
        self._send(200, json.dumps({'transfer': 'basic', 'objects': objects}).encode(),
                   content_type='application/vnd.git-lfs+json')

    def lfs_put(self, body, query, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f'content does not match oid {oid}')
        with self.hub.lock:
            self.hub.lfs[oid] = body
        self._send(200, b'', {'ETag': f'"{oid}"'})

    def lfs_verify(self, body, query, oid):
        payload = json.loads(body)
        data = self.hub.lfs.get(oid)
        if data is None or len(data) != payload.get('size'):
            raise HubError(404, f'LFS object {oid} not found or of another size')
        self._json(200, {})

    def commit(self, body, query, repo, rev):
        self._require_write()
        repo_ = self._repo(repo)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item['value'] for item in lines if item['key'] == 'header')
        with self.hub.lock:
            base = self._commit_at(repo_, rev)
            parent = header.get('parentCommit')
            if parent and not base.oid.startswith(parent):
                raise HubError(412, f'parent commit {parent} is not the head of {rev}')
            files = dict(base.files)
            for item in lines:
                key, value = item['key'], item['value']
                if key == 'file':
                    data = base64.b64decode(value['content'])
                    files[value['path']] = RepoFile(len(data), content=data)
                elif key == 'lfsFile':
                    data = self.hub.lfs.get(value['oid'])
                    if data is None:
                        raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value['path']] = RepoFile(len(data), lfs_oid=value['oid'])
                elif key == 'deletedFile':
                    if files.pop(value['path'], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", 'EntryNotFound')
                elif key == 'deletedFolder':
                    prefix = value['path'].rstrip('/') + '/'
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
            pr_url = None
            if query.get('create_pr'):
                repo_.num_prs += 1
                ref = f'refs/pr/{repo_.num_prs}'
                repo_.refs[ref] = base.oid
                pr_url = f'{self._base()}/{repo}/discussions/{repo_.num_prs}'
            else:
                ref = rev
            commit = self.hub._commit(repo_, ref, files, header.get('summary', ''))
        self._json(200, {'commitUrl': f'{self._base()}/{repo}/commit/{commit.oid}', 'commitOid': commit.oid,
                         'pullRequestUrl': pr_url, 'success': True})

    def resolve(self, body, query, repo, rev, path):
        repo_ = self._repo(repo)
        commit = self._commit_at(repo_, rev)
        f = commit.files.get(path)
        headers = {'X-Repo-Commit': commit.oid}
        if f is None:
            raise HubError(404, 'Entry not found', 'EntryNotFound', headers)
        data = f.content if f.content is not None else self.hub.lfs[f.lfs_oid]
        headers.update({'ETag': f'"{f.etag}"', 'Accept-Ranges': 'bytes'})
        if f.lfs_oid:
            headers.update({'X-Linked-Etag': f'"{f.lfs_oid}"', 'X-Linked-Size': f.size})
        status = 200
        rng = re.fullmatch(r'bytes=(\d+)-(\d*)', self.headers.get('Range') or '')
        if rng and self.command == 'GET':
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else len(data) - 1
            headers['Content-Range'] = f'bytes {start}-{end}/{len(data)}'
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, content_type='application/octet-stream')

    def _base(self) -> str:
        return self.hub.url


_ROUTES = [
    ('POST', r'/api/repos/create', _Handler.create_repo),
    ('POST', r'/api/validate-yaml', _Handler.validate_yaml),
    ('GET', rf'/api/models/{_REPO}', _Handler.model_info),
    ('GET', rf'/api/models/{_REPO}/revision/{_REV}', _Handler.model_info),
    ('POST', rf'/api/models/{_REPO}/branch/{_REV}', _Handler.create_branch),
    ('POST', rf'/api/models/{_REPO}/preupload/{_REV}', _Handler.preupload),
    ('POST', rf'/api/models/{_REPO}/commit/{_REV}', _Handler.commit),
    ('POST', rf'/{_REPO}\.git/info/lfs/objects/batch', _Handler.lfs_batch),
    ('PUT', r'/_lfs/(?P<oid>[0-9a-f]{64})', _Handler.lfs_put),
    ('POST', r'/_lfs/(?P<oid>[0-9a-f]{64})/verify', _Handler.lfs_verify),
    ('GET', rf'/{_REPO}/resolve/{_REV}/(?P<path>.+)', _Handler.resolve),
]
