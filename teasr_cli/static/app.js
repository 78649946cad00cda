// teasr serve: the page. Plain JS, no framework and no CDN, so it works offline.
"use strict";
const $ = (id) => document.getElementById(id);
// each tab is its own session: its results stay listed across reloads, another tab's are not mixed in
const session = sessionStorage.teasrSession || (sessionStorage.teasrSession = Math.random().toString(36).slice(2));
const jobs = new Map();          // id -> {data, el}
let files = [];                  // picked or dropped, kept so the same photos can be re-run with other settings
let selected = null;             // id of the job shown in the viewer
let polling = null;

// ------------------------------------------------------------------ settings and upload
for (const id of ["steps", "fidelity"]) {
  $(id).addEventListener("input", () => { $(id + "-out").textContent = $(id).value; });
}

function pick(list) {
  files = [...list];
  $("picked").textContent = files.length ? files.map((f) => f.name).join(", ") : "no file chosen";
  $("run").disabled = !files.length;
}
$("file-input").addEventListener("change", (e) => pick(e.target.files));
for (const type of ["dragenter", "dragover"]) {
  document.addEventListener(type, (e) => { e.preventDefault(); $("drop").classList.add("over"); });
}
document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) $("drop").classList.remove("over"); });
document.addEventListener("drop", (e) => {     // anywhere on the page: a missed drop must not navigate away
  e.preventDefault();
  $("drop").classList.remove("over");
  if (e.dataTransfer.files.length) pick(e.dataTransfer.files);
});

function showError(msg) {
  const li = document.createElement("li");
  li.textContent = msg;
  li.title = "click to dismiss";
  li.addEventListener("click", () => li.remove());
  $("errors").prepend(li);
}

$("run").addEventListener("click", async () => {
  const params = { session, steps: $("steps").value, fidelity: $("fidelity").value, seed: $("seed").value || "0",
                   color_fix: $("color-fix").value };
  for (const file of files) {    // one at a time, so the queue keeps the order they were picked in
    const q = new URLSearchParams({ ...params, name: file.name });
    try {
      const r = await fetch("/api/jobs?" + q, { method: "POST", body: file });
      const data = await r.json().catch(() => ({ error: `${file.name}: the server answered ${r.status}` }));
      if (!r.ok) showError(data.error || `${file.name}: the server answered ${r.status}`);
      else update(data);
    } catch (err) {
      showError(`${file.name}: could not reach the server (${err.message}); is teasr serve still running?`);
    }
  }
  startPolling();
});

// ------------------------------------------------------------------ the job list
const fmtSize = (s) => s ? `${s[0]}×${s[1]}` : "";
const active = (d) => d.state === "queued" || d.state === "running";

function status(d) {
  if (d.state === "queued") return `queued: place ${d.place} in line`;
  if (d.state === "running") {
    if (!d.tiles_total) return "starting";
    if (d.tiles >= d.tiles_total) return "finishing (decode, colour fix, save)";
    return `tile ${d.tiles}/${d.tiles_total}` + (d.steps ? ` · step ${d.step}/${d.steps} done` : "");
  }
  if (d.state === "done") return `done in ${d.seconds.toFixed(1)} s`;
  if (d.state === "failed") return d.error;
  return "cancelled";
}

function meta(d) {
  const s = d.settings;
  return `${fmtSize(d.in_size)} → ${d.out_size ? fmtSize(d.out_size) : "x4"} · ` +
         `${s.steps} step${s.steps > 1 ? "s" : ""} · seed ${s.seed} · fidelity ${s.fidelity} · ${s.color_fix}`;
}

function update(d) {
  let job = jobs.get(d.id);
  if (!job) {
    const el = document.createElement("li");
    el.className = "job";
    el.dataset.id = d.id;
    el.innerHTML = '<div class="name"></div><progress max="1" value="0"></progress>' +
                   '<div class="status"></div><div class="meta"></div><div class="actions"></div>';
    el.querySelector(".name").textContent = el.querySelector(".name").title = d.name;
    el.addEventListener("click", (e) => {
      if (jobs.get(d.id).data.state === "done" && !e.target.closest("a")) show(d.id);
    });
    $("jobs").prepend(el);
    job = { data: null, el };
    jobs.set(d.id, job);
  }
  const was = job.data && job.data.state;
  job.data = d;
  const el = job.el;
  el.dataset.state = d.state;
  el.querySelector(".status").textContent = status(d);
  el.querySelector(".meta").textContent = meta(d);
  const bar = el.querySelector("progress");
  bar.hidden = !active(d);
  if (d.state === "running" && d.tiles_total) bar.value = d.tiles / d.tiles_total;
  else if (d.state === "queued") bar.removeAttribute("value");   // indeterminate while it waits
  if (was !== d.state) {
    const actions = el.querySelector(".actions");
    actions.replaceChildren();
    if (active(d)) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "cancel"; b.textContent = "Cancel";
      b.addEventListener("click", async (e) => {
        e.stopPropagation();
        const r = await fetch(`/api/jobs/${d.id}/cancel`, { method: "POST" });
        if (r.ok) update(await r.json());
      });
      actions.append(b);
    } else if (d.state === "done") {
      const a = document.createElement("a");
      a.className = "button download"; a.textContent = "Download";
      a.href = `/api/jobs/${d.id}/download`; a.download = d.download_name;
      actions.append(a);
      if (was) show(d.id);       // just finished: show it (not on a reload of old results)
    }
  }
}

