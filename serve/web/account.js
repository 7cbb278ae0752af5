// Usage and keys: the tenant's usage beside its quotas (GET /v1/usage), its API keys (GET/POST /v1/keys,
// DELETE /v1/keys/{id}); and for an admin key, every tenant's queue and the cluster's GPUs in use
// (GET /v1/admin/queue). A new key's secret is shown once and never stored by the page.
"use strict";

let adminTimer = null;

function bytesText(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function when(seconds) { return seconds ? new Date(seconds * 1000).toLocaleString() : ""; }

function usageRow(key, label, used, quota, fraction) {
  const cells = [el("th", { text: label }), el("td", { text: used }), el("td", { text: quota })];
  const meter = el("td");
  if (fraction != null && Number.isFinite(fraction)) {
    meter.append(el("meter", { min: 0, max: 1, low: 0.75, high: 0.9, optimum: 0, value: Math.min(1, fraction),
      "aria-label": `${label}: ${Math.round(fraction * 100)}% of the quota` }));
  }
  return el("tr", { "data-usage": key }, ...cells, meter);
}

function showUsage(usage) {
  const hours = usage.gpu_seconds_30d / 3600;
  const rows = [
    usageRow("gpu_hours", "GPU-hours, last 30 days", hours.toFixed(2), String(usage.gpu_hours_budget_30d),
      usage.gpu_hours_budget_30d > 0 ? hours / usage.gpu_hours_budget_30d : null),
    usageRow("jobs", "tunings running", String(usage.running_jobs), usage.max_concurrent_jobs != null ? `${usage.max_concurrent_jobs} at once` : "",
      usage.max_concurrent_jobs ? usage.running_jobs / usage.max_concurrent_jobs : null),
    usageRow("queued", "tunings queued", String(usage.queued_jobs), "", null),
    usageRow("adapters", "adapters", String(usage.adapters), usage.max_adapters != null ? String(usage.max_adapters) : "",
      usage.max_adapters ? usage.adapters / usage.max_adapters : null),
    usageRow("storage", "stored (photos and adapters)", bytesText(usage.stored_bytes),
      usage.max_stored_bytes != null ? bytesText(usage.max_stored_bytes) : "",
      usage.max_stored_bytes ? usage.stored_bytes / usage.max_stored_bytes : null),
  ];
  if (usage.generate_rpm != null) rows.push(usageRow("rpm", "generate requests", "", `${usage.generate_rpm} per minute`, null));
  $("usage").replaceChildren(...rows);
}

async function refreshKeys() {
  let keys;
  try { keys = await api("/v1/keys"); } catch (err) { $("keys-error").textContent = err.message; return; }
  const me = window.ct2iCaller;
  const rows = keys.map((key) => {
    const current = me && key.id === me.key_id;
    const state = key.revoked_at ? `revoked ${when(key.revoked_at)}` : (current ? "live (this page's key)" : "live");
    const actions = el("td");
    if (!key.revoked_at) {
      const revoke = el("button", { type: "button", text: "Revoke", class: "revoke", "data-key": key.id,
        "aria-label": `revoke key ${key.id}${key.label ? " (" + key.label + ")" : ""}${current ? ", the key this page uses" : ""}` });
      revoke.addEventListener("click", () => revokeKey(key, current));
      actions.append(revoke);
    }
    return el("tr", { "data-key": key.id, "data-state": key.revoked_at ? "revoked" : "live" },
      el("td", { text: key.id }), el("td", { text: key.label }), el("td", { text: when(key.created_at) }),
      el("td", { text: state }), actions);
  });
  $("keys").replaceChildren(...rows);
}

async function createKey(event) {
  event.preventDefault();
  $("err-key-label").textContent = ""; $("keys-error").textContent = ""; $("key-label").removeAttribute("aria-invalid");
  let created;
  try {
    created = await api("/v1/keys", { method: "POST", json: { label: $("key-label").value.trim() } });
  } catch (err) {
    if (err.field === "label") { $("err-key-label").textContent = err.detail; $("key-label").setAttribute("aria-invalid", "true"); }
    else $("keys-error").textContent = err.message;
    return;
  }
  $("key-label").value = "";
  $("new-key-secret").value = created.key;
  $("new-key").hidden = false;
  $("new-key-note").textContent = `New key ${created.id}${created.label ? " (" + created.label + ")" : ""}: copy it now; it will not be shown again.`;
  $("new-key-secret").focus();
  $("new-key-secret").select();
  await refreshKeys();
}

function forgetNewKey() {
  $("new-key-secret").value = "";
  $("new-key").hidden = true;
}

async function copyNewKey() {
  const secret = $("new-key-secret");
  secret.focus(); secret.select();
  try { await navigator.clipboard.writeText(secret.value); $("keys-status").textContent = "copied"; }
  catch (_) { $("keys-status").textContent = "selected: press Ctrl+C to copy"; }
}

async function revokeKey(key, current) {
  $("keys-error").textContent = "";
  // The key in use: stop every periodic request first, so none goes out with a key that is about to be refused.
  if (current) window.ct2iPause();
  try {
    await api(`/v1/keys/${key.id}`, { method: "DELETE" });
  } catch (err) {
    $("keys-error").textContent = err.message;
    if (current) window.ct2iResume();
    return;
  }
  if (current) { window.ct2iAskForKey(`key ${key.id} was revoked: enter another key`); return; }
  $("keys-status").textContent = `revoked ${key.id}`;
  await refreshKeys();
}

async function refreshAccount(usage) {
  showUsage(usage || await api("/v1/usage"));
  await refreshKeys();
}

function showAdminQueue(view) {
  const c = view.cluster;
  const capacity = c.capacity_units != null ? `${c.capacity_units}` : "the Ray cluster's GPUs (else CPUs)";
  $("cluster-usage").replaceChildren(
    el("tr", { "data-cluster": "gpus" }, el("th", { text: "GPUs held by running tunings" }), el("td", { text: String(c.gpus_in_use) })),
    el("tr", { "data-cluster": "units" }, el("th", { text: "capacity units in use (GPUs, or a worker per CPU job)" }),
      el("td", { text: `${c.demand_gpus_in_use} of ${capacity}` + (c.node_gpus != null ? `; node types offer ${c.node_gpus} GPUs` : "") })),
    el("tr", { "data-cluster": "jobs" }, el("th", { text: "tunings" }), el("td", { text: `${c.running_jobs} running, ${c.queued_jobs} queued` })));
  const rows = view.tenants.map((t) => {
    const jobs = t.jobs.length ? el("ul", { class: "queue" }, ...t.jobs.map((j) => el("li", { "data-job": j.id, "data-state": j.state },
      `${j.name} (${j.id}): ${j.state}` + (j.position ? ` #${j.position}` : "") + `, ${j.gpus} GPU` +
      (j.queue_reason ? ` — waiting: ${j.queue_reason}` : "")))) : el("span", { class: "muted", text: "nothing queued" });
    return el("tr", { "data-tenant": t.tenant },
      el("th", { text: t.tenant }), el("td", { text: `${t.running_jobs} of ${t.max_concurrent_jobs}` }),
      el("td", { text: String(t.queued_jobs) }), el("td", { text: `${t.gpus_in_use} (limit ${t.max_concurrent_gpus})` }), el("td", {}, jobs));
  });
  $("tenant-queues").replaceChildren(...rows);
}

async function refreshAdmin() {
  try {
    showAdminQueue(await api("/v1/admin/queue"));
    $("admin-error").textContent = "";
    $("admin-status").textContent = `as of ${new Date().toLocaleTimeString()}`;
  } catch (err) { $("admin-error").textContent = err.message; }
}

function startAdmin() { clearInterval(adminTimer); refreshAdmin(); adminTimer = setInterval(refreshAdmin, 3000); }
function stopAdmin() { clearInterval(adminTimer); adminTimer = null; }

function initAccount() {
  $("key-form").addEventListener("submit", createKey);
  $("copy-key").addEventListener("click", copyNewKey);
  $("dismiss-key").addEventListener("click", () => { forgetNewKey(); $("key-label").focus(); });
  $("use-new-key").addEventListener("click", () => { const key = $("new-key-secret").value; forgetNewKey(); $("key").value = key; window.ct2iConnect(); });
  $("admin-refresh").addEventListener("click", refreshAdmin);
}
