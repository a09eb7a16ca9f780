// anysize serve: the form posts a job to /api/jobs; /api/events streams every change of every job.
"use strict";
const $ = (id) => document.getElementById(id);
const jobs = new Map();  // id -> the <li> showing it

async function loadOptions() {
  const options = await (await fetch("/api/options")).json();
  const fill = (select, values) => values.forEach((v) => select.add(new Option(v, v)));
  fill($("model"), options.models);
  fill($("scheduler"), options.schedulers);
  fill($("tiling"), options.tilings);
  for (const [name, value] of Object.entries(options.defaults)) {
    if ($(name)) $(name).value = value;
  }
}

function fields(form) {
  const out = {};
  for (const [name, value] of new FormData(form)) {
    if (String(value).trim() !== "") out[name] = value;
  }
  for (const name of ["width", "height", "seed", "steps", "upscale_steps", "tile_size"]) {
    if (name in out && /^\d+$/.test(out[name])) out[name] = Number(out[name]);
  }
  return out;
}

async function submit(event) {
  event.preventDefault();
  $("error").textContent = "";
  $("generate").disabled = true;
  try {
    const reply = await fetch("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(fields(event.target))});
    const body = await reply.json();
    if (!reply.ok) {
      $("error").textContent = body.error || `error ${reply.status}`;
      return;
    }
    show(body);
  } catch (err) {
    $("error").textContent = `the server cannot be reached (${err.message})`;
  } finally {
    $("generate").disabled = false;
  }
}

function describe(progress) {
  if (!progress) return "starting (loading the model)";
  const total = progress.total || 1;
  return `${progress.desc}: ${progress.n} / ${total} ${progress.unit}${total === 1 ? "" : "s"}`;
}

function show(job) {
  let li = jobs.get(job.id);
  if (!li) {
    li = $("job-template").content.firstElementChild.cloneNode(true);
    li.id = `job-${job.id}`;
    li.querySelector(".cancel").addEventListener("click", () => cancel(job.id));
    jobs.set(job.id, li);
    const list = $("jobs");
    const after = [...list.children].find((other) => Number(other.dataset.id) < job.id);
    list.insertBefore(li, after || null);
    li.dataset.id = job.id;
    $("empty").hidden = true;
  }
  li.className = `job ${job.state}`;
  li.querySelector(".number").textContent = `#${job.id}`;
  li.querySelector(".state").textContent = job.cancelling ? "cancelling" : job.state;
  li.querySelector(".size").textContent = job.size.join(" x ") + " px";
  li.querySelector(".seed").textContent = `seed ${job.seed}`;
  li.querySelector(".prompt").textContent = job.prompt;
  const bar = li.querySelector("progress");
  bar.max = job.progress ? job.progress.total || 1 : 1;
  bar.value = job.progress ? job.progress.n : 0;
  li.querySelector(".desc").textContent = describe(job.progress);
  const message = li.querySelector(".message");
  message.textContent = job.error || (job.warnings || []).join("; ");
  message.classList.toggle("warn", !job.error);
  if (job.state === "done") {
    const link = li.querySelector(".thumb");
    link.href = `/view/${job.id}`;
    const img = link.querySelector("img");
    if (!img.getAttribute("src")) img.src = `/api/jobs/${job.id}/thumb`;
    img.alt = job.prompt;
    li.querySelector(".parameters").textContent = job.parameters || "";
    li.querySelector(".command").textContent = "anysize " + job.command.map(quote).join(" ");
  }
}

function quote(arg) {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, "'\\''")}'`;
}

async function cancel(id) {
  const reply = await fetch(`/api/jobs/${id}/cancel`, {method: "POST"});
  const body = await reply.json();
  if (reply.ok) show(body);
}

function listen() {
  const events = new EventSource("/api/events");
  events.addEventListener("job", (event) => show(JSON.parse(event.data)));
  // EventSource reconnects by itself; on reconnect the server sends every job again
}

$("job").addEventListener("submit", submit);
loadOptions().then(listen);
