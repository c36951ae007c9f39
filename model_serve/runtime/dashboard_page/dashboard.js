// model_serve's dashboard. Every name, path and log line comes from files and clients: it is
// only ever set as text (textContent), never parsed as HTML. Live updates are server-sent
// events read with fetch, so the API key travels in a header, never in a URL.
"use strict";

const KEY_STORE = "model_serve.key";
const RECONNECT_MS = [500, 1000, 2000, 4000];
const LOG_KEPT = 500; // lines of the log the page keeps
const MEMORY_EVERY_MS = 15000;
const REQUESTS_SHOWN = 100;

const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem(KEY_STORE) || "";
let keyWanted = null; // resolves when the user gives a key
const requests = []; // newest first
let lastStatus = null;
let memoryHistory = null;
let memoryVersion = null;

// --- helpers -------------------------------------------------------------------------------
function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
  return tr;
}

// A cell of short lines, each its own text node.
function lines(texts) {
  const td = document.createElement("td");
  for (const text of texts.filter(Boolean)) td.appendChild(el("div", text));
  return td;
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function seconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return `${Math.round(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.round(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${Math.round((s % 3600) / 60)}m`;
}

function clock(at) {
  return new Date(at * 1000).toLocaleTimeString();
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function notice(text, kind) {
  const box = $("notice");
  box.textContent = text;
  box.dataset.kind = kind || "info";
  box.hidden = !text;
}

function connection(state, text) {
  const badge = $("connection");
  badge.dataset.state = state;
  badge.textContent = text;
}

// --- the key -------------------------------------------------------------------------------
function askKey(reason) {
  $("key-reason").textContent = reason || "This server asks for an API key.";
  $("key-form").hidden = false;
  $("key-input").focus();
  if (!keyWanted) {
    let done;
    keyWanted = new Promise((resolve) => { done = resolve; });
    keyWanted.done = done;
  }
  return keyWanted;
}

function setKey(value) {
  key = value;
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  $("key-form").hidden = true;
  if (keyWanted) { keyWanted.done(); keyWanted = null; }
}

async function errorText(response) {
  try {
    const data = await response.json();
    if (data && data.error && data.error.message) return data.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

// A call to the port; on 401/403 the key form says why and the call waits for a key
// (unless `quiet`: the log, say, which may need an admin key the user does not have).
async function api(path, options, quiet) {
  for (;;) {
    const response = await fetch(path, Object.assign({ cache: "no-store" }, options || {},
      { headers: headers((options || {}).headers) }));
    if (!quiet && (response.status === 401 || response.status === 403)) {
      await askKey(await errorText(response));
      continue;
    }
    return response;
  }
}

// --- live updates: server-sent events over fetch --------------------------------------------
async function follow() {
  let attempt = 0;
  for (;;) {
    try {
      const response = await api("/api/model_serve/events",
        { headers: { Accept: "text/event-stream" } });
      if (!response.ok) throw new Error(await errorText(response));
      attempt = 0;
      connection("live", "live");
      notice("");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          handleEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
      throw new Error("the server closed the stream");
    } catch (err) {
      connection("lost", "connection lost, reconnecting…");
      notice(`Lost the connection to model_serve (${err.message}); reconnecting. ` +
             "What the page shows may be out of date.", "error");
    }
    await new Promise((r) => setTimeout(r, RECONNECT_MS[Math.min(attempt, RECONNECT_MS.length - 1)]));
    attempt++;
  }
}

function handleEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (event === "status") renderStatus(payload);
  else if (event === "requests") renderRequests(payload);
  else if (event === "engine") notice(`The engine does not answer: ${payload.error}`, "error");
  else if (event === "log") renderLog(payload);
  else if (event === "peers") renderPeers(payload.peers);
}

// --- peers -------------------------------------------------------------------------------------
function renderPeers(peers) {
  $("peers-section").hidden = !peers.length;
  replaceRows($("peers").tBodies[0], peers.map((p) => {
    const state = p.up ? lines(["up"])
      : lines([p.checked ? "down" : "not checked yet", p.checked ? p.problem : ""]);
    state.className = p.up ? "state-loaded" : (p.checked ? "state-crashed" : "");
    const tr = row([el("td", p.name, "name"), p.url, state, p.models,
                    p.checked ? clock(p.checked) : ""]);
    tr.dataset.peer = p.name;
    tr.dataset.up = String(p.up);
    return tr;
  }));
}

// --- models ----------------------------------------------------------------------------------
function stateClass(state) {
  if (state === "loaded") return "state-loaded";
  if (state === "loading") return "state-loading";
  if (state.startsWith("crashed") || state === "failing to load") return "state-crashed";
  return "";
}

function actionButton(label, model, action) {
  const button = el("button", label);
  button.type = "button";
  button.dataset.action = action;
  button.dataset.model = model; // a property, never markup
  button.addEventListener("click", () => act(action, model, button));
  return button;
}

function renderStatus(status) {
  lastStatus = status;
  $("engine").textContent = `engine: ${status.engine}`;
  const rows = status.models.map((m) => {
    const name = el("td", m.name, "name");
    // Why its server last ended, when nobody asked it to: shown under a crashed state; why
    // its loads fail (its requests are refused meanwhile): under "failing to load".
    const crashed = m.state.startsWith("crashed") && m.last_exit;
    const why = m.load_failure || (crashed ? m.last_exit : "");
    const state = lines([m.state, why]);
    state.className = stateClass(m.state);
    if (why || m.last_exit) state.title = why || m.last_exit;
    const memory = lines([m.estimate_bytes ? `${bytes(m.estimate_bytes)} est.` : "",
                          m.rss_bytes ? `${bytes(m.rss_bytes)} held` : ""]);
    const saved = m.saved_conversations
      ? lines([`${m.saved_conversations}, ${bytes(m.saved_bytes)}`, `${m.restores} restored`])
      : "0";
    const actions = el("td", null, "actions");
    const loaded = m.state === "loaded" || m.state === "loading";
    actions.append(loaded ? actionButton("Unload", m.name, "unload")
                          : actionButton("Load", m.name, "load"),
                   actionButton("Forget", m.name, "forget"));
    const tr = row([name, state, actions, el("td", m.kind || ""), memory, m.ctx_size || "",
                    loaded ? seconds(m.idle_seconds) : "",
                    m.ttl ? (loaded ? seconds(m.ttl_left) : `${m.ttl}s`) : "none",
                    m.in_flight, m.requests || 0,
                    loaded ? `${m.prompt_tokens} / ${m.predicted_tokens}` : "",
                    saved]);
    tr.dataset.model = m.name;
    tr.dataset.state = m.state;
    return tr;
  });
  replaceRows($("models").tBodies[0], rows);
  renderMemoryNow(status.memory);
  if (status.memory.history_version !== memoryVersion) {
    memoryVersion = status.memory.history_version;
    loadMemory();
  }
}

async function act(action, model, button) {
  if (action === "forget" &&
      !window.confirm(`Forget every saved conversation of ${model}?`)) return;
  const enc = encodeURIComponent(model);
  const [path, body] = {
    unload: [`/api/models/unload/${enc}`, null],
    load: ["/api/model_serve/load", JSON.stringify({ model })],
    forget: ["/api/model_serve/forget", JSON.stringify({ model })],
  }[action];
  button.disabled = true;
  notice(`${action}: ${model}…`);
  try {
    const response = await api(path, { method: "POST", body,
      headers: body ? { "Content-Type": "application/json" } : {} });
    if (!response.ok) {
      notice(`${action} ${model} failed: ${await errorText(response)}`, "error");
      return;
    }
    if (action === "forget") {
      const data = await response.json();
      notice(`Forgot ${data.saved_deleted} saved conversation(s) of ${model}.`);
    } else {
      notice(`${action === "unload" ? "Unloaded" : "Loaded"} ${model}.`);
    }
  } catch (err) {
    notice(`${action} ${model} failed: ${err.message}`, "error");
  } finally {
    button.disabled = false;
  }
}

// --- memory ----------------------------------------------------------------------------------
function renderMemoryNow(memory) {
  const used = $("memory-used");
  used.style.width = `${Math.min(100, memory.percent)}%`;
  used.classList.toggle("over", memory.percent >= memory.threshold_percent);
  $("memory-threshold").style.left = `${memory.threshold_percent}%`;
  const level = memory.pressure_level ? `, kernel pressure: ${memory.pressure_level}` : "";
  $("memory-text").textContent =
    `${bytes(memory.used_bytes)} of ${bytes(memory.total_bytes)} in use (${memory.percent}%); ` +
    `models are unloaded from ${memory.threshold_percent}% (MEMORY_PRESSURE_THRESHOLD)${level}`;
}

async function loadMemory() {
  try {
    const response = await api("/api/model_serve/memory");
    if (response.ok) { memoryHistory = await response.json(); drawMemory(); }
  } catch (err) { /* the event stream says when the server is gone */ }
}

function drawMemory() {
  const canvas = $("memory-plot");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  if (!memoryHistory) return;
  const now = Date.now() / 1000;
  const first = memoryHistory.samples.length ? memoryHistory.samples[0].at : now;
  // The last hour, or less while there is less: 5 minutes at least.
  const span = Math.min(3600, Math.max(300, now - first));
  const left = 40;
  const x = (at) => left + (w - left) * (1 - (now - at) / span);
  const y = (pct) => h - 4 - (pct / 100) * (h - 12);
  ctx.fillStyle = "#6b7075";
  ctx.font = "11px sans-serif";
  ctx.fillText("100%", 2, y(100) + 8);
  ctx.fillText("0%", 2, y(0));
  ctx.fillText(`-${Math.round(span / 60)} min`, left + 2, h - 6);
  ctx.strokeStyle = "#c92a2a";
  ctx.setLineDash([6, 4]);
  ctx.beginPath();
  ctx.moveTo(0, y(memoryHistory.threshold_percent));
  ctx.lineTo(w, y(memoryHistory.threshold_percent));
  ctx.stroke();
  ctx.setLineDash([]);
  // Models loaded: a grey step line, on the scale of the most loaded at once.
  const most = Math.max(1, ...memoryHistory.samples.map((s) => s.loaded));
  const yLoaded = (n) => h - 4 - (n / most) * (h - 12) * 0.5;
  ctx.strokeStyle = "#adb5bd";
  ctx.beginPath();
  memoryHistory.samples.forEach((s, i) => {
    if (i === 0) ctx.moveTo(x(s.at), yLoaded(s.loaded));
    else { ctx.lineTo(x(s.at), yLoaded(memoryHistory.samples[i - 1].loaded));
           ctx.lineTo(x(s.at), yLoaded(s.loaded)); }
  });
  ctx.stroke();
  for (const mark of memoryHistory.marks) {
    ctx.strokeStyle = mark.event === "load" ? "#2b8a3e" : "#c92a2a";
    ctx.setLineDash(mark.event === "crash" ? [3, 3] : []);
    ctx.beginPath();
    ctx.moveTo(x(mark.at), 0);
    ctx.lineTo(x(mark.at), h);
    ctx.stroke();
  }
  ctx.setLineDash([]);
  ctx.strokeStyle = "#1c6dd0";
  ctx.lineWidth = 2;
  ctx.beginPath();
  memoryHistory.samples.forEach((s, i) => {
    if (i === 0) ctx.moveTo(x(s.at), y(s.percent)); else ctx.lineTo(x(s.at), y(s.percent));
  });
  ctx.stroke();
  ctx.fillStyle = "#1c6dd0";
  for (const s of memoryHistory.samples) ctx.fillRect(x(s.at) - 2, y(s.percent) - 2, 4, 4);
  ctx.lineWidth = 1;
  const marks = memoryHistory.marks.slice(-20).reverse()
    .map((m) => el("li", `${clock(m.at)} ${m.event} ${m.model}${m.why ? ` (${m.why})` : ""}`));
  $("memory-marks").replaceChildren(...marks);
}

// --- activity --------------------------------------------------------------------------------
function renderRequests(news) {
  for (const r of news.done) requests.unshift(r);
  requests.length = Math.min(requests.length, REQUESTS_SHOWN);
  replaceRows($("requests").tBodies[0], requests.map((r) => {
    const status = el("td", r.status, r.status >= 400 ? "status-bad" : "");
    const tokens = r.prompt_tokens === null && r.predicted_tokens === null ? ""
      : `${r.prompt_tokens ?? ""} / ${r.predicted_tokens ?? ""}`;
    const tr = row([clock(r.at), el("td", r.model, "name"), r.path, status,
                    r.duration === null ? "" : `${r.duration.toFixed(2)}s`, tokens,
                    r.tokens_per_second ?? "", r.restored ? "yes" : ""]);
    tr.dataset.seq = r.seq;
    return tr;
  }));
  replaceRows($("waiting").tBodies[0], news.waiting.map((r) =>
    row([clock(r.at), el("td", r.model, "name"), r.path, seconds(r.waited), r.why])));
}

// --- log: its new lines come with the events, for a key that may read it ----------------------
const logLines = [];

function renderLog(data) {
  if (data.refused) {
    $("log-file").textContent = `The log is not shown: ${data.refused}`;
    return;
  }
  $("log-file").textContent = data.file;
  if (data.reset) logLines.length = 0;
  logLines.push(...data.lines);
  logLines.splice(0, Math.max(0, logLines.length - LOG_KEPT));
  const pre = $("log");
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.textContent = logLines.join("\n");
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

// --- start -----------------------------------------------------------------------------------
function start() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey($("key-input").value.trim());
    $("key-input").value = "";
  });
  $("key-forget").addEventListener("click", () => { setKey(""); });
  $("key-button").addEventListener("click", () => { askKey("Enter an API key for this server."); });
  follow();
  loadMemory();
  setInterval(() => { if (!document.hidden) loadMemory(); }, MEMORY_EVERY_MS);
}

start();
