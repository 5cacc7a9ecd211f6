// flowerbed dashboard: polls the JSON API (long polls answer as soon as a run folder changes) and
// draws everything with DOM and inline SVG. Text from run folders is only ever set as textContent.
"use strict";

(function () {
  const query = new URLSearchParams(window.location.search);
  const EVERY = Math.max(200, Number(query.get("every")) || 1000); // ms between polls
  const WAIT = Math.min(25, Math.max(0, Number(query.get("wait") || 20))); // s a long poll may wait
  const COLORS = ["#1f5fbf", "#d2691e", "#2e8b57", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#b8860b", "#2c3e50", "#e84393"];
  const NS = "http://www.w3.org/2000/svg";

  let runsVersion = "";
  let runVersion = "";
  let selected = null;
  let runs = [];
  let runController = null;
  let updates = 0;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) if (child) node.appendChild(child);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined) return "";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value) && Math.abs(value) < 1e6) return String(value);
    const d = digits === undefined ? 4 : digits;
    return Math.abs(value) >= 1000 ? value.toFixed(0) : Number(value.toPrecision(d)).toString();
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "";
    const s = Math.max(0, Math.round(seconds));
    if (s < 90) return s + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " days ago";
  }

  function stateClass(state) {
    return String(state || "").replace(/\s+/g, "-");
  }

  function setLive(text, down) {
    const live = document.getElementById("live");
    live.textContent = text;
    live.className = down ? "live down" : "live";
  }

  function selectedFromHash() {
    const match = /(?:^#|&)run=([^&]+)/.exec(window.location.hash);
    return match ? decodeURIComponent(match[1]) : null;
  }

  // ------------------------------------------------------------------------------ the list of runs

  function renderRuns(now) {
    const list = document.getElementById("runs");
    list.replaceChildren();
    if (!runs.length) {
      list.appendChild(el("li", { class: "empty", text: "No run folders yet." }));
      return;
    }
    for (const run of runs) {
      const rounds = run.rounds ? run.rounds_done + "/" + run.rounds : String(run.rounds_done);
      const meta = [run.kind, "rounds " + rounds];
      if (run.flower_run_id) meta.push("Flower run " + run.flower_run_id);
      if (run.updated) meta.push(ago(now - run.updated));
      const item = el(
        "li",
        { class: run.id === selected ? "selected" : null, "data-run": run.id, "data-state": run.state },
        el("div", { class: "run-name", text: run.name }),
        el("div", { class: "run-meta" }, el("span", { class: "state " + stateClass(run.state), text: run.state }), document.createTextNode(" " + meta.join(" · "))),
        el("div", { class: "run-reason", text: run.reason, title: run.reason }),
      );
      item.addEventListener("click", () => select(run.id));
      list.appendChild(item);
    }
  }

  async function pollRuns() {
    try {
      const response = await fetch("/api/runs?since=" + encodeURIComponent(runsVersion) + "&wait=" + WAIT, { credentials: "same-origin" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      runsVersion = data.version;
      runs = data.runs;
      if (!selected || !runs.some((r) => r.id === selected)) {
        const wanted = selectedFromHash();
        const next = runs.some((r) => r.id === wanted) ? wanted : runs.length ? runs[0].id : null;
        if (next !== selected) select(next, true);
      }
      renderRuns(data.now);
      setLive("live · " + runs.length + (runs.length === 1 ? " run" : " runs") + " · updated " + new Date().toLocaleTimeString());
      setTimeout(pollRuns, EVERY);
    } catch (error) {
      setLive("disconnected (" + error.message + "); retrying", true);
      setTimeout(pollRuns, 3000);
    }
  }

  function select(id, keepHash) {
    selected = id;
    runVersion = "";
    if (runController) runController.abort();
    if (!keepHash && id) window.location.hash = "run=" + encodeURIComponent(id);
    renderRuns(Date.now() / 1000);
    if (id) pollRun(id);
  }

  // ------------------------------------------------------------------------------ one run

  async function pollRun(id) {
    runController = new AbortController();
    const controller = runController;
    try {
      const url = "/api/runs/" + encodeURIComponent(id) + "?since=" + encodeURIComponent(runVersion) + "&wait=" + WAIT;
      const response = await fetch(url, { credentials: "same-origin", signal: controller.signal });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      if (id !== selected) return;
      if (data.version !== runVersion) {
        runVersion = data.version;
        updates += 1;
        renderRun(data);
      }
      setTimeout(() => id === selected && pollRun(id), EVERY);
    } catch (error) {
      if (controller.signal.aborted) return;
      setTimeout(() => id === selected && pollRun(id), 3000);
    }
  }

  function renderRun(run) {
    const root = document.getElementById("run");
    root.setAttribute("data-run", run.id);
    root.setAttribute("data-rounds", String(run.rounds_done));
    root.setAttribute("data-state", run.state);
    root.setAttribute("data-updates", String(updates));
    const exp = run.experiment || {};
    const privacy = exp.privacy || {};
    const meta = [run.kind, "strategy " + (exp.strategy || run.strategy || "?"), "task " + (exp.task || "?"), "data " + (exp.dataset || "?")];
    meta.push("rounds " + run.rounds_done + "/" + (run.rounds || "?"));
    if (privacy.enabled) {
      meta.push("DP-SGD " + (privacy.target_epsilon ? "target ε " + privacy.target_epsilon : "noise " + privacy.noise_multiplier));
    }
    if (exp.secagg) meta.push("secure aggregation");
    if (run.flower_run_id) meta.push("Flower run " + run.flower_run_id);

    const parts = [
      el("h2", { class: "run-title" }, document.createTextNode(run.name + " "), el("span", { class: "state " + stateClass(run.state), text: run.state })),
      el("div", { class: "reason " + stateClass(run.state), id: "run-reason", text: run.reason }),
      el("div", { class: "meta" }, ...meta.map((m) => el("span", { text: m }))),
      el("div", { class: "note", text: run.folder }),
    ];
    if (run.summary && run.summary.final) parts.push(finalFigures(run.summary));
    parts.push(el("h3", { text: "Sites" }), sitesTable(run));
    parts.push(el("h3", { text: "Metrics per round" }), charts(run.charts, "global-charts"));
    if (run.site_charts && run.site_charts.length) {
      parts.push(el("h3", { text: "Per site" }), charts(run.site_charts, "site-charts"));
    }
    parts.push(el("h3", { text: "Rounds" }), roundsTable(run.rounds_table));
    root.replaceChildren(...parts);
  }

  function finalFigures(summary) {
    const final = summary.final || {};
    const items = [];
    for (const group of ["federated", "central"]) {
      for (const [name, value] of Object.entries(final[group] || {})) {
        if (name !== "num-examples") items.push(group + " " + name + " " + fmt(value, 3));
      }
    }
    const model = summary.model || {};
    const which = model.reported === "best" ? "best model on validation (round " + model.round + ")" : "last round's model";
    return el("div", { class: "meta", id: "final" }, el("span", { text: "final, " + which + ": " + (items.join(", ") || "-") }));
  }

  // ------------------------------------------------------------------------------ tables

  function sitesTable(run) {
    const withEps = run.sites.some((s) => s.epsilon !== undefined);
    const header = el("tr", {}, el("th", { text: "site" }), el("th", { text: "status" }), el("th", { text: "rounds taken part" }));
    if (withEps) header.appendChild(el("th", { text: run.epsilon_label }));
    header.appendChild(el("th", { text: "final accuracy" }));
    header.appendChild(el("th", { text: "reason" }));
    const body = el("tbody");
    for (const site of run.sites) {
      const gone = ["budget spent", "left out", "did not take part", "refused"].includes(site.status);
      const row = el("tr", { class: gone ? "left-out" : null, "data-site": site.site });
      row.appendChild(el("td", { text: site.site }));
      row.appendChild(el("td", { class: "status", text: site.status + (site.code ? " (" + site.code + ")" : "") }));
      row.appendChild(el("td", { class: "num", text: String(site.rounds) }));
      if (withEps) row.appendChild(el("td", { class: "num epsilon", text: site.epsilon === undefined ? "" : fmt(site.epsilon, 4) }));
      const acc = site.final && site.final.accuracy;
      row.appendChild(el("td", { class: "num", text: acc === undefined ? "" : fmt(acc, 3) }));
      row.appendChild(el("td", { class: site.reason ? "refusal" : null, text: site.reason || "" }));
      body.appendChild(row);
    }
    const parts = [el("div", { class: "scroll" }, el("table", { id: "sites" }, el("thead", {}, header), body))];
    if (withEps) parts.unshift(el("div", { class: "note", id: "epsilon-note", text: run.epsilon_label + ": " + run.epsilon_note }));
    return el("div", {}, ...parts);
  }

  function roundsTable(rows) {
    const names = [];
    for (const row of rows) for (const k of Object.keys(row.metrics)) if (!names.includes(k)) names.push(k);
    const shown = names.filter((n) => /accuracy|loss/.test(n)).slice(0, 4);
    const header = el("tr", {}, el("th", { text: "round" }), el("th", { text: "sites" }));
    for (const n of shown) header.appendChild(el("th", { text: n }));
    header.appendChild(el("th", { text: "ε max" }));
    header.appendChild(el("th", { text: "s" }));
    header.appendChild(el("th", { text: "refused, missing or retrained" }));
    const body = el("tbody");
    for (const row of rows.slice().reverse()) {
      const tr = el("tr", { "data-round": String(row.round) });
      tr.appendChild(el("td", { class: "num", text: String(row.round) }));
      tr.appendChild(el("td", { text: row.took_part + "/" + row.sampled + (row.participants.length ? ": " + row.participants.join(", ") : ""), title: row.participants.join(", ") }));
      for (const n of shown) tr.appendChild(el("td", { class: "num", text: fmt(row.metrics[n], 4) }));
      tr.appendChild(el("td", { class: "num", text: fmt(row.epsilon_max, 4) }));
      tr.appendChild(el("td", { class: "num", text: row.time === null || row.time === undefined ? "" : fmt(row.time, 3) }));
      const refused = Object.entries(row.refused).map(([site, why]) => site + (row.codes[site] ? " [" + row.codes[site] + "]" : "") + ": " + why);
      if (row.retrained.length) refused.push("trained twice (interrupted, resumed): " + row.retrained.join(", "));
      tr.appendChild(el("td", { class: refused.length ? "refusal" : null, text: refused.join("; ") }));
      body.appendChild(tr);
    }
    return el("div", { class: "scroll" }, el("table", { id: "rounds" }, el("thead", {}, header), body));
  }

  // ------------------------------------------------------------------------------ charts

  function swatch(color, opacity, height) {
    const node = el("i"); // styled through the CSSOM: the page's policy allows no inline style attributes
    node.style.background = color;
    node.style.opacity = String(opacity);
    node.style.height = height + "px";
    return node;
  }

  function charts(specs, id) {
    const grid = el("div", { class: "charts", id: id });
    for (const spec of specs || []) grid.appendChild(chart(spec));
    return grid;
  }

  function chart(spec) {
    const W = 340, H = 180, L = 44, R = 10, T = 8, B = 20;
    const all = [];
    for (const s of spec.series || []) for (const p of s.points) all.push(p);
    for (const b of spec.bands || []) for (const p of b.low.concat(b.high)) all.push(p);
    const figure = el("figure", { class: "chart", "data-chart": spec.id }, el("figcaption", { text: spec.title }));
    const box = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": spec.title });
    figure.appendChild(box);
    if (!all.length) {
      figure.appendChild(el("div", { class: "note", text: "no values yet" }));
      return figure;
    }
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
    let step = null;
    if (spec.integer) {
      y0 = 0;
      step = Math.max(1, Math.ceil(y1 / 4));
      y1 = step * 4;
    } else {
      const pad = (y1 - y0) * 0.06;
      y0 = spec.zero && y0 >= 0 ? Math.max(0, y0 - pad) : y0 - pad;
      y1 += pad;
    }
    const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    const decimals = step ? 0 : Math.min(6, Math.max(0, Math.ceil(-Math.log10((y1 - y0) / 4)) + 1));
    for (let i = 0; i <= 4; i++) {
      const v = step ? step * i : y0 + ((y1 - y0) * i) / 4;
      box.appendChild(svg("line", { class: "grid", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }));
      const label = svg("text", { class: "axis", x: L - 4, y: Y(v) + 3, "text-anchor": "end" });
      label.textContent = v.toFixed(decimals);
      box.appendChild(label);
    }
    const ticks = new Set([Math.ceil(x0), Math.floor(x1), Math.round((x0 + x1) / 2)]);
    for (const t of ticks) {
      if (t < x0 || t > x1) continue;
      const anchor = t === Math.floor(x1) && t !== Math.ceil(x0) ? "end" : t === Math.ceil(x0) ? "start" : "middle";
      const label = svg("text", { class: "axis", x: X(t), y: H - 5, "text-anchor": anchor });
      label.textContent = "round " + t;
      box.appendChild(label);
    }
    const legend = el("div", { class: "legend" });
    (spec.bands || []).forEach((band, i) => {
      const shape = band.low.map((p) => X(p[0]) + "," + Y(p[1])).concat(band.high.slice().reverse().map((p) => X(p[0]) + "," + Y(p[1])));
      box.appendChild(svg("polygon", { class: "band", points: shape.join(" "), fill: COLORS[0], "fill-opacity": i === 0 ? 0.14 : 0.26 }));
      legend.appendChild(el("span", {}, swatch(COLORS[0], i === 0 ? 0.3 : 0.5, 8), document.createTextNode(band.label)));
    });
    (spec.series || []).forEach((series, i) => {
      const color = COLORS[i % COLORS.length];
      const points = series.points.map((p) => X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join(" ");
      box.appendChild(svg("polyline", { points: points, stroke: color, "data-series": series.label }));
      if (series.points.length <= 40) {
        for (const p of series.points) box.appendChild(svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.2, fill: color }));
      }
      legend.appendChild(el("span", {}, swatch(color, 1, 3), document.createTextNode(series.label)));
    });
    figure.appendChild(legend);
    return figure;
  }

  window.addEventListener("hashchange", () => {
    const wanted = selectedFromHash();
    if (wanted && wanted !== selected) select(wanted, true);
  });
  selected = null;
  pollRuns();
})();
