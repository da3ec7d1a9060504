// latentlens web app: forms marked data-async post in the background and show the
// returned HTML fragment; while they wait, /api/status says what the server is busy
// with (a model's first load, a cold scan cache). Report iframes fit their content.
(function () {
  "use strict";
  var busy = document.getElementById("busy");
  var busyMsg = document.getElementById("busy-msg");
  var busyList = document.getElementById("busy-list");
  var poll = null;

  function showStatus(data) {
    busyList.innerHTML = "";
    (data.busy || []).forEach(function (a) {
      var li = document.createElement("li");
      li.textContent = a.what + " (" + Math.round(a.seconds) + " s)";
      busyList.appendChild(li);
    });
  }

  function startBusy(message) {
    busyMsg.textContent = message || "Working\u2026";
    busyList.innerHTML = "";
    busy.hidden = false;
    var tick = function () {
      fetch("/api/status", { headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (d) { if (d && !busy.hidden) showStatus(d); })
        .catch(function () {});
    };
    tick();
    poll = setInterval(tick, 800);
  }

  function stopBusy() {
    if (poll) clearInterval(poll);
    poll = null;
    busy.hidden = true;
  }

  function fitFrame(frame) {
    var fit = function () {
      try {
        var doc = frame.contentDocument;
        if (!doc || !doc.documentElement) return;
        frame.style.height = (doc.documentElement.scrollHeight + 8) + "px";
        if (!frame._observed && window.ResizeObserver && doc.body) {
          new ResizeObserver(function () {
            frame.style.height = (doc.documentElement.scrollHeight + 8) + "px";
          }).observe(doc.body);
          frame._observed = true;
        }
      } catch (e) { /* another origin: keep the CSS height */ }
    };
    frame.addEventListener("load", fit);
    if (frame.contentDocument && frame.contentDocument.readyState === "complete") fit();
  }

  function setup(root) {
    root.querySelectorAll("iframe.report").forEach(fitFrame);
    // the comparison forms load their iframe (target="compare"), shown once asked for; comparing
    // with another model runs it: busy until the frame has loaded
    root.querySelectorAll("form#compare-form, form#compare-model-form").forEach(function (f) {
      f.addEventListener("submit", function () {
        var frame = document.getElementById("compare");
        if (frame) frame.hidden = false;
        if (frame && f.dataset.busy) {
          startBusy(f.dataset.busy);
          frame.addEventListener("load", stopBusy, { once: true });
        }
      });
    });
    root.querySelectorAll("form[data-confirm]").forEach(function (f) {
      f.addEventListener("submit", function (ev) { if (!window.confirm(f.dataset.confirm)) ev.preventDefault(); });
    });
  }

  document.querySelectorAll("form[data-async]").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var target = document.getElementById(form.dataset.target);
      var error = document.getElementById("error");
      var button = form.querySelector("button[type=submit]");
      if (error) { error.hidden = true; error.textContent = ""; }
      if (button) button.disabled = true;
      startBusy(form.dataset.busy);
      fetch(form.action, { method: "POST", body: new FormData(form), headers: { "X-Fragment": "1" } })
        .then(function (resp) {
          if (resp.ok) {
            return resp.text().then(function (html) {
              target.innerHTML = html;
              setup(target);
            });
          }
          var type = resp.headers.get("Content-Type") || "";
          var read = type.indexOf("json") >= 0 ? resp.json().then(function (d) { return d.error; }) : resp.text();
          return read.then(function (msg) { throw new Error(msg || resp.status + " " + resp.statusText); });
        })
        .catch(function (e) {
          if (error) { error.textContent = e.message || String(e); error.hidden = false; }
        })
        .finally(function () {
          stopBusy();
          if (button) button.disabled = false;
        });
    });
  });

  // the stored layers of the chosen model as the layer fields' placeholder
  var model = document.getElementById("model");
  if (model) {
    var update = function () {
      var opt = model.options[model.selectedIndex];
      document.querySelectorAll("input.layers").forEach(function (i) {
        i.placeholder = opt && opt.dataset.layers ? "stored: " + opt.dataset.layers : "stored";
      });
    };
    model.addEventListener("change", update);
    update();
  }

  // /analyses/ID#patch=3&layer=8 opens that view of the grid
  var report = document.getElementById("report");
  if (report && location.hash && report.getAttribute("src")) {
    report.src = report.getAttribute("src").split("#")[0] + location.hash;
  }
  setup(document);
})();
