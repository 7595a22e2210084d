// The orchestrator dashboard: the queue and history, one job, the backends,
// live from the server-sent event stream. No build step, no dependencies.
// The farm view (farm.js) and the submit form (submit.js) load before this.
"use strict";

const main = document.getElementById("main");
const STATUSES = ["waiting", "queued", "assigned", "running", "completed", "failed", "cancelled"];
const progress = {}; // job id -> {value, max, node}
let refreshTimer = null;
// Each drawing of a page takes a turn. A drawing whose answers arrive after a
// newer one began (the user moved on, or a refresh came in between) is
// dropped, so a slow answer never paints over the page the user is on.
let turns = 0;
function turn() { const mine = ++turns; return () => mine === turns; }

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
// A job id as lists show it: its last 8 characters. A job id is a UUIDv7,
// whose first characters are its submission time (one for a whole batch
// submitted within a minute) and whose last ones are random.
function short(id) { return String(id ?? "").slice(-8); }
function badge(s) { return `<span class="badge s-${esc(s)}">${esc(s)}</span>`; }
function time(t) { return t ? esc(t.replace("T", " ").slice(0, 19)) : "–"; }

async function api(path, options) {
  const r = await fetch(path, Object.assign({headers: {"Content-Type": "application/json"}}, options || {}));
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error(body && body.error ? body.error.message : `HTTP ${r.status}`);
  return body;
}

// An action's answer redraws the page the address shows then, not the one
// it was asked from: the user may have moved on while it was on its way.
// The notices are read again at once: an action may end what they say (the
// last paused job of a held batch resumed ends its hold).
async function act(path, body) {
  try { await api(path, {method: "POST", body: body || "{}"}); } catch (e) { alert(e.message); }
  countsChanged();
  notices(true);
  render();
}

function bar(id, job) {
  const p = progress[id] || job.progress;
  const node = p && p.node ? (p.node_type ? `${esc(p.node_type)} (node ${esc(p.node)})` : `node ${esc(p.node)}`) : "";
  if (!p || p.max == null) return node ? `<span class="muted">${node}</span>` : "";
  const pct = Math.min(100, Math.round(100 * p.value / Math.max(1, p.max)));
  return `<span class="bar" title="${node} ${p.value}/${p.max}"><span style="width:${pct}%"></span></span> <span class="muted">${pct}% ${node}</span>`;
}

function actions(j) {
  const b = [];
  if (["waiting", "queued"].includes(j.status)) b.push(j.paused_at
    ? `<button data-act="/api/job/${esc(j.job_id)}/resume" title="it runs in its turn">Resume</button>`
    : `<button data-act="/api/job/${esc(j.job_id)}/pause" title="it keeps its place in the queue; no backend takes it until resumed">Pause</button>`);
  // One a backend runs is stopped there to be paused: its run is lost.
  if (["assigned", "running"].includes(j.status)) b.push(j.paused_at
    ? `<button data-act="/api/job/${esc(j.job_id)}/resume" title="it is not stopped, if its backend has not stopped it yet">Resume</button>`
    : `<button data-act="/api/job/${esc(j.job_id)}/pause" data-body='{"interrupt":true}' data-confirm="Stop this job on backend ${esc(j.backend_id || "")}? Its run is lost; it waits in the queue in its place, paused, until resumed." title="stopped on its backend, it waits in the queue, paused">Pause</button>`);
  if (scheduled(j)) b.push(`<button data-act="/api/job/${esc(j.job_id)}/schedule" data-body='{"start_after":null}' title="its start_after is dropped: it runs in its turn">Start now</button>`);
  if (["waiting", "queued", "assigned", "running"].includes(j.status)) b.push(`<button data-act="/api/job/${esc(j.job_id)}/cancel">Cancel</button>`);
  if (["failed", "cancelled"].includes(j.status)) b.push(`<button data-act="/api/job/${esc(j.job_id)}/retry">Retry</button>`);
  return b.join(" ");
}

// A row's progress, or its error, or why it does not run.
function progressCell(j) {
  const held = ["assigned", "running"].includes(j.status);
  const paused = !j.paused_at ? ""
    : held ? `<span class="paused" title="asked at ${esc(j.paused_at)}">pausing: being stopped</span> `
    : `<span class="paused" title="since ${esc(j.paused_at)}">paused</span> `;
  if (j.status === "running") return paused + bar(j.job_id, j);
  if (j.error) return `<span class="s-failed">${esc(j.error.message).slice(0, 120)}</span>`;
  return paused + (scheduled(j) ? `<span class="muted scheduled">starts ${time(j.not_before)}</span>` : "") + (j.status === "waiting" ? waitsFor(j) : "");
}

