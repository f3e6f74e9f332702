"""FinOps FOCUS export of the ledger (CSV or Parquet): FOCUS 1.3 by default, 1.2 by flag.

One row per hour x charge line x cost component: uncached input, cache-read, cache-write
and output tokens are separate rows (the anchors bill cached tokens wrong; here each
has its own quantity, list cost and cost), tool/API calls one row, and GPU time one row
per session (`GPU-Hours`). Money is exact: plain decimal strings in CSV, decimal128(38, 18)
in Parquet. meterline's own columns carry the `x_` prefix.

Who is who (meterline is a showback dataset, not the bill):
- InvoiceIssuerName is the billing account (`--billing-account`, default "meterline"): the
  export is its provisional statement, one InvoiceId per billing account and month.
- ServiceProviderName / ProviderName / PublisherName is who sells the service: the model's
  provider (`openai`), or the billing account itself for GPU time, self-hosted models and
  calls without a provider. HostProviderName is the same entity (meterline cannot see the
  infrastructure under a provider's API; GPU nodes are the account's own).
- BilledCost is the money this issuer invoices. FOCUS forbids an entity that does not invoice
  a charge to give it a non-zero BilledCost (merged datasets would count it twice), so
  third-party charges (ServiceProviderName != InvoiceIssuerName; the provider invoices
  them) have BilledCost 0, and internal ones (GPU time) bill their cost.
- EffectiveCost is what the charge really cost, for every row: the catalog price, or the
  provider-reported cost split over the components in proportion to their list cost
  (rounding remainder on the largest), so EffectiveCost adds up to the ledger exactly.
- ListUnitPrice is the catalog's list rate (USD per token, per call, per GPU-hour of a
  whole GPU), ListCost = ListUnitPrice x PricingQuantity exactly, and ContractedUnitPrice /
  ContractedCost equal them (meterline models no negotiated rates). GPU-hours are rounded to
  18 - (the rate's decimals) places so the product fits 18 places. Unpriced usage lists at 0
  and says why in ChargeDescription.
- ChargePeriodStart/End are the hour, clipped to the export's --since/--until, so two
  adjacent exports never share a charge period.
- Allocated GPU idle time (a policy: owner / proportional / separate) becomes rows with
  FOCUS 1.3's split-cost-allocation columns (`idle_rows`).
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from pathlib import Path
from typing import Any

from .report import UNATTRIBUTED, ReportParams, csv_text, exact, load_query
from .store import Result

FOCUS_VERSION = "1.3"
VERSIONS = ("1.3", "1.2")
SCALE = Decimal(10) ** -18
ZERO = Decimal(0)
MTOK = Decimal(1_000_000)
INTERNAL_PROVIDERS = frozenset({"", "self-hosted"})  # run on the account's own infrastructure

# FOCUS 1.2 columns, spec order (alphabetical); 1.3 adds eight (ProviderName and PublisherName
# are deprecated in 1.3 but still mandatory). meterline's x_ columns follow.
FOCUS_12_COLUMNS: tuple[str, ...] = (
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
NEW_IN_13 = ("AllocatedMethodDetails", "AllocatedMethodId", "AllocatedResourceId", "AllocatedResourceName",
             "AllocatedTags", "ContractApplied", "HostProviderName", "ServiceProviderName")
FOCUS_13_COLUMNS: tuple[str, ...] = tuple(sorted(FOCUS_12_COLUMNS + NEW_IN_13))
X_COLUMNS: tuple[str, ...] = (
    "x_SessionId", "x_AgentId", "x_Team", "x_Project", "x_Priority", "x_Kind", "x_Model", "x_Tool", "x_TokenType",
    "x_Events", "x_GpuSeconds", "x_GpuNode", "x_GpuName", "x_CostSource", "x_CatalogVersion", "x_Simulated",
)
FOCUS_COLUMNS = FOCUS_13_COLUMNS
COLUMNS = FOCUS_13_COLUMNS + X_COLUMNS
DECIMAL_COLUMNS = frozenset({
    "BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "ContractedUnitPrice", "ListUnitPrice",
    "ConsumedQuantity", "PricingQuantity", "CommitmentDiscountQuantity", "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost", "PricingCurrencyListUnitPrice", "x_GpuSeconds",
})
TIMESTAMP_COLUMNS = frozenset({"BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd"})
INTEGER_COLUMNS = frozenset({"x_Events"})
BOOL_COLUMNS = frozenset({"x_Simulated"})

# (token type, quantity column, list-cost column, SkuMeter, Rates field, unit): the disjoint components of
# streams/pricing.py's Components; a search is priced per unit, tokens per million.
TOKEN_COMPONENTS = (
    ("input", "uncached_input_qty", "input_list_usd", "Input Tokens", "input", "Tokens"),
    ("cache_read", "cache_read_qty", "cache_read_list_usd", "Cached Input Tokens (read)", "cache_read", "Tokens"),
    ("cache_write", "cache_write_qty", "cache_write_list_usd", "Cached Input Tokens (write, 5m)", "cache_write", "Tokens"),
    ("cache_write_1h", "cache_write_1h_qty", "cache_write_1h_list_usd", "Cached Input Tokens (write, 1h)", "cache_write_1h",
     "Tokens"),
    ("input_audio", "input_audio_qty", "input_audio_list_usd", "Audio Input Tokens", "input_audio", "Tokens"),
    ("input_image", "input_image_qty", "input_image_list_usd", "Image Input Tokens", "input_image", "Tokens"),
    ("output", "output_qty", "output_list_usd", "Output Tokens", "output", "Tokens"),
    ("output_audio", "output_audio_qty", "output_audio_list_usd", "Audio Output Tokens", "output_audio", "Tokens"),
    ("output_image", "output_image_qty", "output_image_list_usd", "Image Output Tokens", "output_image", "Tokens"),
    ("web_search", "web_search_qty", "web_search_list_usd", "Web Searches", "web_search", "Searches"),
)
# A part of the sheet a model does not price apart pays its parent's rate (as the pricer does).
PARENT_RATE = {"cache_read": "input", "cache_write": "input", "cache_write_1h": "cache_write", "input_audio": "input",
               "input_image": "input", "output_audio": "output", "output_image": "output"}
IDLE_RULES = {  # AllocatedMethodId -> what the rule does (AllocatedMethodDetails.x_Rule)
    "owner": "idle time of a device or MIG slice is charged to its holder (gpu_allocations), else to the idle line",
    "proportional": "a device's idle time is split over the tenants that used it in the hour, by the cost of their "
                    "process time; an hour nobody used goes to the holder, else to the idle line",
    "separate": "the device's idle time is kept as its own unallocated line (tenant idle), charged to no tenant",
}


def columns(version: str = FOCUS_VERSION) -> tuple[str, ...]:
    if version not in VERSIONS:
        raise ValueError(f"FOCUS version must be one of {', '.join(VERSIONS)}, not {version!r}")
    return (FOCUS_13_COLUMNS if version == "1.3" else FOCUS_12_COLUMNS) + X_COLUMNS


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


def priced_quantity(rate: Decimal, quantity: Decimal) -> tuple[Decimal, Decimal]:
    """(PricingQuantity, ListCost): the quantity rounded so that rate x quantity is exact in 18 places."""
    places = max(0, -rate.normalize().as_tuple().exponent)
    if quantity != quantity.to_integral_value():
        quantity = quantity.quantize(Decimal(10) ** -max(0, 18 - places), ROUND_HALF_EVEN)
    return quantity, rate * quantity


def _base(hour: datetime, end: datetime, tenant: str, account: str, provider: str) -> dict[str, Any]:
    period_start, period_end = month_bounds(hour)
    return {
        "BillingAccountId": account, "BillingAccountName": account, "BillingAccountType": "Organization",
        "BillingCurrency": "USD", "PricingCurrency": "USD", "BillingPeriodStart": period_start, "BillingPeriodEnd": period_end,
        "ChargePeriodStart": hour, "ChargePeriodEnd": end, "ChargeCategory": "Usage",
        "ChargeClass": None, "ChargeFrequency": "Usage-Based", "PricingCategory": "Standard",
        "InvoiceIssuerName": account, "InvoiceId": f"{account}/{period_start:%Y-%m}",
        "ServiceProviderName": provider, "HostProviderName": provider, "ProviderName": provider, "PublisherName": provider,
        "SubAccountId": tenant, "SubAccountName": tenant, "SubAccountType": "Tenant",
    }


def _money(row: dict[str, Any], cost: Decimal, rate: Decimal, quantity: Decimal) -> None:
    """Fill the cost columns: BilledCost only when the issuer is the seller (see the module docstring)."""
    quantity, listed = priced_quantity(rate, quantity)
    billed = cost if row["ServiceProviderName"] == row["InvoiceIssuerName"] else ZERO
    row.update(BilledCost=billed, EffectiveCost=cost, PricingCurrencyEffectiveCost=cost, ListCost=listed,
               ContractedCost=listed, ListUnitPrice=rate, PricingCurrencyListUnitPrice=rate, ContractedUnitPrice=rate,
               PricingCurrencyContractedUnitPrice=rate, ConsumedQuantity=quantity, PricingQuantity=quantity)


def _seller(provider: str, account: str) -> str:
    return account if provider.lower() in INTERNAL_PROVIDERS else provider


def _token_rate(catalog: Any, line: dict[str, Any], field: str, qty: Decimal, listed: Decimal) -> Decimal:
    """USD per token from the catalog at the line's hour (a missing cache rate is the input rate, as the
    pricer does); a model the catalog no longer knows falls back to the ledger's average."""
    rates = catalog.rates_for(line["provider"], line["model"], line["hour"]) if line["cost_source"] != "unpriced" else None
    if rates is None:
        return ZERO if line["cost_source"] == "unpriced" or not qty else (listed / qty).quantize(SCALE, ROUND_HALF_EVEN)
    per_unit = field == "web_search"
    price = getattr(rates, field)
    while price is None and field in PARENT_RATE:
        field = PARENT_RATE[field]
        price = getattr(rates, field)
    price = getattr(price, "base", price)  # a tiered price lists at its base tier
    return (price or ZERO) if per_unit else (price or ZERO) / MTOK


