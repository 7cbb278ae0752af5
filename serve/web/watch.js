// Watch tunings: the list, and one tuning's state, waiting reason, progress and loss curves (polled from the job,
// events from its SSE stream), SaCD diagnostics, previews as they arrive, and the result at the end.
"use strict";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const CURVES = [["loss", "#222"], ["cdm", "#1a73e8"], ["attn", "#e8711a"], ["cst", "#2a9d3a"]];
let watching = null;  // {id, abort, timer, points, previewSteps, lastJob}

async function refreshTunings() {
  let jobs;
  try { jobs = await api("/v1/tunings?limit=50"); } catch (_) { return; }
  const queued = jobs.filter((j) => j.state === "queued").sort((a, b) => a.created_at - b.created_at);
  const rows = jobs.map((job) => {
    const bar = el("progress", { max: Math.max(1, job.progress.total_steps), value: job.progress.step });
    const position = job.state === "queued" ? ` #${queued.indexOf(job) + 1} of your queue` : "";
    const watch = el("button", { type: "button", text: "Watch", "aria-label": `watch ${job.name} (${job.id})` });
    watch.addEventListener("click", () => watchJob(job.id));
    return el("tr", { "data-job": job.id },
      el("td", { text: job.id }), el("td", { text: job.name }),
      el("td", { text: job.state + position + (job.queue_reason ? ` (${job.queue_reason})` : "") }),
      el("td", {}, bar, ` ${job.progress.step}/${job.progress.total_steps}`), el("td", {}, watch));
  });
  const body = $("tunings");
  if (rows.length) body.replaceChildren(...rows);
  else body.replaceChildren(el("tr", {}, el("td", { colSpan: 5, class: "muted", text: "no tunings yet" })));
}

function stopWatching() {
  if (!watching) return;
  watching.abort.abort();
  clearInterval(watching.timer);
  watching = null;
}

async function watchJob(jobId) {
  stopWatching();
  window.ct2iShowTab("watch");
  watching = { id: jobId, abort: new AbortController(), timer: null, points: [], previewSteps: new Set(), lastJob: null, reported: false };
  $("job-detail").hidden = false;
  $("job-error").textContent = ""; $("job-action-status").textContent = "";
  $("diagnostics").replaceChildren(el("tr", {}, el("td", { class: "muted", text: "none yet (at each checkpoint)" })));
  $("previews").replaceChildren(el("p", { class: "muted", text: "none yet" }));
  $("report").replaceChildren(el("p", { class: "muted", text: "when the tuning ends" }));
  const mine = watching;
  await pollJob(mine);
  mine.timer = setInterval(() => pollJob(mine), 1000);
  refreshPreviews(mine);
  streamEvents(`/v1/tunings/${jobId}/events`, (kind, data) => onEvent(mine, kind, data), mine.abort.signal);
}

async function pollJob(mine) {
  if (watching !== mine) return;
  let job;
  try { job = await api(`/v1/tunings/${mine.id}`); } catch (err) { $("job-error").textContent = err.message; return; }
  mine.lastJob = job;
  $("job-title").textContent = `${job.name} (${job.id})`;
  $("job-state").textContent = job.state;
  $("job-state").dataset.state = job.state;
  $("job-wait").textContent = job.state === "queued" || job.state === "admitted"
    ? `waiting: ${job.queue_reason || "for the scheduler"}` : (job.error ? `error: ${job.error}` : "");
  const p = job.progress;
  $("job-progress").max = Math.max(1, p.total_steps); $("job-progress").value = p.step;
  $("job-progress-text").textContent = `${p.step}/${p.total_steps}` + (p.loss != null ? ` loss ${p.loss.toPrecision(4)}` : "")
    + (p.eta_seconds && !TERMINAL.has(job.state) ? `, about ${Math.ceil(p.eta_seconds)} s left` : "");
  if (p.loss != null && p.step > 0 && !mine.points.some((pt) => pt.step === p.step)) {
    mine.points.push({ step: p.step, loss: p.loss, ...p.terms });
    drawCurves(mine.points);
  }
  $("job-cancel").disabled = TERMINAL.has(job.state);
  $("job-retry").disabled = !(job.state === "failed" || job.state === "cancelled") || !window.ct2iCanRetry(job.id);
  $("job-retry").title = window.ct2iCanRetry(job.id) ? "" : "only a tuning submitted from this browser session can be retried here";
  if (TERMINAL.has(job.state)) {
    clearInterval(mine.timer);
    if (!mine.reported) { mine.reported = true; refreshPreviews(mine); showResult(mine, job); }
  }
}