// Submitted to start later, and its time has not come: it has run no attempt.
function scheduled(j) {
  return ["waiting", "queued"].includes(j.status) && !j.attempts && j.not_before && new Date(j.not_before) > new Date();
}

function wireButtons(root = main) {
  root.querySelectorAll("button[data-act]").forEach(btn => btn.onclick = () => {
    if (!btn.dataset.confirm || confirm(btn.dataset.confirm)) act(btn.dataset.act, btn.dataset.body);
  });
}

const filters = {status: "", workflow_id: "", backend: "", meta: ""};

async function renderJobs() {
  const current = turn();
  const q = new URLSearchParams({limit: "100"});
  if (filters.status) q.set("status", filters.status);
  if (filters.workflow_id) q.set("workflow_id", filters.workflow_id);
  if (filters.backend) q.set("backend", filters.backend);
  if (filters.meta.includes("=")) { const [k, ...v] = filters.meta.split("="); q.set("metadata." + k.trim(), v.join("=").trim()); }
  // How far the filtered jobs got (a night's batch: its metadata), every
  // status counted, not a page; a count filters the list to its status.
  const cq = new URLSearchParams(q);
  cq.delete("limit");
  cq.delete("status");
  let page, counts = null, error = "";
  try {
    [page, counts] = await Promise.all([api("/api/jobs?" + q), countsOf(cq.toString())]);
  } catch (e) { error = e.message; page = {jobs: []}; }
  if (!current()) return;
  const tally = !counts || !counts.total ? "" : `<p id="counts" class="counts">${counts.total} job${counts.total === 1 ? "" : "s"}${cq.toString() ? " matching" : ""}: `
    + STATUSES.filter(s => counts.jobs[s]).map(s => `<a href="#/" data-count="${s}" class="${s === filters.status ? "on" : ""}">${counts.jobs[s]} ${s}</a>`).join(" · ")
    + (counts.paused ? ` <span class="paused">(${counts.paused} paused)</span>` : "")
    + (filters.status ? ` · <a href="#/" data-count="">every status</a>` : "")
    + ` <span class="muted">· the first submitted ${time(counts.first_submitted_at)}${counts.last_finished_at ? `, the last finished ${time(counts.last_finished_at)}` : ""}</span>`
    + (counts.estimated_end ? ` <span class="muted" id="estimated-end" title="at the pace since ${esc(counts.pace_since)}: ${counts.ended_recently} ended; paused jobs left out">· the rest end about ${time(counts.estimated_end)}</span>` : "")
    + `</p>`
    // Why the failed ones failed, by cause, each with one to look at.
    + (counts.failures && counts.failures.length ? `<p id="failure-causes" class="muted">why they failed: ${counts.failures.map(f => `${f.jobs} × <span class="s-failed">${esc(f.cause)}</span> (<a class="mono" href="#/job/${esc(f.example)}">${esc(short(f.example))}</a>)`).join(" · ")}</p>` : "");
  const thumb = j => j.preview
    ? `<a href="#/job/${esc(j.job_id)}"><img class="thumb" loading="lazy" alt="" src="/api/job/${esc(j.job_id)}/outputs/${encodeURIComponent(j.preview)}?thumb=64"></a>`
    : "";
  const rows = page.jobs.map(j => `<tr id="job-${esc(j.job_id)}" data-status="${esc(j.status)}">
      <td class="pic">${thumb(j)}</td>
      <td class="mono"><a href="#/job/${esc(j.job_id)}" title="${esc(j.job_id)}">${esc(short(j.job_id))}</a></td>
      <td>${badge(j.status)}</td>
      <td>${esc(j.workflow_id || "(inline)")}</td>
      <td>${esc(j.backend_id || "–")}</td>
      <td class="progress">${progressCell(j)}</td>
      <td>${time(j.submitted_at)}</td>
      <td>${actions(j)}</td></tr>`).join("");
  // A night's batch is acted on at once: its failures retried, its queue cancelled.
  // Those not yet started are paused (checked shots first) or resumed together too.
  const bulk = !page.jobs.length ? []
    : ["failed", "cancelled"].includes(filters.status) ? [{label: "Retry", act: "retry"}]
    : ["waiting", "queued"].includes(filters.status) ? [{label: "Cancel", act: "cancel"}, {label: "Pause", act: "pause"}, {label: "Resume", act: "resume"}]
    // Those running are stopped to be paused (the farm made free for another batch).
    : ["assigned", "running"].includes(filters.status) ? [{label: "Cancel", act: "cancel"}, {label: "Stop and pause", act: "pause", body: '{"interrupt":true}'}] : [];
  main.innerHTML = `<h2>Jobs</h2>
    <form class="filters" id="filters">
      <select name="status"><option value="">any status</option>${STATUSES.map(s => `<option ${s === filters.status ? "selected" : ""}>${s}</option>`).join("")}</select>
      <input name="workflow_id" placeholder="workflow" value="${esc(filters.workflow_id)}">
      <input name="backend" placeholder="backend" value="${esc(filters.backend)}">
      <input name="meta" placeholder="metadata key=value" value="${esc(filters.meta)}">
      <button>Filter</button>
    </form>
    ${error ? `<div class="error">${esc(error)}</div>` : ""}
    ${tally}
    ${bulk.length ? `<p>${bulk.map((x, i) => `<button id="${i ? `bulk-${x.act}` : "bulk"}" data-bulk="${i}">${x.label} ${page.jobs.length === 1 ? "this job" : `these ${page.jobs.length} jobs`}</button>`).join(" ")}${page.next_cursor ? ' <span class="muted">(the first page: filter more for the rest)</span>' : ""}</p>` : ""}
    <table><thead><tr><th></th><th>Job</th><th>Status</th><th>Workflow</th><th>Backend</th><th>Progress / error</th><th>Submitted</th><th></th></tr></thead>
    <tbody>${rows || `<tr><td colspan="8" class="muted">No jobs.</td></tr>`}</tbody></table>`;
  document.getElementById("filters").onsubmit = ev => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    for (const k of Object.keys(filters)) filters[k] = f.get(k) || "";
    renderJobs();
  };
  wireButtons();
  main.querySelectorAll("a[data-count]").forEach(a => a.onclick = ev => {
    ev.preventDefault();
    filters.status = a.dataset.count;
    renderJobs();
  });
  main.querySelectorAll("button[data-bulk]").forEach(btn => btn.onclick = () => each(page.jobs, bulk[btn.dataset.bulk]));
}