def _unpriced(what: str, line: dict[str, Any]) -> str:
    return f"unpriced: no catalog price for {what} (provider {line['provider'] or 'none'}); cost 0 until the catalog prices it"


def usage_rows(lines: Iterable[dict[str, Any]], account: str, catalog: Any) -> Iterator[dict[str, Any]]:
    for line in lines:
        resource = line["session_id"] or line["agent_id"] or line["tenant_id"]
        seller = _seller(line["provider"], account)
        common = _base(line["hour"], line["hour"] + timedelta(hours=1), line["tenant_id"], account, seller) | {
            "ResourceId": resource, "ResourceName": line["agent_id"] or resource, "ResourceType": "Agent Session",
            "ServiceCategory": "AI and Machine Learning",
            "Tags": json.dumps({"team": line["team"], "project": line["project"], "priority": line["priority"],
                                **({"service_tier": line["service_tier"]} if line["service_tier"] else {}),
                                **({"batch": "true"} if line["batch"] else {})}, sort_keys=True),
            "SkuPriceDetails": json.dumps({"x_CatalogVersion": line["catalog_version"], "x_CostSource": line["cost_source"]}),
            "x_SessionId": line["session_id"], "x_AgentId": line["agent_id"], "x_Team": line["team"],
            "x_Project": line["project"], "x_Priority": line["priority"], "x_Kind": line["kind"], "x_Model": line["model"],
            "x_Tool": line["tool"], "x_Events": line["events"], "x_GpuSeconds": None, "x_CostSource": line["cost_source"],
            "x_CatalogVersion": line["catalog_version"], "x_Simulated": False,
        }
        unpriced = line["cost_source"] == "unpriced"
        cost = Decimal(line["billed_cost_usd"])
        if line["kind"] == "llm_call":
            present = [c for c in TOKEN_COMPONENTS if line[c[1]] or Decimal(line[c[2]])] or [TOKEN_COMPONENTS[0]]
            lists = [Decimal(line[c[2]]) for c in present]
            parts = lists if sum(lists, ZERO) == cost else split_billed(cost, lists)
            for (token_type, qty_col, _, meter, field, unit), listed, part in zip(present, lists, parts):
                sku = f"{line['provider']}/{line['model']}/{token_type}"
                qty = Decimal(line[qty_col])
                row = dict(common, ChargeDescription=_unpriced(f"model {line['model']}", line) if unpriced
                           else f"{line['model']} {meter.lower()}", ConsumedUnit=unit,
                           PricingUnit=unit, ServiceName=f"{line['provider']} {line['model']}".strip(),
                           ServiceSubcategory="Generative AI", SkuId=sku, SkuMeter=meter,
                           SkuPriceId=f"{sku}@{line['catalog_version']}", x_TokenType=token_type)
                _money(row, part, _token_rate(catalog, line, field, qty, listed), qty)
                yield row
        else:
            sku = f"{line['provider'] or 'tool'}/{line['tool']}"
            qty, listed = Decimal(line["units_qty"]), Decimal(line["list_cost_usd"])
            rate = None if unpriced else catalog.tool_unit_price(line["tool"], line["provider"], line["hour"])
            if rate is None:
                rate = ZERO if unpriced or not qty else (listed / qty).quantize(SCALE, ROUND_HALF_EVEN)
            row = dict(common, ChargeDescription=_unpriced(f"tool {line['tool']}", line) if unpriced
                       else f"{line['kind']} {line['tool']}", ConsumedUnit="Requests",
                       PricingUnit="Requests", ServiceName=line["tool"], ServiceSubcategory="Other (AI and Machine Learning)",
                       SkuId=sku, SkuMeter="Calls", SkuPriceId=f"{sku}@{line['catalog_version']}", x_TokenType=None)
            _money(row, cost, rate, qty)
            yield row


