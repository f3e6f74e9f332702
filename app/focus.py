"""FinOps FOCUS 1.2 export of the ledger (CSV or Parquet).

One row per hour x charge line x cost component: uncached input, cache-read, cache-write
and output tokens are separate rows (the anchors bill cached tokens wrong; here each
has its own quantity, list cost and billed cost), tool/API calls one row, and GPU time
one row per session (`GPU-Hours`). Money is exact: plain decimal strings in CSV,
decimal128(38, 18) in Parquet. meterline's own columns carry the `x_` prefix.

Billed cost per component: catalog-priced lines bill exactly their list components;
a provider-reported cost is split over the components in proportion to their list
cost, the rounding remainder on the largest, so the rows always add up to the ledger.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from .report import UNATTRIBUTED, ReportParams, csv_text, exact, load_query
from .store import Result

FOCUS_VERSION = "1.2"
SCALE = Decimal(10) ** -18
ZERO = Decimal(0)

# FOCUS 1.2 columns, spec order (alphabetical), then meterline's x_ columns.
FOCUS_COLUMNS: tuple[str, ...] = (
    "AvailabilityZone", "BilledCost", "BillingAccountId", "BillingAccountName", "BillingAccountType", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "CapacityReservationId", "CapacityReservationStatus", "ChargeCategory",
    "ChargeClass", "ChargeDescription", "ChargeFrequency", "ChargePeriodEnd", "ChargePeriodStart",
    "CommitmentDiscountCategory", "CommitmentDiscountId", "CommitmentDiscountName", "CommitmentDiscountQuantity",
    "CommitmentDiscountStatus", "CommitmentDiscountType", "CommitmentDiscountUnit", "ConsumedQuantity", "ConsumedUnit",
    "ContractedCost", "ContractedUnitPrice", "EffectiveCost", "InvoiceId", "InvoiceIssuerName", "ListCost",
    "ListUnitPrice", "PricingCategory", "PricingCurrency", "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost", "PricingCurrencyListUnitPrice", "PricingQuantity", "PricingUnit", "ProviderName",
    "PublisherName", "RegionId", "RegionName", "ResourceId", "ResourceName", "ResourceType", "ServiceCategory",
    "ServiceName", "ServiceSubcategory", "SkuId", "SkuMeter", "SkuPriceDetails", "SkuPriceId", "SubAccountId",
    "SubAccountName", "SubAccountType", "Tags",
)
X_COLUMNS: tuple[str, ...] = (
    "x_SessionId", "x_AgentId", "x_Team", "x_Project", "x_Priority", "x_Kind", "x_Model", "x_Tool", "x_TokenType",
    "x_Events", "x_GpuSeconds", "x_GpuNode", "x_GpuName", "x_CostSource", "x_CatalogVersion", "x_Simulated",
)
COLUMNS = FOCUS_COLUMNS + X_COLUMNS
DECIMAL_COLUMNS = frozenset({
    "BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "ContractedUnitPrice", "ListUnitPrice",
    "ConsumedQuantity", "PricingQuantity", "CommitmentDiscountQuantity", "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost", "PricingCurrencyListUnitPrice", "x_GpuSeconds",
})
TIMESTAMP_COLUMNS = frozenset({"BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd"})
INTEGER_COLUMNS = frozenset({"x_Events"})
BOOL_COLUMNS = frozenset({"x_Simulated"})

# (token type, quantity column, list-cost column, SkuMeter)
TOKEN_COMPONENTS = (
    ("input", "uncached_input_qty", "input_list_usd", "Input Tokens"),
    ("cache_read", "cache_read_qty", "cache_read_list_usd", "Cached Input Tokens (read)"),
    ("cache_write", "cache_write_qty", "cache_write_list_usd", "Cached Input Tokens (write)"),
    ("output", "output_qty", "output_list_usd", "Output Tokens"),
)


def month_bounds(ts: datetime) -> tuple[datetime, datetime]:
    start = ts.astimezone(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


def split_billed(billed: Decimal, list_parts: list[Decimal]) -> list[Decimal]:
    """Billed cost over components in proportion to list cost; the parts sum to `billed` exactly."""
    total = sum(list_parts, ZERO)
    if not list_parts:
        return []
    if total == 0:
        return [billed] + [ZERO] * (len(list_parts) - 1)
    parts = [(billed * p / total).quantize(SCALE, ROUND_HALF_EVEN) for p in list_parts]
    largest = max(range(len(parts)), key=lambda i: list_parts[i])
    parts[largest] += billed - sum(parts, ZERO)
    return parts


def _unit_price(cost: Decimal, quantity: Decimal) -> Decimal | None:
    return (cost / quantity).quantize(SCALE, ROUND_HALF_EVEN) if quantity else None


def _base(hour: datetime, tenant: str, billing_account: str) -> dict[str, Any]:
    period_start, period_end = month_bounds(hour)
    return {
        "BillingAccountId": billing_account, "BillingAccountName": billing_account, "BillingAccountType": "Organization",
        "BillingCurrency": "USD", "PricingCurrency": "USD", "BillingPeriodStart": period_start, "BillingPeriodEnd": period_end,
        "ChargePeriodStart": hour, "ChargePeriodEnd": hour + timedelta(hours=1), "ChargeCategory": "Usage",
        "ChargeClass": None, "ChargeFrequency": "Usage-Based", "PricingCategory": "Standard",
        "InvoiceIssuerName": billing_account, "SubAccountId": tenant, "SubAccountName": tenant, "SubAccountType": "Tenant",
    }


def _money(row: dict[str, Any], billed: Decimal, listed: Decimal, quantity: Decimal) -> None:
    unit_list = _unit_price(listed, quantity)
    row.update(BilledCost=billed, EffectiveCost=billed, ContractedCost=billed, ListCost=listed,
               PricingCurrencyEffectiveCost=billed, ListUnitPrice=unit_list, PricingCurrencyListUnitPrice=unit_list,
               ContractedUnitPrice=_unit_price(billed, quantity),
               PricingCurrencyContractedUnitPrice=_unit_price(billed, quantity),
               ConsumedQuantity=quantity, PricingQuantity=quantity)


def usage_rows(lines: Iterable[dict[str, Any]], billing_account: str) -> Iterator[dict[str, Any]]:
    for line in lines:
        resource = line["session_id"] or line["agent_id"] or line["tenant_id"]
        common = _base(line["hour"], line["tenant_id"], billing_account) | {
            "ProviderName": line["provider"] or "meterline", "PublisherName": line["provider"] or "meterline",
            "ResourceId": resource, "ResourceName": line["agent_id"] or resource, "ResourceType": "Agent Session",
            "ServiceCategory": "AI and Machine Learning",
            "Tags": json.dumps({"team": line["team"], "project": line["project"], "priority": line["priority"]}, sort_keys=True),
            "SkuPriceDetails": json.dumps({"catalog_version": line["catalog_version"], "cost_source": line["cost_source"]}),
            "x_SessionId": line["session_id"], "x_AgentId": line["agent_id"], "x_Team": line["team"],
            "x_Project": line["project"], "x_Priority": line["priority"], "x_Kind": line["kind"], "x_Model": line["model"],
            "x_Tool": line["tool"], "x_Events": line["events"], "x_GpuSeconds": None, "x_CostSource": line["cost_source"],
            "x_CatalogVersion": line["catalog_version"], "x_Simulated": False,
        }
        billed = Decimal(line["billed_cost_usd"])
        if line["kind"] == "llm_call":
            present = [c for c in TOKEN_COMPONENTS if line[c[1]] or Decimal(line[c[2]])] or [TOKEN_COMPONENTS[0]]
            lists = [Decimal(line[c[2]]) for c in present]
            billed_parts = lists if sum(lists, ZERO) == billed else split_billed(billed, lists)
            for (token_type, qty_col, _, meter), listed, part in zip(present, lists, billed_parts):
                sku = f"{line['provider']}/{line['model']}/{token_type}"
                row = dict(common, ChargeDescription=f"{line['model']} {meter.lower()}", ConsumedUnit="Tokens",
                           PricingUnit="Tokens", ServiceName=f"{line['provider']} {line['model']}".strip(),
                           ServiceSubcategory="Generative AI", SkuId=sku, SkuMeter=meter,
                           SkuPriceId=f"{sku}@{line['catalog_version']}", x_TokenType=token_type)
                _money(row, part, listed, Decimal(line[qty_col]))
                yield row
        else:
            sku = f"{line['provider'] or 'tool'}/{line['tool']}"
            row = dict(common, ChargeDescription=f"{line['kind']} {line['tool']}", ConsumedUnit="Requests",
                       PricingUnit="Requests", ServiceName=line["tool"], ServiceSubcategory="Other (AI and Machine Learning)",
                       SkuId=sku, SkuMeter="Calls", SkuPriceId=f"{sku}@{line['catalog_version']}", x_TokenType=None)
            _money(row, billed, Decimal(line["list_cost_usd"]), Decimal(line["units_qty"]))
            yield row


def gpu_rows(lines: Iterable[dict[str, Any]], billing_account: str) -> Iterator[dict[str, Any]]:
    for line in lines:
        seconds = Decimal(line["gpu_seconds"])
        hours = seconds / 3600
        gpu = line["gpu_name"] + (f" {line['mig_profile']}" if line["mig_profile"] else "")
        sku = f"gpu/{gpu}"
        row = _base(line["hour"], line["tenant_id"], billing_account) | {  # SQL names a missing tenant
            "ChargeDescription": f"{gpu} GPU time" + ("" if line["attributed"] else " (unattributed process)"),
            "ConsumedUnit": "GPU-Hours", "PricingUnit": "GPU-Hours", "ProviderName": "meterline", "PublisherName": "meterline",
            "ResourceId": line["session_id"] or f"{line['node']}/{line['gpu_uuid']}", "ResourceName": line["agent_id"] or line["node"],
            "ResourceType": "Agent Session" if line["attributed"] else "GPU", "ServiceCategory": "Compute",
            "ServiceName": "GPU compute", "ServiceSubcategory": "Other (Compute)", "SkuId": sku, "SkuMeter": "GPU-Hours",
            "SkuPriceId": f"{sku}@{line['catalog_version']}", "SkuPriceDetails": json.dumps({"catalog_version": line["catalog_version"]}),
            "Tags": json.dumps({"team": line["team"], "project": line["project"]}, sort_keys=True),
            "x_SessionId": line["session_id"], "x_AgentId": line["agent_id"], "x_Team": line["team"], "x_Project": line["project"],
            "x_Priority": None, "x_Kind": "gpu", "x_Model": None, "x_Tool": None, "x_TokenType": None, "x_Events": line["samples"],
            "x_GpuSeconds": seconds, "x_GpuNode": line["node"], "x_GpuName": line["gpu_name"], "x_CostSource": "catalog",
            "x_CatalogVersion": line["catalog_version"], "x_Simulated": bool(line["simulated"]),
        }
        cost = Decimal(line["billed_cost_usd"])
        _money(row, cost, cost, hours.quantize(SCALE, ROUND_HALF_EVEN))
        yield row


def focus_rows(ledger: Any, params: ReportParams, billing_account: str = "meterline") -> list[dict[str, Any]]:
    """Every FOCUS row for the period, each with all COLUMNS (missing ones None)."""
    query = {"since": params.since, "until": params.until, "tenant": params.tenant}
    usage: Result = ledger.query(load_query("focus_usage"), query)
    gpu: Result = ledger.query(load_query("focus_gpu"), query | {"unattributed": UNATTRIBUTED})
    rows = [*usage_rows(usage.dicts(), billing_account), *gpu_rows(gpu.dicts(), billing_account)]
    return [{c: row.get(c) for c in COLUMNS} for row in rows]


def write_csv(rows: list[dict[str, Any]], out: Path) -> None:
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_csv_value(row[c]) for c in COLUMNS])


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return csv_text(value)
    return exact(value)


def arrow_schema():
    import pyarrow as pa

    def type_of(col: str):
        if col in DECIMAL_COLUMNS:
            return pa.decimal128(38, 18)
        if col in TIMESTAMP_COLUMNS:
            return pa.timestamp("ms", tz="UTC")
        if col in INTEGER_COLUMNS:
            return pa.int64()
        if col in BOOL_COLUMNS:
            return pa.bool_()
        return pa.string()

    return pa.schema([pa.field(c, type_of(c)) for c in COLUMNS], metadata={"focus_version": FOCUS_VERSION})


def write_parquet(rows: list[dict[str, Any]], out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema()
    columns = [pa.array([_arrow_value(f.name, r[f.name]) for r in rows] if f.name in DECIMAL_COLUMNS
                        else [r[f.name] for r in rows], type=f.type) for f in schema]
    pq.write_table(pa.Table.from_arrays(columns, schema=schema), out)


def _arrow_value(col: str, value: Any) -> Any:
    if col in DECIMAL_COLUMNS and value is not None:
        return Decimal(value).quantize(SCALE, ROUND_HALF_EVEN)
    return value


def export(ledger: Any, params: ReportParams, out: Path, fmt: str, billing_account: str = "meterline") -> int:
    rows = focus_rows(ledger, params, billing_account)
    (write_parquet if fmt == "parquet" else write_csv)(rows, out)
    return len(rows)
