// darkroom's UI: the few things plain HTML and htmx do not do. No framework, no build step.
"use strict";

function setupTheme() {
  var button = document.getElementById("theme-toggle");
  if (!button) return;
  button.addEventListener("click", function () {
    var root = document.documentElement;
    var dark = root.dataset.theme ? root.dataset.theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
    root.dataset.theme = dark ? "light" : "dark";
    try { localStorage.setItem("darkroom-theme", root.dataset.theme); } catch (e) { /* not kept */ }
  });
}

var TERMINAL = ["succeeded", "failed", "cancelled", "dead"];

// The job page: follow the job's events (SSE) for progress and previews; when it ends, load its results.
function setupLive() {
  var live = document.getElementById("live");
  if (!live) return;
  var job = live.dataset.job;
  if (TERMINAL.indexOf(live.dataset.state) >= 0) { live.hidden = true; return; }
  var bar = document.getElementById("progress");
  var text = document.getElementById("progress-text");
  var preview = document.getElementById("preview-image");
  var stream = new EventSource("/ui/jobs/" + encodeURIComponent(job) + "/events");
  stream.addEventListener("progress", function (e) {
    var data = JSON.parse(e.data);
    if (data.total) { bar.max = data.total; }
    bar.value = data.step;
    text.textContent = data.step + " / " + (data.total || "?");
    if (data.preview) { preview.src = data.preview; preview.hidden = false; }
  });
  function refresh() {
    if (window.htmx) { htmx.ajax("GET", "/ui/jobs/" + encodeURIComponent(job) + "/result", { target: "#result", swap: "innerHTML" }); }
  }
  ["started", "requeued", "retrying"].forEach(function (type) { stream.addEventListener(type, refresh); });
  TERMINAL.forEach(function (type) {
    stream.addEventListener(type, function () {
      stream.close();
      if (type === "succeeded") { bar.value = bar.max; }
      live.dataset.state = type;
      refresh();
    });
  });
}

// A small mask painter: white strokes on a black mask the size of the canvas, shown as a red overlay on the source.
function setupPainter() {
  var input = document.getElementById("init_image");
  var painter = document.getElementById("painter");
  if (!input || !painter) return;
  var canvas = document.getElementById("mask-canvas");
  var ctx = canvas.getContext("2d");
  var mask = document.createElement("canvas");
  var mctx = mask.getContext("2d");
  var source = new Image();
  var painted = false;
  var drawing = false;
  function redraw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (source.src) { ctx.drawImage(source, 0, 0, canvas.width, canvas.height); }
    ctx.globalAlpha = 0.5;
    ctx.drawImage(mask, 0, 0);
    ctx.globalAlpha = 1;
  }
  function reset() {
    mctx.fillStyle = "#000";
    mctx.fillRect(0, 0, mask.width, mask.height);
    painted = false;
    redraw();
  }
  input.addEventListener("change", function () {
    var file = input.files && input.files[0];
    if (!file) { painter.hidden = true; return; }
    source.onload = function () {
      var scale = Math.min(1, 512 / Math.max(source.width, source.height));
      canvas.width = mask.width = Math.round(source.width * scale);
      canvas.height = mask.height = Math.round(source.height * scale);
      painter.hidden = false;
      reset();
    };
    source.src = URL.createObjectURL(file);
  });
  function at(e) {
    var r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  }
  function stroke(e) {
    if (!drawing) return;
    var p = at(e);
    var size = +document.getElementById("brush").value;
    mctx.fillStyle = "#fff";
    mctx.beginPath();
    mctx.arc(p[0], p[1], size / 2, 0, Math.PI * 2);
    mctx.fill();
    painted = true;
    redraw();
  }
  canvas.addEventListener("pointerdown", function (e) { drawing = true; canvas.setPointerCapture(e.pointerId); stroke(e); });
  canvas.addEventListener("pointermove", stroke);
  canvas.addEventListener("pointerup", function () { drawing = false; });
  document.getElementById("mask-clear").addEventListener("click", reset);
  document.getElementById("generate-form").addEventListener("submit", function () {
    document.getElementById("mask_image").value = painted ? mask.toDataURL("image/png") : "";
  });
}

document.addEventListener("DOMContentLoaded", function () {
  setupTheme();
  setupLive();
  setupPainter();
});
