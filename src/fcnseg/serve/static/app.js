// fcnseg page: send a photo to POST /v1/segment, draw the returned class ids over it, and let the user
// hide classes, change opacity, read the class under the pointer and download the mask or the overlay.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  models: [], file: null, ticket: 0, result: null, ids: null, width: 0, height: 0,
  hidden: new Set(), highlight: null, apiKey: sessionStorage.getItem("fcnseg-api-key") || "",
};

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function headers() {
  return state.apiKey ? { "X-API-Key": state.apiKey } : {};
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return body.error.message;
  } catch (e) { /* not JSON: fall through */ }
  return `${resp.status} ${resp.statusText}`;
}

async function loadModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (resp.status === 401) { askForKey(); return; }
  if (!resp.ok) { setStatus(`Could not list models: ${await errorText(resp)}`, true); return; }
  const body = await resp.json();
  state.models = body.models;
  const select = $("model");
  select.replaceChildren(...body.models.map((m) => {
    const opt = document.createElement("option");
    opt.value = m.name;
    const miou = m.metrics && m.metrics.mean_iou != null ? ` — mIoU ${(100 * m.metrics.mean_iou).toFixed(1)}` : "";
    opt.textContent = `${m.name} (${m.num_classes} classes${miou})`;
    return opt;
  }));
  select.value = body.default;
  document.body.dataset.ready = "models";
}

function askForKey() {
  $("keyform").hidden = false;
  setStatus("This server needs an API key.", true);
  $("apikey").focus();
}

function decodeIds(b64, n) {
  const bin = atob(b64);
  if (bin.length !== n) throw new Error(`mask has ${bin.length} pixels, expected ${n}`);
  const ids = new Uint8Array(n);
  for (let i = 0; i < n; i++) ids[i] = bin.charCodeAt(i);
  return ids;
}

async function segment() {
  if (!state.file) return;
  const model = $("model").value;
  const ticket = ++state.ticket;  // a newer request (another photo or model) makes this one stale
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  setStatus(`Segmenting ${state.file.name} with ${model}…`);
  document.body.dataset.ready = "busy";
  const url = `/v1/segment?format=json&include_mask=true&model=${encodeURIComponent(model)}`;
  let resp;
  try {
    resp = await fetch(url, { method: "POST", body: form, headers: headers() });
  } catch (e) {
    setStatus(`The server did not answer (${e.message}).`, true);
    document.body.dataset.ready = "error";
    return;
  }
  if (ticket !== state.ticket) return;
  if (resp.status === 401) { askForKey(); document.body.dataset.ready = "error"; return; }
  if (!resp.ok) {
    setStatus(`Could not segment ${state.file.name}: ${await errorText(resp)}`, true);
    document.body.dataset.ready = "error";
    return;
  }
  const result = await resp.json();
  if (ticket !== state.ticket) return;
  // the browser applies the photo's EXIF orientation like the server does, so sizes agree
  let bitmap = null;
  try {
    bitmap = await createImageBitmap(state.file, { imageOrientation: "from-image" });
  } catch (e) { /* a format the server reads but this browser cannot show (TIFF, PPM): mask alone */ }
  if (ticket !== state.ticket) { if (bitmap) bitmap.close(); return; }
  state.result = result;
  state.width = result.width;
  state.height = result.height;
  state.ids = decodeIds(result.mask_ids, result.width * result.height);
  state.hidden = new Set();
  state.highlight = null;
  const photo = $("photo");
  photo.width = result.width;
  photo.height = result.height;
  const ctx = photo.getContext("2d");
  if (bitmap) {
    ctx.drawImage(bitmap, 0, 0, result.width, result.height);
    bitmap.close();
  } else {
    ctx.fillStyle = "#888";
    ctx.fillRect(0, 0, result.width, result.height);
  }
  $("photo").parentElement.style.setProperty("--aspect", String(result.width / result.height));
  $("mask").width = result.width;
  $("mask").height = result.height;
  $("drop").hidden = true;
  $("viewer").hidden = false;
  $("dlmask").disabled = false;
  $("dloverlay").disabled = false;
  buildLegend();
  drawMask();
  setStatus(`${state.file.name}: ${result.width}×${result.height}, model ${result.model}.` +
            (bitmap ? "" : " This browser cannot display the photo itself; the mask is shown alone."));
  document.body.dataset.ready = "result";
}

