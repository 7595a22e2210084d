// Submit from the page: a form built from GET /api/workflows (one field per
// parameter, with its type, bounds, default, description and the values the
// farm offers), file fields that upload inputs first, metadata rows, and each
// 422 shown beside the field it names. `#/submit/JOB` fills it from a job
// ("run again with changes"); `#/submit/after/JOB` starts a job from that
// job's output (its picture fields say `job:JOB`, its metadata is kept: a
// second pass of the shot). Uses esc, api from app.js.
"use strict";

// POST returning the body even on an error (the form needs the `field`).
async function post(path, body, type) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": type || "application/json"}, body});
  return {ok: r.ok, status: r.status, body: await r.json().catch(() => null)};
}

function paramField(p, value) {
  const id = `param-${p.name}`;
  const v = value !== undefined ? value : p.default;
  const bounds = `${p.min != null ? ` min="${p.min}"` : ""}${p.max != null ? ` max="${p.max}"` : ""}`;
  let input;
  const list = p.choices || p.options;
  if (p.type === "image" || p.type === "mask") {
    input = `<input type="file" id="${id}" accept="image/*" data-kind="file">${v ? `<span class="muted mono" data-keep="${esc(v)}"> or keep ${esc(String(v).slice(0, 19))}…</span>` : ""}`;
  } else if (p.type === "bool") {
    input = `<input type="checkbox" id="${id}" data-kind="bool" ${v ? "checked" : ""}>`;
  } else if (list && list.length) {
    const all = v != null && !list.includes(v) ? [v, ...list] : list;
    input = `<select id="${id}" data-kind="${p.type}">${p.required || v != null ? "" : '<option value="">(default)</option>'}${all.map(o => `<option ${o === v ? "selected" : ""}>${esc(o)}</option>`).join("")}</select>`;
  } else if (p.type === "int" || p.type === "float") {
    input = `<input type="number" id="${id}" data-kind="${p.type}" step="${p.type === "int" ? 1 : "any"}"${bounds} value="${v != null ? esc(v) : ""}">`;
  } else {
    input = `<input type="text" id="${id}" data-kind="string" value="${v != null ? esc(v) : ""}" size="50">`;
  }
  return `<label for="${id}">${esc(p.name)}${p.required ? " *" : ""}</label>
    <div>${input} <span class="field-error" data-field="parameters.${esc(p.name)}"></span>
    ${p.description ? `<div class="muted">${esc(p.description)}</div>` : ""}</div>`;
}

function metadataRow(k, v) {
  return `<div class="meta-row"><input placeholder="key" value="${esc(k || "")}"> <input placeholder="value" value="${esc(v || "")}"></div>`;
}

async function renderSubmit(fromJob, after) {
  const current = turn();
  let workflows, job = null;
  try {
    workflows = (await api("/api/workflows")).workflows;
    if (fromJob || after) job = await api(`/api/job/${encodeURIComponent(fromJob || after)}`);
  } catch (e) { if (current()) main.innerHTML = `<div class="error">${esc(e.message)}</div>`; return; }
  if (!current()) return;
  const takesPicture = w => w.parameters.some(p => p.type === "image" || p.type === "mask");
  let chosen = after ? (workflows.find(takesPicture) || workflows[0] || {}).id
    : (job && job.workflow_id) || (workflows[0] && workflows[0].id);
  const draw = () => {
    const wf = workflows.find(w => w.id === chosen);
    const values = after && wf
      ? Object.fromEntries(wf.parameters.filter(p => p.type === "image" || p.type === "mask").map(p => [p.name, `job:${job.job_id}`]))
      : job && job.workflow_id === chosen ? job.parameters : {};
    const meta = job ? Object.entries(job.metadata || {}) : [];
    const title = after ? ` <span class="muted">from the output of ${esc(short(job.job_id))}</span>`
      : job ? ` <span class="muted">again, from ${esc(short(job.job_id))}</span>` : "";
    main.innerHTML = `<h2>Submit a job${title}</h2>
      <form id="submit-form" class="form" novalidate>
        <label for="submit-workflow">workflow</label>
        <div><select id="submit-workflow">${workflows.map(w => `<option ${w.id === chosen ? "selected" : ""}>${esc(w.id)}</option>`).join("")}</select>
          <span class="field-error" data-field="workflow_id"></span>
          ${wf && wf.description ? `<div class="muted">${esc(wf.description)}</div>` : ""}</div>
        ${wf ? wf.parameters.map(p => paramField(p, values[p.name])).join("") : ""}
        <label for="submit-priority">priority</label>
        <div><input type="number" id="submit-priority" step="1" value="${job && !after ? job.priority : 0}"> <span class="field-error" data-field="priority"></span>
          <div class="muted">Higher runs first.</div></div>
        <label>metadata</label>
        <div id="submit-metadata">${(meta.length ? meta : [["", ""]]).map(([k, v]) => metadataRow(k, v)).join("")}
          <button type="button" id="submit-add-meta">Add a row</button> <span class="field-error" data-field="metadata"></span></div>
        <span></span><div><button id="submit-go">Submit</button> <span id="submit-error" class="field-error"></span></div>
      </form>`;
    document.getElementById("submit-workflow").onchange = ev => { chosen = ev.target.value; draw(); };
    document.getElementById("submit-add-meta").onclick = () =>
      document.getElementById("submit-add-meta").insertAdjacentHTML("beforebegin", metadataRow());
    document.getElementById("submit-form").onsubmit = ev => { ev.preventDefault(); send(wf); };
  };
  const showError = (field, message) => {
    const slot = field && main.querySelector(`.field-error[data-field="${CSS.escape(field)}"]`);
    (slot || document.getElementById("submit-error")).textContent = message;
  };
  const send = async wf => {
    main.querySelectorAll(".field-error").forEach(e => { e.textContent = ""; });
    const parameters = {};
    for (const p of wf.parameters) {
      const el = document.getElementById(`param-${p.name}`);
      if (el.dataset.kind === "file") {
        const file = el.files[0];
        if (!file) {
          const keep = el.parentElement.querySelector("[data-keep]");
          if (keep) parameters[p.name] = keep.dataset.keep;
          continue;
        }
        const r = await post("/api/inputs", file, file.type || "application/octet-stream");
        if (!r.ok) return showError(`parameters.${p.name}`, r.body ? r.body.error.message : `HTTP ${r.status}`);
        parameters[p.name] = r.body.input_id;
      } else if (el.dataset.kind === "bool") {
        parameters[p.name] = el.checked;
      } else if (el.value !== "") {
        parameters[p.name] = el.dataset.kind === "int" || el.dataset.kind === "float" ? Number(el.value) : el.value;
      }
    }
    const metadata = {};
    main.querySelectorAll(".meta-row").forEach(row => {
      const [k, v] = row.querySelectorAll("input");
      if (k.value.trim()) metadata[k.value.trim()] = v.value;
    });
    const manifest = {workflow_id: wf.id, parameters, metadata, priority: Number(document.getElementById("submit-priority").value || 0)};
    const r = await post("/api/job", JSON.stringify(manifest));
    if (!r.ok) return showError(r.body && r.body.error.field, r.body ? r.body.error.message : `HTTP ${r.status}`);
    location.hash = `#/job/${r.body.job_id}`;
  };
  draw();
}
