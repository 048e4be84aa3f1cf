// The glied page: photos in, for each one the caption, region boxes, attribute words and per-word attention.
// Plain browser JavaScript served by the package (no build step, nothing from elsewhere).
"use strict";

const PALETTE = ["#f58742", "#4bb43c", "#f58230", "#c850c8", "#00c8c8", "#1ebee6", "#e6194b", "#911eb4",
                 "#aa6e28", "#008080"];
const SHOWN = 12;        // regions drawn when no word is hovered (the most confident ones)
const SVGNS = "http://www.w3.org/2000/svg";
const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

async function health() {
  const r = await fetch("/health");
  const h = await r.json();
  const b = h.bundle || {};
  const sha = ((b.parts || {}).decoder || {}).sha256 || "";
  $("#model").textContent = `model ${b.path || "?"} · decoder ${sha.slice(0, 12)} · glied ${h.glied_version}`;
  const beam = $("#beam");
  for (let k = 1; k <= h.max_beam; k++) beam.append(el("option", { value: k }, k));
  beam.value = h.beam_size;
  $("#search").hidden = !h.search;
}

function drawRegions(svg, res) {
  const { width, height } = res.image;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const order = res.regions.map((r, i) => i).sort((a, b) => res.regions[b].score - res.regions[a].score);
  const rank = new Map(order.map((i, k) => [i, k]));
  const groups = res.regions.map((r, i) => {
    const [x1, y1, x2, y2] = r.box;
    const colour = PALETTE[rank.get(i) % PALETTE.length];
    const g = el("svg:g", { "data-region": i });
    g.append(el("svg:rect", { x: x1, y: y1, width: Math.max(x2 - x1, 1), height: Math.max(y2 - y1, 1),
                              stroke: colour }));
    const text = `${r.attribute} ${r.object} ${r.score.toFixed(2)}`;
    const label = el("svg:text", { x: x1 + 2, y: Math.max(y1 + 2, 0), "dominant-baseline": "hanging" }, text);
    g.dataset.label = text;
    g.append(label);
    svg.append(g);
    return g;
  });
  const scale = () => {  // keep labels ~11 screen pixels high whatever the picture's size
    const k = width / Math.max(svg.getBoundingClientRect().width, 1);
    svg.querySelectorAll("text").forEach(t => { t.style.fontSize = `${11 * k}px`; t.style.strokeWidth = `${3 * k}px`; });
  };
  const rest = () => groups.forEach((g, i) => {
    g.style.display = rank.get(i) < SHOWN ? "" : "none";
    g.classList.remove("lit", "dim");
    g.style.opacity = "";
    g.querySelector("text").textContent = g.dataset.label;
  });
  rest();
  return { groups, rest, scale };
}

function render(card, res) {
  card.classList.remove("failed");
  $(".status", card).textContent = `${res.regions.length} regions · beam ${card.dataset.beam}`;
  $(".body", card).hidden = false;
  const svg = $("svg.boxes", card);
  const boxes = drawRegions(svg, res);
  const img = $("img", card);
  if (img.complete) boxes.scale(); else img.addEventListener("load", boxes.scale);
  window.addEventListener("resize", boxes.scale);

  const cap = $(".caption", card);
  cap.textContent = "";
  (res.tokens || []).forEach((word, t) => {
    const w = el("span", { class: "w", "data-t": t }, word);
    w.addEventListener("mouseenter", () => {
      const att = (res.attention || [])[t];
      if (!att) return;
      const top = Math.max(...att, 1e-9);
      boxes.groups.forEach((g, i) => {
        const a = att[i] / top;                 // attention relative to this word's most attended region
        g.style.display = a >= 0.25 ? "" : "none";
        g.style.opacity = (0.25 + 0.75 * a * a).toFixed(2);
        g.classList.toggle("lit", a >= 0.8);
        g.querySelector("text").textContent = `${g.dataset.label} · ${(100 * att[i]).toFixed(0)}%`;
      });
      w.classList.add("on");
    });
    w.addEventListener("mouseleave", () => { boxes.rest(); w.classList.remove("on"); });
    cap.append(w, " ");
  });

  const words = $(".words", card);
  for (const { word, prob } of (res.attribute_words || []).slice(0, 15)) {
    const li = el("li");
    const bar = el("span", { class: "bar" });
    bar.append(el("span", { style: `width:${(100 * prob).toFixed(1)}%` }));
    li.append(el("span", {}, word), bar, el("span", { class: "muted" }, prob.toFixed(2)));
    words.append(li);
  }
  const list = $(".regions", card);
  [...res.regions].sort((a, b) => b.score - a.score).slice(0, SHOWN).forEach(r =>
    list.append(el("li", {}, `${r.attribute} ${r.object} (${r.score.toFixed(2)})`)));
}

