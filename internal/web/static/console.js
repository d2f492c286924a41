// vhdkit console: renders what the host's API says and sends the
// console's actions to it. State comes from GET requests when the page
// opens and when the event stream says something changed; the stream
// (server-sent events) carries the event log and job progress. Nothing
// polls.
"use strict";

const $ = (sel) => document.querySelector(sel);

// el builds an element: el("td", {class: "x"}, "text", child, ...).
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    // Through the CSSOM: the page's Content-Security-Policy refuses
    // style attributes.
    else if (k === "style") for (const [p, val] of Object.entries(v)) e.style.setProperty(p, val);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== undefined && c !== null) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

// parseSize reads "20G", "512 MiB", "1.5T" or a number of bytes.
function parseSize(text) {
  const m = /^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*$/i.exec(text);
  if (!m) return NaN;
  return Math.round(Number(m[1]) * 1024 ** " KMGT".indexOf(m[2].toUpperCase() || " "));
}

function base(path) { return path ? path.split("/").pop() : ""; }

// The CSRF token goes with every change (GET /session hands it out).
let csrf = "";

// call sends one API request and returns its JSON reply; an error reply
// throws with the daemon's message.
async function call(method, path, body) {
  const opts = { method, headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  if (r.status === 401) { location.href = "/login"; throw new Error("not logged in"); }
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  if (!r.ok) throw new Error((data && data.error) || r.status + " " + r.statusText);
  return data;
}

function showError(err) {
  const box = $("#error");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
  if (err) $("#notice").hidden = true;
}

function showNotice(text) {
  $("#notice").textContent = text;
  $("#notice").hidden = false;
}

// act runs an action from a button, showing its error.
async function act(f) {
  showError(null);
  $("#notice").hidden = true;
  try { await f(); } catch (err) { showError(err); }
  refresh();
}

// ask shows the dialog: with def !== undefined it asks for a text and
// resolves to it, else it asks to confirm; null when cancelled. With
// withType it also asks for a checkpoint type ($("#ask-type").value).
function ask(text, def, withType) {
  const dlg = $("#ask"), input = $("#ask-input");
  $("#ask-text").textContent = text;
  $("#ask-type-label").hidden = !withType;
  input.hidden = def === undefined;
  input.value = def || "";
  dlg.returnValue = "";
  dlg.showModal();
  if (!input.hidden) input.select();
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => {
      if (dlg.returnValue !== "ok") resolve(null);
      else resolve(input.hidden ? true : input.value.trim());
    }, { once: true });
  });
}

const state = { vms: [], selected: null, disk: null, jobs: new Map() };

// changed reports whether data differs from what was last drawn under
// key: an unchanged part of the page is not redrawn, so that a button
// stays where the pointer is.
const drawn = new Map();
function changed(key, data) {
  const s = JSON.stringify(data);
  if (drawn.get(key) === s) return false;
  drawn.set(key, s);
  return true;
}
const esc = encodeURIComponent;

// ---- machines ----

async function refresh() {
  try {
    state.vms = await call("GET", "/v1/vms");
  } catch (err) { showError(err); return; }
  if (!state.vms.some((v) => v.name === state.selected)) {
    state.selected = state.vms.length ? state.vms[0].name : null;
    state.disk = null;
  }
  renderMachines();
  const vm = state.vms.find((v) => v.name === state.selected);
  if (vm) await renderMachine(vm);
  else { $("#machine-pane").hidden = true; $("#disk-pane").hidden = true; }
}