def _gpu_rate(listed: Decimal | None, cost: Decimal, hours: Decimal) -> Decimal:
    """USD per hour of the whole GPU: the catalog's list rate, else what was paid per hour (MIG slices count their
    fraction in the hours), 0 for no hours."""
    if listed is not None:
        return Decimal(listed)
    return (cost / hours).quantize(SCALE, ROUND_HALF_EVEN) if hours else ZERO


def gpu_rows(lines: Iterable[dict[str, Any]], account: str, catalog: Any) -> Iterator[dict[str, Any]]:
    for line in lines:
        seconds = Decimal(line["gpu_seconds"])
        gpu = line["gpu_name"] + (f" {line['mig_profile']}" if line["mig_profile"] else "")
        sku = f"gpu/{gpu}"
        base = _base(line["hour"], line["hour"] + timedelta(hours=1), line["tenant_id"], account, account)
        row = base | {  # SQL names a missing tenant
            "ChargeDescription": f"{gpu} GPU time" + ("" if line["attributed"] else " (unattributed process)"),
            "ConsumedUnit": "GPU-Hours", "PricingUnit": "GPU-Hours",
            "ResourceId": line["session_id"] or f"{line['node']}/{line['gpu_uuid']}", "ResourceName": line["agent_id"] or line["node"],
            "ResourceType": "Agent Session" if line["attributed"] else "GPU", "ServiceCategory": "Compute",
            "ServiceName": "GPU compute", "ServiceSubcategory": "Other (Compute)", "SkuId": sku, "SkuMeter": "GPU-Hours",
            "SkuPriceId": f"{sku}@{line['catalog_version']}", "SkuPriceDetails": json.dumps({"x_CatalogVersion": line["catalog_version"]}),
            "Tags": json.dumps({"team": line["team"], "project": line["project"]}, sort_keys=True),
            "x_SessionId": line["session_id"], "x_AgentId": line["agent_id"], "x_Team": line["team"], "x_Project": line["project"],
            "x_Priority": None, "x_Kind": "gpu", "x_Model": None, "x_Tool": None, "x_TokenType": None, "x_Events": line["samples"],
            "x_GpuSeconds": seconds, "x_GpuNode": line["node"], "x_GpuName": line["gpu_name"], "x_CostSource": "catalog",
            "x_CatalogVersion": line["catalog_version"], "x_Simulated": bool(line["simulated"]),
        }
        cost, hours = Decimal(line["billed_cost_usd"]), seconds / 3600
        _money(row, cost, _gpu_rate(catalog.gpu_hourly(line["gpu_name"]), cost, hours), hours)
        yield row


