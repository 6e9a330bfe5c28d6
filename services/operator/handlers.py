"""The kopf handlers: KafkaTopic and EventSchema resources reconciled through ``reconcile.Reconciler``.

Create, update and resume run one function per kind; a timer re-runs it to detect and revert drift on what the
spec owns; deletion honours ``spec.deletionPolicy`` (a finalizer only on ``Delete``). Every result becomes
Kubernetes-convention status (``observedGeneration``, a ``Ready`` condition) and, when something changed, an
Event. A Kafka error is a ``TemporaryError`` with a doubling delay; a spec Kafka cannot satisfy
(``NotSupported``, ``Incompatible``, ``ResourceConflict``, ``InvalidSpec``) is a ``PermanentError`` until the
spec changes (the timer still looks, so a conflict resolves itself when the older resource goes).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

import kopf
from prometheus_client import Counter, Histogram

from services.declarations.resources import DELETION_DELETE
from services.operator.reconcile import (
    ANNOTATION_PAUSED,
    ANNOTATION_UNMANAGED,
    Claimant,
    Outcome,
    Reason,
    Reconciler,
    is_true,
    winner,
)
from services.operator.settings import OperatorConfig

GROUP = "lambdapipeline.io"
VERSION = "v1alpha1"
TOPICS = "kafkatopics"
SCHEMAS = "eventschemas"
FINALIZER = "lambdapipeline.io/deletion-policy"
REPORTING_COMPONENT = "lambda-pipeline-operator"

# What the operator asks of the Kubernetes API, by resource: the chart's Role grants exactly this, and the tests
# check both that the Role equals it and that every request the running operator made is covered by it.
API_ACCESS: dict[tuple[str, str], tuple[str, ...]] = {
    (GROUP, TOPICS): ("list", "watch", "patch"),  # watch-stream; finalizer and kopf's annotations
    (GROUP, f"{TOPICS}/status"): ("patch",),
    (GROUP, SCHEMAS): ("list", "watch", "patch"),
    (GROUP, f"{SCHEMAS}/status"): ("patch",),
    ("", "events"): ("create",),
    ("kopf.dev", "kopfpeerings"): ("list", "watch", "patch"),  # peering: one active operator at a time
}

RECONCILES = Counter(
    "lp_operator_reconciles_total", "Reconciliations by kind, trigger and Ready reason.", ["kind", "trigger", "reason"]
)
RECONCILE_ERRORS = Counter(
    "lp_operator_reconcile_errors_total",
    "Reconciliations that left a resource not Ready (Kafka errors, conflicts, invalid or incompatible specs).",
    ["kind", "reason"],
)
DRIFT_REVERTED = Counter("lp_operator_drift_reverted_total", "Out-of-band changes the timer reverted.", ["kind"])
RECONCILE_SECONDS = Histogram("lp_operator_reconcile_seconds", "Time of one reconciliation.", ["kind"])

log = logging.getLogger(__name__)


def managed(meta: Mapping[str, Any], **_: Any) -> bool:
    return not is_true(meta.get("annotations") or {}, ANNOTATION_UNMANAGED)


def deletes_topic(meta: Mapping[str, Any], spec: Mapping[str, Any], **_: Any) -> bool:
    """Only these run a deletion handler; Retain needs no broker on deletion, so a missing broker never holds it.
    (kopf's finalizer is on every managed resource anyway: it stops the drift timer before the object goes.)"""
    return managed(meta) and spec.get("deletionPolicy") == DELETION_DELETE


def build_registry(config: OperatorConfig, reconciler: Reconciler) -> kopf.OperatorRegistry:
    """Every handler of the operator, in a registry of its own (imports register nothing)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.scanning.disabled = True  # the namespaces are given: no cluster-wide namespace or CRD watch
        settings.persistence.finalizer = FINALIZER
        settings.posting.reporting_component = REPORTING_COMPONENT
        settings.posting.reporting_instance = config.service_name
        settings.peering.name = config.operator_peering or settings.peering.name
        settings.peering.standalone = not config.operator_peering
        settings.peering.clusterwide = not config.namespaces
        settings.watching.server_timeout = 300  # re-list now and then: a watch that silently stalls heals
        settings.watching.client_timeout = 330
        settings.execution.max_workers = 8  # Kafka calls block: bounded threads, not one per object

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def schema_store_topic(logger: logging.Logger, **_: Any) -> None:
        problem = reconciler.ensure_schema_topic()
        if problem is not None:  # not fatal: every EventSchema reconcile tries again
            logger.warning(f"schema store topic not ready yet: {problem}")

    @kopf.index(GROUP, VERSION, TOPICS, id="topic_claims", registry=registry)
    def topic_claims(meta: Mapping[str, Any], spec: Mapping[str, Any], **_: Any) -> dict[str, Claimant]:
        return {str(spec.get("topicName")): _claimant(meta)}

    @kopf.index(GROUP, VERSION, SCHEMAS, id="subject_claims", registry=registry)
    def subject_claims(meta: Mapping[str, Any], spec: Mapping[str, Any], **_: Any) -> dict[str, Claimant]:
        return {str(spec.get("subject")): _claimant(meta)}

    # --- KafkaTopic -------------------------------------------------------------------------------------

    def topic_outcome(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, topic_claims: kopf.Index) -> Outcome:
        owner = winner(list(topic_claims.get(str(spec.get("topicName")), [])))
        conflict = owner if owner is not None and owner.uid != meta.get("uid") else None
        with RECONCILE_SECONDS.labels("KafkaTopic").time():
            return reconciler.reconcile_topic(body, conflict_with=conflict, paused=_paused(meta))

    @kopf.on.create(GROUP, VERSION, TOPICS, when=managed, registry=registry)
    @kopf.on.update(GROUP, VERSION, TOPICS, when=managed, registry=registry)  # spec, labels or annotations
    @kopf.on.resume(GROUP, VERSION, TOPICS, when=managed, registry=registry)
    def reconcile_topic(
        body: kopf.Body,
        meta: kopf.Meta,
        spec: kopf.Spec,
        status: kopf.Status,
        patch: kopf.Patch,
        retry: int,
        reason: str,
        topic_claims: kopf.Index,
        **_: Any,
    ) -> None:
        if meta.get("deletionTimestamp"):
            return
        outcome = topic_outcome(body, meta, spec, topic_claims)
        _report(body, meta, status, patch, outcome, kind="KafkaTopic", trigger=str(reason))
        _raise_for(outcome, config.retry_delay(retry))

    @kopf.timer(GROUP, VERSION, TOPICS, when=managed, interval=config.operator_drift_interval_s, registry=registry)
    def topic_drift(
        body: kopf.Body,
        meta: kopf.Meta,
        spec: kopf.Spec,
        status: kopf.Status,
        patch: kopf.Patch,
        topic_claims: kopf.Index,
        **_: Any,
    ) -> None:
        if meta.get("deletionTimestamp") or not status.get("conditions"):
            return  # being deleted, or not reconciled once yet (the change handlers go first)
        outcome = topic_outcome(body, meta, spec, topic_claims)
        if outcome.changed and outcome.reason is Reason.UPDATED:
            DRIFT_REVERTED.labels("KafkaTopic").inc()
            outcome.message = f"drift reverted: {outcome.message.removeprefix('updated: ')}"
        _report(body, meta, status, patch, outcome, kind="KafkaTopic", trigger="timer")

    @kopf.on.delete(GROUP, VERSION, TOPICS, when=deletes_topic, registry=registry)
    def delete_topic(
        body: kopf.Body,
        meta: kopf.Meta,
        spec: kopf.Spec,
        retry: int,
        runtime: datetime.timedelta,
        topic_claims: kopf.Index,
        **_: Any,
    ) -> None:
        owner = winner(list(topic_claims.get(str(spec.get("topicName")), [])))
        outcome = reconciler.delete_topic(
            body,
            owner=owner,
            paused=_paused(meta),
            elapsed_s=runtime.total_seconds(),
            give_up_s=config.operator_delete_give_up_s,
        )
        RECONCILES.labels("KafkaTopic", "delete", outcome.reason.value).inc()
        if outcome.retry:
            RECONCILE_ERRORS.labels("KafkaTopic", outcome.reason.value).inc()
        kind = "Normal" if outcome.reason is Reason.UPDATED else "Warning"
        event_reason = "Deleted" if outcome.reason is Reason.UPDATED else outcome.reason.value
        if outcome.retry:
            kopf.event(body, type="Warning", reason=event_reason, message=outcome.message)
            raise kopf.TemporaryError(outcome.message, delay=config.retry_delay(retry))
        kopf.event(body, type=kind, reason=event_reason, message=outcome.message)

    # --- EventSchema ------------------------------------------------------------------------------------

    def schema_outcome(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, subject_claims: kopf.Index) -> Outcome:
        owner = winner(list(subject_claims.get(str(spec.get("subject")), [])))
        conflict = owner if owner is not None and owner.uid != meta.get("uid") else None
        with RECONCILE_SECONDS.labels("EventSchema").time():
            return reconciler.reconcile_schema(body, conflict_with=conflict, paused=_paused(meta))

    @kopf.on.create(GROUP, VERSION, SCHEMAS, when=managed, registry=registry)
    @kopf.on.update(GROUP, VERSION, SCHEMAS, when=managed, registry=registry)  # spec, labels or annotations
    @kopf.on.resume(GROUP, VERSION, SCHEMAS, when=managed, registry=registry)
    def reconcile_schema(
        body: kopf.Body,
        meta: kopf.Meta,
        spec: kopf.Spec,
        status: kopf.Status,
        patch: kopf.Patch,
        retry: int,
        reason: str,
        subject_claims: kopf.Index,
        **_: Any,
    ) -> None:
        if meta.get("deletionTimestamp"):
            return
        outcome = schema_outcome(body, meta, spec, subject_claims)
        _report(body, meta, status, patch, outcome, kind="EventSchema", trigger=str(reason))
        _raise_for(outcome, config.retry_delay(retry))

    # Schema versions are never deleted: data written with them may be read for as long as it is kept.
    return registry


def _claimant(meta: Mapping[str, Any]) -> Claimant:
    return Claimant(
        created=str(meta.get("creationTimestamp") or ""),
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
    )


def _paused(meta: Mapping[str, Any]) -> bool:
    return is_true(meta.get("annotations") or {}, ANNOTATION_PAUSED)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_condition(outcome: Outcome, previous: Mapping[str, Any] | None, generation: Any) -> dict[str, Any]:
    """The ``Ready`` condition; ``lastTransitionTime`` moves only when ``status`` does (Kubernetes convention)."""
    state = {True: "True", False: "False", None: "Unknown"}[outcome.ready]
    transition = _now()
    if previous is not None and previous.get("status") == state and previous.get("lastTransitionTime"):
        transition = previous["lastTransitionTime"]
    condition = {
        "type": "Ready",
        "status": state,
        "reason": outcome.reason.value,
        "message": outcome.message[:4000],
        "lastTransitionTime": transition,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def _report(
    body: kopf.Body,
    meta: kopf.Meta,
    status: Mapping[str, Any],
    patch: kopf.Patch,
    outcome: Outcome,
    *,
    kind: str,
    trigger: str,
) -> None:
    previous = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    generation = meta.get("generation")
    condition = ready_condition(outcome, previous, generation)
    for key, value in outcome.status.items():
        patch.status[key] = value
    patch.status["conditions"] = [condition]
    if generation is not None:
        patch.status["observedGeneration"] = generation
    RECONCILES.labels(kind, trigger, outcome.reason.value).inc()
    if outcome.ready is False:
        RECONCILE_ERRORS.labels(kind, outcome.reason.value).inc()
    news = previous is None or (previous.get("reason"), previous.get("message")) != (
        condition["reason"],
        condition["message"],
    )
    if outcome.changed or news:
        event_type = "Normal" if outcome.ready is not False else "Warning"
        kopf.event(body, type=event_type, reason=outcome.reason.value, message=outcome.message[:1000])


def _raise_for(outcome: Outcome, delay: float) -> None:
    if outcome.retry:
        raise kopf.TemporaryError(outcome.message, delay=delay)
    if outcome.ready is False:
        raise kopf.PermanentError(f"{outcome.reason.value}: {outcome.message}")
