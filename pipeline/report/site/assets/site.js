/* Neuron Warehouse site: zoomable figures, search, the layered graph. No network access:
   data comes from <script type="application/json"> blocks and data/search.js. */
(function () {
  "use strict";

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  var SVG = "http://www.w3.org/2000/svg";
  function svgEl(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }
  function zoomOf(target, wheelNeedsShift) {
    if (typeof window.panzoom !== "function") { return null; }
    return window.panzoom(target, {
      maxZoom: 40, minZoom: 0.5, smoothScroll: false, zoomDoubleClickSpeed: 2,
      // a page scrolls over a figure unless Shift is held; the graph zooms on the wheel
      beforeWheel: function (e) { return wheelNeedsShift && !e.shiftKey; }
    });
  }

  /* figures: drag to pan, Shift + wheel or double-click to zoom */
  function zoomableFigures() {
    var boxes = document.querySelectorAll(".zoom");
    Array.prototype.forEach.call(boxes, function (box) {
      var target = box.firstElementChild;
      if (!target) { return; }
      var pz = zoomOf(target, true);
      if (!pz) { return; }
      var reset = el("button", { type: "button", "class": "reset" }, "reset zoom");
      reset.addEventListener("click", function () { pz.moveTo(0, 0); pz.zoomAbs(0, 0, 1); });
      box.parentNode.insertBefore(reset, box);
    });
  }

  /* search by neuron (layer/neuron) or by token */
  function parseNeuron(text) {
    var m = /^\s*L?(\d+)\s*[\/:,. N]\s*N?(\d+)\s*$/i.exec(text);
    return m ? [parseInt(m[1], 10), parseInt(m[2], 10)] : null;
  }
  function visible(token) {
    return token.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }
  function initSearch() {
    var data = window.NWH_SEARCH;
    var form = document.getElementById("search-form");
    if (!form || !data) { return; }
    var runSel = document.getElementById("search-run");
    var neuronIn = document.getElementById("search-neuron");
    var tokenIn = document.getElementById("search-token");
    var out = document.getElementById("search-results");
    function runs() {
      return runSel.value ? [runSel.value] : Object.keys(data.runs);
    }
    function show(items, empty) {
      out.textContent = "";
      if (!items.length) { out.appendChild(el("p", { "class": "hint" }, empty)); return; }
      var ul = el("ul");
      items.slice(0, 200).forEach(function (li) { ul.appendChild(li); });
      out.appendChild(ul);
    }
    function neuronItem(run, layer, neuron, extra) {
      var li = el("li", { "class": "hit", "data-run": run, "data-layer": layer, "data-neuron": neuron });
      var href = data.runs[run].pages[layer + "/" + neuron];
      var label = run + ": L" + layer + "/" + neuron;
      if (href) {
        li.appendChild(el("a", { href: href }, label));
      } else {
        li.appendChild(el("span", {}, label + " (no page yet: "));
        li.appendChild(el("code", {}, "nwh site --neuron " + run + ":" + layer + "/" + neuron));
        li.appendChild(document.createTextNode(")"));
      }
      if (extra) { li.appendChild(document.createTextNode(" " + extra)); }
      return li;
    }
    function byNeuron() {
      var ln = parseNeuron(neuronIn.value);
      if (!ln) { show([], "write layer/neuron, e.g. 2/17"); return; }
      var items = [];
      runs().forEach(function (run) {
        var width = data.runs[run].widths[String(ln[0])];
        if (width === undefined) { return; }
        if (ln[1] >= width) {
          items.push(el("li", {}, run + ": layer " + ln[0] + " has neurons 0-" + (width - 1)));
          return;
        }
        items.push(neuronItem(run, ln[0], ln[1]));
      });
      show(items, "no run records layer " + ln[0]);
    }
    function byToken() {
      var q = tokenIn.value;
      if (!q.trim()) { out.textContent = ""; return; }
      var qt = q.trim().toLowerCase();
      var items = [];
      runs().forEach(function (run) {
        var tokens = data.tokens[run] || {};
        var keys = Object.keys(tokens).filter(function (t) {
          return t === q || t.trim().toLowerCase() === qt;
        });
        if (!keys.length) {
          keys = Object.keys(tokens).filter(function (t) {
            return t.toLowerCase().indexOf(qt) >= 0;
          }).slice(0, 5);
        }
        keys.forEach(function (t) {
          tokens[t].forEach(function (e) {
            items.push(neuronItem(run, e[0], e[1], "fires on \u201c" + visible(t) + "\u201d in " +
              e[4] + " of " + e[5] + " rows (" + (100 * e[2]).toFixed(1) + "% vs " +
              (100 * e[3]).toFixed(1) + "% overall)"));
          });
        });
      });
      show(items, "no indexed token matches \u201c" + q + "\u201d (only each run's most frequent tokens are indexed)");
    }
    neuronIn.addEventListener("input", function () { tokenIn.value = ""; byNeuron(); });
    tokenIn.addEventListener("input", function () { neuronIn.value = ""; byToken(); });
    runSel.addEventListener("change", function () {
      if (neuronIn.value) { byNeuron(); } else if (tokenIn.value) { byToken(); }
    });
    var hash = /[#&]q=([^&]*)/.exec(window.location.hash);
    if (hash) { tokenIn.value = decodeURIComponent(hash[1]); byToken(); }
  }

  /* the layered graph of a token row */
  function initGraph() {
    var blob = document.getElementById("graph-data");
    var box = document.getElementById("graph");
    if (!blob || !box) { return; }
    var data = JSON.parse(blob.textContent);
    var select = document.getElementById("graph-row");
    var pz = null;
    function draw(k) {
      var g = data.graphs[k];
      box.textContent = "";
      var boxW = box.clientWidth || 1200, boxH = box.clientHeight || 700;
      var span = Math.max(g.layers.length - 1, 1), left = 70;
      // columns at least 140 units apart, the drawing as tall as the box's shape allows, and
      // text and dots scaled so they read at the size shown (zoom in on a 30-layer model)
      var colGap = Math.max(140, (boxW * 900 / boxH - 2 * left) / span);
      var width = left * 2 + colGap * span;
      var unit = Math.max(1, width / boxW);
      var top = 30 * unit;
      var height = Math.max(900, width * boxH / boxW) - top - 20 * unit;
      var svg = svgEl("svg", { viewBox: "0 0 " + width + " " + (height + top + 20 * unit),
                               preserveAspectRatio: "xMidYMid meet" });
      var view = svgEl("g", {});
      svg.appendChild(view);
      var pos = {};
      g.layers.forEach(function (layer, i) {
        var x = left + i * colGap;
        var label = svgEl("text", { x: x, y: 20 * unit, "text-anchor": "middle", "class": "layer-label",
                                    "font-size": (13 * unit).toFixed(1) });
        var counts = layer.nodes.length + "/" + layer.width + " active";
        // many layers: short labels, the counts in the tooltip
        label.textContent = g.layers.length > 8 ? "L" + layer.layer
                                                : "layer " + layer.layer + " (" + counts + ")";
        var tip = svgEl("title", {});
        tip.textContent = "layer " + layer.layer + ": " + counts;
        label.appendChild(tip);
        view.appendChild(label);
        view.appendChild(svgEl("line", { x1: x, x2: x, y1: top, y2: top + height, stroke: "#d9dee4",
                                         "stroke-width": 1, "vector-effect": "non-scaling-stroke" }));
        var vmax = 0;
        layer.nodes.forEach(function (n) { vmax = Math.max(vmax, Math.abs(n[1])); });
        layer.nodes.forEach(function (n) {
          pos[layer.layer + "/" + n[0]] = [x, top + height * (n[0] + 0.5) / layer.width];
        });
        layer._vmax = vmax || 1;
      });
      // line strength relative to the edges drawn: the weakest shown is faint, the strongest dark
      var wmax = 0, wmin = Infinity;
      g.edges.forEach(function (e) { wmax = Math.max(wmax, e[4]); wmin = Math.min(wmin, e[4]); });
      var wspan = wmax - wmin > 1e-12 ? wmax - wmin : 1;
      var edges = svgEl("g", {});
      view.appendChild(edges);
      g.edges.slice().reverse().forEach(function (e) {
        var a = pos[e[0] + "/" + e[1]], b = pos[e[2] + "/" + e[3]];
        if (!a || !b) { return; }
        var s = (e[4] - wmin) / wspan;
        var line = svgEl("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], "class": "edge",
                                   "stroke-opacity": (0.06 + 0.8 * s * s).toFixed(3),
                                   "stroke-width": (0.4 + 1.8 * s).toFixed(2),
                                   "vector-effect": "non-scaling-stroke" });
        var t = svgEl("title", {});
        t.textContent = "L" + e[0] + "/" + e[1] + " \u2013 L" + e[2] + "/" + e[3] + ": Jaccard " +
          e[4].toFixed(3) + ", " + e[5] + " rows together";
        line.appendChild(t);
        edges.appendChild(line);
      });
      g.layers.forEach(function (layer) {
        layer.nodes.forEach(function (n) {
          var key = layer.layer + "/" + n[0];
          var p = pos[key];
          var s = Math.min(1, Math.abs(n[1]) / layer._vmax);
          var href = data.pages[key];
          var c = svgEl("circle", { cx: p[0], cy: p[1], r: ((href ? 4 : 2.6) * Math.sqrt(unit)).toFixed(2),
                                    "class": href ? "node page" : "node",
                                    fill: "rgb(" + Math.round(235 * s + 20) + "," +
                                      Math.round(110 * s + 60) + "," + Math.round(160 - 140 * s) + ")" });
          var t = svgEl("title", {});
          t.textContent = "L" + key + ": " + n[1] + (href ? " (click: its page)" : "");
          c.appendChild(t);
          if (href) { c.addEventListener("click", function () { window.location.href = href; }); }
          view.appendChild(c);
        });
      });
      box.appendChild(svg);
      if (pz) { pz.dispose(); }
      pz = zoomOf(view, false);
      var list = document.getElementById("graph-edges");
      if (list) {
        list.textContent = "";
        list.appendChild(el("h2", {}, "Strongest edges of row " + g.row + " (token \u201c" + visible(g.token) + "\u201d)"));
        var tbl = el("table", { "class": "graph-edges" });
        var head = el("tr");
        ["from", "to", "Jaccard", "rows together"].forEach(function (h) { head.appendChild(el("th", {}, h)); });
        tbl.appendChild(head);
        g.edges.slice(0, 25).forEach(function (e) {
          var tr = el("tr");
          [[e[0], e[1]], [e[2], e[3]]].forEach(function (ln) {
            var td = el("td");
            var href = data.pages[ln[0] + "/" + ln[1]];
            td.appendChild(href ? el("a", { href: href }, "L" + ln[0] + "/" + ln[1])
                                : el("span", {}, "L" + ln[0] + "/" + ln[1]));
            tr.appendChild(td);
          });
          tr.appendChild(el("td", { "class": "num" }, e[4].toFixed(3)));
          tr.appendChild(el("td", { "class": "num" }, String(e[5])));
          tbl.appendChild(tr);
        });
        list.appendChild(tbl);
      }
    }
    if (select) { select.addEventListener("change", function () { draw(parseInt(select.value, 10)); }); }
    var reset = document.getElementById("graph-reset");
    if (reset) { reset.addEventListener("click", function () { draw(select ? parseInt(select.value, 10) : 0); }); }
    if (data.graphs.length) { draw(0); } else { box.textContent = "no token row to draw"; }
  }

  document.addEventListener("DOMContentLoaded", function () {
    zoomableFigures();
    initSearch();
    initGraph();
  });
})();
