// latentlens comparison: view A's patch grid over the image, each cell shaded by how many of its
// top-k words view B shares; hover or click a patch for the two lists side by side (#patch=IDX).
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("llens-data").textContent);
  var overlay = document.getElementById("overlay");
  var panel = document.getElementById("panel");
  var W = data.image_size[0], H = data.image_size[1];
  var cells = {}, byIdx = {}, pinned = null;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  function norm(w) { return w.split(/\s+/).filter(Boolean).join(" ").toLowerCase(); }

  data.patches.forEach(function (p) {
    byIdx[String(p.patch_idx)] = p;
    var b = p.box;
    if (!(b[2] > b[0] && b[3] > b[1])) return;
    var c = el("div", "cell cmp queried");
    c.style.left = (100 * b[0] / W) + "%";
    c.style.top = (100 * b[1] / H) + "%";
    c.style.width = (100 * (b[2] - b[0]) / W) + "%";
    c.style.height = (100 * (b[3] - b[1]) / H) + "%";
    c.style.setProperty("--a", (0.05 + 0.55 * p.overlap / Math.max(1, data.k)).toFixed(3));
    c.dataset.idx = p.patch_idx;
    c.title = "patch " + p.patch_idx + ": " + p.overlap + " of " + data.k + " shared";
    c.appendChild(el("span", "word", p.overlap + "/" + data.k));
    c.addEventListener("mouseenter", function () { if (pinned === null) show(p.patch_idx); });
    c.addEventListener("click", function () {
      pinned = pinned === String(p.patch_idx) ? null : String(p.patch_idx);
      if (history.replaceState) history.replaceState(null, "", pinned === null ? "#" : "#patch=" + pinned);
      if (pinned === null) hint(); else show(pinned);
    });
    overlay.appendChild(c);
    cells[String(p.patch_idx)] = c;
  });

  function list(title, cls, hits, shared) {
    var d = el("div", cls);
    d.appendChild(el("h3", null, title));
    var ol = el("ol");
    hits.forEach(function (h) {
      var li = el("li", shared.indexOf(norm(h.word)) >= 0 ? "shared" : null);
      li.appendChild(el("span", "nb-word", h.word));
      var meta = h.score.toFixed(3) + (h.layers ? " \u00b7 L" + h.layers.join(",") : "");
      li.appendChild(el("span", "nb-meta", meta));
      ol.appendChild(li);
    });
    if (!hits.length) d.appendChild(el("p", "hint", "not queried"));
    d.appendChild(ol);
    return d;
  }

  function hint() {
    Object.keys(cells).forEach(function (k) { cells[k].classList.remove("selected"); });
    panel.innerHTML = "";
    panel.appendChild(el("h2", null, "A vs B"));
    panel.appendChild(el("p", "hint", "Hover over a patch to compare its two top-" + data.k + " lists; click to pin it."));
  }

  function show(idx) {
    idx = String(idx);
    var p = byIdx[idx];
    Object.keys(cells).forEach(function (k) { cells[k].classList.toggle("selected", k === idx && pinned !== null); });
    panel.innerHTML = "";
    var head = el("h2", null, "Patch " + idx + " (row " + p.row + ", col " + p.col + ")");
    head.id = "patch-title";
    panel.appendChild(head);
    panel.appendChild(el("p", "hint", p.overlap + " of " + data.k + " words shared" +
      (p.shared.length ? ": " + p.shared.join(", ") : "") +
      (p.right_patch !== null && String(p.right_patch) !== idx ? " (B: its patch " + p.right_patch + ")" : "")));
    var cols = el("div", "cols2");
    cols.id = "lists";
    cols.appendChild(list("A: " + data.left, "list-a", p.left, p.shared));
    cols.appendChild(list("B: " + data.right, "list-b", p.right, p.shared));
    panel.appendChild(cols);
  }

  var m = /patch=(\d+)/.exec(location.hash || "");
  if (m && byIdx[m[1]]) { pinned = m[1]; show(pinned); } else hint();
})();