// The counts of one filter, read again at most every 5 s: the list is drawn
// again at every change of the farm, and a count goes over every job of a
// batch (a page reads 100).
let lastCounts = {key: null, at: 0, counts: null};
let countsTimer = null;
async function countsOf(key) {
  const age = Date.now() - lastCounts.at;
  if (lastCounts.key === key && age < 5000) {
    // Drawn again once they may be read again, if nothing else draws it.
    if (!countsTimer) countsTimer = setTimeout(() => { countsTimer = null; if (route() === renderJobs) renderJobs(); }, 5000 - age);
    return lastCounts.counts;
  }
  const counts = await api("/api/jobs/counts?" + key).catch(() => null);
  lastCounts = {key, at: Date.now(), counts};
  return counts;
}
// What a user does changes them: read at the next drawing.
function countsChanged() { lastCounts.at = 0; }

// A waiting job's row names the jobs it starts from: what the batch waits on.
function waitsFor(j) {
  const links = (j.starts_from || []).map(p => `<a class="mono" href="#/job/${esc(p)}">${esc(short(p))}</a>`);
  return links.length ? `<span class="muted waits-for">waits for ${links.join(", ")}</span>` : "";
}

// Retries or cancels each job of a page, one after the other; those that
// cannot be (one that ended meanwhile) are named at the end.
async function each(jobs, bulk) {
  if (!confirm(`${bulk.label} ${jobs.length} job${jobs.length === 1 ? "" : "s"}?${bulk.body ? " Their runs are lost." : ""}`)) return;
  const failed = [];
  for (const j of jobs) {
    try { await api(`/api/job/${encodeURIComponent(j.job_id)}/${bulk.act}`, {method: "POST", body: bulk.body || "{}"}); }
    catch (e) { failed.push(`${short(j.job_id)}: ${e.message}`); }
  }
  if (failed.length) alert(`${failed.length} of ${jobs.length} could not be done:\n${failed.join("\n")}`);
  countsChanged();
  render();
}

