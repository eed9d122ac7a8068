// The gateway console: a client of the public JSON API, nothing more.
// The API key lives in sessionStorage (gone with the tab) and goes out as
// `Authorization: Bearer`. Everything from the API is untrusted: it reaches
// the page through textContent and attributes only, never as markup.
"use strict";

const KEY_ITEM = "gateway-console-key";
const STATUSES = ["scheduled", "pending", "sent", "delivered", "succeeded", "failed", "expired", "canceled"];
const FINAL = new Set(["succeeded", "failed", "expired", "canceled"]);
const SVG_NS = "http://www.w3.org/2000/svg";
const PAGE_SIZE = 25;
const REFRESH_MS = 3000;
const DEVICE_PAGES = 10;

const $ = (id) => document.getElementById(id);

// ---- building the page from data, as text only ----

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function statusBadge(status) {
  const known = STATUSES.includes(status) ? status : "";
  return el("span", { class: "status " + known, "data-status": String(status) }, status);
}

function when(iso) {
  if (!iso) return "–";
  const t = new Date(iso);
  return isNaN(t) ? String(iso) : t.toLocaleString();
}

function ago(iso) {
  if (!iso) return "never";
  const s = Math.round((Date.now() - new Date(iso)) / 1000);
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function duration(ms) {
  if (ms < 1000) return ms + " ms";
  if (ms < 60000) return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
  return Math.floor(ms / 60000) + " min " + Math.round((ms % 60000) / 1000) + " s";
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// ---- the API ----

function key() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

// Bumped when the key changes: an answer to a call made with the previous
// key is stale, and its error is not shown over the new key's results.
let keyGeneration = 0;

class ApiError extends Error {
  constructor(status, message, generation) {
    super(message);
    this.status = status;
    this.stale = generation !== keyGeneration;
  }
}

async function api(path, options) {
  const generation = keyGeneration;
  const headers = { Accept: "application/json" };
  if (key()) headers.Authorization = "Bearer " + key();
  if (options && options.body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { ...options, headers, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "the gateway cannot be reached (" + e.message + ")", generation);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    const hint = response.status === 401 ? " — enter an API key above" : "";
    throw new ApiError(response.status, response.status + ": " + message + hint, generation);
  }
  return { status: response.status, body };
}

// ---- the key ----

function showKeyState() {
  $("key-state").textContent = key() ? "key set for this tab" : "no key";
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("key").value.trim();
  if (value) sessionStorage.setItem(KEY_ITEM, value);
  keyGeneration++;
  $("key").value = "";
  showKeyState();
  refreshAll();
});

$("key-forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_ITEM);
  keyGeneration++;
  showKeyState();
});

// ---- summary ----

async function loadSummary() {
  const { body } = await api("/v1/commands/summary?minutes=60&buckets=12");
  $("online").textContent = body.devices.online;
  $("registered").textContent = body.devices.registered;
  $("hour-total").textContent = STATUSES.reduce((n, s) => n + (body.totals[s] || 0), 0);
  drawChart(body);
}

function drawChart(summary) {
  const chart = $("chart");
  chart.replaceChildren();
  const [w, h, left, bottom, top] = [960, 170, 36, 20, 8];
  const buckets = summary.buckets;
  const totals = buckets.map((b) => STATUSES.reduce((n, s) => n + (b.counts[s] || 0), 0));
  const max = Math.max(1, ...totals);
  const scale = (h - bottom - top) / max;
  const slot = (w - left) / buckets.length;
  for (const v of [0, max]) {
    const y = h - bottom - v * scale;
    chart.append(svg("line", { x1: left, x2: w, y1: y, y2: y, stroke: "#d9dee7" }));
    chart.append(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, v));
  }
  buckets.forEach((bucket, i) => {
    let y = h - bottom;
    const x = left + i * slot + slot * 0.15;
    for (const s of STATUSES) {
      const n = bucket.counts[s] || 0;
      if (!n) continue;
      const height = n * scale;
      y -= height;
      const rect = svg("rect", { x, y, width: slot * 0.7, height, class: "bar-" + s, fill: color(s) });
      rect.append(svg("title", {}, s + ": " + n));
      chart.append(rect);
    }
    if (i % 2 === 0 || buckets.length <= 6) {
      const start = new Date(bucket.start);
      const label = start.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
      chart.append(svg("text", { x: x + slot * 0.35, y: h - 5, "text-anchor": "middle" }, label));
    }
  });
  const legend = $("legend");
  legend.replaceChildren();
  for (const s of STATUSES) {
    const swatch = el("span", { class: "swatch status " + s });
    legend.append(el("li", {}, swatch, s + " " + (summary.totals[s] || 0)));
  }
}

