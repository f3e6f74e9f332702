"""The event contracts: one pydantic model per Kafka record type.

Money is `Decimal` (serialised as a JSON string, never a float). Every model forbids
unknown fields, bounds every string and map, and rejects timestamps far in the
future, so a bad producer is caught at the edge with an error naming the field.
"""
from __future__ import annotations

import base64
import hashlib
import re
import types
import typing
import unicodedata
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import pydantic
import uuid_utils
from pydantic import (
    AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, StrictBool, StrictInt,
    WithJsonSchema, model_validator,
)
from pydantic_core import PydanticCustomError

MAX_FUTURE_SKEW = timedelta(minutes=5)
MAX_ID_LEN = 128
MAX_NAME_LEN = 256
MAX_TEXT_LEN = 2048
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_VALUE_LEN = 1024
MAX_TOKENS = 10**12  # far above any real call; stops overflow in Int64/UInt64 columns

Kind = Literal["llm_call", "tool_call", "api_call"]
Status = Literal["ok", "error", "timeout", "rate_limited", "cancelled"]
# The tiers genai-prices prices (OpenAI and Gemini: flex, priority); "" = not reported, "default" = standard.
ServiceTier = Literal["", "default", "flex", "priority"]
SERVICE_TIERS: tuple[str, ...] = ("", "default", "flex", "priority")
Priority = Literal["critical", "high", "normal", "low", "batch"]
PRIORITIES: tuple[Priority, ...] = ("critical", "high", "normal", "low", "batch")
Scope = Literal["tenant", "team", "project", "agent", "session"]
SCOPES: tuple[Scope, ...] = ("tenant", "team", "project", "agent", "session")
Action = Literal["allow", "throttle", "queue", "downgrade", "deny", "preempt"]
Severity = Literal["info", "warning", "critical"]


class InvalidEvent(ValueError):
    """A record broke its contract. `errors` lists (field, message) pairs."""

    def __init__(self, model: str, errors: list[tuple[str, str]]):
        self.model = model
        self.errors = errors
        detail = "; ".join(f"{field}: {msg}" for field, msg in errors)
        super().__init__(f"invalid {model}: {detail}")

    @property
    def reason(self) -> str:
        """Short, stable text for a dead-letter record."""
        return str(self)


# What no id or name may contain: control characters (Cc: C0, DEL, C1), format characters (Cf: bidi
# overrides such as U+202E, zero-width U+200B, BOM U+FEFF) and line/paragraph separators (Zl, Zp). They are
# invisible or reorder text, so two ids that print alike would differ and a name could pose as another.
HIDDEN_CATEGORIES = {"Cc": "control character", "Cf": "format character", "Zl": "line separator",
                     "Zp": "paragraph separator"}


def hidden_ranges(planes: range | tuple[int, ...] = (0, 1, 14)) -> tuple[tuple[int, int], ...]:
    """(first, last) code point ranges of HIDDEN_CATEGORIES in this Python's Unicode database. Only planes
    0, 1 and 14 hold any (2-13 are ideographs or unassigned, 15-16 private use); scanning just those keeps
    the import ~20 ms instead of ~150, and tests/test_schemas.py checks all 17 planes give the same."""
    ranges: list[list[int]] = []
    for cp in (cp for plane in planes for cp in range(plane << 16, (plane + 1) << 16)):
        if unicodedata.category(chr(cp)) in HIDDEN_CATEGORIES:
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    return tuple((lo, hi) for lo, hi in ranges)


# The one character set: pydantic below, the stream's fast path (streams/codec.py) and the ledger's SQL
# checks (sql/checks.py, as an re2 class) all use these ranges, so the three agree by construction.
HIDDEN_RANGES = hidden_ranges()
HIDDEN_RE = re.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in HIDDEN_RANGES) + "]")


def _no_hidden_chars(value: str) -> str:
    if (found := HIDDEN_RE.search(value)) is not None:
        char = found.group()
        raise ValueError(f"must not contain U+{ord(char):04X} ({HIDDEN_CATEGORIES[unicodedata.category(char)]})")
    return value


_RFC3339_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]")


def _rfc3339_text(value: Any) -> Any:
    """Before pydantic's parsing, which also reads a number or a digit string as Unix seconds: a time on the
    wire is an RFC 3339 string (Python callers may pass a datetime)."""
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC3339_DATE.match(value)):
        return value
    raise PydanticCustomError("datetime_rfc3339", "must be an RFC 3339 string with a zone, such as '2026-01-01T00:00:00Z'")


