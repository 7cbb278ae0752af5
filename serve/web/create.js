// Create a tuning: subjects (photos, class word, identifier token), a preset that fills `train:`, the spec shown,
// then the same multipart POST /v1/tunings the CLI's upload uses. Every refusal is shown next to its field.
"use strict";

const PRESETS = {  // steps per subject, checkpoint (and preview) interval
  quick: { perSubject: 200, checkpointEvery: 50 },
  standard: { perSubject: 500, checkpointEvery: 100 },
  full: { perSubject: 1000, checkpointEvery: 200 },
};
const IDEAS_STORE = "ct2i.ideas";
let subjectCounter = 0;
const subjects = [];  // {id, node, files: [{file, upload}], tokenEdited}
const submissions = {};  // job id → FormData parts, for Retry in this browser session

function suggestedToken(subject, index) {
  const word = subject.node.querySelector(".class-word").value.trim().toLowerCase().replace(/[^a-z0-9]/g, "");
  const taken = new Set(subjects.filter((s) => s !== subject).map((s) => s.node.querySelector(".token").value));
  const stem = (word[0] || "s");
  for (let n = index + 1; ; n++) {
    const token = `<${stem}${n}>`;
    if (!taken.has(token)) return token;
  }
}

function uploadName(subjectIndex, fileIndex, file) {
  const dot = file.name.lastIndexOf(".");
  const suffix = dot >= 0 ? file.name.slice(dot).toLowerCase().replace(/[^a-z0-9.]/g, "") : "";
  const stem = (dot >= 0 ? file.name.slice(0, dot) : file.name).toLowerCase().replace(/[^a-z0-9_-]+/g, "-").slice(0, 40) || "photo";
  return `s${subjectIndex + 1}-${fileIndex + 1}-${stem}${suffix}`;
}

function addSubject(classWord = "") {
  const id = ++subjectCounter;
  const node = $("subject-template").content.firstElementChild.cloneNode(true);
  const subject = { id, node, files: [], tokenEdited: false };
  subjects.push(subject);
  const ids = { photos: `photos-${id}`, cls: `class-${id}`, token: `token-${id}` };
  const photos = node.querySelector(".photos"), cls = node.querySelector(".class-word"), token = node.querySelector(".token");
  photos.id = ids.photos; cls.id = ids.cls; token.id = ids.token;
  photos.setAttribute("aria-label", `photos of subject ${id}`);
  node.querySelector(".lbl-class").setAttribute("for", ids.cls);
  node.querySelector(".lbl-token").setAttribute("for", ids.token);
  for (const [input, cls_] of [[photos, "err-photos"], [cls, "err-class"], [token, "err-token"]]) {
    const err = node.querySelector("." + cls_);
    err.id = `${cls_}-${id}`;
    input.setAttribute("aria-describedby", err.id);
  }
  cls.value = classWord;
  const drop = node.querySelector(".drop");
  drop.setAttribute("aria-label", `photos of subject ${id}: drop files or press Enter to choose`);
  drop.addEventListener("click", (e) => { if (e.target !== photos) photos.click(); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); photos.click(); } });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles(subject, e.dataTransfer.files); });
  photos.addEventListener("change", () => { addFiles(subject, photos.files); photos.value = ""; });
  cls.addEventListener("input", () => { if (!subject.tokenEdited) token.value = suggestedToken(subject, subjects.indexOf(subject)); renderSpec(); });
  token.addEventListener("input", () => { subject.tokenEdited = true; renderSpec(); });
  node.querySelector(".remove-subject").addEventListener("click", () => {
    subjects.splice(subjects.indexOf(subject), 1); node.remove(); relabel(); renderSpec();
  });
  $("subjects").append(node);
  token.value = suggestedToken(subject, subjects.length - 1);
  relabel(); renderSpec();
  return subject;
}

function relabel() {
  subjects.forEach((s, i) => { s.node.querySelector("legend").textContent = `Subject ${i + 1}`; });
}