async function poll() {
  try {
    const r = await fetch("/api/jobs?session=" + encodeURIComponent(session));
    for (const d of await r.json()) update(d);
  } catch (err) { /* server gone: keep what is shown; the next run says so */ }
  if (![...jobs.values()].some((j) => active(j.data))) { clearInterval(polling); polling = null; }
}
function startPolling() { if (!polling) polling = setInterval(poll, 400); }

// ------------------------------------------------------------------ before/after viewer: divider, zoom, pan
const viewer = $("viewer"), stage = $("stage"), before = $("before"), after = $("after"), divider = $("divider");
const view = { W: 0, H: 0, z: 1, tx: 0, ty: 0, split: 0.5 };

function apply() {
  const vw = viewer.clientWidth, x = view.split * vw;
  stage.style.width = view.W + "px"; stage.style.height = view.H + "px";
  stage.style.transform = `translate(${view.tx}px, ${view.ty}px) scale(${view.z})`;
  stage.classList.toggle("pixels", view.z >= 2);    // zoomed in to inspect: show pixels, not a blur of them
  // the after image covers the right of the divider; the divider lives in screen space, the clip in image space
  const cx = Math.min(Math.max((x - view.tx) / view.z, 0), view.W);
  after.style.clipPath = `inset(0 0 0 ${cx}px)`;
  divider.style.left = x + "px";
  divider.setAttribute("aria-valuenow", Math.round(view.split * 100));
  $("zoom-level").textContent = view.W ? Math.round(view.z * 100) + "%" : "";
}

function zoomAt(z, px, py) {
  z = Math.min(Math.max(z, 0.05), 32);
  view.tx = px - (px - view.tx) * (z / view.z);
  view.ty = py - (py - view.ty) * (z / view.z);
  view.z = z;
  apply();
}

function fit() {
  const vw = viewer.clientWidth, vh = viewer.clientHeight;
  view.z = Math.min(vw / view.W, vh / view.H, 1);   // never blow a small result up past 1:1 on its own
  view.tx = (vw - view.W * view.z) / 2; view.ty = (vh - view.H * view.z) / 2;
  apply();
}

function show(id) {
  const d = jobs.get(id).data;
  selected = id;
  for (const j of jobs.values()) j.el.classList.toggle("selected", j.data.id === id);
  [view.W, view.H] = d.out_size;
  for (const img of [before, after]) { img.style.width = view.W + "px"; img.style.height = view.H + "px"; }
  before.src = `/api/jobs/${id}/input`;      // the input, stretched by the browser to the output's size
  after.src = `/api/jobs/${id}/result`;
  for (const el of [stage, divider, $("tag-before"), $("tag-after"), $("download")]) el.hidden = false;
  $("placeholder").hidden = true;
  $("download").href = `/api/jobs/${id}/download`;
  $("download").download = d.download_name;
  $("result-info").textContent = `${d.name} → ${d.download_name} · ${fmtSize(d.out_size)} · ` +
    `${d.settings.steps} step${d.settings.steps > 1 ? "s" : ""} · ${d.seconds.toFixed(1)} s`;
  fit();
}

let drag = null;
divider.addEventListener("pointerdown", (e) => {
  e.stopPropagation();
  divider.setPointerCapture(e.pointerId);
  drag = { kind: "divider" };
});
viewer.addEventListener("pointerdown", (e) => {
  if (!view.W || e.button !== 0) return;
  viewer.setPointerCapture(e.pointerId);
  viewer.classList.add("panning");
  drag = { kind: "pan", x: e.clientX, y: e.clientY, tx: view.tx, ty: view.ty };
});
document.addEventListener("pointermove", (e) => {
  if (!drag) return;
  if (drag.kind === "divider") {
    const r = viewer.getBoundingClientRect();
    view.split = Math.min(Math.max((e.clientX - r.left) / r.width, 0), 1);
  } else {
    view.tx = drag.tx + e.clientX - drag.x; view.ty = drag.ty + e.clientY - drag.y;
  }
  apply();
});
document.addEventListener("pointerup", () => { drag = null; viewer.classList.remove("panning"); });
divider.addEventListener("keydown", (e) => {
  const step = { ArrowLeft: -0.02, ArrowRight: 0.02 }[e.key];
  if (step) { view.split = Math.min(Math.max(view.split + step, 0), 1); apply(); e.preventDefault(); }
});
viewer.addEventListener("wheel", (e) => {
  if (!view.W) return;
  e.preventDefault();
  const r = viewer.getBoundingClientRect();
  zoomAt(view.z * Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top);
}, { passive: false });
const centre = () => [viewer.clientWidth / 2, viewer.clientHeight / 2];
$("zoom-fit").addEventListener("click", () => view.W && fit());
$("zoom-1").addEventListener("click", () => view.W && zoomAt(1, ...centre()));
$("zoom-in").addEventListener("click", () => view.W && zoomAt(view.z * 1.5, ...centre()));
$("zoom-out").addEventListener("click", () => view.W && zoomAt(view.z / 1.5, ...centre()));
window.addEventListener("resize", apply);

// ------------------------------------------------------------------ start
fetch("/api/info").then((r) => r.json()).then((i) => {
  const mp = (i.max_pixels / 1e6).toFixed(0);
  $("model-info").textContent = `model ${i.model} · ${i.device} · ${i.dtype} · up to ${mp} MP`;
});
poll().then(startPolling);
