// The farm view: one row per backend, each attempt a bar from its lease to
// its end coloured by how it ended, so idle gaps are plain to see; each
// backend's busy share; the queue and the completions per minute below.
// Drawn as SVG here, from GET /api/farm. Uses esc, api, time, filters from app.js.
"use strict";

const FARM_WINDOWS = [["15m", 0.25], ["1h", 1], ["6h", 6], ["24h", 24]];
let farmHours = 1;

const OUTCOME_COLOURS = {
  completed: "#3fb950", failed: "#f85149", rejected: "#bc8cff",
  lost: "#d29922", cancelled: "#8b93a5", paused: "#e3b341", running: "#58a6ff",
};

function clock(ms) {
  const d = new Date(ms);
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
}

// The timeline: a row per backend, a bar per attempt, the busy share at the end of the row.
function timelineSvg(view, width) {
  const from = Date.parse(view.from), to = Date.parse(view.to), now = Date.now();
  const left = 150, right = 70, row = 28, top = 22;
  const span = Math.max(1, to - from);
  const x = t => left + (Math.min(Math.max(t, from), to) - from) / span * (width - left - right);
  const height = top + row * Math.max(1, view.backends.length) + 4;
  const index = {};
  view.backends.forEach((b, i) => { index[b.id] = i; });
  const ticks = [];
  for (let i = 0; i <= 6; i++) {
    const t = from + span * i / 6, tx = x(t);
    ticks.push(`<line x1="${tx}" x2="${tx}" y1="${top - 4}" y2="${height}" stroke="#2c313d"/>
      <text x="${tx}" y="${top - 8}" fill="#8b93a5" font-size="11" text-anchor="middle">${clock(t)}</text>`);
  }
  const rows = view.backends.map((b, i) => {
    const y = top + i * row;
    return `<g class="farm-row" data-backend="${esc(b.id)}">
      <rect x="${left}" y="${y + 4}" width="${width - left - right}" height="${row - 8}" fill="#1b1e27"/>
      <text x="8" y="${y + row / 2 + 4}" fill="#e4e6eb" font-size="12">${esc(b.name)}</text>
      <text class="busy" x="${width - 8}" y="${y + row / 2 + 4}" fill="#8b93a5" font-size="12" text-anchor="end">${Math.round(100 * b.busy_share)}% busy</text></g>`;
  }).join("");
  const bars = view.attempts.filter(a => a.backend_id in index).map(a => {
    const y = top + index[a.backend_id] * row + 6;
    const outcome = a.outcome || "running";
    const start = Date.parse(a.leased_at), end = a.finished_at ? Date.parse(a.finished_at) : now;
    const x1 = x(start), w = Math.max(2, x(end) - x1);
    const tip = `job ${short(a.job_id)} · attempt ${a.attempt} · ${a.workflow_id || "inline"} · ${outcome} · ${clock(start)}–${a.finished_at ? clock(end) : "now"}`;
    return `<a href="#/job/${esc(a.job_id)}"><rect class="attempt" data-job="${esc(a.job_id)}" data-outcome="${esc(outcome)}"
      x="${x1}" y="${y}" width="${w}" height="${row - 12}" rx="2" fill="${OUTCOME_COLOURS[outcome] || "#58a6ff"}"><title>${esc(tip)}</title></rect></a>`;
  }).join("");
  return `<svg id="farm-timeline" width="${width}" height="${height}" role="img" aria-label="attempts per backend">${ticks.join("")}${rows}${bars}</svg>`;
}

// The queue (a line) and the completions per minute (bars) on the same time axis.
function activitySvg(view, width) {
  const from = Date.parse(view.from), to = Date.parse(view.to);
  const left = 150, right = 70, height = 120, base = height - 18;
  const span = Math.max(1, to - from);
  const x = t => left + (t - from) / span * (width - left - right);
  const maxDone = Math.max(1, ...view.completions.map(c => c.count));
  const maxQueue = Math.max(1, ...view.queue.map(q => q.queued));
  const slot = Math.max(1, (width - left - right) / Math.max(1, view.completions.length) - 1);
  const done = view.completions.filter(c => c.count).map(c => {
    const h = (base - 10) * c.count / maxDone;
    return `<rect class="completions" x="${x(Date.parse(c.at))}" y="${base - h}" width="${slot}" height="${h}" fill="#3fb950" opacity=".7"><title>${c.count} completed at ${clock(Date.parse(c.at))}</title></rect>`;
  }).join("");
  const points = view.queue.map(q => `${x(Date.parse(q.at))},${base - (base - 10) * q.queued / maxQueue}`).join(" ");
  return `<svg id="farm-activity" width="${width}" height="${height}" role="img" aria-label="queue and completions">
    <line x1="${left}" x2="${width - right}" y1="${base}" y2="${base}" stroke="#2c313d"/>
    <text x="8" y="24" fill="#58a6ff" font-size="12">queue (max ${maxQueue})</text>
    <text x="8" y="44" fill="#3fb950" font-size="12">done / min (max ${maxDone})</text>
    ${done}${points ? `<polyline points="${points}" fill="none" stroke="#58a6ff" stroke-width="2"/>` : ""}</svg>`;
}

async function renderFarm() {
  const current = turn();
  const to = new Date(), from = new Date(to.getTime() - farmHours * 3600e3);
  let view;
  try { view = await api(`/api/farm?from=${encodeURIComponent(from.toISOString())}&to=${encodeURIComponent(to.toISOString())}`); }
  catch (e) { if (current()) main.innerHTML = `<div class="error">${esc(e.message)}</div>`; return; }
  if (!current()) return;
  const width = Math.max(640, main.clientWidth - 44);
  const legend = Object.entries(OUTCOME_COLOURS).map(([k, c]) => `<span class="legend"><i style="background:${c}"></i>${k}</span>`).join("");
  // A shared farm: each group's jobs on the farm and queued, each a link to its jobs.
  const sharing = view.sharing && view.sharing.groups.length
    ? `<p id="farm-shares" class="muted">shared by <b>${esc(view.sharing.by)}</b>, the group with the fewest on the farm next: ${view.sharing.groups.map(g => `${g.group
      ? `<a href="#/" data-meta="${esc(view.sharing.by + "=" + g.group)}">${esc(g.group)}</a>`
      : `<i>without ${esc(view.sharing.by)}</i>`} ${g.on_farm} on the farm, ${g.queued} queued`).join(" · ")}</p>`
    : "";
  const windows = FARM_WINDOWS.map(([label, h]) => `<button data-hours="${h}" class="${h === farmHours ? "on" : ""}">${label}</button>`).join(" ");
  main.innerHTML = `<h2>Farm <span class="muted">${windows}</span></h2>
    <p class="muted">${legend} · ${view.attempts.length} attempts${view.truncated ? " (more: narrow the window)" : ""}</p>
    ${sharing}
    ${timelineSvg(view, width)}
    <h2>Queue and completions</h2>
    ${activitySvg(view, width)}`;
  main.querySelectorAll("a[data-meta]").forEach(a => a.onclick = () => { filters.meta = a.dataset.meta; filters.status = ""; });
  main.querySelectorAll("button[data-hours]").forEach(b => b.onclick = () => { farmHours = Number(b.dataset.hours); renderFarm(); });
}
