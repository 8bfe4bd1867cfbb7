"""A minimal Hugging Face Hub on 127.0.0.1 for the tests, in memory, served by a thread: enough for huggingface_hub's
``HfApi.create_repo``, ``repo_info``, ``create_branch``, ``upload_folder`` (preupload answers every file 'regular',
so each arrives base64 in the commit's ndjson: no LFS, no Xet) and ``hf_hub_download`` (HEAD / GET of
``/{repo}/resolve/{revision}/{file}``, as timm's ``hf-hub:`` loading uses it). Model repos ``owner/name`` only;
writes need ``Authorization: Bearer <token>``; every commit received gets a new oid (a test sees whether a retried
push committed again); ``requests`` logs every request. Clients find it through ``HF_ENDPOINT=hub.url``, which
huggingface_hub reads when it is imported."""
import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class HubError(Exception):
    """(HTTP status, message, X-Error-Code)"""


class HubServer:
    """``with HubServer() as hub:``; ``hub.repos[repo_id]``: ``{'refs': {branch: oid}, 'commits': {oid: {path:
    bytes}}}``."""

    def __init__(self, token='hf_test_token'):
        self.token, self.repos, self.requests, self.lock = token, {}, [], threading.Lock()
        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), type('Handler', (_Handler,), {'hub': self}))
        self._httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self._httpd.server_address[1]}'

    def __enter__(self):
        threading.Thread(target=self._httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    def head(self, repo_id, revision='main'):
        """(commit oid, {path: bytes}) of a branch or commit."""
        if repo_id not in self.repos:
            raise HubError(404, 'Repository not found', 'RepoNotFound')
        repo = self.repos[repo_id]
        oid = repo['refs'].get(revision, revision)
        if oid not in repo['commits']:
            raise HubError(404, f'Invalid rev id: {revision}', 'RevisionNotFound')
        return oid, dict(repo['commits'][oid])

    def commit(self, repo_id, branch, files):
        repo = self.repos[repo_id]
        tree = sorted((path, git_blob_oid(data)) for path, data in files.items())
        oid = hashlib.sha1(json.dumps([repo_id, repo['refs'].get(branch), len(repo['commits']), tree]).encode())
        oid = oid.hexdigest()
        repo['commits'][oid], repo['refs'][branch] = dict(files), oid
        return oid


_REPO, _REV = r'(?P<repo>[\w.-]+/[\w.-]+)', r'(?P<rev>[^/]+)'
_ROUTES = [  # (method, path, handler); a GET route answers HEAD too
    ('POST', r'/api/repos/create', 'create_repo'),
    ('POST', r'/api/validate-yaml', 'validate_yaml'),
    ('GET', rf'/api/models/{_REPO}(?:/revision/{_REV})?', 'repo_info'),
    ('POST', rf'/api/models/{_REPO}/branch/{_REV}', 'create_branch'),
    ('POST', rf'/api/models/{_REPO}/preupload/{_REV}', 'preupload'),
    ('POST', rf'/api/models/{_REPO}/commit/{_REV}', 'commit'),
    ('GET', rf'/{_REPO}/resolve/{_REV}/(?P<path>.+)', 'resolve'),
]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = 'HTTP/1.1'
    log_message = lambda self, *args: None  # noqa: E731 (keep the test output clean)

    def do_GET(self):
        split = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        with self.hub.lock:
            self.hub.requests.append((self.command, split.path))
            try:
                for method, pattern, name in _ROUTES:
                    match = re.fullmatch(pattern, split.path)
                    if match and method == ('GET' if self.command == 'HEAD' else self.command):
                        if method == 'POST' and self.headers.get('Authorization') != f'Bearer {self.hub.token}':
                            raise HubError(401, 'Invalid credentials in Authorization header', '')
                        args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                        return getattr(self, name)(body, parse_qs(split.query), **args)
                raise HubError(404, f'no route for {self.command} {split.path}', '')
            except HubError as e:
                status, message, code = e.args
                self._send(status, {'error': message}, {'X-Error-Message': message, 'X-Error-Code': code})
            except Exception as e:  # a bug of this server: a 500 the client reports
                self._send(500, {'error': f'test hub: {type(e).__name__}: {e}'})

    do_HEAD = do_POST = do_GET

    def _send(self, status, body, headers=None):
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for key, value in {'Content-Type': 'application/json', **(headers or {}), 'Content-Length': len(body)}.items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def create_repo(self, body, query):
        payload = json.loads(body)
        if payload.get('type', 'model') != 'model' or not payload.get('organization'):
            raise HubError(400, 'this test hub keeps model repos named owner/name only', '')
        repo = f"{payload['organization']}/{payload['name']}"
        answer = {'url': f'{self.hub.url}/{repo}', 'name': repo}
        if repo in self.hub.repos:  # create_repo(exist_ok=True) takes the 409's url
            return self._send(409, dict(answer, error='You already created this model repo'))
        self.hub.repos[repo] = {'refs': {}, 'commits': {}}
        self.hub.commit(repo, 'main', {'.gitattributes': b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n'})
        self._send(200, answer)

    def validate_yaml(self, body, query):  # the Hub refuses a README whose metadata is not a YAML mapping
        text = json.loads(body)['content']
        ok = isinstance(yaml.safe_load(text.split('\n---', 1)[0][3:]) if text.startswith('---') else {}, dict)
        self._send(200 if ok else 400, {'errors': [] if ok else [{'message': 'the metadata is no YAML mapping'}]})

    def repo_info(self, body, query, repo, rev='main'):
        oid, files = self.hub.head(repo, rev)
        self._send(200, {'id': repo, 'sha': oid, 'private': False, 'siblings': [{'rfilename': p} for p in files]})

    def create_branch(self, body, query, repo, rev):
        start = self.hub.head(repo, json.loads(body or b'{}').get('startingPoint') or 'main')[0]
        if rev in self.hub.repos[repo]['refs']:
            raise HubError(409, f'Reference already exists: {rev}', '')
        self.hub.repos[repo]['refs'][rev] = start
        self._send(200, {})

    def preupload(self, body, query, repo, rev):
        oid, files = self.hub.head(repo, rev)
        self._send(200, {'commitOid': oid, 'files': [
            {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False,
             'oid': git_blob_oid(files[f['path']]) if f['path'] in files else None}
            for f in json.loads(body)['files']]})

    def commit(self, body, query, repo, rev):
        if query.get('create_pr'):
            raise HubError(400, 'this test hub has no pull requests', '')
        files = self.hub.head(repo, rev)[1]
        for item in map(json.loads, body.decode().splitlines()):
            key, value = item['key'], item['value']
            if key == 'file':
                files[value['path']] = base64.b64decode(value['content'])
            elif key == 'deletedFile':
                files.pop(value['path'])
            elif key != 'header':  # lfsFile, deletedFolder, copies: this hub never asks for them
                raise HubError(400, f'this test hub does not take {key!r} operations', '')
        new = self.hub.commit(repo, rev, files)
        self._send(200, {'commitUrl': f'{self.hub.url}/{repo}/commit/{new}', 'commitOid': new,
                         'pullRequestUrl': None})

    def resolve(self, body, query, repo, rev, path):
        oid, files = self.hub.head(repo, rev)
        if path not in files:
            raise HubError(404, 'Entry not found', 'EntryNotFound')
        self._send(200, files[path], {'Content-Type': 'application/octet-stream', 'X-Repo-Commit': oid,
                                      'ETag': f'"{git_blob_oid(files[path])}"'})