function classColor(c) {
  const k = c.display || c.color;
  return `rgb(${k[0]}, ${k[1]}, ${k[2]})`;
}

// Colours a person can tell apart (Kelly's 22 colours of maximum contrast, less white and black): the source
// of display colours for classes whose palette colours are near-identical.
const DISTINCT = [
  [243, 195, 0], [135, 86, 146], [243, 132, 0], [161, 202, 241], [190, 0, 50], [194, 178, 128], [132, 132, 130],
  [0, 136, 86], [230, 143, 172], [0, 103, 165], [249, 147, 121], [96, 78, 151], [246, 166, 0], [179, 68, 108],
  [220, 211, 0], [136, 45, 23], [141, 182, 0], [101, 69, 34], [226, 88, 34], [43, 61, 38],
];
const NEAR = 50;  // CIE76 colour difference (in CIELAB) under which two classes drawn side by side look alike

function toLab(rgb) {  // sRGB 0..255 -> CIELAB under D65
  const [r, g, b] = rgb.map((v) => { v /= 255; return v > 0.04045 ? ((v + 0.055) / 1.055) ** 2.4 : v / 12.92; });
  const xyz = [(0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047, 0.2126 * r + 0.7152 * g + 0.0722 * b,
               (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883];
  const [fx, fy, fz] = xyz.map((t) => (t > 0.008856 ? Math.cbrt(t) : 7.787 * t + 16 / 116));
  return [116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)];
}

function colorDistance(a, b) {
  const p = toLab(a), q = toLab(b);
  return Math.hypot(p[0] - q[0], p[1] - q[1], p[2] - q[2]);
}

// The colour each class present in the result is drawn in: its palette colour, unless that is near-identical
// to the colour of a larger class (the VOC-style palettes of SIFT Flow give building, road and streetlight
// teals 64 levels apart); then the distinct colour furthest from those taken. Display only: the downloaded
// mask keeps the model's palette (the legend says when colours were changed). Returns how many changed.
function displayColors(classes) {
  const taken = [];
  let changed = 0;
  for (const c of [...classes].filter((c) => c.pixels > 0).sort((a, b) => b.share - a.share)) {
    c.display = c.color;
    if (taken.some((t) => colorDistance(t, c.color) < NEAR)) {
      let best = c.color, bestDistance = -1;
      for (const k of DISTINCT) {
        const d = Math.min(...taken.map((t) => colorDistance(t, k)));
        if (d > bestDistance) { best = k; bestDistance = d; }
      }
      c.display = best;
      changed += 1;
    }
    taken.push(c.display);
  }
  return changed;
}

function buildLegend() {
  const items = [...state.result.classes].sort((a, b) => b.share - a.share);
  const changed = displayColors(state.result.classes);
  const absent = items.filter((c) => c.pixels === 0).length;
  $("legendnote").textContent = changed ? `${changed} colour(s) differ from the mask file's palette, so that ` +
    "classes with near-identical colours can be told apart." : "";
  $("showabsent").hidden = absent === 0;
  $("showabsent").setAttribute("aria-expanded", "false");
  $("showabsent").textContent = `Show ${absent} class${absent === 1 ? "" : "es"} not in this photo`;
  $("legend").replaceChildren(...items.map((c) => {
    const li = document.createElement("li");
    li.hidden = c.pixels === 0;  // a model of 33 classes finds a handful in one photo: the rest on request
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.classId = c.id;
    button.setAttribute("aria-pressed", "true");
    button.title = "Click to hide or show";
    if (c.pixels === 0) button.classList.add("absent");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = classColor(c);
    const name = document.createElement("span");
    name.textContent = c.name;
    const share = document.createElement("span");
    share.className = "share";
    share.textContent = c.pixels === 0 ? "—" : `${(100 * c.share).toFixed(c.share < 0.001 ? 2 : 1)}%`;
    button.append(swatch, name, share);
    button.addEventListener("click", () => toggleClass(c.id, button));
    button.addEventListener("mouseenter", () => { state.highlight = c.id; drawMask(); });
    button.addEventListener("mouseleave", () => { state.highlight = null; drawMask(); });
    li.append(button);
    return li;
  }));
}

function toggleAbsent() {
  const button = $("showabsent");
  const show = button.getAttribute("aria-expanded") !== "true";
  button.setAttribute("aria-expanded", String(show));
  const absent = state.result.classes.filter((c) => c.pixels === 0).length;
  button.textContent = show ? "Hide the classes not in this photo" :
    `Show ${absent} class${absent === 1 ? "" : "es"} not in this photo`;
  for (const b of $("legend").querySelectorAll("button.absent")) b.parentElement.hidden = !show;
}

function toggleClass(id, button) {
  if (state.hidden.has(id)) state.hidden.delete(id); else state.hidden.add(id);
  button.setAttribute("aria-pressed", String(!state.hidden.has(id)));
  drawMask();
}

function drawMask() {
  if (!state.ids) return;
  const canvas = $("mask");
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(state.width, state.height);
  const px = img.data;
  const lut = state.result.classes.map((c) => {
    let alpha = state.hidden.has(c.id) ? 0 : 255;
    if (state.highlight !== null && state.highlight !== c.id && alpha) alpha = 40;  // dim the others
    const k = c.display || c.color;
    return [k[0], k[1], k[2], alpha];
  });
  for (let i = 0, j = 0; i < state.ids.length; i++, j += 4) {
    const c = lut[state.ids[i]];
    px[j] = c[0]; px[j + 1] = c[1]; px[j + 2] = c[2]; px[j + 3] = c[3];
  }
  ctx.putImageData(img, 0, 0);
  canvas.style.opacity = String(opacity());
}

function opacity() {
  return Number($("opacity").value) / 100;
}

function onPointer(event) {
  if (!state.ids) return;
  const rect = event.currentTarget.getBoundingClientRect();
  const x = Math.floor((event.clientX - rect.left) * state.width / rect.width);
  const y = Math.floor((event.clientY - rect.top) * state.height / rect.height);
  if (x < 0 || y < 0 || x >= state.width || y >= state.height) return;
  const c = state.result.classes[state.ids[y * state.width + x]];
  $("hover").textContent = `${c.name}  (x ${x}, y ${y})`;
}

function stem(name) {
  const dot = name.lastIndexOf(".");
  return dot > 0 ? name.slice(0, dot) : name;
}

function download(blob, filename) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function downloadMask() {
  // the server's palette PNG, byte for byte what `fcnseg predict` writes
  const bin = atob(state.result.mask_png);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  download(new Blob([bytes], { type: "image/png" }), `${stem(state.file.name)}_mask.png`);
}

function downloadOverlay() {
  // what the user sees: the photo with the visible classes at the chosen opacity
  const out = document.createElement("canvas");
  out.width = state.width;
  out.height = state.height;
  const ctx = out.getContext("2d");
  ctx.drawImage($("photo"), 0, 0);
  ctx.globalAlpha = opacity();
  ctx.drawImage($("mask"), 0, 0);
  out.toBlob((blob) => download(blob, `${stem(state.file.name)}_overlay.png`), "image/png");
}

function chooseFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image (${file.type}).`, true);
    return;
  }
  state.file = file;
  segment();
}

function setUp() {
  for (const id of ["file", "file2"]) {
    $(id).addEventListener("change", (e) => { chooseFile(e.target.files[0]); e.target.value = ""; });
  }
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    chooseFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("opacity").addEventListener("input", () => {
    $("opacityval").textContent = `${$("opacity").value}%`;
    $("mask").style.opacity = String(opacity());
  });
  $("model").addEventListener("change", segment);
  $("mask").addEventListener("pointermove", onPointer);
  $("dlmask").addEventListener("click", downloadMask);
  $("dloverlay").addEventListener("click", downloadOverlay);
  $("showabsent").addEventListener("click", toggleAbsent);
  $("keyform").addEventListener("submit", (e) => {
    e.preventDefault();
    state.apiKey = $("apikey").value.trim();
    sessionStorage.setItem("fcnseg-api-key", state.apiKey);
    $("keyform").hidden = true;
    setStatus("");
    loadModels().then(segment);
  });
  loadModels();
}

document.addEventListener("DOMContentLoaded", setUp);