LEDGER_YEARS = (1900, 2299)  # what the ledger's DateTime64(3, 'UTC') holds: a valid time always fits it


def _in_utc_range(ts: datetime) -> datetime:
    """0001-01-01T00:30:00+01:00 parses, but as UTC it is before year 1 (astimezone would raise OverflowError
    in the stream and the sink), and a time the ledger cannot store would be dead-lettered as a bug there."""
    try:
        year = ts.astimezone(timezone.utc).year
    except OverflowError:
        year = 0
    if not LEDGER_YEARS[0] <= year <= LEDGER_YEARS[1]:
        raise ValueError(f"is out of range: times are {LEDGER_YEARS[0]}-01-01 to {LEDGER_YEARS[1]}-12-31 in UTC")
    return ts


def _not_in_future(ts: datetime) -> datetime:
    if ts - datetime.now(timezone.utc) > MAX_FUTURE_SKEW:
        raise ValueError(f"is more than {int(MAX_FUTURE_SKEW.total_seconds())} s in the future (check the producer's clock)")
    return ts.astimezone(timezone.utc)


MONEY_PLACES = 12  # pico-dollars
MONEY_DIGITS = 28  # so at most 16 whole digits


def _exact_decimal(value: Any) -> Any:
    """Before pydantic's Decimal checks. A float (a JSON number with a fraction or an exponent) is refused:
    it arrives as binary floating point, its exact value already lost ("1e-400" reads as 0.0, 0.1 is not
    0.1). Anything else must be exact within 12 places, refused the same way whatever its magnitude
    (pydantic calls 1e-400 "too many digits" but 1e-13 "too many places"); zeros beyond the 12th place
    are dropped, so "0e-999999999" cannot serialise to a gigabyte of zeros."""
    if isinstance(value, float):
        raise PydanticCustomError("decimal_float", "must be a string such as \"0.25\" (or an integer): a number with a "
                                  "fraction or an exponent is read as a binary float, which cannot hold an exact amount")
    number = value
    if isinstance(value, str):
        try:
            number = Decimal(value)
        except ArithmeticError:
            return value  # not a number: pydantic says so
    if not isinstance(number, Decimal) or not number.is_finite():
        return value
    sign, digits, exponent = number.as_tuple()
    cut = -MONEY_PLACES - int(exponent)  # digits beyond the 12th place
    if cut <= 0:
        return value
    if any(digits[-cut:]):  # integer arithmetic: exact at any size, no decimal context rounding
        raise PydanticCustomError("decimal_max_places", "Decimal input should have no more than {decimal_places} decimal places",
                                  {"decimal_places": MONEY_PLACES})
    return Decimal((sign, digits[:-cut] or (0,), -MONEY_PLACES))


def _exact(**bound: int) -> Any:
    """A Decimal with at most 12 places and 16 whole digits, read exactly and written as a plain string."""
    limits = {{"ge": "minimum", "gt": "exclusiveMinimum"}[k]: v for k, v in bound.items()}
    return Annotated[Decimal, Field(max_digits=MONEY_DIGITS, decimal_places=MONEY_PLACES, allow_inf_nan=False, **bound),
                     BeforeValidator(_exact_decimal), PlainDecimal,
                     WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer", **limits}]})]


Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN), AfterValidator(_no_hidden_chars)]
OptionalId = Annotated[str, Field(max_length=MAX_ID_LEN), AfterValidator(_no_hidden_chars)]
# A scope id is the '/'-joined path from the tenant (schemas/scopes.py): up to five ids.
ScopeId = Annotated[str, Field(min_length=1, max_length=5 * (MAX_ID_LEN + 1)), AfterValidator(_no_hidden_chars)]
Name = Annotated[str, Field(max_length=MAX_NAME_LEN), AfterValidator(_no_hidden_chars)]
Text = Annotated[str, Field(max_length=MAX_TEXT_LEN)]
Time = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text), AfterValidator(_in_utc_range)]
Timestamp = Annotated[Time, AfterValidator(_not_in_future)]
Tokens = Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS)]
MAX_COUNT = 2**63 - 1  # what the ledger's integer columns hold
Count = Annotated[StrictInt, Field(ge=0, le=MAX_COUNT)]
# Decimals go to JSON as plain strings ("0.000000123457", never "1.23457E-7" or a float).
PlainDecimal = PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json")
Usd = _exact(ge=0)
SignedUsd = _exact()
PositiveDecimal = _exact(gt=0)
Attributes = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)], Annotated[str, Field(max_length=MAX_ATTRIBUTE_VALUE_LEN)]],
    Field(max_length=MAX_ATTRIBUTES),
]


