"""A contract (schemas/events.py) as ClickHouse SQL, so the sink validates whole batches in the engine.

Parsing and checking JSON in Python cost the sink more than everything else it does; ClickHouse
does both in C++ over a whole batch. The sink loads a batch's JSON into a staging table whose
scalars are text (`Nullable(String)`; integers `Nullable(Int128)`, where ClickHouse rejects a
fraction, an exponent or a bool): nothing is coerced silently (a 19th decimal or a bad date
stays text), and a missing field takes the contract's default. `Staged.convert` converts every
field and checks it with the rules read from the pydantic model itself (types, bounds, lengths,
enums, no hidden characters, no future timestamps, canonical UTC times) plus the cross-field
rules in `RULES`, into one `_ok` column.

pydantic stays the authority: a row the SQL rejects is decided by `schemas.events.decode`
(a dead letter with pydantic's reason, or its canonical JSON staged again), and
tests/test_sql_checks.py keeps the two verdicts in step.
"""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Literal, Union, get_args, get_origin
from uuid import UUID

import msgspec
from annotated_types import Ge, Gt, Le, MaxLen, MinLen
from pydantic import AfterValidator, AwareDatetime, BaseModel
from pydantic.fields import FieldInfo

from meterline.schemas import events as ev

KAFKA_STAGE_COLUMNS = "_topic String, _partition UInt32, _offset UInt64, _batch_start UInt64"
# After each priced.v2 row the sink appends these (RowBinary); _nonce is random per batch (framing check).
BINARY_KAFKA_COLUMNS = "_partition UInt32, _offset UInt64, _batch_start UInt64, _nonce UInt64"
BINARY_LAYOUTS = {ev.PricedEvent: ev.priced_v2_layout()}
UUID_RE = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# Only the canonical UTC form (what every meterline producer and pydantic write): any other form
# is rejected here and canonicalised by the authority. ClickHouse parses it ~10x faster than best effort.
TIME_RE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$"
# The contract's hidden characters (control, format, line/paragraph separators) as an re2 class over the same
# code point ranges (re2 knows \p{Cf} too, but from its own Unicode version; these are Python's, as pydantic's).
HIDDEN_CHARS_RE = "[" + "".join(f"\\x{{{lo:x}}}-\\x{{{hi:x}}}" for lo, hi in ev.HIDDEN_RANGES) + "]"

# Rules across fields (the contracts' model validators), over the converted values `v_<field>`.
RULES: dict[type[BaseModel], tuple[str, ...]] = {
    ev.UsageEvent: (
        "v_cache_read_tokens + v_cache_write_tokens <= v_input_tokens",
        "v_reasoning_tokens <= v_output_tokens",
        "v_cache_write_1h_tokens <= v_cache_write_tokens",
        "v_cache_read_tokens + v_cache_write_tokens + v_input_audio_tokens + v_input_image_tokens <= v_input_tokens",
        "v_reasoning_tokens + v_output_audio_tokens + v_output_image_tokens <= v_output_tokens",
        "v_kind != 'llm_call' OR v_model != ''",
        "v_kind = 'llm_call' OR v_tool != ''",
    ),
}


def canonical_json(record: BaseModel) -> bytes:
    """The contract's JSON in the one form the checks accept: timestamps in UTC ('Z'), decimals
    without exponents or trailing zeros ("1.500000000000000" and "1.5E+2" pass the contract too)."""
    data = record.model_dump(mode="json")
    for name, value in record:
        if isinstance(value, datetime):
            data[name] = value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
        elif isinstance(value, Decimal):
            data[name] = format(value.normalize(), "f")
    return msgspec.json.encode(data)


def sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Field:
    """One contract field: its base type, whether None is allowed, and its constraints."""

    name: str
    base: Any
    nullable: bool
    constraints: tuple[Any, ...]
    required: bool
    default: Any

    @classmethod
    def of(cls, name: str, info: FieldInfo) -> Field:
        base, nullable, constraints = unwrap(info.annotation, tuple(info.metadata))
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        return cls(name, base, nullable, constraints, info.is_required(), default)

    def bound(self, kind: type) -> Any:
        return next((getattr(c, _BOUND_ATTR[kind]) for c in self.constraints if isinstance(c, kind)), None)

    def stage_type(self) -> str:
        """Text for every scalar but integers (Int128: ClickHouse rejects a fraction, an exponent or a bool
        there). A missing field takes its default; NULL is an explicit null or a missing required field."""
        if get_origin(self.base) is dict:
            return "Map(String, String)"
        if self.base is bool:  # JSON true/false; ClickHouse also reads 1/0 here, which pydantic's StrictBool refuses
            return "Nullable(Bool)" + ("" if self.required or self.nullable else f" DEFAULT {str(self.default).lower()}")
        column = "Nullable(Int128)" if self.base is int else "Nullable(String)"
        if self.required or self.nullable:
            return column
        return f"{column} DEFAULT {self.default if self.base is int else sql_string(_json_text(self.default))}"

    def value(self) -> str:
        """The typed value; NULL when missing (required fields) or when the text does not convert."""
        text = f"`{self.name}`"
        base = self.base
        if get_origin(base) is dict or base in (int, str, bool) or get_origin(base) is Literal:
            return text
        if base is Decimal:
            scale = self.general("decimal_places")
            whole = self.general("max_digits") - scale
            sign = "" if self.bound(Ge) is not None or self.bound(Gt) is not None else "-?"
            return f"if(match({text}, '^{sign}[0-9]{{1,{whole}}}(\\\\.[0-9]{{1,{scale}}})?$'), toDecimal128OrNull({text}, 18), NULL)"
        if base is datetime:
            utc = f"toDateTime64OrNull(replaceOne(substring({text}, 1, length({text}) - 1), 'T', ' '), 3, 'UTC')"
            lo, hi = ev.LEDGER_YEARS  # DateTime64 would saturate a year outside its range, not reject it
            return f"if(match({text}, '{_escape(TIME_RE)}') AND toUInt16OrZero(substring({text}, 1, 4)) BETWEEN {lo} AND {hi}, {utc}, NULL)"
        if base is UUID:
            return f"if(match({text}, '{UUID_RE}'), toUUIDOrNull({text}), NULL)"
        raise AssertionError(base)

    def checks(self, v: str | None = None, binary: bool = False) -> list[str]:
        """Conditions on `v` (default `v_<name>`, the converted value) that hold for a valid value.
        binary: the value came typed (priced.v2), not as text: never NULL (its columns are not Nullable; v2 has
        no null: a record without a cost is written v1) and no text round trip to check."""
        v, out = v or f"v_{self.name}", []
        if get_origin(self.base) is dict:
            return self._map_checks(v)
        if get_origin(self.base) is Literal:
            out.append(f"{v} IN ({', '.join(sql_string(a) for a in get_args(self.base))})")
        if (low := self.bound(MinLen)) is not None:
            out.append(f"lengthUTF8({v}) >= {low}")
        if (high := self.bound(MaxLen)) is not None:
            out.append(f"lengthUTF8({v}) <= {high}")
        for kind, op in ((Ge, ">="), (Gt, ">"), (Le, "<=")):
            if (limit := self.bound(kind)) is not None:
                out.append(f"{v} {op} {limit}")
        if self.validator("_no_hidden_chars"):
            out.append(no_hidden_chars(v))
        if self.base is datetime and not binary:  # the parse rolls 02-30 over to 03-02: the text must survive the round trip
            out.append(f"formatDateTime({v}, '%Y-%m-%dT%H:%i') = substring(`{self.name}`, 1, 16)")
        if self.validator("_not_in_future"):
            out.append(f"{v} <= now64(3) + INTERVAL {int(ev.MAX_FUTURE_SKEW.total_seconds())} SECOND")
        if binary:
            return out
        present = [f"{v} IS NOT NULL", *out]
        if self.nullable:
            return [f"(`{self.name}` IS NULL OR ({' AND '.join(present)}))"]
        return present

    def _map_checks(self, v: str) -> list[str]:
        key_t, value_t = (Field.of("k", FieldInfo.from_annotation(a)) for a in get_args(self.base))
        out = [] if (n := self.bound(MaxLen)) is None else [f"length({v}) <= {n}"]
        for part, spec in (("mapKeys", key_t), ("mapValues", value_t)):
            rules = spec.checks("x")[1:]  # [0] is IS NOT NULL
            if rules:
                out.append(f"arrayAll(x -> {' AND '.join(rules)}, {part}({v}))")
        return out

    def general(self, name: str) -> Any:
        return next(getattr(c, name) for c in self.constraints if getattr(c, name, None) is not None)

    def validator(self, name: str) -> bool:
        return any(isinstance(c, AfterValidator) and c.func.__name__ == name for c in self.constraints)


_BOUND_ATTR = {Ge: "ge", Gt: "gt", Le: "le", MaxLen: "max_length", MinLen: "min_length"}


