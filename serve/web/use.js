// Use a tuning: generate with chips that insert each subject's prompt fragment (any subset), seeds and batch,
// a gallery kept in this browser (localStorage), and downloads of the adapter's files.
"use strict";

const GALLERY_STORE = "ct2i.gallery";
const GALLERY_MAX = 24;
let adapters = [];

async function loadAdapters(select) {
  adapters = await api("/v1/adapters");
  const box = $("adapter");
  box.replaceChildren(new Option("base (no adapter)", "base"));
  for (const a of adapters) box.add(new Option(`${a.tenant}/${a.name}@${a.version}`, `${a.tenant}/${a.name}@${a.version}`));
  if (select) box.value = select;
  else if (adapters.length) box.selectedIndex = adapters.length;  // the newest is listed last
  await adapterChosen();
  return adapters;
}

function chosenAdapter() {
  return adapters.find((a) => `${a.tenant}/${a.name}@${a.version}` === $("adapter").value) || null;
}

function insertAtCursor(text) {
  const box = $("prompt");
  const start = box.selectionStart ?? box.value.length, end = box.selectionEnd ?? box.value.length;
  const before = box.value.slice(0, start), after = box.value.slice(end);
  const glue = before && !before.endsWith(" ") ? (before.trim().endsWith(",") ? " " : " and ") : "";
  box.value = before + glue + text + after;
  const cursor = (before + glue + text).length;
  box.focus(); box.setSelectionRange(cursor, cursor);
}

async function adapterChosen() {
  const adapter = chosenAdapter();
  $("tokens").textContent = adapter ? `(${adapter.param_mode}; base ${adapter.base_model})` : "";
  $("chips").replaceChildren();
  $("downloads").replaceChildren();
  if (!adapter) return;
  for (const file of ["adapter.safetensors", "manifest.json"]) {
    const button = el("button", { type: "button", text: `Download ${file}`, "data-file": file });
    button.addEventListener("click", () => download(`/v1/adapters/${adapter.id}/files/${file}`, `${adapter.name}-v${adapter.version}-${file}`)
      .catch((err) => { $("error").textContent = err.message; }));
    $("downloads").append(button, " ");
  }
  // Portable exports (GET /v1/adapters/{id}/export): LoRA files need a LoRA form; a full tune exports its tokens.
  const formats = adapter.param_mode === "lora" ? ["diffusers", "kohya", "embeddings"] : ["embeddings"];
  for (const format of formats) {
    const button = el("button", { type: "button", text: `Export for ${format}`, "data-export": format });
    button.addEventListener("click", () => download(`/v1/adapters/${adapter.id}/export?format=${format}`, `${adapter.name}-v${adapter.version}-${format}.zip`)
      .catch((err) => { $("error").textContent = err.message; }));
    $("downloads").append(button, " ");
  }
  if (!adapter.job_id) return;
  let job;
  try { job = await api(`/v1/tunings/${adapter.job_id}`); } catch (_) { return; }
  for (const subject of job.spec.subjects) {
    const fragment = `a ${subject.token} ${subject.class_word}`;
    const chip = el("button", { type: "button", class: "chip", text: `+ ${fragment}`, "data-token": subject.token,
      "aria-label": `insert "${fragment}" into the prompt` });
    chip.addEventListener("click", () => insertAtCursor(fragment));
    $("chips").append(chip);
  }
}

function renderIdeas() {
  const ideas = JSON.parse(localStorage.getItem("ct2i.ideas") || "[]");
  $("ideas-chips").replaceChildren(...ideas.map((idea) => {
    const chip = el("button", { type: "button", class: "chip", text: `idea: ${idea}` });
    chip.addEventListener("click", () => {
      const adapter = chosenAdapter();
      const subjects = [...$("chips").querySelectorAll(".chip")].map((c) => c.textContent.slice(2));
      const joined = subjects.length > 1 ? subjects.slice(0, -1).join(", ") + " and " + subjects[subjects.length - 1] : (subjects[0] || "");
      $("prompt").value = idea.replace("{subjects}", adapter ? joined : "");
      $("prompt").focus();
    });
    return chip;
  }));
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

async function generate() {
  $("error").textContent = ""; $("gen-err-prompt").textContent = "";
  $("status").textContent = "generating…";
  $("generate").disabled = true;
  const started = performance.now();
  const body = {
    adapter: $("adapter").value, prompt: $("prompt").value, negative_prompt: $("negative").value,
    steps: numberOrNull("steps-gen"), guidance_scale: numberOrNull("guidance"), n: numberOrNull("n"),
    width: numberOrNull("width"), height: numberOrNull("height"), seed: numberOrNull("seed"), format: "json",
  };
  for (const k of Object.keys(body)) if (body[k] === null) delete body[k];
  try {
    const result = await api("/v1/generate", { method: "POST", json: body });
    const box = $("images");
    box.replaceChildren();
    result.images.forEach((b64, i) => {
      const img = el("img", { alt: `seed ${result.seeds[i]}: ${body.prompt}`, title: `seed ${result.seeds[i]}`, className: "generated" });
      img.src = base64ToBlobUrl(b64);
      img.dataset.b64 = b64;
      box.append(img);
      keepInGallery({ b64, seed: result.seeds[i], prompt: body.prompt, adapter: body.adapter, at: Date.now() });
    });
    $("status").textContent = `${result.images.length} image(s), seed ${result.seed}, ${((performance.now() - started) / 1000).toFixed(2)} s`;
    renderGallery();
  } catch (err) {
    $("status").textContent = "";
    if (err instanceof ApiError && err.field === "prompt") $("gen-err-prompt").textContent = err.detail;
    else $("error").textContent = err.message;
  } finally {
    $("generate").disabled = false;
  }
}

function galleryItems() {
  try { return JSON.parse(localStorage.getItem(GALLERY_STORE) || "[]"); } catch (_) { return []; }
}

function keepInGallery(item) {
  let items = [item, ...galleryItems()].slice(0, GALLERY_MAX);
  while (items.length) {  // the browser's storage is finite: drop the oldest until it fits
    try { localStorage.setItem(GALLERY_STORE, JSON.stringify(items)); return; } catch (_) { items = items.slice(0, -1); }
  }
}

function renderGallery() {
  $("gallery").replaceChildren(...galleryItems().map((item) => {
    const img = el("img", { alt: `${item.prompt} (seed ${item.seed})` });
    img.src = base64ToBlobUrl(item.b64);
    const reuse = el("button", { type: "button", text: "Reuse", "aria-label": `reuse prompt and seed ${item.seed}` });
    reuse.addEventListener("click", () => { $("prompt").value = item.prompt; $("seed").value = item.seed; $("prompt").focus(); });
    return el("figure", {}, img, el("figcaption", { text: `${item.adapter} · seed ${item.seed} · ${item.prompt}` }), reuse);
  }));
}

function initUse() {
  $("generate").addEventListener("click", generate);
  $("adapter").addEventListener("change", adapterChosen);
  $("clear-gallery").addEventListener("click", () => { localStorage.removeItem(GALLERY_STORE); renderGallery(); });
  window.ct2iUse = async (ref) => { window.ct2iShowTab("use"); await loadAdapters(ref); renderIdeas(); };
  renderGallery();
}
