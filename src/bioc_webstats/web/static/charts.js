/* Draws one bar chart per year section from the JSON the page embeds (#chart-data).
   Runs only in the browser; the tables carry the same numbers without JavaScript. */
(function () {
  "use strict";
  var el = document.getElementById("chart-data");
  if (!el || typeof uPlot === "undefined") { return; }
  var sections = JSON.parse(el.textContent);
  var months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  var x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
  sections.forEach(function (s) {
    var box = document.querySelector('.chart[data-year="' + s.year + '"]');
    if (!box) { return; }
    var width = Math.min(box.clientWidth || 640, 720);
    var opts = {
      width: width,
      height: 240,
      legend: { show: false },
      cursor: { show: false },
      scales: { x: { time: false, range: [0.5, 12.5] }, ips: {}, dl: {} },
      axes: [
        { values: function (u, vals) { return vals.map(function (v) { return months[v - 1] || ""; }); },
          splits: function () { return x; } },
        { scale: "dl", label: "downloads", stroke: "#1a5f8c" },
        { scale: "ips", label: "distinct IPs", side: 1, stroke: "#c0392b", grid: { show: false } }
      ],
      series: [
        { label: "Month", value: function (u, v) { return v ? months[v - 1] + "/" + s.year : ""; } },
        { label: "Nb of downloads", scale: "dl", stroke: "#1a5f8c", fill: "rgba(26,95,140,0.35)",
          paths: uPlot.paths.bars({ size: [0.4, 40], align: -1 }), points: { show: false } },
        { label: "Nb of distinct IPs", scale: "ips", stroke: "#c0392b", fill: "rgba(192,57,43,0.35)",
          paths: uPlot.paths.bars({ size: [0.4, 40], align: 1 }), points: { show: false } }
      ]
    };
    new uPlot(opts, [x, s.downloads, s.ips], box);
  });
})();
