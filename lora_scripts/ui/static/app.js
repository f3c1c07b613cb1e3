// The page shell: API calls, the shared form state, routing, and the Config page.
// Every page reads the server's state on load and polls it, so a reload or a second tab shows the same.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || sessionStorage.getItem("lora-ui-token");
if (TOKEN) { sessionStorage.setItem("lora-ui-token", TOKEN); }
const FORM_KEY = "lora-ui-form";
const state = {schema: null, values: {}, preset: null, timers: [], validateTimer: null};

async function api(method, path, body) {
  const headers = {"Content-Type": "application/json"};
  if (TOKEN) { headers["X-LoRA-Token"] = TOKEN; }
  const response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = data.error || (Array.isArray(data.detail) ? data.detail.map((d) => d.loc.join(".") + ": " + d.msg).join("\n") : response.statusText);
    throw Object.assign(new Error(detail), {status: response.status});
  }
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => {
    if (k.startsWith("on")) { node.addEventListener(k.slice(2), v); }
    else if (v !== null && v !== undefined && v !== false) { node.setAttribute(k, v === true ? "" : v); }
  });
  children.flat().forEach((c) => node.append(c instanceof Node ? c : document.createTextNode(c === null || c === undefined ? "" : String(c))));
  return node;
}

function flash(text) {
  const node = document.getElementById("flash");
  node.textContent = text;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { node.textContent = ""; }, 6000);
}

function every(ms, fn) {
  fn();
  state.timers.push(setInterval(fn, ms));
}

function loadForm() {
  try { Object.assign(state, JSON.parse(localStorage.getItem(FORM_KEY)) || {}); } catch (e) { /* a fresh form */ }
}

function saveForm() {
  localStorage.setItem(FORM_KEY, JSON.stringify({values: state.values, preset: state.preset}));
}

function setValues(values, preset) {
  state.values = {...values};
  state.preset = preset || null;
  saveForm();
}

function statusBadge(status) {
  return el("span", {class: "status status-" + status}, status);
}

function progressBar(progress) {
  if (!progress || !progress.total) { return el("span", {class: "muted"}, "—"); }
  const share = Math.min(100, (100 * progress.step) / progress.total);
  return el("span", {class: "progress"}, el("span", {class: "bar"}, el("div", {style: `width:${share}%`})), ` ${progress.step}/${progress.total}`);
}

async function ensureSchema() {
  if (!state.schema) { state.schema = await api("GET", "/api/schema"); }
  return state.schema;
}

// ---- Config page -------------------------------------------------------------------------

function fieldInput(field) {
  const value = state.values[field.name] ?? "";
  const onChange = (event) => {
    const text = event.target.value;
    if (text === "") { delete state.values[field.name]; } else { state.values[field.name] = text; }
    saveForm();
    scheduleValidate();
  };
  if (field.kind === "choice") {
    const unset = field.required ? "(required)" : field.default === "null" ? "(auto)" : `default: ${field.default}`;
    const choices = value && !field.choices.includes(value) ? [...field.choices, value] : field.choices;  // show an invalid import too
    const select = el("select", {name: field.name, onchange: onChange}, el("option", {value: ""}, unset),
      choices.map((c) => el("option", {value: c}, c)));
    select.value = value;
    return select;
  }
  const placeholder = field.required ? "required" : field.default === "null" ? "" : `default: ${field.default}`;
  if (field.kind === "text" || field.kind === "yaml") {
    const area = el("textarea", {name: field.name, rows: String(Math.max(1, value.split("\n").length)), placeholder, oninput: onChange});
    area.value = value;
    return area;
  }
  const input = el("input", {type: "text", name: field.name, placeholder, oninput: onChange});
  input.value = value;
  return input;
}

function fieldRow(field) {
  return el("div", {class: "field" + (field.name in state.values ? " set" : ""), "data-key": field.name},
    el("label", {for: field.name}, field.name, field.required ? el("span", {class: "req"}, " *") : ""),
    fieldInput(field),
    el("div", {class: "doc"}, `${field.type} — ${field.description}`),
    el("div", {class: "error"}));
}

