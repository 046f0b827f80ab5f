// reverie's page: one form over the JSON API (the same routes any client uses). No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], job: null, polling: null };

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = sessionStorage.getItem("reverie-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  let res;
  try {
    res = await fetch(path, { method, headers: headers(body !== undefined),
                              body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new Error("the server cannot be reached (" + e.message + ")");
  }
  let data = null;
  try { data = await res.json(); } catch (e) { /* not JSON: reported below */ }
  if (res.status === 401) {
    $("key-row").classList.remove("hidden");
    throw new Error("this server needs its API key: type it in the API key field and try again");
  }
  if (!res.ok) {
    const detail = data && data.detail ? data.detail : res.statusText;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return data;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.classList.toggle("hidden", !message);
}

function setStatus(text, fraction) {
  $("status").textContent = text;
  $("bar").style.width = Math.round(100 * (fraction || 0)) + "%";
}

function option(value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  return o;
}

function applyDefaults() {
  const m = state.models.find((x) => x.name === $("model").value);
  if (!m) return;
  $("sampler").value = m.defaults.sampler;
  $("steps").value = m.defaults.steps;
  $("guidance").value = m.defaults.guidance;
  $("prompt").placeholder = m.example_prompts[0] || "";
  $("prompt").disabled = m.conditioning !== "text";
  syncOutputs();
}

function syncOutputs() {
  for (const id of ["steps", "guidance", "strength", "brush"]) $(id + "-out").textContent = $(id).value;
}

async function load() {
  try {
    state.models = await api("GET", "/v1/models");
    const samplers = await api("GET", "/sdapi/v1/samplers");
    $("model").replaceChildren(...state.models.map((m) => option(m.name, m.name)));
    $("sampler").replaceChildren(...samplers.map((s) => option(s.aliases[0], s.aliases[0] + " (" + s.name + ")")));
    const own = state.models.find((m) => m.default);
    if (own) $("model").value = own.name;
    applyDefaults();
    showError("");
  } catch (e) {
    showError(e.message);
  }
}

// -- img2img and inpainting: an uploaded image, and a mask painted over it (white = repaint) -----------------
const edit = { image: null, painted: false, drawing: false };

function loadInitImage(file) {
  const reader = new FileReader();
  reader.onload = () => useInitImage(reader.result);
  reader.readAsDataURL(file);
}

function useInitImage(dataUrl) {
  const img = new Image();
  img.onload = () => {
    edit.image = img;
    edit.dataUrl = dataUrl;
    const ctx = $("init-canvas").getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, 256, 256);
    ctx.drawImage(img, 0, 0, 256, 256);
    clearMask();
    $("edit-tools").classList.remove("hidden");
    $("edit").open = true;
  };
  img.onerror = () => showError("that file is not an image the browser can read");
  img.src = dataUrl;
}

function clearMask() {
  $("mask-canvas").getContext("2d").clearRect(0, 0, 256, 256);
  edit.painted = false;
}

function dropImage() {
  edit.image = null;
  $("init-file").value = "";
  $("edit-tools").classList.add("hidden");
}

function paint(event) {
  if (!edit.drawing) return;
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.beginPath();
  ctx.arc(event.clientX - box.left, event.clientY - box.top, $("brush").value / 2, 0, 2 * Math.PI);
  ctx.fill();
  edit.painted = true;
}

function maskDataUrl() {
  // the painted strokes, at the image's own size, as a black (keep) and white (repaint) PNG
  const w = edit.image.naturalWidth, h = edit.image.naturalHeight;
  const out = document.createElement("canvas");
  out.width = w;
  out.height = h;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, w, h);
  ctx.drawImage($("mask-canvas"), 0, 0, w, h);
  return out.toDataURL("image/png");
}

function request() {
  const seed = parseInt($("seed").value, 10);
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    model: $("model").value,
    sampler_name: $("sampler").value,
    steps: parseInt($("steps").value, 10),
    cfg_scale: parseFloat($("guidance").value),
    seed: Number.isFinite(seed) ? seed : -1,
    batch_size: parseInt($("count").value, 10) || 1,
  };
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const key = $("key").value;
  if (key) sessionStorage.setItem("reverie-key", key);
  $("generate").disabled = true;
  try {
    const body = request();
    let route = "/v1/jobs/txt2img";
    if (edit.image) {
      route = "/v1/jobs/img2img";
      body.init_images = [edit.dataUrl];
      body.denoising_strength = parseFloat($("strength").value);
      if (edit.painted) body.mask = maskDataUrl();
    }
    const job = await api("POST", route, body);
    state.job = job.id;
    $("cancel").disabled = false;
    setStatus("queued", 0);
    poll();
  } catch (e) {
    showError(e.message);
    $("generate").disabled = false;
  }
}

