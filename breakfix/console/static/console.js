// breakfix console (Apache-2.0): live updates over server-sent events, and UTC / local times.
(function () {
  "use strict";
  function refresh(el) {
    if (window.htmx && el.dataset.live) {
      window.htmx.ajax("GET", el.dataset.live, { target: el, swap: "outerHTML", select: "#" + el.id });
    }
  }
  var pending = null;
  function schedule() {
    if (pending) { return; }
    pending = setTimeout(function () {
      pending = null;
      document.querySelectorAll("[data-live]").forEach(refresh);
    }, 250);
  }
  function connect() {
    var live = document.getElementById("live");
    var es = new EventSource("/events");
    es.addEventListener("incident", schedule);
    es.addEventListener("record", schedule);
    es.onopen = function () { if (live) { live.classList.add("on"); } };
    es.onerror = function () { if (live) { live.classList.remove("on"); } };
  }
  var local = false;
  function showTimes() {
    document.querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (isNaN(d)) { return; }
      var utc = d.toISOString().replace("T", " ").slice(0, 19) + "Z";
      t.textContent = local ? d.toLocaleString() : utc;
      t.title = local ? utc : d.toLocaleString() + " (local)";
    });
    var b = document.getElementById("tz");
    if (b) { b.textContent = local ? "times: local" : "times: UTC"; }
  }
  document.addEventListener("DOMContentLoaded", function () {
    connect();
    showTimes();
    var b = document.getElementById("tz");
    if (b) { b.addEventListener("click", function () { local = !local; showTimes(); }); }
    document.body.addEventListener("htmx:afterSettle", showTimes);
  });
})();
