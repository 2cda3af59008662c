// convscope web page: plain JS, no build step, no CDN. Every URL is relative to the page,
// so the app works behind a proxy path prefix (Jupyter, Colab, SageMaker).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, imageName: "", methods: {}, model: null, job: null, busy: false };

function setStatus(text, error = false) {
  const box = $("status");
  box.textContent = text;
  box.classList.toggle("error", error);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || JSON.stringify(body);
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

function form(extra) {
  const data = new FormData();
  data.append("image", state.image, state.imageName);
  data.append("model", $("model").value);
  for (const [k, v] of Object.entries(extra)) if (v !== null && v !== undefined && v !== "") data.append(k, v);
  return data;
}

// ------------------------------------------------------------ image in, top-5 out

async function useImage(blob, name) {
  state.image = blob;
  state.imageName = name;
  $("photo").src = URL.createObjectURL(blob);
  $("photo-caption").textContent = name;
  $("photo-box").hidden = false;
  $("results").textContent = "";
  await classify();
}

async function classify() {
  setStatus("Classifying…");
  const response = await fetch("api/classify", { method: "POST", body: form({ topk: 5 }) });
  if (!response.ok) {
    $("predictions-box").hidden = true;
    $("explain").hidden = true;
    setStatus(await errorText(response), true);
    return;
  }
  const body = await response.json();
  const rows = $("predictions").querySelector("tbody");
  rows.textContent = "";
  for (const p of body.predictions) {
    const tr = document.createElement("tr");
    const pct = (100 * p.probability).toFixed(2);
    for (const [text, cls] of [[p.label, ""], [p.index, "num"], [pct + "%", "num"]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    const bar = document.createElement("td");
    bar.innerHTML = `<span class="bar" style="width:${Math.round(p.probability * 100)}px"></span>`;
    tr.appendChild(bar);
    tr.classList.add("prediction");
    rows.appendChild(tr);
  }
  $("model-line").textContent = `${body.model}, weights: ${body.weights}`;
  $("predictions-box").hidden = false;
  $("explain").hidden = false;
  fillClasses(body.predictions);
  setStatus("Pick a method and press Show.");
}

// ------------------------------------------------------------ the form, from the registry

async function loadMethods() {
  const body = await (await fetch("api/methods")).json();
  for (const m of body.methods) state.methods[m.name] = m;
}

async function loadModel() {
  const name = $("model").value;
  const response = await fetch("api/model?model=" + encodeURIComponent(name));
  if (!response.ok) { setStatus(await errorText(response), true); return; }
  state.model = await response.json();
  fillClasses([]);
  methodChanged();
}

function fillClasses(top) {
  const list = $("classes");
  list.textContent = "";
  const seen = new Set();
  const add = (value, label) => {
    if (seen.has(value)) return;
    seen.add(value);
    const option = document.createElement("option");
    option.value = value;
    option.label = label;
    list.appendChild(option);
  };
  for (const p of top) add(p.label, `top: ${(100 * p.probability).toFixed(1)}%`);
  if (state.model) state.model.categories.forEach((c, i) => add(c, `class ${i}`));
}

function fillLayers(method) {
  const select = $("layer");
  const previous = select.value;
  select.textContent = "";
  $("layer-label").hidden = method.layer === "none";
  if (!state.model || method.layer === "none") return;
  const option = (value, text, parent) => {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text;
    parent.appendChild(o);
    return o;
  };
  if (method.layer === "optional" || method.layer === "many") {
    option("", method.layer === "many" ? "all conv stages" : "default", select);
  }
  const stages = document.createElement("optgroup");
  stages.label = "conv stages";
  for (const s of state.model.stages) option(s.alias, `${s.alias} (${s.path})`, stages);
  select.appendChild(stages);
  const convs = document.createElement("optgroup");
  convs.label = "all layers";
  for (const l of state.model.layers) option(l.name, `${l.name} · ${l.type}`, convs);
  select.appendChild(convs);
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  else if (method.layer === "required" && state.model.stages.length) {
    select.value = state.model.stages[Math.floor(state.model.stages.length / 2)].alias;
  }
}

function fillOptions(method) {
  const box = $("options");
  box.textContent = "";
  for (const p of method.params) {
    const label = document.createElement("label");
    label.title = p.help;
    label.append(p.name.replace(/_/g, " "));
    let input;
    if (p.choices && p.type !== "fill") {
      input = document.createElement("select");
      for (const c of p.choices) {
        const o = document.createElement("option");
        o.value = o.textContent = c;
        input.appendChild(o);
      }
      input.value = p.default;
    } else if (p.type === "bool") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = !!p.default;
    } else {
      input = document.createElement("input");
      input.type = p.type === "int" || p.type === "float" ? "number" : "text";
      if (p.minimum !== null) input.min = p.minimum;
      if (p.maximum !== null) input.max = p.maximum;
      if (p.type === "float") input.step = "any";
      input.value = p.default === null ? "" : p.default;
      if (p.optional) input.placeholder = "auto";
    }
    input.name = p.name;
    input.dataset.option = p.type;
    label.appendChild(input);
    box.appendChild(label);
  }
  $("options-box").hidden = method.params.length === 0;
}

function methodChanged() {
  const method = state.methods[$("method").value];
  if (!method) return;
  $("method-summary").textContent = method.summary + (method.cost === "slow" ? " Runs as a job you can cancel." : "");
  $("target-label").hidden = !method.takes_target;
  fillLayers(method);
  fillOptions(method);
}

function options() {
  const out = {};
  for (const input of $("options").querySelectorAll("[data-option]")) {
    out[input.name] = input.type === "checkbox" ? String(input.checked) : input.value;
  }
  return out;
}

// ------------------------------------------------------------ running a method

function figure(src, title, caption) {
  const fig = document.createElement("figure");
  fig.className = "view";
  const img = document.createElement("img");
  img.src = src;
  img.alt = title;
  const cap = document.createElement("figcaption");
  const b = document.createElement("b");
  b.textContent = title + ". ";
  cap.append(b, caption);
  fig.append(img, cap);
  return fig;
}

function busy(on, slow = false) {
  state.busy = on;
  $("run").disabled = on;
  $("cancel").hidden = !(on && slow);
  $("progress").hidden = !(on && slow);
}

async function run(event) {
  event.preventDefault();
  if (!state.image || state.busy) return;
  const method = state.methods[$("method").value];
  const fields = { method: method.name, ...options() };
  if (method.layer !== "none" && $("layer").value) fields.layer = $("layer").value;
  if (method.takes_target && $("target").value.trim()) fields.target = $("target").value.trim();
  if (method.cost === "slow") return runJob(method, fields);
  busy(true);
  setStatus(`Running ${method.title}…`);
  try {
    const response = await fetch("api/explain", { method: "POST", body: form(fields) });
    if (!response.ok) { setStatus(await errorText(response), true); return; }
    const blob = await response.blob();
    const title = decodeURIComponent(response.headers.get("X-Convscope-Title") || method.title);
    const caption = decodeURIComponent(response.headers.get("X-Convscope-Caption") || "");
    $("results").textContent = "";
    $("results").appendChild(figure(URL.createObjectURL(blob), title, caption));
    setStatus(`${method.title} done.`);
  } catch (err) {
    setStatus(String(err), true);
  } finally {
    busy(false);
  }
}

async function runJob(method, fields) {
  busy(true, true);
  setStatus(`Starting ${method.title}…`);
  const response = await fetch("api/jobs", { method: "POST", body: form(fields) });
  if (!response.ok) { busy(false); setStatus(await errorText(response), true); return; }
  let job = await response.json();
  state.job = job.id;
  while (["queued", "running"].includes(job.status)) {
    const { done, total } = job.progress;
    $("progress").max = total || 1;
    $("progress").value = total ? done : 0;
    setStatus(`${method.title}: ${job.status}` + (total ? ` ${done} of ${total}` : done ? ` (${done} passes)` : ""));
    await new Promise((r) => setTimeout(r, 400));
    const poll = await fetch(`api/jobs/${job.id}`);
    if (!poll.ok) { setStatus(await errorText(poll), true); break; }
    job = await poll.json();
  }
  state.job = null;
  busy(false);
  if (job.status === "done") {
    $("results").textContent = "";
    for (const v of job.views) {
      $("results").appendChild(figure(`api/jobs/${job.id}/views/${encodeURIComponent(v.key)}.png`, v.title, v.caption));
    }
    setStatus(`${method.title} done.`);
  } else if (job.status === "cancelled") {
    setStatus(`${method.title} cancelled.`);
  } else if (job.status === "error") {
    setStatus(job.error, true);
  }
}

async function cancel() {
  if (state.job) await fetch(`api/jobs/${state.job}`, { method: "DELETE" });
}

// ------------------------------------------------------------ the atlas (convscope serve --atlas)
// Tabs and the atlas section are built here, only when the server has an atlas (GET api/atlas is
// 200). The address says what is shown: #atlas, #atlas/<layer>, #atlas/<layer>/<unit>, #atlas-photo.

const atlas = { index: null, layers: {}, photo: null, token: 0 };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function number(value, digits = 3) {
  return typeof value === "number" ? Number(value.toPrecision(digits)).toString() : "—";
}

function decoded(text) {
  try { return decodeURIComponent(text); } catch (_) { return text; }
}

function unitHash(layer, unit) {
  return `#atlas/${encodeURIComponent(layer)}` + (unit === undefined ? "" : `/${unit}`);
}

async function loadAtlas() {
  const response = await fetch("api/atlas");
  if (!response.ok) return;  // no atlas on this server: no tabs
  atlas.index = await response.json();
  for (const layer of atlas.index.layers) atlas.layers[layer.name] = layer;
  buildAtlas();
  window.addEventListener("hashchange", route);
  route();
}

function buildAtlas() {
  const tabs = el("nav", { id: "tabs", className: "tabs", role: "tablist" },
    el("a", { href: "#", id: "tab-explain", role: "tab" }, "Explain"),
    el("a", { href: "#atlas", id: "tab-atlas", role: "tab" }, "Atlas"));
  document.querySelector("header.top").after(tabs);
  const i = atlas.index;
  const from = i.data ? ` from ${i.images ?? "?"} images of ${i.data}` : "";
  const section = el("section", { id: "atlas" },
    el("h2", {}, "Atlas"),
    el("p", { className: "muted", id: "atlas-meta" }, `${i.model}, weights: ${i.weights ?? "?"}; units mined${from}.`),
    el("nav", { id: "atlas-layers", className: "atlas-layers" }),
    el("div", { id: "atlas-body" }));
  const links = section.querySelector("#atlas-layers");
  for (const layer of i.layers) {
    const of = layer.channels ? ` of ${layer.channels}` : "";
    links.append(el("a", { href: unitHash(layer.name), className: "layer-link", dataset: { layer: layer.name } },
      el("b", {}, layer.name), el("span", { className: "muted" }, ` ${layer.units.length}${of} units`)));
  }
  links.append(el("a", { href: "#atlas-photo", className: "layer-link photo-link" }, el("b", {}, "Units for this photo")));
  $("explain").after(section);
}

function route() {
  if (!atlas.index) return;
  const hash = decoded(location.hash.slice(1));
  const inAtlas = hash === "atlas" || hash.startsWith("atlas/") || hash === "atlas-photo";
  document.body.dataset.tab = inAtlas ? "atlas" : "explain";
  $("tab-atlas").classList.toggle("current", inAtlas);
  $("tab-explain").classList.toggle("current", !inAtlas);
  if (!inAtlas) return;
  // #atlas/<layer>/<unit>: the unit is the last part, and a layer name has no "/".
  const parts = location.hash.slice(1).split("/").map(decoded);
  const layer = parts[1] ? atlas.layers[parts[1]] : null;
  for (const link of document.querySelectorAll("#atlas-layers a")) {
    link.classList.toggle("current", layer ? link.dataset.layer === layer.name : hash === "atlas-photo" && link.classList.contains("photo-link"));
  }
  const body = $("atlas-body");
  body.textContent = "";
  atlas.token += 1;
  if ($("atlas").getBoundingClientRect().top < 0) $("atlas").scrollIntoView();  // a new view starts at its top
  if (hash === "atlas-photo") return showPhotoPanel(body);
  if (parts[1] && !layer) { body.append(el("p", { className: "status error" }, `No layer ${parts[1]} in this atlas.`)); return; }
  if (!layer) { body.append(el("p", { className: "muted" }, "Pick a layer to see its units.")); return; }
  if (parts.length > 2) return showUnit(body, layer, parts[2], atlas.token);
  showGrid(body, layer);
}

function showGrid(body, layer) {
  body.append(el("h3", {}, `${layer.name}` + (layer.path && layer.path !== layer.name ? ` (${layer.path})` : "")));
  const grid = el("div", { className: "unit-grid", id: "unit-grid" });
  layer.units.forEach((unit, k) => {
    grid.append(el("a", { href: unitHash(layer.name, unit), className: "unit-card", dataset: { unit: String(unit) } },
      el("img", { src: layer.thumbnails[k], alt: `feature visualisation of unit ${unit}`, loading: "lazy" }),
      el("span", {}, `unit ${unit}`)));
  });
  body.append(grid);
}

function picture(src, title, caption, className = "") {
  return el("figure", { className: "view " + className },
    el("img", { src, alt: title }),
    el("figcaption", {}, el("b", {}, title + ". "), caption));
}

function statsTable(stats) {
  const rows = [
    ["mean activation", number(stats.mean)],
    ["max activation", number(stats.max)],
    ["firing", typeof stats.firing === "number" ? `${(100 * stats.firing).toFixed(1)}% of images` : "—"],
  ];
  const table = el("table", { className: "stats", id: "unit-stats" });
  for (const [name, value] of rows) table.append(el("tr", {}, el("th", {}, name), el("td", { className: "num" }, value)));
  const classes = (stats.classes || []).map((c) => `${c.label ?? "class " + c.class} × ${c.count}`).join(", ");
  table.append(el("tr", {}, el("th", {}, "classes of the top images"), el("td", {}, classes || "—")));
  return table;
}

function patchGrid(patches, mapTitle, id) {
  const grid = el("div", { className: "patch-grid", id });
  patches.forEach((p, k) => {
    const where = typeof p.image === "string" ? p.image.split("/").pop() : `image ${p.image}`;
    grid.append(el("figure", { className: "patch" },
      el("div", { className: "pair" },
        el("img", { src: p.crop, alt: `patch ${k + 1}: the image under the receptive field` }),
        el("img", { src: p.projection, alt: `patch ${k + 1}: ${mapTitle}` })),
      el("figcaption", {}, `${k + 1}. ${number(p.value)} · ${where}`)));
  });
  return grid;
}

async function showUnit(body, layer, unitText, token) {
  const response = await fetch(`api/atlas/${encodeURIComponent(layer.name)}/${encodeURIComponent(unitText)}`);
  if (token !== atlas.token) return;  // the user went elsewhere meanwhile
  if (!response.ok) { body.append(el("p", { className: "status error" }, await errorText(response))); return; }
  const u = await response.json();
  const k = layer.units.indexOf(u.unit);
  const nav = el("p", { className: "unit-nav" }, el("a", { href: unitHash(layer.name) }, `← all units of ${layer.name}`));
  if (k > 0) nav.append(" · ", el("a", { href: unitHash(layer.name, layer.units[k - 1]), rel: "prev" }, `unit ${layer.units[k - 1]}`));
  if (k >= 0 && k + 1 < layer.units.length) {
    nav.append(" · ", el("a", { href: unitHash(layer.name, layer.units[k + 1]), rel: "next" }, `unit ${layer.units[k + 1]}`));
  }
  const view = el("div", { id: "unit-view", dataset: { layer: u.layer, unit: String(u.unit) } },
    el("h3", {}, `${u.layer} · unit ${u.unit}`), nav,
    el("div", { className: "unit-top" },
      picture(u.featurevis, "Feature visualisation", `what excites the unit most (objective ${number(u.objective)})`, "featurevis"),
      picture(u.negative, "Negative", `what suppresses it most (objective ${number(u.negative_objective)})`, "negative"),
      el("div", {}, el("h3", {}, "Statistics over the dataset"), statsTable(u.stats || {}))),
    el("h3", {}, `Top ${u.patches.length} dataset patches`),
    el("p", { className: "muted" }, "Each: the image under the receptive field, then its deconvnet projection; the number is the unit's maximum there."),
    patchGrid(u.patches, "deconvnet projection", "unit-patches"));
  if (u.relevance_patches && u.relevance_patches.length) {
    view.append(el("h3", {}, `Top ${u.relevance_patches.length} by relevance`),
      el("p", { className: "muted" }, "Ranked by the unit's conditional relevance for the class (CRP): the patch, then where the relevance through the unit comes from."),
      patchGrid(u.relevance_patches, "conditional relevance map", "unit-relevance"));
  }
  body.append(view);
}

// ---------------- units for this photo

function showPhotoPanel(body) {
  const layer = el("select", { id: "atlas-photo-layer" });
  for (const l of atlas.index.layers) layer.append(el("option", { value: l.name, textContent: l.name }));
  const middle = atlas.index.layers[Math.floor((atlas.index.layers.length - 1) / 2)];
  layer.value = atlas.photo?.layer || middle.name;
  const count = el("input", { id: "atlas-photo-count", type: "number", min: 1, max: 256, value: atlas.photo?.count || 9 });
  const file = el("input", { id: "atlas-photo-file", type: "file", accept: "image/*", hidden: true });
  const samples = el("span", { id: "atlas-photo-samples" });
  const controls = el("form", { id: "atlas-photo-form", className: "controls" },
    el("label", { className: "button" }, "choose a photo", file), samples,
    el("label", {}, "Layer", layer), el("label", {}, "Units", count),
    el("button", { type: "submit", id: "atlas-photo-run" }, "Find units"));
  if (state.image) {
    samples.append(el("button", { type: "button", className: "sample", onclick: () => pick({ blob: state.image, name: state.imageName }) },
      "the Explain photo"));
  }
  const status = el("p", { id: "atlas-photo-status", className: "status", role: "status" });
  const results = el("div", { id: "atlas-photo-units", className: "photo-units" });
  body.append(el("h3", {}, "Units for this photo"),
    el("p", { className: "muted" }, "The atlas units of a layer that fire most on a photo (the channel's maximum over its map), each with its activation map over the photo. Click one to open it."),
    controls, status, results);
  fetch("api/samples").then((r) => r.json()).then((list) => {
    for (const s of list.samples) {
      samples.append(el("button", { type: "button", className: "sample", dataset: { sample: s.name }, onclick: () => pick({ sample: s.name, name: s.name }) }, s.title));
    }
  });
  const pick = (photo) => { atlas.photo = { ...atlas.photo, ...photo, blob: photo.blob || null, sample: photo.sample || null }; findUnits(); };
  file.addEventListener("change", (e) => { const f = e.target.files[0]; if (f) pick({ blob: f, name: f.name }); });
  controls.addEventListener("submit", (e) => { e.preventDefault(); findUnits(); });
  layer.addEventListener("change", () => { if (atlas.photo?.name) findUnits(); });
  if (atlas.photo?.results) renderPhotoUnits(atlas.photo.results);
}

async function findUnits() {
  const status = $("atlas-photo-status");
  const photo = atlas.photo;
  if (!photo || !photo.name) { status.textContent = "Choose a photo first."; return; }
  photo.layer = $("atlas-photo-layer").value;
  photo.count = $("atlas-photo-count").value || "9";
  const data = new FormData();
  if (photo.sample) data.append("sample", photo.sample);
  else data.append("image", photo.blob, photo.name);
  data.append("layer", photo.layer);
  data.append("count", photo.count);
  status.classList.remove("error");
  status.textContent = `Finding the units of ${photo.layer} for ${photo.name}…`;
  $("atlas-photo-run").disabled = true;
  try {
    const response = await fetch("api/atlas/units", { method: "POST", body: data });
    if (!response.ok) { status.textContent = await errorText(response); status.classList.add("error"); return; }
    photo.results = await response.json();
    renderPhotoUnits(photo.results);
    status.textContent = `${photo.results.units.length} units of ${photo.results.layer} for ${photo.results.image}.`;
  } catch (err) {
    status.textContent = String(err);
    status.classList.add("error");
  } finally {
    if ($("atlas-photo-run")) $("atlas-photo-run").disabled = false;
  }
}

function renderPhotoUnits(results) {
  const box = $("atlas-photo-units");
  if (!box) return;
  box.textContent = "";
  for (const u of results.units) {
    const of = typeof u.dataset_max === "number" ? ` (dataset max ${number(u.dataset_max)})` : "";
    box.append(el("a", { href: u.anchor, className: "photo-unit", dataset: { unit: String(u.unit) } },
      el("img", { src: u.map, alt: `activation map of unit ${u.unit} over the photo` }),
      el("img", { src: u.featurevis, alt: `feature visualisation of unit ${u.unit}`, className: "thumb", loading: "lazy" }),
      el("span", {}, el("b", {}, `unit ${u.unit}`), ` · max ${number(u.value)}${of}`)));
  }
}

// ------------------------------------------------------------ wiring

function wire() {
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) useImage(file, file.name);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) useImage(file, file.name);
  });
  for (const button of document.querySelectorAll("button.sample")) {
    button.addEventListener("click", async () => {
      const name = button.dataset.sample;
      const response = await fetch("api/samples/" + encodeURIComponent(name));
      if (!response.ok) { setStatus(await errorText(response), true); return; }
      useImage(await response.blob(), name);
    });
  }
  $("method").addEventListener("change", methodChanged);
  $("model").addEventListener("change", async () => { await loadModel(); if (state.image) classify(); });
  $("explain-form").addEventListener("submit", run);
  $("cancel").addEventListener("click", cancel);
}

async function loadModels() {
  const body = await (await fetch("api/models")).json();
  const select = $("model");
  select.textContent = "";
  for (const name of body.models) {
    const o = document.createElement("option");
    o.value = o.textContent = name;
    select.appendChild(o);
  }
  select.value = body.default;
}

(async () => {
  wire();
  try {
    await Promise.all([loadMethods(), loadModels(), loadAtlas()]);
    await loadModel();
    document.body.dataset.ready = "yes";
  } catch (err) {
    setStatus("Could not reach the server: " + err, true);
  }
})();