function onEvent(mine, kind, data) {
  if (watching !== mine) return;
  if (kind === "log" && data.data && data.data.preview) refreshPreviews(mine);
  if (kind === "log" && data.data && data.data.diagnostics) showDiagnostics(data.data.step, data.data.diagnostics);
  if (kind === "state" || kind === "end") pollJob(mine);
}

function drawCurves(points) {
  const canvas = $("loss-chart"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!points.length) return;
  const steps = points.map((p) => p.step);
  const values = points.flatMap((p) => CURVES.map(([k]) => p[k]).filter((v) => typeof v === "number"));
  const [x0, x1] = [Math.min(...steps), Math.max(...steps, Math.min(...steps) + 1)];
  const [y0, y1] = [Math.min(...values, 0), Math.max(...values, 1e-9)];
  const pad = 30, w = canvas.width - 2 * pad, h = canvas.height - 2 * pad;
  const x = (s) => pad + ((s - x0) / (x1 - x0)) * w, y = (v) => pad + h - ((v - y0) / (y1 - y0)) * h;
  ctx.strokeStyle = "#bbb"; ctx.strokeRect(pad, pad, w, h);
  ctx.fillStyle = "#666"; ctx.font = "11px sans-serif";
  ctx.fillText(y1.toPrecision(3), 2, pad + 4); ctx.fillText(y0.toPrecision(3), 2, pad + h);
  ctx.fillText(`step ${x0}`, pad, canvas.height - 8); ctx.fillText(`step ${x1}`, pad + w - 50, canvas.height - 8);
  for (const [key, color] of CURVES) {
    const series = points.filter((p) => typeof p[key] === "number");
    if (!series.length) continue;
    ctx.strokeStyle = color; ctx.beginPath();
    series.forEach((p, i) => (i ? ctx.lineTo(x(p.step), y(p[key])) : ctx.moveTo(x(p.step), y(p[key]))));
    ctx.stroke();
    for (const p of series) ctx.fillRect(x(p.step) - 1.5, y(p[key]) - 1.5, 3, 3);
  }
  const last = points[points.length - 1];
  $("loss-legend").replaceChildren(...CURVES.filter(([k]) => typeof last[k] === "number").map(([k]) =>
    el("span", { class: `legend-${k}`, text: `■ ${k} ${last[k].toPrecision(4)}  ` })));
}

function fmt(value) {
  if (Array.isArray(value)) return value.map((v) => v.toFixed(3)).join(", ");
  if (value && typeof value === "object") return Object.entries(value).map(([k, v]) => `${k} ${Number(v).toFixed(3)}`).join(", ");
  return typeof value === "number" ? value.toPrecision(4) : String(value);
}

function showDiagnostics(step, diagnostics) {
  const order = ["cos_margin", "mask_grad_share", "cos_kept", "cos_removed", "attn_in_tile", "mask_mean", "mask_std", "gamma_entropy", "alpha"];
  const keys = [...order.filter((k) => k in diagnostics), ...Object.keys(diagnostics).filter((k) => !order.includes(k)).sort()];
  $("diagnostics").replaceChildren(
    el("tr", {}, el("th", { text: "at step" }), el("td", { text: String(step) })),
    ...keys.map((k) => el("tr", { "data-key": k }, el("th", { text: k }), el("td", { text: fmt(diagnostics[k]) }))));
}