def unwrap(annotation: Any, metadata: tuple[Any, ...]) -> tuple[Any, bool, tuple[Any, ...]]:
    """(base type, None allowed, constraints) of an annotation such as `Annotated[int, Field(ge=0)] | None`
    (also what streams/codec.py generates its msgspec mirror from)."""
    nullable = False
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(get_args(annotation))
        if len(args) > 1 and all(get_origin(a) is Literal for a in args):  # Scope | Literal["gpu", "model"]: one Literal
            args = [Literal[tuple(value for a in args for value in get_args(a))]]
        if len(args) > 1:  # taking the first type alone rejected the others' valid values (anomalies scoped "model")
            raise TypeError(f"no SQL check for a union of {args!r}; extend sql/checks.py")
        annotation = args[0]
    while get_origin(annotation) is typing.Annotated:
        annotation, *extra = get_args(annotation)
        metadata += tuple(extra)
    if annotation is AwareDatetime:  # the regex below requires the offset, as AwareDatetime does
        annotation = datetime
    flat: list[Any] = []
    for item in metadata:
        flat.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    if annotation not in (str, int, bool, Decimal, datetime, UUID) and get_origin(annotation) not in (Literal, dict):
        raise TypeError(f"no SQL check for a field of type {annotation!r}; extend sql/checks.py")
    return annotation, nullable, tuple(flat)


SPACE_JOIN = ", ' ', "


def no_hidden_chars(v: str) -> str:
    return f"NOT match({v}, '{_escape(HIDDEN_CHARS_RE)}')"


def _json_text(value: Any) -> str:
    return format(value, "f") if isinstance(value, Decimal) else str(value)


def _escape(regex: str) -> str:
    return regex.replace("\\", "\\\\")