def new_id() -> str:
    """A UUIDv7: time-ordered, made once per event so retries keep their identity."""
    return str(uuid_utils.uuid7())


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_timedelta="float")

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()


class Attribution(Contract):
    """Who spent it: the chargeback hierarchy, tenant > team > project > agent > session."""

    tenant_id: Id
    team: OptionalId = ""
    project: OptionalId = ""
    agent_id: OptionalId = ""
    session_id: OptionalId = ""


class UsageEvent(Attribution):
    """One LLM call, tool call or paid API call, as the agent saw it.

    `input_tokens` counts every input token, cache reads and writes included
    (OpenTelemetry's meaning); the cache counts are subsets of it. Likewise `output_tokens`
    counts every output token, `reasoning_tokens` (thinking) included: providers bill them as
    output, reports show them apart.

    The rest of the price sheet (docs: ARCHITECTURE.md, "The whole price sheet"):
    - `cache_write_1h_tokens` are the cache writes at the 1-hour TTL, a subset of
      `cache_write_tokens` (all TTLs); the rest are written at the default 5-minute TTL.
    - `input_audio_tokens` / `input_image_tokens` are the uncached audio / image input tokens,
      subsets of `input_tokens` disjoint from the cache counts (cached tokens of any modality are in
      `cache_read_tokens`), so cache_read + cache_write + input audio + input image <= input.
    - `output_audio_tokens` / `output_image_tokens` are subsets of `output_tokens`, disjoint from
      `reasoning_tokens` (text): reasoning + output audio + output image <= output.
    - `web_searches` counts the provider's server-side web searches of an LLM call (priced per 1000).
    - `service_tier` is what the provider says served the call ("" = not reported, priced as default);
      `batch` marks a call made through a batch API. Both select genai-prices' price variants.
    `usage="missing"` marks a call that completed but whose
    instrumentation reported no usage (a stream without include_usage): its zero tokens are
    unknown, not free, and the stream raises `unmetered_calls` for it.
    """

    event_id: UUID
    ts: Timestamp
    kind: Kind
    provider: Name = ""
    model: Name = ""
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    cache_read_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0
    cache_write_1h_tokens: Tokens = 0
    input_audio_tokens: Tokens = 0
    input_image_tokens: Tokens = 0
    output_audio_tokens: Tokens = 0
    output_image_tokens: Tokens = 0
    web_searches: Tokens = 0
    service_tier: ServiceTier = ""
    batch: StrictBool = False
    usage: Literal["reported", "missing"] = "reported"
    tool: Name = ""
    units: Tokens = Field(1, description="Billable units of a tool/API call (pages, searches, ...).")
    latency_ms: Count = 0
    status: Status = "ok"
    response_bytes: Count = 0
    priority: Priority = "normal"
    cost_usd: Usd | None = Field(None, description="Provider-reported cost; overrides the catalog.")
    attributes: Attributes = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_shape(self) -> UsageEvent:
        if self.cache_read_tokens + self.cache_write_tokens > self.input_tokens:
            raise ValueError("cache_read_tokens + cache_write_tokens must not exceed input_tokens (input counts all input tokens)")
        if self.reasoning_tokens > self.output_tokens:
            raise ValueError("reasoning_tokens must not exceed output_tokens (output counts reasoning tokens too)")
        if self.cache_write_1h_tokens > self.cache_write_tokens:
            raise ValueError("cache_write_1h_tokens must not exceed cache_write_tokens (which counts writes of every TTL)")
        if (self.cache_read_tokens + self.cache_write_tokens + self.input_audio_tokens + self.input_image_tokens
                > self.input_tokens):
            raise ValueError("cache_read_tokens + cache_write_tokens + input_audio_tokens + input_image_tokens must not "
                             "exceed input_tokens (audio and image count uncached input)")
        if self.reasoning_tokens + self.output_audio_tokens + self.output_image_tokens > self.output_tokens:
            raise ValueError("reasoning_tokens + output_audio_tokens + output_image_tokens must not exceed output_tokens")
        if self.kind == "llm_call" and not self.model:
            raise ValueError("model is required for kind=llm_call")
        if self.kind != "llm_call" and not self.tool:
            raise ValueError(f"tool is required for kind={self.kind}")
        return self


