// Shared by the console's scripts: the REST client (the same routes any client uses) and small DOM helpers.
// No build step, no dependencies; no inline script or style anywhere (CSP script-src 'self').
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "ct2i.key";

function apiKey() { return $("key").value.trim(); }

class ApiError extends Error {
  // `field` is what the server's 4xx body names ({"detail": {"field", "message"}}), "" when it names none.
  constructor(status, field, message, code) {
    super(field ? `${field}: ${message}` : message);
    this.status = status; this.field = field || ""; this.detail = message; this.code = code || "";
  }
}

async function apiRaw(path, options = {}) {
  const headers = { "Authorization": "Bearer " + apiKey(), ...(options.headers || {}) };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options = { ...options, body: JSON.stringify(options.json) };
  }
  const response = await fetch(path, { ...options, headers });
  // A key that worked when the page connected and is refused now was revoked (perhaps from another browser).
  if (response.status === 401 && window.ct2iCaller && window.ct2iAskForKey) {
    window.ct2iAskForKey("this key is no longer accepted (revoked or unknown): enter another key");
  }
  if (!response.ok) {
    const text = await response.text();
    let detail = null;
    try { detail = JSON.parse(text).detail; } catch (_) { detail = text; }
    if (detail && typeof detail === "object" && !Array.isArray(detail)) {
      throw new ApiError(response.status, detail.field, detail.message || JSON.stringify(detail), detail.code);
    }
    throw new ApiError(response.status, "", `${response.status} ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return response;
}

async function api(path, options = {}) {
  const response = await apiRaw(path, options);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

async function apiBlobUrl(path) {
  const response = await apiRaw(path);
  return URL.createObjectURL(await response.blob());
}

function base64ToBlobUrl(b64, type = "image/png") {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return URL.createObjectURL(new Blob([bytes], { type }));
}

async function download(path, filename) {
  const url = await apiBlobUrl(path);
  const link = document.createElement("a");
  link.href = url; link.download = filename;
  document.body.append(link); link.click(); link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// Server-sent events over fetch (EventSource cannot send the Authorization header). Calls onEvent(kind, data)
// for each event until the stream ends or `signal` aborts; resumes after the last id on a dropped connection.
async function streamEvents(path, onEvent, signal) {
  let lastId = 0;
  for (let attempt = 0; attempt < 20 && !signal.aborted; attempt++) {
    try {
      const headers = lastId ? { "Last-Event-ID": String(lastId) } : {};
      const response = await apiRaw(path, { headers, signal });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          let kind = "message", data = "", id = null;
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) kind = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
            else if (line.startsWith("id: ")) id = Number(line.slice(4));
          }
          if (id) lastId = id;
          if (!data) continue;
          onEvent(kind, JSON.parse(data));
          if (kind === "end") return;
        }
      }
      return;
    } catch (err) {
      if (signal.aborted || (err instanceof ApiError && err.status < 500)) return;
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "for" || k === "role") node.setAttribute(k, v);
    else node[k] = v;
  }
  node.append(...children);
  return node;
}
