// citygw console: a single page over the JSON API (see docs: console HTTP API).
// No framework: views build DOM with h(); each view has a load() that fetches and
// (re)renders its data part, so a live refresh keeps controls, focus and scroll.
"use strict";

const SEVERITY_ORDER = ["critical", "alarm", "major", "high", "warning", "warn", "minor", "medium", "low", "info"];
const EVENT_STATES = ["open", "raised", "acknowledged", "handling", "resolved", "all"];
const RANGES = ["1h", "6h", "24h", "7d", "30d"];
const LIVE_MIN_MS = 1000;
const LIVE_SETTLE_MS = 250;
const LIVE_RETRY_MS = 5000;

const session = { user: null, role: null, csrf: null };
let current = null; // {name, load, kinds, dispose?}
let liveSource = null;

// -- helpers ------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "testid") el.dataset.testid = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  append(el, children);
  return el;
}

function append(el, ...children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, v);
  return append(el, children);
}

const enc = encodeURIComponent;
const pad = (n) => String(n).padStart(2, "0");

function fmtTime(ms) {
  if (ms === null || ms === undefined) return "–";
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function fmtDur(ms) {
  if (ms === null || ms === undefined) return "–";
  const s = Math.round(Math.abs(ms) / 1000);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  const hr = Math.floor(m / 60);
  if (hr < 48) return `${hr} h ${m % 60} min`;
  return `${Math.floor(hr / 24)} d ${hr % 24} h`;
}

function fmtAgo(ms) {
  if (ms === null || ms === undefined) return "never";
  const d = Date.now() - ms;
  return d < 5000 ? "just now" : `${fmtDur(d)} ago`;
}

function fmtNum(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Number.isInteger(v)) return v.toLocaleString("en");
  return Number(v.toPrecision(digits)).toLocaleString("en", { maximumFractionDigits: 6 });
}

// A <time> refreshed by the 15 s ticker (relative) with the absolute time as its title.
function ago(ms) {
  return h("time", { "data-rel": ms ?? "", datetime: ms ? new Date(ms).toISOString() : null, title: fmtTime(ms) }, fmtAgo(ms));
}

function badge(cls, text) {
  return h("span", { class: `badge ${cls}` }, text);
}

function gwState(row) {
  return row.state || "never";
}

const pointHref = (gw, key) => `#/point/${enc(gw)}/${key.split("/").map(enc).join("/")}`;
const gatewayHref = (gw) => `#/gateway/${enc(gw)}`;
const canAct = () => session.role === "operator" || session.role === "admin";

function pointLabel(ev) {
  const key = ev.key || ev.point_key;
  return key ? h("a", { href: pointHref(ev.gateway, key) }, key) : `#${ev.point_id}`;
}

function bySeverity(obj) {
  return Object.entries(obj || {}).sort(
    ([a], [b]) => (SEVERITY_ORDER.indexOf(a) + 1 || 99) - (SEVERITY_ORDER.indexOf(b) + 1 || 99),
  );
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}

// -- API ----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && session.csrf) headers["X-CSRF-Token"] = session.csrf;
  const resp = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await resp.json();
  } catch {
    data = null;
  }
  if (resp.status === 401 && path !== "/api/login") {
    showLogin();
    throw new ApiError(401, "not signed in");
  }
  if (!resp.ok) throw new ApiError(resp.status, (data && data.error) || `${resp.status} ${resp.statusText}`);
  return data;
}

function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") p.set(k, v);
  const s = p.toString();
  return s ? `?${s}` : "";
}

// -- session ------------------------------------------------------------------------------

function setSession(data) {
  Object.assign(session, { user: data.user, role: data.role, csrf: data.csrf });
  document.getElementById("who").textContent = `${data.user} (${data.role})`;
  document.getElementById("logout").hidden = false;
  document.getElementById("nav").hidden = false;
}

function showLogin() {
  if (current && current.dispose) current.dispose();
  current = null;
  closeLive();
  Object.assign(session, { user: null, role: null, csrf: null });
  document.getElementById("view").replaceChildren();
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("login").hidden = false;
  document.getElementById("login-user").focus();
}

async function onLogin(e) {
  e.preventDefault();
  const err = document.getElementById("login-error");
  err.textContent = "";
  const f = e.target;
  try {
    const data = await api("/api/login", { method: "POST", body: { user: f.user.value, password: f.password.value } });
    f.password.value = "";
    setSession(data);
    document.getElementById("login").hidden = true;
    openLive();
    route();
  } catch (ex) {
    err.textContent = ex.status === 401 ? "Wrong user or password." : ex.message;
  }
}

async function onLogout() {
  try {
    await api("/api/logout", { method: "POST" });
  } finally {
    showLogin();
  }
}

// -- live ---------------------------------------------------------------------------------

function setLive(state, text) {
  const el = document.getElementById("live-status");
  el.dataset.state = state;
  el.textContent = text;
}

// Live changes are coalesced: a view reloads at most once per LIVE_MIN_MS (or its own
// minRefreshMs), and within LIVE_SETTLE_MS of the first change (a plain debounce would
// never fire while readings change every second).
const livePending = new Set();
let liveTimer = null;
let lastLiveLoad = 0;
let liveRetry = null;

function onLiveChange(kinds) {
  for (const k of kinds) livePending.add(k);
  if (liveTimer) return;
  const gap = Math.max(LIVE_MIN_MS, (current && current.minRefreshMs) || 0);
  const wait = Math.max(LIVE_SETTLE_MS, lastLiveLoad + gap - Date.now());
  liveTimer = setTimeout(() => {
    liveTimer = null;
    const pending = [...livePending];
    livePending.clear();
    if (current && pending.some((k) => current.kinds.includes(k))) refresh();
  }, wait);
}

function openLive() {
  closeLive();
  let missed = false;
  liveSource = new EventSource("/api/live");
  liveSource.onopen = () => {
    setLive("connected", "live");
    // Changes while disconnected were not announced: reload what is shown.
    if (missed) refresh();
  };
  liveSource.onerror = () => {
    missed = true;
    setLive("reconnecting", "reconnecting…");
    // The browser retries by itself unless the server answered with an error status
    // (e.g. 401 after the session expired): then check the session and retry later.
    if (liveSource.readyState === EventSource.CLOSED && !liveRetry) {
      liveRetry = setTimeout(() => {
        liveRetry = null;
        api("/api/session").then(openLive, (ex) => ex.status !== 401 && openLive());
      }, LIVE_RETRY_MS);
    }
  };
  liveSource.addEventListener("change", (e) => {
    try {
      onLiveChange(JSON.parse(e.data).kinds || []);
    } catch {
      // a malformed message: ignore it, the next one reloads the view
    }
  });
}

