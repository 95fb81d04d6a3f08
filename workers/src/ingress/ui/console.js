// Longshore console: the live-refresh pause button and "select all" for dead letters.
// No inline scripts (the pages' Content-Security-Policy allows only this file and htmx).
(function () {
  window.lsLive = sessionStorage.getItem("lsLive") !== "off";
  function label(b) { b.textContent = window.lsLive ? "Pause refresh" : "Resume refresh"; }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live-toggle]").forEach(function (b) {
      label(b);
      b.addEventListener("click", function () {
        window.lsLive = !window.lsLive;
        sessionStorage.setItem("lsLive", window.lsLive ? "on" : "off");
        label(b);
      });
    });
    document.querySelectorAll("[data-select-all]").forEach(function (box) {
      box.addEventListener("change", function () {
        document.querySelectorAll("input[name=ids]").forEach(function (c) { c.checked = box.checked; });
      });
    });
    // Paused: htmx's polls are dropped before they are sent.
    document.body.addEventListener("htmx:beforeRequest", function (e) {
      if (!window.lsLive && e.detail && e.detail.requestConfig && e.detail.requestConfig.verb === "get") {
        e.preventDefault();
      }
    });
    document.querySelectorAll("form[data-confirm]").forEach(function (f) {
      f.addEventListener("submit", function (e) {
        if (!window.confirm(f.getAttribute("data-confirm"))) { e.preventDefault(); }
      });
    });
  });
})();