function fail(card, message) {
  card.classList.add("failed");
  $(".status", card).textContent = "error: " + message;
}

async function captionOne(file) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  $(".name", card).textContent = file.name;
  card.dataset.beam = $("#beam").value;
  $("img", card).src = URL.createObjectURL(file);
  $("#results").prepend(card);
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("beam", card.dataset.beam);
  try {
    const r = await fetch("/caption", { method: "POST", body: form });
    const data = await r.json();
    const res = (data.results || [])[0];
    if (!res || res.error) fail(card, (res && res.error) || data.error || `HTTP ${r.status}`);
    else render(card, res);
  } catch (e) {
    fail(card, `no answer from the server (${e.message})`);
  }
}

function captionFiles(files) {
  // one request per photo, all at once: the server batches them on the extractor
  return Promise.all([...files].map(captionOne));
}

function searchStatus(text, error = false) {
  const p = $("#search-status");
  p.textContent = text;
  p.classList.toggle("error", error);
}

function showHits(data) {
  // text -> a ranked grid of images; photo -> a ranked list of captions, each beside its own image
  const ol = $("#search-results");
  const images = data.query.text !== undefined;
  ol.textContent = "";
  ol.className = images ? "images" : "captions";
  searchStatus(images ? `${data.results.length} images for “${data.query.text}”, best first`
                      : `${data.results.length} captions nearest to ${data.query.image}, best first`);
  for (const h of data.results) {
    const li = el("li", { "data-image-id": h.image_id ?? "" });
    if (h.thumbnail) li.append(el("img", { src: h.thumbnail, alt: `image ${h.image_id}` }));
    const what = images ? `image ${h.image_id}` : h.caption;
    li.append(el("span", { class: "what" }, what), el("span", { class: "score muted" }, Number(h.score).toFixed(3)));
    ol.append(li);
  }
}

async function searchRequest(init) {
  searchStatus("searching…");
  try {
    const r = await fetch("/search", init);
    const data = await r.json();
    if (!r.ok) {
      $("#search-results").textContent = "";
      searchStatus("error: " + data.error, true);
      return;
    }
    showHits(data);
  } catch (e) {
    searchStatus(`error: no answer from the server (${e.message})`, true);
  }
}

function wire() {
  const drop = $("#drop");
  $("#files").addEventListener("change", e => { captionFiles(e.target.files); e.target.value = ""; });
  ["dragenter", "dragover"].forEach(t => drop.addEventListener(t, e => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach(t => drop.addEventListener(t, e => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", e => captionFiles(e.dataTransfer.files));
  $("#search-text").addEventListener("submit", e => {
    e.preventDefault();
    searchRequest({ method: "POST", headers: { "content-type": "application/json" },
                    body: JSON.stringify({ text: $("#query").value, k: 10 }) });
  });
  $("#search-photo").addEventListener("change", e => {
    const form = new FormData();
    form.append("image", e.target.files[0], e.target.files[0].name);
    form.append("k", "10");
    searchRequest({ method: "POST", body: form });
    e.target.value = "";
  });
}

wire();
health().catch(e => { $("#model").textContent = "cannot reach the server: " + e.message; });