class SampleOwner(Contract):
    """Who a GPU process row or a CPU/memory sample belongs to, found by the collectors' one set of rules
    (collectors/attribution.py): an unknown owner gives attributed=False and empty attribution, never a dropped row.

    A sample names it as the first of its bases (`class GpuSample(SampleOwner, _GpuReading)`): pydantic puts a
    model's fields in reverse base order, so these follow the reading's fields and the JSON keeps its field order."""

    tenant_id: OptionalId = ""
    team: OptionalId = ""
    project: OptionalId = ""
    agent_id: OptionalId = ""
    session_id: OptionalId = ""
    attributed: StrictBool = False
    simulated: StrictBool = False


class _GpuReading(Contract):
    sample_id: UUID
    ts: Timestamp
    node: Id
    level: Literal["gpu", "mig", "process"]
    gpu_index: Count
    gpu_uuid: Id
    gpu_name: Name = ""
    mig_uuid: OptionalId = ""
    mig_profile: Name = ""
    mig_slices: Count = 0
    mig_total_slices: Count = 0
    interval_ms: Annotated[StrictInt, Field(gt=0, le=3_600_000)]
    utilization_pct: Annotated[StrictInt, Field(ge=0, le=100)] | None = None
    memory_used_bytes: Count | None = None
    memory_total_bytes: Count | None = None
    power_mw: Count | None = None
    energy_mj_delta: Count | None = None
    temperature_c: Annotated[StrictInt, Field(ge=-100, le=200)] | None = None
    pid: Count | None = None
    process_memory_bytes: Count | None = None
    sm_util_pct: Annotated[StrictInt, Field(ge=0, le=100)] | None = None
    device_processes: Annotated[StrictInt, Field(ge=1, le=100_000)] = Field(
        1, description="Processes on this GPU or MIG slice in this sample: a process row is charged 1/n of its time.")



class GpuSample(SampleOwner, _GpuReading):
    """One NVML reading: a whole GPU, a MIG instance, or one process on either.

    GPU-seconds of a row = interval_ms / 1000 × (mig_slices / mig_total_slices for MIG), and a
    process row's share of them is 1 / device_processes (the collector sees every process on a
    device, so the row carries the split and can be keyed by its tenant, not by its node).
    A process row whose owner is unknown has attributed=False and empty attribution. A row from the DCGM
    exporter (`collect dcgm`) stands for a Kubernetes pod: namespace/pod/container set, pid None.
    """

    # Kubernetes (`collect dcgm`): the pod a process row stands for (the DCGM exporter reports pods, not pids)
    namespace: OptionalId = ""
    pod: Name = ""
    container: OptionalId = ""

    @property
    def key(self) -> str:
        """Kafka key: a process row by the tenant it charges (co-partitioned with usage, so one stream
        worker holds a tenant's token and GPU spend), a GPU or MIG row by its node."""
        return (self.tenant_id or "unattributed") if self.level == "process" else self.node


class _ComputeReading(Contract):
    sample_id: UUID
    ts: Timestamp
    node: Id
    node_class: Id = Field("default", description="The catalog's [compute] class that prices this node.")
    level: Literal["process", "cgroup"]
    pid: Count | None = None
    cgroup: Text = ""
    container_id: OptionalId = ""
    runtime: Literal["", "containerd", "cri-o", "docker", "podman"] = ""
    pod_uid: OptionalId = ""
    namespace: OptionalId = ""
    pod: Name = ""
    interval_ms: Annotated[StrictInt, Field(gt=0, le=3_600_000)]
    cpu_user_seconds: Usd = Decimal(0)  # not money, but exact to 12 places the same way
    cpu_system_seconds: Usd = Decimal(0)
    memory_bytes: Count = 0
    memory_peak_bytes: Count = 0
    memory_byte_seconds: Usd = Decimal(0)
    cpu_limit_cores: Usd | None = Field(None, description="The group's CPU quota in cores (cgroup v2 cpu.max quota / period: "
                                        "what a container reserved); None without a limit or per process.")


