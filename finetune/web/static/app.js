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

// Forms that destroy something ask first; a form that starts slow work (data-busy) disables its button at once,
// so a second click cannot send it again, and says what it is doing.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) { event.preventDefault(); return; }
  if (form.dataset.busy && !event.defaultPrevented) {
    const button = form.querySelector("button[type=submit]");
    if (button) { button.disabled = true; button.textContent = form.dataset.busy; }
  }
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

// ---- A refused form: its error summary takes the focus (and the eye); its links focus their fields.
function initErrorSummary() {
  const summary = document.getElementById("error-summary");
  if (!summary) return;
  summary.scrollIntoView({ block: "start" });
  summary.focus({ preventScroll: true });
  summary.addEventListener("click", (event) => {
    const link = event.target.closest("a[href^='#']");
    if (!link) return;
    const field = document.getElementById(link.getAttribute("href").slice(1));
    if (!field) return;
    event.preventDefault();
    const details = field.closest("details");
    if (details) details.open = true;
    field.scrollIntoView({ block: "center" });
    field.focus({ preventScroll: true });
  });
}

// ---- Train tab: upload a file, then preview the chosen file as training renders it; say where it starts.
function initTrain() {
  const form = document.getElementById("train-form");
  if (!form) return;
  const fileInput = document.getElementById("data_file");
  const picker = document.getElementById("data_upload");
  const format = document.getElementById("data_format");
  const preview = document.getElementById("preview");
  const trainer = document.getElementById("base_model");
  const startNote = document.getElementById("start-note");
  const destination = document.getElementById("destination");

  async function refreshPreview() {
    if (!picker.value) { preview.textContent = ""; return; }
    const body = new FormData();
    body.append("data_upload", picker.value);
    body.append("data.format", format.value);
    body.append("base_model", trainer.value);
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
    let option = Array.from(picker.options).find((o) => o.value === file.id);
    if (!option) {  // the same file uploaded again is the one already listed
      option = document.createElement("option");
      option.value = file.id;
      option.textContent = file.name + " (" + file.size + ")";
      picker.insertBefore(option, picker.options[1] || null);
    }
    picker.value = file.id;
    fileInput.value = "";  // the file now lives on the server; the form submits its id
    refreshPreview();
  });
  picker.addEventListener("change", refreshPreview);
  format.addEventListener("change", refreshPreview);
  if (picker.value && !preview.children.length) refreshPreview();

  function sayStart() {
    const chosen = trainer.selectedOptions[0];
    const text = chosen ? chosen.dataset.note || "" : "";
    startNote.textContent = text ? text.charAt(0).toUpperCase() + text.slice(1) + "." : "";
  }
  trainer.addEventListener("change", sayStart);

  if (destination) {  // training from this model: the new model's fields only when a new one is chosen
    const showNew = () => {
      const isNew = destination.value === destination.options[destination.options.length - 1].value;
      form.querySelectorAll("[data-new-destination]").forEach((el) => { el.hidden = !isNew; });
    };
    destination.addEventListener("change", showNew);
    showNew();
  }
}

