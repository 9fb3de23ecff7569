// imagegen dashboard: live updates, copy buttons, confirmations, select-all, relative times.
// Loaded from this server only (the CSP allows no inline script); every handler is delegated.
(function () {
  "use strict";
  var body = document.body;
  var pollMs = parseInt(body.getAttribute("data-poll") || "4000", 10);
  var paused = false;

  function fragment(html) {
    var t = document.createElement("template");
    t.innerHTML = html;
    return t.content;
  }

  function relative(iso) {
    var s = Math.round((Date.now() - Date.parse(iso)) / 1000);
    var future = s < 0;
    s = Math.abs(s);
    if (s < 5) return "just now";
    var a = s < 60 ? s + " s" : s < 3600 ? Math.floor(s / 60) + " min" : s < 86400 ? Math.floor(s / 3600) + " h" : Math.floor(s / 86400) + " d";
    return future ? "in " + a : a + " ago";
  }

  function refreshTimes() {
    document.querySelectorAll("time[datetime]").forEach(function (el) {
      el.textContent = relative(el.getAttribute("datetime"));
    });
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); });
  }

  function pollRegion(el) {
    return getJSON(el.getAttribute("data-live")).then(function (j) {
      el.replaceChildren(fragment(j.html));
    });
  }

  function pollGallery(el) {
    var ids = [];
    el.querySelectorAll('.tile[data-settled="false"]').forEach(function (t) { ids.push(t.getAttribute("data-id")); });
    var url = el.getAttribute("data-live-batch") + "?ids=" + ids.join(",");
    return getJSON(url).then(function (j) {
      var head = document.getElementById("batch-head");
      if (head && j.head) head.replaceChildren(fragment(j.head));
      Object.keys(j.tiles || {}).forEach(function (id) {
        var old = document.getElementById("tile-" + id);
        if (old) old.replaceWith(fragment(j.tiles[id]));
      });
    });
  }

  var live = document.querySelectorAll("[data-live], [data-live-batch]");
  var toggle = document.querySelector(".live-toggle");
  if (live.length && toggle) {
    toggle.hidden = false;
    toggle.addEventListener("click", function () {
      paused = !paused;
      toggle.setAttribute("aria-pressed", paused ? "false" : "true");
      toggle.textContent = paused ? "Paused" : "Live";
    });
  }

  function tick() {
    // Like Oban Web: no polling while the tab is hidden or the user paused it.
    if (paused || document.hidden) return Promise.resolve();
    var jobs = [];
    live.forEach(function (el) {
      jobs.push((el.hasAttribute("data-live") ? pollRegion(el) : pollGallery(el)).catch(function () {}));
    });
    return Promise.all(jobs);
  }

  // With the event stream, a finished job triggers a refresh at once and polling slows to a
  // fallback (for changes that are no event, such as a job starting). Without it (an old
  // browser, or the stream failing), polling alone keeps the page current.
  var streamUp = false;
  var soon = null;
  function refreshSoon() {
    if (soon) return;
    soon = setTimeout(function () { soon = null; tick(); }, 250);
  }
  var withEvents = document.querySelector("[data-events]");
  if (withEvents && window.EventSource) {
    var es = new EventSource(withEvents.getAttribute("data-events"));
    es.addEventListener("open", function () { streamUp = true; });
    es.addEventListener("job_finished", refreshSoon);
    es.addEventListener("error", function () { streamUp = false; });
  }

  function loop() {
    tick().then(function () {
      refreshTimes();
      setTimeout(loop, streamUp ? pollMs * 4 : pollMs);
    });
  }
  if (live.length) setTimeout(loop, pollMs);
  setInterval(refreshTimes, 30000);

  document.addEventListener("click", function (e) {
    var b = e.target.closest("button.copy");
    if (!b) return;
    var text = b.getAttribute("data-copy") || "";
    var done = function () { b.textContent = "Copied"; setTimeout(function () { b.textContent = "Copy"; }, 1500); };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () {});
    } else {
      var ta = document.createElement("textarea");
      ta.value = text; document.body.appendChild(ta); ta.select();
      try { document.execCommand("copy"); done(); } catch (err) { /* nothing to do */ }
      ta.remove();
    }
  });

  document.addEventListener("submit", function (e) {
    var msg = (e.submitter && e.submitter.getAttribute("data-confirm")) || e.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) e.preventDefault();
  });

  document.addEventListener("change", function (e) {
    if (!e.target.matches("[data-select-all]")) return;
    var form = e.target.closest("form");
    form.querySelectorAll('input[name="id"]').forEach(function (c) { c.checked = e.target.checked; });
  });
})();
