"""A Kubernetes API for tests: kmock's emulator served on a free port from a thread of its own, with a small
synchronous client (what ``kubectl`` would do) and a kubeconfig that points there.

kmock keeps objects in memory and merges patches; it does not stamp ``resourceVersion``, ``generation``,
``creationTimestamp``, ``uid`` or generated names: the emulator below and ``create``/``patch_spec`` do, as the
API server would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import kmock


@attrs.define(kw_only=True)
class _NamingEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus two things an API server does and kopf relies on:

    - ``metadata.generateName`` (kopf names its Events so): a created object without a name gets the prefix and
      a random suffix, instead of every Event colliding on name None;
    - ``metadata.resourceVersion`` changes on every write, so kopf tells its own patches' echoes from stale events
      (without it, kopf may act on a stale body and handle one creation twice).
    """

    _versions: itertools.count = attrs.field(factory=lambda: itertools.count(2), init=False)  # type: ignore[type-arg]

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            version = str(next(self._versions))
            if isinstance(request.data, dict):
                metadata = request.data.setdefault("metadata", {})
                if request.action == kmock.action.CREATE and not metadata.get("name") and metadata.get("generateName"):
                    metadata["name"] = f"{metadata['generateName']}{uuid.uuid4().hex[:10]}"
                metadata["resourceVersion"] = version
            elif isinstance(request.data, list):  # a JSON patch
                request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        return await super()._handle(request)


class KubeEmulator:
    """``with KubeEmulator(resources) as kube:``; ``resources`` maps "group/version/plural" to (kind, namespaced,
    subresources)."""

    def __init__(self, resources: dict[str, tuple[str, bool, Iterable[str]]]) -> None:
        self.resources = resources
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kmock", daemon=True)
        self._stack = contextlib.AsyncExitStack()
        self.handler: _NamingEmulator | None = None
        self.url = ""
        self._clock = 0

    def __enter__(self) -> KubeEmulator:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stack.aclose(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> None:
        handler = await self._stack.enter_async_context(_NamingEmulator())
        for key, (kind, namespaced, subresources) in self.resources.items():
            handler.resources[key] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=namespaced,
                subresources=set(subresources),
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            )
        server = await self._stack.enter_async_context(kmock.Server(handler))
        self.handler = handler
        self.url = str(server.url).rstrip("/")

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "kmock", "user": {"token": "kmock"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
                    "current-context": "kmock",
                }
            )
        )
        return path

    # --- a kubectl -------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    @staticmethod
    def path(api: str, namespace: str, plural: str, name: str = "") -> str:
        prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
        return f"{prefix}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")

    def create(self, api: str, plural: str, namespace: str, document: dict[str, Any]) -> Any:
        """POST with what the API server stamps: uid, creationTimestamp (strictly increasing), generation 1."""
        self._clock += 1
        created = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=self._clock)
        metadata = document.setdefault("metadata", {})
        metadata.setdefault("namespace", namespace)
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("creationTimestamp", created.strftime("%Y-%m-%dT%H:%M:%SZ"))
        metadata.setdefault("generation", 1)
        return self.request("POST", self.path(api, namespace, plural), document)

    def get(self, api: str, plural: str, namespace: str, name: str) -> Any:
        return self.request("GET", self.path(api, namespace, plural, name))

    def patch(self, api: str, plural: str, namespace: str, name: str, change: dict[str, Any]) -> Any:
        return self.request("PATCH", self.path(api, namespace, plural, name), change, "application/merge-patch+json")

    def patch_spec(self, api: str, plural: str, namespace: str, name: str, spec: dict[str, Any]) -> Any:
        """A spec change as the API server records it: generation + 1."""
        current = self.get(api, plural, namespace, name)
        generation = int(current["metadata"].get("generation", 1)) + 1
        return self.patch(api, plural, namespace, name, {"metadata": {"generation": generation}, "spec": spec})

    def delete(self, api: str, plural: str, namespace: str, name: str) -> Any:
        return self.request("DELETE", self.path(api, namespace, plural, name))

    def list(self, api: str, plural: str, namespace: str) -> list[dict[str, Any]]:
        return (self.request("GET", self.path(api, namespace, plural)) or {}).get("items", [])

    def requests(self) -> list[kmock.Request]:
        """Every request the emulator served so far."""
        assert self.handler is not None
        return list(self.handler)
