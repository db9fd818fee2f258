// hiercon's page: query by a dropped / picked / pasted image, or by clicking a result.
"use strict";
const $ = (id) => document.getElementById(id);
let lastQuery = null; // {kind: "image", blob} or {kind: "item", id}

function params() {
  const p = new URLSearchParams();
  p.set("k", String(Math.min(100, Math.max(1, parseInt($("k").value, 10) || 12))));
  if ($("category").value) p.set("category", $("category").value);
  if ($("group").checked) p.set("group_by", "product");
  return p;
}

function showError(msg) {
  $("error").textContent = msg || "";
  $("error").hidden = !msg;
}

async function call(url, init) {
  const r = await fetch(url, init);
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error(body && body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${r.status}`);
  return body;
}

function render(res, label) {
  const ol = $("results");
  ol.replaceChildren();
  for (const h of res.hits) {
    const li = document.createElement("li");
    li.dataset.id = h.id;
    li.title = `Search items like ${h.id}`;
    const img = document.createElement("img");
    img.src = h.image_url;
    img.alt = h.id;
    img.loading = "lazy";
    const lines = [
      ["score", h.score.toFixed(3)],
      ["cat", h.category],
      ["", `product ${h.product}`],
      ["", `variation ${h.variation}`],
      ["id", h.id],
    ];
    li.append(img);
    for (const [cls, text] of lines) {
      const d = document.createElement("div");
      if (cls) d.className = cls;
      d.textContent = text;
      li.append(d);
    }
    li.addEventListener("click", () => searchItem(h.id));
    ol.append(li);
  }
  $("summary").textContent =
    `${res.hits.length} results for ${label} · ${res.path} search over ${res.allowed} items · ${res.generation} · ${res.took_ms.toFixed(1)} ms`;
  $("prediction").textContent = res.predicted
    ? `Looks like: ${res.predicted.category} (${Math.round(res.predicted.confidence * 100)}% of ${res.predicted.neighbours} neighbours)`
    : "";
}

async function run() {
  if (!lastQuery) return;
  showError("");
  $("summary").textContent = "searching…";
  try {
    if (lastQuery.kind === "image") {
      const form = new FormData();
      form.append("image", lastQuery.blob, lastQuery.blob.name || "query");
      render(await call(`/v1/search?${params()}`, { method: "POST", body: form }), "your image");
    } else {
      const id = lastQuery.id;
      render(await call(`/v1/search/similar/${encodeURIComponent(id)}?${params()}`, { method: "POST" }), `item ${id}`);
      $("preview").src = `/v1/images/${encodeURIComponent(id)}`;
      $("preview").hidden = false;
    }
  } catch (e) {
    $("summary").textContent = "";
    showError(e.message);
  }
}

function searchImage(blob) {
  if (!blob) return;
  lastQuery = { kind: "image", blob };
  const prev = $("preview");
  if (prev.dataset.url) URL.revokeObjectURL(prev.dataset.url);
  prev.dataset.url = URL.createObjectURL(blob);
  prev.src = prev.dataset.url;
  prev.hidden = false;
  run();
}

function searchItem(id) {
  lastQuery = { kind: "item", id };
  run();
}

function addOptions(select, nodes, depth) {
  for (const n of nodes) {
    const o = document.createElement("option");
    o.value = n.path;
    o.textContent = `${"\u00a0\u00a0".repeat(depth)}${n.name} (${n.items})`;
    select.append(o);
    addOptions(select, n.children, depth + 1);
  }
}

async function init() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    searchImage(e.dataTransfer.files[0]);
  });
  drop.addEventListener("click", (e) => { if (e.target.tagName !== "INPUT") $("file").click(); });
  $("file").addEventListener("change", (e) => searchImage(e.target.files[0]));
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) searchImage(item.getAsFile());
  });
  for (const id of ["category", "group", "k"]) $(id).addEventListener("change", run);
  try {
    const ready = await call("/readyz");
    $("status").textContent = `${ready.generation} · ${ready.items} items`;
    const tax = await call("/v1/taxonomy");
    addOptions($("category"), tax.roots, 0);
  } catch (e) {
    $("status").textContent = "index not loaded yet";
    showError(e.message);
  }
}

init();
