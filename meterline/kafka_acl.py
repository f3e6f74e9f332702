"""Who may do what on a secured broker: one SCRAM principal per role, each allowed only the topics and
consumer groups its code uses. This table is the single source: `kafka start --secure` creates the
users and ACLs from it and prints it; tests/test_kafka_secure.py runs each role's real component with its user.

Topics are catalog names (settings.topic('usage') -> <prefix>.usage.v1). Group and internal-topic names
are templates: `{prefix}` is the topic prefix; a name ending in `*` is a prefix pattern (the SDK's
DecisionFeed, for example, joins a fresh `meterline-guard-<uuid>` group each time it starts).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from .settings import Settings
from .topics import CATALOG

ADMIN = "admin"  # super user: creates topics, users, ACLs and budgets; the broker itself uses it
MECHANISM = "SCRAM-SHA-512"
ALL_TOPICS = tuple(spec.name for spec in CATALOG)


@dataclass(frozen=True)
class Role:
    purpose: str
    read: tuple[str, ...] = ()       # topics it consumes
    write: tuple[str, ...] = ()      # topics it produces to
    describe: tuple[str, ...] = ()   # topics it only needs to see (create_topics() checks the catalog exists)
    groups: tuple[str, ...] = ()     # consumer groups it joins or commits in (READ; DESCRIBE comes with it)
    internal: tuple[str, ...] = ()   # topics of its own that it creates (Faust's leader topic)


_STREAMS = Role("streams worker: prices usage, GPU and CPU/memory samples, keeps spend (its changelog is spend-state)",
                read=("usage", "gpu", "compute", "spend-state"), write=("priced", "spend", "anomalies", "dlq", "spend-state"),
                describe=ALL_TOPICS, groups=("{prefix}-streams", "meterline-streams-restore"))
_SINK = Role("ledger sink: writes every topic it reads into ClickHouse",
             read=("priced", "gpu", "compute", "spend", "anomalies", "control", "budgets", "gpu-allocations", "scale",
                   "dlq"),
             write=("dlq", "anomalies"),
             groups=("{prefix}-sink",))
_ALLOCATOR = Role("allocator: reads spend, GPU samples and budgets, decides throttles; `plan endpoints --publish` "
                  "writes scale recommendations",
                  read=("spend", "gpu", "budgets"), write=("control", "anomalies", "scale"),
                  groups=("{prefix}-allocator", "meterline-allocator-*"))
_ALERTS = Role("alerts job (Faust): anomalies to a webhook, undeliverable ones to the dlq",
               read=("anomalies",), write=("dlq",), groups=("{prefix}-alerts",), internal=("{prefix}-alerts-*",))
_UP_ONLY = Role("the API and web page: live feed, lag metrics, budgets set by an admin token (PUT /api/budgets), "
                "usage from the OTLP endpoint (POST /v1/traces)",
                read=("spend", "control", "anomalies"), write=("budgets", "usage"), groups=("meterline-live-*", "meterline-metrics"))

ROLES: dict[str, Role] = {
    "agent": Role("agents (SDK, OTel bridge): send usage and session announcements (spend), read throttle decisions",
                  read=("control",), write=("usage", "spend"), groups=("meterline-guard-*",)),
    "collector": Role("node collectors: NVML samples, CPU and memory samples and, with --tenant, who holds its GPUs",
                      write=("gpu", "compute", "gpu-allocations")),
    "streams": _STREAMS,
    "sink": _SINK,
    "allocator": _ALLOCATOR,
    "alerts": _ALERTS,
    # An operator's `meterline dlq replay`: writes only the topics whose consumers dedupe a replayed copy by id
    # (sql/dlq.py REPLAYABLE); it reads dead letters from the ledger, not Kafka. Not in `pipeline`: replay is by hand.
    "replay": Role("operators: `meterline dlq replay` re-sends dead letters to the topics that dedupe them by id",
                   write=("usage", "gpu", "compute", "priced", "anomalies")),
}


def _union(purpose: str, *roles: Role) -> Role:
    def merged(attr: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for role in roles for name in getattr(role, attr)))
    return Role(purpose, *(merged(a) for a in ("read", "write", "describe", "groups", "internal")))


# `meterline up` runs every server-side part in one process with one credential: their union, never the agent's.
ROLES["pipeline"] = _union("`meterline up`: streams, sink, allocator, alerts and the web page in one process",
                           _STREAMS, _SINK, _ALLOCATOR, _ALERTS, _UP_ONLY)
USERS = (ADMIN, *ROLES)


def new_passwords(existing: dict[str, str] | None = None) -> dict[str, str]:
    """A random password for every user that has none yet (URL-safe: no quote, comma or bracket to escape)."""
    have = dict(existing or {})
    return {user: have.get(user) or secrets.token_urlsafe(24) for user in USERS}


def _pattern(name: str, settings: Settings) -> tuple[str, bool]:
    name = name.replace("{prefix}", settings.topic_prefix)
    return (name[:-1], True) if name.endswith("*") else (name, False)


def grants(role: str, settings: Settings) -> list[tuple[str, str, bool, str]]:
    """(resource type, name, is a prefix, operation) for one role under these settings."""
    r = ROLES[role]
    out: list[tuple[str, str, bool, str]] = []
    out += [("topic", settings.topic(t), False, "READ") for t in r.read]
    out += [("topic", settings.topic(t), False, "WRITE") for t in r.write]
    seen = set(r.read) | set(r.write)
    out += [("topic", settings.topic(t), False, "DESCRIBE") for t in r.describe if t not in seen]
    out += [("group", *_pattern(g, settings), "READ") for g in r.groups]
    out += [("topic", *_pattern(t, settings), op) for t in r.internal for op in ("CREATE", "READ", "WRITE", "DESCRIBE")]
    return out


def bindings(role: str, settings: Settings) -> list:
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    return [AclBinding(ResourceType[kind.upper()], name,
                       ResourcePatternType.PREFIXED if prefixed else ResourcePatternType.LITERAL,
                       f"User:{role}", "*", AclOperation[op], AclPermissionType.ALLOW)
            for kind, name, prefixed, op in grants(role, settings)]


def apply(admin_config: dict, settings: Settings, passwords: dict[str, str], timeout: float = 30.0) -> None:
    """As the admin: set every role's SCRAM password and create its ACLs. Idempotent (Kafka keeps one copy
    of an ACL created twice; a password set again is the same password)."""
    from confluent_kafka.admin import (AdminClient, ScramCredentialInfo, ScramMechanism,
                                       UserScramCredentialUpsertion)

    admin = AdminClient(admin_config)
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096)
    upserts = [UserScramCredentialUpsertion(user, info, passwords[user].encode()) for user in ROLES]
    for future in admin.alter_user_scram_credentials(upserts, request_timeout=timeout).values():
        future.result(timeout)
    acls = [b for role in ROLES for b in bindings(role, settings)]
    for future in admin.create_acls(acls, request_timeout=timeout).values():
        future.result(timeout)


def table(settings: Settings) -> list[dict]:
    """One row per principal: what it is for, the catalog topics it reads and writes, its groups (and
    own topics), and its ACLs as created (`OPERATION resource name`, `*` marking a prefix)."""
    def names(items: tuple[str, ...]) -> str:
        return ", ".join(name.replace("{prefix}", settings.topic_prefix) for name in items) or "-"

    rows: list[dict] = [{"user": ADMIN, "for": "super user: `topics create`, `budget set`, users and ACLs",
                         "reads": "all", "writes": "all", "groups": "all", "acls": ["super user"]}]
    for user, r in ROLES.items():
        rows.append({"user": user, "for": r.purpose, "reads": names(r.read), "writes": names(r.write),
                     "groups": names(r.groups + r.internal),
                     "acls": [f"{op} {kind} {name}{'*' if prefixed else ''}" for kind, name, prefixed, op in grants(user, settings)]})
    return rows


def client_env(user: str, password: str | None) -> dict[str, str]:
    """The METERLINE_KAFKA_* variables that make any meterline client use this principal."""
    env = {"METERLINE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "METERLINE_KAFKA_SASL_MECHANISM": MECHANISM,
           "METERLINE_KAFKA_SASL_USERNAME": user}
    if password is not None:
        env["METERLINE_KAFKA_SASL_PASSWORD"] = password
    return env