function closeLive() {
  if (liveSource) liveSource.close();
  liveSource = null;
  clearTimeout(liveRetry);
  liveRetry = null;
  setLive("off", "offline");
}

// One load at a time; a refresh asked for meanwhile runs once after it.
let loading = null;
let reloadAfter = false;

async function refresh() {
  if (loading) {
    reloadAfter = true;
    return loading;
  }
  const view = current;
  if (!view) return;
  loading = (async () => {
    try {
      await view.load();
      if (view !== current) return;
      // Any load counts as the latest: re-time a pending live reload from now, with
      // this view's interval (the previous view may have had a much longer one).
      lastLiveLoad = Date.now();
      if (liveTimer) {
        clearTimeout(liveTimer);
        liveTimer = null;
        onLiveChange([]);
      }
      const el = document.getElementById("last-update");
      el.textContent = fmtTime(Date.now()).slice(11);
      el.dateTime = new Date().toISOString();
    } catch (ex) {
      if (ex.status !== 401 && view === current) showViewError(ex);
    }
  })();
  await loading;
  loading = null;
  if (reloadAfter) {
    reloadAfter = false;
    await refresh();
  }
}

function showViewError(ex) {
  let el = document.getElementById("view-error");
  if (!el) {
    el = h("p", { id: "view-error", class: "error", role: "alert", testid: "view-error" });
    document.getElementById("view").prepend(el);
  }
  el.textContent = `Could not load: ${ex.message}`;
}

function clearViewError() {
  document.getElementById("view-error")?.remove();
}

// -- router -------------------------------------------------------------------------------

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  const parts = path.split("/").filter((p) => p !== "");
  return { parts, params: new URLSearchParams(query) };
}

