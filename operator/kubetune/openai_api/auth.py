"""Who is calling and what they may do.

`kubernetes` (the default): the bearer token is a Kubernetes token. The API server says who it
belongs to (TokenReview) and whether that user may act on FineTuneJobs in the addressed namespace
(SubjectAccessReview, group kubetune.dev, resource finetunejobs, verb create/get/list/update/delete).
Files are guarded by the same rights as jobs: whoever may not list a namespace's FineTuneJobs
does not see its files either.

`token`: one static token (the local stack, which has no TokenReview); whoever holds it may do
anything in any namespace. `none`: no authentication at all, for a laptop; logged loudly.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field
from typing import Protocol

from kubetune.api.meta import GROUP
from kubetune.controller.kube import ApiError, KubeClient
from kubetune.openai_api.errors import OpenAIError

log = logging.getLogger(__name__)
SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class Caller:
    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, hash=False)

    @property
    def own_namespace(self) -> str | None:
        """A service account's namespace, where a caller without a path prefix works."""
        if self.username.startswith(SA_PREFIX):
            return self.username[len(SA_PREFIX):].split(":")[0]
        return None


class Authorizer(Protocol):
    async def identify(self, token: str | None) -> Caller: ...
    async def check(self, caller: Caller, namespace: str, verb: str) -> None: ...


def _unauthenticated(message: str) -> OpenAIError:
    return OpenAIError(401, message, code="invalid_api_key")


class KubernetesAuth:
    def __init__(self, client: KubeClient):
        self.client = client

    async def _review(self, api_version: str, kind: str, spec: dict) -> dict:
        try:
            return await self.client.create(f"/apis/{api_version}/{kind.lower()}s",
                                            {"apiVersion": api_version, "kind": kind, "spec": spec})
        except ApiError as exc:
            log.error("%s failed: %s", kind, exc)
            raise OpenAIError(503, "the Kubernetes API server could not check the credentials; try again",
                              code="auth_unavailable") from exc

    async def identify(self, token: str | None) -> Caller:
        if not token:
            raise _unauthenticated("no bearer token: send a Kubernetes token as the API key "
                                   "(Authorization: Bearer TOKEN)")
        review = await self._review("authentication.k8s.io/v1", "TokenReview", {"token": token})
        status = review.get("status") or {}
        if not status.get("authenticated"):
            raise _unauthenticated("the bearer token is not a valid Kubernetes token"
                                   + (f" ({status['error']})" if status.get("error") else ""))
        user = status.get("user") or {}
        return Caller(user.get("username", ""), user.get("uid", ""), tuple(user.get("groups") or ()),
                      user.get("extra") or {})

    async def check(self, caller: Caller, namespace: str, verb: str) -> None:
        review = await self._review("authorization.k8s.io/v1", "SubjectAccessReview", {
            "user": caller.username, "uid": caller.uid, "groups": list(caller.groups), "extra": caller.extra,
            "resourceAttributes": {"namespace": namespace, "verb": verb, "group": GROUP, "resource": "finetunejobs"}})
        if not (review.get("status") or {}).get("allowed"):
            raise OpenAIError(403, f"{caller.username} may not {verb} finetunejobs.{GROUP} in namespace {namespace}",
                              code="forbidden")


class StaticTokenAuth:
    def __init__(self, token: str):
        if not token:
            raise ValueError("auth mode token needs a non-empty token")
        self.token = token

    async def identify(self, token: str | None) -> Caller:
        if not token or not hmac.compare_digest(token.encode(), self.token.encode()):
            raise _unauthenticated("missing or wrong API key")
        return Caller("static-token")

    async def check(self, caller: Caller, namespace: str, verb: str) -> None:
        return None


class NoAuth:
    def __init__(self):
        log.warning("AUTHENTICATION IS OFF: anyone who reaches this server may create and read fine-tuning "
                    "jobs and files in every namespace. Use --auth kubernetes on a shared cluster.")

    async def identify(self, token: str | None) -> Caller:
        return Caller("anonymous")

    async def check(self, caller: Caller, namespace: str, verb: str) -> None:
        return None