async function poll() {
  const id = state.job;
  if (!id) return;
  let job;
  try {
    job = await api("GET", "/v1/jobs/" + id);
  } catch (e) {
    finish(e.message);
    return;
  }
  if (id !== state.job) return;
  if (job.preview) {
    $("preview").src = "data:image/jpeg;base64," + job.preview;
    $("preview").classList.remove("hidden");
  }
  if (job.state === "queued") setStatus("queued (position " + (job.queue_position + 1) + ")", 0);
  if (job.state === "running") setStatus("step " + job.step + " of " + job.steps, job.step / job.steps);
  if (job.state === "done") {
    addToGallery(job.result);
    setStatus("done: " + job.images + " image(s) in " + job.elapsed.toFixed(2) + " s", 1);
    finish("");
  } else if (job.state === "failed" || job.state === "cancelled") {
    setStatus(job.state, 0);
    finish(job.error ? job.error.detail : job.state);
  } else {
    state.polling = setTimeout(poll, 150);
  }
}

function finish(message) {
  state.job = null;
  $("generate").disabled = false;
  $("cancel").disabled = true;
  showError(message);
}

async function cancel() {
  const id = state.job;
  if (!id) return;
  clearTimeout(state.polling);
  try {
    await api("DELETE", "/v1/jobs/" + id);
  } catch (e) { /* finished meanwhile */ }
  setStatus("cancelled", 0);
  finish("");
}

function addToGallery(result) {
  const info = JSON.parse(result.info);
  const items = result.images.map((b64, i) => figure(b64, info.reverie[i]));
  $("gallery").prepend(...items);
}

function figure(b64, p) {
  const fig = document.createElement("figure");
  fig.className = "item";
  fig.dataset.params = JSON.stringify(p);
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + b64;
  img.alt = p.prompt;
  const cap = document.createElement("figcaption");
  const line = (k, v) => { const b = document.createElement("b"); b.textContent = k + ": ";
                           cap.append(b, String(v), document.createElement("br")); };
  line("prompt", p.prompt || "(none)");
  if (p.negative_prompt) line("negative", p.negative_prompt);
  line("seed", p.seed);
  line("sampler", p.sampler + ", " + p.steps + " steps, guidance " + p.guidance);
  line("model", p.model);
  const actions = document.createElement("div");
  actions.className = "actions";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "reuse";
  reuse.textContent = "reuse parameters";
  reuse.addEventListener("click", () => reuseParameters(p));
  const save = document.createElement("a");
  save.href = img.src;
  save.download = "reverie-" + p.seed + ".png";
  save.textContent = "download";
  const toEdit = document.createElement("button");
  toEdit.type = "button";
  toEdit.className = "edit";
  toEdit.textContent = "edit";
  toEdit.title = "start from this image (img2img, inpainting)";
  toEdit.addEventListener("click", () => { reuseParameters(p); useInitImage(img.src); });
  actions.append(reuse, toEdit, save);
  fig.append(img, cap, actions);
  return fig;
}

function reuseParameters(p) {
  $("prompt").value = p.prompt;
  $("negative").value = p.negative_prompt || "";
  if (state.models.some((m) => m.name === p.model)) $("model").value = p.model;
  $("sampler").value = p.sampler;
  $("steps").value = p.steps;
  $("guidance").value = p.guidance;
  $("seed").value = p.seed;
  $("count").value = 1;
  syncOutputs();
  window.scrollTo({ top: 0, behavior: "smooth" });
}

// -- text: reverie.language's masked diffusion models through /v1/jobs/text --------------------------------
const text = { models: [], job: null };

function showTab(name) {
  for (const [tab, panel] of [["tab-images", "images-panel"], ["tab-text", "text-panel"]]) {
    const on = tab === "tab-" + name;
    $(tab).classList.toggle("active", on);
    $(tab).setAttribute("aria-selected", String(on));
    $(panel).classList.toggle("hidden", !on);
  }
  if (name === "text" && !text.models.length) loadTextModels();
}