function color(status) {
  return getComputedStyle(document.documentElement).getPropertyValue("--" + status).trim() || "#999";
}

// ---- devices ----

let devices = [];

async function loadDevices() {
  const all = [];
  let after = "";
  for (let page = 0; page < DEVICE_PAGES; page++) {
    const query = "?limit=1000" + (after ? "&after=" + encodeURIComponent(after) : "");
    const { body } = await api("/v1/devices" + query);
    all.push(...body.items);
    after = body.next_after;
    if (!after) break;
  }
  devices = all;
  const ids = $("device-ids");
  ids.replaceChildren(...devices.map((d) => el("option", { value: d.id })));
  renderDevices(after);
}

function labelText(labels) {
  return Object.entries(labels || {}).map(([k, v]) => k + "=" + (typeof v === "string" ? v : JSON.stringify(v)));
}

function renderDevices(more) {
  const search = $("device-search").value.trim().toLowerCase();
  const online = $("device-online").value;
  const shown = devices.filter((d) => {
    if (online === "online" && !d.online) return false;
    if (online === "offline" && d.online) return false;
    if (!search) return true;
    return [d.id, ...labelText(d.labels)].some((t) => t.toLowerCase().includes(search));
  });
  $("devices").replaceChildren(
    ...shown.map((d) => {
      const state = el("td", {}, el("span", { class: d.online ? "dot on" : "dot" }), d.online ? "online" : "offline");
      if (!d.enabled) state.append(el("span", { class: "muted" }, " (disabled)"));
      const labels = el("td", {}, ...labelText(d.labels).map((t) => el("span", { class: "label" }, t)));
      const commands = el("a", { href: "#/commands?device_id=" + encodeURIComponent(d.id) }, d.id);
      const send = el("a", { href: "#/send?device_id=" + encodeURIComponent(d.id) }, "send…");
      const seen = el("td", { title: when(d.last_seen_at) }, ago(d.last_seen_at));
      return el("tr", { "data-device": d.id }, el("td", {}, commands), state, el("td", {}, d.receiver_id || "–"), seen, labels, el("td", {}, send));
    })
  );
  const more_text = more ? " (the first " + devices.length + " only)" : "";
  $("device-count").textContent = shown.length + " of " + devices.length + " devices" + more_text;
}

for (const event of ["input", "change"]) $("device-search").addEventListener(event, () => renderDevices());
$("device-online").addEventListener("change", () => renderDevices());

// ---- commands ----

const commandPage = { cursors: [""], next: null };

async function loadCommands() {
  const params = new URLSearchParams({ limit: PAGE_SIZE });
  const device = $("command-device").value.trim();
  const status = $("command-status").value;
  const cursor = commandPage.cursors[commandPage.cursors.length - 1];
  if (device) params.set("device_id", device);
  if (status) params.set("status", status);
  if (cursor) params.set("cursor", cursor);
  const { body } = await api("/v1/commands?" + params);
  commandPage.next = body.next_cursor;
  $("commands").replaceChildren(
    ...body.items.map((c) => {
      const link = el("a", { href: "#/command/" + encodeURIComponent(c.id), class: "mono" }, c.id);
      const attempts = c.attempts + " / " + c.max_attempts;
      return el("tr", { "data-command": c.id }, el("td", {}, when(c.created_at)), el("td", {}, link), el("td", {}, c.device_id), el("td", {}, c.name), el("td", {}, statusBadge(c.status)), el("td", {}, attempts), el("td", {}, when(c.updated_at)));
    })
  );
  $("page-newer").disabled = commandPage.cursors.length === 1;
  $("page-older").disabled = !commandPage.next;
  $("command-page").textContent = "page " + commandPage.cursors.length + ", newest first";
}

function resetCommandPages() {
  commandPage.cursors = [""];
  loadCommands().catch(report);
}

$("command-device").addEventListener("change", resetCommandPages);
$("command-status").addEventListener("change", resetCommandPages);
$("page-older").addEventListener("click", () => {
  if (!commandPage.next) return;
  commandPage.cursors.push(commandPage.next);
  loadCommands().catch(report);
});
$("page-newer").addEventListener("click", () => {
  if (commandPage.cursors.length > 1) commandPage.cursors.pop();
  loadCommands().catch(report);
});
for (const s of STATUSES) $("command-status").append(el("option", { value: s }, s));

// ---- one command and its timeline ----

let shownCommand = null;

