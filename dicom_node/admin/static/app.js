// dicom-node admin page: plain JavaScript, no build step, nothing fetched from outside this node.
// Data comes from the node's own /api with the bearer token typed in the page or passed as ?token=.
// Every value from the API is inserted with textContent (never innerHTML), so no DICOM string can inject markup.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const REFRESH_MS = 15000;
const COLORS = { brain_mri: "#4e5fbf", chest_xray: "#d08a1c" };
const FALLBACK_COLORS = ["#2a9d8f", "#8e44ad", "#c0392b", "#16a085"];

const state = { token: "", selectedJob: null, timer: null };

function colorFor(detector, index) {
  return COLORS[detector] || FALLBACK_COLORS[index % FALLBACK_COLORS.length];
}

function setStatus(text, isError) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({
    headers: { Authorization: "Bearer " + state.token, Accept: "application/json" },
  }, options || {}));
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    const error = new Error(response.status + ": " + detail);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children || []) node.appendChild(child);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmtTime(iso) {
  if (!iso) return "-";
  return iso.replace("T", " ").replace(/\.\d+/, "").replace("Z", "").replace("+00:00", "");
}

function fmtSeconds(value) {
  if (value === null || value === undefined) return "-";
  if (value < 60) return value.toFixed(2) + " s";
  const minutes = Math.floor(value / 60);
  if (minutes < 60) return minutes + " min " + Math.round(value - 60 * minutes) + " s";
  return Math.floor(minutes / 60) + " h " + (minutes % 60) + " min";
}

function flag(abnormal) {
  if (abnormal === true) return el("span", { className: "flag abnormal", text: "ABNORMAL" });
  if (abnormal === false) return el("span", { className: "flag normal", text: "normal" });
  return el("span", { className: "flag pending", text: "no result" });
}

function jobLink(job) {
  const link = el("a", {
    className: "job", href: "#job-" + job.id, "data-job-id": String(job.id),
    text: "#" + job.id + " " + job.detector + " " + job.state,
  });
  link.addEventListener("click", (event) => { event.preventDefault(); showTimeline(job.id); });
  return link;
}

// --- recent studies ------------------------------------------------------------------------------------------------

async function loadStudies() {
  const page = await api("/api/studies?order=triage&limit=50");
  const body = document.querySelector("#studies tbody");
  body.replaceChildren();
  for (const study of page.items) {
    const links = study.jobs.map(jobLink);
    const row = el("tr", { "data-study-uid": study.study_instance_uid }, [
      el("td", {}, [flag(study.abnormal)]),
      el("td", { text: study.max_score === null ? "-" : study.max_score.toFixed(3) }),
      el("td", { text: fmtTime(study.last_received_at) }),
      el("td", { text: study.accession_number || "-" }),
      el("td", { text: study.modalities || "-" }),
      el("td", { text: study.calling_ae_title || "-" }),
      el("td", { text: study.state + (study.needs_reprocessing ? " (late images)" : "") }),
      el("td", {}, links.length ? links : [document.createTextNode("-")]),
      el("td", { className: "uid", text: study.study_instance_uid }),
    ]);
    if (study.abnormal === true) row.className = "abnormal";
    body.appendChild(row);
  }
}

// --- failures ------------------------------------------------------------------------------------------------------

async function loadFailures() {
  const page = await api("/api/jobs?state=failed,delivery_failed&limit=50");
  const body = document.querySelector("#failures tbody");
  body.replaceChildren();
  document.getElementById("no-failures").hidden = page.items.length > 0;
  for (const job of page.items) {
    const retry = el("button", { className: "retry", type: "button", text: "Retry" });
    retry.addEventListener("click", () => retryJob(job.id));
    body.appendChild(el("tr", { "data-job-id": String(job.id) }, [
      el("td", {}, [jobLink(job)]),
      el("td", { text: fmtTime(job.finished_at || job.created_at) }),
      el("td", { text: job.detector }),
      el("td", { text: job.state }),
      el("td", { className: "reason", text: job.error || "(no reason recorded)" }),
      el("td", {}, [retry]),
    ]));
  }
}

async function retryJob(jobId) {
  try {
    await api("/api/jobs/" + jobId + "/retry", { method: "POST" });
    setStatus("job " + jobId + " queued again", false);
    refresh();
  } catch (error) {
    setStatus(error.status === 403 ? "retry needs an admin token" : "retry failed: " + error.message, true);
  }
}

// --- queue depth and expected wait ---------------------------------------------------------------------------------

