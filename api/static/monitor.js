// Nectar swarm monitor: polls the API's market endpoints and draws the block map, the node table and a chart.
// Plain JS, no build step, no external resources.
"use strict";

const POLL_MS = 5000;
const COLORS = { online: "#1f9d55", joining: "#d69e2e", offline: "#a0aec0" };

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.appendChild(child);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

const short = (address) => (address ? address.slice(0, 8) + "\u2026" + address.slice(-4) : "");

// The market series is the operator's: its admin token comes in the page's fragment (/monitor#admin=TOKEN, never
// sent to the server in a URL) and is kept for this tab only.
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("admin")) {
  sessionStorage.setItem("nectar-admin", fragment.get("admin"));
  history.replaceState(null, "", location.pathname);
}
const ADMIN = sessionStorage.getItem("nectar-admin");

async function getJSON(path, token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { cache: "no-store", headers });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function drawBlocks(view) {
  const root = document.getElementById("blocks");
  root.replaceChildren();
  for (const model of view.models) {
    const nodes = view.nodes.filter((n) => n.model === model.name);
    const cell = Math.max(14, Math.min(40, Math.floor(900 / Math.max(1, model.num_blocks))));
    const left = 130, top = 34, row = 22;
    const width = left + cell * model.num_blocks + 10, height = top + row * Math.max(1, nodes.length) + 6;
    const map = svg("svg", { width, height, role: "img", "aria-label": `blocks of ${model.name}` });
    map.appendChild(svg("text", { x: 0, y: 14 }, `${model.name} (${model.num_blocks} blocks)`));
    model.coverage.forEach((count, i) => {
      map.appendChild(svg("rect", { x: left + i * cell, y: 18, width: cell - 1, height: 12,
        fill: count === 0 ? "#e53e3e" : count === 1 ? "#f6ad55" : "#68d391" }));
      map.appendChild(svg("text", { x: left + i * cell + 2, y: 28, "font-size": 10 }, String(count)));
    });
    nodes.forEach((node, j) => {
      const y = top + j * row;
      map.appendChild(svg("text", { x: 0, y: y + 14, class: "node-label" }, node.name));
      map.appendChild(svg("rect", { x: left + node.block_start * cell, y: y + 2,
        width: cell * (node.block_end - node.block_start) - 1, height: row - 6, rx: 3,
        fill: COLORS[node.state] || "#a0aec0" }));
    });
    root.appendChild(map);
  }
}

function drawNodes(view) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren();
  if (!view.nodes.length) {
    body.appendChild(el("tr", {}, [el("td", { colspan: 9, text: "no node announces the served models" })]));
    return;
  }
  for (const n of view.nodes) {
    const rep = n.reputation === null ? el("span", { text: "\u2014" }) : el("span", {}, [
      el("span", { class: "rep" }, [el("span", { style: `width:${Math.round(n.reputation * 100)}%` })]),
      el("span", { text: n.reputation.toFixed(2) + (n.new ? " (new)" : "") }),
    ]);
    body.appendChild(el("tr", { "data-node-name": n.name }, [
      el("td", { class: "node-name", text: n.name }),
      el("td", { title: n.eth_address, text: short(n.eth_address) }),
      el("td", { text: n.model }),
      el("td", { text: `${n.block_start}:${n.block_end}` }),
      el("td", {}, [el("span", { class: `state ${n.state}`, text: n.state })]),
      el("td", { class: "num", text: n.throughput.toFixed(1) }),
      el("td", { class: "num", text: String(n.price_per_token) }),
      el("td", {}, [rep]),
      el("td", { class: "num", text: String(n.cache_tokens_left) }),
    ]));
  }
}

function drawChart(stats) {
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = { l: 56, r: 64, t: 12, b: 28 };
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  const points = stats.points;
  const maxTokens = Math.max(1, ...points.map((p) => p.tokens));
  let running = 0;
  const settled = points.map((p) => (running += p.settled_credits));
  const maxSettled = Math.max(1e-9, ...settled);
  const plotW = W - pad.l - pad.r, plotH = H - pad.t - pad.b, step = plotW / Math.max(1, points.length);
  ctx.strokeStyle = "#cbd2dc";
  ctx.beginPath();
  ctx.moveTo(pad.l, pad.t); ctx.lineTo(pad.l, H - pad.b); ctx.lineTo(W - pad.r, H - pad.b); ctx.lineTo(W - pad.r, pad.t);
  ctx.stroke();
  ctx.fillStyle = "#3b6fd8";
  points.forEach((p, i) => {
    const h = (p.tokens / maxTokens) * plotH;
    ctx.fillRect(pad.l + i * step + 1, H - pad.b - h, Math.max(1, step - 2), h);
  });
  ctx.strokeStyle = "#e0702a";
  ctx.lineWidth = 2;
  ctx.beginPath();
  settled.forEach((value, i) => {
    const x = pad.l + (i + 0.5) * step, y = H - pad.b - (value / maxSettled) * plotH;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.lineWidth = 1;
  ctx.fillStyle = "#1d2433";
  ctx.font = "12px DejaVu Sans, sans-serif";
  ctx.fillText(String(maxTokens), 6, pad.t + 10);
  ctx.fillText("tokens", 6, pad.t + 24);
  ctx.fillText(maxSettled.toPrecision(3), W - pad.r + 4, pad.t + 10);
  ctx.fillText("credits", W - pad.r + 4, pad.t + 24);
  const fmt = (t) => new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (points.length) {
    ctx.fillText(fmt(points[0].t), pad.l, H - 8);
    ctx.fillText(fmt(points[points.length - 1].t), W - pad.r - 40, H - 8);
  }
  const settledText = stats.total_settled_credits === 0 ? "0" : stats.total_settled_credits >= 0.001
    ? stats.total_settled_credits.toFixed(6) : stats.total_settled_credits.toExponential(3);
  document.getElementById("totals").textContent =
    `${stats.total_tokens} tokens served and ${settledText} credits settled in the last ` +
    `${Math.round((points.length * stats.bucket_seconds) / 60)} minutes`;
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const [view, stats] = await Promise.all([
      getJSON("/v1/market/swarm"),
      ADMIN ? getJSON("/v1/market/stats?window=3600&bucket=60", ADMIN) : null,
    ]);
    drawBlocks(view);
    drawNodes(view);
    if (stats) drawChart(stats);
    else document.getElementById("totals").textContent =
      "The market series is the operator's: open /monitor#admin=<NECTAR_API_ADMIN_TOKEN> to see it.";
    const online = view.nodes.filter((n) => n.state === "online").length;
    document.getElementById("meta").textContent =
      `${online} of ${view.nodes.length} nodes online \u00b7 gateway ${short(view.gateway_address)} \u00b7 ` +
      `ledger ${view.ledger_url || "not configured"} \u00b7 updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.ready = "1";
    error.hidden = true;
  } catch (e) {
    error.hidden = false;
    error.textContent = `Could not refresh: ${e.message}`;
  }
}

refresh();
setInterval(refresh, POLL_MS);
