// The screening page: upload, results table, explanations, exports. No external code; every
// value from a file or the server is written with textContent, never as HTML.
"use strict";

const API = "/api/v1";
const CHUNK = 8; // files per request: progress moves and no request nears the limits
const PARALLEL = 2; // requests in flight
const state = { info: null, entries: [], sort: { key: "call", dir: -1 }, detail: null };

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("sipak-token") || ""; }

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", "Bearer " + token());
  const response = await fetch(API + path, { ...options, headers });
  if (response.status === 401) {
    $("token-form").hidden = false;
    $("token").focus();
    throw new Error("this server needs an access token: enter it above");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

// ---- zips, read in the browser so every cell keeps its own image (thumbnails, overlays) ----

const IMAGE_EXT = /\.(png|jpe?g|bmp|tiff?)$/i;

function isZip(file) { return /\.zip$/i.test(file.name); }

function safeEntry(name) {
  const parts = name.replace(/\\/g, "/").split("/");
  return !(name.startsWith("/") || /^[A-Za-z]:/.test(name) || parts.includes(".."));
}

// The zip's image entries as Files named "archive.zip/inner/name.png", or null when the
// archive is anything but plain (zip64, encrypted, unsafe names, over the limits): the server
// then opens it and answers with its own error rows.
async function unzip(file) {
  if (typeof DecompressionStream === "undefined") return null;
  const buf = new DataView(await file.arrayBuffer());
  let eocd = -1;
  for (let i = buf.byteLength - 22; i >= Math.max(0, buf.byteLength - 65557); i--) {
    if (buf.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
  }
  if (eocd < 0) return null;
  const count = buf.getUint16(eocd + 10, true);
  let at = buf.getUint32(eocd + 16, true);
  const limits = state.info ? state.info.limits : { max_zip_entries: 2000, max_zip_bytes: 1 << 29 };
  if (count > limits.max_zip_entries || count === 0xffff) return null;
  const out = [];
  let total = 0;
  for (let k = 0; k < count; k++) {
    if (at + 46 > buf.byteLength || buf.getUint32(at, true) !== 0x02014b50) return null;
    const flags = buf.getUint16(at + 8, true), method = buf.getUint16(at + 10, true);
    const csize = buf.getUint32(at + 20, true), usize = buf.getUint32(at + 24, true);
    const n = buf.getUint16(at + 28, true), m = buf.getUint16(at + 30, true), c = buf.getUint16(at + 32, true);
    const local = buf.getUint32(at + 42, true);
    const name = new TextDecoder().decode(new Uint8Array(buf.buffer, at + 46, n));
    at += 46 + n + m + c;
    if (name.endsWith("/")) continue;
    if (!safeEntry(name) || (flags & 1) || csize === 0xffffffff || ![0, 8].includes(method)) return null;
    total += usize;
    if (total > limits.max_zip_bytes) return null;
    const base = name.split("/").pop();
    if (name.startsWith("__MACOSX/") || base.startsWith("._") || !IMAGE_EXT.test(base)) continue;
    const ln = buf.getUint16(local + 26, true), lm = buf.getUint16(local + 28, true);
    const start = local + 30 + ln + lm;
    let blob = new Blob([new Uint8Array(buf.buffer, start, csize)]);
    if (method === 8) {
      blob = await new Response(blob.stream().pipeThrough(new DecompressionStream("deflate-raw"))).blob();
    }
    if (blob.size !== usize) return null;
    out.push(new File([blob], file.name + "/" + name));
  }
  return out;
}

async function expand(files) {
  const out = [];
  for (const f of files) {
    if (!isZip(f)) { out.push({ file: f, zip: false }); continue; }
    let inner = null;
    try { inner = await unzip(f); } catch (e) { inner = null; }
    if (inner === null) out.push({ file: f, zip: true });
    else inner.forEach((g) => out.push({ file: g, zip: false }));
  }
  return out;
}

// ---- predictions ------------------------------------------------------------------------

function thumbFor(file) {
  return /\.(png|jpe?g|bmp)$/i.test(file.name) ? URL.createObjectURL(file) : null;
}

async function sendChunk(chunk) {
  const form = new FormData();
  chunk.forEach((u) => form.append("files", u.file, u.file.name));
  try {
    const body = await (await api("/predict", { method: "POST", body: form })).json();
    let k = 0;
    for (const u of chunk) {
      if (u.zip) { // the server opened it: its rows start with the archive's name
        while (k < body.rows.length && body.rows[k].path.startsWith(u.file.name)) {
          state.entries.push({ row: body.rows[k++], file: null, thumb: null });
        }
      } else {
        state.entries.push({ row: body.rows[k++], file: u.file, thumb: thumbFor(u.file) });
      }
    }
  } catch (e) {
    chunk.forEach((u) => state.entries.push({ row: { path: u.file.name, error: e.message }, file: null }));
  }
}

async function upload(fileList) {
  const uploads = await expand(Array.from(fileList));
  if (!uploads.length) return;
  const chunks = [];
  for (let i = 0; i < uploads.length; i += CHUNK) chunks.push(uploads.slice(i, i + CHUNK));
  $("progress-box").hidden = false;
  const progress = $("progress");
  progress.max = uploads.length;
  progress.value = 0;
  let done = 0, next = 0;
  const report = () => {
    $("progress-text").textContent = done + " of " + uploads.length + " files classified";
  };
  report();
  async function worker() {
    while (next < chunks.length) {
      const chunk = chunks[next++];
      await sendChunk(chunk);
      done += chunk.length;
      progress.value = done;
      report();
      render();
    }
  }
  await Promise.all(Array.from({ length: PARALLEL }, worker));
  $("progress-text").textContent = "Done: " + uploads.length + " files.";
}

// ---- the table ----------------------------------------------------------------------------

function callOf(row) {
  if (row.error) return "failed";
  if (row.flagged === true) return "abnormal";
  if (row.flagged === false) return "not flagged";
  return row.label;
}

function sortValue(entry, key) {
  const r = entry.row;
  if (key === "call") {
    if (r.error) return -2;
    return (r.flagged ? 1 : 0) + (r.p_abnormal == null ? 0 : r.p_abnormal);
  }
  if (key === "path" || key === "bethesda") return (r[key] || "").toLowerCase();
  const v = r[key];
  return v == null ? -1 : v;
}

function visible() {
  const text = $("filter").value.trim().toLowerCase();
  const show = $("show").value;
  return state.entries.filter((e) => {
    const r = e.row;
    if (show === "flagged" && !r.flagged) return false;
    if (show === "normal" && (r.error || r.flagged)) return false;
    if (show === "failed" && !r.error) return false;
    if (!text) return true;
    return [r.path, r.label, r.bethesda, r.label_2class, r.error].some((v) => (v || "").toLowerCase().includes(text));
  });
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  children.forEach((c) => node.appendChild(c));
  return node;
}

function bars(row) {
  const box = el("div", { class: "bars" });
  row.class_names.forEach((name, i) => {
    const p = row.probabilities[i];
    box.appendChild(el("span", { text: name }));
    box.appendChild(el("meter", { min: "0", max: "1", value: String(p), "aria-label": name + " " + p.toFixed(3) }));
    box.appendChild(el("span", { text: p.toFixed(3) }));
  });
  return box;
}

function tableRow(entry, index) {
  const r = entry.row;
  const tr = el("tr", { class: r.error ? "failed" : r.flagged ? "flagged" : "" });
  const thumb = el("td");
  if (entry.thumb && !r.error) thumb.appendChild(el("img", { class: "thumb", src: entry.thumb, alt: "" }));
  tr.appendChild(thumb);
  const file = el("td");
  if (!r.error && entry.file) {
    const b = el("button", { type: "button", class: "open", text: r.path, "aria-label": "Explain " + r.path });
    b.addEventListener("click", () => openDetail(index));
    file.appendChild(b);
  } else {
    file.textContent = r.path;
  }
  tr.appendChild(file);
  if (r.error) {
    tr.appendChild(el("td", { class: "call", text: "failed" }));
    tr.appendChild(el("td", { colspan: "3", text: r.error }));
    return tr;
  }
  const call = el("td", { class: "call" });
  call.appendChild(el("div", { text: callOf(r) }));
  call.appendChild(el("div", { class: "muted", text: r.label + (r.p_abnormal == null ? "" : " (p abnormal " + r.p_abnormal.toFixed(3) + ")") }));
  tr.appendChild(call);
  tr.appendChild(el("td", { text: r.bethesda }));
  const probs = el("td");
  probs.appendChild(bars(r));
  tr.appendChild(probs);
  tr.appendChild(el("td", { text: r.uncertainty == null ? "n/a (one model)" : r.uncertainty.toFixed(4) }));
  return tr;
}

function render() {
  const { key, dir } = state.sort;
  const list = visible().map((e) => [e, state.entries.indexOf(e)]);
  list.sort((a, b) => {
    const x = sortValue(a[0], key), y = sortValue(b[0], key);
    return (x < y ? -1 : x > y ? 1 : 0) * dir;
  });
  const body = $("rows");
  body.replaceChildren(...list.map(([e, i]) => tableRow(e, i)));
  const failed = state.entries.filter((e) => e.row.error);
  const flagged = state.entries.filter((e) => e.row.flagged).length;
  $("summary").textContent = (state.entries.length - failed.length) + " classified, " + flagged +
    " flagged abnormal, " + failed.length + " failed (" + list.length + " shown).";
  $("failures").hidden = failed.length === 0;
  $("failure-list").replaceChildren(...failed.map((e) => el("li", { text: e.row.path + ": " + e.row.error })));
  ["csv", "jsonl", "html"].forEach((f) => { $("export-" + f).disabled = state.entries.length === 0; });
}

function setSort(key) {
  state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : (key === "path" || key === "bethesda" ? 1 : -1) };
  document.querySelectorAll("th[aria-sort]").forEach((th) => {
    const b = th.querySelector("button");
    th.setAttribute("aria-sort", b.dataset.sort === key ? (state.sort.dir > 0 ? "ascending" : "descending") : "none");
  });
  render();
}

// ---- one cell: the crop beside its Grad-CAM and IG overlays ----------------------------

async function explainInto(entry, method, img, cap, title) {
  cap.textContent = title + ": computing...";
  img.removeAttribute("src");
  const form = new FormData();
  form.append("file", entry.file, entry.file.name);
  form.append("method", method);
  try {
    const body = await (await api("/explain", { method: "POST", body: form })).json();
    img.src = "data:image/png;base64," + body.overlay_png;
    img.alt = title + " overlay of " + entry.row.path + " for class " + body.target_name;
    cap.textContent = body.description + "; class " + body.target_name + ".";
    return body;
  } catch (e) {
    cap.textContent = title + " failed: " + e.message;
    return null;
  }
}

async function openDetail(index) {
  const entry = state.entries[index];
  state.detail = index;
  $("detail").hidden = false;
  $("detail-h").textContent = entry.row.path;
  $("detail-call").textContent = callOf(entry.row) + ": " + entry.row.label + "; " + entry.row.bethesda;
  $("detail-crop").src = entry.thumb || "";
  $("detail-crop").alt = "the crop " + entry.row.path;
  $("detail-h").focus();
  const g = await explainInto(entry, "gradcam", $("detail-gradcam"), $("detail-gradcam-cap"), "Grad-CAM");
  if (g && !entry.thumb) $("detail-crop").src = "data:image/png;base64," + g.image_png;
  if (state.detail === index) {
    await explainInto(entry, "integrated_gradients", $("detail-ig"), $("detail-ig-cap"), "Integrated Gradients");
  }
}

function closeDetail() {
  $("detail").hidden = true;
  state.detail = null;
}

// ---- exports ----------------------------------------------------------------------------

async function exportAs(format) {
  const rows = state.entries.map((e) => e.row);
  try {
    const response = await api("/export?format=" + format, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ rows }),
    });
    const blob = await response.blob();
    const a = el("a", { href: URL.createObjectURL(blob), download: format === "html" ? "screening_report.html" : "predictions." + format });
    document.body.appendChild(a);
    a.click();
    a.remove();
  } catch (e) {
    $("summary").textContent = "Export failed: " + e.message;
  }
}

// ---- start ------------------------------------------------------------------------------

async function loadModel() {
  try {
    state.info = await (await api("/model")).json();
    const names = state.info.taxonomy.class_names.join(", ");
    const members = state.info.members.length;
    $("model-line").textContent = (members > 1 ? "Ensemble of " + members + " models" : "Model " + state.info.members[0].path) +
      "; classes: " + names + "; input " + state.info.preprocessing.image_size + " px.";
  } catch (e) {
    $("model-line").textContent = "Model description unavailable: " + e.message;
  }
}

function init() {
  $("files").addEventListener("change", (ev) => { upload(ev.target.files); ev.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); upload(ev.dataTransfer.files); });
  $("filter").addEventListener("input", render);
  $("show").addEventListener("change", render);
  document.querySelectorAll("th button[data-sort]").forEach((b) => b.addEventListener("click", () => setSort(b.dataset.sort)));
  ["csv", "jsonl", "html"].forEach((f) => $("export-" + f).addEventListener("click", () => exportAs(f)));
  $("detail-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && !$("detail").hidden) closeDetail(); });
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("sipak-token", $("token").value);
    $("token-form").hidden = true;
    loadModel();
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
