// pagellm dashboard: polls /dashboard/state once a second and draws it. No dependencies.
"use strict";

const key = new URLSearchParams(location.search).get("key");
const COLORS = { "0": "#e8eaed", "1": "#3b82f6", "2": "#f59e0b", "3": "#10b981" };
const history = [];  // [time s, generated tokens] over the last minute
let updates = 0;

function setValue(id, value, text) {
  const el = document.getElementById(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text !== undefined ? text : (value === null || value === undefined ? "-" : String(value));
}

function ms(seconds) {
  return seconds === null || seconds === undefined ? "-" : (1000 * seconds).toFixed(1) + " ms";
}

function drawMaps(replicas) {
  const root = document.getElementById("maps");
  replicas.forEach((r, i) => {
    let box = root.children[i];
    if (!box) {
      box = document.createElement("div");
      box.className = "map";
      box.innerHTML = '<div class="title"></div><canvas></canvas>';
      root.appendChild(box);
    }
    const n = r.block_map.length;
    const cols = Math.min(128, Math.max(1, Math.ceil(Math.sqrt(n * 4))));
    const rows = Math.ceil(n / cols);
    const cell = Math.max(3, Math.min(10, Math.floor(900 / cols)));
    const canvas = box.querySelector("canvas");
    canvas.width = cols * cell;
    canvas.height = rows * cell;
    canvas.dataset.blocks = r.block_map;
    const ctx = canvas.getContext("2d");
    for (let b = 0; b < n; b++) {
      ctx.fillStyle = COLORS[r.block_map[b]] || "#000";
      ctx.fillRect((b % cols) * cell, Math.floor(b / cols) * cell, cell - (cell > 3 ? 1 : 0), cell - (cell > 3 ? 1 : 0));
    }
    box.querySelector(".title").textContent =
      (replicas.length > 1 ? "replica " + r.index + ": " : "") + n + " blocks" + (r.dead ? " (dead: " + r.dead + ")" : "");
  });
}

function drawThroughput() {
  const canvas = document.getElementById("throughput");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const rates = [];
  for (let i = 1; i < history.length; i++) {
    const dt = history[i][0] - history[i - 1][0];
    if (dt > 0) rates.push([history[i][0], (history[i][1] - history[i - 1][1]) / dt]);
  }
  if (rates.length < 2) return;
  const t1 = rates[rates.length - 1][0], t0 = t1 - 60;
  const top = Math.max(1, ...rates.map((r) => r[1]));
  ctx.strokeStyle = "#3b82f6";
  ctx.lineWidth = 2;
  ctx.beginPath();
  rates.forEach(([t, v], i) => {
    const x = ((t - t0) / 60) * canvas.width, y = canvas.height - 4 - (v / top) * (canvas.height - 16);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#667085";
  ctx.fillText(top.toFixed(0) + " tok/s", 4, 10);
}

function drawRequests(requests) {
  const body = document.querySelector("#requests tbody");
  body.replaceChildren(...requests.map((r) => {
    const tr = document.createElement("tr");
    for (const v of [r.request_id, r.replica, r.status, r.prompt_tokens, r.output_tokens, r.sequences, r.blocks,
                     r.preemptions]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    return tr;
  }));
  setValue("requests-count", requests.length, "(" + requests.length + " shown)");
}

function drawLatency(id, p) {
  const cells = document.querySelectorAll("#" + id + " td");
  [ms(p.p50), ms(p.p90), ms(p.p99), p.count].forEach((v, i) => { cells[i].textContent = v; });
}

function render(s) {
  document.getElementById("model").textContent = s.model;
  const health = document.getElementById("health");
  health.textContent = s.dead ? "dead: " + s.dead : "healthy";
  health.className = s.dead ? "dead" : "ok";
  const st = s.stats;
  setValue("running", st.num_running_reqs);
  setValue("waiting", st.num_waiting_reqs);
  setValue("kv-usage", st.kv_cache_usage, (100 * st.kv_cache_usage).toFixed(1) + " %");
  setValue("generated", s.counters.generation_tokens);
  setValue("preemptions", st.num_preemptions);
  setValue("hit-rate", st.prefix_cache_hit_rate,
           st.prefix_cache_hit_rate === null ? "-" : (100 * st.prefix_cache_hit_rate).toFixed(1) + " %");
  for (const kind of ["free", "used", "shared", "cached"]) setValue("blocks-" + kind, s.blocks[kind]);
  setValue("blocks-total", st.num_total_blocks);
  history.push([s.time, s.counters.generation_tokens]);
  while (history.length && history[0][0] < s.time - 61) history.shift();
  const n = history.length;
  const rate = n > 1 ? (history[n - 1][1] - history[n - 2][1]) / (history[n - 1][0] - history[n - 2][0]) : 0;
  setValue("tokens-per-s", Math.round(rate));
  drawMaps(s.replicas);
  drawThroughput();
  drawLatency("lat-ttft", s.latency.ttft);
  drawLatency("lat-itl", s.latency.itl);
  drawRequests(s.requests);
  document.getElementById("updated").textContent = "updated " + new Date(1000 * s.time).toLocaleTimeString();
  document.body.dataset.updates = String(++updates);
}

async function poll() {
  try {
    const url = "/dashboard/state" + (key ? "?key=" + encodeURIComponent(key) : "");
    const r = await fetch(url, { headers: key ? { Authorization: "Bearer " + key } : {} });
    if (r.ok) render(await r.json());
    else document.getElementById("health").textContent = "error " + r.status;
  } catch (e) {
    const health = document.getElementById("health");
    health.textContent = "unreachable";
    health.className = "dead";
  }
  setTimeout(poll, 1000);
}
poll();