async function renderJob(id) {
  const current = turn();
  let j, events;
  try {
    j = await api(`/api/job/${encodeURIComponent(id)}`);
    events = (await api(`/api/job/${encodeURIComponent(id)}/events`)).events.filter(e => e.kind !== "progress");
  } catch (e) { if (current()) main.innerHTML = `<div class="error">${esc(e.message)}</div>`; return; }
  if (!current()) return;
  const outputs = j.outputs.map(o => {
    const url = `/api/job/${esc(j.job_id)}/outputs/${encodeURIComponent(o.name)}`;
    return o.thumbnail
      ? `<a href="${url}" target="_blank" title="${esc(o.name)}"><img src="${url}?thumb=256" alt="${esc(o.name)}"></a>`
      : `<a href="${url}">${esc(o.name)}</a> `;
  }).join("");
  const leases = j.leases.map(l => `<tr><td>${l.attempt}</td><td>${esc(l.backend_id)}</td><td class="mono">${esc(l.prompt_id)}</td>
      <td>${time(l.leased_at)}</td><td>${l.outcome ? badge(l.outcome) : "<span class=muted>current</span>"}</td><td>${esc(l.error ? l.error.message : "")}</td></tr>`).join("");
  const evs = events.map(e => `<tr><td>${time(e.at)}</td><td>${esc(e.kind)}</td><td>${e.status ? badge(e.status) : ""}</td><td>${esc(e.message || "")}</td></tr>`).join("");
  const ended = ["completed", "failed", "cancelled"].includes(j.status);
  const again = (j.workflow_id ? ` <a class="button" href="#/submit/${esc(j.job_id)}">Run again with changes</a>` : "")
    + (["failed", "cancelled"].includes(j.status) ? "" : ` <a class="button" id="start-from" href="#/submit/after/${esc(j.job_id)}" title="a second pass of this shot: it runs once this job completes">Start a job from its output</a>`);
  main.innerHTML = `<h2>Job <span class="mono">${esc(j.job_id)}</span> ${badge(j.status)} ${actions(j)}${again}</h2>
    <div class="grid">
      <span class="muted">Workflow</span><span>${esc(j.workflow_id || "(inline graph)")}</span>
      <span class="muted">Backend</span><span>${esc(j.backend_id || "–")}</span>
      <span class="muted">Attempts</span><span>${j.attempts} of ${j.max_attempts}</span>
      <span class="muted">Priority</span><span>${j.priority}${ended ? "" : ` <button id="set-priority" title="higher runs first; a queued job moves in the queue at once">Change</button>`}</span>
      ${["waiting", "queued"].includes(j.status) && !j.attempts ? `<span class="muted">Starts</span><span>${scheduled(j) ? time(j.not_before) : "in its turn"} <button id="set-start" title="no backend takes it before this time (its start_after)">Change</button></span>` : ""}
      ${j.waiting_for ? `<span class="muted">Waiting for</span><span>${esc(j.waiting_for)}</span>` : ""}
      ${j.paused_at && ["assigned", "running"].includes(j.status) ? `<span class="muted">Pausing</span><span class="paused" id="pausing">asked at ${time(j.paused_at)}: backend ${esc(j.backend_id)} is being asked to stop it; it then waits in the queue, paused</span>` : ""}
      ${j.starts_from.length ? `<span class="muted">Starts from</span><span>${jobLinks(j.starts_from)}</span>` : ""}
      ${j.followed_by.length ? `<span class="muted">Followed by</span><span>${jobLinks(j.followed_by)}</span>` : ""}
      <span class="muted">Submitted</span><span>${time(j.submitted_at)}</span>
      <span class="muted">Finished</span><span>${time(j.finished_at)}</span>
      <span class="muted">Progress</span><span id="job-progress">${j.status === "running" ? bar(j.job_id, j) : "–"}</span>
    </div>
    ${j.error ? `<div class="error"><strong>Error</strong>\n${esc(j.error.message)}${j.error.traceback ? "\n\n" + esc([].concat(j.error.traceback).join("")) : ""}</div>` : ""}
    ${outputs ? `<section><h2>Outputs</h2><div class="outputs">${outputs}</div></section>` : ""}
    <section><h2>Parameters</h2><pre>${esc(JSON.stringify(j.parameters, null, 2))}</pre>
      <h2>Metadata</h2><pre>${esc(JSON.stringify(j.metadata, null, 2))}</pre></section>
    <section><h2>Attempts</h2><table><thead><tr><th>Attempt</th><th>Backend</th><th>Prompt id</th><th>Leased</th><th>Outcome</th><th>Error</th></tr></thead><tbody>${leases || `<tr><td colspan="6" class="muted">Not leased yet.</td></tr>`}</tbody></table></section>
    <section><h2>Events</h2><table><thead><tr><th>At</th><th>Event</th><th>Status</th><th>Message</th></tr></thead><tbody>${evs}</tbody></table></section>`;
  wireButtons();
  const change = document.getElementById("set-priority");
  if (change) change.onclick = () => setPriority(j);
  const start = document.getElementById("set-start");
  if (start) start.onclick = () => setStart(j);
}

