"""meterline's contracts: the records on every topic (see events.py) and the topic catalog.

Every public name events.py defines is re-exported here by name (tests/test_schemas.py checks that none is missing),
so `from meterline.schemas import UsageEvent` works and linters see what is exported."""
from .events import (
    MAX_FUTURE_SKEW, MAX_ID_LEN, MAX_NAME_LEN, MAX_TEXT_LEN, MAX_ATTRIBUTES, MAX_ATTRIBUTE_VALUE_LEN,
    MAX_TOKENS, Kind, Status, ServiceTier, SERVICE_TIERS, Priority, PRIORITIES, Scope, SCOPES, Action, Severity,
    InvalidEvent, HIDDEN_CATEGORIES, hidden_ranges, HIDDEN_RANGES, HIDDEN_RE, LEDGER_YEARS, MONEY_PLACES,
    MONEY_DIGITS, Id, OptionalId, ScopeId, Name, Text, Time, Timestamp, Tokens, MAX_COUNT, Count, PlainDecimal,
    Usd, SignedUsd, PositiveDecimal, Attributes, new_id, utcnow, Contract, Attribution, UsageEvent, SampleOwner,
    GpuSample, ComputeSample, SpendUpdate, Anomaly, DecisionLimits, ThrottleDecision, decision_key, Slo,
    BudgetPolicy, GpuAllocation, ScaleRecommendation, DeadLetter, MAX_DEAD_PAYLOAD_BYTES, dead_letter_payload,
    M, CONTRACTS, decode, build, PricedEvent, PRICED_V2_MAGIC, PRICED_SCHEMA_HEADER, PRICED_SCHEMAS, V2_KINDS,
    priced_v2_layout, priced_v2_doc,
)

__all__ = [
    "MAX_FUTURE_SKEW", "MAX_ID_LEN", "MAX_NAME_LEN", "MAX_TEXT_LEN", "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_VALUE_LEN", "MAX_TOKENS", "Kind", "Status", "ServiceTier", "SERVICE_TIERS", "Priority",
    "PRIORITIES", "Scope", "SCOPES", "Action", "Severity", "InvalidEvent", "HIDDEN_CATEGORIES", "hidden_ranges",
    "HIDDEN_RANGES", "HIDDEN_RE", "LEDGER_YEARS", "MONEY_PLACES", "MONEY_DIGITS", "Id", "OptionalId", "ScopeId",
    "Name", "Text", "Time", "Timestamp", "Tokens", "MAX_COUNT", "Count", "PlainDecimal", "Usd", "SignedUsd",
    "PositiveDecimal", "Attributes", "new_id", "utcnow", "Contract", "Attribution", "UsageEvent", "SampleOwner",
    "GpuSample", "ComputeSample", "SpendUpdate", "Anomaly", "DecisionLimits", "ThrottleDecision",
    "decision_key", "Slo", "BudgetPolicy", "GpuAllocation", "ScaleRecommendation", "DeadLetter",
    "MAX_DEAD_PAYLOAD_BYTES", "dead_letter_payload", "M", "CONTRACTS", "decode", "build", "PricedEvent",
    "PRICED_V2_MAGIC", "PRICED_SCHEMA_HEADER", "PRICED_SCHEMAS", "V2_KINDS", "priced_v2_layout", "priced_v2_doc",
]
