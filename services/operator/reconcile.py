"""What the operator does to Kafka for one KafkaTopic or EventSchema, without kopf: the handlers (``handlers``)
turn an ``Outcome`` into status, an Event and kopf's retry or give-up.

The broker side is the declarations library, the code path ``make run``'s local apply uses: a custom resource is
parsed by ``resources.parse_document`` (the same checks), a topic is reconciled by ``topics.reconcile_topics``
and a schema registered by ``registry.KafkaSchemaStore``. What only the operator adds: ownership (the spec owns
its declared config keys, and only the keys it applied before are reset when undeclared), adoption of what
exists, the oldest resource winning a topic or subject two of them declare, and deletion by policy.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from services.contracts.schema_store import SchemaStoreError, SchemaVersion
from services.declarations.registry import SCHEMAS_TOPIC_SPEC, KafkaSchemaStore, SchemaIncompatibleError
from services.declarations.resources import DELETION_DELETE, SchemaSpec, TopicSpec, parse_document
from services.declarations.topics import reconcile_topics

ANNOTATION_UNMANAGED = "lambdapipeline.io/unmanaged"  # "true": the operator leaves the resource alone
ANNOTATION_PAUSED = "lambdapipeline.io/paused"  # "true": observe and report, change nothing


class Reason(StrEnum):
    """``reason`` of the ``Ready`` condition (and of the Event that reports it)."""

    CREATED = "Created"
    ADOPTED = "Adopted"
    UPDATED = "Updated"
    NOT_SUPPORTED = "NotSupported"
    RESOURCE_CONFLICT = "ResourceConflict"
    KAFKA_ERROR = "KafkaError"
    INCOMPATIBLE = "Incompatible"
    INVALID = "InvalidSpec"
    PAUSED = "Paused"


# Ready stays True with these: the resource is what its spec says (or was made so).
READY_REASONS = (Reason.CREATED, Reason.ADOPTED, Reason.UPDATED)


@dataclass
class Outcome:
    """One reconciliation: the Ready condition, the status fields, and what the handler must do next."""

    reason: Reason
    message: str
    status: dict[str, Any] = field(default_factory=dict)
    changed: bool = False  # something changed on the broker (or a new state was reached): emit an Event
    retry: bool = False  # a broker problem: retry with backoff (kopf TemporaryError); else PermanentError if not ready

    @property
    def ready(self) -> bool | None:
        if self.reason is Reason.PAUSED:
            return None
        return self.reason in READY_REASONS


def is_true(annotations: Mapping[str, str], key: str) -> bool:
    return str(annotations.get(key, "")).strip().lower() in ("true", "yes", "1")


def parse_resource(body: Mapping[str, Any]) -> tuple[TopicSpec | SchemaSpec | None, list[str]]:
    """The resource's spec through the declarations parser (the checks local apply makes); problems if invalid."""
    problems: list[str] = []
    document = {key: body.get(key) for key in ("apiVersion", "kind", "metadata", "spec")}
    where = Path(f"{(body.get('metadata') or {}).get('namespace') or '-'}")
    parsed = parse_document(document, where, problems)
    return parsed, problems


@dataclass(frozen=True)
class Claimant:
    """A resource declaring a topic or subject; the oldest (creation time, then namespace/name) wins."""

    created: str
    namespace: str
    name: str
    uid: str

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def winner(claimants: list[Claimant]) -> Claimant | None:
    return min(claimants, key=lambda c: (c.created, c.namespace, c.name)) if claimants else None


