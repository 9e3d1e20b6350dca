// bonefrac web page: send one file to POST /v1/predict?explain=true and show the answer.
// Plain DOM code, no libraries; every value from the server is set with textContent.
// A server with --token-file answers 401: the page then asks for the token once and keeps it
// in this tab's sessionStorage only (never localStorage or a cookie), sent as a Bearer header.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "bonefrac-token";
let maxBytes = 32 * 1024 * 1024;
let objectUrl = null;

const MESSAGES = {
  408: "The upload took too long. Check the connection and try again.",
  413: "The file is too large for this server.",
  415: "This file type is not supported. Send a JPEG, PNG, TIFF, BMP, GIF, WebP or DICOM file.",
  422: "The file could not be read as an image.",
  429: "Too many requests from this token or address.",
  503: "The server is busy right now. Please try again in a moment.",
  504: "The server took too long to answer. Please try again.",
};

function pct(p) { return (100 * p).toFixed(1) + " %"; }
function css(f) { return (100 * f).toFixed(2) + "%"; }
function isNum(v) { return typeof v === "number" && Number.isFinite(v); }
function label(c) {
  if (c === "uncertain") return "uncertain: outside what the model was trained on (see warning)";
  return c === "fractured" ? "fractured" : "not fractured";
}

function showError(text) {
  $("status").textContent = "";
  $("error").textContent = text;
  $("error").hidden = false;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

// Show the token form (and hide the upload area) after a 401; a stored token is dropped.
function askToken(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  $("login").hidden = false;
  $("drop").hidden = true;
  $("login-error").textContent = message || "";
  $("login-error").hidden = !message;
  $("token").focus();
}

function useToken(e) {
  e.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("login").hidden = true;
  $("drop").hidden = false;
  $("error").hidden = true;
  loadModel();
}

async function loadModel() {
  try {
    const hadToken = sessionStorage.getItem(TOKEN_KEY) !== null;
    const r = await fetch("/v1/model", { headers: authHeaders() });
    if (r.status === 401) {
      askToken(hadToken ? "That token was not accepted (wrong, expired or revoked)." : "");
      return;
    }
    if (!r.ok) throw new Error("HTTP " + r.status);
    const info = await r.json();
    $("disclaimer").textContent = info.disclaimer;
    maxBytes = info.limits.max_upload_bytes;
    $("limit").textContent = "up to " + (maxBytes / 1048576).toFixed(0) + " MiB";
    $("model-id").textContent = info.model.model_id;
  } catch (e) {
    showError("Could not reach the server (" + e.message + "). Is `bonefrac serve` running?");
  }
}

function render(data, file) {
  const p = data.prediction, m = data.model;
  $("filename").textContent = p.file;
  $("prob").textContent = pct(p.prob_fractured);
  $("prob-bar").style.width = pct(p.prob_fractured).replace(" ", "");
  $("threshold-mark").style.left = pct(Math.min(1, p.threshold)).replace(" ", "");
  $("threshold").textContent = pct(p.threshold);
  $("decision").textContent = label(p.decision);
  $("decision").className = p.decision;
  $("warning").textContent = p.warning ? "Warning: " + p.warning : "";
  $("warning").hidden = !p.warning;

  const points = $("points");
  points.replaceChildren();
  for (const [name, threshold] of Object.entries(m.operating_points)) {
    const tr = document.createElement("tr");
    const decision = p["decision_" + name];
    const info = (m.operating_point_info || {})[name] || {};
    cell(tr, name);
    cell(tr, threshold > 1 ? "unreachable (> 100 %)" : pct(threshold));
    cell(tr, label(decision), decision);
    cell(tr, info.description || "");
    points.appendChild(tr);
  }
  const members = $("members");
  members.replaceChildren();
  for (const mem of m.members) {
    const tr = document.createElement("tr");
    cell(tr, mem.name);
    cell(tr, pct(p["prob_" + mem.name]));
    cell(tr, mem.fusion_weight.toFixed(2));
    members.appendChild(tr);
  }
  $("model-id").textContent = m.model_id;
  $("version").textContent = p.version;
  $("result-disclaimer").textContent = data.disclaimer;

  // Show the original file when the browser can decode it; DICOM and TIFF fall back to the
  // server's grayscale rendering at the image's own size. The heat-map layer covers the whole
  // image (the model sees it resized to a square), so it is stretched to fit.
  const base = $("radiograph");
  base.onerror = () => { base.onerror = null; base.src = "data:image/png;base64," + p.image_png_base64; };
  if (objectUrl) URL.revokeObjectURL(objectUrl);
  objectUrl = URL.createObjectURL(file);
  base.src = objectUrl;
  $("heatmap").src = "data:image/png;base64," + (p.heatmap_layer_png_base64 || p.heatmap_png_base64);
  showLocalisation(p);
  $("result").hidden = false;
  $("status").textContent = "Done.";
}

// The boxes shown (the row's shown_detections: at or above the model's box threshold, none
// unless the decision is fractured) and the peak: fractions of the image's width/height, so %
// of the stack that the image fills. Positions are set through the style object (allowed by
// the CSP, unlike style=""); the first box is #loc-box, the others are copies of it.
function showLocalisation(p) {
  const shown = p.shown_detections || [];
  const hasPeak = isNum(p.peak_x) && isNum(p.peak_y);
  const b = $("loc-box"), k = $("loc-peak");
  document.querySelectorAll(".loc-box.extra").forEach((el) => el.remove());
  b.hidden = shown.length === 0;
  k.hidden = !hasPeak;
  $("loc").hidden = false;
  shown.forEach((d, i) => {
    const el = i === 0 ? b : b.cloneNode(false);
    if (i > 0) {
      el.removeAttribute("id");
      el.classList.add("extra");
      $("stack").appendChild(el);
    }
    el.style.left = css(d.x0);
    el.style.top = css(d.y0);
    el.style.width = css(d.x1 - d.x0);
    el.style.height = css(d.y1 - d.y0);
    el.textContent = `${d.rank}: ${d.score.toFixed(2)}`;
  });
  $("box-xy").textContent = shown.length
    ? shown.map((d) => `#${d.rank} x ${pct(d.x0)} to ${pct(d.x1)}, y ${pct(d.y0)} to ` +
                       `${pct(d.y1)} (score ${d.score.toFixed(2)})`).join("; ")
    : "none shown (the decision is not fractured, or no box scores at or above the " +
      "model's box threshold)";
  if (hasPeak) {
    k.style.left = css(p.peak_x);
    k.style.top = css(p.peak_y);
    $("peak-xy").textContent = `x ${pct(p.peak_x)}, y ${pct(p.peak_y)} (from the top left)`;
  } else {
    $("peak-xy").textContent = "not available";
  }
  $("box-score").textContent = isNum(p.box_score) ? p.box_score.toFixed(2) : "not available";
  const link = $("overlay-link");
  link.hidden = !p.heatmap_png_base64;
  if (p.heatmap_png_base64) {
    link.href = "data:image/png;base64," + p.heatmap_png_base64;
    link.download = p.file.replace(/\.[^.]*$/, "") + "_overlay.png";
  }
}

async function analyse(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  if (file.size > maxBytes) {
    showError(`"${file.name}" is ${(file.size / 1048576).toFixed(1)} MiB; the limit is ` +
              `${(maxBytes / 1048576).toFixed(0)} MiB.`);
    return;
  }
  $("status").textContent = `Analysing "${file.name}"...`;
  const form = new FormData();
  form.append("file", file, file.name);
  let r;
  try {
    r = await fetch("/v1/predict?explain=true",
                    { method: "POST", body: form, headers: authHeaders() });
  } catch (e) {
    showError("Could not reach the server. Is `bonefrac serve` still running?");
    return;
  }
  let data = null;
  try { data = await r.json(); } catch (e) { /* not JSON: use the status text */ }
  if (r.status === 401) {
    askToken("The server no longer accepts the token (expired or revoked): enter a new one.");
    showError("Not analysed: the token was refused.");
    return;
  }
  if (!r.ok) {
    let general = MESSAGES[r.status] || `The server answered ${r.status}.`;
    const wait = r.headers.get("Retry-After");
    if (wait && (r.status === 429 || r.status === 503)) general += ` Retry in ${wait} s.`;
    const detail = data && typeof data.detail === "string" ? " (" + data.detail + ")" : "";
    showError(general + detail);
    return;
  }
  render(data, file);
}

function setOpacity() {
  const v = $("opacity").value;
  $("heatmap").style.opacity = v / 100;
  $("opacity-value").textContent = v + " %";
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) analyse(e.target.files[0]); });
$("opacity").addEventListener("input", setOpacity);
$("login").addEventListener("submit", useToken);
const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const ev of ["dragleave", "drop"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => {
  const f = e.dataTransfer.files[0];
  if (f) analyse(f);
});
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
});
setOpacity();
loadModel();