# the two samples share only who owns the row (SampleOwner); the docstring is the JSON schema's description
class ComputeSample(SampleOwner, _ComputeReading):
    """CPU and memory of one process or one cgroup v2 group over one interval (`meterline collect node`).

    A contract of its own rather than a `kind` on GpuSample: its quantities (CPU-seconds, byte-seconds) and
    its price (per vCPU-hour and GiB-hour of a node class) share nothing with a GPU row's device, MIG and
    power fields, and GpuSample's required gpu_index/gpu_uuid would be meaningless here.

    cpu_seconds = user + system CPU time used in the interval (exact: clock ticks or microseconds);
    memory_byte_seconds = resident bytes at the sample × interval seconds; memory_peak_bytes is the
    kernel's high-water mark (VmHWM, or memory.peak of the group). The owner is found as for a GPU process
    (collectors/attribution.py); an unknown owner gives attributed=False and empty attribution, never a
    dropped row. A container's cgroup names it (container_id, runtime) and, on Kubernetes, its pod_uid;
    namespace/pod where the pod could be resolved.
    """

    @property
    def cpu_seconds(self) -> Decimal:
        return self.cpu_user_seconds + self.cpu_system_seconds

    @property
    def key(self) -> str:
        """Kafka key: the tenant it charges (co-partitioned with usage and GPU process rows)."""
        return self.tenant_id or "unattributed"


class SpendUpdate(Contract):
    """Real-time spend of one scope: the last window and the period-to-date total."""

    update_id: UUID
    ts: Timestamp
    tenant_id: Id
    scope: Scope
    scope_id: ScopeId
    window_start: Time
    window_end: Time
    window_cost_usd: Usd
    period_start: Time
    period_cost_usd: Usd
    events: Count = 0
    input_tokens: Count = 0
    output_tokens: Count = 0
    gpu_seconds: Usd = Decimal(0)  # not money, but exact to 12 places the same way
    gpu_cost_usd: Usd = Decimal(0)
    unpriced_events: Count = 0
    cpu_seconds: Usd = Decimal(0)  # CPU time of `collect node` samples (vCPU-hour budgets), exact like gpu_seconds


class Anomaly(Contract):
    anomaly_id: UUID
    ts: Timestamp
    kind: Literal["runaway_session", "repeated_calls", "spend_spike", "unpriced_model", "idle_gpu", "budget_threshold",
                  "conflicting_duplicate", "unmetered_calls", "idle_cpu"]
    severity: Severity
    tenant_id: Id
    scope: Scope | Literal["gpu", "model"]
    scope_id: ScopeId
    window_start: Time
    window_end: Time
    evidence: dict[str, str] = Field(default_factory=dict, max_length=MAX_ATTRIBUTES, description="Numbers as exact strings.")
    message: Text = ""


class DecisionLimits(Contract):
    tokens_per_min: Count | None = None
    requests_per_min: Count | None = None
    max_concurrent: Count | None = None


class ThrottleDecision(Contract):
    """What the allocator tells agents in a scope to do, until `expires_at`.

    `priority` is None when the decision holds for every priority class.
    """

    decision_id: UUID
    tenant_id: Id
    scope: Scope
    scope_id: ScopeId
    priority: Priority | None = None
    action: Action
    limits: DecisionLimits = Field(default_factory=DecisionLimits)
    max_model: Name | None = None
    downgraded_from: Name | None = Field(None, description="action=downgrade: the model max_model stands in for "
                                         "(what `report slo` prices the downgraded calls at).")
    reason: Text
    policy_id: OptionalId = ""
    budget_remaining_usd: SignedUsd | None = None
    forecast_exhaustion_ts: Time | None = None
    reset_at: Time | None = None
    issued_at: Time
    expires_at: Time
    # Spend lease (hard budgets): the scope may spend up to `spend_limit_usd` in its lease
    # period (until reset_at), counted by the guard locally from the costs it records, so a
    # late decision cannot let concurrent calls overshoot. `spent_usd` is what the allocator
    # had counted when it issued the lease. On an ancestor scope, `session_lease_usd` is what
    # a session without a lease of its own may spend before it gets one.
    spend_limit_usd: Usd | None = None
    spent_usd: Usd | None = None
    session_lease_usd: Usd | None = None

    @property
    def key(self) -> str:
        """Compaction key on the control topic: the latest decision per scope and class wins."""
        return decision_key(self.scope, self.scope_id, self.priority)

    @model_validator(mode="after")
    def _check_times(self) -> ThrottleDecision:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        if self.action == "downgrade" and not self.max_model:
            raise ValueError("max_model is required for action=downgrade")
        return self


def decision_key(scope: str, scope_id: str, priority: str | None) -> str:
    return f"{scope}:{scope_id}:{priority or '*'}"


