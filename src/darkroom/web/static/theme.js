// Runs before the page paints: the theme the user chose last (else the system's), so the page never flashes.
(function () {
  var chosen = null;
  try { chosen = localStorage.getItem("darkroom-theme"); } catch (e) { /* storage blocked: follow the system */ }
  if (chosen === "dark" || chosen === "light") { document.documentElement.dataset.theme = chosen; }
})();