function addFiles(subject, fileList) {
  for (const file of fileList) {
    if (!subject.files.some((f) => f.file.name === file.name && f.file.size === file.size)) subject.files.push({ file });
  }
  clearErrors();
  renderThumbs(subject);
  renderSpec();
}

function renderThumbs(subject) {
  const list = subject.node.querySelector(".thumbs");
  list.replaceChildren();
  subject.files.forEach((entry, index) => {
    const item = el("li", { "data-name": entry.file.name });
    if (entry.refused) item.classList.add("refused");
    if (entry.file.type.startsWith("image/")) {
      const img = el("img", { alt: entry.file.name });
      img.src = URL.createObjectURL(entry.file);
      item.append(img);
    }
    const remove = el("button", { type: "button", text: "×", "aria-label": `remove ${entry.file.name}` });
    remove.addEventListener("click", () => { subject.files.splice(index, 1); renderThumbs(subject); renderSpec(); });
    item.append(el("span", { text: entry.file.name }), remove);
    list.append(item);
  });
}

function numberOr(id, fallback) {
  const value = $(id).value.trim();
  return value === "" ? fallback : Number(value);
}

function buildSpec() {
  const preset = PRESETS[$("preset").value];
  const mode = $("mode").value;
  const base = $("base-model").value.trim() || "tiny";
  const train = {
    steps: numberOr("steps", preset.perSubject * Math.max(1, subjects.length)),
    checkpoint_every: preset.checkpointEvery,
    param_mode: mode,
    resolution: numberOr("resolution", base === "tiny" ? 64 : 1024),
  };
  if (mode === "lora") train.lora_rank = 16;
  train.checkpoint_every = Math.min(train.checkpoint_every, train.steps);
  const previewEvery = $("preview-every").value.trim();
  if (previewEvery !== "") train.preview_every = Number(previewEvery);
  const gpus = numberOr("gpus", 1);
  // The evaluation the result shows (report.png, metrics.json). The tiny preset is random weights for trying the
  // platform out: one prompt at 2 sampling steps says as much about it as more would, at a fraction of the time.
  const evaluation = $("evaluate").checked
    ? (base === "tiny" ? { prompts: 1, seeds: [0, 1], steps: 2 } : { prompts: 2, seeds: [0, 1], steps: 20 }) : null;
  return {
    tenant: window.ct2iTenant || "",
    name: $("job-name").value.trim(),
    base_model: base,
    subjects: subjects.map((s, i) => ({
      token: s.node.querySelector(".token").value.trim(),
      class_word: s.node.querySelector(".class-word").value.trim(),
      images: s.files.map((entry, j) => (entry.upload = uploadName(i, j, entry.file))),
    })),
    train,
    resources: { num_workers: 1, gpus_per_worker: gpus, cpus_per_worker: 1 },
    ...(evaluation ? { evaluation } : {}),
  };
}

function renderSpec() {
  $("spec-preview").textContent = JSON.stringify(buildSpec(), null, 2);
}

function clearErrors() {
  for (const node of document.querySelectorAll("#create-form .field-error, #err-form")) node.textContent = "";
  for (const node of document.querySelectorAll("#create-form [aria-invalid]")) node.removeAttribute("aria-invalid");
  for (const s of subjects) s.files.forEach((f) => { f.refused = false; });
}