class Slo(Contract):
    """Service-level objectives of a budget's scope (issue 15 item 4). Each objective is optional, at least one
    is set. A `downgrade` for the scope picks only a cheaper model whose measured success rate and p95 latency
    for that scope (over at least `min_calls` calls) meet them, else throttles (allocator/slo.py);
    `meterline report slo` measures attainment and cost per successful action against them."""

    p95_latency_ms: Annotated[StrictInt, Field(gt=0, le=86_400_000)] | None = Field(
        None, description="95th percentile latency of the scope's LLM calls, at most this many ms.")
    success_rate_pct: Annotated[Decimal, Field(gt=0, le=100, max_digits=9, decimal_places=6, allow_inf_nan=False),
                                BeforeValidator(_exact_decimal), PlainDecimal,
                                WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer", "exclusiveMinimum": 0,
                                                                               "maximum": 100}]})] | None = Field(
        None, description="Share of calls with status ok, at least this many percent (exact decimal, e.g. \"99.5\").")
    cost_per_success_usd: PositiveDecimal | None = Field(
        None, description="Target cost per successful action (all the scope spent / its ok calls), USD.")
    min_calls: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = Field(
        20, description="Calls of a model the scope must have made before its measured figures count.")

    @model_validator(mode="after")
    def _check_some(self) -> Slo:
        if self.p95_latency_ms is None and self.success_rate_pct is None and self.cost_per_success_usd is None:
            raise ValueError("an SLO needs at least one of p95_latency_ms, success_rate_pct, cost_per_success_usd")
        return self


class BudgetPolicy(Contract):
    """A budget on one scope. Scope ids of child scopes are qualified by their tenant.

    `actions` maps a priority class to what happens when the budget is exceeded.
    """

    policy_id: Id
    tenant_id: Id
    scope: Scope
    scope_id: ScopeId
    unit: Literal["usd", "gpu_hours", "vcpu_hours"] = "usd"
    amount: PositiveDecimal
    period: Literal["day", "week", "month", "custom"] = "month"
    period_anchor: Time | None = Field(None, description="Start of a period; periods repeat from it.")
    period_seconds: Annotated[StrictInt, Field(gt=0)] | None = Field(None, description="Length of a custom period.")
    timezone: Annotated[str, Field(max_length=64)] = "UTC"
    hard: StrictBool = True
    alert_thresholds_pct: list[Annotated[StrictInt, Field(gt=0, le=1000)]] = Field(default_factory=lambda: [50, 80, 100], max_length=16)
    actions: dict[Priority, Action] = Field(
        default_factory=lambda: {"critical": "allow", "high": "throttle", "normal": "throttle", "low": "deny", "batch": "deny"}
    )
    # The SLO rides on the budget rather than on a compacted record of its own: the engine already reads every
    # policy per scope, the downgrade it constrains is the policy's own exceed action, and the ledger keeps its
    # versions (and who changed them) with the budget's for free. A scope with an SLO but no spending limit is not
    # a case meterline has: the SLO constrains how a budget is enforced.
    slo: Slo | None = None
    created_at: Time = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _check_period(self) -> BudgetPolicy:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r} is not an IANA zone such as 'UTC' or 'Europe/Berlin'") from None
        if self.period == "custom" and (self.period_seconds is None or self.period_anchor is None):
            raise ValueError("period=custom needs period_seconds and period_anchor")
        return self


class GpuAllocation(Contract):
    """Who holds a GPU, or one MIG slice of it, from valid_from until valid_until (None: until further
    notice). Under the `owner` idle policy the holder is charged the device's idle time (app/gpu_idle.py);
    where records overlap, the newest (created_at) wins, so a new assignment never rewrites an old one."""

    allocation_id: Id
    node: Id
    gpu_uuid: Id
    mig_uuid: OptionalId = Field("", description="'' = the whole device")
    tenant_id: Id
    team: OptionalId = ""
    project: OptionalId = ""
    valid_from: Time
    valid_until: Time | None = None
    created_at: Time = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _check_range(self) -> GpuAllocation:
        if self.valid_until is not None and self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be after valid_from")
        return self