async function loadTextModels() {
  try {
    text.models = await api("GET", "/v1/text/models");
    if (!text.models.length) throw new Error("this server has no text model (reverie serve --model TEXT_MODEL)");
    $("text-model").replaceChildren(...text.models.map((m) => option(m.name, m.name)));
    const own = text.models.find((m) => m.default);
    if (own) $("text-model").value = own.name;
    applyTextDefaults();
    textError("");
  } catch (e) {
    textError(e.message);
  }
}

function applyTextDefaults() {
  const m = text.models.find((x) => x.name === $("text-model").value);
  if (!m) return;
  $("text-sampler").replaceChildren(...m.samplers.map((s) => option(s, s)));
  $("text-sampler").value = m.defaults.sampler;
  $("text-steps").value = m.defaults.steps;
  $("text-length").value = m.defaults.length;
  $("text-length").max = m.context;
  $("text-corrector").value = m.defaults.corrector;
  $("text-block").value = m.defaults.corrector_block;
  $("text-block").max = m.context;
}

function textError(message) {
  $("text-error").textContent = message;
  $("text-error").classList.toggle("hidden", !message);
}

function textStatus(message, fraction) {
  $("text-status").textContent = message;
  $("text-bar").style.width = Math.round(100 * (fraction || 0)) + "%";
}

async function generateText(event) {
  event.preventDefault();
  textError("");
  const seed = parseInt($("text-seed").value, 10);
  const body = { model: $("text-model").value, sampler: $("text-sampler").value,
                 steps: parseInt($("text-steps").value, 10), seed: Number.isFinite(seed) ? seed : -1,
                 corrector: parseInt($("text-corrector").value, 10) || 0,
                 corrector_block: parseInt($("text-block").value, 10) || 1 };
  if ($("text-infill").value) body.infill = $("text-infill").value;
  else { body.prompt = $("text-prompt").value; body.length = parseInt($("text-length").value, 10); }
  $("text-generate").disabled = true;
  try {
    const job = await api("POST", "/v1/jobs/text", body);
    text.job = job.id;
    textStatus("queued", 0);
    await pollText(job.id);
  } catch (e) {
    textError(e.message);
  }
  $("text-generate").disabled = false;
}

async function pollText(id) {
  const wait = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  for (;;) {
    const job = await api("GET", "/v1/jobs/" + id);
    if (job.state === "running") textStatus("step " + job.step + " of " + job.steps, job.step / job.steps);
    if (job.state === "done") {
      $("texts").prepend(textFigure(job.result));
      textStatus("done in " + job.elapsed.toFixed(2) + " s", 1);
      return;
    }
    if (job.state === "failed" || job.state === "cancelled") {
      textStatus(job.state, 0);
      throw new Error(job.error ? job.error.detail : job.state);
    }
    await wait(150);
  }
}

function textFigure(result) {
  const p = result.parameters;
  const fig = document.createElement("figure");
  fig.className = "text-item";
  fig.dataset.params = JSON.stringify(p);
  const pre = document.createElement("pre");
  pre.textContent = result.text;
  const cap = document.createElement("figcaption");
  const what = p.infill !== null ? "infill " + JSON.stringify(p.infill) : "prompt " + JSON.stringify(p.prompt) +
    ", " + p.length + " characters";
  cap.textContent = what + " | " + p.sampler + (p.sampler === "edlm" ? " (k " + p.k + ")" : "") + ", " +
    p.steps + " steps" + (p.corrector ? " + " + p.corrector + " corrector sweeps (blocks of " + p.corrector_block +
    (p.energy ? ", towards " + p.energy : ", Gibbs") + ")" : "") + " | seed " + p.seed + " | " + p.model;
  fig.append(pre, cap);
  return fig;
}

$("tab-images").addEventListener("click", () => showTab("images"));
$("tab-text").addEventListener("click", () => showTab("text"));
$("text-form").addEventListener("submit", generateText);
$("text-model").addEventListener("change", applyTextDefaults);
$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
$("dice").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 4294967296); });
$("model").addEventListener("change", applyDefaults);
for (const id of ["steps", "guidance", "strength", "brush"]) $(id).addEventListener("input", syncOutputs);
$("init-file").addEventListener("change", (e) => { if (e.target.files[0]) loadInitImage(e.target.files[0]); });
$("clear-mask").addEventListener("click", clearMask);
$("drop-image").addEventListener("click", dropImage);
$("mask-canvas").addEventListener("pointerdown", (e) => { edit.drawing = true; paint(e); });
$("mask-canvas").addEventListener("pointermove", paint);
window.addEventListener("pointerup", () => { edit.drawing = false; });
load();
