// The Jobs, Job, Data and Compare pages (app.js holds the shell and the Config page).
"use strict";

function nextOutputDir(dir) {
  const match = /^(.*)_v(\d+)$/.exec(dir || "");
  return match ? `${match[1]}_v${Number(match[2]) + 1}` : `${dir}_v2`;
}

function jobActions(job, after) {
  const act = (label, method, path, body) => el("button", {class: "act-" + label.toLowerCase().replace(/ .*/, ""), onclick: async () => {
    try { await api(method, path, body); flash(`${label}: job ${job.id}`); after(); } catch (e) { flash(e.message); alert(e.message); }
  }}, label);
  const buttons = [];
  if (["queued", "running"].includes(job.status)) { buttons.push(act("Stop", "POST", `/api/jobs/${job.id}/stop`)); }
  if (job.kind === "train" && ["stopped", "failed"].includes(job.status)) { buttons.push(act("Resume", "POST", `/api/jobs/${job.id}/resume`)); }
  if (!["running", "stopping"].includes(job.status)) { buttons.push(act("Remove", "DELETE", `/api/jobs/${job.id}`)); }
  if (job.kind === "train") {
    buttons.push(el("button", {class: "act-rerun", onclick: async () => {
      const detail = await api("GET", `/api/jobs/${job.id}`);
      setValues({...detail.values, output_dir: nextOutputDir(detail.values.output_dir)}, null);
      location.hash = "#/config";
      flash(`job ${job.id}'s config loaded with a new output_dir: change what you like, then queue`);
    }}, "Re-run with changes"));
  }
  return buttons;
}

async function renderJobs(root) {
  const settings = await api("GET", "/api/settings");
  const parallel = el("input", {type: "text", id: "max-parallel", class: "narrow"});
  parallel.value = settings.max_parallel;
  const table = el("table", {id: "jobs"});
  root.append(el("h2", {}, "Jobs"),
    el("div", {class: "toolbar"}, "Run at once:", parallel, el("button", {id: "save-parallel", onclick: async () => {
      try { await api("PUT", "/api/settings", {max_parallel: Number(parallel.value)}); flash("saved"); } catch (e) { flash(e.message); }
    }}, "Save"), el("span", {class: "muted"}, `working directory ${settings.cwd}`)), table);
  const refresh = async () => {
    const jobs = await api("GET", "/api/jobs");
    table.replaceChildren(el("tr", {}, ["#", "name", "kind", "status", "progress", "started", "message", ""].map((h) => el("th", {}, h))),
      ...jobs.slice().reverse().map((job) => el("tr", {"data-job-id": job.id, "data-status": job.status},
        el("td", {}, job.id), el("td", {}, el("a", {href: `#/job/${job.id}`}, job.name)), el("td", {}, job.kind),
        el("td", {class: "status-cell"}, statusBadge(job.status)), el("td", {}, progressBar(job.progress)),
        el("td", {}, job.started ? new Date(job.started * 1000).toLocaleTimeString() : ""),
        el("td", {class: "muted"}, job.error || ""), el("td", {}, jobActions(job, refresh)))));
  };
  every(1000, refresh);
}

function sampleFigure(jobId, sample) {
  const label = sample.step === 0 ? "step 0 (before training)" : `step ${sample.step}`;
  return el("figure", {}, el("img", {src: `/api/jobs/${jobId}/output/${sample.path}`, alt: label, loading: "lazy"}), el("figcaption", {}, label));
}

function fileList(jobId, files) {
  return el("ul", {class: "files"}, files.map((f) => el("li", {"data-file": f.name},
    el("a", {href: `/api/jobs/${jobId}/output/${encodeURIComponent(f.name)}?download=1`}, f.name),
    ` ${(f.size / 1024).toFixed(1)} KiB`, f.lora ? " — LoRA" : "")),
    files.length ? el("li", {}, el("a", {href: `/api/jobs/${jobId}/download.zip`}, "all final files (.zip)")) : "");
}

