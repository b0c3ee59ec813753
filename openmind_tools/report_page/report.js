// The QC page: reads window.REPORT (data.js, written by openmind_tools/report.py) and draws every section.
// Data goes into the page only as text nodes and attributes (never as HTML), and nothing is fetched.
(function () {
  "use strict";
  const R = window.REPORT;
  const $ = (id) => document.getElementById(id);
  if (!R) {
    document.querySelector("main").textContent = "data.js is missing or unreadable: keep it next to index.html.";
    return;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }
  const svgNode = (tag, attrs) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    return node;
  };
  const int = (n) => n.toLocaleString("en-US");
  function bytes(n) {
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
  }
  const num = (x) => (Math.abs(x) >= 1000 || Number.isInteger(x) ? Math.round(x).toLocaleString("en-US") : x.toPrecision(3));

  // ------------------------------------------------------------------ volumes and their flags
  const V = R.volumes, count = V.id.length;
  const datasetOf = Int32Array.from(V.dataset), modalityOf = Int32Array.from(V.modality);
  const reasonsOf = new Map();  // row -> [reason, ...]
  const checkRows = R.checks.map(() => new Uint8Array(count));
  const flagged = new Uint8Array(count);
  for (const [row, check, reason] of R.flags) {
    if (!reasonsOf.has(row)) reasonsOf.set(row, []);
    reasonsOf.get(row).push(reason);
    checkRows[check][row] = 1;
    flagged[row] = 1;
  }
  const flaggedCount = flagged.reduce((a, b) => a + b, 0);
  const perCheck = checkRows.map((rows) => rows.reduce((a, b) => a + b, 0));
  const sheetCount = new Int32Array(R.sheets.length);
  for (const sheet of V.sheet) sheetCount[sheet]++;

  const state = { dataset: -1, modality: -1, flag: "all", text: "", page: 0, pageSize: 60 };

  function selected() {
    const out = [];
    const text = state.text.toLowerCase(), flag = state.flag;
    const check = /^\d+$/.test(flag) ? checkRows[Number(flag)] : null;
    for (let i = 0; i < count; i++) {
      if (state.dataset >= 0 && datasetOf[i] !== state.dataset) continue;
      if (state.modality >= 0 && modalityOf[i] !== state.modality) continue;
      if (flag === "flagged" && !flagged[i]) continue;
      if (flag === "clean" && flagged[i]) continue;
      if (check && !check[i]) continue;
      if (text && !V.id[i].toLowerCase().includes(text)) continue;
      out.push(i);
    }
    return out;
  }

  // ------------------------------------------------------------------ header, summary cards, footer
  function summary() {
    $("subtitle").textContent = `${R.title} · generated ${R.generated} by openmind-tools ${R.version} · thumbnails from the ${R.store} store`;
    const errors = R.errors ? R.errors.total : null;
    const unreadable = R.checks.indexOf("unreadable");
    const cards = [
      ["volumes", int(count)],
      ["datasets", int(R.datasets.length)],
      ["modalities", int(R.modalities.length)],
      [`flagged volumes (${(100 * flaggedCount / Math.max(count, 1)).toFixed(1)}%)`, int(flaggedCount), flaggedCount > 0],
      ["unreadable volumes", int(unreadable >= 0 ? perCheck[unreadable] : 0), unreadable >= 0],
      ["conversion errors", errors == null ? "no table" : int(errors), errors > 0],
    ];
    const storage = R.storage;
    storage.columns.forEach((column, k) => {
      if (column === "volumes") return;
      const total = storage.rows.reduce((sum, row) => sum + row[k + 1], 0);
      cards.push([`${column} bytes`, bytes(total)]);
    });
    $("summary").replaceChildren(...cards.map(([label, value, alert]) =>
      el("div", { class: "card" + (alert ? " alert" : "") }, el("div", { class: "value", text: value }), el("div", { class: "label", text: label }))));
    const s = R.sizes, total = s.sprites + s.data + s.flags + s.page;
    $("footer").textContent = `This report: ${bytes(total)} for ${int(count)} volumes, ${bytes(total / Math.max(count, 1))} per volume ` +
      `(thumbnails ${bytes(s.sprites)}, data.js ${bytes(s.data)}, flags.parquet ${bytes(s.flags)}, index.html ${bytes(s.page)}). ` +
      `Outliers: more than ${R.threshold} robust standard deviations (1.4826 × MAD) from the modality's median.`;
  }

  // ------------------------------------------------------------------ filters and the tile grid
  function option(value, label) { return el("option", { value: String(value), text: label }); }
  function filters() {
    const datasetCounts = new Int32Array(R.datasets.length), modalityCounts = new Int32Array(R.modalities.length);
    for (let i = 0; i < count; i++) { datasetCounts[datasetOf[i]]++; modalityCounts[modalityOf[i]]++; }
    $("f-dataset").replaceChildren(option(-1, `all (${R.datasets.length})`),
      ...R.datasets.map((d, k) => option(k, `${d} (${int(datasetCounts[k])})`)));
    $("f-modality").replaceChildren(option(-1, `all (${R.modalities.length})`),
      ...R.modalities.map((m, k) => option(k, `${m} (${int(modalityCounts[k])})`)));
    $("f-flag").replaceChildren(option("all", "all volumes"), option("flagged", `flagged, any reason (${int(flaggedCount)})`),
      option("clean", `not flagged (${int(count - flaggedCount)})`),
      ...R.checks.map((c, k) => option(k, `${c} (${int(perCheck[k])})`)));
    const on = (id, key, parse) => $(id).addEventListener(id === "f-text" ? "input" : "change", (e) => {
      state[key] = parse(e.target.value); state.page = 0; update();
    });
    on("f-dataset", "dataset", Number);
    on("f-modality", "modality", Number);
    on("f-flag", "flag", String);
    on("f-text", "text", (v) => v.trim());
    $("f-zoom").addEventListener("change", (e) => { document.documentElement.style.setProperty("--scale", e.target.value); grid(); });
    $("f-reset").addEventListener("click", () => setFilters({ dataset: -1, modality: -1, flag: "all", text: "" }));
    $("p-first").addEventListener("click", () => { state.page = 0; grid(); });
    $("p-prev").addEventListener("click", () => { state.page--; grid(); });
    $("p-next").addEventListener("click", () => { state.page++; grid(); });
    $("p-last").addEventListener("click", () => { state.page = Infinity; grid(); });
  }
  function setFilters(values) {
    Object.assign(state, values, { page: 0 });
    $("f-dataset").value = String(state.dataset);
    $("f-modality").value = String(state.modality);
    $("f-flag").value = String(state.flag);
    $("f-text").value = state.text;
    update();
    $("grid-section").scrollIntoView({ behavior: "instant", block: "start" });
  }

  let matching = [];
  function update() { matching = selected(); grid(); distributions(); }

  function tile(i) {
    const scale = Number(getComputedStyle(document.documentElement).getPropertyValue("--scale")) || 1;
    const t = R.tile, sheet = V.sheet[i], slot = V.slot[i];
    const columns = Math.min(t.columns, sheetCount[sheet]), rows = Math.ceil(sheetCount[sheet] / t.columns);
    const thumb = el("div", { class: "thumb", role: "img", "aria-label": `thumbnail of ${V.id[i]}` });
    Object.assign(thumb.style, {
      width: `${t.width * scale}px`, height: `${t.height * scale}px`,
      backgroundImage: `url("${R.sheets[sheet]}")`,
      backgroundSize: `${columns * t.width * scale}px ${rows * t.height * scale}px`,
      backgroundPosition: `-${(slot % t.columns) * t.width * scale}px -${Math.floor(slot / t.columns) * t.height * scale}px`,
    });
    const reasons = reasonsOf.get(i);
    return el("div", { class: "tile" + (reasons ? " flagged" : ""), "data-id": V.id[i], title: V.id[i] }, thumb,
      el("div", { class: "caption" }, el("span", { class: "mod", text: R.modalities[modalityOf[i]] }), V.id[i]),
      reasons ? el("ul", { class: "reasons" }, ...reasons.map((r) => el("li", { class: "reason", text: r }))) : null);
  }

  function grid() {
    const pages = Math.max(1, Math.ceil(matching.length / state.pageSize));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    const first = state.page * state.pageSize, shown = matching.slice(first, first + state.pageSize);
    $("match-count").textContent = `${int(matching.length)} of ${int(count)} volumes match` +
      (matching.length ? ` · showing ${int(first + 1)}–${int(first + shown.length)}` : "");
    $("p-label").textContent = `page ${state.page + 1} of ${pages}`;
    $("p-first").disabled = $("p-prev").disabled = state.page === 0;
    $("p-next").disabled = $("p-last").disabled = state.page >= pages - 1;
    $("grid").replaceChildren(...(shown.length ? shown.map(tile) : [el("div", { class: "empty", text: "No volume matches these filters." })]));
  }

  // ------------------------------------------------------------------ flags table
  function flagsTable() {
    $("flags-note").textContent = "Flags are data: flags.parquet (id, reason) beside this page. " +
      "Leave them out with: openmind-manifest query MANIFEST --exclude flags.parquet (or exclude = \"flags.parquet\" in a recipe's stage). Click a row to see its volumes.";
    const rows = R.checks.map((c, k) => el("tr", { class: "clickable", onclick: () => setFilters({ flag: String(k) }) },
      el("td", { text: c }), el("td", { class: "num", text: int(perCheck[k]) })));
    $("flags-table").replaceChildren(el("tr", {}, el("th", { text: "check" }), el("th", { class: "num", text: "volumes" })),
      ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "2", text: "no volume is flagged" }))]));
  }

  // ------------------------------------------------------------------ distributions
  function chart(metric, histogram) {
    const W = 280, H = 96, pad = 16, n = histogram.counts.length, top = Math.max(1, ...histogram.counts);
    const x = (v) => pad + ((v - histogram.low) / (histogram.high - histogram.low)) * (W - 2 * pad);
    const svg = svgNode("svg", { viewBox: `0 0 ${W} ${H + 14}`, role: "img", "aria-label": `histogram of ${metric.name}` });
    const width = (W - 2 * pad) / n;
    histogram.counts.forEach((c, k) => {
      if (!c) return;
      const h = (c / top) * (H - 8), bad = (histogram.flagged[k] / top) * (H - 8);
      svg.append(svgNode("rect", { class: "bar", x: pad + k * width + 0.5, y: H - h, width: Math.max(width - 1, 1), height: h - bad }));
      if (bad) svg.append(svgNode("rect", { class: "bar-flag", x: pad + k * width + 0.5, y: H - bad, width: Math.max(width - 1, 1), height: bad }));
    });
    const ref = histogram.reference;
    if (ref) {
      for (const limit of [ref.low, ref.high]) {
        if (limit == null) continue;
        svg.append(svgNode("line", { class: "limit", x1: x(limit), x2: x(limit), y1: 2, y2: H }));
      }
      svg.append(svgNode("line", { class: "median", x1: x(ref.median), x2: x(ref.median), y1: 2, y2: H }));
    }
    for (const [v, anchor] of [[histogram.low, "start"], [histogram.high, "end"]]) {
      const label = svgNode("text", { x: anchor === "start" ? pad : W - pad, y: H + 12, "text-anchor": anchor });
      label.textContent = num(v);
      svg.append(label);
    }
    const unit = metric.unit ? ` (${metric.unit})` : "";
    const flaggedHere = histogram.flagged.reduce((a, b) => a + b, 0);
    const refText = ref ? `${ref.group}: median ${num(ref.median)}, limits ${ref.low == null ? "–" : num(ref.low)} to ${num(ref.high)}` : "no reference (too few values)";
    return el("div", { class: "chart" }, el("h3", { text: metric.name + unit }),
      el("div", { class: "ref", text: `${int(histogram.volumes)} volumes, ${int(flaggedHere)} flagged · ${refText}` }), svg);
  }
  function distributions() {
    const group = state.modality >= 0 ? R.modalities[state.modality] : "all";
    $("dist-note").textContent = (group === "all" ? "All volumes" : `Modality ${group}`) +
      " (follows the modality filter above). Red: volumes flagged by that metric; dashed: the limits; solid: the median. " +
      "Each modality is judged by its own median and MAD; modalities too small for one, and the 'all' view, by the whole manifest's.";
    $("distributions").replaceChildren(...R.metrics.filter((m) => m.histograms[group]).map((m) => chart(m, m.histograms[group])));
  }

  // ------------------------------------------------------------------ counts, storage, conversion, errors
  let countsShown = 25;
  function countsTable() {
    const cells = new Map(), max = Math.max(1, ...R.counts.map((c) => c[2]));
    for (const [d, m, c] of R.counts) cells.set(d * R.modalities.length + m, c);
    const header = el("tr", {}, el("th", { text: "dataset" }), el("th", { class: "num", text: "total" }),
      ...R.modalities.map((m) => el("th", { class: "mod", text: m })));
    const rows = R.datasets.slice(0, countsShown).map((d, k) => {
      let total = 0;
      const tds = R.modalities.map((_, m) => {
        const c = cells.get(k * R.modalities.length + m) || 0;
        total += c;
        if (!c) return el("td", {});
        const td = el("td", { class: "cell", text: int(c), title: `${d} · ${R.modalities[m]}: show these volumes`,
          onclick: () => setFilters({ dataset: k, modality: m }) });
        td.style.background = `rgba(47, 95, 179, ${(0.08 + 0.5 * c / max).toFixed(3)})`;
        return td;
      });
      return el("tr", {}, el("td", { text: d }), el("td", { class: "num", text: int(total) }), ...tds);
    });
    $("counts-table").replaceChildren(header, ...rows);
    const more = $("counts-more");
    more.hidden = countsShown >= R.datasets.length;
    more.textContent = `show all ${int(R.datasets.length)} datasets`;
  }
  function storageTable() {
    const s = R.storage, sums = s.columns.map((_, k) => s.rows.reduce((a, r) => a + r[k + 1], 0));
    const head = el("tr", {}, el("th", { text: "modality" }), ...s.columns.map((c) => el("th", { class: "num", text: c })));
    const row = (label, values, strong) => el("tr", {}, el("td", { text: label, style: strong ? "font-weight:600" : "" }),
      ...values.map((v, k) => el("td", { class: "num", text: k ? bytes(v) : int(v) })));
    const perVolume = el("tr", {}, el("td", { text: "per volume", class: "muted" }), el("td", {}),
      ...sums.slice(1).map((v) => el("td", { class: "num muted", text: bytes(v / Math.max(sums[0], 1)) })));
    $("storage-table").replaceChildren(head, row("all", sums, true), perVolume, ...s.rows.map((r) => row(r[0], r.slice(1))));
  }
  function conversion() {
    const c = R.conversion, items = [
      ["query", c.query == null ? "(the whole manifest)" : (c.query || "(no filter)")],
      ["formats", (c.formats || []).join(", ") || "-"],
      ["converter", (c.converter_versions || []).join(", ") || "-"],
      ["settings hash", c.settings_hash || "-"],
      ...Object.entries(c.settings || {}).map(([k, v]) => [k, JSON.stringify(v)]),
    ];
    $("conversion").replaceChildren(...items.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, el("code", { text: String(v) }))]));
  }
  function errorsTable() {
    const e = R.errors;
    if (!e) { $("errors-table").replaceChildren(el("tr", {}, el("td", { text: "no errors.parquet beside the manifest" }))); return; }
    const head = el("tr", {}, el("th", { class: "num", text: "inputs" }), el("th", { text: "error" }), el("th", { text: "reason" }), el("th", { text: "e.g." }));
    const rows = e.groups.map((g) => el("tr", {}, el("td", { class: "num", text: int(g.count) }), el("td", { text: g.type }),
      el("td", { text: g.reason }), el("td", { class: "small", text: g.examples.join(", ") + (g.count > g.examples.length ? ", ..." : "") })));
    $("errors-table").replaceChildren(head, ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "4", text: "every input converted" }))]));
  }

  summary();
  filters();
  flagsTable();
  countsTable();
  $("counts-more").addEventListener("click", () => { countsShown = R.datasets.length; countsTable(); });
  storageTable();
  conversion();
  errorsTable();
  update();
  window.REPORT_READY_MS = performance.now();
  document.body.dataset.ready = "true";
})();
