// Draws every `.chart` on the page with uPlot, from the JSON its `.charts` container names.
// No inline script anywhere (the Content-Security-Policy forbids it): this file finds its
// work through data- attributes. The plots are kept in window.bastionCharts, by metric, so
// tests (and curious operators) can read what was drawn.
(function () {
  "use strict";
  var COLOURS = ["#2f5fb3", "#c0572b", "#2d7a3a", "#8a3ea8", "#a8902d", "#2b8f9c"];
  window.bastionCharts = {};

  function draw(el, title, x, series, names, extra) {
    var opts = Object.assign({
      width: Math.max(320, el.clientWidth || 500), height: 220,
      series: [{}].concat(names.map(function (n, i) {
        return { label: n, stroke: COLOURS[i % COLOURS.length], width: 2, spanGaps: false,
                 points: { show: true, size: 5 } };
      })),
      axes: [{}, { size: 60 }],
    }, extra || {});
    window.bastionCharts[title] = new uPlot(opts, [x].concat(series), el);
  }

  // Cost case: self-hosted against vendor cost per model (x: the models, by index), and each
  // model's cost against utilisation (the break-even curve).
  function drawTco(el, data) {
    if (el.dataset.metric === "compare") {
      var names = data.models;
      // Side-by-side bars per model: lines between models would suggest a trend.
      var bar = function (align, colour, label) {
        return { label: label, stroke: colour, fill: colour, width: 1,
                 paths: uPlot.paths.bars({ size: [0.35, 60], align: align }), points: { show: false } };
      };
      var opts = {
        width: Math.max(320, el.clientWidth || 500), height: 220,
        scales: { x: { time: false, range: [-0.5, Math.max(0.5, names.length - 0.5)] } },
        series: [{}, bar(-1, COLOURS[0], "self-hosted"), bar(1, COLOURS[1], "vendor")],
        axes: [{ splits: function () { return data.x; },
                 values: function (u, vals) { return vals.map(function (v) { return names[v] || ""; }); } },
               { size: 80 }],
      };
      window.bastionCharts.compare = new uPlot(opts, [data.x, data.self_cost, data.vendor_cost], el);
      return;
    }
    var c = data.curves[el.dataset.model];
    draw(el, "curve:" + el.dataset.model, c.x, [c.self, c.vendor], ["self-hosted", "vendor"], {
      scales: { x: { time: false } }, axes: [{}, { size: 80 }],
    });
  }

  function load(container) {
    fetch(container.dataset.source, { credentials: "same-origin" })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (data) {
        container.querySelectorAll(".chart").forEach(function (el) {
          var metric = el.dataset.metric;
          if (container.dataset.kind === "tco") {
            drawTco(el, data);
          } else if (container.dataset.kind === "burn") {
            var series = [data.spent], names = ["spent"];
            if (data.budget !== null) {
              series.push(data.x.map(function () { return data.budget; }));
              names.push("budget");
            }
            draw(el, metric, data.x, series, names);
          } else {
            draw(el, metric, data.x, data.series[metric], data.models);
          }
        });
        container.dataset.loaded = "true";
      })
      .catch(function (err) {
        container.dataset.loaded = "error";
        container.insertAdjacentText("afterbegin", "Could not load the chart data: " + err.message);
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".charts[data-source]").forEach(load);
  });
})();
