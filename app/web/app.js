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
