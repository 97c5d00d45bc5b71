// Hangar's status page. The page holds no data: it polls the /v1 API every
// 2 s with the token given (kept in this tab's sessionStorage, sent only as
// an Authorization header, never in a URL) and shows what that token may
// see. Everything from the server is put in the page as text, never as HTML.
"use strict";

const TOKEN_KEY = "hangar-token";
const REFRESH_MS = 2000;
// A pool's cache snapshots are a listing of the cloud: asked for far less
// often than the rest.
const CACHE_REFRESH_MS = 30000;
// Relative to /ui/, so that the page also works behind a path prefix.
const API = "../v1/";

let generation = 0; // bumped when the token changes: answers for an older token are dropped
let timer = null;
let loginShown = false;
// admin: true or false once an admin-only route has answered, null before.
let cache = { at: 0, rows: [], admin: null };

const $ = (sel) => document.querySelector(sel);

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

class Unauthorized extends Error {}

async function api(path) {
  const headers = { Accept: "application/json" };
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const resp = await fetch(API + path, { headers, cache: "no-store", credentials: "omit" });
  let body = null;
  try {
    body = await resp.json();
  } catch (e) {
    body = null;
  }
  return { status: resp.status, body };
}

function apiMessage(r) {
  return (r.body && r.body.error) || "HTTP " + r.status;
}

// ---- formatting ----

function parseTime(s) {
  if (!s) return null;
  const t = Date.parse(s);
  // Go's zero time is what an unset time encodes as.
  if (isNaN(t) || new Date(t).getUTCFullYear() <= 1) return null;
  return t;
}

function duration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + pad(s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + pad(Math.floor(s / 60) % 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor(s / 3600) % 24 + "h";
}

function age(s) {
  const t = parseTime(s);
  return t === null ? "" : duration(Date.now() - t);
}

function until(s) {
  const t = parseTime(s);
  if (t === null) return "";
  const d = t - Date.now();
  return d > 0 ? "in " + duration(d) : "due";
}

function clock(s) {
  const t = parseTime(s);
  return t === null ? "" : new Date(t).toLocaleTimeString([], { hour12: false });
}

// ---- DOM helpers ----

// cell makes a <td>; v is text, or {text, cls, title}.
function cell(v) {
  const td = document.createElement("td");
  if (v !== null && typeof v === "object") {
    td.textContent = v.text === undefined || v.text === null ? "" : String(v.text);
    if (v.cls) td.className = v.cls;
    if (v.title) td.title = v.title;
  } else {
    td.textContent = v === undefined || v === null ? "" : String(v);
  }
  return td;
}

function fillTable(section, rows, empty) {
  const tbody = $(section + " tbody");
  const width = $(section + " thead tr").children.length;
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell({ text: empty, cls: "empty" });
    td.colSpan = width;
    tr.append(td);
    tbody.replaceChildren(tr);
    return;
  }
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells.map(cell));
    return tr;
  }));
}

// fillOr fills a section from an API answer, or says why it cannot.
function fillOr(section, resp, key, toRows, empty) {
  if (resp.status === 403) {
    fillTable(section, [], "Needs an admin token.");
    $(section + " tbody td").className = "empty denied";
    return;
  }
  if (resp.status !== 200 || !resp.body) {
    fillTable(section, [], "Not available: " + apiMessage(resp));
    return;
  }
  fillTable(section, toRows(resp.body[key] || []), empty);
}

// ---- sections ----

const poolFields = new Set(["name", "provider", "min_idle", "max_instances", "instances", "leases_active",
  "leases_pending", "launch_error", "launch_blocked", "launch_retry_at", "image", "image_copy", "scaled", "config"]);

function states(m) {
  const parts = Object.keys(m || {}).sort().map((s) => m[s] + " " + s);
  return parts.length ? parts.join(", ") : "none";
}

function poolRows(pools) {
  return pools.map((p) => {
    const notes = [];
    let cls = "";
    if (p.launch_blocked) {
      notes.push("LAUNCHES STOPPED (quota)");
      cls = "error-text";
    }
    if (p.launch_error) {
      notes.push("launch error: " + p.launch_error);
      cls = "error-text";
    }
    if (p.launch_retry_at) notes.push("retry " + until(p.launch_retry_at));
    if (p.scaled && p.config) {
      notes.push("scaled at run time (config: min_idle " + p.config.min_idle + ", max " + p.config.max_instances + ")");
      cls = cls || "warn-text";
    }
    // Fields this page does not know yet are shown as they come.
    for (const k of Object.keys(p).sort()) {
      if (!poolFields.has(k)) notes.push(k + ": " + (typeof p[k] === "string" ? p[k] : JSON.stringify(p[k])));
    }
    const image = [p.image, p.image_copy].filter(Boolean).join("; ");
    return [p.name, p.provider, { text: p.min_idle, cls: "num" }, { text: p.max_instances, cls: "num" },
      states(p.instances), { text: p.leases_active, cls: "num" }, { text: p.leases_pending, cls: "num" },
      { text: image, cls: "id" }, { text: notes.join("; "), cls }];
  });
}

function instanceRows(instances) {
  return instances.map((i) => {
    let lease = { text: i.lease_id || "", cls: "id" };
    if (!i.lease_id && (i.state === "leased" || i.state === "draining")) {
      lease = { text: "another token's", cls: "empty" };
    }
    const state = i.reason && i.reason !== i.state ? i.state + " (" + i.reason + ")" : i.state;
    return [{ text: i.id || "(launching)", cls: "id" }, i.pool, { text: state, cls: "state-" + i.state },
      age(i.since), age(i.launched_at), lease, { text: i.uses, cls: "num" },
      [i.type, i.zone].filter(Boolean).join(" "), { text: i.image || "", cls: "id" }];
  });
}