async function loadCommand(id) {
  const [{ body: c }, { body: events }] = await Promise.all([
    api("/v1/commands/" + encodeURIComponent(id)),
    api("/v1/commands/" + encodeURIComponent(id) + "/events"),
  ]);
  shownCommand = c;
  $("command-id").textContent = c.id;
  const fields = [
    ["Device", c.device_id],
    ["Name", c.name],
    ["Status", statusBadge(c.status)],
    ["Attempts", c.attempts + " of at most " + c.max_attempts],
    ["Created", when(c.created_at)],
    ["Deadline", when(c.expires_at)],
    ["Completed", when(c.completed_at)],
    ["Payload", el("pre", {}, payloadText(c))],
  ];
  if (c.result) fields.push(["Result", el("pre", {}, "code " + c.result.code + "\n" + payloadText(c.result) + (c.result.message ? "\n" + c.result.message : ""))]);
  if (c.error) fields.push(["Error", c.error.kind + ": " + c.error.message]);
  $("command-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  drawTimeline(events.items);
}

function payloadText(x) {
  if (x.payload_base64 !== undefined && x.payload_base64 !== null) return "base64 " + x.payload_base64;
  return JSON.stringify(x.payload, null, 2);
}

function drawTimeline(items) {
  const list = $("timeline");
  const times = items.map((e) => new Date(e.at).getTime());
  list.replaceChildren(
    ...items.map((e, i) => {
      const step = (e.from ? e.from + " → " : "") + e.to;
      const li = el("li", { class: "event", "data-to": e.to, "data-from": e.from || "" }, el("span", { class: "dot status " + (STATUSES.includes(e.to) ? e.to : "") }), el("span", { class: "step" }, step), el("span", { class: "when" }, new Date(e.at).toLocaleTimeString([], { hourCycle: "h23" }) + "." + String(times[i] % 1000).padStart(3, "0")));
      if (i > 0) li.append(el("span", { class: "gap" }, "+" + duration(times[i] - times[i - 1])));
      li.append(el("span", { class: "muted" }, "  attempt " + e.attempt));
      if (e.repeats > 1) li.append(el("span", { class: "muted" }, "  ×" + e.repeats + " until " + when(e.last_at)));
      if (e.detail) li.append(el("span", { class: "detail" }, e.detail));
      return li;
    })
  );
  drawTimelineChart(items, times);
}

// One dot per event, evenly spaced (events a millisecond apart stay
// readable), the time between steps written on the segment between them.
function drawTimelineChart(items, times) {
  const chart = $("timeline-chart");
  chart.replaceChildren();
  if (!items.length) return;
  const [w, left, right, y] = [720, 40, 40, 30];
  const step = items.length > 1 ? (w - left - right) / (items.length - 1) : 0;
  const x = (i) => (items.length > 1 ? left + i * step : w / 2);
  chart.append(svg("line", { x1: x(0), x2: x(items.length - 1), y1: y, y2: y, stroke: "#d9dee7", "stroke-width": 2 }));
  items.forEach((e, i) => {
    if (i > 0) {
      const gap = "+" + duration(times[i] - times[i - 1]);
      chart.append(svg("text", { x: (x(i - 1) + x(i)) / 2, y: y - 8, "text-anchor": "middle", fill: "#667085" }, gap));
    }
    const dot = svg("circle", { cx: x(i), cy: y, r: 7, fill: color(e.to) });
    dot.append(svg("title", {}, (e.from ? e.from + " → " : "") + e.to + " " + e.at));
    chart.append(dot);
    chart.append(svg("text", { x: x(i), y: y + 24, "text-anchor": "middle" }, e.to));
    chart.append(svg("text", { x: x(i), y: y + 38, "text-anchor": "middle", fill: "#667085" }, "attempt " + e.attempt));
  });
  const total = times[times.length - 1] - times[0];
  chart.append(svg("text", { x: w - 2, y: 10, "text-anchor": "end", fill: "#667085" }, "total " + duration(total)));
}

// ---- sending ----

function payloadCheck() {
  const text = $("send-payload").value.trim();
  const state = $("payload-state");
  if (!text) {
    state.textContent = "no payload (sent as null)";
    state.className = "hint";
    return true;
  }
  try {
    JSON.parse(text);
    state.textContent = "valid JSON";
    state.className = "hint";
    return true;
  } catch (e) {
    state.textContent = "not JSON: " + e.message;
    state.className = "hint bad";
    return false;
  }
}

function numberField(id, name, parts) {
  const raw = $(id).value.trim();
  if (!raw) return;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < Number($(id).min) || n > Number($(id).max)) {
    throw new Error(name + " must be a whole number from " + $(id).min + " to " + $(id).max);
  }
  parts.push(JSON.stringify(name) + ":" + n);
}

