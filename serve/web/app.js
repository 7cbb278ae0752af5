// The console's entry: the key, the tabs, and the periodic tuning list. Loaded last (after api.js, create.js,
// watch.js, use.js, account.js). A tenant key gets the tenant's tabs; an admin key the tunings and the cluster.
"use strict";

const TENANT_TABS = ["create", "watch", "use", "account"];
const ADMIN_TABS = ["watch", "admin"];
let tuningTimer = null;
let currentTab = "create";

function allowedTabs() {
  const me = window.ct2iCaller;
  return me && me.scope === "admin" ? ADMIN_TABS : TENANT_TABS;
}

function showTab(name) {
  const allowed = allowedTabs();
  if (!allowed.includes(name)) name = allowed[0];
  currentTab = name;
  for (const tab of ["create", "watch", "use", "account", "admin"]) {
    $(`tab-${tab}`).hidden = !allowed.includes(tab);
    $(`panel-${tab}`).hidden = tab !== name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
  }
  if (name === "use") renderIdeas();
  if (name === "account" && window.ct2iCaller) refreshAccount();
  if (name === "admin" && window.ct2iCaller) startAdmin(); else stopAdmin();
}
window.ct2iShowTab = showTab;

function pause() {
  clearInterval(tuningTimer); tuningTimer = null;
  stopAdmin();
  stopWatching();
}
window.ct2iPause = pause;
window.ct2iResume = () => { if (window.ct2iCaller) { startPolling(); showTab(currentTab); } };

function startPolling() {
  refreshTunings();
  clearInterval(tuningTimer);
  tuningTimer = setInterval(refreshTunings, 2000);
}

// The key was revoked (here or elsewhere) or is unknown: forget it and ask for another; nothing is sent with it again.
function askForKey(message) {
  pause();
  window.ct2iCaller = null; window.ct2iTenant = "";
  localStorage.removeItem(KEY_STORE);
  $("key").value = "";
  $("whoami").textContent = "";
  $("key-error").textContent = message;
  $("tunings").replaceChildren(el("tr", {}, el("td", { colSpan: 5, class: "muted", text: "enter your key" })));
  $("job-detail").hidden = true;
  $("keys").replaceChildren(); $("usage").replaceChildren();
  forgetNewKey();
  showTab("create");
  $("key").focus();
}
window.ct2iAskForKey = askForKey;

async function connect() {
  pause();
  window.ct2iCaller = null;
  $("key-error").textContent = "";
  let usage = null;
  try {
    const me = await api("/v1/me");
    window.ct2iCaller = me;
    localStorage.setItem(KEY_STORE, apiKey());
    if (me.scope === "admin") {
      window.ct2iTenant = "";
      $("whoami").textContent = `admin key ${me.key_id}: every tenant's tunings and queue`;
    } else {
      usage = await api("/v1/usage");
      window.ct2iTenant = usage.tenant;
      $("whoami").textContent = `tenant ${usage.tenant}: ${usage.running_jobs} running, ${usage.queued_jobs} queued, ` +
        `${usage.adapters} adapter(s), ${(usage.gpu_seconds_30d / 3600).toFixed(2)} of ${usage.gpu_hours_budget_30d} GPU-hours (30 days)`;
      renderSpec();
      await loadAdapters();
    }
  } catch (err) {
    $("whoami").textContent = "";
    $("key-error").textContent = err.status === 401 ? `${err.message}: enter a valid key` : err.message;
    showTab(currentTab);
    return;
  }
  startPolling();
  showTab(window.ct2iCaller.scope === "admin" ? "admin" : currentTab);
}
window.ct2iConnect = connect;

for (const tab of ["create", "watch", "use", "account", "admin"]) $(`tab-${tab}`).addEventListener("click", () => showTab(tab));
$("connect").addEventListener("click", connect);
$("key").addEventListener("keydown", (e) => { if (e.key === "Enter") connect(); });
initCreate();
initWatch();
initUse();
initAccount();
showTab("create");
const saved = localStorage.getItem(KEY_STORE);
if (saved) { $("key").value = saved; connect(); }