async function refreshPreviews(mine) {
  let previews;
  try { previews = await api(`/v1/tunings/${mine.id}/previews`); } catch (_) { return; }
  if (watching !== mine || !previews.length) return;
  let table = $("previews").querySelector("table");
  if (!table) {
    table = el("table", {}, el("thead", {}, el("tr", {}, el("th", { text: "step" }),
      ...previews[0].prompts.map((p) => el("th", { text: p })))), el("tbody"));
    $("previews").replaceChildren(table);
  }
  for (const preview of previews) {
    if (mine.previewSteps.has(preview.step)) continue;
    mine.previewSteps.add(preview.step);
    const row = el("tr", { "data-step": preview.step }, el("th", { text: String(preview.step) }));
    table.tBodies[0].append(row);
    for (const [i, path] of preview.files.entries()) {
      const img = el("img", { alt: `step ${preview.step}: ${preview.prompts[i]}`, class: "preview" });
      row.append(el("td", {}, img));
      apiBlobUrl(path).then((url) => { img.src = url; }).catch(() => {});
    }
  }
}

async function showResult(mine, job) {
  const box = $("report");
  if (job.state !== "succeeded") {
    box.replaceChildren(el("p", { class: "error", text: `${job.state}${job.error ? ": " + job.error : ""}` }));
    return;
  }
  let adapter;
  try { adapter = await api(`/v1/adapters/${job.adapter_id}`); } catch (err) { box.textContent = err.message; return; }
  const metrics = adapter.metrics || {};
  const rows = Object.entries(metrics).filter(([, v]) => v !== null && typeof v !== "object" || Array.isArray(v));
  const nested = Object.entries(metrics).filter(([, v]) => v && typeof v === "object" && !Array.isArray(v));
  const evaluated = job.spec && job.spec.evaluation;
  const use = el("button", { type: "button", text: "Generate with it" });
  use.addEventListener("click", () => window.ct2iUse(`${adapter.tenant}/${adapter.name}@${adapter.version}`));
  box.replaceChildren(
    el("p", { id: "report-summary", text: `adapter ${adapter.tenant}/${adapter.name}@${adapter.version} (${adapter.id}), ${adapter.param_mode}, ${(adapter.bytes / 1024).toFixed(0)} KiB` }),
    el("table", { id: "report-metrics" }, el("tbody", {},
      ...rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: fmt(v) }))),
      ...nested.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: fmt(v) }))))),
    el("p", { class: "muted", text: "The metrics above are the adapter manifest's: final loss and terms, and the SaCD diagnostics at the last step." }),
    el("div", { id: "evaluation" }, el("p", { class: "muted", text: evaluated
      ? "evaluation report: loading…" : "This tuning asked for no evaluation (`evaluation:` in its spec); `ct2i evaluate` makes one." })),
    use);
  if (evaluated) showEvaluation(adapter);
}

// The evaluation published with the adapter (spec `evaluation`): its metrics (CLIP-I Eq. 14 per subject, CLIP-T
// Eq. 16, KID Eq. 15, LPIPS diversity Eq. 17) and report.png (references beside the generated grid per prompt).
async function showEvaluation(adapter) {
  const box = $("evaluation");
  let metrics, url;
  try {
    metrics = await api(`/v1/adapters/${adapter.id}/files/metrics.json`);
    url = await apiBlobUrl(`/v1/adapters/${adapter.id}/files/report.png`);
  } catch (err) { box.replaceChildren(el("p", { class: "error", text: `evaluation report: ${err.message}` })); return; }
  const overall = metrics.overall || {};
  const rows = Object.entries(overall).filter(([, v]) => v !== null && v !== undefined);
  box.replaceChildren(
    el("h5", { text: "Evaluation" }),
    el("table", { id: "eval-metrics" }, el("tbody", {},
      ...rows.map(([k, v]) => el("tr", { "data-metric": k }, el("th", { text: k }), el("td", { text: fmt(v) }))))),
    el("img", { id: "eval-report", src: url, alt: `evaluation report of ${adapter.name} v${adapter.version}: each prompt's images beside the subjects' photos` }));
}

async function cancelJob() {
  if (!watching) return;
  try { await api(`/v1/tunings/${watching.id}/cancel`, { method: "POST" }); $("job-action-status").textContent = "cancel requested"; }
  catch (err) { $("job-error").textContent = err.message; }
  pollJob(watching);
}

async function retryJob() {
  if (!watching) return;
  try { const job = await window.ct2iRetry(watching.id); watchJob(job.id); }
  catch (err) { $("job-error").textContent = err.message; }
}

function initWatch() {
  $("job-cancel").addEventListener("click", cancelJob);
  $("job-retry").addEventListener("click", retryJob);
  window.ct2iWatch = watchJob;
}
