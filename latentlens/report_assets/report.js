// latentlens report: a patch grid over the image; hover or click a patch to
// see its top-k under the selected method (LatentLens contextual neighbours,
// LogitLens / EmbeddingLens vocabulary tokens). Offline: data and image are
// inline. The URL fragment #patch=IDX&layer=V&method=M selects a view.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("llens-data").textContent);
  var overlay = document.getElementById("overlay");
  var select = document.getElementById("layer");
  var tabs = document.getElementById("methods");
  var panel = document.getElementById("panel");
  var figure = document.getElementById("figure");
  var wordsToggle = document.getElementById("show-words");
  var W = data.image_size[0], H = data.image_size[1];
  var layers = data.layers.map(function (l) { return String(l.visual_layer); });
  var methods = data.methods && data.methods.length ? data.methods : ["latentlens"];
  var names = data.method_names || {};
  var scores = data.scores || {};
  var byLayer = {};
  data.layers.forEach(function (l) { byLayer[String(l.visual_layer)] = l; });
  var state = { layer: layers[0], method: methods[0], pinned: null };
  var cells = {};
  var tabButtons = {};

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  function nameOf(m) { return names[m] || m; }

  // every method's hits as {word, score, ...}: patches of one layer, keyed by patch index
  function patchesOf(layer, method) {
    var l = byLayer[layer];
    if (!l) return {};
    if (method === "latentlens") return l.patches || {};
    return (l.lenses || {})[method] || {};
  }

  function hits(layer, method, idx) { return patchesOf(layer, method)[String(idx)] || []; }

  function score(n) { return n.similarity !== undefined ? n.similarity : n.score; }

  function fmtScore(method, x) {
    if (scores[method] === "probability") {
      return x >= 0.001 || x === 0 ? x.toFixed(3) : x.toExponential(1);
    }
    return x.toFixed(3);
  }

  function scoreLabel(method) { return scores[method] === "probability" ? "probability" : "cos"; }

  layers.forEach(function (v) {
    var o = el("option", null, "visual layer " + v + (v === "0" ? " (projector output)" : ""));
    o.value = v;
    select.appendChild(o);
  });

  methods.forEach(function (m) {
    var b = el("button", "tab", nameOf(m));
    b.type = "button";
    b.setAttribute("role", "tab");
    b.dataset.method = m;
    b.addEventListener("click", function () { state.method = m; writeHash(); render(); });
    tabs.appendChild(b);
    tabButtons[m] = b;
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
    methods.forEach(function (m) {
      var on = m === state.method;
      tabButtons[m].classList.toggle("active", on);
      tabButtons[m].setAttribute("aria-selected", on ? "true" : "false");
    });
    var ns = patchesOf(state.layer, state.method);
    var sims = [];
    Object.keys(ns).forEach(function (k) { if (ns[k].length) sims.push(score(ns[k][0])); });
    var lo = Math.min.apply(null, sims.concat([0])), hi = Math.max.apply(null, sims.concat([1e-9]));
    if (sims.length) lo = Math.min.apply(null, sims);
    Object.keys(cells).forEach(function (idx) {
      var c = cells[idx], list = ns[idx];
      var word = c.querySelector(".word");
      if (list && list.length) {
        c.classList.add("queried"); c.classList.remove("empty");
        word.textContent = list[0].word;
        var a = hi > lo ? (score(list[0]) - lo) / (hi - lo) : 0.5;
        c.style.setProperty("--a", (0.04 + 0.42 * a).toFixed(3));
        c.title = "patch " + idx + ": " + list[0].word + " (" + scoreLabel(state.method) + " " +
          fmtScore(state.method, score(list[0])) + ")";
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
    panel.appendChild(el("h2", null, "Visual layer " + state.layer + " \u2014 " + nameOf(state.method)));
    panel.appendChild(el("p", "hint", state.method === "latentlens"
      ? "Hover over a patch to see its nearest contextual neighbours; click to pin it."
      : "Hover over a patch to see its top vocabulary tokens; click to pin it."));
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

  function describe() {
    if (state.method === "latentlens") {
      return "top " + data.k + " contextual neighbours, searched in text layers " + data.searched_layers.join(", ");
    }
    if (state.method === "logitlens") return "top " + data.k + " next tokens (final norm + LM head), with their probability";
    if (state.method === "embeddinglens") return "top " + data.k + " input-embedding tokens by cosine";
    return "top " + data.k;
  }

  function show(idx) {
    idx = String(idx);
    var c = cells[idx];
    Object.keys(cells).forEach(function (k) { cells[k].classList.toggle("selected", k === idx && state.pinned !== null); });
    panel.innerHTML = "";
    var head = el("h2", null, "Patch " + idx + (c ? " (row " + c.dataset.row + ", col " + c.dataset.col + ")" : ""));
    head.id = "patch-title";
    panel.appendChild(head);
    panel.appendChild(el("p", "hint", "visual layer " + state.layer + " \u2014 " + nameOf(state.method) + ": " + describe()));
    var list = hits(state.layer, state.method, idx);
    if (!list.length) {
      panel.appendChild(el("p", "hint", "This patch was not queried at this layer."));
    } else if (state.method === "latentlens") {
      var ol = el("ol", "neighbours");
      ol.id = "neighbours";
      list.forEach(function (n) {
        var li = el("li", "neighbour");
        li.appendChild(el("span", "nb-word", n.word));
        var ls = n.layers || [n.layer];
        li.appendChild(el("span", "nb-meta", "cos " + n.similarity.toFixed(3) + " \u00b7 text layer" +
          (ls.length > 1 ? "s " : " ") + ls.join(", ")));
        li.appendChild(sentence(n));
        ol.appendChild(li);
      });
      panel.appendChild(ol);
    } else {
      var hl = el("ol", "hits");
      hl.id = "neighbours";
      list.forEach(function (h) {
        var li = el("li", "hit");
        li.appendChild(el("span", "nb-word", h.word));
        li.appendChild(el("span", "nb-meta", scoreLabel(state.method) + " " + fmtScore(state.method, h.score) +
          " \u00b7 token " + JSON.stringify(h.token) + " (id " + h.token_id + ")"));
        hl.appendChild(li);
      });
      panel.appendChild(hl);
    }
    if (methods.length > 1) {
      panel.appendChild(el("h2", null, "Across methods"));
      var tm = el("table", "across");
      tm.id = "across-methods";
      methods.forEach(function (m) {
        var tr = el("tr", m === state.method ? "current" : null);
        tr.appendChild(el("td", null, nameOf(m)));
        var hs = hits(state.layer, m, idx);
        tr.appendChild(el("td", null, hs.slice(0, 3).map(function (n) { return n.word; }).join(", ") || "\u2014"));
        tm.appendChild(tr);
      });
      panel.appendChild(tm);
    }
    if (layers.length > 1) {
      panel.appendChild(el("h2", null, "Across visual layers"));
      var t = el("table", "across");
      layers.forEach(function (v) {
        var tr = el("tr", v === state.layer ? "current" : null);
        tr.appendChild(el("td", null, "layer " + v));
        var ns = hits(v, state.method, idx);
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
    var h = (state.pinned !== null ? "patch=" + state.pinned + "&" : "") + "layer=" + state.layer +
      "&method=" + state.method;
    if (history.replaceState) history.replaceState(null, "", "#" + h); else location.hash = h;
  }

  function readHash() {
    var h = (location.hash || "").replace(/^#/, "");
    h.split("&").forEach(function (kv) {
      var p = kv.split("=");
      var v = decodeURIComponent(p[1] || "");
      if (p[0] === "layer" && layers.indexOf(v) >= 0) state.layer = v;
      if (p[0] === "patch" && cells[v]) state.pinned = v;
      if (p[0] === "method" && methods.indexOf(v.toLowerCase()) >= 0) state.method = v.toLowerCase();
    });
    select.value = state.layer;
  }

  select.addEventListener("change", function () { state.layer = select.value; writeHash(); render(); });
  wordsToggle.addEventListener("change", function () { figure.classList.toggle("hide-words", !wordsToggle.checked); });
  window.addEventListener("hashchange", function () { readHash(); render(); });
  readHash();
  render();
})();