async function renderJob(root, jobId) {
  const detail = await api("GET", `/api/jobs/${jobId}`);
  const logScale = el("input", {type: "checkbox", id: "log-scale"});
  const head = el("div", {id: "job-head"});
  const charts = el("div", {class: "charts"},
    el("div", {class: "wide"}, el("label", {}, logScale, " log-scale loss"), el("canvas", {id: "loss-chart"})),
    el("canvas", {id: "lr-chart"}), el("canvas", {id: "speed-chart"}));
  const samples = el("div", {class: "gallery", id: "samples"});
  const files = el("div", {id: "files"});
  const log = el("pre", {id: "log"});
  root.append(el("h2", {}, `Job ${detail.id}: ${detail.name}`), head, charts,
    el("h3", {}, "Samples"), samples, el("h3", {}, "Final files"), files, el("h3", {}, "Log"), log,
    el("details", {}, el("summary", {}, "Config (YAML)"), el("pre", {id: "job-yaml"}, detail.yaml || "(no config: a label job)")));
  let last = null;
  const draw = () => {
    if (!last || !last.scalars) { return; }
    const s = last.scalars;
    drawChart(document.getElementById("loss-chart"), [{name: "training loss", points: s.loss || []},
      {name: "validation loss", points: s.eval_loss || [], dots: true}], {logY: logScale.checked, title: "Loss"});
    drawChart(document.getElementById("lr-chart"), [{name: "learning rate", points: s.lr || []}], {title: "Learning rate"});
    const speed = Object.keys(s).find((k) => k.endsWith("_per_sec"));
    drawChart(document.getElementById("speed-chart"), speed ? [{name: speed.replace("_per_sec", "/s"), points: s[speed]}] : [], {title: "Throughput"});
  };
  logScale.addEventListener("change", draw);
  const refresh = async () => {
    last = await api("GET", `/api/jobs/${jobId}/live`);
    const job = last.job;
    head.replaceChildren(el("div", {class: "toolbar"}, el("span", {id: "job-status", "data-status": job.status}, statusBadge(job.status)),
      progressBar(last.progress), job.error ? el("span", {class: "muted"}, job.error) : "", jobActions(job, refresh)),
      el("div", {class: "muted", id: "job-command"}, "command: ", el("code", {}, job.command)),
      last.checkpoints && last.checkpoints.length ? el("div", {class: "muted"}, "checkpoints: " + last.checkpoints.join(", ")) : "");
    draw();
    if (last.samples) { samples.replaceChildren(...(last.samples.length ? last.samples.map((x) => sampleFigure(jobId, x)) : [el("span", {class: "muted"}, "no samples (set sample_prompts for an image LoRA)")])); }
    files.replaceChildren(last.files ? fileList(jobId, last.files) : "");
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 20;
    log.textContent = last.log.join("\n");
    if (atBottom) { log.scrollTop = log.scrollHeight; }
  };
  every(1000, refresh);
}

async function renderData(root) {
  const dataDir = state.values.train_data_dir || "";
  const report = el("div", {id: "doctor"});
  const captions = el("div", {id: "captions"});
  const labelForm = {input: el("input", {type: "text", id: "label-input"}), model: el("input", {type: "text", id: "label-model"}),
    labels: el("textarea", {id: "label-labels", placeholder: "candidate labels, one per line (empty: the built-in label sets)"}),
    trigger: el("input", {type: "text", id: "label-trigger"}), output: el("input", {type: "text", id: "label-output"}),
    sidecars: el("input", {type: "checkbox", id: "label-sidecars"}), overwrite: el("input", {type: "checkbox", id: "label-overwrite"})};
  labelForm.input.value = dataDir;
  labelForm.model.value = "models/clip";
  labelForm.output.value = dataDir ? dataDir.replace(/\/$/, "") + "/metadata.csv" : "";
  root.append(el("h2", {}, "Data"),
    el("p", {class: "muted"}, dataDir ? `train_data_dir of the config form: ${dataDir}` : "Set train_data_dir (and the rest of the config) on the Config page first."),
    el("div", {class: "toolbar"}, el("button", {id: "run-doctor", class: "primary", onclick: runDoctor}, "Run the dataset doctor"),
      el("button", {id: "load-captions", onclick: loadCaptions}, "Edit captions")),
    report, captions,
    el("h3", {}, "Auto-label (CLIP zero-shot captions: lora-scripts label)"),
    el("div", {class: "two"}, el("div", {}, "image folder", labelForm.input, "CLIP model folder", labelForm.model, "trigger word", labelForm.trigger),
      el("div", {}, "labels", labelForm.labels, "write metadata.csv", labelForm.output,
        el("label", {}, labelForm.sidecars, " also .txt sidecars "), el("label", {}, labelForm.overwrite, " overwrite existing captions"))),
    el("div", {class: "toolbar"}, el("button", {id: "run-label", onclick: async () => {
      try {
        const job = await api("POST", "/api/data/label", {input: labelForm.input.value, model: labelForm.model.value,
          labels: labelForm.labels.value.split("\n"), trigger: labelForm.trigger.value || null, output: labelForm.output.value || null,
          sidecars: labelForm.sidecars.checked, overwrite: labelForm.overwrite.checked});
        document.getElementById("label-job").replaceChildren("queued ", el("a", {href: `#/job/${job.id}`}, `job ${job.id}`));
      } catch (e) { document.getElementById("label-job").textContent = e.message; }
    }}, "Queue auto-labelling"), el("span", {id: "label-job", class: "errors"})));

  async function runDoctor() {
    report.replaceChildren(el("p", {class: "muted"}, "checking…"));
    try {
      const result = await api("POST", "/api/data/check", {values: state.values});
      report.replaceChildren(el("p", {id: "doctor-summary"}, result.summary),
        ...result.findings.map((f) => el("div", {class: "finding " + f.severity, "data-check": f.check},
          el("strong", {}, `${f.severity}${f.blocking ? " (blocking)" : ""}: ${f.check}`), " ", f.message,
          el("div", {class: "gallery"}, f.items.slice(0, 60).map((item) => el("figure", {"data-item": item},
            f.thumbs[item] ? el("img", {src: f.thumbs[item], alt: item}) : "",
            el("figcaption", {}, el("b", {}, item), el("br"), f.notes[item] || "")))))));
    } catch (e) { report.replaceChildren(el("div", {class: "errors", id: "doctor-error"}, e.message)); }
  }

  async function loadCaptions() {
    try {
      const result = await api("POST", "/api/data/captions", {values: state.values});
      captions.replaceChildren(el("p", {class: "muted"}, `captions are written to ${result.metadata || "the caption files beside the images"}`),
        el("table", {class: "captions"}, result.images.map((image) => {
          const input = el("input", {type: "text", value: image.caption});
          const status = el("span", {class: "muted"});
          return el("tr", {"data-rel": image.rel}, el("td", {}, el("img", {src: image.thumb, alt: image.rel})), el("td", {}, image.rel),
            el("td", {style: "width:55%"}, input), el("td", {}, el("button", {class: "save-caption", onclick: async () => {
              try { await api("POST", "/api/data/caption", {values: state.values, rel: image.rel, caption: input.value}); status.textContent = "saved"; }
              catch (e) { status.textContent = e.message; }
            }}, "Save"), status));
        })));
    } catch (e) { captions.replaceChildren(el("div", {class: "errors"}, e.message)); }
  }
}

