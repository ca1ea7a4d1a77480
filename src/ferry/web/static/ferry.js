/* ferry web console: the serial console (xterm.js over server-sent events) and the lag plot (uPlot).
   No inline scripts (the Content-Security-Policy allows none); htmx does the rest. */
(function () {
  "use strict";
  var KEEP_LINES = 300;

  function startConsole(box) {
    var mirror = document.getElementById("console-text");
    var status = document.getElementById("console-status");
    var term = null;
    if (window.Terminal) {
      term = new window.Terminal({
        rows: 20, cols: 100, scrollback: 5000, disableStdin: true, convertEol: false,
        fontSize: 13, screenReaderMode: false,
        theme: { background: "#101418", foreground: "#e6e6e6" }
      });
      // The terminal takes no input: leave Tab to the page (no keyboard trap).
      term.attachCustomKeyEventHandler(function (event) { return event.key !== "Tab"; });
      if (window.FitAddon) {
        var fit = new window.FitAddon.FitAddon();
        term.loadAddon(fit);
        term.open(box);
        try { fit.fit(); } catch (e) { /* hidden or zero-sized: keep 100x20 */ }
        window.addEventListener("resize", function () { try { fit.fit(); } catch (e) { } });
      } else {
        term.open(box);
      }
      if (term.textarea) term.textarea.setAttribute("aria-label", "Serial console (read only)");
    } else {
      box.textContent = "The terminal did not load; the text below is the console.";
      mirror.classList.remove("visually-hidden");
    }
    var lines = [""];
    function keep(text) {
      var parts = text.replace(/\r/g, "").split("\n");
      lines[lines.length - 1] += parts[0];
      for (var i = 1; i < parts.length; i++) lines.push(parts[i]);
      if (lines.length > KEEP_LINES) lines = lines.slice(lines.length - KEEP_LINES);
      mirror.textContent = lines.join("\n");
    }
    var source = new EventSource(box.dataset.src);
    source.addEventListener("console", function (event) {
      var text = JSON.parse(event.data);
      if (term) term.write(text);
      keep(text);
      box.dataset.bytes = String(Number(box.dataset.bytes || 0) + text.length);
      status.textContent = "";
    });
    source.addEventListener("console-error", function (event) {
      status.textContent = event.data;
    });
    source.onerror = function () { status.textContent = "console stream interrupted; reconnecting"; };
  }

  function startLagPlot(box) {
    var caption = document.getElementById("lag-caption");
    var plot = null;
    function width() { return Math.max(320, box.clientWidth || 640); }
    function draw(data) {
      var count = data.t.length;
      box.dataset.samples = String(count);
      caption.textContent = count ? count + " samples, latest lag " +
        Math.round(data.lag[count - 1]) + " s (sampled every " + data.interval_s + " s)"
        : "No samples yet: the console samples replicated VMs every " + data.interval_s + " s.";
      // uPlot picks year-long ticks for a single point: draw from the second on.
      if (!window.uPlot || (plot === null && count < 2)) return;
      var series = [data.t, data.lag];
      if (plot === null) {
        plot = new window.uPlot({
          width: width(), height: 200,
          series: [{}, { label: "lag (s)", stroke: "#1f6feb", width: 2, fill: "rgba(31,111,235,0.1)" }],
          axes: [{}, { label: "seconds" }],
          scales: {
            // At least a minute wide, so a few first samples do not get sub-second ticks.
            x: { time: true, range: function (u, min, max) { return [min, Math.max(max, min + 60)]; } },
            y: { range: function (u, min, max) { return [0, Math.max(10, max * 1.2)]; } }
          }
        }, series, box);
        window.addEventListener("resize", function () { plot.setSize({ width: width(), height: 200 }); });
      } else {
        plot.setData(series);
      }
    }
    function poll() {
      fetch(box.dataset.src, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) {
          if (data) draw(data);
          setTimeout(poll, 1000 * ((data && data.interval_s) || 5));
        })
        .catch(function () { setTimeout(poll, 5000); });
    }
    poll();
  }

  // While an action runs (a shutdown can take 30 s), its result line says so.
  document.addEventListener("htmx:beforeRequest", function (event) {
    var form = event.target;
    var result = document.getElementById("action-result");
    if (!result || !form.classList || !form.classList.contains("action")) return;
    var button = form.querySelector("button");
    var line = document.createElement("p");
    line.setAttribute("role", "status");
    line.dataset.testid = "action-pending";
    line.textContent = (button ? button.textContent : "Action") + ": working…";
    result.replaceChildren(line);
  });

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("console");
    if (box) startConsole(box);
    var plot = document.getElementById("lag-plot");
    if (plot) startLagPlot(plot);
  });
})();
