// hiercon's page: query by a dropped / picked / pasted image, an example, or a result; narrow by
// the category tree and by attribute values. Every control is a native button, input or label.
"use strict";
const $ = (id) => document.getElementById(id);
let lastQuery = null; // {kind: "image", blob} or {kind: "item", id}
let started = 0; // searches started; only the latest one's answer is shown
let shown = 0; // answers shown (also #results' data-searches, which the browser test waits on)
const state = { category: "", attributes: new Map() }; // attribute name -> value (text)

function params() {
  const p = new URLSearchParams();
  p.set("k", String(Math.min(100, Math.max(1, parseInt($("k").value, 10) || 12))));
  if (state.category) p.set("category", state.category);
  if ($("group").checked) p.set("group_by", "product");
  for (const [name, value] of state.attributes) p.set(`attr.${name}`, value);
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

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children) e.append(c);
  return e;
}

// --- results -------------------------------------------------------------------------------

function attributeButtons(attributes) {
  const names = Object.keys(attributes || {});
  if (!names.length) return null;
  const ul = el("ul", { className: "attrs" });
  for (const name of names) {
    const value = String(attributes[name]);
    const b = el("button", { type: "button", className: "attr", textContent: `${name}: ${value}` });
    b.dataset.name = name;
    b.dataset.value = value;
    b.setAttribute("aria-label", `Only items with ${name} ${value}`);
    b.addEventListener("click", () => {
      state.attributes.set(name, value);
      showFilters();
      run();
    });
    ul.append(el("li", {}, b));
  }
  return ul;
}

function render(res, label) {
  const ol = $("results");
  ol.replaceChildren();
  for (const h of res.hits) {
    const li = el("li", {});
    li.dataset.id = h.id;
    const name = h.title || h.product;
    const open = el("button", { type: "button", className: "result" });
    open.setAttribute("aria-label", `Search items like ${name} (${h.id})`);
    open.append(
      el("img", { src: h.image_url, alt: name, loading: "lazy" }),
      el("span", { className: "title", textContent: name }),
    );
    open.addEventListener("click", () => searchItem(h.id));
    li.append(
      open,
      el("div", { className: "cat", textContent: h.category }),
      el("div", { className: "variation", textContent: `${h.variation}${h.view ? ` · ${h.view}` : ""}` }),
      el("div", { className: "score", textContent: `score ${h.score.toFixed(3)}` }),
    );
    const attrs = attributeButtons(h.attributes);
    if (attrs) li.append(attrs);
    ol.append(li);
  }
  $("summary").textContent =
    `${res.hits.length} results for ${label} · ${res.path} search over ${res.allowed} items · ${res.generation} · ${res.took_ms.toFixed(1)} ms`;
  const pred = $("prediction");
  pred.replaceChildren();
  if (res.predicted) {
    const p = res.predicted;
    const link = el("button", { type: "button", id: "predicted", className: "link", textContent: p.category });
    link.setAttribute("aria-label", `Show the category ${p.category}`);
    link.addEventListener("click", () => selectCategory(p.category));
    pred.append("Looks like: ", link, ` (${Math.round(p.confidence * 100)}% of ${p.neighbours} neighbours)`);
  }
}

async function run() {
  if (!lastQuery) return;
  const mine = ++started;
  showError("");
  $("summary").textContent = "searching…";
  const q = lastQuery;
  let res, label, error;
  try {
    if (q.kind === "image") {
      const form = new FormData();
      form.append("image", q.blob, q.blob.name || "query");
      [res, label] = [await call(`/v1/search?${params()}`, { method: "POST", body: form }), "your image"];
    } else {
      const path = `/v1/search/similar/${encodeURIComponent(q.id)}?${params()}`;
      [res, label] = [await call(path, { method: "POST" }), `item ${q.id}`];
    }
  } catch (e) {
    error = e;
  }
  if (mine !== started) return; // a newer search is under way
  if (error) {
    $("summary").textContent = "";
    showError(error.message);
  } else {
    render(res, label);
  }
  $("results").dataset.searches = String(++shown);
}

function showPreview(src, alt) {
  const prev = $("preview");
  prev.src = src;
  prev.alt = alt;
  prev.hidden = false;
}