async function loadQueue() {
  const report = await api("/api/queue");
  const body = document.querySelector("#queue tbody");
  body.replaceChildren();
  for (const q of report.detectors) {
    const queued = String(q.queued) + (q.waiting_retry ? " (" + q.waiting_retry + " backing off)" : "");
    const wait = q.expected_wait === null ? "- (" + q.note + ")" : fmtSeconds(q.expected_wait);
    body.appendChild(el("tr", { "data-detector": q.detector }, [
      el("td", { text: q.detector }),
      el("td", { text: queued }),
      el("td", { text: String(q.running) }),
      el("td", { text: String(q.worker_processes), title: q.workers.join(", ") }),
      el("td", { text: fmtSeconds(q.run_p50) }),
      el("td", { className: "expected-wait", text: wait }),
    ]));
  }
}

// --- throughput and latency plot -----------------------------------------------------------------------------------

async function loadThroughput() {
  const [plot, stats] = await Promise.all([
    api("/api/stats/throughput?since=24h&bucket=1h"), api("/api/stats?since=24h"),
  ]);
  drawPlot(plot);
  const body = document.querySelector("#stats tbody");
  body.replaceChildren();
  for (const d of stats.detectors) {
    body.appendChild(el("tr", {}, [
      el("td", { text: d.detector }),
      el("td", { text: String(d.jobs) }),
      el("td", { text: d.abnormal_rate === null ? "-" : (100 * d.abnormal_rate).toFixed(1) + " %" }),
      el("td", { text: String(d.failed) }),
      el("td", { text: fmtSeconds(d.latency_p50) }),
      el("td", { text: fmtSeconds(d.latency_p95) }),
      el("td", { text: fmtSeconds(d.run_p50) }),
    ]));
  }
}

function drawPlot(plot) {
  const width = 900, height = 260, left = 48, right = 58, top = 28, bottom = 34;
  const innerW = width - left - right, innerH = height - top - bottom;
  const n = plot.buckets.length;
  const detectors = plot.detectors;
  let maxCount = 1, maxLatency = 1;
  for (const d of detectors) {
    for (const c of d.finished) maxCount = Math.max(maxCount, c);
    for (const l of d.latency_p50) if (l !== null) maxLatency = Math.max(maxLatency, l);
  }
  const root = svg("svg", {
    id: "throughput-plot", viewBox: "0 0 " + width + " " + height, role: "img",
    "aria-label": "jobs finished per hour (bars, left axis) and median latency (lines, right axis) per detector",
  });
  const slot = innerW / n, barW = Math.max(1, (slot * 0.8) / Math.max(1, detectors.length));
  const y = (count) => top + innerH - (count / maxCount) * innerH;
  const yl = (seconds) => top + innerH - (seconds / maxLatency) * innerH;
  // Axes and ticks.
  root.appendChild(svg("line", { class: "axis", x1: left, y1: top + innerH, x2: left + innerW, y2: top + innerH }));
  root.appendChild(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: top + innerH }));
  root.appendChild(svg("line", { class: "axis", x1: left + innerW, y1: top, x2: left + innerW, y2: top + innerH }));
  for (const fraction of [0, 0.5, 1]) {
    const count = Math.round(maxCount * fraction);
    root.appendChild(svg("text", { x: left - 6, y: y(count) + 4, "text-anchor": "end" }, String(count)));
    root.appendChild(svg("text", { x: left + innerW + 6, y: yl(maxLatency * fraction) + 4 },
      fmtSeconds(maxLatency * fraction)));
  }
  root.appendChild(svg("text", { x: left, y: 14 }, "jobs finished / h"));
  root.appendChild(svg("text", { x: left + innerW, y: 14, "text-anchor": "end" }, "median latency"));
  plot.buckets.forEach((start, i) => {
    if (i % 3 === 0) {
      const label = start.substring(11, 16);
      root.appendChild(svg("text", { x: left + slot * i + slot / 2, y: top + innerH + 16, "text-anchor": "middle" },
        label));
    }
  });
  detectors.forEach((d, k) => {
    const color = colorFor(d.detector, k);
    d.finished.forEach((count, i) => {
      if (count === 0) return;
      const bar = svg("rect", {
        class: "bar", "data-detector": d.detector, x: left + slot * i + slot * 0.1 + k * barW, y: y(count),
        width: barW, height: top + innerH - y(count), fill: color, opacity: 0.75,
      });
      bar.appendChild(svg("title", {}, d.detector + ": " + count + " jobs"));
      root.appendChild(bar);
    });
    const points = [];
    d.latency_p50.forEach((value, i) => {
      if (value === null) return;
      const cx = left + slot * i + slot / 2, cy = yl(value);
      points.push(cx + "," + cy);
      const dot = svg("circle", { cx: cx, cy: cy, r: 3, fill: color });
      dot.appendChild(svg("title", {}, d.detector + " median latency " + fmtSeconds(value)));
      root.appendChild(dot);
    });
    if (points.length > 1) {
      root.appendChild(svg("polyline", {
        points: points.join(" "), fill: "none", stroke: color, "stroke-width": 1.5, "stroke-dasharray": "4 3",
      }));
    }
    // Legend.
    const lx = left + 150 + k * 140;
    root.appendChild(svg("rect", { x: lx, y: 5, width: 12, height: 12, fill: color, opacity: 0.75 }));
    root.appendChild(svg("text", { x: lx + 16, y: 15 }, d.detector));
  });
  if (detectors.length === 0) {
    root.appendChild(svg("text", { x: left + innerW / 2, y: top + innerH / 2, "text-anchor": "middle" },
      "no job finished in the last 24 h"));
  }
  document.getElementById("plot-container").replaceChildren(root);
}