function leaseRows(leases) {
  return leases.map((l) => [{ text: l.id, cls: "id" }, l.owner || "", l.pool, { text: l.state, cls: "state-" + l.state },
    { text: l.instance ? l.instance.id : "", cls: "id" }, age(l.created_at), until(l.expires_at)]);
}

function eventRows(events) {
  return events.slice().reverse().map((e) => [clock(e.time), e.pool, e.kind, { text: e.instance || "", cls: "id" },
    e.from || e.to ? (e.from || "") + " → " + (e.to || "") : "", e.reason || "",
    { text: e.message || "", cls: e.kind === "launch_error" ? "error-text" : "" }]);
}

// refreshCache asks for each pool's cache snapshots, at most every
// CACHE_REFRESH_MS. It is an admin route: its 403 is also how the page
// learns that the token is not an admin's.
async function refreshCache(pools, gen) {
  if (Date.now() - cache.at < CACHE_REFRESH_MS) return;
  const rows = [];
  let admin = null;
  for (const p of pools) {
    const r = await api("pools/" + encodeURIComponent(p.name) + "/cache/snapshots");
    if (r.status === 403) {
      admin = false;
      break;
    }
    if (r.status === 409) {
      admin = true;
      rows.push([p.name, { text: "no cache", cls: "empty" }, "", "", ""]);
      continue;
    }
    if (r.status !== 200 || !r.body) {
      rows.push([p.name, { text: "not available: " + apiMessage(r), cls: "error-text" }, "", "", ""]);
      continue;
    }
    admin = true;
    const snaps = r.body.snapshots || [];
    const cur = snaps.find((s) => s.current);
    rows.push([p.name, { text: snaps.length, cls: "num" }, { text: cur ? cur.id : "none yet", cls: "id" },
      cur ? cur.size_gb + " GB" : "", cur ? age(cur.created_at) + " ago" : ""]);
  }
  if (gen === generation) cache = { at: Date.now(), rows, admin };
}

function renderCache() {
  const note = $("#cache-note");
  const table = $("#cache table");
  if (cache.admin === false) {
    note.textContent = "Needs an admin token.";
    note.className = "note denied";
    table.hidden = true;
    return;
  }
  note.textContent = "Refreshed every " + CACHE_REFRESH_MS / 1000 + " s: listing snapshots asks the cloud.";
  note.className = "note";
  table.hidden = false;
  fillTable("#cache", cache.rows, "No pools.");
}

function renderLeasesNote() {
  const note = $("#leases-note");
  if (cache.admin === false) {
    note.textContent = "Only this token's leases: an admin token sees every lease.";
    note.className = "note denied";
  } else {
    note.textContent = "Active and pending leases.";
    note.className = "note";
  }
}

// ---- the loop ----

function setStatus(text, error) {
  const s = $("#status");
  s.textContent = text;
  s.className = error ? "status error" : "status";
}

function showLogin(message) {
  loginShown = true;
  $("#data").hidden = true;
  $("#login").hidden = false;
  $("#login-message").textContent = message;
  $("#forget").hidden = true;
  setStatus("", false);
  $("#token").focus();
}

async function refresh(gen) {
  const pools = await api("pools");
  if (pools.status === 401) throw new Unauthorized(apiMessage(pools));
  if (pools.status !== 200 || !pools.body) throw new Error("pools: " + apiMessage(pools));
  const [instances, active, pending, events] = await Promise.all([
    api("instances"), api("leases?state=active"), api("leases?state=pending"), api("events"),
  ]);
  await refreshCache(pools.body.pools || [], gen);
  if (gen !== generation) return;

  fillTable("#pools", poolRows(pools.body.pools || []), "No pools.");
  fillOr("#instances", instances, "instances", instanceRows, "No instances.");
  if (active.status === 200 && pending.status === 200) {
    const all = (active.body.leases || []).concat(pending.body.leases || []);
    all.sort((a, b) => Date.parse(a.created_at) - Date.parse(b.created_at));
    fillTable("#leases", leaseRows(all), "No active or pending leases.");
  } else {
    fillOr("#leases", active.status !== 200 ? active : pending, "leases", leaseRows, "");
  }
  fillOr("#events", events, "events", eventRows, "No events since the server started.");
  renderCache();
  renderLeasesNote();

  loginShown = false;
  $("#login").hidden = true;
  $("#data").hidden = false;
  $("#forget").hidden = !token();
  const who = token() ? "" : " · open API, no token";
  setStatus("updated " + new Date().toLocaleTimeString([], { hour12: false }) + who, false);
}

async function loop(gen) {
  try {
    await refresh(gen);
  } catch (e) {
    if (gen !== generation) return;
    if (e instanceof Unauthorized) {
      const had = token() !== "";
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(had ? "The token was refused (" + e.message + "). Give another." : "This server needs an API token.");
      return; // until a token is given
    }
    setStatus("cannot read the API (" + e.message + "); retrying", true);
  }
  if (gen === generation && !loginShown) timer = setTimeout(() => loop(gen), REFRESH_MS);
}

// restart drops what was shown for the previous token and starts over.
function restart() {
  generation++;
  clearTimeout(timer);
  cache = { at: 0, rows: [], admin: null };
  loop(generation);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("#token");
    const t = input.value.trim();
    input.value = "";
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $("#login").hidden = true;
    loginShown = false;
    setStatus("loading…", false);
    restart();
  });
  $("#forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("#data").hidden = true;
    restart();
  });
  restart();
});