class Staged:
    """The SQL of one ledger table fed by one contract, through two per-session staging tables:
    `stage_<table>` holds the JSON as text, `typed_<table>` the converted values and `_ok`."""

    def __init__(self, model: type[BaseModel], table: str, ledger_types: dict[str, str], ts_column: str = "ts",
                 id_column: str | None = None):
        self.model, self.table, self.ts_column, self.id_column = model, table, ts_column, id_column
        self.fields = [Field.of(name, info) for name, info in model.model_fields.items()]
        self.stage, self.typed, self.stage2 = f"stage_{table}", f"typed_{table}", f"stage2_{table}"
        self.layout = BINARY_LAYOUTS.get(model, ())  # the fields of its binary format (priced.v2), if it has one
        self.ledger_types = ledger_types
        missing = {f.name for f in self.fields} - set(ledger_types)
        if missing:
            raise ValueError(f"{table} has no column for {sorted(missing)}")

    def create(self) -> list[str]:
        columns = ", ".join(f"`{f.name}` {f.stage_type()}" for f in self.fields)
        return [f"CREATE TEMPORARY TABLE IF NOT EXISTS {self.stage} ({columns}, {KAFKA_STAGE_COLUMNS}) ENGINE = Memory",
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {self.typed} ENGINE = Memory AS {self.convert()} LIMIT 0"] + (
                    [self.binary_create()] if self.layout else [])

    def convert(self) -> str:
        """Every staged row: `v_<field>` typed values, the Kafka columns, and `_ok`."""
        rules = [c for f in self.fields for c in f.checks()]
        rules += [r for model, extra in RULES.items() if issubclass(self.model, model) for r in extra]
        values = ", ".join(f"{f.value()} AS v_{f.name}" for f in self.fields)
        return (f"SELECT {values}, _topic, _partition, _offset, _batch_start, "
                f"{' AND '.join(f'({r})' for r in rules)} AS _ok FROM {self.stage}")

    def fill(self) -> str:
        return f"INSERT INTO {self.typed} {self.convert()}"

    # priced.v2 (schemas/events.py): rows that arrive typed, as RowBinary, into `stage2_<table>`

    def binary_create(self) -> str:
        columns = ", ".join(f"`{name}` {ev.V2_KINDS[kind]}" for name, kind in self.layout)
        return (f"CREATE TEMPORARY TABLE IF NOT EXISTS {self.stage2} ({columns}, {BINARY_KAFKA_COLUMNS}) "
                "ENGINE = Memory")

    def binary_framing(self) -> str:
        """(rows, rows whose trailing nonce is not `nonce`): a record that did not walk to its own end shifts
        what follows it, so its row, or the next, reads the wrong nonce or the rows do not add up."""
        return f"SELECT count(), groupUniqArray(2)(_nonce) FROM {self.stage2}"

    def binary_fill(self, topic: str) -> str:
        """Into `typed_<table>` like fill(): the typed values, the same checks, plus what text could not carry
        (UTF-8, 0/1 bools, money within 16 whole digits, times within the ledger's years)."""
        kinds = dict(self.layout)
        # One regex over the checked strings joined by a space (not hidden; the class matches one character): the
        # verdict of one per field, for less (BENCHMARKS.md, issue 17 session 9). Typed columns: concat is never NULL.
        hidden = [f"`{f.name}`" for f in self.fields if f.validator("_no_hidden_chars")]
        rules, values = [no_hidden_chars(f"concat({SPACE_JOIN.join(hidden)})")] if hidden else [], []
        for f in self.fields:
            kind, raw = kinds[f.name], f"`{f.name}`"
            # what a Literal's IN list accepts is valid UTF-8 already (issue 17, session 9)
            utf8 = [] if get_origin(f.base) is Literal else [f"isValidUTF8({raw})"]
            extra = {"str": utf8, "bool": [f"{raw} <= 1"],
                     "money": [f"{raw} >= 0", f"{raw} < toDecimal128('{10 ** (ev.MONEY_DIGITS - ev.MONEY_PLACES)}', 12)"],
                     "time": [f"{raw} BETWEEN toDateTime64('{ev.LEDGER_YEARS[0]}-01-01 00:00:00', 6, 'UTC') AND "
                              f"toDateTime64('{ev.LEDGER_YEARS[1]}-12-31 23:59:59.999999', 6, 'UTC')"],
                     "map": [f"arrayAll(x -> isValidUTF8(x), arrayConcat(mapKeys({raw}), mapValues({raw})))"]}.get(kind, [])
            rules += extra
            values.append(f"if({' AND '.join(extra)}, {raw}, NULL)" if kind in ("money", "time") else raw)
            # the contract's checks, less what is said already: money's >= 0 above, hidden characters in the one regex
            rules += [c for c in f.checks(raw, binary=True) if c not in extra and c != no_hidden_chars(raw)]
        rules += [r for model, more in RULES.items() if issubclass(self.model, model) for r in more]
        select = ", ".join(f"{value} AS v_{f.name}" for f, value in zip(self.fields, values))
        return (f"INSERT INTO {self.typed} SELECT {select}, {sql_string(topic)} AS _topic, _partition, _offset, _batch_start, "
                f"{' AND '.join(f'({r})' for r in rules)} AS _ok FROM {self.stage2}")

    def rejected(self) -> str:
        return f"SELECT _partition, _offset FROM {self.typed} WHERE NOT _ok"

    def accepted_range(self) -> str:
        return f"SELECT count(), min(v_{self.ts_column}), max(v_{self.ts_column}) FROM {self.typed} WHERE _ok"

    @staticmethod
    def _new(id_column: str, ids_table: str, lo: str, hi: str) -> str:
        return f"v_{id_column} NOT IN (SELECT {id_column} FROM {ids_table} WHERE ts BETWEEN {lo} AND {hi})"

    def truncate(self) -> list[str]:
        return [f"TRUNCATE TABLE {self.stage}", f"TRUNCATE TABLE {self.typed}"] + (
            [f"TRUNCATE TABLE {self.stage2}"] if self.layout else [])

    def repeated(self, id_column: str, ids_table: str, lo: str, hi: str) -> str:
        """(id, partition, offset, stored) of the accepted rows whose id repeats in the batch or is stored
        already: the rows sql/firstwrite.py judges (usually none)."""
        new = self._new(id_column, ids_table, lo, hi)
        return (f"SELECT toString(v_{id_column}), _partition, _offset, NOT {new} FROM {self.typed} WHERE _ok AND "
                f"(v_{id_column} IN (SELECT v_{id_column} FROM {self.typed} WHERE _ok GROUP BY v_{id_column} "
                f"HAVING count() > 1) OR NOT {new})")

    def insert(self, target: str, dedupe: tuple[str, str, str, str] | None = None,
               exclude: frozenset[tuple[int, int]] = frozenset()) -> str:
        """INSERT the accepted rows into `target`. With `dedupe` = (id column, ids table, lo, hi):
        skip ids already stored with a ts in [lo, hi] (SQL expressions), the (partition, offset) rows in
        `exclude` (later copies, sql/firstwrite.py) and, as a safety net, repeats within the batch."""
        names = [f.name for f in self.fields] + ["_topic", "_partition", "_offset", "_batch_start"]
        casts = [f"CAST(assumeNotNull(v_{f.name}) AS {self.ledger_types[f.name]})" for f in self.fields]
        casts += ["_topic", "_partition", "_offset", "_batch_start"]
        query = f"INSERT INTO {target} ({', '.join(names)}) SELECT {', '.join(casts)} FROM {self.typed} WHERE _ok"
        if exclude:
            query += f" AND (_partition, _offset) NOT IN ({', '.join(f'({p}, {o})' for p, o in sorted(exclude))})"
        if dedupe:
            query += f" AND {self._new(*dedupe)} ORDER BY _partition, _offset LIMIT 1 BY v_{dedupe[0]}"
        return query
