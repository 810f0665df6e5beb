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
// It works by pointer and by keyboard: with the canvas focused, arrow keys move a brush cursor (Shift: further), Space
// paints at it (held while moving: a stroke), + and - change the brush size; a live region says where the brush is.
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
  var brush = document.getElementById("brush");
  var status = document.getElementById("painter-status");
  var cursor = null; // [x, y] of the keyboard's brush, shown while the canvas has focus
  var keyPainting = false;
  function redraw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (source.src) { ctx.drawImage(source, 0, 0, canvas.width, canvas.height); }
    ctx.globalAlpha = 0.5;
    ctx.drawImage(mask, 0, 0);
    ctx.globalAlpha = 1;
    if (cursor && document.activeElement === canvas) {
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#0b5cad";
      ctx.beginPath();
      ctx.arc(cursor[0], cursor[1], +brush.value / 2, 0, Math.PI * 2);
      ctx.stroke();
    }
  }
  function paintAt(p) {
    mctx.fillStyle = "#fff";
    mctx.beginPath();
    mctx.arc(p[0], p[1], +brush.value / 2, 0, Math.PI * 2);
    mctx.fill();
    painted = true;
  }
  function announce() {
    status.textContent = "Brush at " + Math.round(cursor[0]) + ", " + Math.round(cursor[1]) + " of " +
      canvas.width + " by " + canvas.height + ", size " + brush.value + (painted ? "; mask painted" : "");
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
    paintAt(at(e));
    redraw();
  }
  var MOVES = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  function key(e) {
    if (!cursor) cursor = [canvas.width / 2, canvas.height / 2];
    var move = MOVES[e.key];
    if (move) {
      var step = e.shiftKey ? 32 : 8;
      cursor = [Math.min(canvas.width, Math.max(0, cursor[0] + move[0] * step)),
                Math.min(canvas.height, Math.max(0, cursor[1] + move[1] * step))];
      if (keyPainting) paintAt(cursor);
    } else if (e.key === " " || e.key === "Spacebar") {
      keyPainting = true;
      paintAt(cursor);
    } else if (e.key === "+" || e.key === "=" || e.key === "-") {
      var size = +brush.value + (e.key === "-" ? -4 : 4);
      brush.value = String(Math.min(+brush.max, Math.max(+brush.min, size)));
    } else {
      return; // Tab and every other key keep their usual meaning
    }
    e.preventDefault();
    announce();
    redraw();
  }
  canvas.addEventListener("keydown", key);
  canvas.addEventListener("keyup", function (e) { if (e.key === " " || e.key === "Spacebar") keyPainting = false; });
  canvas.addEventListener("focus", function () {
    if (!cursor) cursor = [canvas.width / 2, canvas.height / 2];
    announce();
    redraw();
  });
  canvas.addEventListener("blur", function () { keyPainting = false; redraw(); });
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
