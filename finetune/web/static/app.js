// finetune web app: the little JavaScript the pages need. Every page works without it except the live parts
// (training progress, streamed playground output, data preview before submitting).
"use strict";

function csrfToken() {
  const input = document.querySelector('input[name="csrf_token"]');
  return input ? input.value : "";
}

async function postForm(url, body) {
  const response = await fetch(url, {
    method: "POST", body: body, credentials: "same-origin",
    headers: { "X-CSRF-Token": csrfToken(), "Accept": "application/json" },
  });
  return response;
}

async function problemText(response) {
  try {
    const data = await response.json();
    return data.detail || data.title || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// Forms that destroy something ask first.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) event.preventDefault();
});

// Copy buttons next to snippets.
document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const code = button.parentElement.querySelector("pre");
  try {
    await navigator.clipboard.writeText(code.textContent);
    button.textContent = "Copied";
  } catch (e) {
    const range = document.createRange();
    range.selectNodeContents(code);
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 2000);
});

// ---- Train tab: upload a file, then preview the chosen file as training renders it.
function initTrain() {
  const form = document.getElementById("train-form");
  if (!form) return;
  const fileInput = document.getElementById("data_file");
  const picker = document.getElementById("data_upload");
  const format = document.getElementById("data_format");
  const preview = document.getElementById("preview");

  async function refreshPreview() {
    if (!picker.value) { preview.textContent = ""; return; }
    const body = new FormData();
    body.append("data_upload", picker.value);
    body.append("data.format", format.value);
    body.append("base_model", document.getElementById("base_model").value);
    preview.innerHTML = '<p class="muted">Reading the file…</p>';
    const response = await postForm(picker.dataset.previewUrl, body);
    preview.innerHTML = response.ok ? await response.text() : '<p class="error"></p>';
    if (!response.ok) preview.querySelector(".error").textContent = await problemText(response);
  }

  fileInput.addEventListener("change", async () => {
    if (!fileInput.files.length) return;
    const body = new FormData();
    body.append("file", fileInput.files[0]);
    preview.innerHTML = '<p class="muted">Uploading…</p>';
    const response = await postForm(fileInput.dataset.uploadUrl, body);
    if (!response.ok) {
      preview.innerHTML = '<p class="error" role="alert"></p>';
      preview.querySelector(".error").textContent = await problemText(response);
      return;
    }
    const file = await response.json();
    const option = document.createElement("option");
    option.value = file.id;
    option.textContent = file.name + " (" + file.size + ")";
    picker.appendChild(option);
    picker.value = file.id;
    fileInput.value = "";  // the file now lives on the server; the form submits its id
    refreshPreview();
  });
  picker.addEventListener("change", refreshPreview);
  format.addEventListener("change", refreshPreview);
  if (picker.value && !preview.children.length) refreshPreview();
}

// ---- Training page: status, chart and log follow the run without a reload (polling the live endpoint).
function initTraining() {
  const root = document.getElementById("training");
  if (!root || root.dataset.final === "true") return;
  const log = document.getElementById("t-log");
  const set = (id, text) => { const el = document.getElementById(id); if (el) el.textContent = text; };

  async function tick() {
    let data;
    try {
      const response = await fetch(root.dataset.liveUrl + "?log_offset=" + log.dataset.offset,
                                   { credentials: "same-origin", headers: { "Accept": "application/json" } });
      if (!response.ok) throw new Error(response.status);
      data = await response.json();
    } catch (e) {
      setTimeout(tick, 3000);
      return;
    }
    const badge = document.createElement("span");
    badge.className = "badge status-" + data.status;
    badge.textContent = data.status;
    document.getElementById("t-status").replaceChildren(badge);
    set("t-progress", data.progress);
    set("t-speed", data.tokens_per_s);
    set("t-eta", data.eta);
    set("t-duration", data.duration);
    set("t-points", data.points);
    set("t-where", data.where);
    if (data.error) { set("t-error", data.error); document.getElementById("t-error").className = "error"; }
    document.getElementById("t-chart").innerHTML = data.chart;  // SVG built by the server from numbers only
    if (data.log) {
      const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
      log.textContent += data.log;
      if (atBottom) log.scrollTop = log.scrollHeight;
    }
    log.dataset.offset = data.log_offset;
    if (data.version_url) {
      const link = document.createElement("a");
      link.href = data.version_url;
      link.textContent = data.version;
      document.getElementById("t-version").replaceChildren(link);
    }
    if (data.final) {
      const cancel = document.getElementById("t-cancel");
      if (cancel) cancel.hidden = true;
      root.dataset.final = "true";
      return;
    }
    setTimeout(tick, 1000);
  }
  setTimeout(tick, 500);
}

// ---- Playground: create a prediction, then append its output as the server streams it (SSE).
function initPlayground() {
  const form = document.getElementById("playground");
  if (!form) return;
  const output = document.getElementById("pg-output");
  const status = document.getElementById("pg-status");
  const error = document.getElementById("pg-error");
  const run = document.getElementById("pg-run");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    output.textContent = "";
    error.hidden = true;
    run.disabled = true;
    status.textContent = "Starting…";
    const response = await postForm(form.action, new FormData(form));
    if (!response.ok) {
      error.textContent = await problemText(response);
      error.hidden = false;
      run.disabled = false;
      status.textContent = "";
      return;
    }
    const created = await response.json();
    const source = new EventSource(created.stream_url);
    status.textContent = "Generating…";
    source.addEventListener("output", (e) => { output.textContent += JSON.parse(e.data); });
    const finish = (text) => { source.close(); run.disabled = false; status.textContent = text; };
    source.addEventListener("error", (e) => {
      if (e.data) { error.textContent = JSON.parse(e.data); error.hidden = false; }
      finish(e.data ? "Failed" : "Connection closed");
    });
    source.addEventListener("done", (e) => {
      const info = e.data ? JSON.parse(e.data) : {};
      finish(info.reason ? "Stopped: " + info.reason : "Done");
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  initTrain();
  initTraining();
  initPlayground();
});