// Asks for a job's new start time (RFC 3339; empty: now); the server's
// answer names what is wrong with a time it cannot read.
async function setStart(j) {
  const typed = prompt("Start after (an RFC 3339 time such as 2026-12-07T22:00:00Z; empty: now)", scheduled(j) ? j.not_before : "");
  if (typed === null) return;
  const value = typed.trim() === "" ? null : typed.trim();
  await act(`/api/job/${encodeURIComponent(j.job_id)}/schedule`, JSON.stringify({start_after: value}));
}

// Links to jobs by their short ids (a chain of passes over one shot).
function jobLinks(ids) {
  return ids.map(id => `<a class="mono" href="#/job/${esc(id)}" title="${esc(id)}">${esc(short(id))}</a>`).join(", ");
}

// Asks for a job's new priority; what is not a whole number goes to the
// server as typed, so its answer names the problem.
async function setPriority(j) {
  const typed = prompt("New priority, -1000 to 1000 (higher runs first)", j.priority);
  if (typed === null) return;
  const value = /^\s*-?\d+\s*$/.test(typed) ? Number(typed) : typed;
  await act(`/api/job/${encodeURIComponent(j.job_id)}/priority`, JSON.stringify({priority: value}));
}

async function renderBackends() {
  const current = turn();
  let list, active;
  try {
    list = await api("/api/backends");
    active = (await api("/api/jobs?status=assigned,running&limit=1000")).jobs;
  } catch (e) { if (current()) main.innerHTML = `<div class="error">${esc(e.message)}</div>`; return; }
  if (!current()) return;
  const runs = id => active.filter(j => j.backend_id === id)
    .map(j => `<div><a class="mono" href="#/job/${esc(j.job_id)}">${esc(short(j.job_id))}</a> ${badge(j.status)} ${j.status === "running" ? bar(j.job_id, j) : ""}</div>`).join("");
  const gib = v => v == null ? "–" : (v / 1073741824).toFixed(1) + " GiB";
  const rows = list.backends.map(b => `<tr id="backend-${esc(b.id)}">
      <td><a href="#/backend/${esc(b.id)}"><strong>${esc(b.name)}</strong></a><div class="muted mono">${esc(b.id)} · <a class="muted" href="${esc(b.url)}" target="_blank" rel="noopener" title="its ComfyUI's own page">${esc(b.url)}</a></div>${b.loaded_model ? `<div class="muted">loaded: ${esc(b.loaded_model)}</div>` : ""}</td>
      <td>${badge(b.state)}${b.quarantined_until ? ` ${badge("quarantined")}<div class="muted" title="${esc(b.quarantine_reason)}">until ${time(b.quarantined_until)}; Enable ends it</div>` : ""}</td>
      <td>${esc(b.admin_state || (b.config_enabled ? "enabled" : "disabled"))}${b.accepting_jobs ? "" : ' <span class="muted">(no new jobs)</span>'}${b.hours ? `<div class="muted hours">${b.off_hours ? "outside its hours" : "hours"} ${esc(b.hours)}${b.hours_override_until ? `; lent by an operator until ${time(b.hours_override_until)}` : ""}</div>` : ""}</td>
      <td>${esc(b.comfyui_version || "–")}</td>
      <td>${gib(b.vram_free)} / ${gib(b.vram_total)}</td>
      <td>${b.active_jobs} / ${b.max_inflight}${b.prompts_not_ours ? ` <span class="muted" title="prompts in its ComfyUI queue that the orchestrator did not send">+${b.prompts_not_ours} not ours</span>` : ""}${b.outputs_waiting_for_disk ? ` <span class="error" title="finished; their outputs wait for space on the orchestrator's full disk">${b.outputs_waiting_for_disk} waiting for disk space</span>` : ""}${runs(b.id)}</td>
      <td>${esc((b.tags || []).join(", "))}</td>
      <td class="muted">${esc(b.quarantine_reason || b.last_error || "")}</td>
      <td><button data-act="/api/backends/${esc(b.id)}/enable">Enable</button> <button data-act="/api/backends/${esc(b.id)}/drain">Drain</button> <button data-act="/api/backends/${esc(b.id)}/disable">Disable</button></td></tr>`).join("");
  main.innerHTML = `<h2>Backends</h2>${list.message ? `<p class="muted">${esc(list.message)}</p>` : ""}
    <table><thead><tr><th>Backend</th><th>State</th><th>Admin</th><th>ComfyUI</th><th>VRAM free</th><th>Jobs</th><th>Tags</th><th>Last error</th><th></th></tr></thead>
    <tbody>${rows}</tbody></table>`;
  wireButtons();
}

