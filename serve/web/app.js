// The page talks to the same REST API as any client: /v1/adapters and /v1/tunings (control plane) and
// /v1/generate (format json). No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "ct2i.key";
let adapters = [];
let tuningTimer = null;

function headers() {
  return { "Authorization": "Bearer " + $("key").value.trim(), "Content-Type": "application/json" };
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : body;
    const where = detail && detail.field ? detail.field + ": " : "";
    throw new Error(`${response.status} ${where}${detail && detail.message ? detail.message : JSON.stringify(detail)}`);
  }
  return body;
}

async function connect() {
  localStorage.setItem(KEY_STORE, $("key").value.trim());
  $("error").textContent = "";
  try {
    adapters = await api("/v1/adapters");
  } catch (err) {
    $("whoami").textContent = "";
    $("error").textContent = err.message;
    return;
  }
  const select = $("adapter");
  select.replaceChildren(new Option("base (no adapter)", "base"));
  for (const a of adapters) {
    select.add(new Option(`${a.tenant}/${a.name}@${a.version}`, `${a.tenant}/${a.name}@${a.version}`));
  }
  if (adapters.length) select.selectedIndex = adapters.length;  // the newest listed last
  $("whoami").textContent = `${adapters.length} adapter(s)`;
  showTokens();
  refreshTunings();
  clearInterval(tuningTimer);
  tuningTimer = setInterval(refreshTunings, 2000);
}

function showTokens() {
  const chosen = adapters.find((a) => `${a.tenant}/${a.name}@${a.version}` === $("adapter").value);
  $("tokens").textContent = chosen ? `(${chosen.param_mode}; base ${chosen.base_model})` : "";
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

async function generate() {
  $("error").textContent = "";
  $("status").textContent = "generating…";
  $("generate").disabled = true;
  const started = performance.now();
  const body = {
    adapter: $("adapter").value, prompt: $("prompt").value, negative_prompt: $("negative").value,
    steps: numberOrNull("steps"), guidance_scale: numberOrNull("guidance"), n: numberOrNull("n"),
    width: numberOrNull("width"), height: numberOrNull("height"), seed: numberOrNull("seed"), format: "json",
  };
  for (const k of Object.keys(body)) if (body[k] === null) delete body[k];
  try {
    const result = await api("/v1/generate", { method: "POST", body: JSON.stringify(body) });
    const box = $("images");
    box.replaceChildren();
    result.images.forEach((b64, i) => {
      const img = new Image();
      img.src = "data:image/png;base64," + b64;
      img.alt = `seed ${result.seeds[i]}`;
      img.title = `seed ${result.seeds[i]}`;
      img.className = "generated";
      box.append(img);
    });
    $("status").textContent = `${result.images.length} image(s), seed ${result.seed}, ` +
      `${((performance.now() - started) / 1000).toFixed(2)} s`;
  } catch (err) {
    $("status").textContent = "";
    $("error").textContent = err.message;
  } finally {
    $("generate").disabled = false;
  }
}

async function refreshTunings() {
  let jobs;
  try { jobs = await api("/v1/tunings?limit=20"); } catch (_) { return; }
  const rows = jobs.map((job) => {
    const tr = document.createElement("tr");
    const bar = document.createElement("progress");
    bar.max = Math.max(1, job.progress.total_steps);
    bar.value = job.progress.step;
    const cells = [job.id, job.name, job.state + (job.queue_reason ? ` (${job.queue_reason})` : ""), bar,
      job.adapter_id || ""];
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell instanceof Node) {
        td.append(cell, ` ${job.progress.step}/${job.progress.total_steps}`);
      } else {
        td.textContent = cell;
      }
      tr.append(td);
    }
    return tr;
  });
  const body = $("tunings");
  if (rows.length) body.replaceChildren(...rows);
  else body.innerHTML = '<tr><td colspan="5" class="muted">no tunings yet</td></tr>';
}

$("connect").addEventListener("click", connect);
$("generate").addEventListener("click", generate);
$("adapter").addEventListener("change", showTokens);
$("key").addEventListener("keydown", (e) => { if (e.key === "Enter") connect(); });
const saved = localStorage.getItem(KEY_STORE);
if (saved) { $("key").value = saved; connect(); }
