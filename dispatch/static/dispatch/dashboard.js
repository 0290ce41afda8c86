// The live dashboard: one WebSocket, a snapshot a second, keyed table rows (no flicker),
// SVG charts. Everything a peer sent is put in the page as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let socket = null;
let retry = 500;
let key = sessionStorage.getItem("dashboard-key") || "";

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws/dashboard/`);
  socket.onopen = () => status("logging in…", false);
  socket.onmessage = (event) => receive(JSON.parse(event.data));
  socket.onclose = (event) => {
    if (event.code === 4401 || event.code === 4403) {
      status("locked", false);
      return; // refused: the auth panel (or the error) says why; no reconnect loop
    }
    status("disconnected", false);
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 8000);
  };
}

function hangUp() {
  const waiting = socket;
  socket = null;
  waiting.onclose = null;
  waiting.close();
}

function status(text, on) {
  $("status").textContent = text;
  $("status").className = "pill " + (on ? "on" : "off");
}

function receive(msg) {
  if (msg.type === "auth_required") {
    if (key) {
      socket.send(JSON.stringify({type: "auth", key}));
    } else {
      showAuth("");
      hangUp();  // no socket waits while the key is typed: a flood cannot push it out
    }
  } else if (msg.type === "snapshot") {
    retry = 500;
    status("live", true);
    $("auth").hidden = true;
    $("board").hidden = false;
    render(msg);
  } else if (msg.type === "done") {
    toast(msg.message);
  } else if (msg.type === "error") {
    if (msg.code === "unauthorized") {
      sessionStorage.removeItem("dashboard-key");
      key = "";
      showAuth(msg.error);
    } else if (msg.code === "not_allowed" || msg.code === "limit_exceeded") {
      showAuth(msg.error);  // the key may be fine: keep it for the next try
    } else {
      toast(msg.error);
    }
  }
}

function showAuth(error) {
  status("locked", false);
  $("board").hidden = true;
  $("auth").hidden = false;
  $("auth-error").textContent = error || "";
}

$("auth-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("auth-key").value.trim();
  sessionStorage.setItem("dashboard-key", key);
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({type: "auth", key}));
  } else {
    connect();
  }
});

// A button that acts on the second click: the first one asks "sure?" for a few seconds.
// Rows are drawn again every second, so what is armed is kept here, by action and id.
const armed = new Map();
function confirmButton(label, action, id, className, run) {
  const key = `${action} ${id}`;
  const sure = (armed.get(key) || 0) > Date.now();
  const button = el("button", sure ? `${label}: sure?` : label,
                    (className || "") + (sure ? " armed" : ""));
  button.dataset.action = action;
  button.title = sure ? "click again to confirm" : `${label} (asks once more)`;
  button.onclick = () => {
    if ((armed.get(key) || 0) > Date.now()) {
      armed.delete(key);
      run();
    } else {
      armed.set(key, Date.now() + 4000);
      button.textContent = `${label}: sure?`;
      button.classList.add("armed");
    }
  };
  return button;
}

function act(type, fields) {
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({type, ...fields}));
  }
}

let toastTimer = 0;
function toast(text) {
  $("toast").textContent = text;
  $("toast").hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { $("toast").hidden = true; }, 4000);
}

// ------------------------------------------------------------------ formatting

function ms(value) {
  if (value === null || value === undefined) return "–";
  if (value >= 1000) return (value / 1000).toFixed(value >= 10000 ? 0 : 1) + " s";
  return (value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2)) + " ms";
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function clock(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString();
}

// A share as 0%, 0.4%, 12%, as dispatch/formats.py writes it: a tenth of a percent
// matters only below ten.
function percent(fraction) {
  if (fraction === null || fraction === undefined) return "";
  return fraction > 0 && fraction < 0.0995 ? (fraction * 100).toFixed(1) + "%"
    : Math.round(fraction * 100) + "%";
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function bar(fraction) {
  const outer = el("span", null, "bar" + (fraction >= 0.9 ? " hot" : fraction >= 0.6 ? " warm" : ""));
  const inner = el("i");
  inner.style.width = Math.min(100, Math.round(fraction * 100)) + "%";
  outer.appendChild(inner);
  return outer;
}

// Rows keyed by id: an existing row is refilled in place, a new one appended, a gone one
// removed; so a row under the pointer does not vanish and come back every second.
function sync(tableId, items, keyOf, fill) {
  const body = $(tableId).tBodies[0];
  const old = body.rowsByKey || new Map();
  const rows = new Map();
  items.forEach((item, index) => {
    const id = keyOf(item);
    let row = old.get(id) || rows.get(id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.key = id;
    }
    rows.set(id, row);
    if (body.children[index] !== row) body.insertBefore(row, body.children[index] || null);
    row.replaceChildren(...fill(item));
  });
  [...body.children].forEach((row) => { if (rows.get(row.dataset.key) !== row) row.remove(); });
  body.rowsByKey = rows;
}

// ------------------------------------------------------------------ the page

function render(s) {
  $("process").textContent = `served by ${s.process}`;
  const states = s.states || {};
  $("t-workers").textContent = s.workers_total;
  $("t-states").textContent = Object.entries(states).map(([k, v]) => `${v} ${k}`).join(", ");
  const slots = s.slots;
  $("t-slots").textContent = `${slots.in_flight}/${slots.capacity}`;
  $("t-slots-bar").firstElementChild.style.width =
    (slots.capacity ? Math.round(100 * slots.in_flight / slots.capacity) : 0) + "%";
  const last = s.series.slice(-10);
  const answered = last.reduce((a, r) => a + r.answered, 0) / last.length;
  const failed = last.reduce((a, r) => a + r.failed, 0) / last.length;
  $("t-rate").textContent = answered.toFixed(answered < 10 ? 1 : 0);
  $("t-failed").textContent = failed ? `${failed.toFixed(1)}/s failed` : "none failing now";
  const lastP = [...s.series].reverse().find((r) => r.p99 !== null);
  $("t-p99").textContent = lastP ? ms(lastP.p99) : "–";
  $("t-p50").textContent = lastP ? `p50 ${ms(lastP.p50)}` : "";
  $("t-waiting").textContent = s.queue.waiting;
  $("t-oldest").textContent = s.queue.oldest_wait !== null
    ? `oldest ${ago(s.queue.oldest_wait)}` : `${s.queue.pending} in progress`;

  const err = $("registry-error");
  err.hidden = !s.registry_error;
  err.textContent = s.registry_error ? `Registry unreachable: ${s.registry_error}` : "";
  $("workers-note").textContent = s.workers.length < s.workers_total
    ? `(${s.workers.length} of ${s.workers_total} shown: troubled and busiest first)` : "";
  sync("workers", s.workers, (w) => w.worker_id, workerCells);
  sync("commands", s.commands, (c) => c.command, (c) => {
    const name = el("td", c.command, "mono");
    if (c.command === "(other)") {
      name.title = "requests for commands no worker offered (made-up names are not kept "
        + "apart), and commands beyond the first 200";
    }
    return [name, el("td", c.workers, "num"), el("td", c.answered ?? 0, "num"),
            el("td", c.errors ?? 0, "num" + (c.errors ? " bad" : "")),
            el("td", c.unserved ?? 0, "num" + (c.unserved ? " bad" : "")),
            el("td", ms(c.p50_ms), "num"), el("td", ms(c.p99_ms), "num")];
  });
  $("running-note").textContent = s.queue.pending > s.running.length
    ? `(oldest ${s.running.length} of ${s.queue.pending})` : "";
  sync("running", s.running, (r) => `${r.request_id} ${r.requester}`, (r) => {
    const actions = el("td");
    actions.appendChild(confirmButton("Cancel", "cancel", `${r.request_id} ${r.requester}`,
                                      "danger", () => act("cancel", {request_id: r.request_id})));
    const progress = el("td", null, "progress");
    if (r.progress !== null && r.progress !== undefined) progress.appendChild(bar(r.progress));
    progress.appendChild(el("span", [percent(r.progress), r.message].filter(Boolean).join(" ")));
    return [el("td", r.request_id, "mono id"), el("td", r.command, "mono"), el("td", r.state),
            progress, el("td", ago(r.age), "num"),
            el("td", r.workers.join(", ") || "–", "mono"), actions];
  });
  sync("failures", s.failures, (f) => `${f.command} ${f.code} ${f.error}`, (f) => [
    el("td", `${ago(f.ago)} ago`, "num"), el("td", f.count, "num"),
    el("td", f.command, "mono"), el("td", f.code, "bad"),
    el("td", f.workers.join(", ") || "–", "mono"), el("td", f.request_id, "mono id"),
    el("td", f.error, "error")]);
  drawRate(s.series);
  drawLatency(s.series);
}

function workerCells(w) {
  const labels = el("td", null, "labels");
  Object.entries(w.labels || {}).forEach(([k, v]) => labels.appendChild(el("span", `${k}=${v}`, "pill")));
  if (w.version) labels.appendChild(el("span", `v${w.version}`, "pill"));
  const state = el("td");
  const pill = el("span", w.state, "pill " + w.state);
  if (w.ejected_why) pill.title = `until ${clock(w.ejected_until)}: ${w.ejected_why}`;
  state.appendChild(pill);
  const load = el("td", null, "load");
  load.appendChild(bar(w.max_concurrency ? w.in_flight / w.max_concurrency : 0));
  load.appendChild(document.createTextNode(`${w.in_flight}/${w.max_concurrency}`));
  const draining = w.state === "draining";
  const actions = el("td");
  if (draining) {  // back into rotation: nothing to lose, one click
    const button = el("button", "Undrain");
    button.dataset.action = "undrain";
    button.onclick = () => act("undrain", {worker_id: w.worker_id});
    actions.appendChild(button);
  } else {
    actions.appendChild(confirmButton("Drain", "drain", w.worker_id, "",
                                      () => act("drain", {worker_id: w.worker_id})));
  }
  return [el("td", w.worker_id, "mono"), el("td", w.name), labels, state, load,
          el("td", ms(w.latency_ms), "num"),
          el("td", percent(w.error_rate), "num" + (w.error_rate > 0.05 ? " bad" : "")),
          el("td", w.completed, "num"), el("td", ago(w.seen_ago), "num"),
          el("td", w.process, "mono"), actions];
}

// ------------------------------------------------------------------ charts

const W = 600, H = 150, PAD = 18;

// ticks: [[fraction of the height, value], ...]
function axes(svg, ticks, unit) {
  svg.replaceChildren();
  for (const [f, value] of ticks) {
    const y = PAD + (H - 2 * PAD) * (1 - f);
    const line = document.createElementNS(SVG, "line");
    Object.entries({x1: 30, x2: W, y1: y, y2: y, class: "grid"}).forEach(([k, v]) => line.setAttribute(k, v));
    svg.appendChild(line);
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", 0);
    label.setAttribute("y", y + 3);
    label.textContent = unit(value);
    svg.appendChild(label);
  }
}

// points: [x, y], or null for a second without a value. A line breaks at a gap (it is
// not drawn across it); a filled area (rates, which have no gaps) closes at the bottom.
function path(svg, points, color, fill) {
  const shown = points.filter(Boolean);
  if (!shown.length) return;
  let d = "";
  points.forEach((point, i) => {
    if (!point) return;
    const start = fill ? !d : !(i > 0 && points[i - 1]);
    d += `${start ? "M" : "L"}${point[0].toFixed(1)},${point[1].toFixed(1)}`;
    if (!fill && start && !points[i + 1]) d += "h2";  // a lone second: a dash
  });
  if (fill) d += `L${shown[shown.length - 1][0].toFixed(1)},${H - PAD}L${shown[0][0].toFixed(1)},${H - PAD}Z`;
  const p = document.createElementNS(SVG, "path");
  p.setAttribute("d", d);
  p.setAttribute("fill", fill ? color : "none");
  p.setAttribute("fill-opacity", fill ? "0.25" : "1");
  p.setAttribute("stroke", color);
  p.setAttribute("stroke-width", "1.5");
  svg.appendChild(p);
}

// One point per second; scale(v) is its height from 0 (bottom) to 1 (top).
function xy(series, value, scale) {
  const step = (W - 30) / Math.max(1, series.length - 1);
  return series.map((r, i) => {
    const v = value(r);
    return v === null || v === undefined ? null
      : [30 + i * step, PAD + (H - 2 * PAD) * (1 - Math.min(1, Math.max(0, scale(v))))];
  });
}

function niceTop(max) {
  if (max <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(max)));
  return [1, 2, 5, 10].map((m) => m * p).find((t) => t >= max);
}

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function drawRate(series) {
  const svg = $("chart-rate");
  const top = niceTop(Math.max(...series.map((r) => r.answered)));
  axes(svg, [0, 0.5, 1].map((f) => [f, top * f]), (v) => v.toFixed(top < 5 ? 1 : 0));
  path(svg, xy(series, (r) => r.answered, (v) => v / top), css("--ok"), true);
  path(svg, xy(series, (r) => r.failed, (v) => v / top), css("--bad"), true);
}

// Latency on a log scale, a decade per grid line: a 25 s job and 2 ms requests both
// show, and a quiet second is a gap.
function drawLatency(series) {
  const svg = $("chart-latency");
  const values = series.flatMap((r) => [r.p50, r.p99]).filter((v) => v > 0);
  const low = Math.floor(Math.log10(Math.min(1, ...values)));
  const high = Math.max(low + 1, Math.ceil(Math.log10(Math.max(10, ...values))));
  const scale = (v) => (Math.log10(Math.max(v, Math.pow(10, low))) - low) / (high - low);
  const ticks = [];
  for (let e = low; e <= high; e++) ticks.push([(e - low) / (high - low), Math.pow(10, e)]);
  axes(svg, ticks, (v) => (v >= 1000 ? v / 1000 + " s" : v + " ms"));
  path(svg, xy(series, (r) => r.p50, scale), css("--p50"), false);
  path(svg, xy(series, (r) => r.p99, scale), css("--p99"), false);
}

connect();