// Where a server field lands on the form: `images.<upload>` and `subjects.<i>.images...` at that subject's photos
// (naming the file as the user picked it), `subjects.<i>.token|class_word` at those inputs, `train.*` at the preset.
function showRefusal(err) {
  const field = (err.field || "").replace(/^spec\./, "");
  let slot = null, input = null, message = err.detail || err.message;
  const imageMatch = field.match(/^images\.(.+)$/);
  const subjectMatch = field.match(/^subjects\.(\d+)\.(\w+)(?:\.(\d+))?/);
  if (imageMatch) {
    for (const s of subjects) {
      const entry = s.files.find((f) => f.upload === imageMatch[1]);
      if (entry) {
        entry.refused = true; renderThumbs(s);
        slot = s.node.querySelector(".err-photos"); input = s.node.querySelector(".photos");
        message = `${entry.file.name}: ${message}`;
      }
    }
  } else if (subjectMatch && subjects[Number(subjectMatch[1])]) {
    const s = subjects[Number(subjectMatch[1])];
    const which = subjectMatch[2];
    if (which === "images") {
      slot = s.node.querySelector(".err-photos"); input = s.node.querySelector(".photos");
      // The spec check names the photo by its index in the message ("images[1] 's2-2-x.txt': why").
      const inMessage = message.match(/^images\[(\d+)\] '[^']*': (.*)$/s);
      const index = subjectMatch[3] !== undefined ? Number(subjectMatch[3]) : (inMessage ? Number(inMessage[1]) : -1);
      const entry = s.files[index];
      if (entry) {
        entry.refused = true; renderThumbs(s);
        message = `${entry.file.name}: ${inMessage ? inMessage[2] : message}`;
      }
    } else if (which === "class_word") { slot = s.node.querySelector(".err-class"); input = s.node.querySelector(".class-word"); }
    else if (which === "token") { slot = s.node.querySelector(".err-token"); input = s.node.querySelector(".token"); }
  } else if (field === "subjects" || field === "images") { slot = $("err-subjects"); }
  else if (field === "name") { slot = $("err-name"); input = $("job-name"); }
  else if (field === "base_model") { slot = $("err-base"); input = $("base-model"); $("err-base").closest("details").open = true; }
  else if (field.startsWith("train") || field.startsWith("resources")) { slot = $("err-preset"); input = $("preset"); }
  (slot || $("err-form")).textContent = slot ? message : (field ? `${field}: ${message}` : message);
  if (input) { input.setAttribute("aria-invalid", "true"); input.focus(); }
}

async function submitTuning(event) {
  event.preventDefault();
  clearErrors();
  const spec = buildSpec();
  renderSpec();
  if (!subjects.length) { $("err-subjects").textContent = "add at least one subject"; return; }
  for (const s of subjects) {
    if (!s.files.length) { s.node.querySelector(".err-photos").textContent = "add at least one photo"; return; }
  }
  const parts = [["spec", JSON.stringify(spec)]];
  for (const s of subjects) for (const entry of s.files) parts.push([entry.upload, entry.file, entry.upload]);
  $("submit").disabled = true;
  $("submit-status").textContent = "uploading…";
  try {
    const job = await sendSubmission(parts);
    const ideas = $("ideas").value.split("\n").map((l) => l.trim()).filter(Boolean);
    if (ideas.length) localStorage.setItem(IDEAS_STORE, JSON.stringify(ideas));
    $("submit-status").textContent = `submitted ${job.id}`;
    window.ct2iWatch(job.id);
  } catch (err) {
    $("submit-status").textContent = "";
    if (err instanceof ApiError) showRefusal(err); else $("err-form").textContent = String(err);
  } finally {
    $("submit").disabled = false;
  }
}

async function sendSubmission(parts) {
  const form = new FormData();
  for (const [name, value, filename] of parts) {
    if (filename) form.append(name, value, filename); else form.append(name, value);
  }
  const job = await api("/v1/tunings", { method: "POST", body: form });
  submissions[job.id] = parts;
  return job;
}

window.ct2iRetry = async (jobId) => {
  const parts = submissions[jobId];
  if (!parts) throw new Error("this browser did not submit that tuning; create it again from the Create tab");
  return sendSubmission(parts);
};
window.ct2iCanRetry = (jobId) => Boolean(submissions[jobId]);

function initCreate() {
  $("add-subject").addEventListener("click", () => addSubject());
  $("create-form").addEventListener("submit", submitTuning);
  for (const id of ["job-name", "preset", "mode", "base-model", "steps", "resolution", "preview-every", "gpus", "evaluate"]) {
    $(id).addEventListener("input", renderSpec);
    $(id).addEventListener("change", renderSpec);
  }
  $("ideas").value = JSON.parse(localStorage.getItem(IDEAS_STORE) || "[]").join("\n");
  addSubject(); addSubject();
}
