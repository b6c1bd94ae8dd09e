// vidpulse big screen: renders the snapshots pushed on /api/live
// (server-sent events). Each panel sets data-rows (how many data points it
// shows) and data-state (ok | empty | error), and window.__vidpulse holds
// the last snapshot's per-panel counts, so tests can read them from the DOM.
(function () {
  'use strict';

  var PALETTE = ['#4cc9f0', '#f72585', '#ffd166', '#52d273', '#9b5de5', '#ff8c42',
    '#00bbf9', '#f15bb5', '#b5e48c', '#e0aaff'];
  var fmt = new Intl.NumberFormat();
  var charts = {};
  var state = window.__vidpulse = { updates: 0, version: 0, panels: {} };
  var lastSnapshotAt = 0;
  var pinnedAt = null;

  function fontSize() {
    return Math.round(Math.max(12, Math.min(28, window.innerWidth / 105)));
  }

  if (window.Chart) {
    Chart.defaults.color = '#c9d1d9';
    Chart.defaults.borderColor = '#243044';
    Chart.defaults.font.size = fontSize();
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.animation = false;
    Chart.defaults.maintainAspectRatio = false;
    Chart.defaults.plugins.legend.labels.boxWidth = fontSize();
  }

  function el(id) { return document.getElementById(id); }

  function hhmm(iso) {
    var d = new Date(iso);
    return ('0' + d.getHours()).slice(-2) + ':' + ('0' + d.getMinutes()).slice(-2);
  }

  function mark(id, rows, error, sub) {
    var p = el('p-' + id);
    if (!p) { return; }
    p.dataset.rows = String(rows);
    p.dataset.state = error ? 'error' : (rows > 0 ? 'ok' : 'empty');
    var s = p.querySelector('[data-status]');
    if (s) { s.textContent = error ? error : (rows > 0 ? '' : 'no data in this window yet'); }
    var t = p.querySelector('[data-sub]');
    if (t && sub !== undefined) { t.textContent = sub; }
    state.panels[id] = { rows: rows, error: error || null };
  }

  function chart(id, type, options) {
    if (charts[id]) { return charts[id]; }
    var canvas = el('c-' + id);
    if (!canvas || !window.Chart) { return null; }
    charts[id] = new Chart(canvas, {
      type: type,
      data: { labels: [], datasets: [] },
      options: options || {}
    });
    return charts[id];
  }

  function setData(c, labels, datasets) {
    if (!c) { return; }
    c.data.labels = labels;
    c.data.datasets = datasets;
    c.update('none');
  }

  // A time as HH:MM on the clock of `zone` (the dashboard's day zone).
  function hhmmIn(iso, zone) {
    try {
      return new Intl.DateTimeFormat('en-GB', { hour: '2-digit', minute: '2-digit', hour12: false, timeZone: zone })
        .format(new Date(iso));
    } catch (e) {
      return hhmm(iso);
    }
  }

  // "today" panels: totals since 00:00 in the day zone; the header says
  // which day and zone.
  function todayLabel(p) {
    if (!p || !p.day) { return ''; }
    el('day').textContent = 'today: ' + p.day + ' · ' + p.zone;
    return '00:00–' + (p.window_end ? hhmmIn(p.window_end, p.zone) : 'now');
  }

  // A small per-minute line under a "today" chart.
  function trend(id, p, color) {
    var pts = p.trend || [];
    var c = chart(id + '-trend', 'line', {
      plugins: { legend: { display: false }, tooltip: { enabled: true } },
      scales: { x: { display: false }, y: { display: false, beginAtZero: true } },
      elements: { point: { radius: 0 } }
    });
    setData(c, pts.map(function (r) { return hhmm(r.window_start); }), [{
      label: (p.value_name || 'value') + ' per minute',
      data: pts.map(function (r) { return r.value; }),
      borderColor: color, borderWidth: 2, tension: 0.25, fill: false
    }]);
  }

  var noLegend = { plugins: { legend: { display: false } } };

  var render = {
    gifts_6h: function (p) {
      var rows = p.rows || [];
      var c = chart('gifts_6h', 'line', {
        plugins: { legend: { display: false } },
        scales: { y: { beginAtZero: true } },
        elements: { point: { radius: 0 } }
      });
      setData(c, rows.map(function (r) { return hhmm(r.window_end); }), [{
        label: p.value_name || 'amount',
        data: rows.map(function (r) { return r.value; }),
        borderColor: PALETTE[0], backgroundColor: 'rgba(76,201,240,0.18)',
        fill: true, borderWidth: 3, tension: 0.25
      }]);
      el('kpi-gifts').textContent = fmt.format(p.latest || 0);
      var n = rows.filter(function (r) { return r.value > 0; }).length;
      return [n, 'window ending ' + (p.window_end ? hhmm(p.window_end) : '–')];
    },
    gifts_by_type: function (p) {
      var rows = (p.rows || []).slice().sort(function (a, b) { return a.gift_type - b.gift_type; });
      var c = chart('gifts_by_type', 'bar', noLegend);
      setData(c, rows.map(function (r) { return 'type ' + r.gift_type; }), [{
        label: 'amount', data: rows.map(function (r) { return r.amount; }),
        backgroundColor: rows.map(function (r, i) { return PALETTE[i % PALETTE.length]; })
      }]);
      trend('gifts_by_type', p, PALETTE[0]);
      el('kpi-gifts-today').textContent = fmt.format(p.total || 0);
      return [rows.length, todayLabel(p)];
    },
    members_by_grade: function (p) {
      var rows = (p.rows || []).slice().sort(function (a, b) { return a.grade - b.grade; });
      var c = chart('members_by_grade', 'bar', noLegend);
      setData(c, rows.map(function (r) { return 'grade ' + r.grade; }), [{
        label: 'members', data: rows.map(function (r) { return r.members; }),
        backgroundColor: rows.map(function (r, i) { return PALETTE[(i + 2) % PALETTE.length]; })
      }]);
      trend('members_by_grade', p, PALETTE[4]);
      return [rows.length, todayLabel(p)];
    },
    viewers_by_province_grade: function (p) {
      var rows = p.rows || [];
      var byProvince = {}, grades = {};
      rows.forEach(function (r) {
        var prov = r.province || '(unknown)';
        byProvince[prov] = byProvince[prov] || { total: 0, g: {} };
        byProvince[prov].total += r.viewers;
        byProvince[prov].g[r.grade] = (byProvince[prov].g[r.grade] || 0) + r.viewers;
        grades[r.grade] = true;
      });
      var provinces = Object.keys(byProvince).sort(function (a, b) {
        return byProvince[b].total - byProvince[a].total;
      }).slice(0, 16);
      var gs = Object.keys(grades).map(Number).sort(function (a, b) { return a - b; });
      var c = chart('viewers_by_province_grade', 'bar', {
        plugins: { legend: { position: 'right' } },
        scales: { x: { stacked: true, ticks: { autoSkip: false } }, y: { stacked: true, beginAtZero: true } }
      });
      setData(c, provinces, gs.map(function (g, i) {
        return {
          label: 'grade ' + g,
          data: provinces.map(function (pr) { return byProvince[pr].g[g] || 0; }),
          backgroundColor: PALETTE[i % PALETTE.length]
        };
      }));
      return [rows.length, todayLabel(p)];
    },
    top_gifters: function (p) {
      var rows = (p.rows || []).slice().sort(function (a, b) { return a.rank - b.rank; });
      var c = chart('top_gifters', 'bar', {
        indexAxis: 'y', plugins: { legend: { display: false } },
        scales: { x: { beginAtZero: true }, y: { ticks: { autoSkip: false } } }
      });
      setData(c, rows.map(function (r) { return String(r.user_id); }), [{
        label: 'amount', data: rows.map(function (r) { return r.amount; }),
        backgroundColor: PALETTE[1]
      }]);
      return [rows.length, todayLabel(p)];
    },
    online_users: function (p) {
      var rows = (p.rows || []).slice(0, 15);
      var c = chart('online_users', 'bar', {
        plugins: { legend: { display: false } },
        scales: { x: { ticks: { autoSkip: false, maxRotation: 60 } }, y: { beginAtZero: true } }
      });
      setData(c, rows.map(function (r) { return String(r.room_id); }), [{
        label: 'online', data: rows.map(function (r) { return r.online; }),
        backgroundColor: PALETTE[3]
      }]);
      el('kpi-online').textContent = fmt.format(p.total || 0);
      return [rows.length, 'top rooms, total ' + fmt.format(p.total || 0)];
    },
    pool_videos: function (p) {
      var rows = p.rows || [];
      table('pool_videos', rows.map(function (r) {
        return [r.pool, r.video_id, n(r.plays), n(r.likes), n(r.comments), n(r.shares)];
      }), [2, 3, 4, 5]);
      return [rows.length, 'last 5 min'];
    },
    pool_authors: function (p) {
      var rows = p.rows || [];
      table('pool_authors', rows.map(function (r) {
        return [r.pool, r.author_id, n(r.publications)];
      }), [2]);
      return [rows.length, 'last 5 min'];
    }
  };

  function n(v) { return v === undefined || v === null ? '' : fmt.format(v); }

  function board(id, p) {
    var rows = p.rows || [];
    var panel = el('p-' + id);
    if (panel && p.member_name) {
      panel.querySelector('[data-member]').textContent = p.member_name;
      panel.querySelector('[data-score]').textContent = p.score_name;
    }
    table(id, rows.map(function (r) { return [r.rank, r.member, n(r.score)]; }), [0, 2]);
    if (p.day) { el('boards-day').textContent = 'today, ' + p.day + ' (' + p.zone + ')'; }
    return [rows.length, p.day ? p.day + ' ' + p.zone : ''];
  }

  function table(id, rows, numeric) {
    var body = el('p-' + id).querySelector('tbody');
    while (body.firstChild) { body.removeChild(body.firstChild); }
    rows.forEach(function (cells) {
      var tr = document.createElement('tr');
      cells.forEach(function (v, i) {
        var td = document.createElement('td');
        td.textContent = v === null || v === undefined ? '' : String(v);
        if (numeric.indexOf(i) >= 0) { td.className = 'n'; }
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  function pools(v) {
    var list = (v && v.pools) || [];
    var box = el('p-pools').querySelector('.chips');
    while (box.firstChild) { box.removeChild(box.firstChild); }
    list.forEach(function (p) {
      var chip = document.createElement('span');
      chip.className = 'chip';
      var b = document.createElement('b');
      b.textContent = p.name;
      chip.appendChild(b);
      chip.appendChild(document.createTextNode(' ' + (p.members === null ? 'all events' :
        fmt.format(p.members) + ' ' + p.match.replace('_id', '') + 's') + ' · ' + p.mode));
      box.appendChild(chip);
    });
    var ids = list.reduce(function (s, p) { return s + (p.members || 0); }, 0);
    el('kpi-pool-ids').textContent = list.length ? fmt.format(ids) : '–';
    var err = v && v.error && !list.length ? v.error : null;
    mark('pools', list.length, err);
  }

  function apply(snap) {
    lastSnapshotAt = Date.now();
    pinnedAt = snap.pinned ? snap.at : null;
    var panels = snap.panels || {};
    Object.keys(panels).forEach(function (id) {
      var p = panels[id];
      var result;
      try {
        if (render[id]) { result = render[id](p); } else if (id.indexOf('board_') === 0) { result = board(id, p); }
      } catch (e) {
        mark(id, 0, 'render failed: ' + e.message);
        return;
      }
      if (result) { mark(id, p.error ? 0 : result[0], p.error, result[1]); }
    });
    pools(snap.pools);
    state.updates += 1;
    state.version = snap.version;
    document.body.dataset.updates = String(state.updates);
    document.body.dataset.version = String(snap.version);
    document.body.dataset.state = 'live';
    el('conn').textContent = 'live · updated ' + new Date().toLocaleTimeString() +
      (snap.pinned ? ' · pinned to ' + snap.at : '');
    el('footer').textContent = 'vidpulse-api · snapshot ' + snap.version + ' built in ' +
      snap.build_ms + ' ms · refresh every ' + Math.round(snap.interval_ms / 1000) + ' s';
  }

  function tick() {
    var d = pinnedAt ? new Date(pinnedAt) : new Date();
    el('clock').textContent = d.toLocaleString();
    if (lastSnapshotAt && Date.now() - lastSnapshotAt > 30000) {
      document.body.dataset.state = 'error';
      el('conn').textContent = 'stale: no update for ' + Math.round((Date.now() - lastSnapshotAt) / 1000) + ' s';
    }
  }

  function connect() {
    if (!window.EventSource) {
      var poll = function () {
        fetch('api/live/snapshot').then(function (r) { return r.json(); }).then(apply)
          .catch(function () {}).then(function () { setTimeout(poll, 3000); });
      };
      poll();
      return;
    }
    var es = new EventSource('api/live');
    es.addEventListener('snapshot', function (e) { apply(JSON.parse(e.data)); });
    es.onerror = function () {
      document.body.dataset.state = 'error';
      el('conn').textContent = 'reconnecting…';
    };
  }

  tick();
  setInterval(tick, 1000);
  connect();
}());