function renderMachines() {
  if (!changed("machines", [state.vms, state.selected])) return;
  const body = $("#machines tbody");
  body.replaceChildren(...state.vms.map((v) => el("tr", {
    "data-vm": v.name, class: v.name === state.selected ? "selected" : "",
    onclick: () => { state.selected = v.name; state.disk = null; refresh(); },
  },
    el("td", {}, v.name),
    el("td", {}, el("span", { class: "badge " + v.state, title: v.error || "" }, v.state)),
    el("td", {}, el("span", { class: "badge " + v.power }, v.power)),
    el("td", {}, v.current_name || el("span", { class: "muted" }, "none")),
    el("td", {}, v.disks.map((d) => el("div", { class: "mono" }, bytes(d.size) + " on " + base(d.path)))),
  )));
  if (!state.vms.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No machines yet: New machine…, or vhdkit vm create NAME --disk SIZE")));
}

// Which power verbs a state allows (the daemon checks again).
const powerAllowed = {
  start: ["off", "failed", "saved"], stop: ["running", "paused", "starting", "saved"],
  save: ["running", "paused"], pause: ["running"], resume: ["paused"], restart: ["running", "paused"],
};

async function renderMachine(vm) {
  $("#machine-pane").hidden = false;
  $("#vm-name").textContent = vm.name;
  const badge = $("#vm-state");
  const job = [...state.jobs.values()].find((j) => j.vm === vm.name && !finished(j));
  badge.textContent = vm.state + ", " + vm.power + (job ? ", merging (" + percent(job) + "%)" : "");
  badge.className = "badge " + vm.power;
  for (const b of document.querySelectorAll("#power-buttons button[data-power]")) {
    b.disabled = vm.state !== "serving" || !powerAllowed[b.dataset.power].includes(vm.power);
    if (b.dataset.power === "stop" && !b.dataset.turnOff && vm.power === "saved") b.disabled = true;
  }
  $("#set-memory").disabled = $("#set-cpus").disabled = vm.power !== "off";
  $("#disk-add").disabled = vm.state !== "serving";
  $("#vm-delete").disabled = !["off", "failed"].includes(vm.power);
  const s = vm.settings || {};
  $("#vm-settings").textContent = [`generation ${s.generation || 1}`, bytes((s.memory_mib || 0) * 1048576) + " memory",
    `${s.cpus} CPU${s.cpus === 1 ? "" : "s"}`, `accel ${s.accel}`, s.kernel ? "kernel " + base(s.kernel) : "boots from disk 0",
    s.cdrom ? "DVD " + base(s.cdrom) : null, `network ${s.network || "none"}`].filter(Boolean).join(" · ");
  const files = await Promise.all(vm.disks.map((d) => vm.state === "serving"
    ? call("GET", `/v1/vms/${esc(vm.name)}/disks/${d.index}`).catch(() => null) : null));
  if (changed("disks", [vm.disks, files])) $("#disks tbody").replaceChildren(...vm.disks.map((d, i) => el("tr", { "data-disk": d.index },
    el("td", {}, d.index),
    el("td", { class: "mono" }, d.export || "–"),
    el("td", {}, bytes(d.size)),
    el("td", { class: "mono running-on" }, base(d.path)),
    el("td", { class: "mono" }, (files[i] ? files[i].files : (d.chain || []).map((p) => ({ path: p })))
      .map((f) => el("div", {}, base(f.path) + (f.allocated !== undefined ? ": " + bytes(f.allocated) : "")))),
    el("td", {}, el("div", { class: "buttons" },
      el("button", { class: "details", disabled: !d.export, onclick: () => { state.disk = d.index; renderDisk(); } }, "Details"),
      el("button", { class: "remove", onclick: () => removeDisk(vm.name, d) }, "Remove"))),
  )));
  await renderTree(vm);
  if (state.disk !== null && !vm.disks.some((d) => d.index === state.disk && d.export)) state.disk = null;
  if (state.disk !== null) renderDisk();
  else $("#disk-pane").hidden = true;
}

// createVM makes a machine with one new disk (paths, such as a kernel or
// a file to attach, are not asked in the browser: vhdkit vm create).
async function createVM() {
  const name = await ask("Name of the new machine:", "");
  if (!name) return;
  const size = await ask(`Size of ${name}'s disk (a dynamic VHDX: 20G, 512M, …):`, "20G");
  if (!size) return;
  if (!(parseSize(size) > 0)) { showError(`"${size}" is not a size`); return; }
  await act(async () => {
    await call("POST", "/v1/vms", { name, disks: [parseSize(size)] });
    state.selected = name;
  });
}

// deleteVM deletes the selected machine and the files the daemon made
// for it (attached files stay); with NBD clients connected it asks again.
async function deleteVM() {
  const vm = state.selected;
  if (!await ask(`Delete machine ${vm} and the disk files vhdkit made for it (its checkpoints too; attached files stay)?`)) return;
  const path = `/v1/vms/${esc(vm)}?delete_disks=1`;
  await act(async () => {
    let out;
    try {
      out = await call("DELETE", path);
    } catch (err) {
      if (!/NBD client/.test(err.message)) throw err;
      if (!await ask(err.message.replace(/; disconnect them.*$/, "") + ". Disconnect them and delete?")) return;
      out = await call("DELETE", path + "&force=1");
    }
    showNotice(`Machine ${vm} deleted: removed ${out.removed.length} files` + (out.kept.length ? `, kept ${out.kept.join(", ")}` : ""));
  });
}

async function setting(field, text, unit) {
  const vm = state.vms.find((v) => v.name === state.selected);
  const cur = vm && vm.settings ? vm.settings[field] : "";
  const v = await ask(`${text} of ${state.selected} (${unit}; the machine must be off):`, String(cur));
  if (!v) return;
  await act(() => call("PATCH", `/v1/vms/${esc(state.selected)}`, { [field]: Number(v) }));
}

async function addDisk() {
  const size = await ask(`Size of a new disk for ${state.selected} (a dynamic VHDX: 20G, 512M, …):`, "");
  if (!size) return;
  if (!(parseSize(size) > 0)) { showError(`"${size}" is not a size`); return; }
  await act(() => call("POST", `/v1/vms/${esc(state.selected)}/disks`, { size: parseSize(size) }));
}

async function removeDisk(vm, d) {
  if (!await ask(`Remove disk ${d.index} (${base(d.path)}) from ${vm}? Its file stays.`)) return;
  await act(async () => {
    const out = await call("DELETE", `/v1/vms/${esc(vm)}/disks/${d.index}`);
    showNotice(`Disk ${d.index} removed; its file ${out.path} stays.`);
  });
}

function power(verb, turnOff) {
  const vm = state.selected;
  return act(() => call("POST", `/v1/vms/${esc(vm)}/${verb}`, verb === "stop" ? { turn_off: !!turnOff } : undefined));
}

// ---- checkpoint tree ----

async function renderTree(vm) {
  const tree = await call("GET", `/v1/vms/${esc(vm.name)}/checkpoints`);
  if (!changed("tree", tree)) return;
  const children = new Map();
  for (const c of tree.checkpoints) {
    const p = c.parent || "";
    if (!children.has(p)) children.set(p, []);
    children.get(p).push(c);
  }
  const now = () => el("li", { class: "now", "data-now": "" }, el("span", { class: "node" }, el("span", { class: "name" }, "▶ Now")));
  const branch = (parent) => {
    const items = (children.get(parent) || []).map((c) => {
      const sub = branch(c.id);
      if (c.id === tree.current) sub.push(now());
      return el("li", { "data-cp-id": c.id, "data-cp-name": c.name },
        el("span", { class: "node" + (c.current ? " current" : "") },
          el("span", { class: "name", title: new Date(c.created).toLocaleString() + (c.note ? "\n" + c.note : "") }, c.name),
          c.type ? el("span", { class: "cptype" }, c.type + (c.stun_ms ? `, ${c.stun_ms.toFixed(0)} ms` : "")) : null,
          el("span", { class: "actions buttons" },
            el("button", { class: "apply", onclick: () => applyCp(vm.name, c) }, "Apply"),
            el("button", { class: "rename", onclick: () => renameCp(vm.name, c) }, "Rename"),
            el("button", { class: "export", onclick: () => exportCp(vm.name, c) }, "Export"),
            el("button", { class: "delete", onclick: () => deleteCp(vm.name, c, false) }, "Delete"),
            el("button", { class: "delete-subtree", onclick: () => deleteCp(vm.name, c, true) }, "Delete subtree"))),
        sub.length ? el("ul", {}, sub) : null);
    });
    return items;
  };
  const roots = branch("");
  if (!tree.current) roots.push(now());
  $("#tree").replaceChildren(...roots);
}

async function createCp() {
  const name = await ask("Name of the new checkpoint of " + state.selected + " (empty: the time):", "", true);
  if (name === null) return;
  const req = { type: $("#ask-type").value };
  if (name) req.name = name;
  await act(async () => {
    const cp = await call("POST", `/v1/vms/${esc(state.selected)}/checkpoints`, req);
    if (cp.note) showNotice(`Checkpoint ${cp.name}: ${cp.note}`);
  });
}

async function applyCp(vm, c) {
  if (!await ask(`Apply checkpoint "${c.name}"? The current state of ${vm} is discarded.`)) return;
  const path = `/v1/vms/${esc(vm)}/checkpoints/${esc(c.id)}/apply`;
  await act(async () => {
    try {
      await call("POST", path, {});
    } catch (err) {
      // Clients connected to the disks would see them change: ask
      // before disconnecting them.
      if (!/NBD client/.test(err.message)) throw err;
      if (!await ask(err.message.replace(/; disconnect them.*$/, "") + ". Disconnect them and apply?")) return;
      await call("POST", path, { force: true });
    }
  });
}

async function renameCp(vm, c) {
  const name = await ask(`New name of checkpoint "${c.name}":`, c.name);
  if (!name) return;
  await act(() => call("PATCH", `/v1/vms/${esc(vm)}/checkpoints/${esc(c.id)}`, { name }));
}

async function exportCp(vm, c) {
  const dir = await ask(`Export "${c.name}" into the folder (made in the daemon's exports folder):`, `${vm}-${c.name}`.replace(/[^A-Za-z0-9._-]/g, "_"));
  if (!dir) return;
  await act(async () => {
    const out = await call("POST", `/v1/vms/${esc(vm)}/checkpoints/${esc(c.id)}/export`, { dir });
    showNotice("Exported: " + out.files.join(", "));
  });
}

// deleteCp starts the job that deletes a checkpoint, its files merging
// while the machine runs, at most at the rate asked for.
async function deleteCp(vm, c, subtree) {
  const what = subtree ? `checkpoint "${c.name}" and every checkpoint under it` : `checkpoint "${c.name}"`;
  const rate = await ask(`Delete ${what}? Its files merge while ${vm} runs. Merge rate limit in MiB/s (empty: none):`, "");
  if (rate === null) return;
  const q = new URLSearchParams();
  if (subtree) q.set("subtree", "1");
  if (Number(rate) > 0) q.set("bandwidth", String(Math.round(Number(rate) * 1048576)));
  await act(() => call("DELETE", `/v1/vms/${esc(vm)}/checkpoints/${esc(c.id)}?${q}`));
}

// ---- disk details ----

// Colours of data by depth (0: the file the disk runs on); zero ranges
// are lighter, holes grey.
const depthColours = ["#2f6fdb", "#e08a1e", "#2e8b57", "#9b59b6", "#c0392b", "#16a085"];
const depthColour = (d) => depthColours[d % depthColours.length];

async function renderDisk() {
  const vm = state.selected, i = state.disk;
  let d;
  try { d = await call("GET", `/v1/vms/${esc(vm)}/disks/${i}?map=1`); } catch (err) { showError(err); return; }
  $("#disk-pane").hidden = false;
  $("#disk-title").textContent = `${vm} #${i} (${d.export}), ${bytes(d.size)}`;
  const mapped = new Map();
  for (const e of d.map || []) if (e.type === "data") mapped.set(e.depth, (mapped.get(e.depth) || 0) + e.length);
  $("#files tbody").replaceChildren(...d.files.map((f, depth) => el("tr", { "data-depth": depth },
    el("td", {}, el("span", { class: "legend" }, el("span", { style: { "--c": depthColour(depth) } }, depth))),
    el("td", { class: "mono", title: f.path }, base(f.path)),
    el("td", {}, f.format), el("td", {}, f.error ? el("span", { title: f.error }, "unreadable") : f.type),
    el("td", {}, f.block_size ? bytes(f.block_size) : ""),
    el("td", {}, f.logical_sector_size ? `${f.logical_sector_size}/${f.physical_sector_size}` : ""),
    el("td", {}, bytes(f.file_size)), el("td", {}, bytes(f.allocated)),
    el("td", {}, bytes(mapped.get(depth) || 0)))));
  drawStrip(d);
}

// drawStrip draws the allocation map as one strip across the disk:
// data in its layer's colour, zero ranges in a light shade of it, holes
// grey. A range narrower than a pixel still gets one.
function drawStrip(d) {
  const canvas = $("#strip");
  const width = canvas.clientWidth || 1000;
  canvas.width = width;
  const g = canvas.getContext("2d");
  g.fillStyle = "#e5e8ee";
  g.fillRect(0, 0, width, canvas.height);
  const scale = width / d.size;
  for (const e of d.map || []) {
    if (e.type === "hole") continue;
    const x = Math.floor(e.offset * scale);
    const w = Math.max(1, Math.ceil((e.offset + e.length) * scale) - x);
    g.globalAlpha = e.type === "zero" ? 0.3 : 1;
    g.fillStyle = depthColour(e.depth);
    g.fillRect(x, 0, w, canvas.height);
  }
  g.globalAlpha = 1;
  canvas.dataset.extents = (d.map || []).length;
  const legend = d.files.map((f, depth) => el("span", { style: { "--c": depthColour(depth) } }, `data in ${base(f.path)} (depth ${depth})`));
  legend.push(el("span", { style: { "--c": "#e5e8ee" } }, "hole"), el("span", { class: "muted" }, "light: stored as zeros"));
  if (d.map_truncated) legend.push(el("span", { class: "muted" }, `map shown up to ${bytes(d.map_end)}`));
  $("#strip-legend").replaceChildren(...legend);
}

// ---- jobs ----

const finished = (j) => ["done", "failed", "canceled"].includes(j.state);
const percent = (j) => j.total > 0 ? Math.floor(100 * j.done / j.total) : (j.state === "done" ? 100 : 0);

// renderJobs draws each job once and then updates its bar, text and
// buttons in place: a bandwidth being typed survives the progress.
function renderJobs() {
  const jobs = [...state.jobs.values()].sort((a, b) => a.created < b.created ? 1 : -1).slice(0, 20);
  const box = $("#jobs");
  if (!jobs.length) { box.replaceChildren(el("p", { class: "empty" }, "No jobs.")); return; }
  box.querySelector(".empty")?.remove();
  const keep = new Set(jobs.map((j) => j.id));
  for (const div of box.querySelectorAll(".job")) if (!keep.has(div.dataset.job)) div.remove();
  jobs.forEach((j, i) => {
    let div = box.querySelector(`.job[data-job="${CSS.escape(j.id)}"]`);
    if (!div) div = newJob(j);
    if (box.children[i] !== div) box.insertBefore(div, box.children[i] || null);
    updateJob(div, j);
  });
}

function newJob(j) {
  const bw = el("input", { type: "number", min: 0, step: 1, class: "bandwidth", placeholder: "MiB/s", title: "rate limit, MiB/s (0: none)" });
  const control = (action) => () => act(() => call("POST", `/v1/jobs/${esc(j.id)}/${action}`));
  return el("div", { class: "job", "data-job": j.id },
    el("div", {}, el("b", {}, j.id), ` ${j.kind} ${j.vm} "${j.checkpoint}"${j.subtree ? " (subtree)" : ""} `,
      el("span", { class: "badge state" }), el("span", { class: "muted reason" })),
    el("div", { class: "bar", role: "progressbar" }, el("div", {})),
    el("div", { class: "muted numbers" }),
    el("div", { class: "buttons controls" },
      el("button", { class: "pause", onclick: control("pause") }, "Pause"),
      el("button", { class: "resume", onclick: control("resume") }, "Resume"),
      el("button", { class: "cancel", onclick: control("cancel") }, "Cancel"),
      bw, el("button", { class: "set-bandwidth", onclick: () => act(() => call("PATCH", `/v1/jobs/${esc(j.id)}`, { bandwidth: Math.round((Number(bw.value) || 0) * 1048576) })) }, "Set limit")));
}

function updateJob(div, j) {
  const pct = percent(j);
  const rate = j.eta_seconds > 0 ? (j.total - j.done) / j.eta_seconds : 0;
  div.className = "job " + j.state;
  Object.assign(div.dataset, { state: j.state, done: j.done, total: j.total });
  const badge = div.querySelector(".state");
  badge.textContent = j.state;
  badge.className = "badge state " + j.state;
  div.querySelector(".reason").textContent = j.reason ? " " + j.reason : "";
  const bar = div.querySelector(".bar");
  bar.setAttribute("aria-valuenow", pct);
  bar.firstChild.style.width = pct + "%";
  div.querySelector(".numbers").textContent = `${pct}% · ${bytes(j.done)} of ${bytes(j.total)}` +
    (rate ? ` · ${bytes(rate)}/s · ${Math.ceil(j.eta_seconds)} s left` : "") +
    (j.stall_ms ? ` · switch stall ${j.stall_ms.toFixed(1)} ms` : "") +
    (j.bandwidth ? ` · limit ${bytes(j.bandwidth)}/s` : "");
  div.querySelector(".controls").hidden = finished(j);
  div.querySelector(".pause").disabled = j.state === "paused";
  div.querySelector(".resume").disabled = j.state !== "paused";
}

// ---- events ----

function addEvent(ev) {
  const fields = Object.entries(ev.fields || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  const list = $("#events");
  list.prepend(el("li", { class: ev.level, "data-seq": ev.seq },
    el("span", { class: "time" }, new Date(ev.time).toLocaleTimeString()), " ",
    ev.vm ? el("b", {}, ev.vm + ": ") : null, ev.message, ev.job ? ` (${ev.job})` : "",
    fields ? el("span", { class: "muted mono" }, " " + fields) : null));
  while (list.children.length > 300) list.lastChild.remove();
}

// A burst of events asks for one refresh.
let refreshTimer = null;
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 150);
}