class ScaleRecommendation(Contract):
    """Replicas an inference endpoint (a self-hosted model) should run, from its request rate, latency and GPU
    utilisation against its SLO (allocator/endpoints.py states the formula). Latest per endpoint on the compacted
    `scale` topic; `/metrics` serves it as meterline_endpoint_recommended_replicas for an autoscaler."""

    recommendation_id: UUID
    ts: Timestamp
    endpoint: Id  # "<provider>/<model>": the compaction key
    provider: Name
    model: Name
    window_start: Time
    window_end: Time
    requests: Count
    rate_rps: Usd = Field(description="Requests per second over the window (exact, not money).")
    service_ms: Count = Field(description="Mean latency of successful calls: the service time of one request.")
    p95_latency_ms: Count
    slo_ms: Annotated[StrictInt, Field(gt=0, le=MAX_COUNT)]
    target_utilization_pct: Annotated[StrictInt, Field(gt=0, le=100)]
    concurrency: Annotated[StrictInt, Field(gt=0, le=1_000_000)] = 1
    gpu_utilization_pct: Annotated[StrictInt, Field(ge=0, le=100)] | None = None
    observed_replicas: Count | None = Field(None, description="GPUs seen serving the endpoint's sessions.")
    min_replicas: Count = 1
    max_replicas: Count
    recommended_replicas: Count
    predicted_p95_ms: Count | None = Field(None, description="M/M/c p95 response at the recommendation; None: unreachable.")
    reason: Text = ""

    @model_validator(mode="after")
    def _check_bounds(self) -> ScaleRecommendation:
        if self.window_end <= self.window_start:
            raise ValueError("window_end must be after window_start")
        if not self.min_replicas <= self.recommended_replicas <= self.max_replicas:
            raise ValueError("recommended_replicas must be within min_replicas..max_replicas")
        return self

    def key(self) -> str:
        return self.endpoint


class DeadLetter(Contract):
    """A record that could not be processed, with the reason and its original bytes."""

    dlq_id: UUID
    ts: Time
    stage: Name
    source_topic: Name
    partition: Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]  # the ledger's Int32
    offset: Annotated[StrictInt, Field(ge=-(2**63), le=MAX_COUNT)]  # Int64
    reason: Text
    error_type: Name
    payload_b64: str = Field(max_length=16 * 1024 * 1024)


# A dead letter must fit the dlq topic's max.message.bytes (Kafka's default is ~1 MB): base64 grows
# the payload by 4/3, so beyond this many original bytes only the head is kept, with length and digest.
MAX_DEAD_PAYLOAD_BYTES = 256 * 1024


def dead_letter_payload(raw: bytes | None, reason: str) -> tuple[str, str]:
    """(payload_b64, reason) for a dead letter: the whole record, or, when it is larger than
    MAX_DEAD_PAYLOAD_BYTES, its head, with the reason saying so (original length and SHA-256)."""
    raw = raw or b""
    if len(raw) > MAX_DEAD_PAYLOAD_BYTES:
        note = (f" [payload truncated: first {MAX_DEAD_PAYLOAD_BYTES} of {len(raw)} bytes kept, "
                f"sha256 {hashlib.sha256(raw).hexdigest()}]")
        reason = reason[: MAX_TEXT_LEN - len(note)] + note
        raw = raw[:MAX_DEAD_PAYLOAD_BYTES]
    return base64.b64encode(raw).decode(), reason[:MAX_TEXT_LEN]


M = TypeVar("M", bound=BaseModel)

CONTRACTS: dict[str, type[Contract]] = {
    "usage_event": UsageEvent,
    "gpu_sample": GpuSample,
    "compute_sample": ComputeSample,
    "spend_update": SpendUpdate,
    "anomaly": Anomaly,
    "throttle_decision": ThrottleDecision,
    "budget_policy": BudgetPolicy,
    "gpu_allocation": GpuAllocation,
    "scale_recommendation": ScaleRecommendation,
    "dead_letter": DeadLetter,
}


def _as_invalid(model: type[BaseModel], err: pydantic.ValidationError) -> InvalidEvent:
    errors = [(".".join(str(p) for p in e["loc"]) or "(record)", e["msg"]) for e in err.errors(include_url=False)]
    return InvalidEvent(model.__name__, errors)


def decode(contract: type[M], raw: bytes | str, /) -> M:
    """Parse one JSON record; any problem raises InvalidEvent naming the field."""
    try:
        return contract.model_validate_json(raw)
    except pydantic.ValidationError as err:
        raise _as_invalid(contract, err) from None
    except (ValueError, TypeError, ArithmeticError, RecursionError) as err:  # oversized numbers, deep nesting, overflow
        raise InvalidEvent(contract.__name__, [("(record)", str(err)[:200])]) from None


def build(contract: type[M], /, **fields: Any) -> M:
    """Construct a record from Python values; raises InvalidEvent on bad values."""
    try:
        return contract(**fields)
    except pydantic.ValidationError as err:
        raise _as_invalid(contract, err) from None