// ---- Training page: status, chart and log follow the run without a reload (the live endpoint answers on change).
function initTraining() {
  const root = document.getElementById("training");
  if (!root || root.dataset.final === "true") return;
  const log = document.getElementById("t-log");
  const set = (id, text) => { const el = document.getElementById(id); if (el) el.textContent = text; };

  async function tick() {
    let data;
    try {
      // With the seq of the last answer, the server answers when the training next changes (or after a while).
      const since = root.dataset.seq ? "&since=" + root.dataset.seq : "";
      const response = await fetch(root.dataset.liveUrl + "?log_offset=" + log.dataset.offset + since,
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
    if (data.seq === null || data.seq === undefined) { setTimeout(tick, 1000); return; }
    root.dataset.seq = data.seq;
    setTimeout(tick, 50);  // the next request waits on the server for the next change
  }
  setTimeout(tick, 500);
}

// ---- Playground: create a prediction, then show its output as the server streams it (SSE); Stop cancels it.
const PLAYGROUND_FIELDS = { version: "pg-version", max_new_tokens: "pg-max", temperature: "pg-temp", seed: "pg-seed",
                            prompt: "pg-prompt", system_prompt: "pg-system" };

// Whitespace made visible: an output of spaces and newlines only would look like no output at all.
function visibleWhitespace(text) {
  return text.replace(/ /g, "·").replace(/\t/g, "→").replace(/\n/g, "↵\n");
}

function describeWhitespace(text) {
  const count = (re) => (text.match(re) || []).length;
  const parts = [[count(/ /g), "space"], [count(/\n/g), "newline"], [count(/\t/g), "tab"]]
    .filter(([n]) => n > 0).map(([n, what]) => n + " " + what + (n === 1 ? "" : "s"));
  const other = text.length - count(/[ \n\t]/g);
  if (other > 0) parts.push(other + " other blank character" + (other === 1 ? "" : "s"));
  return parts.join(", ");
}

function initPlayground() {
  const form = document.getElementById("playground");
  if (!form) return;
  const output = document.getElementById("pg-output");
  const outPanel = document.getElementById("pg-out-panel");
  const status = document.getElementById("pg-status");
  const error = document.getElementById("pg-error");
  const note = document.getElementById("pg-note");
  const metrics = document.getElementById("pg-metrics");
  const run = document.getElementById("pg-run");
  const stop = document.getElementById("pg-stop");
  const version = document.getElementById("pg-version");
  const prompt = document.getElementById("pg-prompt");
  const history = document.getElementById("pg-history");
  const turnsList = document.getElementById("pg-turns");
  const newChat = document.getElementById("pg-new-chat");
  let turns = [];
  let current = null;  // {id, cancelUrl, source}

  const isChat = () => version.selectedOptions[0].dataset.chat === "true";

  function showMode() {
    const chat = isChat();
    document.getElementById("pg-system-field").hidden = !chat;
    document.getElementById("pg-chat").hidden = !chat;
    newChat.hidden = !chat;
    outPanel.hidden = chat;
    document.getElementById("pg-prompt-label").textContent = chat ? "Your message" : "Prompt";
    document.getElementById("pg-mode").textContent = chat
      ? "Trained on chat data: a conversation, turn by turn."
      : "Continues the prompt, formatted as the version was trained.";
  }

  function addTurn(role, text) {
    const item = document.createElement("li");
    item.className = "turn " + role;
    const who = document.createElement("p");
    who.className = "who small muted flush";
    who.textContent = role === "user" ? "You" : "Model";
    const body = document.createElement("pre");
    body.className = "output";
    body.textContent = text;
    item.append(who, body);
    turnsList.appendChild(item);
    return body;
  }

  function clearErrors() {
    error.hidden = true;
    error.textContent = "";
    for (const id of Object.values(PLAYGROUND_FIELDS)) {
      const field = document.getElementById(id);
      const message = document.getElementById(id + "-error");
      field.removeAttribute("aria-invalid");
      if (message) { message.hidden = true; message.textContent = ""; }
    }
  }

  function showErrors(errors) {
    const general = [];
    for (const [key, messages] of Object.entries(errors)) {
      const id = PLAYGROUND_FIELDS[key];
      const message = id && document.getElementById(id + "-error");
      if (!message) { general.push(...messages); continue; }
      message.textContent = messages.join("; ");
      message.hidden = false;
      const field = document.getElementById(id);
      field.setAttribute("aria-invalid", "true");
      field.setAttribute("aria-describedby", id + "-error");
    }
    if (general.length) { error.textContent = general.join("; "); error.hidden = false; }
    const first = form.querySelector("[aria-invalid='true']");
    if (first) first.focus();
  }

  function busy(on) {
    run.disabled = on;
    stop.hidden = !on;
    stop.disabled = false;
    form.setAttribute("aria-busy", on ? "true" : "false");
  }

  function finishText(target, text) {
    note.hidden = true;
    if (text.length === 0) {
      note.textContent = "No output: the model ended at once.";
      note.hidden = false;
    } else if (text.trim() === "") {
      target.classList.add("whitespace");
      target.textContent = visibleWhitespace(text);
      note.textContent = "The output is whitespace only (" + describeWhitespace(text) + "), shown as · ↵ →.";
      note.hidden = false;
    }
  }

  version.addEventListener("change", () => { showMode(); });
  newChat.addEventListener("click", () => { turns = []; turnsList.replaceChildren(); prompt.focus(); });
  stop.addEventListener("click", async () => {
    if (!current) return;
    stop.disabled = true;
    status.textContent = "Stopping…";
    await postForm(current.cancelUrl, new FormData());
  });
  showMode();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const chat = isChat();
    history.value = JSON.stringify(chat ? turns : []);
    const asked = prompt.value;
    let target = output;
    output.textContent = "";
    output.classList.remove("whitespace");
    metrics.textContent = "";
    note.hidden = true;
    busy(true);
    status.textContent = "Starting…";
    const slow = setTimeout(() => { status.textContent = "Starting the inference worker…"; }, 1500);
    let response;
    try {
      response = await postForm(form.action, new FormData(form));
    } finally {
      clearTimeout(slow);
    }
    if (!response.ok) {
      let data = {};
      try { data = await response.json(); } catch (e) { data = { detail: response.status + " " + response.statusText }; }
      if (data.errors) showErrors(data.errors);
      else { error.textContent = data.detail || data.title || "the run was refused"; error.hidden = false; }
      busy(false);
      status.textContent = "";
      return;
    }
    const created = await response.json();
    if (chat) {
      addTurn("user", asked);
      target = addTurn("assistant", "");
      prompt.value = "";
    }
    let text = "";
    const source = new EventSource(created.stream_url);
    current = { id: created.id, cancelUrl: created.cancel_url, source: source };
    status.textContent = "Waiting for the worker…";
    source.addEventListener("logs", (e) => {
      const line = JSON.parse(e.data);
      if (line.startsWith("loading")) status.textContent = "Loading the version (its first run in this worker)…";
      else if (line.startsWith("loaded")) status.textContent = "Loaded; generating…";
    });
    source.addEventListener("output", (e) => {
      if (!text) status.textContent = "Generating…";
      text += JSON.parse(e.data);
      target.textContent = text;
    });
    const finish = (label) => {
      source.close();
      current = null;
      busy(false);
      status.textContent = label;
      finishText(target, text);
      if (chat) turns.push({ role: "user", content: asked }, { role: "assistant", content: text });
    };
    source.addEventListener("error", (e) => {
      if (e.data) { error.textContent = JSON.parse(e.data); error.hidden = false; }
      finish(e.data ? "Failed" : "Connection closed");
    });
    source.addEventListener("done", (e) => {
      const info = e.data ? JSON.parse(e.data) : {};
      const m = info.metrics || {};
      if (m.output_token_count !== undefined) {
        const parts = [m.output_token_count + " token" + (m.output_token_count === 1 ? "" : "s")];
        if (m.tokens_per_second) parts.push(m.tokens_per_second.toFixed(1) + " tokens/s");
        if (m.predict_time !== undefined) parts.push(m.predict_time.toFixed(2) + " s");
        metrics.textContent = parts.join(" · ");
      }
      finish(info.reason === "canceled" ? "Stopped" : info.reason ? "Stopped: " + info.reason : "Done");
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  initErrorSummary();
  initTrain();
  initTraining();
  initPlayground();
});