function connect() {
  const src = new EventSource("/v1/events/stream");
  src.addEventListener("open", () => { $("#conn").textContent = "live"; $("#conn").className = "conn live"; });
  src.addEventListener("error", () => { $("#conn").textContent = "reconnecting…"; $("#conn").className = "conn"; });
  src.addEventListener("event", (m) => { addEvent(JSON.parse(m.data)); refreshSoon(); });
  src.addEventListener("jobs", (m) => {
    state.jobs = new Map(JSON.parse(m.data).map((j) => [j.id, j]));
    renderJobs();
  });
  src.addEventListener("job", (m) => {
    const j = JSON.parse(m.data);
    const was = state.jobs.get(j.id);
    state.jobs.set(j.id, j);
    renderJobs();
    const badge = $("#vm-state");
    if (j.vm === state.selected && !finished(j)) badge.textContent = badge.textContent.replace(/, merging \(\d+%\)$/, "") + `, merging (${percent(j)}%)`;
    if (!was || was.state !== j.state) refreshSoon();
  });
}

async function main() {
  ({ csrf } = await call("GET", "/session"));
  for (const b of document.querySelectorAll("#power-buttons button[data-power]")) b.addEventListener("click", () => power(b.dataset.power, b.dataset.turnOff));
  $("#cp-create").addEventListener("click", createCp);
  $("#disk-add").addEventListener("click", addDisk);
  $("#vm-create").addEventListener("click", createVM);
  $("#vm-delete").addEventListener("click", deleteVM);
  $("#set-memory").addEventListener("click", () => setting("memory_mib", "Memory", "MiB"));
  $("#set-cpus").addEventListener("click", () => setting("cpus", "Virtual processors", "count"));
  await refresh();
  connect();
}

main().catch(showError);
