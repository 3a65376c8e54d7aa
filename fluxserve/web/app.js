// The fluxserve playground: plain JavaScript, no build step. It reads the form's ranges and the
// scheduler list from /playground/config.json, submits to /v2/{slug}, follows the request's
// Server-Sent Events (with latent previews) and keeps a short history in localStorage.
"use strict";

const KEY_STORE = "fluxserve.apiKey";
const HISTORY_STORE = "fluxserve.history";
const SETTINGS_STORE = "fluxserve.settings";
const HISTORY_LIMIT = 20;
const NUMBER_FIELDS = ["width", "height", "steps", "CFGScale"];
const FIELDS = ["positivePrompt", ...NUMBER_FIELDS, "seed", "outputFormat", "scheduler"];

const $ = (id) => document.getElementById(id);
let config = null;
let current = null; // {id, abort} of the request in flight

// -- talking to the API ---------------------------------------------------------------------------

function headers(extra = {}) {
  const key = $("apiKey").value.trim();
  return key ? { ...extra, "x-api-key": key } : extra;
}

async function errorOf(response) {
  try {
    return (await response.json()).error || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// Seeds go up to 2^63-1, beyond a JavaScript number's exact range: they travel as digit strings.
function bodyText(settings) {
  const { seed, ...rest } = settings;
  return JSON.stringify({ ...rest, seed: "__SEED__" }).replace('"__SEED__"', seed);
}

function rawSeed(text) {
  const match = /"seed"\s*:\s*(-?\d+)/.exec(text);
  return match ? match[1] : "";
}

// Server-Sent Events over fetch (EventSource cannot send the API key header).
async function followEvents(id, onEvent, signal) {
  const response = await fetch(`/v2/requests/${id}/events?preview=true`, { headers: headers(), signal });
  if (!response.ok) throw new Error(await errorOf(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

// -- the form ---------------------------------------------------------------------------------------

function hint(spec) {
  const parts = [];
  if (spec.minimum !== undefined && spec.maximum !== undefined) parts.push(`${spec.minimum}–${spec.maximum}`);
  if (spec.default !== undefined) parts.push(`default ${spec.default}`);
  return parts.join(", ");
}

function applyConfig() {
  $("slug").textContent = config.slug;
  const params = config.parameters;
  for (const name of NUMBER_FIELDS) {
    const input = $(name);
    const spec = params[name];
    if (spec.minimum !== undefined) input.min = spec.minimum;
    if (spec.maximum !== undefined) input.max = spec.maximum;
    input.value = spec.default;
    $(`${name}-hint`).textContent = hint(spec);
  }
  $("positivePrompt").maxLength = params.positivePrompt.maxLength || 10000;
  $("positivePrompt").value = params.positivePrompt.default || "";
  $("seed").value = params.seed.default;
  $("seed-hint").textContent = `0–${params.seed.maximum_text}, default ${params.seed.default}`;
  $("outputFormat").replaceChildren(...params.outputFormat.enum.map((value) => new Option(value, value)));
  $("outputFormat").value = params.outputFormat.default;
  const schedulers = config.schedulers.map((s) => {
    const option = new Option(s.name, s.name);
    option.title = s.description || "";
    return option;
  });
  $("scheduler").replaceChildren(...schedulers);
  $("scheduler").value = params.scheduler.default;
  $("scheduler-hint").textContent = `${config.schedulers.length} samplers`;
}

function readSettings() {
  const settings = {};
  for (const name of FIELDS) settings[name] = $(name).value;
  for (const name of NUMBER_FIELDS) settings[name] = Number(settings[name]);
  settings.seed = String(settings.seed).trim();
  return settings;
}

function writeSettings(settings) {
  for (const name of FIELDS) if (settings[name] !== undefined) $(name).value = settings[name];
  settingsChanged();
}

function checkSeed() {
  const seed = $("seed");
  const max = BigInt(config.parameters.seed.maximum_text);
  const ok = /^\d+$/.test(seed.value.trim()) && BigInt(seed.value.trim()) <= max;
  seed.setCustomValidity(ok ? "" : `Seed must be a whole number from 0 to ${max}`);
}

function settingsChanged() {
  checkSeed();
  localStorage.setItem(SETTINGS_STORE, JSON.stringify(readSettings()));
  renderSnippets();
}

// -- snippets -------------------------------------------------------------------------------------

function shellQuote(text) {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

function pythonValue(value) {
  return typeof value === "string" && !/^\d+$/.test(value) ? JSON.stringify(value) : String(value);
}

function renderSnippets() {
  const settings = readSettings();
  const base = window.location.origin;
  const ext = { JPG: "jpg", PNG: "png", WEBP: "webp" }[settings.outputFormat] || "img";
  const keyLine = $("apiKey").value.trim() ? ` \\\n  -H "x-api-key: $FLUXSERVE_API_KEY"` : "";
  $("curlSnippet").textContent =
    `curl -X POST ${base}/v1/${config.slug}${keyLine} \\\n  -H 'Content-Type: application/json' \\\n` +
    `  -d ${shellQuote(bodyText(settings))} \\\n  -o image.${ext}`;
  const args = FIELDS.map((name) => `    ${name}=${pythonValue(name === "seed" ? settings.seed : settings[name])},`);
  const key = $("apiKey").value.trim() ? `os.environ["FLUXSERVE_API_KEY"], ` : "";
  $("pythonSnippet").textContent = [
    key ? "import os\n" : "",
    "from segmind import SegmindClient\n\n",
    `client = SegmindClient(${key ? "api_key=" + key : ""}base_url="${base}/v1")\n`,
    `result = client.run(\n    "${config.slug}",\n${args.join("\n")}\n)\n`,
    'print(result["output"], result["seed"])\n',
  ].join("");
}

async function copy(id) {
  const text = $(id).textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copied").textContent = "Copied.";
  } catch {
    const range = document.createRange();
    range.selectNodeContents($(id));
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
    $("copied").textContent = "Selected: press Ctrl+C to copy.";
  }
}

// -- history ----------------------------------------------------------------------------------------

function loadHistory() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY_STORE)) || [];
  } catch {
    return [];
  }
}

function remember(entry) {
  const history = [entry, ...loadHistory().filter((e) => e.id !== entry.id)].slice(0, HISTORY_LIMIT);
  localStorage.setItem(HISTORY_STORE, JSON.stringify(history));
  renderHistory();
}

function renderHistory() {
  const items = loadHistory().map((entry) => {
    const item = document.createElement("li");
    const image = document.createElement("img");
    image.src = entry.output;
    image.alt = `Result for: ${entry.settings.positivePrompt}`;
    image.loading = "lazy";
    image.width = 64;
    const text = document.createElement("span");
    const s = entry.settings;
    text.textContent = `${s.positivePrompt.slice(0, 80)} — ${s.width}×${s.height}, ${s.steps} steps, seed ${entry.seed}`;
    const restore = document.createElement("button");
    restore.type = "button";
    restore.textContent = "Use these settings";
    restore.addEventListener("click", () => {
      writeSettings({ ...s, seed: entry.seed });
      $("positivePrompt").focus();
    });
    item.append(image, text, restore);
    return item;
  });
  $("history").replaceChildren(...items);
}

// -- one generation -------------------------------------------------------------------------------

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
}