function route() {
  if (!session.user) return;
  const { parts, params } = parseHash();
  const name = parts[0] || "overview";
  const dec = (s) => decodeURIComponent(s || "");
  if (current && current.dispose) current.dispose();
  const root = document.getElementById("view");
  root.replaceChildren();
  const views = {
    overview: () => overviewView(root),
    fleet: () => fleetView(root, params),
    gateway: () => gatewayView(root, dec(parts[1])),
    map: () => mapView(root),
    events: () => eventsView(root, params),
    event: () => eventView(root, dec(parts[1])),
    points: () => pointsView(root, params),
    point: () => pointView(root, dec(parts[1]), parts.slice(2).map(dec).join("/"), params),
  };
  const make = views[name] || views.overview;
  current = make();
  for (const a of document.querySelectorAll("#nav a")) {
    const active = a.dataset.route === name || (a.dataset.route + "s" === name) || (name === "gateway" && a.dataset.route === "fleet") || (name === "point" && a.dataset.route === "points") || (name === "event" && a.dataset.route === "events");
    if (active) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  refresh();
}

// -- overview -----------------------------------------------------------------------------

function overviewView(root) {
  const tiles = h("div", { class: "tiles", testid: "vitals", "aria-live": "polite" });
  const fleet = h("div", { class: "counts", testid: "fleet-counts" });
  const events = h("div", { class: "counts", testid: "event-counts" });
  const stats = h("p", { class: "muted", testid: "event-stats" });
  append(root, h("h1", {}, "Overview"), tiles, h("h2", {}, "Fleet"), fleet, h("h2", {}, "Open events"), events, stats);
  const count = (n, label, href, testid) =>
    h("a", { class: "count", href, testid }, h("b", {}, fmtNum(n ?? 0)), h("span", {}, label));
  return {
    kinds: ["readings", "alarms", "events", "gateways"],
    async load() {
      const d = await api("/api/overview");
      clearViewError();
      tiles.replaceChildren(
        ...d.vitals.map((v) =>
          h(
            "div",
            { class: `tile level-${v.level}`, testid: `vital-${v.id}`, "data-level": v.level, role: "group", "aria-label": v.name },
            h("div", { class: "name" }, h("span", {}, v.name), h("span", { class: "lvl" }, v.level === "none" ? "" : v.level)),
            h("div", { class: "value" }, v.value === null ? "–" : fmtNum(v.value), v.value !== null && v.unit ? h("span", { class: "unit" }, ` ${v.unit}`) : null),
            v.text ? h("div", { class: "text" }, v.text) : null,
            v.detail ? h("div", { class: "detail" }, v.detail) : null,
          ),
        ),
      );
      if (!d.vitals.length) tiles.replaceChildren(h("p", { class: "empty" }, "No vital signs configured."));
      const f = d.fleet;
      fleet.replaceChildren(
        count(f.gateways, "gateways", "#/fleet", "fleet-gateways"),
        count(f.online, "online", "#/fleet?state=online", "fleet-online"),
        count(f.offline, "offline", "#/fleet?state=offline", "fleet-offline"),
        count(f.never, "never seen", "#/fleet?state=never", "fleet-never"),
      );
      const s = d.events || {};
      const sev = bySeverity(s.open_by_severity ?? s.by_severity);
      const total = sev.reduce((a, [, n]) => a + n, 0);
      events.replaceChildren(
        count(total, "open", "#/events", "events-open"),
        ...sev.map(([k, n]) => {
          const c = count(n, k, "#/events", `events-${k}`);
          c.querySelector("b").className = `sev-${k}`;
          return c;
        }),
      );
      stats.textContent = s.count
        ? `Recently ${s.count} opened, ${s.acked ?? 0} acknowledged, ${s.resolved ?? 0} resolved; ` +
          `time to acknowledge median ${fmtDur(s.ack_median_ms)} (p90 ${fmtDur(s.ack_p90_ms)}), ` +
          `to resolve median ${fmtDur(s.resolve_median_ms)} (p90 ${fmtDur(s.resolve_p90_ms)}).`
        : "";
    },
  };
}

// -- fleet --------------------------------------------------------------------------------

const FLEET_COLUMNS = [
  { key: "gateway", label: "Gateway", get: (r) => r.gateway },
  { key: "site", label: "Site", get: (r) => r.site || "" },
  { key: "state", label: "State", get: (r) => gwState(r) },
  { key: "state_ms", label: "Since", get: (r) => r.state_ms ?? -1 },
  { key: "last_seen", label: "Last seen", get: (r) => r.last_seen_ms ?? -1 },
  { key: "backlog", label: "Backlog", num: true, get: (r) => r.stats?.backlog_points ?? -1 },
  { key: "evicted", label: "Evicted", num: true, get: (r) => r.stats?.evicted_points ?? -1 },
  { key: "lost", label: "Lost", num: true, get: (r) => r.stats?.lost_points ?? -1 },
  { key: "software", label: "Software", get: (r) => r.software || "" },
  { key: "config", label: "Config", get: (r) => r.config_version || "" },
  { key: "devices", label: "Devices ok", num: true, get: (r) => (r.devices_total ? r.devices_healthy / r.devices_total : 2) },
  { key: "open_events", label: "Open events", num: true, get: (r) => r.open_events ?? 0 },
];

function fleetView(root, params) {
  let rows = [];
  let sort = { key: params.get("sort") || "gateway", desc: params.get("desc") === "1" };
  const filter = h("input", { type: "search", id: "fleet-filter", testid: "fleet-filter", placeholder: "gateway, site, software, config", value: params.get("q") || "" });
  const state = h(
    "select",
    { id: "fleet-state", testid: "fleet-state" },
    ["", "online", "offline", "never"].map((s) => h("option", { value: s }, s || "all")),
  );
  state.value = params.get("state") || "";
  const head = h("tr");
  const body = h("tbody");
  const summary = h("span", { class: "muted", testid: "fleet-count", "aria-live": "polite" });
  append(
    root,
    h("h1", {}, "Fleet"),
    h("div", { class: "bar" }, h("label", { for: "fleet-filter" }, "Filter"), filter, h("label", { for: "fleet-state" }, "State"), state, summary),
    h("div", { class: "tablewrap" }, h("table", { testid: "fleet-table" }, h("thead", {}, head), body)),
  );
  const keepInHash = () => {
    const q = qs({ q: filter.value, state: state.value, sort: sort.key === "gateway" ? "" : sort.key, desc: sort.desc ? 1 : "" });
    history.replaceState(null, "", `#/fleet${q}`);
  };
  const renderHead = () =>
    head.replaceChildren(
      ...FLEET_COLUMNS.map((c) =>
        h(
          "th",
          { class: c.num ? "num" : null, "aria-sort": sort.key === c.key ? (sort.desc ? "descending" : "ascending") : null, scope: "col" },
          h(
            "button",
            {
              type: "button",
              testid: `fleet-sort-${c.key}`,
              onclick: () => {
                sort = { key: c.key, desc: sort.key === c.key ? !sort.desc : false };
                keepInHash();
                renderHead();
                renderBody();
              },
            },
            c.label,
          ),
        ),
      ),
    );
  const renderBody = () => {
    const q = filter.value.trim().toLowerCase();
    const col = FLEET_COLUMNS.find((c) => c.key === sort.key) || FLEET_COLUMNS[0];
    const shown = rows
      .filter((r) => !state.value || gwState(r) === state.value)
      .filter((r) => !q || [r.gateway, r.site, r.software, r.config_version].some((s) => (s || "").toLowerCase().includes(q)))
      .sort((a, b) => {
        const x = col.get(a);
        const y = col.get(b);
        const c = typeof x === "string" ? x.localeCompare(y) : x - y;
        return (sort.desc ? -c : c) || a.gateway.localeCompare(b.gateway);
      });
    summary.textContent = `${shown.length} of ${rows.length}`;
    body.replaceChildren(
      ...shown.map((r) => {
        const st = r.stats;
        const devBad = r.devices_total && r.devices_healthy < r.devices_total;
        return h(
          "tr",
          { testid: `fleet-row-${r.gateway}`, class: "clickable", onclick: (e) => { if (e.target.tagName !== "A") location.hash = gatewayHref(r.gateway); } },
          h("td", {}, h("a", { href: gatewayHref(r.gateway) }, r.gateway)),
          h("td", {}, r.site || ""),
          h("td", {}, badge(`st-${gwState(r)}`, gwState(r))),
          h("td", {}, r.state_ms ? ago(r.state_ms) : "–"),
          h("td", {}, ago(r.last_seen_ms)),
          h("td", { class: "num" }, st ? fmtNum(st.backlog_points) : "–"),
          h("td", { class: "num" }, st ? fmtNum(st.evicted_points) : "–"),
          h("td", { class: st && st.lost_points ? "num h-bad" : "num" }, st ? fmtNum(st.lost_points) : "–"),
          h("td", {}, r.software || "–"),
          h("td", { title: r.config_hash || "" }, r.config_version || "–"),
          h("td", { class: devBad ? "num h-bad" : "num" }, `${r.devices_healthy ?? 0}/${r.devices_total ?? 0}`),
          h("td", { class: "num" }, r.open_events ? h("a", { href: `#/events?gateway=${enc(r.gateway)}` }, r.open_events) : "0"),
        );
      }),
    );
    if (!shown.length) body.replaceChildren(h("tr", {}, h("td", { colspan: FLEET_COLUMNS.length, class: "empty" }, "No gateways match.")));
  };
  filter.addEventListener("input", () => { keepInHash(); renderBody(); });
  state.addEventListener("change", () => { keepInHash(); renderBody(); });
  renderHead();
  return {
    kinds: ["gateways", "events"],
    async load() {
      rows = (await api("/api/gateways")).gateways;
      clearViewError();
      renderBody();
    },
  };
}

// -- gateway ------------------------------------------------------------------------------

function eventsTable(events, testid) {
  const cols = ["Severity", "Gateway", "Point", "Rule", "State", "Opened", "To ack", "To resolve", "Raises"];
  const body = events.map((e) =>
    h(
      "tr",
      { testid: `event-row-${e.id}`, class: "clickable", onclick: (ev) => { if (ev.target.tagName !== "A") location.hash = `#/event/${e.id}`; } },
      h("td", {}, badge(`sev-${e.severity}`, e.severity)),
      h("td", {}, h("a", { href: gatewayHref(e.gateway) }, e.gateway)),
      h("td", {}, pointLabel(e)),
      h("td", {}, h("a", { href: `#/event/${e.id}` }, e.rule)),
      h("td", {}, badge(`ev-${e.state}`, e.state), e.cleared_ts === null && e.state !== "resolved" ? h("span", { class: "h-bad", title: "alarm active", "aria-label": "alarm active" }, " ●") : null),
      h("td", {}, ago(e.opened_ms)),
      h("td", { class: "num" }, e.acked_ms ? fmtDur(e.acked_ms - e.opened_ms) : "–"),
      h("td", { class: "num" }, e.resolved_ms ? fmtDur(e.resolved_ms - e.opened_ms) : "–"),
      h("td", { class: "num" }, e.raises),
    ),
  );
  return h(
    "div",
    { class: "tablewrap" },
    h(
      "table",
      { testid },
      h("thead", {}, h("tr", {}, cols.map((c, i) => h("th", { scope: "col", class: i >= 6 ? "num" : null }, c)))),
      h("tbody", {}, body.length ? body : h("tr", {}, h("td", { colspan: cols.length, class: "empty" }, "No events."))),
    ),
  );
}

function alarmsTable(alarms, testid) {
  if (!alarms.length) return h("p", { class: "empty", testid }, "No alarms in range.");
  return h(
    "div",
    { class: "tablewrap" },
    h(
      "table",
      { testid },
      h("thead", {}, h("tr", {}, ["Severity", "Point", "Rule", "Value", "Raised", "Cleared"].map((c) => h("th", { scope: "col" }, c)))),
      h(
        "tbody",
        {},
        alarms.map((a) =>
          h(
            "tr",
            {},
            h("td", {}, badge(`sev-${a.severity}`, a.severity)),
            h("td", {}, a.key ? h("a", { href: pointHref(a.gateway, a.key) }, a.key) : `#${a.point_id}`),
            h("td", {}, a.rule),
            h("td", { class: "num" }, fmtNum(a.value)),
            h("td", {}, fmtTime(a.raised_ts)),
            h("td", {}, a.cleared_ts === null ? h("strong", { class: "h-bad" }, "active") : fmtTime(a.cleared_ts)),
          ),
        ),
      ),
    ),
  );
}

function healthBadge(d) {
  if (d.healthy === null || d.healthy === undefined) return badge("h-unknown", "unknown");
  return badge(d.healthy ? "h-ok" : "h-bad", d.healthy ? "healthy" : "unhealthy");
}

function gatewayView(root, gw) {
  const title = h("h1", {}, "Gateway ", gw);
  const body = h("div");
  append(root, title, body);
  return {
    kinds: ["gateways", "events", "alarms"],
    async load() {
      const d = await api(`/api/gateways/${enc(gw)}`);
      clearViewError();
      const g = d.gateway;
      const st = g.stats;
      const loc = g.location ? `${fmtNum(g.location.lat, 7)}, ${fmtNum(g.location.lon, 7)}` : "–";
      body.replaceChildren(
        h(
          "dl",
          { class: "kv", testid: "gateway-info" },
          h("dt", {}, "State"), h("dd", {}, badge(`st-${gwState(g)}`, gwState(g)), " since ", g.state_ms ? ago(g.state_ms) : "–"),
          h("dt", {}, "Last seen"), h("dd", {}, ago(g.last_seen_ms)),
          h("dt", {}, "Site"), h("dd", {}, g.site || "–"),
          h("dt", {}, "Location"), h("dd", {}, loc),
          h("dt", {}, "Software"), h("dd", {}, g.software || "–"),
          h("dt", {}, "Config"), h("dd", { title: g.config_hash || "" }, g.config_version || "–"),
          h("dt", {}, "Backlog"), h("dd", {}, st ? `${fmtNum(st.backlog_points)} points in ${fmtNum(st.backlog_messages)} messages` : "–"),
          h("dt", {}, "Evicted / lost"), h("dd", {}, st ? `${fmtNum(st.evicted_points)} evicted, ${fmtNum(st.lost_points)} lost (stats ${fmtTime(st.ts)})` : "–"),
          h("dt", {}, "Devices"), h("dd", {}, `${g.devices_healthy ?? 0} healthy of ${g.devices_total ?? 0}`),
        ),
        h("h2", {}, "Devices"),
        devicesTable(d.devices),
        h("h2", {}, "Recent events"),
        eventsTable(d.events, "gateway-events"),
        h("h2", {}, "Alarms"),
        alarmsTable(d.alarms, "gateway-alarms"),
        h("h2", {}, "Config history"),
        configsTable(d.configs),
      );
    },
  };
}

// The configs a gateway reported running and the ones pushed to it, newest first.
function configsTable(configs) {
  const rows = [
    ...configs.seen.map((c) => ({ ms: c.last_seen_ms, cells: [fmtTime(c.first_seen_ms), "reported", c.version, c.running ? "running" : `until ${fmtTime(c.last_seen_ms)}`, ""], hash: c.hash })),
    ...configs.pushes.map((p) => ({ ms: p.pushed_ms, cells: [fmtTime(p.pushed_ms), `pushed by ${p.pushed_by}`, p.version, p.outcome, p.error || ""], hash: p.hash })),
  ].sort((a, b) => b.ms - a.ms);
  if (!rows.length) return h("p", { class: "empty" }, "No config reported or pushed.");
  return h(
    "div",
    { class: "tablewrap" },
    h(
      "table",
      { testid: "gateway-configs" },
      h("thead", {}, h("tr", {}, ["Time", "What", "Version", "Outcome", "Error"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows.map((r) => h("tr", { title: r.hash }, r.cells.map((c) => h("td", {}, c))))),
    ),
  );
}

function devicesTable(devices) {
  if (!devices.length) return h("p", { class: "empty" }, "No devices reported.");
  return h(
    "div",
    { class: "tablewrap" },
    h(
      "table",
      { testid: "devices" },
      h("thead", {}, h("tr", {}, ["Device", "Health", "Information", "Points"].map((c) => h("th", { scope: "col" }, c)))),
      h(
        "tbody",
        {},
        devices.map((d) =>
          h(
            "tr",
            { testid: `device-row-${d.device}` },
            h("td", {}, h("strong", {}, d.device)),
            h(
              "td",
              {},
              healthBadge(d),
              d.since_ms ? h("div", { class: "muted" }, "since ", ago(d.since_ms)) : null,
              d.error ? h("div", { class: "h-bad" }, d.error) : null,
            ),
            h(
              "td",
              {},
              h("ul", { class: "plain" }, Object.entries(d.info || {}).map(([k, v]) => h("li", {}, h("span", { class: "muted" }, `${k}: `), v))),
            ),
            h(
              "td",
              { class: "pts" },
              (d.points || []).map((p) =>
                h("a", { href: pointHref(p.gateway, p.key), title: p.key }, p.name || p.key, p.unit ? h("span", { class: "muted" }, ` ${p.unit}`) : null),
              ),
            ),
          ),
        ),
      ),
    ),
  );
}

// -- map ----------------------------------------------------------------------------------

const MAP_W = 1000;
const MAP_H = 620;
const MAP_PAD = 50;

// Grid step: the "nice" value (1, 2, 5 x 10^n degrees) giving about 6 lines over `span`.
function niceStep(span) {
  const raw = span / 6;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw);
}

const MAP_LABELS_MAX = 60;

function mapView(root) {
  const holder = h("div", { testid: "map" });
  const unplaced = h("p", { class: "muted", testid: "map-unplaced" });
  append(
    root,
    h("h1", {}, "Map"),
    h(
      "div",
      { class: "legend" },
      h("span", {}, h("span", { class: "dot", style: "background:var(--ok)" }), "online"),
      h("span", {}, h("span", { class: "dot", style: "background:var(--alarm)" }), "offline"),
      h("span", {}, h("span", { class: "dot", style: "background:var(--none)" }), "never seen"),
      h("span", {}, "■ device (colour: health)"),
    ),
    holder,
    unplaced,
  );
  const colour = { online: "var(--ok)", offline: "var(--alarm)", never: "var(--none)" };
  const devColour = (d) => (d.healthy === true ? "var(--ok)" : d.healthy === false ? "var(--alarm)" : "var(--none)");
  return {
    kinds: ["gateways"],
    async load() {
      const data = await api("/api/map");
      const rows = data.gateways;
      const byGw = new Map(rows.map((r) => [r.gateway, r]));
      clearViewError();
      const valid = (l) => l && Number.isFinite(l.lat) && Number.isFinite(l.lon);
      const gws = rows.filter((r) => valid(r.location));
      const devs = [];
      for (const d of data.devices) if (valid(d.location) && byGw.has(d.gateway)) devs.push({ gw: byGw.get(d.gateway), d });
      const all = [...gws.map((r) => r.location), ...devs.map((x) => x.d.location)];
      const missing = rows.filter((r) => !valid(r.location)).map((r) => r.gateway);
      unplaced.replaceChildren();
      if (missing.length) append(unplaced, "Without a location: ", missing.map((g, i) => [i ? ", " : "", h("a", { href: gatewayHref(g) }, g)]));
      if (!all.length) {
        holder.replaceChildren(h("p", { class: "empty" }, "No gateway has a location."));
        return;
      }
      let [lat0, lat1] = [Math.min(...all.map((l) => l.lat)), Math.max(...all.map((l) => l.lat))];
      let [lon0, lon1] = [Math.min(...all.map((l) => l.lon)), Math.max(...all.map((l) => l.lon))];
      // Equirectangular with the mid-latitude's scale, so distances look right locally.
      const kx = Math.cos((((lat0 + lat1) / 2) * Math.PI) / 180);
      const minSpan = 0.005;
      if (lat1 - lat0 < minSpan) [lat0, lat1] = [lat0 - minSpan / 2, lat1 + minSpan / 2];
      if (lon1 - lon0 < minSpan) [lon0, lon1] = [lon0 - minSpan / 2, lon1 + minSpan / 2];
      const scale = Math.min((MAP_W - 2 * MAP_PAD) / ((lon1 - lon0) * kx), (MAP_H - 2 * MAP_PAD) / (lat1 - lat0));
      const cx = (lon0 + lon1) / 2;
      const cy = (lat0 + lat1) / 2;
      const X = (lon) => MAP_W / 2 + (lon - cx) * kx * scale;
      const Y = (lat) => MAP_H / 2 - (lat - cy) * scale;
      const grid = [];
      const vLat = (MAP_H / 2) / scale;
      const vLon = (MAP_W / 2) / (scale * kx);
      const step = niceStep(Math.max(2 * vLat, 2 * vLon * kx));
      const digits = Math.max(0, -Math.floor(Math.log10(step)));
      for (let lat = Math.ceil((cy - vLat) / step) * step; lat <= cy + vLat; lat += step) {
        grid.push(svg("line", { class: "grid", x1: 0, x2: MAP_W, y1: Y(lat), y2: Y(lat) }));
        grid.push(svg("text", { class: "glabel", x: 4, y: Y(lat) - 3 }, `${lat.toFixed(digits)}°`));
      }
      for (let lon = Math.ceil((cx - vLon) / step) * step; lon <= cx + vLon; lon += step) {
        grid.push(svg("line", { class: "grid", y1: 0, y2: MAP_H, x1: X(lon), x2: X(lon) }));
        grid.push(svg("text", { class: "glabel", x: X(lon) + 3, y: MAP_H - 5 }, `${lon.toFixed(digits)}°`));
      }
      const links = [];
      const devMarks = devs.map(({ gw, d }) => {
        const [x, y] = [X(d.location.lon), Y(d.location.lat)];
        if (valid(gw.location)) links.push(svg("line", { class: "link", x1: X(gw.location.lon), y1: Y(gw.location.lat), x2: x, y2: y }));
        return svg(
          "rect",
          { x: x - 4, y: y - 4, width: 8, height: 8, fill: devColour(d), "data-testid": `map-device-${gw.gateway}-${d.device}` },
          svg("title", {}, `${gw.gateway} / ${d.device}: ${d.healthy === false ? "unhealthy" : d.healthy ? "healthy" : "unknown"}`),
        );
      });
      // a city's fleet is thousands of markers: small and unlabelled then (the name is in
      // each marker's title), and the ones needing attention drawn last, on top
      const dense = gws.length > MAP_LABELS_MAX;
      const attention = (r) => (gwState(r) !== "online" ? 2 : r.open_events ? 1 : 0);
      const gwMarks = [...gws].sort((a, b) => attention(a) - attention(b)).map((r) => {
        const [x, y] = [X(r.location.lon), Y(r.location.lat)];
        const label = `${r.gateway}: ${gwState(r)}${r.open_events ? `, ${r.open_events} open events` : ""}`;
        return svg(
          "a",
          { href: gatewayHref(r.gateway), "aria-label": label, "data-testid": `map-gw-${r.gateway}` },
          svg("title", {}, label),
          svg("circle", {
            cx: x,
            cy: y,
            r: dense ? 4 : 8,
            fill: colour[gwState(r)],
            stroke: r.open_events ? "var(--warn)" : "#10151a",
            "stroke-width": dense ? 1 : 2,
          }),
          dense ? null : svg("text", { class: "gw", x: x + 11, y: y + 4 }, r.gateway),
        );
      });
      holder.replaceChildren(
        svg("svg", { class: "map", viewBox: `0 0 ${MAP_W} ${MAP_H}`, role: "img", "aria-label": `Map of ${gws.length} gateways` }, grid, links, devMarks, gwMarks),
      );
    },
  };
}

// -- events -------------------------------------------------------------------------------

function eventsView(root, params) {
  let state = params.get("state") || "open";
  const gateway = params.get("gateway") || "";
  let events = [];
  let more = false;
  const LIMIT = 200;
  const tabs = h("div", { class: "tabs", role: "group", "aria-label": "Event state" });
  const summary = h("div", { class: "counts", testid: "events-summary" });
  const table = h("div");
  const older = h("button", { type: "button", testid: "events-older", hidden: true, onclick: () => fetchPage(true) }, "Older events");
  append(root, h("h1", {}, "Events", gateway ? ` of ${gateway}` : ""), summary, tabs, table, older);
  const renderTabs = () =>
    tabs.replaceChildren(
      ...EVENT_STATES.map((s) =>
        h(
          "button",
          {
            type: "button",
            "aria-pressed": s === state ? "true" : "false",
            testid: `events-tab-${s}`,
            onclick: () => {
              state = s;
              history.replaceState(null, "", `#/events${qs({ state: s === "open" ? "" : s, gateway })}`);
              renderTabs();
              refresh();
            },
          },
          s,
        ),
      ),
    );
  const fetchPage = async (append_) => {
    const before = append_ && events.length ? events[events.length - 1].id : null;
    const d = await api(`/api/events${qs({ state, gateway, limit: LIMIT, before })}`);
    clearViewError();
    events = append_ ? [...events, ...d.events] : d.events;
    more = d.events.length === LIMIT;
    older.hidden = !more;
    table.replaceChildren(eventsTable(events, "events-table"));
    const s = d.summary || {};
    const st = s.open_by_state ?? s.by_state ?? {};
    summary.replaceChildren(
      ...["raised", "acknowledged", "handling"].map((k) =>
        h("div", { class: "count", testid: `events-open-${k}` }, h("b", { class: `ev-${k}` }, fmtNum(st[k] ?? 0)), h("span", {}, k)),
      ),
      h("div", { class: "count" }, h("b", {}, fmtDur(s.ack_median_ms)), h("span", {}, `median to ack (p90 ${fmtDur(s.ack_p90_ms)})`)),
      h("div", { class: "count" }, h("b", {}, fmtDur(s.resolve_median_ms)), h("span", {}, `median to resolve (p90 ${fmtDur(s.resolve_p90_ms)})`)),
    );
  };
  renderTabs();
  return { kinds: ["events"], load: () => fetchPage(false) };
}

function eventView(root, id) {
  const title = h("h1", {}, `Event ${id}`);
  const info = h("div");
  const history_ = h("div");
  const actions = h("div", { class: "actions", testid: "event-actions" });
  const error = h("p", { class: "error", role: "alert", testid: "event-error" });
  append(root, title, h("div", { class: "cols" }, h("div", {}, info, actions, error), h("div", {}, h("h2", {}, "History"), history_)));
  let event = null;
  const act = async (action, body) => {
    error.textContent = "";
    const buttons = actions.querySelectorAll("button");
    buttons.forEach((b) => (b.disabled = true));
    try {
      await api(`/api/events/${enc(id)}/${action}`, { method: "POST", body });
      event = null; // re-render the actions from the new state
      await refresh();
    } catch (ex) {
      if (ex.status === 401) return;
      error.textContent = ex.status === 409 ? `Not done: ${ex.message}` : ex.status === 403 ? `Not allowed: ${ex.message}` : ex.message;
      buttons.forEach((b) => (b.disabled = false));
      // A conflict means someone else changed the event: show what it is now.
      if (ex.status === 409) await refresh();
    }
  };
  const renderActions = () => {
    actions.replaceChildren();
    if (!canAct() || !event || event.state === "resolved") return;
    const raised = event.state === "raised";
    const field = (name, label, attrs = {}) => {
      const fid = `ev-${name}`;
      return [h("label", { for: fid }, label), h("input", { id: fid, name, testid: `event-${name}-input`, ...attrs })];
    };
    const form = (testid, onsubmit, ...children) =>
      h("form", { testid, onsubmit: (e) => { e.preventDefault(); onsubmit(e.target); } }, children);
    append(
      actions,
      h("h2", {}, "Actions"),
      h("div", { class: "bar" },
        h("button", { type: "button", class: "primary", testid: "event-ack", disabled: !raised, onclick: () => act("ack", {}) }, "Acknowledge"),
      ),
      form("event-assign-form", (f) => act("assign", { assignee: f.assignee.value, note: f.assign_note.value || undefined }),
        ...field("assignee", "Assignee", { required: true, value: event.assignee || "" }),
        h("span"),
        ...field("assign_note", "Note"),
        h("button", { type: "submit", testid: "event-assign" }, "Assign")),
      form("event-note-form", (f) => act("note", { note: f.note.value }),
        ...field("note", "Note", { required: true }),
        h("button", { type: "submit", testid: "event-note" }, "Add note")),
      form("event-resolve-form", (f) => act("resolve", { note: f.resolve_note.value || undefined }),
        ...field("resolve_note", "Note"),
        h("button", { type: "submit", testid: "event-resolve" }, "Resolve")),
    );
  };
  const view = {
    kinds: ["events"],
    async load() {
      const d = await api(`/api/events/${enc(id)}`);
      clearViewError();
      const e = d.event;
      // The allowed actions depend on the state only: keep what an operator is typing.
      const changed = !event || event.state !== e.state;
      event = e;
      title.replaceChildren(badge(`sev-${e.severity}`, e.severity), " ", e.rule, h("span", { class: "muted" }, ` · event ${e.id}`));
      info.replaceChildren(
        h(
          "dl",
          { class: "kv", testid: "event-info" },
          h("dt", {}, "State"), h("dd", {}, h("span", { class: `badge ev-${e.state}`, testid: "event-state" }, e.state)),
          h("dt", {}, "Gateway"), h("dd", {}, h("a", { href: gatewayHref(e.gateway) }, e.gateway)),
          h("dt", {}, "Point"), h("dd", {}, pointLabel(e)),
          h("dt", {}, "Value"), h("dd", {}, fmtNum(e.value)),
          h("dt", {}, "Opened"), h("dd", {}, fmtTime(e.opened_ms), h("span", { class: "muted" }, ` (gateway ${fmtTime(e.opened_ts)})`)),
          h("dt", {}, "Last raised"), h("dd", {}, fmtTime(e.last_raised_ts), ` · ${e.raises} raise${e.raises === 1 ? "" : "s"}`),
          h("dt", {}, "Alarm"), h("dd", {}, e.cleared_ts === null ? h("strong", { class: "h-bad" }, "active") : `cleared ${fmtTime(e.cleared_ts)}`),
          h("dt", {}, "Acknowledged"), h("dd", {}, e.acked_ms ? `${e.acked_by}, after ${fmtDur(e.acked_ms - e.opened_ms)}` : "–"),
          h("dt", {}, "Assignee"), h("dd", { testid: "event-assignee" }, e.assignee || "–"),
          h("dt", {}, "Resolved"), h("dd", {}, e.resolved_ms ? `${e.resolved_by}, after ${fmtDur(e.resolved_ms - e.opened_ms)}` : "–"),
        ),
      );
      history_.replaceChildren(
        h(
          "table",
          { testid: "event-history" },
          h("thead", {}, h("tr", {}, ["Time", "User", "Action", "Note"].map((c) => h("th", { scope: "col" }, c)))),
          h(
            "tbody",
            {},
            d.actions.map((a) =>
              h("tr", { testid: "event-action" }, h("td", {}, fmtTime(a.ts_ms)), h("td", {}, a.user), h("td", {}, a.action), h("td", {}, a.note || "")),
            ),
          ),
        ),
      );
      if (changed || !actions.childElementCount) renderActions();
    },
  };
  return view;
}

// -- points -------------------------------------------------------------------------------

function pointsView(root, params) {
  const input = h("input", { type: "search", id: "points-q", testid: "points-search", placeholder: "key, e.g. noise/laeq", value: params.get("q") || "", autocomplete: "off" });
  const gw = h("input", { type: "search", id: "points-gw", testid: "points-gateway", placeholder: "any", value: params.get("gateway") || "" });
  const results = h("div", { "aria-live": "polite" });
  append(
    root,
    h("h1", {}, "Points"),
    h("div", { class: "bar", role: "search" }, h("label", { for: "points-q" }, "Search"), input, h("label", { for: "points-gw" }, "Gateway"), gw),
    results,
  );
  const view = {
    kinds: [],
    async load() {
      history.replaceState(null, "", `#/points${qs({ q: input.value, gateway: gw.value })}`);
      const d = await api(`/api/points${qs({ q: input.value.trim(), gateway: gw.value.trim(), limit: 100 })}`);
      clearViewError();
      if (!d.points.length) {
        results.replaceChildren(h("p", { class: "empty" }, "No points match."));
        return;
      }
      results.replaceChildren(
        h(
          "table",
          { testid: "points-table" },
          h("thead", {}, h("tr", {}, ["Point", "Gateway", "Name", "Unit", "Driver", "Type", "Updated"].map((c) => h("th", { scope: "col" }, c)))),
          h(
            "tbody",
            {},
            d.points.map((p) =>
              h(
                "tr",
                { testid: `point-row-${p.gateway}-${p.key}` },
                h("td", {}, h("a", { href: pointHref(p.gateway, p.key) }, p.key)),
                h("td", {}, h("a", { href: gatewayHref(p.gateway) }, p.gateway)),
                h("td", {}, p.name || ""),
                h("td", {}, p.unit || ""),
                h("td", {}, p.driver || ""),
                h("td", {}, p.type || ""),
                h("td", {}, p.updated_ms ? ago(p.updated_ms) : "–"),
              ),
            ),
          ),
        ),
      );
    },
  };
  const search = debounce(() => refresh(), 250);
  input.addEventListener("input", search);
  gw.addEventListener("input", search);
  setTimeout(() => input.focus());
  return view;
}

// -- point (plot) -------------------------------------------------------------------------

// x axis: 24 h clock, the date under the first tick of each day.
function xTicks(u, splits, axisIdx, space, incr) {
  let prevDay = null;
  return splits.map((v) => {
    const s = fmtTime(v);
    const day = s.slice(5, 10);
    const time = s.slice(11, incr < 60000 ? 19 : 16);
    const out = incr >= 86400000 ? day : day !== prevDay ? `${time}\n${day}` : time;
    prevDay = day;
    return out;
  });
}

const RELATED_COLOURS = ["#f4a261", "#c77dff", "#ef476f", "#06d6a0", "#ffd166"];

function toLocalInput(ms) {
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function pointView(root, gw, key, params) {
  // range: {rel: "24h"} ends at now (live tail) or {since, until} fixed (ms)
  let range = params.get("since") && params.get("until")
    ? { since: Number(params.get("since")), until: Number(params.get("until")) }
    : { rel: RANGES.includes(params.get("range")) ? params.get("range") : "24h" };
  const shown = new Set((params.get("related") || "").split(",").filter(Boolean));
  let plot = null;
  const title = h("h1", {}, key, h("span", { class: "muted" }, " on "), h("a", { href: gatewayHref(gw) }, gw));
  const rangeBar = h("div", { class: "bar", role: "group", "aria-label": "Range" });
  const from = h("input", { type: "datetime-local", id: "range-from", testid: "range-from" });
  const to = h("input", { type: "datetime-local", id: "range-to", testid: "range-to" });
  const related = h("div", { class: "bar", role: "group", "aria-label": "Related series", testid: "related" });
  const plotEl = h("div", { class: "plot", testid: "plot", role: "img", "aria-label": `Plot of ${key}` });
  const info = h("p", { class: "muted", testid: "plot-info", "aria-live": "polite" });
  const csv = h("a", { testid: "csv-link", download: "" }, "Export CSV");
  const alarms = h("div");
  append(root, title, rangeBar, related, plotEl, h("div", { class: "bar" }, info, h("span", { class: "spacer" }), csv), h("h2", {}, "Alarms in range"), alarms);

  const rangeParams = () => (range.rel ? { since: range.rel } : { since: range.since, until: range.until });
  const keepInHash = () => {
    const q = range.rel ? { range: range.rel === "24h" ? "" : range.rel } : { since: range.since, until: range.until };
    history.replaceState(null, "", `${pointHref(gw, key)}${qs({ ...q, related: [...shown].join(",") })}`);
  };
  const setRange = (r) => {
    range = r;
    keepInHash();
    renderRangeBar();
    refresh();
  };
  const renderRangeBar = () => {
    rangeBar.replaceChildren(
      ...RANGES.map((r) =>
        h("button", { type: "button", testid: `range-${r}`, "aria-pressed": range.rel === r ? "true" : "false", onclick: () => setRange({ rel: r }) }, r),
      ),
      h("label", { for: "range-from" }, "From"), from,
      h("label", { for: "range-to" }, "To"), to,
      h("button", {
        type: "button",
        testid: "range-apply",
        onclick: () => {
          const [s, u] = [new Date(from.value).getTime(), new Date(to.value).getTime()];
          if (Number.isFinite(s) && Number.isFinite(u) && s < u) setRange({ since: s, until: u });
          else info.textContent = "Choose a From before the To.";
        },
      }, "Apply"),
    );
  };
  renderRangeBar();

  const fullKey = (r) => (r.startsWith(":") ? key + r : r);
  const fetchSeries = (k) =>
    api(`/api/series${qs({ gateway: gw, point: k, ...rangeParams(), width: Math.max(100, Math.min(4000, Math.round(plotEl.clientWidth || 800))) })}`);

  let xRange = [0, 1]; // read by the plot's x scale, so an in-place update slides it too
  const draw = (main, extra) => {
    xRange = [main.since_ms, main.until_ms];
    const tables = [[main.t, main.min, main.max, main.mean], ...extra.map((x) => [x.d.t, x.d.mean])];
    const data = tables.length > 1 ? uPlot.join(tables) : tables[0];
    const unit = main.unit || "";
    const fmt = (u, v) => (v === null || v === undefined ? "–" : `${fmtNum(v, 4)} ${unit}`);
    const raw = main.bucket_ms === 0;
    const series = [
      { value: (u, v) => (v === null ? "–" : fmtTime(v)) },
      { label: raw ? "value" : "min", stroke: "rgba(91,155,213,.5)", width: 1, value: fmt, show: !raw },
      { label: "max", stroke: "rgba(91,155,213,.5)", width: 1, value: fmt, show: !raw },
      { label: raw ? "value" : "mean", stroke: "#8cc4ff", width: 2, value: fmt },
      ...extra.map((x, i) => ({ label: x.label, stroke: RELATED_COLOURS[i % RELATED_COLOURS.length], width: 1.5, value: fmt })),
    ];
    const marks = main.alarms || [];
    const alarmPlugin = {
      hooks: {
        draw: (u) => {
          const { ctx, bbox } = u;
          ctx.save();
          for (const a of marks) {
            const x0 = u.valToPos(a.raised_ts, "x", true);
            const x1 = a.cleared_ts === null ? bbox.left + bbox.width : u.valToPos(a.cleared_ts, "x", true);
            ctx.fillStyle = "rgba(229,83,75,.08)";
            ctx.fillRect(Math.max(x0, bbox.left), bbox.top, Math.max(0, Math.min(x1, bbox.left + bbox.width) - Math.max(x0, bbox.left)), bbox.height);
            ctx.lineWidth = 1.5 * devicePixelRatio;
            for (const [x, colour] of [[x0, "#e5534b"], [a.cleared_ts === null ? null : x1, "#3fb27f"]]) {
              if (x === null || x < bbox.left || x > bbox.left + bbox.width) continue;
              ctx.strokeStyle = colour;
              ctx.setLineDash([5 * devicePixelRatio, 4 * devicePixelRatio]);
              ctx.beginPath();
              ctx.moveTo(x, bbox.top);
              ctx.lineTo(x, bbox.top + bbox.height);
              ctx.stroke();
            }
          }
          ctx.restore();
        },
      },
    };
    const opts = {
      width: plotEl.clientWidth - 10,
      height: 400,
      ms: 1,
      scales: { x: { time: true, range: () => xRange } },
      axes: [
        { stroke: "#8d99a6", grid: { stroke: "#2c343d" }, ticks: { stroke: "#2c343d" }, values: xTicks, space: 60 },
        { stroke: "#8d99a6", grid: { stroke: "#2c343d" }, ticks: { stroke: "#2c343d" }, label: unit, size: 60 },
      ],
      series,
      bands: raw ? [] : [{ series: [2, 1], fill: "rgba(91,155,213,.22)" }],
      cursor: { drag: { x: true, y: false, setScale: false } },
      hooks: {
        setSelect: [
          (u) => {
            if (u.select.width < 5) return;
            const s = Math.round(u.posToVal(u.select.left, "x"));
            const e = Math.round(u.posToVal(u.select.left + u.select.width, "x"));
            u.setSelect({ width: 0 }, false);
            setRange({ since: s, until: e });
          },
        ],
      },
      plugins: [alarmPlugin],
    };
    // Same shape (same series) -> update in place, keeping the legend and cursor.
    const shape = series.map((s) => s.label).join("|");
    if (plot && plot._shape === shape) {
      plot.setData(data);
      return;
    }
    if (plot) plot.destroy();
    plot = new uPlot(opts, data, plotEl);
    plot._shape = shape;
  };

  const resize = debounce(() => plot && plot.setSize({ width: plotEl.clientWidth - 10, height: 400 }), 200);
  window.addEventListener("resize", resize);

  const view = {
    kinds: [], // set below: live only while the range ends at now
    dispose() {
      window.removeEventListener("resize", resize);
      if (plot) plot.destroy();
      plot = null;
    },
    async load() {
      view.kinds = range.rel ? ["readings", "alarms"] : [];
      const main = await fetchSeries(key);
      // A new reading changes a bucket of bucket_ms: no point reloading much faster.
      view.minRefreshMs = Math.min(60000, main.bucket_ms);
      const extra = await Promise.all(
        [...shown].filter((r) => (main.related || []).includes(r)).map(async (r) => ({ label: r, d: await fetchSeries(fullKey(r)) })),
      );
      clearViewError();
      if (![from, to].includes(document.activeElement)) {
        from.value = toLocalInput(main.since_ms);
        to.value = toLocalInput(main.until_ms);
      }
      related.replaceChildren(
        ...(main.related || []).length ? [h("span", { class: "muted" }, "Related:")] : [],
        ...(main.related || []).map((r) => {
          const id = `rel-${r.replace(/[^\w-]/g, "_")}`;
          return h(
            "label",
            {},
            h("input", {
              type: "checkbox",
              id,
              testid: `related-${r}`,
              checked: shown.has(r),
              onchange: (e) => {
                if (e.target.checked) shown.add(r);
                else shown.delete(r);
                keepInHash();
                refresh();
              },
            }),
            " ",
            r,
          );
        }),
      );
      draw(main, extra);
      const vals = main.mean.filter((v) => v !== null);
      const bucket = main.bucket_ms ? `${fmtDur(main.bucket_ms)} buckets (min/max band, mean line)` : "raw readings";
      info.textContent = `${fmtTime(main.since_ms)} – ${fmtTime(main.until_ms)} · ${main.t.length} ${bucket}` +
        (vals.length ? ` · latest ${fmtNum(vals[vals.length - 1], 4)} ${main.unit || ""}` : " · no data");
      plotEl.setAttribute("aria-label", `Plot of ${key}: ${info.textContent}`);
      csv.href = `/api/series.csv${qs({ gateway: gw, point: key, ...rangeParams() })}`;
      alarms.replaceChildren(alarmsTable(main.alarms || [], "point-alarms"));
    },
  };
  return view;
}

// -- start --------------------------------------------------------------------------------

function tickRelative() {
  for (const el of document.querySelectorAll("time[data-rel]")) {
    if (el.dataset.rel) el.textContent = fmtAgo(Number(el.dataset.rel));
  }
}

async function start() {
  document.getElementById("login-form").addEventListener("submit", onLogin);
  document.getElementById("logout").addEventListener("click", onLogout);
  window.addEventListener("hashchange", route);
  setInterval(tickRelative, 15000);
  try {
    setSession(await api("/api/session"));
  } catch (ex) {
    if (ex.status !== 401) document.getElementById("login-error").textContent = ex.message;
    showLogin();
    return;
  }
  openLive();
  route();
}

start();
