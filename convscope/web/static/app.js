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
    await Promise.all([loadMethods(), loadModels()]);
    await loadModel();
    document.body.dataset.ready = "yes";
  } catch (err) {
    setStatus("Could not reach the server: " + err, true);
  }
})();
