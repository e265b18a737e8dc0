// The node dashboard (docs/dashboard.md): polls the node's JSON routes and fills the page.
// Data goes into the page only through textContent and SVG attributes, never as markup.
"use strict";

(() => {
  const EXTENSION = "urn:veilnet:a2a-extension:node:1";
  const HISTORY = 60; // chart points kept
  const MAX_ROWS = 200; // table rows shown
  const SVG = "http://www.w3.org/2000/svg";
  const query = new URLSearchParams(window.location.search);
  const every = Math.min(60, Math.max(0.5, Number(query.get("every")) || 3)); // seconds
  const history = []; // {requests, errors} deltas per poll
  let last = null; // the previous /v1/stats

  const $ = (id) => document.getElementById(id);

  function text(id, value) {
    $(id).textContent = value === null || value === undefined ? "–" : String(value);
  }

  function cell(row, value, cls, title) {
    const td = document.createElement("td");
    td.textContent = value === null || value === undefined ? "–" : String(value);
    if (cls) td.className = cls;
    if (title) td.title = String(title); // the full value of a shortened one
    row.appendChild(td);
    return td;
  }

  function fillTable(id, items, columns, empty) {
    const body = $(id);
    const rows = [];
    for (const item of items.slice(0, MAX_ROWS)) {
      const tr = document.createElement("tr");
      for (const [value, cls, title] of columns(item)) cell(tr, value, cls, title);
      rows.push(tr);
    }
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = cell(tr, empty, "empty");
      td.colSpan = body.closest("table").querySelectorAll("thead th").length;
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
    const s = Math.max(0, seconds);
    if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    if (s < 5400) return `${(s / 60).toFixed(1)} min`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
    return `${(s / 86400).toFixed(1)} d`;
  }

  function short(id) {
    return typeof id === "string" && id.length > 20 ? `${id.slice(0, 10)}…${id.slice(-6)}` : id;
  }

  function when(unix) {
    return unix ? new Date(unix * 1000).toLocaleString() : "–";
  }

  async function getJSON(path) {
    const response = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  function cardParams(card) {
    const exts = card && card.capabilities && card.capabilities.extensions;
    const ours = Array.isArray(exts) ? exts.find((e) => e && e.uri === EXTENSION) : null;
    return ours && typeof ours.params === "object" && ours.params ? ours.params : {};
  }

  function renderNode(node, stats) {
    text("title-peer", short(node.peer_id));
    text("did", node.did);
    text("peer-id", node.peer_id);
    text("http", node.http);
    text("uptime", age(stats.uptime_s));
    const addrs = (node.multiaddrs || []).map((a) => {
      const li = document.createElement("li");
      li.textContent = a;
      return li;
    });
    $("addrs").replaceChildren(...addrs);
    fillTable("shards", node.shards || [], (s) => [
      [s.model], [short(s.deployment), "mono", s.deployment], [s.index, "num"], [s.cid, "mono"],
      [s.loaded ? "yes" : "no"]], "no shards served");
    const lim = node.sessions || {};
    $("sessions-limits").textContent = `Sessions: ${lim.open ?? "–"} open of at most ` +
      `${lim.max_sessions ?? "–"}, context ${lim.max_context ?? "–"} tokens, idle expiry ` +
      `${age(lim.idle_expiry_s)}, KV cache ${lim.cache_bytes ?? "–"} bytes.`;
  }

  function renderTraffic(stats) {
    text("requests-total", stats.requests_total);
    text("errors-total", stats.errors_total);
    text("sessions-open", stats.sessions_open);
    text("peers-known", stats.peers_known);
    text("cards-indexed", stats.cards_indexed);
    const protocols = new Set([...Object.keys(stats.requests || {}), ...Object.keys(stats.errors || {})]);
    fillTable("by-protocol", [...protocols].sort(), (p) => [
      [p, "mono"], [(stats.requests || {})[p] ?? 0, "num"], [(stats.errors || {})[p] ?? 0, "num"]],
    "no requests yet");
    if (last !== null) {
      history.push({ requests: Math.max(0, stats.requests_total - last.requests_total),
        errors: Math.max(0, stats.errors_total - last.errors_total) });
      if (history.length > HISTORY) history.shift();
    }
    last = stats;
    drawChart();
  }

  function svg(tag, attrs, content) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (content !== undefined) node.textContent = String(content);
    return node;
  }

  function drawChart() {
    const [w, h, left, top, bottom] = [600, 140, 36, 8, 18];
    const peak = Math.max(1, ...history.map((p) => Math.max(p.requests, p.errors)));
    const x = (i) => left + (i * (w - left - 4)) / (HISTORY - 1);
    const y = (v) => top + (h - top - bottom) * (1 - v / peak);
    const parts = [
      svg("line", { x1: left, y1: y(0), x2: w - 4, y2: y(0), class: "axis" }),
      svg("line", { x1: left, y1: top, x2: left, y2: y(0), class: "axis" }),
      svg("text", { x: left - 4, y: top + 8, class: "tick", "text-anchor": "end" }, peak),
      svg("text", { x: left - 4, y: y(0), class: "tick", "text-anchor": "end" }, 0),
      svg("text", { x: w - 4, y: h - 4, class: "tick", "text-anchor": "end" }, "now"),
      svg("text", { x: left, y: h - 4, class: "tick" }, `${age(every * (HISTORY - 1))} ago`),
    ];
    const offset = HISTORY - history.length;
    for (const [key, cls] of [["requests", "req"], ["errors", "err"]]) {
      const points = history.map((p, i) => `${x(offset + i).toFixed(1)},${y(p[key]).toFixed(1)}`);
      if (points.length === 1) points.push(points[0]);
      if (points.length) parts.push(svg("polyline", { points: points.join(" "), class: `line ${cls}` }));
    }
    $("chart").replaceChildren(...parts);
  }

  function renderPeers(node, peers, agents, now) {
    const rows = new Map();
    for (const p of peers) {
      rows.set(p.peer_id, { peer: p.peer_id, did: p.did, http: p.http,
        shards: (p.shards || []).length, recordAge: p.age, cardAge: null, expires: null });
    }
    for (const card of agents) {
      const params = cardParams(card);
      if (typeof params.peerId !== "string" || params.peerId === node.peer_id) continue;
      const row = rows.get(params.peerId) || { peer: params.peerId, did: params.did,
        http: params.http, shards: 0, recordAge: null };
      const deployments = Array.isArray(params.deployments) ? params.deployments : [];
      const cardShards = deployments.reduce((n, d) => n + ((d && d.shards) || []).length, 0);
      row.shards = Math.max(row.shards, cardShards);
      row.cardAge = Number.isFinite(params.issuedAt) ? now - params.issuedAt : null;
      row.expires = Number.isFinite(params.expiresAt) ? params.expiresAt - now : null;
      rows.set(params.peerId, row);
    }
    const list = [...rows.values()].sort((a, b) => (a.peer < b.peer ? -1 : 1));
    fillTable("peers", list, (r) => [
      [short(r.peer), "mono", r.peer], [short(r.did), "mono", r.did], [r.http, "mono"],
      [r.shards, "num"],
      [age(r.recordAge), "num"], [age(r.cardAge), "num"], [age(r.expires), "num"]],
    "no other peers known");
  }

  function fixed(value, digits) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : value;
  }

  function renderRankings(rankings, node) {
    fillTable("rankings", rankings.map((r, i) => ({ ...r, rank: i + 1 })), (r) => {
      const who = r.did || r.node;
      return [
        [r.rank, "num"],
        [who === node.did ? `${short(who)} (this node)` : short(who), "mono", who],
        [fixed(r.score, 3), "num"], [fixed(r.agreement, 3), "num"],
        [fixed(r.availability, 2), "num"],
        [typeof r.latency_ms === "number" ? `${r.latency_ms.toFixed(1)} ms` : null, "num"],
        [r.reporters, "num"]];
    }, "no rankings yet");
  }

  function renderLedger(stats) {
    const ledger = stats.ledger;
    for (const li of document.querySelectorAll(".ledger-only")) li.hidden = !ledger;
    for (const li of document.querySelectorAll(".discovery-only")) li.hidden = !stats.discovery;
    text("ledger-origin", ledger ? ledger.origin : "this node keeps no log (start it with --ledger)");
    text("ledger-size", ledger ? ledger.size : null);
    text("ledger-cosignatures", ledger
      ? `${ledger.cosignatures}${ledger.cosigners.length ? ` (${ledger.cosigners.map((c) => c.name).join(", ")})` : ""}`
      : null);
    text("ledger-last", ledger ? when(ledger.last_cosigned) : null);
    const witness = stats.witness;
    text("witness-name", witness ? witness.name : "no witness");
    text("witness-counts", witness ? `${witness.cosigned} / ${witness.refused}` : null);
    fillTable("witnessed", witness ? witness.logs : [], (l) => [[l.origin, "mono"], [l.size, "num"]],
      "no log witnessed yet");
  }

  async function poll() {
    try {
      const [node, stats, peers, rankings] = await Promise.all([
        getJSON("/v1/node"), getJSON("/v1/stats"), getJSON("/v1/peers"), getJSON("/v1/rankings")]);
      const agents = stats.discovery ? await getJSON("/v1/agents") : [];
      renderNode(node, stats);
      renderTraffic(stats);
      renderPeers(node, peers, agents, stats.time);
      renderRankings(rankings, node);
      renderLedger(stats);
      $("status").className = "status ok";
      text("status", `updated ${new Date().toLocaleTimeString()}, every ${every} s`);
    } catch (err) {
      $("status").className = "status bad";
      text("status", `update failed: ${err && err.message ? err.message : err}`);
    } finally {
      window.setTimeout(poll, every * 1000);
    }
  }

  text("interval", `${every} s`);
  drawChart();
  poll();
})();