class PricedEvent(UsageEvent):
    """A usage event with its exact price. `cost_usd` is the amount charged.

    The *_cost_usd components are disjoint (input = uncached text input + any per-request fee, output =
    text output with reasoning) and add up exactly to list_cost_usd, which is cost_usd unless the
    provider reported the cost.

    cost_source says where the price came from; `unpriced` rows are kept with cost 0
    and raised as anomalies, never silently treated as free.
    """

    list_cost_usd: Usd = Decimal(0)
    input_cost_usd: Usd = Decimal(0)
    output_cost_usd: Usd = Decimal(0)
    cache_read_cost_usd: Usd = Decimal(0)
    cache_write_cost_usd: Usd = Decimal(0)  # 5-minute (default TTL) writes
    cache_write_1h_cost_usd: Usd = Decimal(0)
    input_audio_cost_usd: Usd = Decimal(0)
    input_image_cost_usd: Usd = Decimal(0)
    output_audio_cost_usd: Usd = Decimal(0)
    output_image_cost_usd: Usd = Decimal(0)
    web_search_cost_usd: Usd = Decimal(0)
    cost_source: Literal["provider", "catalog", "unpriced"]
    catalog_version: Name
    priced_at: Time


CONTRACTS["priced_event"] = PricedEvent


# ---------------------------------------------------------------- priced.v2: the binary wire format of `priced`
#
# A priced record is either v1, the PricedEvent's JSON (starts with "{"), or v2: the byte PRICED_V2_MAGIC
# followed by one ClickHouse RowBinary row of the fields below, in this order (fixed-width first, then the
# strings, then the map), so the sink hands it to ClickHouse with no parse. The first byte tells them apart
# (0xB2 cannot start JSON text nor any UTF-8 character); producers may also set the Kafka header
# `meterline-schema: priced.v2` (or `priced.v1`), which decoders check against the byte when present.
# RowBinary types: UUID = two little-endian UInt64 halves (high, low); times = Int64 microseconds since
# 1970-01-01 UTC (DateTime64(6, 'UTC')); money = Int128 little-endian pico-dollars (Decimal128(12), exact);
# counts = UInt64; bool = UInt8 0/1; strings = LEB128 byte length + UTF-8; map = LEB128 count + key/value
# strings. cost_usd is never null in v2 (the worker always sets the charge); a record with none is written v1.
# The same checks as v1 apply to the decoded values: the format carries types, not trust.

PRICED_V2_MAGIC = 0xB2
PRICED_SCHEMA_HEADER = "meterline-schema"
PRICED_SCHEMAS = {1: "priced.v1", 2: "priced.v2"}
V2_KINDS = {"uuid": "UUID", "time": "DateTime64(6, 'UTC')", "count": "UInt64", "bool": "UInt8", "money": "Decimal(38, 12)",
            "str": "String", "map": "Map(String, String)"}


def _v2_kind(name: str) -> str:
    info = PricedEvent.model_fields[name]
    args = [a for a in typing.get_args(info.annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(info.annotation) in (typing.Union, types.UnionType) else info.annotation
    while typing.get_origin(base) is Annotated:
        base = typing.get_args(base)[0]
    if typing.get_origin(base) is dict:
        return "map"
    kinds = {UUID: "uuid", AwareDatetime: "time", datetime: "time", Decimal: "money", bool: "bool", int: "count"}
    return kinds.get(base, "str")  # str and Literal


def priced_v2_layout() -> tuple[tuple[str, str], ...]:
    """(field, kind) of a priced.v2 row, in wire order: fixed-width kinds first, then strings, then the map;
    within a kind, the contract's field order. Generated from PricedEvent, so a new field joins the format."""
    order = ("uuid", "time", "count", "bool", "money", "str", "map")
    kinds = {name: _v2_kind(name) for name in PricedEvent.model_fields}
    return tuple((name, kind) for k in order for name, kind in kinds.items() if kind == k)


def priced_v2_doc() -> dict[str, Any]:
    """The priced.v2 format as data (schemas/json/priced_event.v2.json; `make schemas`)."""
    return {"title": "priced.v2", "description": "One ClickHouse RowBinary row after the byte 0xB2 (schemas/events.py).",
            "magic": PRICED_V2_MAGIC, "header": {PRICED_SCHEMA_HEADER: PRICED_SCHEMAS[2]},
            "fields": [{"name": name, "kind": kind, "rowbinary": V2_KINDS[kind]} for name, kind in priced_v2_layout()]}