// --- job timeline --------------------------------------------------------------------------------------------------

async function showTimeline(jobId) {
  state.selectedJob = jobId;
  let timeline;
  try {
    timeline = await api("/api/jobs/" + jobId + "/timeline");
  } catch (error) {
    setStatus("timeline: " + error.message, true);
    return;
  }
  const job = timeline.job;
  document.getElementById("timeline-section").hidden = false;
  document.getElementById("timeline-job").textContent = "#" + job.id;
  const d = timeline.durations;
  document.getElementById("timeline-summary").textContent =
    job.detector + " " + (job.model_version || "") + " on series " + job.series_instance_uid + " — " + job.state +
    (job.error ? " (" + job.error + ")" : "") +
    ". Queue wait " + fmtSeconds(d.queue_wait) + ", run " + fmtSeconds(d.run) + ", delivery " +
    fmtSeconds(d.delivery) + ", receive → PACS " + fmtSeconds(d.receive_to_pacs) + ".";
  const body = document.querySelector("#timeline tbody");
  body.replaceChildren();
  for (const step of timeline.steps) {
    body.appendChild(el("tr", { "data-step": step.name }, [
      el("td", { text: step.name }),
      el("td", { text: fmtTime(step.at) }),
      el("td", { text: fmtSeconds(step.seconds_since_previous) }),
      el("td", { text: fmtSeconds(step.seconds_since_first) }),
      el("td", { text: step.detail || "" }),
    ]));
  }
  drawTimelineBars(timeline.steps);
  document.getElementById("timeline-section").scrollIntoView({ block: "nearest" });
}

function drawTimelineBars(steps) {
  const container = document.getElementById("timeline-bars");
  if (steps.length < 2) { container.replaceChildren(); return; }
  const rowH = 18, left = 190, width = 900, innerW = width - left - 90;
  const height = rowH * (steps.length - 1) + 10;
  const total = Math.max(steps[steps.length - 1].seconds_since_first || 0, 1e-3);
  const root = svg("svg", { id: "timeline-plot", viewBox: "0 0 " + width + " " + height });
  for (let i = 1; i < steps.length; i++) {
    const y = (i - 1) * rowH + 4;
    const x0 = left + (steps[i - 1].seconds_since_first / total) * innerW;
    const w = Math.max(2, (steps[i].seconds_since_previous / total) * innerW);
    root.appendChild(svg("text", { x: left - 6, y: y + 12, "text-anchor": "end" },
      steps[i - 1].name + " → " + steps[i].name));
    root.appendChild(svg("rect", { x: x0, y: y, width: w, height: rowH - 5, fill: "#4e5fbf", opacity: 0.7 }));
    root.appendChild(svg("text", { x: Math.min(x0 + w + 4, width - 80), y: y + 12 },
      fmtSeconds(steps[i].seconds_since_previous)));
  }
  container.replaceChildren(root);
}

// --- wiring --------------------------------------------------------------------------------------------------------

async function refresh() {
  if (!state.token) {
    setStatus("enter an API token", true);
    return;
  }
  try {
    await Promise.all([loadStudies(), loadQueue(), loadFailures(), loadThroughput()]);
    setStatus("updated " + new Date().toISOString().substring(11, 19) + " UTC", false);
    if (state.selectedJob !== null) await showTimeline(state.selectedJob);
  } catch (error) {
    setStatus(error.status === 401 ? "token refused (401)" : "error: " + error.message, true);
  }
}

function init() {
  const params = new URLSearchParams(window.location.search);
  state.token = params.get("token") || window.sessionStorage.getItem("dicom-node-token") || "";
  if (params.has("token")) {
    // Keep the token out of the address bar (and browser history) once read.
    window.sessionStorage.setItem("dicom-node-token", state.token);
    params.delete("token");
    const query = params.toString();
    window.history.replaceState(null, "", window.location.pathname + (query ? "?" + query : "") + window.location.hash);
  }
  document.getElementById("token").value = state.token;
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = document.getElementById("token").value.trim();
    window.sessionStorage.setItem("dicom-node-token", state.token);
    refresh();
  });
  const match = window.location.hash.match(/^#job-(\d+)$/);
  if (match) state.selectedJob = Number(match[1]);
  refresh();
  state.timer = window.setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", init);
