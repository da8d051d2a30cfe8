// The dashboard's only script: refresh the page's live parts in place (polling the same URL
// with ?partial=1), sort and filter the fleet, draw the agent's charts (uPlot), and "ask now".
(function () {
  "use strict";
  var body = document.body;
  var refreshMs = Math.max(1, parseFloat(body.dataset.refreshS || "5")) * 1000;
  var liveBadge = document.getElementById("live");
  var COLORS = ["#2f6fdf", "#1f9d55", "#d98c00", "#d64545", "#8a6fdf", "#0e9aa7"];

  function withPageArgs(base, extra) {
    var url = new URL(base, location.href);
    var here = new URLSearchParams(location.search);
    here.forEach(function (v, k) { url.searchParams.delete(k); });
    here.forEach(function (v, k) { url.searchParams.append(k, v); });  // a repeated ?label= stays repeated
    Object.keys(extra || {}).forEach(function (k) { url.searchParams.set(k, extra[k]); });
    return url;
  }

  function setArgs(changes) {
    var url = new URL(location.href);
    Object.keys(changes).forEach(function (k) {
      if (changes[k] === "" || changes[k] === null) { url.searchParams.delete(k); } else { url.searchParams.set(k, changes[k]); }
    });
    history.replaceState(null, "", url);
  }

  function stale(yes) { if (liveBadge) { liveBadge.classList.toggle("stale", yes); } }

  // ---------------------------------------------------------------- live parts
  var liveParts = Array.prototype.slice.call(document.querySelectorAll("[data-live]"));
  var afterSwap = [];

  function refreshPart(el) {
    return fetch(withPageArgs(el.dataset.live, {partial: "1"}), {credentials: "same-origin"})
      .then(function (res) { if (!res.ok) { throw new Error("HTTP " + res.status); } return res.text(); })
      .then(function (html) {
        el.innerHTML = html;
        el.dataset.refreshedAt = String(Date.now());
        afterSwap.forEach(function (fn) { fn(el); });
      });
  }

  var refreshers = [];
  function refreshAll() {
    return Promise.all(liveParts.map(refreshPart).concat(refreshers.map(function (fn) { return fn(); })))
      .then(function () { stale(false); }, function () { stale(true); });
  }

  function loop() {
    var next = function () { setTimeout(loop, refreshMs); };
    if (document.hidden) { next(); return; }
    refreshAll().then(next, next);
  }
  if (liveParts.length || document.getElementById("charts")) { setTimeout(loop, refreshMs); }
  document.addEventListener("visibilitychange", function () { if (!document.hidden) { refreshAll(); } });

  // ---------------------------------------------------------------- fleet: sort, filter, pages
  var fleet = document.getElementById("fleet");
  var filters = document.getElementById("fleet-filters");
  if (fleet && filters) {
    var timer = null;
    var apply = function () {
      setArgs({q: filters.elements.q.value.trim(), state: filters.elements.state.value, page: ""});
      refreshPart(fleet);
    };
    filters.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(apply, 200); });
    filters.addEventListener("submit", function (e) { e.preventDefault(); apply(); });
    fleet.addEventListener("click", function (e) {
      var a = e.target.closest("a[data-sort], a[data-page], a[data-labels]");
      if (!a) { return; }
      e.preventDefault();
      if (a.dataset.labels !== undefined) {  // a label link: its href is the whole new query
        history.replaceState(null, "", a.href);
      } else if (a.dataset.sort) {
        setArgs({sort: a.dataset.sort, dir: a.dataset.dir, page: ""});
        filters.elements.sort.value = a.dataset.sort;
        filters.elements.dir.value = a.dataset.dir;
      } else {
        setArgs({page: a.dataset.page});
      }
      refreshPart(fleet);
    });
  }

  // ---------------------------------------------------------------- ask a label selection now (operators only)
  var askLabels = document.getElementById("ask-labels");
  if (askLabels && fleet) {
    var labelsForm = document.getElementById("ask-labels-form");
    var labelsButton = document.getElementById("ask-labels-button");
    var labelsStatus = document.getElementById("ask-labels-status");
    afterSwap.push(function (el) {  // offered only while the table is filtered by labels
      if (el !== fleet) { return; }
      var filter = fleet.querySelector("#label-filter");
      askLabels.hidden = !filter;
      if (filter) { labelsButton.textContent = "Ask the agents labelled " + filter.dataset.selector + " now"; }
    });
    labelsForm.addEventListener("submit", function (e) {
      e.preventDefault();
      var labels = {};
      new URLSearchParams(location.search).getAll("label").forEach(function (pair) {
        var i = pair.indexOf("=");
        labels[pair.slice(0, i)] = pair.slice(i + 1);
      });
      labelsButton.disabled = true;
      labelsStatus.textContent = "starting the job…";
      fetch(askLabels.dataset.url, {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": body.dataset.csrf || ""},
        body: JSON.stringify({type: labelsForm.elements.type.value, labels: labels})
      }).then(function (res) {
        return res.json().then(function (doc) { return {ok: res.ok, doc: doc}; });
      }).then(function (r) {
        if (!r.ok) { throw new Error(r.doc.error || "the dashboard refused"); }
        location.href = r.doc.url;
      }).catch(function (err) {
        labelsStatus.textContent = String(err.message || err);
        labelsButton.disabled = false;
      });
    });
  }

  // ---------------------------------------------------------------- a job: its tally, live while it waits
  var job = document.getElementById("job");
  if (job && job.dataset.running === "1") {
    var poll = function () {
      refreshPart(job).then(function () {
        var tally = document.getElementById("job-tally");
        if (tally && tally.dataset.state === "running") { setTimeout(poll, 500); }
      }, function () { stale(true); setTimeout(poll, 2000); });
    };
    setTimeout(poll, 500);
  }

  // ---------------------------------------------------------------- process table: sort in the page
  var procSort = {col: 4, desc: true, sorted: false};
  function sortProcesses() {
    var table = document.getElementById("processes");
    if (!table || !procSort.sorted) { return; }
    var th = table.tHead.rows[0].cells[procSort.col];
    var numeric = th && th.dataset.type === "num";
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    rows.sort(function (a, b) {
      var x = a.cells[procSort.col], y = b.cells[procSort.col];
      var vx = x.dataset.v !== undefined ? x.dataset.v : x.textContent;
      var vy = y.dataset.v !== undefined ? y.dataset.v : y.textContent;
      var c = numeric ? parseFloat(vx) - parseFloat(vy) : vx.localeCompare(vy);
      return procSort.desc ? -c : c;
    });
    rows.forEach(function (r) { table.tBodies[0].appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c, i) {
      c.dataset.sorted = i === procSort.col ? (procSort.desc ? "desc" : "asc") : "";
    });
  }
  document.addEventListener("click", function (e) {
    var th = e.target.closest("table.sortable th");
    if (!th) { return; }
    var col = th.cellIndex;
    procSort = {col: col, desc: procSort.col === col ? !procSort.desc : th.dataset.type === "num", sorted: true};
    sortProcesses();
  });
  afterSwap.push(sortProcesses);

  // ---------------------------------------------------------------- agent charts
  var charts = document.getElementById("charts");
  if (charts && window.uPlot) {
    var plots = {};

    var human = function (v) {
      if (v === null || v === undefined) { return "–"; }
      var units = ["B/s", "KiB/s", "MiB/s", "GiB/s"], i = 0;
      while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
      return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
    };

    var draw = function (name, series) {
      var fig = document.getElementById("chart-" + name);
      var box = fig.querySelector(".plot");
      var labels = Object.keys(series.lines);
      var points = series.t.length;
      fig.dataset.points = String(points);
      if (!points) {
        if (plots[name]) { plots[name].destroy(); delete plots[name]; }
        box.innerHTML = '<div class="none">no answers in this range</div>';
        return;
      }
      var data = [series.t].concat(labels.map(function (l) { return series.lines[l]; }));
      var key = labels.join("|");
      if (plots[name] && plots[name].key === key) { plots[name].setData(data); return; }
      if (plots[name]) { plots[name].destroy(); }
      box.innerHTML = "";
      var percent = fig.dataset.kind === "percent";
      var opts = {
        width: Math.max(300, box.clientWidth || fig.clientWidth - 24), height: 200,
        series: [{}].concat(labels.map(function (l, i) {
          return {label: l, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false,
                  value: function (u, v) { return percent ? (v === null ? "–" : v.toFixed(1) + "%") : human(v); }};
        })),
        scales: {y: percent ? {range: [0, 100]} : {}},
        axes: [{}, {size: percent ? 50 : 80, values: function (u, ticks) {
          return ticks.map(function (v) { return percent ? v + "%" : human(v); });
        }}]
      };
      plots[name] = new uPlot(opts, data, box);
      plots[name].key = key;
    };

    var loadSeries = function () {
      var url = new URL(charts.dataset.series, location.href);
      url.searchParams.set("range", charts.dataset.range);
      return fetch(url, {credentials: "same-origin"})
        .then(function (res) { if (!res.ok) { throw new Error("HTTP " + res.status); } return res.json(); })
        .then(function (all) {
          Object.keys(all).forEach(function (name) { draw(name, all[name]); });
          charts.dataset.loadedAt = String(Date.now());
        });
    };
    refreshers.push(loadSeries);
    loadSeries().catch(function () { stale(true); });

    var ranges = document.getElementById("ranges");
    ranges.addEventListener("click", function (e) {
      var a = e.target.closest("a[data-range]");
      if (!a) { return; }
      e.preventDefault();
      charts.dataset.range = a.dataset.range;
      setArgs({range: a.dataset.range});
      Array.prototype.forEach.call(ranges.querySelectorAll("a"), function (x) { x.classList.toggle("on", x === a); });
      loadSeries();
    });
    window.addEventListener("resize", function () {
      Object.keys(plots).forEach(function (name) {
        var box = document.getElementById("chart-" + name).querySelector(".plot");
        plots[name].setSize({width: Math.max(300, box.clientWidth), height: 200});
      });
    });
  }

  // ---------------------------------------------------------------- ask now (operators only)
  var ask = document.getElementById("ask");
  if (ask) {
    var form = document.getElementById("ask-form");
    var button = document.getElementById("ask-button");
    var status = document.getElementById("ask-status");
    var answer = document.getElementById("ask-answer");
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      button.disabled = true;
      status.textContent = "asking…";
      fetch(ask.dataset.url, {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": body.dataset.csrf || ""},
        body: JSON.stringify({type: form.elements.type.value})
      }).then(function (res) {
        return res.json().then(function (doc) { return {ok: res.ok, doc: doc}; });
      }).then(function (r) {
        if (!r.ok) { throw new Error(r.doc.error || "the dashboard refused"); }
        var a = r.doc.answer;
        status.textContent = a.type + " answered " + a.status + " in " + Math.round(r.doc.took_ms) +
          " ms, collected at " + a.collected_at;
        answer.textContent = JSON.stringify(a, null, 2);
        answer.dataset.answerId = a.id;
        answer.hidden = false;
        refreshAll();
      }).catch(function (err) {
        status.textContent = String(err.message || err);
      }).then(function () { button.disabled = false; });
    });
  }
})();