async function renderCompare(root) {
  const jobs = (await api("GET", "/api/jobs")).filter((j) => j.kind === "train");
  const picks = jobs.map((job) => el("label", {style: "margin-right:12px"}, el("input", {type: "checkbox", value: job.id, class: "pick"}), ` ${job.id} ${job.name} `, statusBadge(job.status)));
  const out = el("div", {id: "comparison"});
  root.append(el("h2", {}, "Compare runs"), el("div", {class: "toolbar"}, picks,
    el("button", {id: "compare-go", class: "primary", onclick: async () => {
      const ids = [...root.querySelectorAll(".pick:checked")].map((c) => c.value);
      if (!ids.length) { return; }
      showComparison(out, await api("GET", "/api/compare?" + ids.map((id) => "ids=" + id).join("&")));
    }}, "Compare")), out);
}

function showComparison(out, data) {
  const chart = el("canvas", {id: "compare-chart", style: "width:100%;height:300px;background:#fff"});
  const logScale = el("input", {type: "checkbox", id: "compare-log"});
  const series = () => data.runs.flatMap((run, i) => [
    {name: `${run.name} loss`, points: run.loss, color: CHART_COLORS[i % CHART_COLORS.length]},
    ...(run.eval_loss.length ? [{name: `${run.name} validation`, points: run.eval_loss, dots: true, color: CHART_COLORS[(i + 4) % CHART_COLORS.length]}] : [])]);
  const keys = Object.keys(data.differing);
  out.replaceChildren(el("label", {}, logScale, " log-scale"), chart,
    el("h3", {}, "Config keys that differ"),
    keys.length ? el("table", {id: "diff"}, el("tr", {}, el("th", {}, "key"), data.runs.map((r) => el("th", {}, r.name))),
      keys.map((k) => el("tr", {}, el("td", {}, k), data.differing[k].map((v) => el("td", {}, JSON.stringify(v))))))
      : el("p", {}, "The configs are the same."),
    el("h3", {}, "Samples at equal steps"),
    data.sample_steps.length ? el("table", {id: "compare-samples"}, data.sample_steps.map((step) => el("tr", {}, el("th", {}, `step ${step}`),
      data.runs.map((r) => el("td", {}, r.samples[step] ? el("img", {src: `/api/jobs/${r.id}/output/${r.samples[step]}`, style: "max-width:220px"}) : "—")))))
      : el("p", {class: "muted"}, "No sample images at the same step in two runs."),
    el("h3", {}, "Eval scores and downloads"),
    el("table", {id: "compare-files"}, data.runs.map((r) => el("tr", {}, el("th", {}, r.name, el("br"), statusBadge(r.status)),
      el("td", {}, r.scores ? el("pre", {}, JSON.stringify({before: r.scores.before, after: r.scores.after}, null, 1)) : el("span", {class: "muted"}, "no demo_scores.json")),
      el("td", {}, fileList(r.id, r.files))))));
  const draw = () => drawChart(chart, series(), {logY: logScale.checked, title: "Loss by run"});
  logScale.addEventListener("change", draw);
  draw();
}

PAGES.jobs = renderJobs;
PAGES.job = renderJob;
PAGES.data = renderData;
PAGES.compare = renderCompare;