class Reconciler:
    """Kafka-side work for the handlers; thread-safe (kopf runs sync handlers and timers in threads)."""

    def __init__(
        self,
        client_config: Mapping[str, Any],
        *,
        timeout: float = 30.0,
        cap_replication_factor: bool = False,
    ) -> None:
        self.client_config = dict(client_config)
        self.timeout = timeout
        self.cap_replication_factor = cap_replication_factor
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Resources whose topic this process deleted: a timer or handler that raced the deletion must not
        # create the topic again (the resource itself is gone once its finalizer is released).
        self._deleted_uids: set[str] = set()

    def lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def admin(self) -> AdminClient:
        return AdminClient(self.client_config)

    # --- topics -----------------------------------------------------------------------------------------

    def reconcile_topic(
        self, body: Mapping[str, Any], *, conflict_with: Claimant | None, paused: bool = False
    ) -> Outcome:
        spec, problems = parse_resource(body)
        if not isinstance(spec, TopicSpec):
            return Outcome(Reason.INVALID, "; ".join(problems) or "not a KafkaTopic")
        base = {"topicName": spec.topic_name}
        if conflict_with is not None:
            return Outcome(
                Reason.RESOURCE_CONFLICT,
                f"topic {spec.topic_name} is declared by the older KafkaTopic {conflict_with.ref}, which owns it",
                status=base,
            )
        uid = str((body.get("metadata") or {}).get("uid") or "")
        status = body.get("status") or {}
        with self.lock(f"topic/{spec.topic_name}"):
            if uid and uid in self._deleted_uids:
                return Outcome(Reason.UPDATED, "deleted", status=base)  # never recreate: the resource is going
            admin = self.admin()
            try:
                existed = spec.topic_name in admin.list_topics(timeout=self.timeout).topics
            except KafkaException as error:
                return Outcome(Reason.KAFKA_ERROR, f"cannot read cluster metadata: {error}", status=base, retry=True)
            if paused:
                return self._paused_topic(admin, spec, existed, base)
            owned = set((status.get("appliedConfigs") or {}).keys())
            (result,) = reconcile_topics(
                admin,
                [spec],
                timeout=self.timeout,
                cap_replication_factor=self.cap_replication_factor,
                owned_configs={spec.topic_name: owned},
            )
            observed = self._describe(admin, spec)
        first_time = not status.get("conditions")
        if result.unsupported:
            return Outcome(Reason.NOT_SUPPORTED, result.message, status=base | observed, changed=bool(result.changes))
        if result.action == "error":
            return Outcome(Reason.KAFKA_ERROR, result.message, status=base | observed, retry=True)
        if result.action == "created":
            return Outcome(Reason.CREATED, f"created: {result.message}", status=base | observed, changed=True)
        if existed and first_time:
            detail = f"; aligned {result.message}" if result.changes else ""
            return Outcome(Reason.ADOPTED, f"adopted the existing topic{detail}", status=base | observed, changed=True)
        if result.action == "updated":
            return Outcome(Reason.UPDATED, f"updated: {result.message}", status=base | observed, changed=True)
        previous = _ready_condition(status)
        reason = Reason(previous["reason"]) if previous and previous.get("reason") in READY_REASONS else Reason.UPDATED
        message = previous.get("message", "in sync") if previous and previous.get("status") == "True" else "in sync"
        return Outcome(reason, message, status=base | observed)

    def _paused_topic(self, admin: AdminClient, spec: TopicSpec, existed: bool, base: dict[str, Any]) -> Outcome:
        if not existed:
            return Outcome(Reason.PAUSED, "paused: the topic does not exist and is not created", status=base)
        observed = self._describe(admin, spec)
        drift = [
            f"{key}: {observed['appliedConfigs'].get(key, 'unset')} (declared {value})"
            for key, value in sorted(spec.config.items())
            if observed.get("appliedConfigs", {}).get(key) != value
        ]
        if observed.get("partitions") not in (None, spec.partitions):
            drift.insert(0, f"partitions: {observed['partitions']} (declared {spec.partitions})")
        detail = "; drift not reverted: " + "; ".join(drift) if drift else "; in sync"
        return Outcome(Reason.PAUSED, f"paused{detail}", status=base | observed)

    def _describe(self, admin: AdminClient, spec: TopicSpec) -> dict[str, Any]:
        """What the broker has now: topic id, partitions, replication factor, values of the declared keys."""
        observed: dict[str, Any] = {}
        try:
            description = admin.describe_topics(TopicCollection([spec.topic_name]))[spec.topic_name].result(
                timeout=self.timeout
            )
            topic_id = getattr(description, "topic_id", None)
            if topic_id is not None and str(topic_id) not in ("", "AAAAAAAAAAAAAAAAAAAAAA"):
                observed["topicId"] = str(topic_id)
            observed["partitions"] = len(description.partitions)
            if description.partitions:
                observed["replicationFactor"] = len(description.partitions[0].replicas)
        except (KafkaException, TimeoutError, KeyError):
            pass  # status keeps what it had; the reconcile result tells the error
        try:
            (future,) = admin.describe_configs([ConfigResource(ResourceType.TOPIC, spec.topic_name)]).values()
            entries = future.result(timeout=self.timeout)
            observed["appliedConfigs"] = {
                key: entries[key].value for key in sorted(spec.config) if key in entries and entries[key].value
            }
        except (KafkaException, TimeoutError):
            pass
        return observed

    def delete_topic(
        self, body: Mapping[str, Any], *, owner: Claimant | None, paused: bool, elapsed_s: float, give_up_s: float
    ) -> Outcome:
        """The Delete policy: delete the topic, unless another resource owns it or the resource is paused.

        A broker that does not answer is retried for ``give_up_s``, then given up (the finalizer is released
        anyway, so a namespace whose broker is gone can still be deleted): reason KafkaError, ``retry`` False.
        """
        spec, problems = parse_resource(body)
        metadata = body.get("metadata") or {}
        topic_name = (body.get("spec") or {}).get("topicName") if spec is None else spec.topic_name  # type: ignore[union-attr]
        if not isinstance(topic_name, str) or not topic_name:
            return Outcome(Reason.INVALID, "; ".join(problems) or "no topicName: nothing to delete")
        base = {"topicName": topic_name}
        uid = str(metadata.get("uid") or "")
        if owner is not None and owner.uid != uid:
            return Outcome(Reason.RESOURCE_CONFLICT, f"retained: topic {topic_name} belongs to {owner.ref}", base)
        if paused:
            return Outcome(Reason.PAUSED, f"retained: {topic_name} is paused, deletion does not touch the broker", base)
        with self.lock(f"topic/{topic_name}"):
            if uid:
                self._deleted_uids.add(uid)  # from now on no reconcile of this resource creates the topic
            admin = self.admin()
            try:
                (future,) = admin.delete_topics(
                    [topic_name], operation_timeout=self.timeout, request_timeout=self.timeout
                ).values()
                future.result(timeout=self.timeout)
            except KafkaException as exception:
                error = exception.args[0] if exception.args else None
                if isinstance(error, KafkaError) and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    return Outcome(Reason.UPDATED, f"deleted: topic {topic_name} was already gone", base, changed=True)
                return self._delete_failed(topic_name, str(exception), elapsed_s, give_up_s, base)
            except Exception as exception:  # timeouts: the broker did not answer
                return self._delete_failed(
                    topic_name, f"{type(exception).__name__}: {exception}", elapsed_s, give_up_s, base
                )
        return Outcome(
            Reason.UPDATED, f"deleted topic {topic_name} (deletionPolicy {DELETION_DELETE})", base, changed=True
        )

    @staticmethod
    def _delete_failed(
        topic_name: str, error: str, elapsed_s: float, give_up_s: float, base: dict[str, Any]
    ) -> Outcome:
        if elapsed_s < give_up_s:
            return Outcome(Reason.KAFKA_ERROR, f"cannot delete topic {topic_name}: {error}", base, retry=True)
        return Outcome(
            Reason.KAFKA_ERROR,
            f"gave up deleting topic {topic_name} after {elapsed_s:.0f}s ({error}): it may remain in Kafka; "
            "the finalizer is released so the resource (and its namespace) can go",
            base,
            changed=True,
        )

    # --- schemas ----------------------------------------------------------------------------------------

    def store(self) -> KafkaSchemaStore:
        return KafkaSchemaStore(
            self.client_config["bootstrap.servers"],
            timeout=self.timeout,
            client_config={k: v for k, v in self.client_config.items() if k != "bootstrap.servers"},
        )

    def ensure_schema_topic(self) -> str | None:
        """Create ``_lp_schemas`` if missing; the error text if that failed."""
        (result,) = reconcile_topics(
            self.admin(),
            [SCHEMAS_TOPIC_SPEC],
            timeout=self.timeout,
            cap_replication_factor=self.cap_replication_factor,
            owned_configs={SCHEMAS_TOPIC_SPEC.topic_name: ()},
        )
        return None if result.ok else result.message

    def reconcile_schema(
        self, body: Mapping[str, Any], *, conflict_with: Claimant | None, paused: bool = False
    ) -> Outcome:
        spec, problems = parse_resource(body)
        if not isinstance(spec, SchemaSpec):
            return Outcome(Reason.INVALID, "; ".join(problems) or "not an EventSchema")
        base: dict[str, Any] = {"subject": spec.subject}
        if conflict_with is not None:
            return Outcome(
                Reason.RESOURCE_CONFLICT,
                f"subject {spec.subject} is declared by the older EventSchema {conflict_with.ref}, which owns it",
                status=base,
            )
        status = body.get("status") or {}
        first_time = not status.get("conditions")
        with self.lock(f"subject/{spec.subject}"):
            problem = self.ensure_schema_topic()
            if problem is not None:
                return Outcome(Reason.KAFKA_ERROR, f"schema store topic: {problem}", status=base, retry=True)
            store = self.store()
            try:
                history = store.versions(spec.subject)
            except SchemaStoreError as error:
                return Outcome(Reason.KAFKA_ERROR, str(error), status=base, retry=True)
            served = _served(history)
            if paused:
                return Outcome(Reason.PAUSED, "paused: no version is registered", status=base | served)
            try:
                registered = store.register(spec.subject, spec.schema, spec.compatibility, history=history)
            except SchemaIncompatibleError as error:
                problems_text = [str(problem) for problem in error.problems]
                kept = f"version {history[-1].version} stays served" if history else "nothing is served"
                return Outcome(
                    Reason.INCOMPATIBLE,
                    f"refused: not {error.mode.value} compatible ({len(problems_text)} problem(s)); {kept}",
                    status=base
                    | served
                    | {
                        "compatibility": {
                            "mode": error.mode.value,
                            "result": "Incompatible",
                            "problems": problems_text,
                        }
                    },
                    changed=True,
                )
            except SchemaStoreError as error:
                return Outcome(Reason.KAFKA_ERROR, str(error), status=base, retry=True)
        if registered.registered:
            history = [*history, _as_version(spec, registered.version, registered.fingerprint)]
        served = _served(history) | {
            "compatibility": {"mode": spec.compatibility.value, "result": "Compatible", "problems": []}
        }
        if registered.registered and registered.version == 1:
            return Outcome(Reason.CREATED, f"registered version 1 of {spec.subject}", base | served, changed=True)
        if first_time and len(history) > (1 if registered.registered else 0):
            what = f"registered version {registered.version}" if registered.registered else "already the latest"
            return Outcome(Reason.ADOPTED, f"adopted subject {spec.subject}: {what}", base | served, changed=True)
        if registered.registered:
            return Outcome(Reason.UPDATED, f"registered version {registered.version}", base | served, changed=True)
        previous = _ready_condition(status)
        if previous and previous.get("status") == "True" and previous.get("reason") in READY_REASONS:
            return Outcome(Reason(previous["reason"]), previous.get("message", ""), base | served)
        return Outcome(Reason.UPDATED, f"version {registered.version} is served", base | served, changed=True)


def _served(history: list[SchemaVersion]) -> dict[str, Any]:
    if not history:
        return {}
    return {
        "version": history[-1].version,
        "versions": [version.version for version in history],
        "fingerprint": history[-1].fingerprint,
    }


def _as_version(spec: SchemaSpec, version: int, fingerprint: str) -> SchemaVersion:
    return SchemaVersion(spec.subject, version, dict(spec.schema), fingerprint, spec.compatibility.value, "")


def _ready_condition(status: Mapping[str, Any]) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