# (x_Kind, SkuMeter, quantity column, cost column, ComputeRate field, quantity per unit): CPU and memory SKUs.
COMPUTE_SKUS = (
    ("cpu", "vCPU-Hours", "cpu_seconds", "cpu_cost_usd", "vcpu_hour", Decimal(3600)),
    ("memory", "GiB-Hours", "memory_byte_seconds", "memory_cost_usd", "gib_hour", Decimal(3600 * 2**30)),
)


def compute_rows(lines: Iterable[dict[str, Any]], account: str, catalog: Any) -> Iterator[dict[str, Any]]:
    """CPU and memory of `collect node` (compute_samples): a vCPU-Hours and a GiB-Hours row per hour, session and node."""
    for line in lines:
        try:
            rate = catalog.compute_rate(line["node_class"])
        except LookupError:
            rate = None  # a class the catalog lacks: the sink stored it unpriced (cost 0)
        for kind, meter, qty_col, cost_col, field, per_unit in COMPUTE_SKUS:
            with localcontext(prec=50):
                quantity = Decimal(line[qty_col]) / per_unit
            if not quantity:
                continue
            sku = f"compute/{line['node_class']}/{kind}"
            row = _base(line["hour"], line["hour"] + timedelta(hours=1), line["tenant_id"], account, account) | {
                "ChargeDescription": f"{'CPU' if kind == 'cpu' else 'Memory'} on {line['node']} ({line['node_class']})"
                                     + ("" if line["attributed"] else " (unattributed process)"),
                "ConsumedUnit": meter, "PricingUnit": meter,
                "ResourceId": line["session_id"] or line["node"], "ResourceName": line["agent_id"] or line["node"],
                "ResourceType": "Agent Session" if line["attributed"] else "Node", "ServiceCategory": "Compute",
                "ServiceName": "Node compute", "ServiceSubcategory": "Other (Compute)", "SkuId": sku, "SkuMeter": meter,
                "SkuPriceId": f"{sku}@{line['catalog_version']}",
                "SkuPriceDetails": json.dumps({"x_CatalogVersion": line["catalog_version"]}),
                "Tags": json.dumps({"team": line["team"], "project": line["project"]}, sort_keys=True),
                "x_SessionId": line["session_id"], "x_AgentId": line["agent_id"], "x_Team": line["team"],
                "x_Project": line["project"], "x_Priority": None, "x_Kind": kind, "x_Model": None, "x_Tool": None,
                "x_TokenType": None, "x_Events": line["samples"], "x_GpuSeconds": None, "x_GpuNode": line["node"],
                "x_GpuName": None, "x_CostSource": "unpriced" if line["catalog_version"] == "unpriced" else "catalog",
                "x_CatalogVersion": line["catalog_version"], "x_Simulated": bool(line["simulated"]),
            }
            cost = Decimal(line[cost_col])
            unit = getattr(rate, field) if rate is not None and line["catalog_version"] != "unpriced" else ZERO
            _money(row, cost, unit, quantity)
            yield row