async function renderConfig(root) {
  const schema = await ensureSchema();
  const presets = await api("GET", "/api/presets");
  const known = new Set(schema.fields.map((f) => f.name));
  const presetSelect = el("select", {id: "preset"}, el("option", {value: ""}, "— start from a preset —"),
    presets.map((p) => el("option", {value: p.name}, p.name)));
  presetSelect.value = state.preset || "";
  const fileInput = el("input", {type: "file", id: "import-file", accept: ".yaml,.yml", onchange: importYaml});
  const savePath = el("input", {type: "text", id: "save-path", placeholder: "configs/my_lora.yaml"});
  root.append(
    el("h2", {}, "Config"),
    el("div", {class: "toolbar"}, presetSelect,
      el("button", {id: "load-preset", onclick: async () => {
        if (!presetSelect.value) { return; }
        const preset = await api("GET", "/api/presets/values?name=" + encodeURIComponent(presetSelect.value));
        setValues(preset.values, preset.name);
        route();
      }}, "Load preset"),
      el("label", {}, "Import YAML ", fileInput),
      el("button", {id: "export", onclick: exportYaml}, "Export YAML"),
      savePath, el("button", {id: "save", onclick: () => saveYaml(savePath.value)}, "Save as"),
      el("button", {id: "show-command", onclick: showCommand}, "Show the command"),
      el("button", {id: "clear", onclick: () => { setValues({}, null); route(); }}, "Clear")),
    el("pre", {id: "command", hidden: true}),
    el("div", {id: "validation", class: "errors"}));
  schema.groups.forEach((group, index) => {  // each section of the schema; open when it holds a set key
    const fields = schema.fields.filter((f) => f.group === group);
    const set = fields.filter((f) => f.name in state.values).length;
    root.append(el("details", {class: "group", "data-group": group, open: index === 0 || set > 0},
      el("summary", {}, `${group} (${fields.length} keys, ${set} set)`), el("fieldset", {}, fields.map(fieldRow))));
  });
  const unknown = Object.keys(state.values).filter((k) => !known.has(k));
  if (unknown.length) {
    root.append(el("fieldset", {id: "unknown-keys"}, el("legend", {}, "keys the schema does not know"),
      unknown.map((name) => fieldRow({name, kind: "yaml", required: false, default: "null", type: "?", description: "not a config key: rename or clear it"}))));
  }
  const nameInput = el("input", {type: "text", id: "job-name", placeholder: "run name (default: the output_dir's name)"});
  root.append(el("div", {class: "toolbar"}, nameInput,
    el("button", {id: "queue", class: "primary", onclick: async () => {
      try {
        const job = await api("POST", "/api/jobs", {values: state.values, name: nameInput.value || null});
        flash(`queued job ${job.id}: ${job.name}`);
        document.getElementById("queued").replaceChildren("Queued ", el("a", {href: `#/job/${job.id}`}, `job ${job.id} (${job.name})`));
      } catch (e) { showErrors(e.message); }
    }}, "Queue run"), el("span", {id: "queued"})));
  validateNow();
}

function scheduleValidate() {
  clearTimeout(state.validateTimer);
  state.validateTimer = setTimeout(validateNow, 250);
}

async function validateNow() {
  if (!document.getElementById("validation")) { return; }
  const result = await api("POST", "/api/config/validate", {values: state.values});
  document.querySelectorAll(".field").forEach((row) => {
    const lines = result.errors[row.dataset.key] || [];
    row.classList.toggle("invalid", lines.length > 0);
    row.classList.toggle("set", row.dataset.key in state.values);
    row.querySelector(".error").textContent = lines.join("\n");
    if (lines.length && row.closest("details")) { row.closest("details").open = true; }
  });
  const box = document.getElementById("validation");
  box.className = result.ok ? "ok" : "errors";
  box.textContent = result.ok ? "✓ valid: lora-scripts train would accept this config" : result.general.join("\n");
}

function showErrors(message) {
  const box = document.getElementById("validation");
  box.className = "errors";
  box.textContent = message;
  flash("refused: see the message above the form");
}

async function importYaml(event) {
  const file = event.target.files[0];
  if (!file) { return; }
  try {
    const result = await api("POST", "/api/config/import", {text: await file.text(), filename: file.name});
    setValues(result.values, null);
    route();
    flash(`imported ${file.name}`);
  } catch (e) { showErrors(e.message); }
}

async function exportYaml() {
  const result = await api("POST", "/api/config/export", {values: state.values});
  const link = el("a", {href: URL.createObjectURL(new Blob([result.yaml], {type: "text/yaml"})), download: "config.yaml"});
  document.body.append(link);
  link.click();
  link.remove();
}

async function saveYaml(path) {
  try {
    const result = await api("POST", "/api/config/save", {values: state.values, path});
    flash(`saved ${result.path}`);
    showCommandText(result.command, "");
  } catch (e) { showErrors(e.message); }
}

async function showCommand() {
  const result = await api("POST", "/api/config/command", {values: state.values, preset: state.preset});
  showCommandText(result.shell, result.note);
}

function showCommandText(text, note) {
  const box = document.getElementById("command");
  box.hidden = false;
  box.textContent = text + (note ? `\n# ${note}` : "");
}

// ---- routing ------------------------------------------------------------------------------

const PAGES = {};

async function route() {
  state.timers.forEach(clearInterval);
  state.timers = [];
  const [page, arg] = (location.hash.replace(/^#\/?/, "") || "config").split("/");
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.id === "nav-" + (page === "job" ? "jobs" : page)));
  const root = document.getElementById("page");
  root.replaceChildren();
  try {
    await (PAGES[page] || renderConfig)(root, arg);
  } catch (e) {
    root.append(el("div", {class: "errors"}, e.message));
  }
}

PAGES.config = renderConfig;
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => { loadForm(); route(); });
