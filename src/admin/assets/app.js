// payout-admin dashboard: a hash-routed single page over /api/v1.
//
// Plain browser JavaScript, no build step and no third-party code (the
// machines it runs on have no network). Every piece of data reaches the DOM
// through textContent or setAttribute (see el()), never through innerHTML, so
// a payee name or failure message cannot inject markup.
'use strict';

(() => {
  const STATUSES = ['pending', 'queued', 'processing', 'retrying', 'in_transit', 'paid', 'failed', 'cancelled', 'held'];
  const FILTER_KEYS = ['status', 'payee_id', 'currency', 'failure_code',
    'created_from', 'created_to', 'due_from', 'due_to', 'paid_from', 'paid_to'];
  const RANGES = [['created', 'Created'], ['due', 'Due'], ['paid', 'Paid']];
  const PAGE_SIZES = ['25', '50', '100', '200', '500'];
  const DEFAULT_LIMIT = '50';
  const REFRESH_MS = 5000;
  // What each role may do to a single payout (the server checks again).
  const ROLE_ACTIONS = {
    viewer: [],
    operator: ['retry', 'cancel', 'enqueue'],
    admin: ['retry', 'cancel', 'enqueue'],
  };
  const ACTIONS = {
    retry: {
      label: 'Retry',
      title: (id) => `Retry payout #${id}?`,
      message: () => 'It goes back to the queue with a fresh attempt budget. The gateway gets the same ' +
        'idempotency key, so the payee cannot be paid twice.',
      ok: 'Retry payout',
      dismiss: 'Cancel',
      danger: false,
    },
    cancel: {
      label: 'Cancel',
      title: (id) => `Cancel payout #${id}?`,
      message: () => 'The payee will not be paid by this payout. This cannot be undone.',
      ok: 'Cancel payout',
      dismiss: 'Keep payout',
      danger: true,
    },
    enqueue: {
      label: 'Enqueue now',
      title: (id) => `Enqueue payout #${id} now?`,
      message: (p) => (p && p.due_at && new Date(p.due_at) > new Date()
        ? `It is queued now instead of at its due time (${fmtTime(p.due_at)}).`
        : 'It is queued now instead of waiting for its next scheduled attempt.'),
      ok: 'Enqueue now',
      dismiss: 'Cancel',
      danger: false,
    },
  };

  const state = {
    session: null,
    gen: 0, // bumps on every route change; late responses of older routes are dropped
    view: null, // the view key of the current route ('overview', 'payouts', ...)
    timer: null, // the overview refresh
    pager: { key: null, cursor: null, stack: [] },
    lastPayoutsHash: '#/payouts',
    // Live updates of the current view (lists and overview), while the tab
    // is visible; the operator can pause them (kept for the tab's session).
    live: window.sessionStorage.getItem('payouts-live') !== 'off',
    refresh: null, // the current view's refresh, while it has one
    selected: new Set(), // payout ids selected on the payouts list
    selectionKey: null, // the filters the selection was made under
    fleet: null, // GET /api/v1/fleet
    fleetTimer: null,
  };

  // ---------- DOM helpers ----------

  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on') && typeof v === 'function') {
        node.addEventListener(k.slice(2), v);
      } else if (k === 'dataset') {
        for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = String(dv);
      } else {
        node.setAttribute(k, v === true ? '' : String(v));
      }
    }
  }

  function appendAll(node, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  // el('tag', {attr: value, onclick: fn}, ...children): strings become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    appendAll(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    setAttrs(node, attrs);
    appendAll(node, children);
    return node;
  }

  const $ = (sel, root = document) => root.querySelector(sel);

  function nil() {
    return el('span', { class: 'nil', 'aria-label': 'none' }, '—');
  }

  function orNil(v) {
    return v === null || v === undefined || v === '' ? nil() : String(v);
  }

  // ---------- Formatting ----------

  const pad = (n) => String(n).padStart(2, '0');
  const numberFmt = new Intl.NumberFormat();

  function fmtInt(n) {
    return n === null || n === undefined ? '—' : numberFmt.format(n);
  }

  // A local "YYYY-MM-DD HH:MM:SS" (the full UTC instant is in the title).
  function fmtTime(iso) {
    const d = new Date(iso);
    if (!iso || Number.isNaN(d.getTime())) return String(iso || '');
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtClock(iso) {
    const d = new Date(iso);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  }

  function timeEl(iso) {
    if (!iso) return nil();
    return el('time', { datetime: iso, title: iso }, fmtTime(iso));
  }

  // A duration, short and unambiguous: 850ms, 4.2s, 42s, 1m 05s, 2h 03m, 3d 04h.
  function fmtSeconds(s) {
    if (s === null || s === undefined || s === '' || Number.isNaN(Number(s))) return '—';
    s = Number(s);
    if (s < 1) return `${Math.round(s * 1000)}ms`;
    if (s < 10) return `${s.toFixed(1)}s`;
    const t = Math.round(s);
    if (t < 60) return `${t}s`;
    if (t < 3600) return `${Math.floor(t / 60)}m ${pad(t % 60)}s`;
    if (t < 86400) return `${Math.floor(t / 3600)}h ${pad(Math.floor((t % 3600) / 60))}m`;
    return `${Math.floor(t / 86400)}d ${pad(Math.floor((t % 86400) / 3600))}h`;
  }

  function fmtAgo(iso, now) {
    const secs = Math.max(0, (now - new Date(iso).getTime()) / 1000);
    if (secs < 1) return 'just now';
    return `${fmtSeconds(secs < 10 ? Math.round(secs) : secs)} ago`;
  }

  function fmtRate(r) {
    return r === null || r === undefined ? '—' : `${(r * 100).toFixed(1)} %`;
  }

  function fmtPerMin(v) {
    if (v === null || v === undefined) return '—';
    return `${Number(v).toFixed(v >= 100 ? 0 : 1)}/min`;
  }

  function badge(status) {
    return el('span', { class: `badge badge-${status}` }, status);
  }

  // The amount is a decimal string: shown exactly as sent, never through a float.
  function amount(p) {
    return [el('span', { class: 'mono' }, p.amount), el('span', { class: 'currency' }, p.currency)];
  }

  // datetime-local value (local time) -> RFC 3339 UTC, and back.
  function localToRfc3339(value) {
    if (!value) return '';
    const d = new Date(value);
    if (Number.isNaN(d.getTime())) return '';
    return d.toISOString().replace('.000Z', 'Z');
  }

  function rfc3339ToLocal(iso) {
    const d = new Date(iso);
    if (!iso || Number.isNaN(d.getTime())) return '';
    const base = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
    return d.getSeconds() ? `${base}:${pad(d.getSeconds())}` : base;
  }

  // ---------- API ----------

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  // An API message as a sentence; `status` (a 409's current status) is added
  // when the message does not already say it.
  function sentence(message, status) {
    let s = String(message || 'The request failed').trim();
    s = s.charAt(0).toUpperCase() + s.slice(1);
    if (!/[.!?]$/.test(s)) s += '.';
    if (status && !s.includes(status)) s += ` The payout is ${status} now.`;
    return s;
  }

  function toLogin() {
    window.location.assign('/login');
  }

  async function api(path, { method = 'GET', body } = {}) {
    const headers = { Accept: 'application/json' };
    if (method !== 'GET') {
      headers['Content-Type'] = 'application/json';
      headers['X-CSRF-Token'] = state.session ? state.session.csrf : '';
    }
    let res;
    try {
      res = await fetch(path, {
        method,
        headers,
        credentials: 'same-origin',
        cache: 'no-store',
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new ApiError(0, 'The server could not be reached. Check the connection and try again.');
    }
    if (res.status === 401 || (res.redirected && new URL(res.url).pathname === '/login')) {
      toLogin();
      throw new ApiError(401, 'Your session has ended; log in again.');
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (e) {
        data = null;
      }
    }
    if (!res.ok) {
      const msg = data && typeof data.error === 'string' ? data.error : `The request failed (HTTP ${res.status}).`;
      throw new ApiError(res.status, msg, data);
    }
    return data;
  }

  function role() {
    return state.session ? state.session.role : 'viewer';
  }

  function roleMay(action) {
    return (ROLE_ACTIONS[role()] || []).includes(action);
  }

  // ---------- Messages ----------

  function setMessage(id, text) {
    const box = document.getElementById(id);
    if (!text) {
      box.replaceChildren();
      return;
    }
    box.replaceChildren(
      el('span', { class: 'message' }, text),
      el('button', {
        type: 'button',
        class: 'dismiss',
        'aria-label': id === 'alert' ? 'Dismiss error' : 'Dismiss message',
        onclick: () => box.replaceChildren(),
      }, '×'),
    );
  }

  const showAlert = (text) => setMessage('alert', text);
  const showNotice = (text) => setMessage('notice', text);

  function clearMessages() {
    setMessage('alert', '');
    setMessage('notice', '');
  }

  // ---------- Confirmation dialog ----------

  // Opens #confirm; resolves to {ok, reason}. Cancel, Escape and the
  // dismiss button all resolve with ok false.
  function confirmDialog({ title, message, ok = 'OK', dismiss = 'Cancel', danger = false, reason = false }) {
    const dialog = $('#confirm');
    $('#confirm-title').textContent = title;
    const msg = $('#confirm-message');
    msg.replaceChildren();
    appendAll(msg, [message]);
    const okButton = $('#confirm-ok');
    okButton.textContent = ok;
    okButton.className = danger ? 'button danger solid' : 'button primary';
    $('#confirm-cancel').textContent = dismiss;
    const field = $('#confirm-reason-field');
    const input = $('#confirm-reason');
    field.hidden = !reason;
    input.value = '';
    dialog.returnValue = '';
    return new Promise((resolve) => {
      dialog.addEventListener('close', () => {
        resolve({ ok: dialog.returnValue === 'ok', reason: input.value.trim() });
      }, { once: true });
      dialog.showModal();
      (reason ? input : $('#confirm-cancel')).focus();
    });
  }

  // ---------- Router ----------

  function parseHash() {
    const raw = window.location.hash.replace(/^#\/?/, '');
    const q = raw.indexOf('?');
    const path = q < 0 ? raw : raw.slice(0, q);
    const query = q < 0 ? '' : raw.slice(q + 1);
    return { parts: path.split('/').filter(Boolean), params: new URLSearchParams(query) };
  }

  function stopRefresh() {
    if (state.timer) {
      clearTimeout(state.timer);
      state.timer = null;
    }
    state.refresh = null;
  }

  // Runs `fn` again in a few seconds, if this view is still shown, live
  // updates are on and the tab is visible (a hidden tab catches up when it
  // shows again).
  function scheduleRefresh(gen, fn) {
    if (state.timer) clearTimeout(state.timer);
    state.timer = null;
    if (gen !== state.gen) return;
    state.refresh = fn;
    if (!state.live || document.visibilityState === 'hidden') return;
    state.timer = setTimeout(() => {
      state.timer = null;
      if (gen === state.gen) fn();
    }, REFRESH_MS);
  }

  function liveToggle() {
    const label = () => (state.live ? 'Pause live updates' : 'Resume live updates');
    const text = () => (state.live ? 'Live' : 'Paused');
    const dot = el('span', { class: 'dot', 'aria-hidden': 'true' });
    const status = el('span', { id: 'live-state' }, text());
    const button = el('button', {
      type: 'button', id: 'live-toggle', class: 'button small', 'aria-pressed': String(!state.live),
    }, label());
    const box = el('span', { class: 'live', 'data-live': state.live ? 'on' : 'off' }, dot, status, button);
    button.addEventListener('click', () => {
      state.live = !state.live;
      window.sessionStorage.setItem('payouts-live', state.live ? 'on' : 'off');
      box.dataset.live = state.live ? 'on' : 'off';
      status.textContent = text();
      button.textContent = label();
      button.setAttribute('aria-pressed', String(!state.live));
      if (state.timer) clearTimeout(state.timer);
      state.timer = null;
      if (state.live && state.refresh) state.refresh();
    });
    return box;
  }

  function setNav(active) {
    for (const name of ['overview', 'payouts', 'failures', 'payees', 'settlements', 'reconcile', 'webhooks', 'tokens']) {
      const link = document.getElementById(`nav-${name}`);
      if (name === active) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
  }

  function mount(node) {
    $('#view').replaceChildren(node);
  }

  async function route() {
    const gen = ++state.gen;
    stopRefresh();
    clearMessages();
    const { parts, params } = parseHash();
    let view;
    let run;
    if (parts.length === 0 || (parts[0] === 'overview' && parts.length === 1)) {
      view = 'overview';
      run = () => viewOverview(gen);
    } else if (parts[0] === 'payouts' && parts.length === 1) {
      view = 'payouts';
      state.lastPayoutsHash = window.location.hash || '#/payouts';
      run = () => viewPayouts(gen, params);
    } else if (parts[0] === 'payouts' && parts.length === 2 && /^[0-9]{1,18}$/.test(parts[1])) {
      view = `payout:${parts[1]}`;
      run = () => viewPayout(gen, parts[1]);
    } else if (parts[0] === 'failures' && parts.length === 1) {
      view = 'failures';
      run = () => viewFailures(gen);
    } else if (parts[0] === 'search' && parts.length === 1) {
      view = 'search';
      run = () => viewSearch(gen, params.get('q') || '');
    } else if (parts[0] === 'payees' && parts.length === 1) {
      view = 'payees';
      run = () => viewPayees(gen, params);
    } else if (parts[0] === 'payees' && parts.length === 2 && /^[0-9]{1,18}$/.test(parts[1])) {
      view = `payee:${parts[1]}`;
      run = () => viewPayee(gen, parts[1]);
    } else if (parts[0] === 'settlements' && parts.length === 1) {
      view = 'settlements';
      run = () => viewSettlements(gen, params);
    } else if (parts[0] === 'settlements' && parts.length === 2 && /^[0-9]{1,18}$/.test(parts[1])) {
      view = `settlement:${parts[1]}`;
      run = () => viewSettlement(gen, parts[1]);
    } else if (parts[0] === 'reconcile' && parts.length === 1) {
      view = 'reconcile';
      run = () => viewReconcile(gen, params);
    } else if (parts[0] === 'webhooks' && parts.length === 1) {
      view = 'webhooks';
      run = () => viewWebhooks(gen);
    } else if (parts[0] === 'webhooks' && parts.length === 2 && /^[0-9]{1,18}$/.test(parts[1])) {
      view = `webhook:${parts[1]}`;
      run = () => viewWebhook(gen, parts[1]);
    } else if (parts[0] === 'tokens' && parts.length === 1) {
      view = 'tokens';
      run = () => viewTokens(gen);
    } else {
      view = 'missing';
      run = () => viewMissing();
    }
    const moved = state.view !== null && state.view !== view;
    state.view = view;
    setNav(view.split(':')[0].replace(/^payout$/, 'payouts').replace(/^payee$/, 'payees')
      .replace(/^settlement$/, 'settlements')
      .replace(/^webhook$/, 'webhooks'));
    refreshFleet();
    await run();
    // A new page: move focus to its heading, so screen readers and keyboard
    // users start there (not when only the filters of the same page changed).
    if (moved && gen === state.gen) {
      const h1 = $('#view h1');
      if (h1) h1.focus({ preventScroll: false });
    }
  }

  function viewHead(title, ...rest) {
    document.title = `${title} · Payouts admin`;
    return el('div', { class: 'view-head' }, el('h1', { tabindex: '-1' }, title), ...rest);
  }

  function viewMissing() {
    mount(el('section', {},
      viewHead('Page not found'),
      el('p', {}, 'There is no such page. ', el('a', { href: '#/overview' }, 'Go to the overview'), '.')));
  }

  function failedView(title, err) {
    if (err.status === 401) return;
    mount(el('section', {}, viewHead(title)));
    showAlert(err.message);
  }

  // ---------- Overview ----------

  async function viewOverview(gen) {
    const meta = el('p', { class: 'meta', id: 'overview-meta' }, 'Loading…');
    const body = el('div', { id: 'overview-body' });
    mount(el('section', { id: 'overview' }, viewHead('Overview', meta, el('span', { class: 'spacer' }), liveToggle()), body));
    await refreshOverview(gen);
  }

  async function refreshOverview(gen) {
    let data;
    try {
      data = await api('/api/v1/overview');
    } catch (e) {
      if (gen !== state.gen || e.status === 401) return;
      const meta = $('#overview-meta');
      if (meta) meta.textContent = `Could not refresh: ${e.message} Trying again in 5 seconds.`;
      scheduleRefresh(gen, () => refreshOverview(gen));
      return;
    }
    if (gen !== state.gen) return;
    const body = $('#overview-body');
    const details = body.querySelector('details.data');
    const keepOpen = details ? details.open : false;
    body.replaceChildren(...renderOverview(data));
    if (keepOpen) body.querySelector('details.data').open = true;
    $('#overview-meta').replaceChildren(
      'As of ', el('time', { datetime: data.generated_at, title: data.generated_at }, fmtTime(data.generated_at)),
      ' · refreshes every 5 seconds while live');
    // Only while this view is shown: route() clears the timer on leaving.
    scheduleRefresh(gen, () => refreshOverview(gen));
  }

  function tile(name, label, value, { sub = null, tone = null, status = null, textValue = false, title = null } = {}) {
    return el('div', {
      class: `tile${tone ? ` tone-${tone}` : ''}`,
      'data-tile': name,
      'data-status': status,
      title,
    },
    el('p', { class: 'tile-label' }, label),
    el('p', { class: `tile-value${textValue ? ' text' : ''}` }, value),
    sub ? el('p', { class: 'tile-sub' }, sub) : null);
  }

  function rateTone(rate) {
    if (rate === null || rate === undefined) return null;
    if (rate < 0.8) return 'bad';
    if (rate < 0.95) return 'warn';
    return 'good';
  }

  function renderOverview(d) {
    const counts = d.counts || {};
    const statusTiles = STATUSES.map((s) => {
      const n = counts[s];
      let value = fmtInt(n);
      let sub = null;
      let title = null;
      if (s === 'paid' && d.paid_is_estimate) {
        value = `≈ ${value}`;
        sub = 'estimate';
        title = 'Estimated from table statistics: an exact count of paid payouts would be slow';
      }
      let tone = null;
      if (s === 'failed' && n > 0) tone = 'bad';
      if (s === 'retrying' && n > 0) tone = 'warn';
      return tile(s, s.replace('_', ' '), value, { sub, tone, status: s, title });
    });

    const hour = d.last_hour || {};
    const day = d.last_day || {};
    const pct = d.due_to_paid_seconds || {};
    const win = d.window || {};
    const backlog = d.backlog_age_seconds;
    let backlogTone = 'good';
    if (backlog === null || backlog === undefined) backlogTone = null;
    else if (backlog > 600) backlogTone = 'bad';
    else if (backlog > 60) backlogTone = 'warn';

    const healthTiles = [
      tile('success_rate_hour', 'Success rate · hour', fmtRate(hour.success_rate), {
        sub: `${fmtInt(hour.paid)} paid · ${fmtInt(hour.failed)} failed`,
        tone: rateTone(hour.success_rate),
      }),
      tile('success_rate_day', 'Success rate · day', fmtRate(day.success_rate), {
        sub: `${fmtInt(day.paid)} paid · ${fmtInt(day.failed)} failed`,
        tone: rateTone(day.success_rate),
      }),
      tile('throughput', 'Throughput', fmtPerMin(hour.throughput_per_min), {
        sub: `last hour · ${fmtPerMin(day.throughput_per_min)} over the day`,
      }),
      el('div', { class: 'tile', 'data-tile': 'due_to_paid' },
        el('p', { class: 'tile-label' }, 'Due → paid'),
        el('dl', { class: 'percentiles' },
          ['p50', 'p95', 'p99'].map((k) => el('div', {}, el('dt', {}, k), el('dd', {}, fmtSeconds(pct[k]))))),
        el('p', { class: 'tile-sub' }, pct.sample ? `over the last ${fmtInt(pct.sample)} paid` : 'no paid payouts yet')),
      tile('backlog_age', 'Backlog age', backlog === null || backlog === undefined ? 'none' : fmtSeconds(backlog), {
        sub: 'oldest due payout not yet finished',
        tone: backlogTone,
      }),
    ];
    const fleetTiles = [
      tile('window', 'Window depth', fmtInt(win.queued), {
        sub: `queued · Redis waiting ${win.redis_waiting === null || win.redis_waiting === undefined ? 'unknown' : fmtInt(win.redis_waiting)}`,
      }),
      tile('producer_leader', 'Producer leader', d.producer_leader || 'none', {
        sub: d.producer_leader ? 'holds the leader lock' : 'no producer holds the lock',
        tone: d.producer_leader ? null : 'bad',
        textValue: true,
      }),
    ];

    return [
      el('section', { class: 'section', 'aria-labelledby': 'h-status' },
        el('h2', { id: 'h-status' }, 'Payouts by status'),
        el('div', { class: 'tiles statuses' }, statusTiles)),
      el('section', { class: 'section', 'aria-labelledby': 'h-health' },
        el('h2', { id: 'h-health' }, 'Flow and latency'),
        el('div', { class: 'tiles flow' }, healthTiles)),
      el('section', { class: 'section', 'aria-labelledby': 'h-chart' }, chartCard(d.series || [], d.generated_at)),
      el('section', { class: 'section', 'aria-labelledby': 'h-fleet' },
        el('h2', { id: 'h-fleet' }, 'Fleet'),
        el('div', { class: 'fleet' },
          el('div', { class: 'tiles stack' }, fleetTiles),
          workersCard(d.workers || [], d.generated_at))),
    ];
  }

  // A "nice" axis maximum and step for `max` split in about 4 steps.
  function niceScale(max) {
    if (max <= 4) return { top: 4, step: 1 };
    const raw = max / 4;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    return { top: Math.ceil(max / step) * step, step };
  }

  // The series placed on 60 one-minute slots ending at its newest minute;
  // minutes the server left out count as zero.
  function slots(series, generatedAt) {
    const MIN = 60000;
    const times = series.map((p) => new Date(p.t).getTime()).filter((t) => !Number.isNaN(t));
    let end = times.length ? Math.max(...times) : new Date(generatedAt).getTime();
    if (Number.isNaN(end)) end = Date.now();
    end = Math.floor(end / MIN) * MIN;
    const out = [];
    for (let i = 59; i >= 0; i -= 1) out.push({ t: end - i * MIN, paid: 0, failed: 0 });
    for (const p of series) {
      const idx = 59 - Math.round((end - Math.floor(new Date(p.t).getTime() / MIN) * MIN) / MIN);
      if (idx >= 0 && idx < 60) {
        out[idx].paid += Number(p.paid) || 0;
        out[idx].failed += Number(p.failed) || 0;
      }
    }
    return out;
  }

  function chartCard(series, generatedAt) {
    const data = slots(series, generatedAt);
    const totalPaid = data.reduce((a, p) => a + p.paid, 0);
    const totalFailed = data.reduce((a, p) => a + p.failed, 0);
    const peak = data.reduce((best, p) => (p.paid + p.failed > best.paid + best.failed ? p : best), data[0]);
    const summary = totalPaid + totalFailed === 0
      ? 'No payouts were paid or failed in the last 60 minutes.'
      : `Last 60 minutes: ${fmtInt(totalPaid)} paid and ${fmtInt(totalFailed)} failed; the busiest minute, ` +
        `${fmtClock(peak.t)}, had ${fmtInt(peak.paid)} paid and ${fmtInt(peak.failed)} failed.`;

    const W = 1240;
    const H = 250;
    const m = { top: 14, right: 12, bottom: 30, left: 46 };
    const pw = W - m.left - m.right;
    const ph = H - m.top - m.bottom;
    const maxv = Math.max(...data.map((p) => p.paid + p.failed));
    const { top, step } = niceScale(maxv);
    const y = (v) => m.top + ph - (v / top) * ph;
    const slotW = pw / data.length;
    const barW = Math.max(2, slotW - Math.min(4, slotW * 0.25));

    const grid = [];
    for (let v = 0; v <= top + 1e-9; v += step) {
      const yy = y(v);
      grid.push(svg('line', { class: v === 0 ? 'axis' : 'grid', x1: m.left, x2: W - m.right, y1: yy, y2: yy }));
      grid.push(svg('text', { x: m.left - 8, y: yy + 4, 'text-anchor': 'end' }, fmtInt(Math.round(v * 100) / 100)));
    }
    const bars = data.map((p, i) => {
      const x = m.left + i * slotW + (slotW - barW) / 2;
      const paidTop = y(p.paid);
      const failTop = y(p.paid + p.failed);
      return svg('g', { class: 'slot' },
        svg('title', {}, `${fmtClock(p.t)}: ${p.paid} paid, ${p.failed} failed`),
        svg('rect', { class: 'slot-hit', x: m.left + i * slotW, y: m.top, width: slotW, height: ph }),
        p.paid > 0 ? svg('rect', { class: 'bar-paid', x, y: paidTop, width: barW, height: y(0) - paidTop, rx: 1.5 }) : null,
        p.failed > 0 ? svg('rect', { class: 'bar-failed', x, y: failTop, width: barW, height: paidTop - failTop, rx: 1.5 }) : null);
    });
    const xLabels = data.map((p, i) => (i % 10 === 0 || i === data.length - 1
      ? svg('text', { x: m.left + i * slotW + slotW / 2, y: H - 8, 'text-anchor': 'middle' }, fmtClock(p.t))
      : null));

    const chart = svg('svg', {
      class: 'chart',
      id: 'chart',
      viewBox: `0 0 ${W} ${H}`,
      role: 'img',
      'aria-labelledby': 'chart-title chart-desc',
    },
    svg('title', { id: 'chart-title' }, 'Paid and failed payouts per minute'),
    svg('desc', { id: 'chart-desc' }, summary),
    grid, bars, xLabels,
    totalPaid + totalFailed === 0
      ? svg('text', { class: 'empty-text', x: m.left + pw / 2, y: m.top + ph / 2, 'text-anchor': 'middle' }, 'Nothing paid or failed in the last hour')
      : null);

    const table = el('div', { class: 'table-wrap' },
      el('table', {},
        el('caption', { class: 'sr-only' }, 'Paid and failed payouts per minute, oldest first'),
        el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'Minute'), el('th', { scope: 'col', class: 'num' }, 'Paid'), el('th', { scope: 'col', class: 'num' }, 'Failed'))),
        el('tbody', {}, data.map((p) => el('tr', {},
          el('td', { class: 'time' }, fmtClock(p.t)),
          el('td', { class: 'num' }, fmtInt(p.paid)),
          el('td', { class: 'num' }, fmtInt(p.failed)))))));

    return el('div', { class: 'card' },
      el('div', { class: 'card-head' },
        el('h2', { id: 'h-chart' }, 'Paid and failed per minute'),
        el('ul', { class: 'legend', 'aria-label': 'Legend' },
          el('li', {}, el('span', { class: 'swatch swatch-paid', 'aria-hidden': 'true' }), 'paid'),
          el('li', {}, el('span', { class: 'swatch swatch-failed', 'aria-hidden': 'true' }), 'failed')),
        el('p', { class: 'totals' }, `in these 60 minutes: ${fmtInt(totalPaid)} paid · ${fmtInt(totalFailed)} failed`)),
      el('div', { class: 'card-body' },
        chart,
        el('details', { class: 'data' }, el('summary', {}, 'Show the numbers as a table'), table)));
  }

  function workersCard(workers, generatedAt) {
    const now = new Date(generatedAt).getTime() || Date.now();
    const alive = workers.filter((w) => w.alive).length;
    const head = el('div', { class: 'card-head' },
      el('h3', { id: 'h-workers' }, 'Workers'),
      el('p', { class: 'totals' }, `${alive} of ${workers.length} alive`));
    if (!workers.length) {
      return el('div', { class: 'card' }, head, el('p', { class: 'empty' }, 'No worker has reported a heartbeat.'));
    }
    return el('div', { class: 'card', 'aria-labelledby': 'h-workers', role: 'group' }, head,
      el('div', { class: 'card-body' },
        el('div', { class: 'table-wrap' },
          el('table', { id: 'workers-table' },
            el('caption', { class: 'sr-only' }, 'Workers and their last heartbeat'),
            el('thead', {}, el('tr', {},
              el('th', { scope: 'col' }, 'Worker'),
              el('th', { scope: 'col' }, 'Last heartbeat'),
              el('th', { scope: 'col', class: 'num' }, 'In flight'),
              el('th', { scope: 'col' }, 'State'))),
            el('tbody', {}, workers.map((w) => el('tr', {},
              el('td', { class: 'mono' }, w.name),
              el('td', { class: 'time' }, w.last_heartbeat
                ? el('time', { datetime: w.last_heartbeat, title: w.last_heartbeat }, fmtAgo(w.last_heartbeat, now))
                : nil()),
              el('td', { class: 'num' }, fmtInt(w.in_flight)),
              el('td', {}, el('span', { class: `badge ${w.alive ? 'badge-alive' : 'badge-dead'}` }, w.alive ? 'alive' : 'stale')))))))));
  }

  // ---------- Payouts list ----------

  function readFilters(params) {
    const f = {};
    for (const k of FILTER_KEYS) {
      const v = params.get(k);
      if (v) f[k] = v;
    }
    return f;
  }

  function filterQuery(filters) {
    const q = new URLSearchParams();
    for (const k of FILTER_KEYS) if (filters[k]) q.set(k, filters[k]);
    return q;
  }

  function field(id, label, input, hint) {
    return el('div', { class: 'field' }, el('label', { for: id }, label, hint ? el('span', { class: 'hint' }, ` ${hint}`) : null), input);
  }

  function filterForm(filters, limit) {
    const status = el('select', { id: 'f-status', name: 'status' },
      el('option', { value: '' }, 'Any status'),
      STATUSES.map((s) => el('option', { value: s, selected: filters.status === s }, s)));
    const ranges = RANGES.map(([key, label]) => el('fieldset', { class: 'range' },
      el('legend', {}, label),
      el('div', { class: 'range-inputs' },
        ['from', 'to'].map((end) => {
          const id = `f-${key}-${end}`;
          return el('div', { class: 'field' },
            el('label', { for: id }, end === 'from' ? 'From' : 'Before'),
            el('input', {
              id,
              name: `${key}_${end}`,
              type: 'datetime-local',
              step: '1',
              value: rfc3339ToLocal(filters[`${key}_${end}`]),
            }));
        }))));
    const tz = Intl.DateTimeFormat().resolvedOptions().timeZone || 'local time';
    const form = el('form', { id: 'filters', class: 'card filters', 'aria-label': 'Filter payouts' },
      el('div', { class: 'filter-grid' },
        field('f-status', 'Status', status),
        field('f-payee', 'Payee ID', el('input', {
          id: 'f-payee', name: 'payee_id', type: 'text', inputmode: 'numeric', pattern: '[0-9]*',
          autocomplete: 'off', value: filters.payee_id || '',
        })),
        field('f-currency', 'Currency', el('input', {
          id: 'f-currency', name: 'currency', type: 'text', maxlength: '3', pattern: '[A-Za-z]{3}',
          placeholder: 'EUR', autocomplete: 'off', value: filters.currency || '',
        })),
        field('f-failure-code', 'Failure code', el('input', {
          id: 'f-failure-code', name: 'failure_code', type: 'text', maxlength: '100',
          autocomplete: 'off', value: filters.failure_code || '',
        })),
        field('f-limit', 'Per page', el('select', { id: 'f-limit', name: 'limit' },
          PAGE_SIZES.map((n) => el('option', { value: n, selected: n === limit }, n)))),
        ranges),
      el('div', { class: 'filter-actions' },
        el('button', { type: 'submit', id: 'apply', class: 'button primary' }, 'Apply filters'),
        el('button', { type: 'button', id: 'reset', class: 'button', onclick: () => { window.location.hash = '#/payouts'; } }, 'Reset'),
        el('p', { class: 'hint' }, `Times are in your time zone (${tz}) and sent as UTC.`)));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const data = new FormData(form);
      const q = new URLSearchParams();
      for (const k of FILTER_KEYS) {
        let v = String(data.get(k) || '').trim();
        if (k.endsWith('_from') || k.endsWith('_to')) v = localToRfc3339(v);
        if (k === 'currency') v = v.toUpperCase();
        if (v) q.set(k, v);
      }
      const lim = String(data.get('limit') || DEFAULT_LIMIT);
      if (lim !== DEFAULT_LIMIT) q.set('limit', lim);
      const next = `#/payouts${q.toString() ? `?${q}` : ''}`;
      if (window.location.hash === next) route();
      else window.location.hash = next;
    });
    return form;
  }

  async function viewPayouts(gen, params) {
    const filters = readFilters(params);
    const limit = PAGE_SIZES.includes(params.get('limit')) ? params.get('limit') : DEFAULT_LIMIT;
    const key = `${filterQuery(filters)}&limit=${limit}`;
    if (state.pager.key !== key) state.pager = { key, cursor: null, stack: [] };

    const canBulk = role() === 'admin' && filters.status === 'failed';
    if (state.selectionKey !== String(filterQuery(filters))) {
      state.selected = new Set();
      state.selectionKey = String(filterQuery(filters));
    }
    const meta = el('p', { class: 'meta', id: 'payouts-meta', 'aria-live': 'polite' }, '');
    const canSelect = selecting();
    const selection = canSelect ? el('div', { class: 'actions', role: 'group', 'aria-label': 'Selected payouts' },
      el('span', { class: 'meta', id: 'selection-meta', 'aria-live': 'polite' }, ''),
      el('button', {
        type: 'button', id: 'bulk-cancel-selected', class: 'button danger', disabled: true,
        onclick: (ev) => bulkSelected(ev.currentTarget, 'cancel'),
      }, 'Cancel selected…'),
      role() === 'admin' ? el('button', {
        type: 'button', id: 'bulk-retry-selected', class: 'button', disabled: true,
        onclick: (ev) => bulkSelected(ev.currentTarget, 'retry'),
      }, 'Retry selected…') : null,
      el('button', {
        type: 'button', id: 'clear-selection', class: 'button ghost', disabled: true,
        onclick: () => { state.selected.clear(); syncSelection(); },
      }, 'Clear selection')) : null;
    const toolbar = el('div', { class: 'toolbar' }, meta, el('span', { class: 'spacer' }),
      selection,
      canBulk ? el('button', {
        type: 'button', id: 'bulk-retry', class: 'button danger',
        onclick: (ev) => bulkRetry(ev.currentTarget, filters),
      }, 'Retry all matching…') : null,
      liveToggle());
    const results = el('div', { id: 'payouts-results' }, el('p', { class: 'loading' }, 'Loading…'));
    mount(el('section', { id: 'payouts' },
      viewHead('Payouts', el('p', { class: 'meta' }, 'Newest first')),
      filterForm(filters, limit),
      toolbar,
      results));
    await loadPayoutsPage(gen, filters, limit);
  }

  // `quiet`: a live refresh, which changes the page only when the payouts did.
  async function loadPayoutsPage(gen, filters, limit, quiet = false) {
    const q = filterQuery(filters);
    q.set('limit', limit);
    if (state.pager.cursor) q.set('cursor', state.pager.cursor);
    const results = $('#payouts-results');
    const again = () => loadPayoutsPage(gen, filters, limit, true);
    if (!quiet) results.setAttribute('aria-busy', 'true');
    let page;
    try {
      page = await api(`/api/v1/payouts?${q}`);
    } catch (e) {
      if (gen !== state.gen || e.status === 401) return;
      if (quiet) {
        scheduleRefresh(gen, again);
        return;
      }
      results.removeAttribute('aria-busy');
      results.replaceChildren(el('p', { class: 'empty' }, 'The payouts could not be loaded.'));
      showAlert(sentence(e.message));
      return;
    }
    if (gen !== state.gen) return;
    scheduleRefresh(gen, again);
    const seen = JSON.stringify([q.toString(), page]);
    if (quiet && results.dataset.seen === seen) return;
    results.dataset.seen = seen;
    results.removeAttribute('aria-busy');
    const items = page.items || [];
    const pageNo = state.pager.stack.length + 1;
    const filtered = Object.keys(filters).length > 0;
    $('#payouts-meta').textContent = items.length
      ? `Page ${pageNo}: ${items.length} payout${items.length === 1 ? '' : 's'}${filtered ? ' matching the filters' : ''}`
      : '';

    const table = items.length
      ? el('div', { class: 'table-wrap' }, el('table', { id: 'payouts-table' },
        el('caption', { class: 'sr-only' }, 'Payouts, newest first'),
        el('thead', {}, el('tr', {},
          selecting() ? el('th', { scope: 'col', class: 'select' }, el('input', {
            type: 'checkbox', id: 'select-all', 'aria-label': 'Select every payout on this page',
            onchange: (ev) => {
              for (const p of items) {
                if (ev.currentTarget.checked) state.selected.add(p.id);
                else state.selected.delete(p.id);
              }
              syncSelection();
            },
          })) : null,
          el('th', { scope: 'col' }, 'ID'),
          el('th', { scope: 'col' }, 'Payee'),
          el('th', { scope: 'col', class: 'num' }, 'Amount'),
          el('th', { scope: 'col' }, 'Status'),
          el('th', { scope: 'col' }, 'Due'),
          el('th', { scope: 'col', class: 'num' }, 'Attempt'),
          el('th', { scope: 'col' }, 'Failure code'),
          el('th', { scope: 'col' }, 'Updated'))),
        el('tbody', {}, items.map((p) => el('tr', { 'data-id': p.id },
          selecting() ? el('td', { class: 'select' }, el('input', {
            type: 'checkbox', class: 'row-select', 'data-id': p.id, 'aria-label': `Select payout #${p.id}`,
            checked: state.selected.has(p.id),
            onchange: (ev) => {
              if (ev.currentTarget.checked) state.selected.add(p.id);
              else state.selected.delete(p.id);
              syncSelection();
            },
          })) : null,
          el('td', { class: 'id' }, el('a', { href: `#/payouts/${encodeURIComponent(p.id)}` }, `#${p.id}`)),
          el('td', { class: 'num' }, el('a', { href: `#/payees/${encodeURIComponent(p.payee_id)}` }, String(p.payee_id))),
          el('td', { class: 'num amount' }, amount(p)),
          el('td', { class: 'status' }, badge(p.status)),
          el('td', { class: 'time' }, timeEl(p.due_at)),
          el('td', { class: 'num' }, String(p.attempt)),
          el('td', { class: 'mono' }, orNil(p.failure_code)),
          el('td', { class: 'time' }, timeEl(p.updated_at)))))))
      : el('div', { class: 'card' }, el('p', { class: 'empty', id: 'payouts-empty' },
        filtered ? 'No payouts match these filters.' : 'There are no payouts yet.'));

    const prev = el('button', {
      type: 'button', id: 'prev-page', class: 'button', disabled: state.pager.stack.length === 0,
      onclick: () => {
        state.pager.cursor = state.pager.stack.pop() || null;
        loadPayoutsPage(state.gen, filters, limit);
      },
    }, '← Previous page');
    const next = el('button', {
      type: 'button', id: 'next-page', class: 'button', disabled: !page.next_cursor,
      onclick: () => {
        state.pager.stack.push(state.pager.cursor);
        state.pager.cursor = page.next_cursor;
        loadPayoutsPage(state.gen, filters, limit);
      },
    }, 'Next page →');
    const pager = el('nav', { class: 'pager', 'aria-label': 'Pages' },
      el('span', { class: 'page' }, `Page ${pageNo}`), prev, next);
    results.replaceChildren(table, items.length || pageNo > 1 ? pager : null);
    syncSelection();
  }

  function selecting() {
    return roleMay('cancel');
  }

  // The checkboxes, the row highlight and the toolbar follow state.selected.
  function syncSelection() {
    const n = state.selected.size;
    const boxes = [...document.querySelectorAll('#payouts-table input.row-select')];
    for (const b of boxes) {
      b.checked = state.selected.has(Number(b.dataset.id));
      b.closest('tr').classList.toggle('selected', b.checked);
    }
    const all = $('#select-all');
    if (all) {
      const on = boxes.filter((b) => b.checked).length;
      all.checked = boxes.length > 0 && on === boxes.length;
      all.indeterminate = on > 0 && on < boxes.length;
    }
    const meta = $('#selection-meta');
    if (meta) meta.textContent = n ? `${fmtInt(n)} selected` : '';
    for (const id of ['bulk-cancel-selected', 'bulk-retry-selected', 'clear-selection']) {
      const b = document.getElementById(id);
      if (b) b.disabled = n === 0;
    }
  }

  // Cancel or retry the selected payouts: a dry run says how many the action
  // applies to, the operator confirms, then each goes through the single action.
  async function bulkSelected(button, action) {
    clearMessages();
    const ids = [...state.selected];
    if (!ids.length) return;
    const path = action === 'cancel' ? '/api/v1/payouts/bulk-cancel' : '/api/v1/payouts/bulk-retry';
    button.disabled = true;
    button.setAttribute('aria-busy', 'true');
    try {
      const dry = await api(path, { method: 'POST', body: { ids, dry_run: true } });
      const verb = action === 'cancel' ? 'cancel' : 'retry';
      if (!dry.matched) {
        showNotice(`None of the ${fmtInt(dry.selected)} selected payouts can be ${action === 'cancel' ? 'cancelled' : 'retried'} now.`);
        return;
      }
      const left = dry.selected - dry.matched;
      const why = action === 'cancel'
        ? 'paid, in flight or already finished'
        : 'not failed, or paid before they failed (those are retried one by one, by name)';
      const { ok, reason } = await confirmDialog({
        title: action === 'cancel' ? 'Cancel the selected payouts?' : 'Retry the selected payouts?',
        message: [el('span', { class: 'dialog-count' },
          `This will ${verb} ${fmtInt(dry.matched)} of the ${fmtInt(dry.selected)} selected payout${dry.selected === 1 ? '' : 's'}.`),
        left ? ` ${fmtInt(left)} ${left === 1 ? 'is' : 'are'} left alone (${why}).` : '',
        action === 'cancel' ? ' Their payees will not be paid by them. This cannot be undone.'
          : ' Each goes back to the queue with a fresh attempt budget.'],
        ok: action === 'cancel' ? `Cancel ${fmtInt(dry.matched)}` : `Retry ${fmtInt(dry.matched)}`,
        dismiss: action === 'cancel' ? 'Keep them' : 'Cancel',
        danger: action === 'cancel',
        reason: action === 'cancel',
      });
      if (!ok) return;
      const body = { ids, dry_run: false };
      if (reason) body.reason = reason;
      const done = await api(path, { method: 'POST', body });
      state.selected.clear();
      await route();
      const n = action === 'cancel' ? done.cancelled : done.retried;
      const changed = (done.changed || []).length;
      showNotice(`${action === 'cancel' ? 'Cancelled' : 'Retried'} ${fmtInt(n)} payout${n === 1 ? '' : 's'}` +
        `${changed ? `; ${fmtInt(changed)} changed meanwhile and ${changed === 1 ? 'was' : 'were'} left alone` : ''}.`);
      // A cancel the gateway check refused (the money moved, or the gateway
      // could not be asked) is an error to read, payout by payout.
      const refused = done.refused || [];
      if (refused.length) {
        showAlert(`${fmtInt(refused.length)} not cancelled: ${refused.map((r) => sentence(r.error)).join(' ')}`);
      }
    } catch (e) {
      if (e.status !== 401) showAlert(sentence(e.message));
    } finally {
      button.removeAttribute('aria-busy');
      syncSelection();
    }
  }

  async function bulkRetry(button, filters) {
    clearMessages();
    button.disabled = true;
    button.setAttribute('aria-busy', 'true');
    const filter = {};
    for (const k of FILTER_KEYS) if (filters[k]) filter[k] = String(filters[k]);
    // The server refuses a bulk retry that does not narrow the failed set.
    const narrowing = ['payee_id', 'currency', 'failure_code', 'created_from', 'created_to', 'due_from', 'due_to'];
    if (!narrowing.some((k) => filter[k])) {
      showNotice('Choose a payee, currency, failure code or time range first: a bulk retry of every failed payout is refused.');
      button.disabled = false;
      button.removeAttribute('aria-busy');
      return;
    }
    try {
      const dry = await api('/api/v1/payouts/bulk-retry', { method: 'POST', body: { filter, dry_run: true } });
      if (!dry.matched) {
        showNotice('No failed payouts match these filters; nothing to retry.');
        return;
      }
      const capped = dry.more_than_cap
        ? ` More match; one bulk retry moves at most ${fmtInt(dry.cap)}, so run it again afterwards.` : '';
      const { ok } = await confirmDialog({
        title: 'Retry all matching payouts?',
        message: [el('span', { class: 'dialog-count' }, `This will retry ${fmtInt(dry.matched)} payout${dry.matched === 1 ? '' : 's'}.`),
          ' Each failed payout matching the filters goes back to the queue with a fresh attempt budget; ' +
          `payouts that change status meanwhile are left alone.${capped}`],
        ok: `Retry ${fmtInt(dry.matched)}`,
      });
      if (!ok) return;
      const done = await api('/api/v1/payouts/bulk-retry', { method: 'POST', body: { filter, dry_run: false } });
      await route();
      showNotice(`Retried ${fmtInt(done.retried)} of ${fmtInt(done.matched)} matching payouts.`);
    } catch (e) {
      if (e.status !== 401) showAlert(sentence(e.message));
    } finally {
      button.disabled = false;
      button.removeAttribute('aria-busy');
    }
  }

  // ---------- One payout ----------

  async function viewPayout(gen, id) {
    let detail;
    try {
      detail = await api(`/api/v1/payouts/${encodeURIComponent(id)}`);
    } catch (e) {
      if (gen !== state.gen) return;
      if (e.status === 404) {
        mount(el('section', { id: 'payout-missing' },
          viewHead(`Payout #${id}`),
          el('p', {}, `There is no payout #${id}. `, el('a', { href: state.lastPayoutsHash }, 'Back to payouts'), '.')));
        return;
      }
      failedView(`Payout #${id}`, e);
      return;
    }
    if (gen !== state.gen) return;
    renderPayout(detail);
  }

  function renderPayout(detail) {
    const p = detail.payout;
    const allowed = (detail.actions || []).filter((a) => ACTIONS[a] && roleMay(a));
    const actions = el('div', { class: 'actions', role: 'group', 'aria-label': 'Actions' },
      allowed.map((a) => el('button', {
        type: 'button',
        id: `action-${a}`,
        class: a === 'cancel' ? 'button danger' : 'button primary',
        onclick: () => runAction(p, a),
      }, ACTIONS[a].label)));

    const payee = detail.payee;
    const fields = [
      ['ID', String(p.id)],
      ['Payee', payee
        ? [`#${p.payee_id} `, payee.name, el('span', { class: 'muted' }, ` · ${payee.gateway_account}`),
          payee.status && payee.status !== 'active' ? [' ', badge(payee.status)] : null]
        : `#${p.payee_id}`],
      ['Amount', amount(p)],
      ['Status', badge(p.status)],
      ['Due', timeEl(p.due_at)],
      ['Attempt', String(p.attempt)],
      ['Retry base', String(p.retry_base)],
      ['Next attempt', timeEl(p.next_attempt_at)],
      ['Lease owner', orNil(p.lease_owner)],
      ['Lease until', timeEl(p.lease_until)],
      ['Idempotency key', detail.idempotency_key ? el('span', { class: 'mono' }, detail.idempotency_key) : nil()],
      ['Gateway transfer', p.gateway_transfer_id ? el('span', { class: 'mono' }, p.gateway_transfer_id) : nil()],
      ['Failure code', p.failure_code ? el('span', { class: 'mono' }, p.failure_code) : nil()],
      ['Failure message', orNil(p.failure_message)],
      ['Created', timeEl(p.created_at)],
      ['Updated', timeEl(p.updated_at)],
      ['Paid at', timeEl(p.paid_at)],
    ];

    const failure = p.status === 'failed' && (p.failure_code || p.failure_message)
      ? el('p', { class: 'failure-box' }, el('strong', {}, p.failure_code || 'failed'), p.failure_message ? `: ${p.failure_message}` : '')
      : null;

    const events = detail.events || [];
    const timeline = events.length
      ? el('ol', { class: 'timeline', id: 'timeline' }, events.map((ev) => el('li', { class: `to-${ev.to_status}` },
        el('div', { class: 'event-head' },
          timeEl(ev.at),
          ev.from_status ? [badge(ev.from_status), el('span', { class: 'arrow', 'aria-label': 'to' }, '→')] : el('span', { class: 'muted' }, 'created as'),
          badge(ev.to_status)),
        el('p', { class: 'event-meta' },
          'by ', el('span', { class: 'actor' }, ev.actor),
          ev.reason ? ` · ${ev.reason}` : '',
          ev.attempt !== null && ev.attempt !== undefined ? ` · attempt ${ev.attempt}` : ''))))
      : el('p', { class: 'empty' }, 'No events recorded.');

    const attempts = detail.attempts || [];
    const attemptsTable = attempts.length
      ? el('div', { class: 'table-wrap' }, el('table', { id: 'attempts-table' },
        el('caption', { class: 'sr-only' }, 'Attempts'),
        el('thead', {}, el('tr', {},
          el('th', { scope: 'col', class: 'num' }, '#'),
          el('th', { scope: 'col' }, 'Started'),
          el('th', { scope: 'col' }, 'Finished'),
          el('th', { scope: 'col', class: 'num' }, 'Took'),
          el('th', { scope: 'col' }, 'Outcome'),
          el('th', { scope: 'col' }, 'Worker'),
          el('th', { scope: 'col' }, 'Reason'))),
        el('tbody', {}, attempts.map((a) => el('tr', {},
          el('td', { class: 'num' }, String(a.attempt)),
          el('td', { class: 'time' }, timeEl(a.started_at)),
          el('td', { class: 'time' }, timeEl(a.finished_at)),
          el('td', { class: 'num' }, a.started_at && a.finished_at
            ? fmtSeconds((new Date(a.finished_at) - new Date(a.started_at)) / 1000) : nil()),
          el('td', {}, a.outcome ? badge(a.outcome) : el('span', { class: 'muted' }, 'in progress')),
          el('td', { class: 'mono' }, orNil(a.worker)),
          el('td', { class: 'message' }, orNil(a.reason)))))))
      : el('p', { class: 'empty' }, 'No attempts yet.');

    document.title = `Payout #${p.id} · Payouts admin`;
    mount(el('section', { id: 'payout', 'data-id': p.id },
      el('a', { class: 'crumb', href: state.lastPayoutsHash }, '← Payouts'),
      el('div', { class: 'view-head payout-title' },
        el('h1', { tabindex: '-1' }, `Payout #${p.id}`),
        el('span', { id: 'payout-status', class: `badge badge-${p.status}` }, p.status),
        el('span', { class: 'amount-big' }, amount(p)),
        actions),
      el('div', { class: 'payout-grid' },
        el('section', { class: 'card', 'aria-labelledby': 'h-fields' },
          el('div', { class: 'card-head' }, el('h2', { id: 'h-fields' }, 'Details')),
          el('div', { class: 'card-body' },
            failure,
            el('dl', { class: 'fields' }, fields.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)])))),
        el('section', { class: 'card', 'aria-labelledby': 'h-history' },
          el('div', { class: 'card-head' }, el('h2', { id: 'h-history' }, 'History')),
          el('div', { class: 'card-body' }, timeline))),
      el('section', { class: 'section', 'aria-labelledby': 'h-attempts' },
        el('h2', { id: 'h-attempts' }, 'Attempts'),
        attemptsTable),
      linesSection(detail.lines || []),
      webhooksSection(detail.webhooks || [])));
  }

  // The line items of a settlement payout: each earning, commission, bonus,
  // deductions, carried balances, fee (they sum to the amount).
  function linesSection(lines) {
    if (!lines.length) return null;
    return el('section', { class: 'section', 'aria-labelledby': 'h-lines' },
      el('h2', { id: 'h-lines' }, 'Line items'),
      el('div', { class: 'table-wrap' }, el('table', { id: 'lines-table' },
        el('caption', { class: 'sr-only' }, 'How settlement computed this payout, line by line'),
        el('thead', {}, el('tr', {},
          el('th', { scope: 'col' }, 'Kind'),
          el('th', { scope: 'col' }, 'Description'),
          el('th', { scope: 'col', class: 'num' }, 'Amount'))),
        el('tbody', {}, lines.map((l) => el('tr', {},
          el('td', {}, l.kind),
          el('td', { class: 'message' }, l.description),
          el('td', { class: 'num' }, String(l.amount))))))));
  }

  function webhooksSection(hooks) {
    if (!hooks.length) return null;
    return el('section', { class: 'section', 'aria-labelledby': 'h-webhooks' },
      el('h2', { id: 'h-webhooks' }, 'Webhooks that named it'),
      el('div', { class: 'table-wrap' }, el('table', { id: 'webhooks-table' },
        el('caption', { class: 'sr-only' }, 'Gateway webhooks about this payout, oldest first'),
        el('thead', {}, el('tr', {},
          el('th', { scope: 'col' }, 'Received'),
          el('th', { scope: 'col' }, 'Source'),
          el('th', { scope: 'col' }, 'Event'),
          el('th', { scope: 'col' }, 'Type'),
          el('th', { scope: 'col' }, 'Outcome'))),
        el('tbody', {}, hooks.map((h) => el('tr', {},
          el('td', { class: 'time' }, timeEl(h.received_at)),
          el('td', {}, h.source),
          el('td', { class: 'mono' }, h.event_id),
          el('td', { class: 'mono' }, h.type),
          el('td', {}, h.outcome)))))));
  }

  async function runAction(p, action) {
    const spec = ACTIONS[action];
    const { ok, reason } = await confirmDialog({
      title: spec.title(p.id),
      message: spec.message(p),
      ok: spec.ok,
      dismiss: spec.dismiss,
      danger: spec.danger,
      reason: true,
    });
    if (!ok) return;
    const gen = state.gen;
    for (const b of document.querySelectorAll('#payout .actions button')) b.disabled = true;
    clearMessages();
    let message = null;
    try {
      const r = await api(`/api/v1/payouts/${encodeURIComponent(p.id)}/${action}`, {
        method: 'POST',
        body: reason ? { reason } : {},
      });
      message = `Payout #${r.id} moved from ${r.from} to ${r.to}.`;
    } catch (e) {
      if (e.status === 401) return;
      showAlert(sentence(e.message, e.body && e.body.status));
    }
    if (gen !== state.gen) return;
    await viewPayout(gen, String(p.id));
    if (message) showNotice(message);
    const h1 = $('#view h1');
    if (h1) h1.focus();
  }

  // ---------- Failures ----------

  async function viewFailures(gen, quiet = false) {
    if (!quiet) mount(el('section', { id: 'failures' }, viewHead('Failures'), el('p', { class: 'loading' }, 'Loading…')));
    let data;
    try {
      data = await api('/api/v1/failures');
    } catch (e) {
      if (gen !== state.gen) return;
      if (quiet) scheduleRefresh(gen, () => viewFailures(gen, true));
      else failedView('Failures', e);
      return;
    }
    if (gen !== state.gen) return;
    scheduleRefresh(gen, () => viewFailures(gen, true));
    const seen = JSON.stringify(data);
    const shown = $('#failures');
    if (quiet && shown && shown.dataset.seen === seen) return;
    const groups = data.groups || [];
    const total = groups.reduce((a, g) => a + g.count, 0);
    const body = groups.length
      ? el('div', { class: 'table-wrap' }, el('table', { id: 'failures-table' },
        el('caption', { class: 'sr-only' }, 'Failed payouts grouped by failure code, largest group first'),
        el('thead', {}, el('tr', {},
          el('th', { scope: 'col' }, 'Failure code'),
          el('th', { scope: 'col', class: 'num' }, 'Payouts'),
          el('th', { scope: 'col' }, 'Oldest'),
          el('th', { scope: 'col' }, 'Newest'),
          el('th', { scope: 'col' }, 'Example message'))),
        el('tbody', {}, groups.map((g) => {
          const q = new URLSearchParams({ status: 'failed', failure_code: g.failure_code });
          return el('tr', { 'data-code': g.failure_code },
            el('td', { class: 'mono' }, el('a', { href: `#/payouts?${q}` }, g.failure_code)),
            el('td', { class: 'num' }, fmtInt(g.count)),
            el('td', { class: 'time' }, timeEl(g.oldest)),
            el('td', { class: 'time' }, timeEl(g.newest)),
            el('td', { class: 'message' }, orNil(g.example_message)));
        }))))
      : el('div', { class: 'card' }, el('p', { class: 'empty' }, 'No failed payouts. Nothing needs attention.'));
    mount(el('section', { id: 'failures', 'data-seen': seen },
      viewHead('Failures', el('p', { class: 'meta' },
        groups.length ? `${fmtInt(total)} failed payout${total === 1 ? '' : 's'} in ${groups.length} group${groups.length === 1 ? '' : 's'}` : ''),
      el('span', { class: 'spacer' }), liveToggle()),
      body));
  }


  // ---------- Fleet pause (every page) ----------

  async function refreshFleet() {
    if (state.fleetTimer) clearTimeout(state.fleetTimer);
    state.fleetTimer = null;
    try {
      state.fleet = await api('/api/v1/fleet');
    } catch (e) {
      if (e.status === 401) return;
      state.fleet = null;
    }
    renderFleet();
    if (document.visibilityState !== 'hidden') {
      state.fleetTimer = setTimeout(refreshFleet, REFRESH_MS);
    }
  }

  function renderFleet() {
    const f = state.fleet;
    const banner = $('#fleet-banner');
    const admin = role() === 'admin';
    const pause = $('#fleet-pause');
    pause.hidden = !admin || !f || f.paused;
    if (!f || !f.paused) {
      banner.replaceChildren();
      delete document.body.dataset.fleet;
      return;
    }
    document.body.dataset.fleet = 'paused';
    const by = f.by;
    const reason = by && by.detail && by.detail.reason;
    banner.replaceChildren(el('div', { class: 'fleet-banner-inner', id: 'fleet-paused' },
      el('span', {}, '⏸ The fleet is paused: no payout is sent until it is resumed.'),
      el('span', { class: 'muted' },
        by ? `Paused by ${by.actor}${reason ? ` (${reason})` : ''}; ` : 'Paused by the gateway guard (a rate limit or a platform problem); ',
        'ends by itself at ', timeEl(f.until), '.'),
      el('span', { class: 'spacer' }),
      admin ? el('button', { type: 'button', id: 'fleet-resume', class: 'button small primary', onclick: resumeFleet }, 'Resume fleet') : null));
  }

  async function pauseFleet() {
    const { ok, reason } = await confirmDialog({
      title: 'Pause the whole fleet?',
      message: 'No worker claims a payout or calls the gateway until the fleet is resumed (at most a week). ' +
        'Payouts keep their places; nothing fails for it.',
      ok: 'Pause fleet',
      dismiss: 'Keep running',
      danger: true,
      reason: true,
    });
    if (!ok) return;
    clearMessages();
    try {
      state.fleet = await api('/api/v1/fleet/pause', { method: 'POST', body: reason ? { reason } : {} });
      renderFleet();
      showNotice('The fleet is paused.');
    } catch (e) {
      if (e.status !== 401) showAlert(sentence(e.message));
    }
  }

  async function resumeFleet() {
    const { ok } = await confirmDialog({
      title: 'Resume the fleet?',
      message: 'Workers claim due payouts again within a second or two.',
      ok: 'Resume fleet',
    });
    if (!ok) return;
    clearMessages();
    try {
      state.fleet = await api('/api/v1/fleet/resume', { method: 'POST', body: {} });
      renderFleet();
      showNotice('The fleet is running again.');
    } catch (e) {
      if (e.status !== 401) showAlert(sentence(e.message));
    }
  }

  // ---------- Search ----------

  function hitLink(h) {
    return h.kind === 'payout' ? `#/payouts/${h.id}` : `#/payees/${h.id}`;
  }

  async function viewSearch(gen, q) {
    $('#search-q').value = q;
    mount(el('section', { id: 'search-view' }, viewHead('Search'), el('p', { class: 'loading' }, 'Searching…')));
    let data;
    try {
      data = await api(`/api/v1/search?${new URLSearchParams({ q })}`);
    } catch (e) {
      if (gen === state.gen) failedView('Search', e);
      return;
    }
    if (gen !== state.gen) return;
    const hits = data.results || [];
    // One thing found: go straight to it (the back button skips the search).
    if (hits.length === 1) {
      window.location.replace(hitLink(hits[0]));
      return;
    }
    const body = hits.length
      ? el('div', { class: 'table-wrap' }, el('table', { id: 'search-results' },
        el('caption', { class: 'sr-only' }, `What "${q}" names`),
        el('thead', {}, el('tr', {},
          el('th', { scope: 'col' }, 'Found'),
          el('th', { scope: 'col' }, 'Matched by'),
          el('th', { scope: 'col' }, 'Status'),
          el('th', { scope: 'col' }, 'Created'))),
        el('tbody', {}, hits.map((h) => el('tr', { 'data-kind': h.kind, 'data-id': h.id },
          el('td', {}, el('a', { href: hitLink(h) }, h.label)),
          el('td', {}, h.matched),
          el('td', {}, badge(h.status)),
          el('td', { class: 'time' }, timeEl(h.created_at)))))))
      : el('div', { class: 'card' }, el('p', { class: 'empty', id: 'search-empty' },
        `Nothing is named "${q}". Try a payout id, an idempotency key (payout_123), a transfer id, an account or a payee's name.`));
    mount(el('section', { id: 'search-view' },
      viewHead('Search', el('p', { class: 'meta' },
        hits.length ? `${hits.length}${hits.length >= data.max ? '+' : ''} results for "${q}"` : '')),
      body));
  }

  // ---------- Read-only views ----------

  function kv(rows) {
    return el('dl', { class: 'kv' }, rows.filter(Boolean).map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
  }

  function simpleTable(id, caption, head, rows) {
    return el('div', { class: 'table-wrap' }, el('table', { id },
      el('caption', { class: 'sr-only' }, caption),
      el('thead', {}, el('tr', {}, head.map(([label, cls]) => el('th', { scope: 'col', class: cls || null }, label)))),
      el('tbody', {}, rows)));
  }

  function money(v, currency) {
    return [el('span', { class: 'mono' }, String(v)), ' ', el('span', { class: 'currency' }, currency)];
  }

  // A plain list view: GET `path` (plus the hash's cursor), newest first,
  // live while shown; `render(items)` gives the table.
  async function listView(gen, { id, title, path, params, keys = [], render, empty, quiet = false }) {
    const q = new URLSearchParams();
    for (const k of keys.concat(['cursor'])) if (params.get(k)) q.set(k, params.get(k));
    const again = () => listView(gen, { id, title, path, params, keys, render, empty, quiet: true });
    if (!quiet) mount(el('section', { id }, viewHead(title), el('p', { class: 'loading' }, 'Loading…')));
    let page;
    try {
      page = await api(`${path}${q.toString() ? `?${q}` : ''}`);
    } catch (e) {
      if (gen !== state.gen) return;
      if (quiet) scheduleRefresh(gen, again);
      else failedView(title, e);
      return;
    }
    if (gen !== state.gen) return;
    scheduleRefresh(gen, again);
    const seen = JSON.stringify(page);
    const shown = document.getElementById(id);
    if (quiet && shown && shown.dataset.seen === seen) return;
    const items = page.items || [];
    const base = window.location.hash.split('?')[0];
    const nextQ = new URLSearchParams(q);
    if (page.next_cursor) nextQ.set('cursor', page.next_cursor);
    mount(el('section', { id, 'data-seen': seen },
      viewHead(title, el('span', { class: 'spacer' }), liveToggle()),
      items.length ? render(items) : el('div', { class: 'card' }, el('p', { class: 'empty' }, empty)),
      el('nav', { class: 'pager', 'aria-label': 'Pages' },
        q.get('cursor') ? el('a', { class: 'button', href: base + (keys.some((k) => q.get(k)) ? `?${new URLSearchParams(keys.filter((k) => q.get(k)).map((k) => [k, q.get(k)]))}` : '') }, '← Newest') : null,
        page.next_cursor ? el('a', { class: 'button', id: `${id}-next`, href: `${base}?${nextQ}` }, 'Older →') : null)));
  }

  function viewPayees(gen, params) {
    return listView(gen, {
      id: 'payees', title: 'Payees', path: '/api/v1/payees', params,
      empty: 'There are no payees yet.',
      render: (items) => simpleTable('payees-table', 'Payees, newest first',
        [['ID', 'num'], ['Name'], ['Gateway account'], ['Currency'], ['Status'], ['Created']],
        items.map((p) => el('tr', { 'data-id': p.id },
          el('td', { class: 'num' }, el('a', { href: `#/payees/${p.id}` }, `#${p.id}`)),
          el('td', {}, el('a', { href: `#/payees/${p.id}` }, p.name)),
          el('td', { class: 'mono' }, p.gateway_account),
          el('td', {}, p.currency),
          el('td', {}, badge(p.status)),
          el('td', { class: 'time' }, timeEl(p.created_at))))),
    });
  }

  function settlementRows(items) {
    return items.map((x) => el('tr', { 'data-id': x.id },
      el('td', { class: 'num' }, el('a', { href: `#/settlements/${x.id}` }, `#${x.id}`)),
      el('td', { class: 'num' }, el('a', { href: `#/payees/${x.payee_id}` }, String(x.payee_id))),
      el('td', { class: 'time' }, timeEl(x.period_start), ' → ', timeEl(x.period_end)),
      el('td', {}, badge(x.outcome)),
      el('td', { class: 'num' }, money(x.net, x.currency)),
      el('td', { class: 'num' }, x.payout_id ? el('a', { href: `#/payouts/${x.payout_id}` }, `#${x.payout_id}`) : nil())));
  }

  const SETTLEMENT_HEAD = [['ID', 'num'], ['Payee', 'num'], ['Period'], ['Outcome'], ['Net', 'num'], ['Payout', 'num']];

  function viewSettlements(gen, params) {
    return listView(gen, {
      id: 'settlements', title: params.get('payee_id') ? `Settlements of payee #${params.get('payee_id')}` : 'Settlements',
      path: '/api/v1/settlements', params, keys: ['payee_id'],
      empty: 'No settlements yet.',
      render: (items) => simpleTable('settlements-table', 'Settlements, newest first', SETTLEMENT_HEAD, settlementRows(items)),
    });
  }

  function viewReconcile(gen, params) {
    return listView(gen, {
      id: 'reconcile', title: 'Reconcile runs', path: '/api/v1/reconcile-runs', params,
      empty: 'No reconciliation has run yet (payoutctl reconcile).',
      render: (items) => simpleTable('reconcile-table', 'Reconciliation runs, newest first',
        [['ID', 'num'], ['Finished'], ['Since'], ['Checked', 'num'], ['Fixed', 'num'], ['Mismatches'], ['By'], ['Result']],
        items.map((r) => {
          const found = Object.entries(r.mismatches || {}).filter(([, n]) => n > 0);
          return el('tr', { 'data-id': r.id, 'data-failed': String(r.failed) },
            el('td', { class: 'num' }, `#${r.id}`),
            el('td', { class: 'time' }, timeEl(r.finished_at)),
            el('td', { class: 'time' }, timeEl(r.since)),
            el('td', { class: 'num' }, fmtInt(r.checked)),
            el('td', { class: 'num' }, fmtInt(r.fixed)),
            el('td', { class: 'message' }, found.length ? found.map(([k, n]) => `${k.replaceAll('_', ' ')}: ${n}`).join(' · ') : 'none'),
            el('td', { class: 'mono' }, r.actor),
            el('td', {}, r.failed
              ? [el('span', { class: 'badge badge-failed' }, 'failed'), ' ', el('span', { class: 'message' }, r.error || '')]
              : el('span', { class: 'badge badge-paid' }, 'compared')));
        })),
    });
  }

  async function viewTokens(gen) {
    if (role() !== 'admin') {
      mount(el('section', { id: 'tokens' }, viewHead('Tokens'), el('p', {}, 'Only an admin sees the tokens.')));
      return;
    }
    mount(el('section', { id: 'tokens' }, viewHead('Tokens'), el('p', { class: 'loading' }, 'Loading…')));
    let data;
    try {
      data = await api('/api/v1/tokens');
    } catch (e) {
      if (gen === state.gen) failedView('Tokens', e);
      return;
    }
    if (gen !== state.gen) return;
    const now = Date.now();
    const tokens = data.tokens || [];
    mount(el('section', { id: 'tokens' },
      viewHead('Tokens', el('p', { class: 'meta' }, 'Read-only: create and revoke with payoutctl token or the API. Secrets are never shown again.')),
      simpleTable('tokens-table', 'API tokens',
        [['Name'], ['Role'], ['Created'], ['Last used'], ['Expires'], ['State']],
        tokens.map((t) => {
          let st = 'active';
          if (t.revoked_at) st = 'revoked';
          else if (t.expires_at && new Date(t.expires_at).getTime() <= now) st = 'expired';
          return el('tr', { 'data-name': t.name, 'data-state': st },
            el('td', { class: 'mono' }, t.name),
            el('td', {}, el('span', { class: `role role-${t.role}` }, t.role)),
            el('td', { class: 'time' }, timeEl(t.created_at)),
            el('td', { class: 'time' }, timeEl(t.last_used_at)),
            el('td', { class: 'time' }, timeEl(t.expires_at)),
            el('td', {}, el('span', { class: `badge badge-${st === 'active' ? 'paid' : 'cancelled'}` }, st)));
        }))));
  }

  async function viewPayee(gen, id) {
    let d;
    try {
      d = await api(`/api/v1/payees/${encodeURIComponent(id)}`);
    } catch (e) {
      if (gen !== state.gen) return;
      if (e.status === 404) {
        mount(el('section', { id: 'payee-missing' }, viewHead(`Payee #${id}`),
          el('p', {}, `There is no payee #${id}. `, el('a', { href: '#/payees' }, 'Back to payees'), '.')));
        return;
      }
      failedView(`Payee #${id}`, e);
      return;
    }
    if (gen !== state.gen) return;
    const p = d.payee;
    const t = d.terms || {};
    document.title = `${p.name} · Payouts admin`;
    mount(el('section', { id: 'payee', 'data-id': p.id },
      el('a', { class: 'crumb', href: '#/payees' }, '← Payees'),
      el('div', { class: 'view-head' }, el('h1', { tabindex: '-1' }, p.name), badge(p.status)),
      el('div', { class: 'payout-grid' },
        el('section', { class: 'card', 'aria-labelledby': 'h-payee' },
          el('div', { class: 'card-head' }, el('h2', { id: 'h-payee' }, 'Details')),
          el('div', { class: 'card-body' }, kv([
            ['ID', String(p.id)],
            ['Gateway account', el('span', { class: 'mono' }, p.gateway_account)],
            ['Currency', p.currency],
            ['Created', timeEl(p.created_at)],
            ['Payouts', el('a', { href: `#/payouts?payee_id=${p.id}` }, 'Its payouts')],
          ]))),
        el('section', { class: 'card', 'aria-labelledby': 'h-terms' },
          el('div', { class: 'card-head' }, el('h2', { id: 'h-terms' }, 'Terms')),
          el('div', { class: 'card-body', id: 'payee-terms' }, kv([
            ['Schedule', t.schedule || 'the policy default'],
            ['Payout method', orNil(t.payout_method)],
            ['Own minimums', (d.minimums || []).length
              ? d.minimums.map((m) => el('div', {}, money(m.amount, m.currency))) : 'the policy minimums'],
          ])))),
      el('section', { class: 'section', 'aria-labelledby': 'h-deductions' },
        el('h2', { id: 'h-deductions' }, 'Agreed deductions'),
        (d.deductions || []).length
          ? simpleTable('deductions-table', 'Deductions taken from every settlement', [['Label'], ['Amount', 'num'], ['Since']],
            d.deductions.map((x) => el('tr', {},
              el('td', {}, x.label),
              el('td', { class: 'num' }, money(x.amount, x.currency)),
              el('td', { class: 'time' }, timeEl(x.created_at)))))
          : el('p', { class: 'empty' }, 'None.')),
      el('section', { class: 'section', 'aria-labelledby': 'h-psettlements' },
        el('h2', { id: 'h-psettlements' }, 'Latest settlements ', el('a', { href: `#/settlements?payee_id=${p.id}` }, '(all)')),
        (d.settlements || []).length
          ? simpleTable('payee-settlements-table', 'Its latest settlements', SETTLEMENT_HEAD, settlementRows(d.settlements))
          : el('p', { class: 'empty' }, 'Not settled yet.'))));
  }

  async function viewSettlement(gen, id) {
    let d;
    try {
      d = await api(`/api/v1/settlements/${encodeURIComponent(id)}`);
    } catch (e) {
      if (gen !== state.gen) return;
      if (e.status === 404) {
        mount(el('section', { id: 'settlement-missing' }, viewHead(`Settlement #${id}`),
          el('p', {}, `There is no settlement #${id}. `, el('a', { href: '#/settlements' }, 'Back to settlements'), '.')));
        return;
      }
      failedView(`Settlement #${id}`, e);
      return;
    }
    if (gen !== state.gen) return;
    const x = d.settlement;
    const c = x.currency;
    document.title = `Settlement #${x.id} · Payouts admin`;
    mount(el('section', { id: 'settlement', 'data-id': x.id },
      el('a', { class: 'crumb', href: '#/settlements' }, '← Settlements'),
      el('div', { class: 'view-head' }, el('h1', { tabindex: '-1' }, `Settlement #${x.id}`), badge(x.outcome),
        el('span', { class: 'amount-big' }, money(x.net, c))),
      el('div', { class: 'payout-grid' },
        el('section', { class: 'card', 'aria-labelledby': 'h-sdetails' },
          el('div', { class: 'card-head' }, el('h2', { id: 'h-sdetails' }, 'Details')),
          el('div', { class: 'card-body' }, kv([
            ['Payee', d.payee ? el('a', { href: `#/payees/${x.payee_id}` }, `${d.payee.name} · ${d.payee.gateway_account}`) : `#${x.payee_id}`],
            ['Period', [timeEl(x.period_start), ' → ', timeEl(x.period_end)]],
            ['Schedule', x.schedule],
            ['Payout method', x.payout_method],
            ['Services', String(x.services)],
            ['Payout', x.payout_id ? el('a', { href: `#/payouts/${x.payout_id}` }, `#${x.payout_id}`) : nil()],
            ['Carried into', x.carried_into ? el('a', { href: `#/settlements/${x.carried_into}` }, `#${x.carried_into}`) : nil()],
            ['Remainder carried into', x.carried_out_into ? el('a', { href: `#/settlements/${x.carried_out_into}` }, `#${x.carried_out_into}`) : nil()],
            ['Returned', timeEl(x.returned_at)],
            ['By', el('span', { class: 'mono' }, x.actor)],
            ['Created', timeEl(x.created_at)],
          ]))),
        el('section', { class: 'card', 'aria-labelledby': 'h-sums' },
          el('div', { class: 'card-head' }, el('h2', { id: 'h-sums' }, 'Sums')),
          el('div', { class: 'card-body' }, kv([
            ['Gross', money(x.gross, c)],
            ['Payee share', [money(x.payee_share, c), ` (${x.payee_percent} % + ${x.bonus_percent} % bonus)`]],
            ['Platform commission', money(x.platform_commission, c)],
            ['Deductions', money(x.deductions, c)],
            ['Carried in', money(x.carried_in, c)],
            ['Fee', money(x.fee, c)],
            ['Net', money(x.net, c)],
            ['Kept in the balance (below the gateway\'s payout step)', money(x.carried_out, c)],
          ])))),
      el('section', { class: 'section', 'aria-labelledby': 'h-slines' },
        el('h2', { id: 'h-slines' }, 'Line items'),
        simpleTable('settlement-lines', 'The line items, in order; they sum to the net',
          [['#', 'num'], ['Kind'], ['Description'], ['Amount', 'num']],
          (d.lines || []).map((l) => el('tr', { 'data-kind': l.kind },
            el('td', { class: 'num' }, String(l.position)),
            el('td', {}, l.kind.replaceAll('_', ' ')),
            el('td', { class: 'message' }, l.description),
            el('td', { class: 'num' }, money(l.amount, c))))))));
  }

  // ---------- Outbound webhooks ----------

  // The event types an endpoint may ask for (the server checks again:
  // services::webhooks_out::EVENT_TYPES).
  const WEBHOOK_EVENT_TYPES = ['payout.created', 'payout.queued', 'payout.held', 'payout.in_transit',
    'payout.paid', 'payout.failed', 'payout.cancelled', 'payout.reversed',
    'settlement.created', 'earning.released'];
  const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };

  // Whether the session's role is `r` or above (the server checks again).
  function roleAtLeast(r) {
    return (ROLE_RANK[role()] || 0) >= ROLE_RANK[r];
  }

  function endpointState(e) {
    if (e.enabled) {
      return e.failing_since
        ? el('span', { class: 'badge badge-retrying', 'data-state': 'failing' }, 'failing')
        : el('span', { class: 'badge badge-paid', 'data-state': 'enabled' }, 'enabled');
    }
    return el('span', { class: 'badge badge-cancelled', 'data-state': 'disabled' }, 'disabled');
  }

  function eventTypes(types) {
    return (types || []).includes('*') ? 'every event type' : (types || []).join(', ');
  }

  // A secret the server shows once: kept only in this box (never in the
  // URL, storage or a later answer), gone when it is dismissed or the page
  // is left.
  function secretBox(title, secret, note) {
    const value = el('code', { class: 'secret', id: 'webhook-secret-value' }, secret);
    const copied = el('span', { class: 'hint', 'aria-live': 'polite' });
    const box = el('section', { class: 'card secret-box', id: 'webhook-secret', 'aria-labelledby': 'h-secret' },
      el('div', { class: 'card-head' }, el('h2', { id: 'h-secret' }, title)),
      el('div', { class: 'card-body' },
        el('p', {}, 'The signing secret is shown only now: copy it to the receiving service. ', note || ''),
        el('p', {}, value),
        el('div', { class: 'actions' },
          el('button', {
            type: 'button',
            class: 'button small',
            id: 'webhook-secret-copy',
            onclick: async () => {
              try {
                await navigator.clipboard.writeText(secret);
                copied.textContent = 'Copied.';
              } catch (e) {
                window.getSelection().selectAllChildren(value);
                copied.textContent = 'Selected: copy it with the keyboard.';
              }
            },
          }, 'Copy'),
          el('button', {
            type: 'button',
            class: 'button small',
            id: 'webhook-secret-done',
            onclick: () => box.remove(),
          }, 'I have stored it'),
          copied)));
    return box;
  }

  function webhookCreateForm(onCreated) {
    const url = el('input', {
      id: 'wh-url', name: 'url', type: 'url', required: true, maxlength: '2000', autocomplete: 'off',
      placeholder: 'https://platform.example/webhooks/payouts',
    });
    const description = el('input', { id: 'wh-description', name: 'description', type: 'text', maxlength: '200', autocomplete: 'off' });
    const all = el('input', { id: 'wh-all', type: 'checkbox', checked: true });
    const boxes = WEBHOOK_EVENT_TYPES.map((t) => el('input', { type: 'checkbox', class: 'wh-type', value: t, disabled: true }));
    all.addEventListener('change', () => {
      for (const b of boxes) b.disabled = all.checked;
    });
    const enabled = el('input', { id: 'wh-enabled', type: 'checkbox', checked: true });
    const error = el('p', { class: 'inline-error', id: 'wh-error', role: 'alert' });
    const submit = el('button', { type: 'submit', class: 'button primary', id: 'wh-create' }, 'Register endpoint');
    const form = el('form', { id: 'webhook-create', class: 'card filters', 'aria-labelledby': 'h-wh-new' },
      el('h2', { id: 'h-wh-new' }, 'New endpoint'),
      el('div', { class: 'filter-grid' },
        field('wh-url', 'URL', url, 'https://, or http:// to a loopback address'),
        field('wh-description', 'Description', description, 'optional, for people')),
      el('fieldset', { class: 'checks' },
        el('legend', {}, 'Event types'),
        el('label', {}, all, ' All (*), also types added later'),
        WEBHOOK_EVENT_TYPES.map((t, i) => el('label', {}, boxes[i], ' ', el('span', { class: 'mono' }, t)))),
      el('div', { class: 'checks' }, el('label', {}, enabled, ' Enabled: send messages to it at once')),
      el('div', { class: 'filter-actions' }, submit),
      error);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      error.textContent = '';
      const types = all.checked ? ['*'] : boxes.filter((b) => b.checked).map((b) => b.value);
      if (!types.length) {
        error.textContent = 'Choose at least one event type, or All.';
        return;
      }
      const body = { url: url.value.trim(), event_types: types, enabled: enabled.checked };
      if (description.value.trim()) body.description = description.value.trim();
      submit.disabled = true;
      submit.setAttribute('aria-busy', 'true');
      try {
        const r = await api('/api/v1/webhook-endpoints', { method: 'POST', body });
        form.reset();
        for (const b of boxes) b.disabled = true;
        onCreated(r);
      } catch (e) {
        if (e.status !== 401) error.textContent = sentence(e.message);
      } finally {
        submit.disabled = false;
        submit.removeAttribute('aria-busy');
      }
    });
    return form;
  }

  async function viewWebhooks(gen, quiet = false) {
    if (!quiet) {
      const admin = roleAtLeast('admin');
      mount(el('section', { id: 'webhooks' },
        viewHead('Webhooks', el('p', { class: 'meta' }, 'Where the fleet tells the platform of payout events, signed (Standard Webhooks)'),
          el('span', { class: 'spacer' }), liveToggle()),
        el('div', { id: 'webhook-secret-slot' }),
        el('div', { id: 'webhook-endpoints' }, el('p', { class: 'loading' }, 'Loading…')),
        admin ? webhookCreateForm((r) => {
          $('#webhook-secret-slot').replaceChildren(secretBox(`Endpoint #${r.endpoint.id} registered`, r.secret));
          showNotice(`Endpoint #${r.endpoint.id} registered.`);
          viewWebhooks(gen, true);
          $('#webhook-secret').scrollIntoView({ block: 'nearest' });
        }) : el('p', { class: 'muted', id: 'webhooks-readonly' },
          role() === 'operator' ? 'Operators may replay messages; an admin registers and changes endpoints.'
            : 'Read-only: an admin registers and changes endpoints.')));
    }
    let data;
    try {
      data = await api('/api/v1/webhook-endpoints');
    } catch (e) {
      if (gen !== state.gen) return;
      if (quiet) scheduleRefresh(gen, () => viewWebhooks(gen, true));
      else failedView('Webhooks', e);
      return;
    }
    if (gen !== state.gen) return;
    scheduleRefresh(gen, () => viewWebhooks(gen, true));
    const box = $('#webhook-endpoints');
    const seen = JSON.stringify(data);
    if (!box || box.dataset.seen === seen) return;
    box.dataset.seen = seen;
    const list = data.endpoints || [];
    box.replaceChildren(list.length
      ? simpleTable('webhook-endpoints-table', 'Webhook endpoints, oldest first',
        [['ID', 'num'], ['URL'], ['Events'], ['State'], ['Failing since'], ['Disabled because']],
        list.map((e) => el('tr', { 'data-id': e.id, 'data-enabled': String(e.enabled) },
          el('td', { class: 'num' }, String(e.id)),
          el('td', { class: 'url' }, el('a', { href: `#/webhooks/${e.id}` }, e.url),
            e.description ? el('div', { class: 'muted' }, e.description) : null),
          el('td', { class: 'mono' }, eventTypes(e.event_types)),
          el('td', {}, endpointState(e)),
          el('td', { class: 'time' }, timeEl(e.failing_since)),
          el('td', { class: 'message' }, orNil(e.disabled_reason)))))
      : el('div', { class: 'card' }, el('p', { class: 'empty', id: 'webhooks-empty' }, 'No endpoint is registered: the platform hears of nothing.')));
  }

  // What the last attempt of a message says, short.
  function lastOutcome(d) {
    if (d.last_status !== null && d.last_status !== undefined) return `HTTP ${d.last_status}`;
    return orNil(d.last_error);
  }

  // The delivery log of one message: its attempts, oldest first. A first
  // attempt that succeeded is kept on the message itself, not in the log.
  function attemptsTable(d) {
    const log = d.log || [];
    const rows = [];
    if (d.attempts > 0 && !log.some((a) => a.attempt === 1)) {
      rows.push(el('tr', { class: 'attempt', 'data-attempt': '1', 'data-ok': 'true' },
        el('td', { class: 'num' }, '1'),
        el('td', { class: 'time' }, timeEl(d.created_at)),
        el('td', {}, el('span', { class: 'badge badge-paid' }, 'delivered')),
        el('td', { class: 'num' }, nil()),
        el('td', { class: 'muted' }, 'Taken at the first try (kept on the message only).')));
    }
    for (const a of log) {
      const ok = a.status_code !== null && a.status_code >= 200 && a.status_code < 300;
      rows.push(el('tr', { class: 'attempt', 'data-attempt': a.attempt, 'data-ok': String(ok) },
        el('td', { class: 'num' }, String(a.attempt)),
        el('td', { class: 'time' }, timeEl(a.at)),
        el('td', {}, el('span', { class: `badge badge-${ok ? 'paid' : 'failed'}` },
          a.status_code !== null ? `HTTP ${a.status_code}` : 'no answer')),
        el('td', { class: 'num' }, fmtSeconds(a.latency_ms / 1000)),
        el('td', { class: 'message' },
          a.error ? el('div', { class: 'attempt-error' }, a.error) : null,
          a.response ? el('pre', { class: 'excerpt', title: 'The start of the answer (capped)' }, a.response) : null,
          !a.error && !a.response ? nil() : null)));
    }
    if (!rows.length) return el('p', { class: 'muted' }, 'Not sent yet.');
    return el('table', { class: 'attempts' },
      el('caption', { class: 'sr-only' }, `Delivery log of message ${d.event_id}`),
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col', class: 'num' }, '#'),
        el('th', { scope: 'col' }, 'Time'),
        el('th', { scope: 'col' }, 'Answer'),
        el('th', { scope: 'col', class: 'num' }, 'Latency'),
        el('th', { scope: 'col' }, 'Response excerpt or error'))),
      el('tbody', {}, rows));
  }

  function messageStatus(d) {
    const cls = { delivered: 'paid', pending: 'retrying', failed: 'failed' }[d.status] || 'pending';
    return el('span', { class: `badge badge-${cls}` }, d.status === 'pending' && d.attempts === 0 ? 'not sent' : d.status);
  }

  function endpointActions(e) {
    if (!roleAtLeast('admin')) return null;
    return el('div', { class: 'actions', id: 'webhook-actions', role: 'group', 'aria-label': 'Endpoint actions' },
      e.enabled
        ? el('button', { type: 'button', class: 'button', id: 'endpoint-disable', onclick: () => setEnabled(e, false) }, 'Disable')
        : el('button', { type: 'button', class: 'button primary', id: 'endpoint-enable', onclick: () => setEnabled(e, true) }, 'Enable'),
      el('button', { type: 'button', class: 'button', id: 'endpoint-rotate', onclick: () => rotateSecret(e) }, 'Rotate secret'),
      el('button', { type: 'button', class: 'button danger', id: 'endpoint-delete', onclick: () => deleteEndpoint(e) }, 'Delete'));
  }

  function replaySinceForm(id) {
    if (!roleAtLeast('operator')) return null;
    const input = el('input', { id: 'replay-since', type: 'datetime-local', step: '1', required: true });
    const form = el('form', { id: 'replay-since-form', class: 'replay-since' },
      field('replay-since', 'Send again every message created since', input, 'in your time zone'),
      el('button', { type: 'submit', class: 'button', id: 'replay-since-go' }, 'Replay…'));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const since = localToRfc3339(input.value);
      if (!since) {
        showAlert('Give the time to replay from.');
        return;
      }
      const { ok } = await confirmDialog({
        title: `Replay messages to endpoint #${id}?`,
        message: `Every message to it created since ${fmtTime(since)} is sent again now, delivered or not ` +
          '(the same webhook-id, so a receiver that deduplicates sees each once).',
        ok: 'Replay',
      });
      if (!ok) return;
      clearMessages();
      try {
        const r = await api(`/api/v1/webhook-endpoints/${encodeURIComponent(id)}/replay`, { method: 'POST', body: { since } });
        showNotice(`${fmtInt(r.replayed)} message${r.replayed === 1 ? '' : 's'} will be sent again.`);
        refreshWebhook(state.gen, id);
      } catch (e) {
        if (e.status !== 401) showAlert(sentence(e.message));
      }
    });
    return form;
  }

  async function viewWebhook(gen, id) {
    mount(el('section', { id: 'webhook', 'data-id': id },
      el('a', { class: 'crumb', href: '#/webhooks' }, '← Webhooks'),
      el('div', { class: 'view-head' }, el('h1', { tabindex: '-1' }, `Endpoint #${id}`),
        el('span', { id: 'webhook-state' }), el('span', { class: 'spacer' }), liveToggle()),
      el('div', { id: 'webhook-secret-slot' }),
      el('div', { id: 'webhook-body' }, el('p', { class: 'loading' }, 'Loading…')),
      el('section', { class: 'section', 'aria-labelledby': 'h-messages' },
        el('div', { class: 'toolbar' }, el('h2', { id: 'h-messages' }, 'Delivery log'),
          el('p', { class: 'meta' }, 'the newest 100 messages'), el('span', { class: 'spacer' }), replaySinceForm(id)),
        el('div', { id: 'webhook-messages' }))));
    document.title = `Endpoint #${id} · Payouts admin`;
    await refreshWebhook(gen, id);
  }

  async function refreshWebhook(gen, id) {
    let d;
    try {
      d = await api(`/api/v1/webhook-endpoints/${encodeURIComponent(id)}`);
    } catch (e) {
      if (gen !== state.gen) return;
      if (e.status === 404) {
        mount(el('section', { id: 'webhook-missing' }, viewHead(`Endpoint #${id}`),
          el('p', {}, `There is no webhook endpoint #${id}. `, el('a', { href: '#/webhooks' }, 'Back to webhooks'), '.')));
        return;
      }
      if ($('#webhook-body .loading')) failedView(`Endpoint #${id}`, e);
      else scheduleRefresh(gen, () => refreshWebhook(gen, id));
      return;
    }
    if (gen !== state.gen) return;
    scheduleRefresh(gen, () => refreshWebhook(gen, id));
    const seen = JSON.stringify(d);
    const body = $('#webhook-body');
    if (!body || body.dataset.seen === seen) return;
    body.dataset.seen = seen;
    const e = d.endpoint;
    $('#webhook-state').replaceChildren(endpointState(e));
    body.replaceChildren(
      el('section', { class: 'card', 'aria-labelledby': 'h-endpoint' },
        el('div', { class: 'card-head' }, el('h2', { id: 'h-endpoint' }, 'Endpoint'), el('span', { class: 'spacer' }), endpointActions(e)),
        el('div', { class: 'card-body' }, kv([
          ['URL', el('span', { class: 'mono', id: 'webhook-url' }, e.url)],
          ['Description', orNil(e.description)],
          ['Event types', el('span', { class: 'mono' }, eventTypes(e.event_types))],
          ['State', endpointState(e)],
          ['Failing since', timeEl(e.failing_since)],
          ['Disabled because', orNil(e.disabled_reason)],
          ['Previous secret signs until', timeEl(e.previous_until)],
          ['Registered', timeEl(e.created_at)],
          ['Changed', timeEl(e.updated_at)],
        ]))));
    const msgs = d.deliveries || [];
    const operator = roleAtLeast('operator');
    const now = Date.now();
    $('#webhook-messages').replaceChildren(msgs.length
      ? el('div', { class: 'table-wrap' }, el('table', { id: 'webhook-deliveries-table' },
        el('caption', { class: 'sr-only' }, 'Messages to this endpoint, newest first, each with its attempts'),
        el('thead', {}, el('tr', {},
          el('th', { scope: 'col', class: 'num' }, 'ID'),
          el('th', { scope: 'col' }, 'Created'),
          el('th', { scope: 'col' }, 'Event'),
          el('th', { scope: 'col' }, 'Status'),
          el('th', { scope: 'col', class: 'num' }, 'Attempts'),
          el('th', { scope: 'col' }, 'Last answer'),
          el('th', { scope: 'col' }, 'Next attempt'),
          el('th', { scope: 'col' }, el('span', { class: 'sr-only' }, 'Actions')))),
        msgs.map((m) => el('tbody', { class: 'message', 'data-id': m.id, 'data-status': m.status, 'data-attempts': m.attempts },
          el('tr', {},
            el('td', { class: 'num' }, String(m.id)),
            el('td', { class: 'time' }, timeEl(m.created_at)),
            el('td', {}, el('div', { class: 'mono' }, m.event_type), el('div', { class: 'mono muted' }, m.event_id)),
            el('td', {}, messageStatus(m)),
            el('td', { class: 'num' }, String(m.attempts)),
            el('td', {}, lastOutcome(m)),
            el('td', { class: 'time' }, m.status === 'pending'
              ? [timeEl(m.next_attempt_at), new Date(m.next_attempt_at).getTime() > now
                ? el('div', { class: 'muted' }, `in ${fmtSeconds((new Date(m.next_attempt_at).getTime() - now) / 1000)}`) : null]
              : nil()),
            el('td', {}, operator ? el('button', {
              type: 'button', class: 'button small replay', 'data-id': m.id, onclick: () => replayMessage(id, m),
            }, 'Replay') : null)),
          el('tr', { class: 'log' }, el('td', { colspan: '8' }, attemptsTable(m)))))))
      : el('div', { class: 'card' }, el('p', { class: 'empty', id: 'webhook-messages-empty' }, 'No message to it yet.')));
  }

  async function replayMessage(endpointId, m) {
    const { ok } = await confirmDialog({
      title: `Send message ${m.id} again?`,
      message: `${m.event_type} (${m.event_id}) is sent again now, with the same webhook-id; a new attempt joins its log.`,
      ok: 'Replay',
    });
    if (!ok) return;
    clearMessages();
    try {
      await api(`/api/v1/webhook-deliveries/${encodeURIComponent(m.id)}/replay`, { method: 'POST', body: {} });
      showNotice(`Message ${m.id} will be sent again.`);
      refreshWebhook(state.gen, endpointId);
    } catch (e) {
      if (e.status !== 401) showAlert(sentence(e.message));
    }
  }

  async function setEnabled(e, enabled) {
    const { ok } = await confirmDialog(enabled
      ? { title: `Enable endpoint #${e.id}?`, message: 'New events are sent to it again; its run of failures starts over.', ok: 'Enable' }
      : {
        title: `Disable endpoint #${e.id}?`,
        message: 'No message is sent to it until it is enabled again; events meanwhile are not queued for it.',
        ok: 'Disable',
        danger: true,
      });
    if (!ok) return;
    clearMessages();
    try {
      await api(`/api/v1/webhook-endpoints/${encodeURIComponent(e.id)}`, { method: 'PATCH', body: { enabled } });
      showNotice(`Endpoint #${e.id} is ${enabled ? 'enabled' : 'disabled'}.`);
      refreshWebhook(state.gen, String(e.id));
    } catch (err) {
      if (err.status !== 401) showAlert(sentence(err.message));
    }
  }

  async function rotateSecret(e) {
    const { ok } = await confirmDialog({
      title: `Rotate the secret of endpoint #${e.id}?`,
      message: 'A new signing secret is made and shown once. The current one keeps signing too for the overlap ' +
        '(a day by default), so the receiver can switch without losing a message.',
      ok: 'Rotate secret',
    });
    if (!ok) return;
    clearMessages();
    try {
      const r = await api(`/api/v1/webhook-endpoints/${encodeURIComponent(e.id)}/rotate-secret`, { method: 'POST', body: {} });
      $('#webhook-secret-slot').replaceChildren(secretBox(`New secret for endpoint #${e.id}`, r.secret,
        `The previous one also signs until ${fmtTime(r.previous_until)}.`));
      refreshWebhook(state.gen, String(e.id));
    } catch (err) {
      if (err.status !== 401) showAlert(sentence(err.message));
    }
  }

  async function deleteEndpoint(e) {
    const { ok } = await confirmDialog({
      title: `Delete endpoint #${e.id}?`,
      message: `${e.url} hears of nothing more, and its messages and delivery log are deleted. This cannot be undone.`,
      ok: 'Delete endpoint',
      dismiss: 'Keep it',
      danger: true,
    });
    if (!ok) return;
    clearMessages();
    try {
      await api(`/api/v1/webhook-endpoints/${encodeURIComponent(e.id)}`, { method: 'DELETE' });
      // Without a hashchange (whose route() would clear the notice).
      window.history.pushState(null, '', '#/webhooks');
      await route();
      showNotice(`Endpoint #${e.id} deleted.`);
    } catch (err) {
      if (err.status !== 401) showAlert(sentence(err.message));
    }
  }

  // ---------- Start ----------

  async function logout() {
    try {
      await fetch('/logout', {
        method: 'POST',
        credentials: 'same-origin',
        headers: { 'X-CSRF-Token': state.session ? state.session.csrf : '' },
        redirect: 'manual',
      });
    } catch (e) {
      // Going to the login page anyway: the session ends with its TTL at worst.
    }
    toLogin();
  }

  async function init() {
    $('#logout').addEventListener('click', logout);
    $('#confirm-cancel').addEventListener('click', () => $('#confirm').close('cancel'));
    $('#skip').addEventListener('click', (ev) => {
      ev.preventDefault();
      $('#main').focus();
    });
    const tz = Intl.DateTimeFormat().resolvedOptions().timeZone;
    $('#tz-note').textContent = tz === 'UTC' || tz === 'Etc/UTC'
      ? 'Times are shown in UTC.'
      : `Times are shown in your time zone${tz ? ` (${tz})` : ''}; hover a time for UTC.`;
    try {
      state.session = await api('/api/v1/session');
    } catch (e) {
      if (e.status !== 401) {
        $('#view').replaceChildren();
        showAlert(`The dashboard could not start: ${e.message}`);
      }
      return;
    }
    const s = state.session;
    document.body.dataset.role = s.role;
    $('#nav-tokens-item').hidden = s.role !== 'admin';
    $('#fleet-pause').addEventListener('click', pauseFleet);
    $('#search').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const q = $('#search-q').value.trim();
      if (!q) return;
      const next = `#/search?${new URLSearchParams({ q })}`;
      if (window.location.hash === next) route();
      else window.location.hash = next;
    });
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState !== 'visible') return;
      refreshFleet();
      if (state.live && state.refresh && !state.timer) state.refresh();
    });
    $('#who').replaceChildren(
      el('span', { class: 'sr-only' }, 'Logged in as '),
      el('span', { id: 'who-name' }, s.name),
      el('span', { class: `role role-${s.role}`, id: 'who-role' }, s.role));
    window.addEventListener('hashchange', route);
    if (!window.location.hash || window.location.hash === '#' || window.location.hash === '#/') {
      window.history.replaceState(null, '', '#/overview');
    }
    route();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