def _json_number(value: Decimal) -> str:
    return exact(Decimal(value))


def _method_details(policy: str, ratio: Decimal, seconds: Decimal) -> str:
    """AllocatedMethodDetails: FOCUS's Elements array (exact JSON numbers, never floats) + x_ keys."""
    element = f'{{"AllocatedRatio": {_json_number(ratio)}, "UsageQuantity": {_json_number(seconds)}, "UsageUnit": "GPU-Seconds"}}'
    return f'{{"Elements": [{element}], "x_Policy": {json.dumps(policy)}, "x_Rule": {json.dumps(IDLE_RULES[policy])}}}'


def _origin(line: dict[str, Any]) -> tuple[Any, ...]:
    return line["hour"], line["node"], line["gpu_uuid"], line.get("mig_uuid") or ""


def idle_rows(lines: Iterable[dict[str, Any]], account: str) -> Iterator[dict[str, Any]]:
    """Allocated GPU idle lines (app/gpu_idle.py) as FOCUS 1.3 split-cost-allocation rows.

    The origin charge is one device's idle time in one hour; each line is an allocated charge,
    its AllocatedRatio its share of that origin's cost (the ratios of one origin sum to 1
    exactly). A `separate` line is the unallocated portion, so it has no AllocatedResourceId."""
    lines = list(lines)
    by_origin: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, line in enumerate(lines):
        by_origin[_origin(line)].append(i)
    ratios: dict[int, Decimal] = {}
    for members in by_origin.values():
        costs = [Decimal(lines[i]["cost_usd"]) for i in members]
        weights = costs if any(costs) else [Decimal(lines[i]["gpu_seconds"]) for i in members]
        ratios.update(zip(members, split_billed(Decimal(1), weights)))
    for i, line in enumerate(lines):
        yield _idle_row(line, ratios[i], account)