function searchImage(blob) {
  if (!blob) return;
  lastQuery = { kind: "image", blob };
  const prev = $("preview");
  if (prev.dataset.url) URL.revokeObjectURL(prev.dataset.url);
  prev.dataset.url = URL.createObjectURL(blob);
  showPreview(prev.dataset.url, "your image");
  run();
}

function searchItem(id, alt) {
  lastQuery = { kind: "item", id };
  showPreview(`/v1/images/${encodeURIComponent(id)}`, alt || `item ${id}`);
  run();
}

// --- filters: the category tree and attribute values ------------------------------------------

function showFilters() {
  const f = $("filters");
  f.replaceChildren();
  if (!state.attributes.size) return;
  f.append("Only: ");
  for (const [name, value] of state.attributes) {
    const b = el("button", { type: "button", className: "chip", textContent: `${name} = ${value} ✕` });
    b.setAttribute("aria-label", `Remove the filter ${name} = ${value}`);
    b.addEventListener("click", () => {
      state.attributes.delete(name);
      showFilters();
      run();
    });
    f.append(b, " ");
  }
}

function setExpanded(toggle, open) {
  toggle.setAttribute("aria-expanded", String(open));
  toggle.textContent = open ? "▾" : "▸";
  toggle.parentElement.querySelector(":scope > ul").hidden = !open;
}

let branchId = 0;
function addBranches(ul, nodes) {
  for (const n of nodes) {
    const li = el("li", {});
    const select = el("button", { type: "button", className: "branch" });
    select.dataset.path = n.path;
    select.setAttribute("aria-pressed", "false");
    select.append(el("span", { textContent: n.name }), " ", el("span", { className: "count", textContent: `(${n.items})` }));
    select.setAttribute("aria-label", `${n.name}, ${n.items} items`);
    select.addEventListener("click", () => selectCategory(n.path));
    if (n.children.length) {
      const childId = `branch-${++branchId}`;
      const toggle = el("button", { type: "button", className: "toggle" });
      toggle.setAttribute("aria-controls", childId);
      toggle.setAttribute("aria-label", `Show or hide the categories in ${n.name}`);
      const sub = el("ul", { id: childId });
      toggle.addEventListener("click", () => setExpanded(toggle, toggle.getAttribute("aria-expanded") !== "true"));
      li.append(toggle, select, sub);
      addBranches(sub, n.children);
      setExpanded(toggle, false);
    } else {
      const spacer = el("span", { className: "leaf" });
      spacer.setAttribute("aria-hidden", "true");
      li.append(spacer, select);
    }
    ul.append(li);
  }
}

// Selects a branch (its whole subtree, as the API's category filter does), opening its ancestors.
function selectCategory(path) {
  state.category = path;
  for (const b of document.querySelectorAll("#browse .branch")) {
    b.setAttribute("aria-pressed", String((b.dataset.path || "") === path));
  }
  const chosen = [...document.querySelectorAll("#tree .branch")].find((b) => b.dataset.path === path);
  for (let li = chosen && chosen.parentElement; li; li = li.parentElement.closest("li")) {
    const toggle = li.querySelector(":scope > .toggle");
    if (toggle && li !== chosen.parentElement) setExpanded(toggle, true);
  }
  run();
}

async function loadExamples() {
  const ul = $("examples");
  ul.replaceChildren();
  const ex = await call("/v1/examples");
  for (const it of ex.items) {
    const name = it.title || it.id;
    const b = el("button", { type: "button", className: "example" });
    b.dataset.id = it.id;
    b.setAttribute("aria-label", `Search with the example ${name} (${it.category})`);
    b.append(el("img", { src: it.image_url, alt: name }), el("span", { textContent: name }));
    b.addEventListener("click", () => searchItem(it.id, name));
    ul.append(el("li", {}, b));
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
  $("file").addEventListener("change", (e) => searchImage(e.target.files[0]));
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) searchImage(item.getAsFile());
  });
  $("options").addEventListener("submit", (e) => { e.preventDefault(); run(); });
  for (const id of ["group", "k"]) $(id).addEventListener("change", run);
  $("all").addEventListener("click", () => selectCategory(""));
  try {
    const ready = await call("/readyz");
    $("status").textContent = `${ready.generation} · ${ready.items} items`;
    const tax = await call("/v1/taxonomy");
    addBranches($("tree"), tax.roots);
    await loadExamples();
  } catch (e) {
    $("status").textContent = "index not loaded yet";
    showError(e.message);
  }
}

init();
