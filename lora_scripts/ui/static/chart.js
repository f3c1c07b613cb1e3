// A small line chart on a <canvas>: several series, linear or log-10 y axis, ticks and a legend.
// Written here because the UI ships no third-party JavaScript (it works offline, no build step).
"use strict";

const CHART_COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

function niceTicks(min, max, count) {
  if (!(max > min)) { max = min + 1; }
  const raw = (max - min) / count;
  const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) { ticks.push(Number(v.toPrecision(12))); }
  return ticks;
}

function formatTick(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) { return v.toExponential(1); }
  return String(Number(v.toPrecision(4)));
}

// series: [{name, points: [[x, y], ...], color?, dots?}]; options: {logY, xLabel, title}
function drawChart(canvas, series, options) {
  options = options || {};
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600, height = canvas.clientHeight || 260;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif";
  const logY = !!options.logY;
  const usable = series.map((s) => ({...s, points: (s.points || []).filter((p) => isFinite(p[1]) && (!logY || p[1] > 0))}));
  const all = usable.flatMap((s) => s.points);
  canvas.dataset.points = String(all.length);
  canvas.dataset.series = usable.map((s) => s.name + ":" + s.points.length).join(",");
  const left = 56, right = 12, top = options.title ? 22 : 10, bottom = 34;
  ctx.fillStyle = "#111";
  if (options.title) { ctx.fillText(options.title + (logY ? " (log scale)" : ""), left, 14); }
  if (!all.length) {
    ctx.fillStyle = "#888"; ctx.fillText("no data yet", left + 10, top + 20);
    return;
  }
  const ty = (y) => (logY ? Math.log10(y) : y);
  let xMin = Math.min(...all.map((p) => p[0])), xMax = Math.max(...all.map((p) => p[0]));
  let yMin = Math.min(...all.map((p) => ty(p[1]))), yMax = Math.max(...all.map((p) => ty(p[1])));
  if (xMax === xMin) { xMax = xMin + 1; }
  if (yMax === yMin) { yMin -= 0.5; yMax += 0.5; }
  const pad = (yMax - yMin) * 0.05; yMin -= pad; yMax += pad;
  const px = (x) => left + ((x - xMin) / (xMax - xMin)) * (width - left - right);
  const py = (y) => top + (1 - (ty(y) - yMin) / (yMax - yMin)) * (height - top - bottom);
  ctx.strokeStyle = "#e5e7eb"; ctx.fillStyle = "#555"; ctx.lineWidth = 1;
  let yTicks = niceTicks(yMin, yMax, 5);
  if (logY) {  // powers of ten when the range spans two, else round values between
    yTicks = [];
    for (let e = Math.ceil(yMin); e <= Math.floor(yMax); e++) { yTicks.push(Math.pow(10, e)); }
    if (yTicks.length < 2) { yTicks = niceTicks(Math.pow(10, yMin), Math.pow(10, yMax), 4).filter((v) => v > 0); }
  }
  yTicks.filter((v) => ty(v) >= yMin && ty(v) <= yMax).forEach((v) => {
    const y = py(v);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(width - right, y); ctx.stroke();
    ctx.fillText(formatTick(v), 4, y + 4);
  });
  niceTicks(xMin, xMax, 6).filter((v) => v >= xMin && v <= xMax).forEach((v) => {
    const x = px(v);
    ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, height - bottom); ctx.stroke();
    ctx.fillText(formatTick(v), x - 8, height - bottom + 14);
  });
  ctx.fillText(options.xLabel || "step", width - right - 30, height - 4);
  let legendX = left + 60;
  usable.forEach((s, i) => {
    if (!s.points.length) { return; }  // e.g. no validation loss in this run
    const color = s.color || CHART_COLORS[i % CHART_COLORS.length];
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 1.8;
    ctx.beginPath();
    s.points.forEach((p, j) => (j ? ctx.lineTo(px(p[0]), py(p[1])) : ctx.moveTo(px(p[0]), py(p[1]))));
    ctx.stroke();
    if (s.dots || s.points.length === 1) {
      s.points.forEach((p) => { ctx.beginPath(); ctx.arc(px(p[0]), py(p[1]), 3, 0, 2 * Math.PI); ctx.fill(); });
    }
    ctx.fillRect(legendX, height - 12, 10, 3);
    ctx.fillStyle = "#333"; ctx.fillText(s.name, legendX + 14, height - 8);
    legendX += 24 + ctx.measureText(s.name).width;
  });
}