def _idle_row(line: dict[str, Any], ratio: Decimal, account: str) -> dict[str, Any]:
    policy, mig = line["policy"], line.get("mig_uuid") or ""
    if policy not in IDLE_RULES:
        raise ValueError(f"unknown GPU idle policy {policy!r}; expected one of {', '.join(IDLE_RULES)}")
    device = f"{line['node']}/{line['gpu_uuid']}" + (f"/{mig}" if mig else "")
    allocated = policy != "separate"
    seconds, cost = Decimal(line["gpu_seconds"]), Decimal(line["cost_usd"])
    sku = f"gpu/{line['gpu_name']}/idle"
    row = _base(line["hour"], line["period_end"], line["tenant_id"] or UNATTRIBUTED, account, account) | {
        "ChargeDescription": f"{line['gpu_name']} idle GPU time on {line['node']}, {policy} policy",
        "ConsumedUnit": "GPU-Hours", "PricingUnit": "GPU-Hours",
        "ResourceId": device, "ResourceName": f"{line['gpu_name']} on {line['node']}", "ResourceType": "GPU",
        "ServiceCategory": "Compute", "ServiceName": "GPU compute", "ServiceSubcategory": "Other (Compute)",
        "SkuId": sku, "SkuMeter": "Idle GPU-Hours", "SkuPriceId": f"{sku}@{line['catalog_version']}",
        "SkuPriceDetails": json.dumps({"x_CatalogVersion": line["catalog_version"]}), "Tags": "{}",
        "AllocatedMethodId": policy, "AllocatedMethodDetails": _method_details(policy, ratio, seconds),
        "AllocatedResourceId": device if allocated else None,
        "AllocatedResourceName": f"{line['gpu_name']} on {line['node']}" if allocated else None,
        "AllocatedTags": json.dumps({"team": line["team"], "project": line["project"]}, sort_keys=True),
        "x_Team": line["team"], "x_Project": line["project"], "x_Kind": "gpu_idle", "x_GpuSeconds": seconds,
        "x_GpuNode": line["node"], "x_GpuName": line["gpu_name"], "x_CostSource": "catalog",
        "x_CatalogVersion": line["catalog_version"], "x_Simulated": False,
    }
    hours = seconds / 3600
    _money(row, cost, _gpu_rate(line.get("list_rate_per_hour"), cost, hours), hours)
    return row


