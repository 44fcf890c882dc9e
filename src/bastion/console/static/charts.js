// Draws every `.chart` on the page with uPlot, from the JSON its `.charts` container names.
// No inline script anywhere (the Content-Security-Policy forbids it): this file finds its
// work through data- attributes. The plots are kept in window.bastionCharts, by metric, so
// tests (and curious operators) can read what was drawn.
(function () {
  "use strict";
  var COLOURS = ["#2f5fb3", "#c0572b", "#2d7a3a", "#8a3ea8", "#a8902d", "#2b8f9c"];
  window.bastionCharts = {};

  function draw(el, title, x, series, names) {
    var opts = {
      width: Math.max(320, el.clientWidth || 500), height: 220,
      series: [{}].concat(names.map(function (n, i) {
        return { label: n, stroke: COLOURS[i % COLOURS.length], width: 2, spanGaps: false,
                 points: { show: true, size: 5 } };
      })),
      axes: [{}, { size: 60 }],
    };
    window.bastionCharts[title] = new uPlot(opts, [x].concat(series), el);
  }

  function load(container) {
    fetch(container.dataset.source, { credentials: "same-origin" })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (data) {
        container.querySelectorAll(".chart").forEach(function (el) {
          var metric = el.dataset.metric;
          if (container.dataset.kind === "burn") {
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
