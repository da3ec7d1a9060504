// latentlens report: a patch grid over the image; hover or click a patch to
// see its nearest contextual neighbours. Offline: data and image are inline.
// The URL fragment #patch=IDX&layer=V selects a patch and visual layer.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("llens-data").textContent);
  var overlay = document.getElementById("overlay");
  var select = document.getElementById("layer");
  var panel = document.getElementById("panel");
  var figure = document.getElementById("figure");
  var wordsToggle = document.getElementById("show-words");
  var W = data.image_size[0], H = data.image_size[1];
  var layers = data.layers.map(function (l) { return String(l.visual_layer); });
  var byLayer = {};
  data.layers.forEach(function (l) { byLayer[String(l.visual_layer)] = l.patches; });
  var state = { layer: layers[0], pinned: null };
  var cells = {};

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  layers.forEach(function (v) {
    var o = el("option", null, "visual layer " + v + (v === "0" ? " (projector output)" : ""));
    o.value = v;
    select.appendChild(o);
  });

  data.grid_patches.forEach(function (p) {
    var idx = p[0], x0 = p[3], y0 = p[4], x1 = p[5], y1 = p[6];
    if (!(x1 > x0 && y1 > y0)) return; // sees only padding
    var c = el("div", "cell");
    c.style.left = (100 * x0 / W) + "%";
    c.style.top = (100 * y0 / H) + "%";
    c.style.width = (100 * (x1 - x0) / W) + "%";
    c.style.height = (100 * (y1 - y0) / H) + "%";
    c.dataset.idx = idx;
    c.dataset.row = p[1];
    c.dataset.col = p[2];
    c.appendChild(el("span", "word"));
    c.addEventListener("mouseenter", function () { if (state.pinned === null) show(idx); });
    c.addEventListener("click", function () { pin(idx); });
    overlay.appendChild(c);
    cells[idx] = c;
  });
  overlay.addEventListener("mouseleave", function () {
    if (state.pinned === null) showHint();
  });

  function render() {
    var ns = byLayer[state.layer] || {};
    var sims = [];
    Object.keys(ns).forEach(function (k) { if (ns[k].length) sims.push(ns[k][0].similarity); });
    var lo = Math.min.apply(null, sims.concat([0])), hi = Math.max.apply(null, sims.concat([1e-9]));
    if (sims.length) lo = Math.min.apply(null, sims);
    Object.keys(cells).forEach(function (idx) {
      var c = cells[idx], list = ns[idx];
      var word = c.querySelector(".word");
      if (list && list.length) {
        c.classList.add("queried"); c.classList.remove("empty");
        word.textContent = list[0].word;
        var a = hi > lo ? (list[0].similarity - lo) / (hi - lo) : 0.5;
        c.style.setProperty("--a", (0.04 + 0.42 * a).toFixed(3));
        c.title = "patch " + idx + ": " + list[0].word + " (" + list[0].similarity.toFixed(3) + ")";
      } else {
        c.classList.remove("queried"); c.classList.add("empty");
        word.textContent = "";
        c.title = "patch " + idx + " (not queried)";
      }
    });
    if (state.pinned !== null) show(state.pinned); else showHint();
  }

  function showHint() {
    panel.innerHTML = "";
    panel.appendChild(el("h2", null, "Visual layer " + state.layer));
    panel.appendChild(el("p", "hint", "Hover over a patch to see its nearest contextual neighbours; click to pin it."));
  }

  function sentence(n) {
    var p = el("p", "nb-sentence");
    var s = data.sentences[n.s] || "", a = n.char_start, b = n.char_end;
    if (a === null || b === null || a === undefined || b === undefined || b <= a) {
      p.textContent = s;
      return p;
    }
    p.appendChild(document.createTextNode(s.slice(0, a)));
    p.appendChild(el("mark", null, s.slice(a, b)));
    p.appendChild(document.createTextNode(s.slice(b)));
    return p;
  }

  function show(idx) {
    idx = String(idx);
    var c = cells[idx];
    Object.keys(cells).forEach(function (k) { cells[k].classList.toggle("selected", k === idx && state.pinned !== null); });
    panel.innerHTML = "";
    var head = el("h2", null, "Patch " + idx + (c ? " (row " + c.dataset.row + ", col " + c.dataset.col + ")" : ""));
    head.id = "patch-title";
    panel.appendChild(head);
    panel.appendChild(el("p", "hint", "visual layer " + state.layer + " \u2014 top " + data.k + " neighbours, searched in text layers " + data.searched_layers.join(", ")));
    var list = (byLayer[state.layer] || {})[idx];
    if (!list || !list.length) {
      panel.appendChild(el("p", "hint", "This patch was not queried at this layer."));
    } else {
      var ol = el("ol", "neighbours");
      ol.id = "neighbours";
      list.forEach(function (n) {
        var li = el("li", "neighbour");
        li.appendChild(el("span", "nb-word", n.word));
        li.appendChild(el("span", "nb-meta", "cos " + n.similarity.toFixed(3) + " \u00b7 text layer " + n.layer));
        li.appendChild(sentence(n));
        ol.appendChild(li);
      });
      panel.appendChild(ol);
    }
    if (layers.length > 1) {
      panel.appendChild(el("h2", null, "Across visual layers"));
      var t = el("table", "across");
      layers.forEach(function (v) {
        var tr = el("tr", v === state.layer ? "current" : null);
        tr.appendChild(el("td", null, "layer " + v));
        var ns = (byLayer[v] || {})[idx] || [];
        tr.appendChild(el("td", null, ns.slice(0, 3).map(function (n) { return n.word; }).join(", ") || "\u2014"));
        t.appendChild(tr);
      });
      panel.appendChild(t);
    }
  }

  function pin(idx) {
    state.pinned = state.pinned === String(idx) ? null : String(idx);
    writeHash();
    render();
  }

  function writeHash() {
    var h = "layer=" + state.layer + (state.pinned !== null ? "&patch=" + state.pinned : "");
    if (history.replaceState) history.replaceState(null, "", "#" + h); else location.hash = h;
  }

  function readHash() {
    var h = (location.hash || "").replace(/^#/, "");
    h.split("&").forEach(function (kv) {
      var p = kv.split("=");
      if (p[0] === "layer" && layers.indexOf(p[1]) >= 0) state.layer = p[1];
      if (p[0] === "patch" && cells[p[1]]) state.pinned = p[1];
    });
    select.value = state.layer;
  }

  select.addEventListener("change", function () { state.layer = select.value; writeHash(); render(); });
  wordsToggle.addEventListener("change", function () { figure.classList.toggle("hide-words", !wordsToggle.checked); });
  window.addEventListener("hashchange", function () { readHash(); render(); });
  readHash();
  render();
})();