def clip(row: dict[str, Any], since: datetime, until: datetime) -> dict[str, Any]:
    """Charge period inside the export's window: adjacent exports never share a period."""
    row["ChargePeriodStart"] = max(row["ChargePeriodStart"], since)
    row["ChargePeriodEnd"] = min(row["ChargePeriodEnd"], until)
    return row


def focus_rows(ledger: Any, params: ReportParams, billing_account: str = "meterline", version: str = FOCUS_VERSION,
               idle_lines: Iterable[dict[str, Any]] | None = None, catalog: Any = None) -> list[dict[str, Any]]:
    """Every FOCUS row for the period, each with all columns of `version` (missing ones None). Idle GPU time
    comes from app/gpu_idle.py by params.gpu_idle unless `idle_lines` are given."""
    if idle_lines is None:
        from .gpu_idle import idle_lines as allocated, matching

        idle_lines = matching(allocated(ledger, params.since, params.until, params.gpu_idle), params.tenant)
    if catalog is None:
        from meterline.streams.pricing import load_catalog

        catalog = load_catalog()
    cols = columns(version)
    query = {"since": params.since, "until": params.until, "tenant": params.tenant}
    usage: Result = ledger.query(load_query("focus_usage"), query)
    gpu: Result = ledger.query(load_query("focus_gpu"), query | {"unattributed": UNATTRIBUTED})
    compute: Result = ledger.query(load_query("focus_compute"), query | {"unattributed": UNATTRIBUTED})
    rows = [*usage_rows(usage.dicts(), billing_account, catalog), *gpu_rows(gpu.dicts(), billing_account, catalog),
            *compute_rows(compute.dicts(), billing_account, catalog),
            *idle_rows(idle_lines, billing_account)]
    return [{c: row.get(c) for c in cols} for row in (clip(r, params.since, params.until) for r in rows)]


def write_csv(rows: list[dict[str, Any]], out: Path, version: str = FOCUS_VERSION) -> None:
    cols = columns(version)
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(cols)
        for row in rows:
            writer.writerow([_csv_value(row[c]) for c in cols])


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


def arrow_schema(version: str = FOCUS_VERSION):
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

    return pa.schema([pa.field(c, type_of(c)) for c in columns(version)], metadata={"focus_version": version})


def write_parquet(rows: list[dict[str, Any]], out: Path, version: str = FOCUS_VERSION) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(version)
    arrays = [pa.array([_arrow_value(f.name, r[f.name]) for r in rows] if f.name in DECIMAL_COLUMNS
                       else [r[f.name] for r in rows], type=f.type) for f in schema]
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), out)


def _arrow_value(col: str, value: Any) -> Any:
    if col in DECIMAL_COLUMNS and value is not None:
        return Decimal(value).quantize(SCALE, ROUND_HALF_EVEN)
    return value


def export(ledger: Any, params: ReportParams, out: Path, fmt: str, billing_account: str = "meterline",
           version: str = FOCUS_VERSION, idle_lines: Iterable[dict[str, Any]] | None = None) -> int:
    rows = focus_rows(ledger, params, billing_account, version, idle_lines)
    (write_parquet if fmt == "parquet" else write_csv)(rows, out, version)
    return len(rows)
