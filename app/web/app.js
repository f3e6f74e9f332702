// meterline live page: polls /api/live and draws dependency-free SVG charts.
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#4dabf7", "#ff922b", "#69db7c", "#f783ac", "#ffd43b", "#9775fa", "#3bc9db", "#ff6b6b"];
const ACTION_COLORS = { allow: "#69db7c", throttle: "#ffd166", queue: "#ffa94d", downgrade: "#74c0fc", deny: "#ff6b6b", preempt: "#e64980" };

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
function money(x) { return x >= 100 ? x.toFixed(0) : x >= 1 ? x.toFixed(2) : x.toFixed(4); }
function colorOf(names, name) { return COLORS[names.indexOf(name) % COLORS.length]; }

function lineChart(svg, series) {
  clear(svg);
  const [W, H, L, B] = [900, 260, 56, 24];
  const names = Object.keys(series).sort();
  const pts = names.flatMap(n => series[n].map(([t, c]) => [t, Number(c)]));
  if (!pts.length) { svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "waiting for spend…")); return; }
  const t0 = Math.min(...pts.map(p => p[0])), t1 = Math.max(...pts.map(p => p[0]), t0 + 1);
  const ymax = Math.max(...pts.map(p => p[1]), 1e-9);
  const x = t => L + (t - t0) / (t1 - t0) * (W - L - 10), y = v => H - B - v / ymax * (H - B - 10);
  for (let i = 0; i <= 4; i++) {
    const v = ymax * i / 4;
    svg.appendChild(el("line", { class: "grid", x1: L, x2: W - 10, y1: y(v), y2: y(v) }));
    svg.appendChild(el("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, money(v)));
  }
  svg.appendChild(el("text", { x: L, y: H - 6 }, new Date(t0 * 1000).toLocaleTimeString()));
  svg.appendChild(el("text", { x: W - 10, y: H - 6, "text-anchor": "end" }, new Date(t1 * 1000).toLocaleTimeString()));
  for (const n of names) {
    const d = series[n].map(([t, c], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(Number(c)).toFixed(1)}`).join("");
    if (series[n].length === 1) {
      svg.appendChild(el("circle", { class: "series", "data-series": n, cx: x(series[n][0][0]), cy: y(Number(series[n][0][1])), r: 3, fill: colorOf(names, n) }));
    }
    svg.appendChild(el("path", { class: "series", "data-series": n, d, fill: "none", stroke: colorOf(names, n), "stroke-width": 2 }));
  }
  const legend = document.getElementById("legend");
  clear(legend);
  for (const n of names) {  // tenant names are user text: textContent, never innerHTML
    const item = document.createElement("span"), swatch = document.createElement("i");
    swatch.style.background = colorOf(names, n);
    item.append(swatch, n);
    legend.appendChild(item);
  }
}

function barChart(svg, items, colorFor, label) {
  clear(svg);
  const [W, H, L] = [440, 170, 110];
  if (!items.length) { svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, `no ${label} yet`)); return; }
  const max = Math.max(...items.map(i => i.value), 1e-9);
  const h = Math.min(28, (H - 10) / items.length - 6);
  items.forEach((item, i) => {
    const y = 6 + i * (h + 6), w = Math.max(2, item.value / max * (W - L - 70));
    svg.appendChild(el("text", { x: L - 8, y: y + h / 2 + 4, "text-anchor": "end" }, item.name));
    svg.appendChild(el("rect", { class: "bar", "data-name": item.name, "data-value": item.value, x: L, y, width: w, height: h, fill: colorFor(item.name, i), rx: 2 }));
    svg.appendChild(el("text", { x: L + w + 6, y: y + h / 2 + 4 }, item.text));
  });
}

function rows(tbody, records, cells) {
  clear(tbody);
  for (const r of records.slice(0, 15)) {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells(r)) {
      const td = document.createElement("td");
      td.textContent = text == null ? "" : text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
  }
}

function render(live) {
  const tenants = live.tenants.map(t => t.tenant_id).sort();
  lineChart(document.getElementById("spend-lines"), live.series);
  barChart(document.getElementById("spend-bars"),
    live.tenants.map(t => ({ name: t.tenant_id, value: Number(t.cost_usd), text: "$" + money(Number(t.cost_usd)) })),
    name => colorOf(tenants, name), "spend");
  barChart(document.getElementById("decision-bars"),
    Object.entries(live.decision_counts).map(([k, v]) => ({ name: k, value: v, text: String(v) })),
    name => ACTION_COLORS[name] || "#adb5bd", "decisions");
  barChart(document.getElementById("anomaly-bars"),
    Object.entries(live.anomaly_counts).map(([k, v]) => ({ name: k, value: v, text: String(v) })),
    (name, i) => COLORS[(i + 3) % COLORS.length], "anomalies");
  rows(document.querySelector("#decisions tbody"), live.decisions, d => [
    [new Date(d.issued_at).toLocaleTimeString()], [d.tenant_id], [`${d.scope}:${d.scope_id}`], [d.priority || "*"],
    [d.action + (d.max_model ? ` → ${d.max_model}` : ""), "action-" + d.action], [d.reason]]);
  rows(document.querySelector("#anomalies tbody"), live.anomalies, a => [
    [new Date(a.ts).toLocaleTimeString()], [a.tenant_id], [a.kind], [a.severity], [`${a.scope}:${a.scope_id}`], [a.message]]);
  const comps = document.getElementById("components");
  clear(comps);
  for (const [name, c] of Object.entries(live.components || {})) {
    const li = document.createElement("li"), dot = document.createElement("span"), status = document.createElement("span");
    dot.className = c.running && !c.stalled ? "up" : "down";
    dot.textContent = "●";
    status.className = "status";
    status.textContent = c.stalled ? "stalled" : c.restarts ? c.restarts + " restarts" : "";
    li.append(dot, " " + name + " ", status);
    comps.appendChild(li);
  }
  document.getElementById("badge").hidden = !live.simulated;
  document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
}

// ---- cost drivers: a waterfall from the previous period's spend to the current one ----
// Money arrives as exact decimal strings; sums are BigInt in units of 1e-18 USD (the ledger's
// scale), so the labels and data-value are exact; Number() is used only for bar geometry.
const DRIVERS = [["call_volume", "calls"], ["model_mix", "model mix"], ["tokens_per_call", "tokens/call"],
  ["cache_hit_rate", "cache hit rate"], ["unit_price", "unit price"], ["tool_calls", "tools/API"], ["gpu_time", "GPU time"]];
const SCALE = 10n ** 18n;
let driverRows = [], driverKey = "tenant";

function units(text) {  // "1.5", "-0.25", and Python's "1.00E-7" / "0E-18" forms
  const m = /^(-?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/.exec(String(text).trim());
  if (!m) return 0n;
  const frac = m[3] || "", shift = Number(m[4] || 0) - frac.length + 18;
  const digits = BigInt((m[2] || "0") + frac);
  const v = shift >= 0 ? digits * 10n ** BigInt(shift) : digits / 10n ** BigInt(-shift);
  return m[1] ? -v : v;
}
function decimalText(v) {
  const abs = v < 0n ? -v : v, frac = (abs % SCALE).toString().padStart(18, "0").replace(/0+$/, "");
  return (v < 0n ? "-" : "") + (abs / SCALE).toString() + (frac ? "." + frac : "");
}
function usd(v, signed) {  // 4 places, half away from zero, from the exact value
  const q = 10n ** 14n, abs = v < 0n ? -v : v, r = (abs + q / 2n) / q;
  const text = "$" + (r / 10000n).toString() + "." + (r % 10000n).toString().padStart(4, "0");
  return (v < 0n && r ? "−" : signed && r ? "+" : "") + text;
}

function driverSteps(rows) {  // the selected group's (or every group's) exact totals
  const sum = col => rows.reduce((acc, r) => acc + units(r[col + "_usd"]), 0n);
  return [["previous", "previous", sum("previous"), true], ...DRIVERS.map(([k, label]) => [k, label, sum(k), false]),
          ["current", "current", sum("current"), true]];
}

function waterfall(svg, steps) {
  clear(svg);
  const [W, H, L, T, B] = [900, 240, 56, 22, 36];
  let run = 0n;
  const bars = steps.map(([key, label, v, total]) => {
    const from = total ? 0n : run, to = total ? v : run + v;
    run = to;
    return { key, label, v, total, lo: from < to ? from : to, hi: from < to ? to : from };
  });
  const top = Math.max(...bars.map(b => Number(b.hi) / 1e18), 1e-9), bottom = Math.min(...bars.map(b => Number(b.lo) / 1e18), 0);
  const y = v => T + (top - v) / (top - bottom) * (H - T - B), step = (W - L - 10) / bars.length;
  svg.appendChild(el("line", { class: "grid", x1: L, x2: W - 10, y1: y(0), y2: y(0) }));
  bars.forEach((b, i) => {
    const x = L + i * step + step * 0.15, w = step * 0.7, y1 = y(Number(b.hi) / 1e18), y0 = y(Number(b.lo) / 1e18);
    const fill = b.total ? "#4dabf7" : b.v > 0n ? "#ff6b6b" : b.v < 0n ? "#69db7c" : "#adb5bd";
    svg.appendChild(el("rect", { class: "wf-bar", "data-step": b.key, "data-value": decimalText(b.v), x, y: y1,
                                 width: w, height: Math.max(1, y0 - y1), fill, rx: 2 }));
    svg.appendChild(el("text", { x: x + w / 2, y: y1 - 6, "text-anchor": "middle", class: "wf-value" }, usd(b.v, !b.total)));
    svg.appendChild(el("text", { x: x + w / 2, y: H - B + 16, "text-anchor": "middle" }, b.label));
  });
}

function renderDrivers(doc) {
  const cols = doc.columns, key = driverKey = cols[0];
  driverRows = doc.rows.map(r => Object.fromEntries(cols.map((c, i) => [c, r[i]])));
  const select = document.getElementById("drivers-group"), chosen = select.value;
  clear(select);
  for (const name of ["", ...driverRows.map(r => r[key])]) {  // group names are user text: textContent only
    const opt = document.createElement("option");
    opt.value = name;
    opt.textContent = name || "all " + key + "s";
    select.appendChild(opt);
  }
  select.value = driverRows.some(r => r[key] === chosen) ? chosen : "";
  drawDrivers();
}
function drawDrivers() {
  const chosen = document.getElementById("drivers-group").value, svg = document.getElementById("drivers-waterfall");
  const rows = driverRows.filter(r => !chosen || r[driverKey] === chosen);
  if (!driverRows.length) { clear(svg); svg.appendChild(el("text", { x: 450, y: 120, "text-anchor": "middle" }, "no spend in either period")); return; }
  waterfall(svg, driverSteps(rows));
}
document.getElementById("drivers-group").addEventListener("change", drawDrivers);

async function tickDrivers() {
  const token = sessionStorage.getItem("meterline-token"), svg = document.getElementById("drivers-waterfall");
  try {
    const resp = await fetch("/api/report/drivers?since=7d&by=tenant", { cache: "no-store", headers: token ? { Authorization: "Bearer " + token } : {} });
    const doc = await resp.json();
    if (!resp.ok) { clear(svg); svg.appendChild(el("text", { x: 450, y: 120, "text-anchor": "middle" }, "drivers: " + doc.error)); return; }
    renderDrivers(doc);
  } catch (err) {
    clear(svg);
    svg.appendChild(el("text", { x: 450, y: 120, "text-anchor": "middle" }, "drivers unavailable: " + err));
  }
}

// ---- compute strategies: the seed's table, one column per strategy, every cell a number ----
const STRATEGY_ROWS = [["cost_usd", "cost (USD)", 2], ["daily_cost_cv", "cost predictability (CV of daily cost)", 3],
  ["critical_p99_wait_s", "latency guarantee (critical p99 wait, s)", 1], ["slo_met_pct", "critical within SLO (%)", 1],
  ["utilisation_pct", "utilisation efficiency (%)", 1], ["batch_lost_pct", "risk of interruption (batch work lost, %)", 1],
  ["savings_vs_static_pct", "cost savings vs static (%)", 1], ["deadline_misses", "batch deadline misses", 0]];

function renderStrategies(doc) {
  const table = document.getElementById("strategies"), head = table.tHead, body = table.tBodies[0];
  clear(head); clear(body);
  const rows = doc.rows.map(r => Object.fromEntries(doc.columns.map((c, i) => [c, r[i]])));
  const cell = (tag, text, attrs) => { const c = document.createElement(tag); c.textContent = text; Object.assign(c.dataset, attrs || {}); return c; };
  if (!rows.length) { body.appendChild(document.createElement("tr")).appendChild(cell("td", "no stored run yet: meterline simulate strategies --store")); return; }
  const top = head.appendChild(document.createElement("tr"));
  top.appendChild(cell("th", rows[0].source));  // user text (the trace's name): textContent only
  for (const r of rows) top.appendChild(cell("th", r.strategy));
  for (const [key, label, places] of STRATEGY_ROWS) {
    const tr = body.appendChild(document.createElement("tr"));
    tr.appendChild(cell("td", label));
    for (const r of rows) tr.appendChild(cell("td", Number(r[key]).toFixed(places), { metric: key, strategy: r.strategy, value: String(r[key]) }));
  }
}

async function tickStrategies() {
  const token = sessionStorage.getItem("meterline-token");
  try {
    const resp = await fetch("/api/report/strategies?since=365d", { cache: "no-store", headers: token ? { Authorization: "Bearer " + token } : {} });
    if (resp.ok) renderStrategies(await resp.json());
  } catch (err) { /* the live status line already says when the API is unreachable */ }
}

// ---- budgets: spent, and the forecast's period-end spend with its 80 % interval (a shaded band) ----
// /api/report/burn-down's forecast_spend / forecast_lo80 / forecast_hi80 (app/forecast.py); the exact
// decimal strings go into data-* attributes, Number() only places the shapes.
function forecastBands(svg, rows) {
  clear(svg);
  const W = 900, L = 170, R = 110, rowH = 30;
  svg.setAttribute("viewBox", `0 0 ${W} ${Math.max(60, rows.length * rowH + 10)}`);
  if (!rows.length) { svg.appendChild(el("text", { x: W / 2, y: 34, "text-anchor": "middle" }, "no budgets (meterline budget set)")); return; }
  rows.forEach((r, i) => {
    const amount = Number(r.amount), hi = Number(r.forecast_hi80 ?? r.spent);
    const max = Math.max(amount, hi, Number(r.spent), 1e-12) * 1.05, x = v => L + Number(v) / max * (W - L - R);
    const y = 8 + i * rowH, h = rowH - 12, unit = r.unit === "usd" ? "$" : "";
    svg.appendChild(el("text", { x: L - 8, y: y + h / 2 + 4, "text-anchor": "end" }, r.scope_id));
    svg.appendChild(el("rect", { class: "fc-spent", "data-policy": r.policy_id, "data-value": r.spent, x: L, y: y + h / 4,
                                 width: Math.max(1, x(r.spent) - L), height: h / 2, rx: 2 }));
    if (r.forecast_spend != null) {
      svg.appendChild(el("rect", { class: "fc-band", "data-policy": r.policy_id, "data-lo": r.forecast_lo80, "data-hi": r.forecast_hi80,
                                   x: x(r.forecast_lo80), y, width: Math.max(1, x(r.forecast_hi80) - x(r.forecast_lo80)), height: h }));
      svg.appendChild(el("line", { class: "fc-point", "data-policy": r.policy_id, "data-value": r.forecast_spend,
                                   x1: x(r.forecast_spend), x2: x(r.forecast_spend), y1: y, y2: y + h }));
    }
    svg.appendChild(el("line", { class: "fc-budget", x1: x(amount), x2: x(amount), y1: y - 3, y2: y + h + 3 }));
    const label = r.forecast_spend != null ? `→ ${unit}${money(Number(r.forecast_spend))} of ${unit}${money(amount)}` : `${unit}${money(amount)}`;
    svg.appendChild(el("text", { x: W - R + 6, y: y + h / 2 + 4, class: "fc-label" }, label));
  });
}

async function tickBudgets() {
  const token = sessionStorage.getItem("meterline-token"), svg = document.getElementById("forecast-bands");
  try {
    const resp = await fetch("/api/report/burn-down", { cache: "no-store", headers: token ? { Authorization: "Bearer " + token } : {} });
    const doc = await resp.json();
    if (!resp.ok) { clear(svg); svg.appendChild(el("text", { x: 450, y: 34, "text-anchor": "middle" }, "budgets: " + doc.error)); return; }
    forecastBands(svg, doc.rows.map(r => Object.fromEntries(doc.columns.map((c, i) => [c, r[i]]))).slice(0, 12));
  } catch (err) {
    clear(svg);
    svg.appendChild(el("text", { x: 450, y: 34, "text-anchor": "middle" }, "budgets unavailable: " + err));
  }
}

// ---- SLOs: attainment, cost per success and what downgrades saved (/api/report/slo, app/slo_report.py) ----
const SLO_COLUMNS = [["scope_id", "scope"], ["success_pct", "ok %"], ["slo_success_pct", "target"], ["success_met", "met"],
  ["p95_latency_ms", "p95 ms"], ["slo_p95_latency_ms", "target"], ["latency_met", "met"],
  ["cost_per_success_usd", "$ / success"], ["slo_cost_per_success_usd", "target"], ["cost_met", "met"],
  ["downgraded_calls", "downgraded calls"], ["saved_usd", "saved $"]];

function renderSlo(doc) {
  const table = document.getElementById("slo"), head = table.tHead, body = table.tBodies[0];
  clear(head); clear(body);
  const cell = (tag, text, attrs) => { const c = document.createElement(tag); c.textContent = text; Object.assign(c.dataset, attrs || {}); return c; };
  const rows = doc.rows.map(r => Object.fromEntries(doc.columns.map((c, i) => [c, r[i]])));
  if (!rows.length) { body.appendChild(document.createElement("tr")).appendChild(cell("td", "no budget has an SLO (meterline budget set --slo-p95-ms …)")); return; }
  const top = head.appendChild(document.createElement("tr"));
  for (const [, label] of SLO_COLUMNS) top.appendChild(cell("th", label));
  for (const r of rows) {
    const tr = body.appendChild(document.createElement("tr"));
    for (const [key] of SLO_COLUMNS) {  // user text (scope ids) and exact decimals: textContent only
      const v = r[key], shown = v == null ? "—" : key.endsWith("_usd") ? money(Number(v)) : String(v);
      tr.appendChild(cell("td", shown, { metric: key, value: v == null ? "" : String(v), policy: r.policy_id }));
    }
  }
}

async function tickSlo() {
  const token = sessionStorage.getItem("meterline-token");
  try {
    const resp = await fetch("/api/report/slo?since=7d", { cache: "no-store", headers: token ? { Authorization: "Bearer " + token } : {} });
    if (resp.ok) renderSlo(await resp.json());
  } catch (err) { /* the live status line already says when the API is unreachable */ }
}

// Once tokens exist the API wants one: asked for here, kept for this tab only.
function askToken(message) {
  const form = document.getElementById("login");
  form.hidden = false;
  document.getElementById("status").textContent = message;
}
document.getElementById("login").addEventListener("submit", ev => {
  ev.preventDefault();
  sessionStorage.setItem("meterline-token", document.getElementById("token").value.trim());
  document.getElementById("login").hidden = true;
  tick();
  tickDrivers();
  tickStrategies();
  tickBudgets();
  tickSlo();
});

async function tick() {
  const token = sessionStorage.getItem("meterline-token");
  try {
    const resp = await fetch("/api/live", { cache: "no-store", headers: token ? { Authorization: "Bearer " + token } : {} });
    if (resp.status === 401) return askToken(token ? "that token was refused" : "this API needs a token");
    if (!resp.ok) return askToken((await resp.json()).error);
    render(await resp.json());
  } catch (err) {
    document.getElementById("status").textContent = "API unreachable: " + err;
  }
}
tick();
setInterval(tick, 2000);
tickDrivers();
setInterval(tickDrivers, 60000);
tickStrategies();
setInterval(tickStrategies, 60000);  // a stored run changes rarely
tickBudgets();
setInterval(tickBudgets, 60000);  // forecasts move with the hourly rollups
tickSlo();
setInterval(tickSlo, 60000);