// One backend: its state and what it can run (node classes, model files).
async function renderBackend(id) {
  const current = turn();
  let b;
  try { b = await api(`/api/backends/${encodeURIComponent(id)}`); }
  catch (e) { if (current()) main.innerHTML = `<div class="error">${esc(e.message)}</div>`; return; }
  if (!current()) return;
  const inv = b.inventory;
  const folders = inv ? Object.entries(inv.models).filter(([, files]) => files.length) : [];
  const models = folders.map(([folder, files]) => `<tr><td>${esc(folder)}</td><td>${files.length}</td>
      <td class="mono">${files.map(f => esc(f)).join("<br>")}</td></tr>`).join("");
  main.innerHTML = `<h2>Backend ${esc(b.name)} ${badge(b.state)}</h2>
    <div class="grid">
      <span class="muted">Address</span><span class="mono"><a href="${esc(b.url)}" target="_blank" rel="noopener" title="its ComfyUI's own page">${esc(b.url)}</a></span>
      <span class="muted">ComfyUI</span><span>${esc(b.comfyui_version || "–")}</span>
      <span class="muted">Jobs</span><span>${b.active_jobs} / ${b.max_inflight}${b.prompts_not_ours ? ` (+${b.prompts_not_ours} prompts not ours in its queue)` : ""}${b.outputs_waiting_for_disk ? ` (${b.outputs_waiting_for_disk} finished, their outputs waiting for space on the orchestrator's full disk)` : ""}</span>
      <span class="muted">Loaded model</span><span class="mono">${esc(b.loaded_model || "–")}</span>
      <span class="muted">Tags</span><span>${esc((b.tags || []).join(", ") || "–")}</span>
      <span class="muted">Last error</span><span>${esc(b.last_error || "–")}</span>
    </div>
    <h3>What it can run <button data-act="/api/backends/${esc(b.id)}/refresh">Refresh</button></h3>
    ${inv ? `<p id="inventory-summary">${inv.node_count} node classes, read ${time(inv.read_at)} from ComfyUI ${esc(inv.comfyui_version || "?")}</p>
      <table id="inventory-models"><thead><tr><th>Folder</th><th>Files</th><th>Names</th></tr></thead><tbody>${models || '<tr><td colspan="3" class="muted">no model files</td></tr>'}</tbody></table>`
      : '<p class="muted">Not read yet: it has not answered since it was configured.</p>'}`;
  wireButtons();
}

function route() {
  const h = location.hash || "#/";
  const page = h.startsWith("#/backend") ? "backends" : h.startsWith("#/farm") ? "farm" : h.startsWith("#/submit") ? "submit" : "jobs";
  for (const p of ["jobs", "backends", "farm", "submit"]) document.getElementById("nav-" + p).classList.toggle("active", p === page);
  if (h.startsWith("#/farm")) return renderFarm;
  if (h.startsWith("#/submit/after/")) return () => renderSubmit(null, decodeURIComponent(h.slice(15)));
  if (h.startsWith("#/submit")) return () => renderSubmit(h.length > 9 ? decodeURIComponent(h.slice(9)) : null);
  if (h.startsWith("#/backend/")) return () => renderBackend(decodeURIComponent(h.slice(10)));
  if (h.startsWith("#/job/")) return () => renderJob(decodeURIComponent(h.slice(6)));
  if (h.startsWith("#/backends")) return renderBackends;
  return renderJobs;
}
function render() { notices(false); return route()(); }

// What the service wants an operator to see, above every page: a database it
// cannot use, low disk space, a batch the farm holds (with the button that
// lets it go), inbox files waiting for the job they start from. Read from
// /api/health when a page is drawn (at most once a second), when the user
// moves to another page, after an action, and every 15 s.
let noticesAt = 0;
async function notices(now) {
  if (!now && Date.now() - noticesAt < 1000) return;
  noticesAt = Date.now();
  let h;
  try { h = await (await fetch("/api/health")).json(); } catch (e) { return; }
  if (!h) return;
  const items = [];
  if (h.database && h.database !== "ok") items.push(`The database cannot be used: ${esc(h.database)}`);
  const held = h.held_batches || [];
  for (const w of h.warnings || []) if (!held.some(b => b.message === w)) items.push(esc(w));
  for (const b of held) {
    items.push(`${esc(b.message)} <button class="resume-batch" data-act="/api/batch/${esc(encodeURIComponent(b.batch))}/resume" data-confirm="Resume ${esc(b.field)} ${esc(b.batch)}? Its paused jobs run, and its new ones are no longer held: once the cause (${esc(b.cause)}) is mended." title="its paused jobs run in their turn; its new ones are not held">Resume the batch</button>`);
  }
  for (const f of h.inbox_waiting || []) {
    items.push(f.rejected_after
      ? `Inbox: <span class="mono">${esc(f.file)}</span> waits for the job it starts from: ${esc(f.message)}. It is rejected after ${time(f.rejected_after)} if none comes.`
      : `Inbox: <span class="mono">${esc(f.file)}</span> cannot be taken now: ${esc(f.message)}. It is taken once it can be.`);
  }
  const shown = document.getElementById("notices");
  shown.innerHTML = items.map(i => `<div class="notice">${i}</div>`).join("");
  wireButtons(shown);
}

// Live updates: progress bars move in place; state changes re-render (at most a few times a second).
function connect() {
  const live = document.getElementById("live");
  const es = new EventSource("/api/events");
  es.onopen = () => { live.className = "live on"; };
  es.onerror = () => { live.className = "live off"; };
  es.onmessage = () => {};
  const onEvent = ev => {
    const e = JSON.parse(ev.data);
    if (e.kind === "progress" && e.job_id) {
      progress[e.job_id] = e.data;
      const cell = document.querySelector(`#job-${CSS.escape(e.job_id)} td.progress`) || (location.hash === "#/job/" + e.job_id && document.getElementById("job-progress"));
      if (cell) { cell.innerHTML = bar(e.job_id, {}); return; }
    }
    // A half-filled form is never redrawn under the user's hands.
    if (refreshTimer || location.hash.startsWith("#/submit")) return;
    const farm = location.hash.startsWith("#/farm");
    if (farm && e.kind === "progress") return;
    refreshTimer = setTimeout(() => {
      refreshTimer = null;
      // The user may have opened the form since this refresh was asked for.
      if (!location.hash.startsWith("#/submit")) render();
    }, farm ? 1000 : 250);
  };
  ["submitted", "assigned", "submitted_to_backend", "running", "progress", "completed", "failed", "retry_scheduled",
   "requeued", "parents_completed", "cancel_requested", "cancelled", "pause_requested", "pause_too_late", "retried", "priority_changed", "scheduled", "paused", "resumed", "backend_online", "backend_offline", "backend_quarantined", "backend_quarantine_over", "backend_quarantine_lifted", "backend_hours"].forEach(k => es.addEventListener(k, onEvent));
}

// A move to another page draws it now; a refresh asked for by the page left
// behind is not due any more.
window.addEventListener("hashchange", () => { clearTimeout(refreshTimer); refreshTimer = null; notices(true); render(); });
setInterval(() => notices(true), 15000);
// Running bars on the farm view grow with time.
setInterval(() => { if (location.hash.startsWith("#/farm") && !refreshTimer) render(); }, 15000);
render();
connect();