// The body is assembled as text so that the payload goes out exactly as
// typed (numbers digit for digit, keys in order), once JSON.parse accepted it.
function sendBody() {
  const name = $("send-name").value.trim();
  if (!name) throw new Error("a command name is needed");
  const parts = ['"name":' + JSON.stringify(name)];
  const payload = $("send-payload").value.trim();
  if (payload) parts.push('"payload":' + payload);
  const mode = $("mode-async").checked ? "async" : "sync";
  parts.push('"mode":' + JSON.stringify(mode));
  if (mode === "sync") numberField("send-wait", "wait_ms", parts);
  numberField("send-ttl", "ttl_ms", parts);
  numberField("send-attempts", "max_attempts", parts);
  return "{" + parts.join(",") + "}";
}

$("send-payload").addEventListener("input", () => {
  $("send-submit").disabled = !payloadCheck();
});

$("send-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError("");
  const device = $("send-device").value.trim();
  if (!device) return showError("a device is needed");
  if (!payloadCheck()) return showError("the payload is not valid JSON");
  let body;
  try {
    body = sendBody();
  } catch (err) {
    return showError(err.message);
  }
  $("send-submit").disabled = true;
  showResult(null, "sending…", "");
  try {
    const { status, body: answer } = await api("/v1/devices/" + encodeURIComponent(device) + "/commands", { method: "POST", body });
    showResult(answer.id, answer.status, status === 202 && !FINAL.has(answer.status) ? "under way: waiting for the result…" : JSON.stringify(answer, null, 2));
    if (FINAL.has(answer.status)) loadSummary().catch(() => {});
    else await followSent(answer.id);
  } catch (err) {
    showResult(null, "refused", err.message);
  } finally {
    $("send-submit").disabled = !payloadCheck();
  }
});

// An accepted command that is not final yet: long-poll until it is (or the user leaves).
async function followSent(id) {
  for (;;) {
    const { body } = await api("/v1/commands/" + encodeURIComponent(id) + "?wait_ms=5000");
    const done = FINAL.has(body.status);
    showResult(id, body.status, done ? JSON.stringify(body, null, 2) : "under way: waiting for the result…");
    if (done) loadSummary().catch(() => {});
    if (done || route().view !== "send") return;
  }
}

function showResult(id, status, text) {
  $("send-result").hidden = false;
  const link = $("send-link");
  link.textContent = id ? "command " + id : "";
  link.setAttribute("href", id ? "#/command/" + encodeURIComponent(id) : "#/commands");
  const badge = $("send-status");
  badge.textContent = status;
  badge.className = "status " + (STATUSES.includes(status) ? status : "");
  badge.setAttribute("data-status", status);
  $("send-body").textContent = text;
}

// ---- views ----

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const [view, id] = path.split("/");
  return { view: view || "devices", id: id ? decodeURIComponent(id) : "", params };
}

function report(e) {
  if (!e.stale) showError(e.message);
}

async function show() {
  const { view, id, params } = route();
  for (const v of ["devices", "commands", "command", "send"]) $("view-" + v).hidden = v !== view;
  for (const t of ["devices", "commands", "send"]) $("tab-" + t).classList.toggle("active", t === view || (t === "commands" && view === "command"));
  showError("");
  if (view === "commands" && params.has("device_id")) {
    $("command-device").value = params.get("device_id");
    commandPage.cursors = [""];
  }
  if (view === "send" && params.has("device_id")) $("send-device").value = params.get("device_id");
  await refreshView(view, id);
}

async function refreshView(view, id) {
  try {
    if (view === "devices") await loadDevices();
    if (view === "commands") await loadCommands();
    if (view === "command") await loadCommand(id);
    if (view === "send" && !devices.length) await loadDevices();
  } catch (e) {
    report(e);
  }
}

async function refreshAll() {
  showError("");
  loadSummary().catch(report);
  await refreshView(route().view, route().id);
}

// Auto-refresh: the summary, the first page of commands (when asked), a
// command still under way. Paused while the tab is hidden.
setInterval(() => {
  if (document.hidden) return;
  loadSummary().catch(() => {});
  const { view, id } = route();
  if (view === "commands" && $("command-refresh").checked && commandPage.cursors.length === 1) loadCommands().catch(() => {});
  if (view === "command" && shownCommand && shownCommand.id === id && !FINAL.has(shownCommand.status)) loadCommand(id).catch(() => {});
}, REFRESH_MS);

window.addEventListener("hashchange", show);
showKeyState();
payloadCheck();
loadSummary().catch(report);
show();