function showProgress(percent, label) {
  $("progress").value = percent;
  $("progress").setAttribute("aria-valuenow", String(percent));
  $("progress-label").textContent = label;
}

function onStatus(body) {
  if (body.status === "QUEUED") {
    $("status").textContent = `Queued (position ${body.queue_position ?? "?"}).`;
    showProgress(0, "Waiting in the queue");
  } else if (body.status === "PROCESSING") {
    const p = body.progress;
    if (!p) {
      $("status").textContent = "Starting…";
      return;
    }
    const eta = p.eta_seconds != null ? `, about ${Math.ceil(p.eta_seconds)} s left` : "";
    $("status").textContent = `Generating: step ${p.step} of ${p.total}${eta}.`;
    showProgress(p.percent, `${p.percent}%`);
    if (p.preview) {
      $("preview").src = p.preview;
      $("preview").hidden = false;
    }
  }
}

function onCompleted(text, settings) {
  const body = JSON.parse(text);
  const seed = rawSeed(text);
  showProgress(100, "100%");
  $("status").textContent = `Done in ${body.metrics.total_time} s.`;
  $("preview").hidden = true;
  $("image").alt = `Generated image for: ${settings.positivePrompt}`;
  $("image").src = body.output;
  $("download").href = body.output;
  $("resultSeed").value = seed;
  $("result").hidden = false;
  remember({ id: body.request_id, output: body.output, seed, settings, at: Date.now() });
}

async function generate(event) {
  event.preventDefault();
  checkSeed();
  if (!$("form").reportValidity()) return;
  const settings = readSettings();
  $("error").textContent = "";
  $("result").hidden = true;
  $("preview").hidden = true;
  showProgress(0, "Submitting");
  $("status").textContent = "Submitting…";
  setBusy(true);
  const abort = new AbortController();
  try {
    const response = await fetch(`/v2/${config.slug}`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: bodyText(settings),
    });
    if (!response.ok) throw new Error(await errorOf(response));
    const { request_id: id } = await response.json();
    current = { id, abort };
    await followEvents(id, (name, data) => {
      if (name === "status") onStatus(JSON.parse(data));
      else if (name === "completed") onCompleted(data, settings);
      else if (name === "failed" || name === "error") throw new Error(JSON.parse(data).error);
    }, abort.signal);
  } catch (error) {
    if (error.name !== "AbortError") {
      $("error").textContent = error.message;
      $("status").textContent = "Failed.";
      $("preview").hidden = true;
    }
  } finally {
    abort.abort(); // closes the event stream if an event ended the run early
    current = null;
    setBusy(false);
  }
}

async function cancel() {
  if (!current) return;
  const { id } = current;
  const response = await fetch(`/v2/requests/${id}/cancel`, { method: "POST", headers: headers() });
  if (!response.ok) $("error").textContent = await errorOf(response);
}

// -- start ------------------------------------------------------------------------------------------

async function start() {
  $("apiKey").value = localStorage.getItem(KEY_STORE) || "";
  const response = await fetch("/playground/config.json", { headers: headers() });
  if (!response.ok) {
    $("error").textContent = `Could not load the model's parameters: ${await errorOf(response)}`;
    return;
  }
  config = await response.json();
  applyConfig();
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_STORE));
    if (saved) writeSettings(saved);
  } catch {
    /* ignore a damaged saved state */
  }
  settingsChanged();
  renderHistory();

  $("form").addEventListener("submit", generate);
  $("form").addEventListener("input", settingsChanged);
  $("form").addEventListener("change", settingsChanged);
  $("apiKey").addEventListener("change", () => localStorage.setItem(KEY_STORE, $("apiKey").value.trim()));
  $("positivePrompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
  $("cancel").addEventListener("click", cancel);
  $("randomSeed").addEventListener("click", () => {
    $("seed").value = String(Math.floor(Math.random() * 2 ** 32));
    settingsChanged();
  });
  $("reuseSeed").addEventListener("click", () => {
    $("seed").value = $("resultSeed").value;
    settingsChanged();
    $("seed").focus();
  });
  $("clearHistory").addEventListener("click", () => {
    localStorage.removeItem(HISTORY_STORE);
    renderHistory();
  });
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", () => copy(button.dataset.copy));
  }
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
