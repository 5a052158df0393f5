/*
 * The orchestrator's dashboard. Plain JavaScript, no framework, no build step.
 *
 * - The bearer token lives in this tab's sessionStorage only, and goes in an
 *   Authorization header; the one exception is the WebSocket URL (`?token=`), which the
 *   contract requires and the server never logs. It is never put in the page's URL.
 * - The state comes from REST; /ws/tasks and /ws/droplets keep it live. A feed that
 *   reopens resumes after the last event_id it saw (?after=), so nothing missed while it
 *   was away is lost; when the server no longer keeps those events (resync_required), the
 *   page reloads the state from REST.
 * - Everything that comes from the server is written with textContent, never as HTML.
 */
(() => {
  'use strict';

  const body = document.body;
  const CONFIG = {
    mintOpen: body.dataset.tokenMint === 'open',
    heartbeatInterval: positive(body.dataset.heartbeatInterval, 60),
    heartbeatTimeout: positive(body.dataset.heartbeatTimeout, 90),
    version: body.dataset.version || '',
  };
  const TOKEN_KEY = 'orchestrator.dashboard.token';
  const MINT_DROPLET_ID = 5; // the mesh's Dashboard droplet
  const TASK_ROWS = 100; // newest tasks shown
  const SNAPSHOT_LIMIT = 500; // the API's largest page
  const FINISHED_CAP = 20000; // finished tasks remembered for the hour's counters
  const HOUR = 3600 * 1000;
  const MINUTE = 60 * 1000;
  const COUNTED = ['pending', 'assigned', 'in_progress'];
  const CANCELLABLE = ['pending', 'assigned', 'in_progress'];
  const FEEDS = ['tasks', 'droplets'];

  const S = {
    token: null,
    claims: null,
    gen: 0, // bumped at every sign-in and sign-out; late answers of an old session are dropped
    synced: false,
    syncing: false,
    syncAgain: false,
    droplets: new Map(), // external id -> droplet
    dropletNotes: new Map(), // external id -> why it is not active (from the event)
    tasks: new Map(), // id -> task, the newest that match the filters
    taskTotal: 0,
    taskSeq: 0,
    active: new Map(), // task id -> droplet id, for tasks assigned or in progress (the load)
    finished: new Map(), // task id -> {status, t}: completed or failed, for counters and chart
    finishedPartial: { completed: false, failed: false },
    counts: { pending: 0, assigned: 0, in_progress: 0 },
    types: new Set(),
    filters: { status: '', task_type: '', droplet: '' },
    sockets: { tasks: null, droplets: null },
    failures: { tasks: 0, droplets: 0 },
    retryAt: { tasks: 0, droplets: 0 },
    // The newest event_id seen per feed: a reconnect resumes after it (?after=).
    lastEventId: { tasks: 0, droplets: 0 },
    retryTimers: { tasks: null, droplets: null },
    everLive: false,
    timers: [],
    expiryTimer: null,
    detail: { id: null, seq: 0 },
    rows: { droplets: new Map(), tasks: new Map(), jobs: new Map() },
    lastTokenCheck: 0,
  };

  // ---------------------------------------------------------------- small helpers

  function positive(v, fallback) {
    const n = Number(v);
    return Number.isFinite(n) && n > 0 ? n : fallback;
  }

  function $(selector, root) {
    return (root || document).querySelector(selector);
  }

  /** el('td', {class: 'num', text: '3'}, child...) */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k === 'dataset') Object.assign(node.dataset, v);
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  function setText(node, text) {
    const s = String(text);
    if (node.textContent !== s) node.textContent = s;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function ms(iso) {
    if (!iso) return NaN;
    return Date.parse(iso);
  }

  /**
   * The server's clock, estimated from the response envelopes' timestamps: every age on
   * the page (heartbeats, tasks, the hour's counters) is measured against it, so a browser
   * whose clock is off still shows true ages.
   */
  let skew = null;
  function serverNow() {
    return Date.now() + (skew || 0);
  }

  function noteServerTime(iso, sent, got) {
    const t = ms(iso);
    if (!Number.isFinite(t) || got - sent > 2000) return;
    const sample = t - (sent + got) / 2;
    skew = skew === null ? sample : skew * 0.8 + sample * 0.2;
  }

  function statusWord(s) {
    return s === 'in_progress' ? 'in progress' : String(s || 'unknown');
  }

  function badge(status) {
    return el('span', { class: 'badge ' + String(status || '').replace(/[^a-z_]/g, ''), text: statusWord(status) });
  }

  function fmtInt(n) {
    return Number(n || 0).toLocaleString();
  }

  /** 5s, 4m 05s, 2h 03m, 3d 4h */
  function fmtAgo(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + 's';
    const m = Math.floor(s / 60);
    if (m < 60) return m + 'm ' + String(s % 60).padStart(2, '0') + 's';
    const h = Math.floor(m / 60);
    if (h < 24) return h + 'h ' + String(m % 60).padStart(2, '0') + 'm';
    return Math.floor(h / 24) + 'd ' + (h % 24) + 'h';
  }

  function fmtTime(t) {
    if (!Number.isFinite(t)) return '—';
    const d = new Date(t);
    const sameDay = d.toDateString() === new Date().toDateString();
    const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });
    return sameDay ? time : d.toLocaleDateString() + ' ' + time;
  }

  function hhmm(d) {
    return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', hourCycle: 'h23' });
  }

  function fmtWhen(iso) {
    const t = ms(iso);
    if (!Number.isFinite(t)) return '—';
    return fmtTime(t) + ' (' + fmtAgo((serverNow() - t) / 1000) + ' ago)';
  }

  function pretty(value) {
    try {
      return JSON.stringify(value, null, 2);
    } catch (e) {
      return String(value);
    }
  }

  /** A version 4 UUID; crypto.randomUUID exists only in secure contexts. */
  function uuid4() {
    if (window.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
  }

  function storage(op, value) {
    // Storage can be disabled by the browser; the page then simply forgets on reload.
    try {
      if (op === 'get') return window.sessionStorage.getItem(TOKEN_KEY);
      if (op === 'set') window.sessionStorage.setItem(TOKEN_KEY, value);
      if (op === 'del') window.sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      /* ignored */
    }
    return null;
  }

  function dropletId(d) {
    return Number(d.droplet_id !== undefined && d.droplet_id !== null ? d.droplet_id : d.id);
  }

  function isAdmin() {
    const p = S.claims && S.claims.permissions;
    return Array.isArray(p) && p.includes('admin');
  }

  // ---------------------------------------------------------------- the API

  /** Decodes the claims of a JWT (not verifying it: the server does that). */
  function decodeClaims(token) {
    const parts = token.split('.');
    if (parts.length !== 3) return null;
    try {
      let b = parts[1].replace(/-/g, '+').replace(/_/g, '/');
      while (b.length % 4) b += '=';
      const bytes = Uint8Array.from(atob(b), (c) => c.charCodeAt(0));
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      return claims && typeof claims === 'object' ? claims : null;
    } catch (e) {
      return null;
    }
  }

  /** A request envelope around a payload (the identity is the token's, the source only recorded). */
  function envelope(payload) {
    const me = S.claims && S.claims.droplet_id;
    return {
      udc_version: '1.0',
      trace_id: uuid4(),
      source: me !== undefined && me !== null ? me : 'dashboard',
      target: 10,
      message_type: 'command',
      payload: payload || {},
      timestamp: new Date().toISOString(),
    };
  }

  /** The error text of an answer: the contract's `detail`, a 422's list, or the status. */
  function detailOf(json, text, status) {
    if (json && typeof json.detail === 'string') return json.detail;
    if (json && Array.isArray(json.detail)) {
      return json.detail
        .map((d) => (Array.isArray(d.loc) ? d.loc.filter((x) => x !== 'body').join('.') + ': ' : '') + (d.msg || ''))
        .join('; ');
    }
    if (text && text.length < 200 && !json) return text;
    return status ? 'HTTP ' + status : 'no answer';
  }

  /**
   * One call. Answers {status, ok, payload, detail, body}; status 0 when the server could
   * not be reached. A 401 while signed in means the token stopped working: sign out.
   */
  async function api(method, path, payload, opts) {
    const o = opts || {};
    const token = o.token || S.token;
    const gen = S.gen;
    const headers = { Accept: 'application/json' };
    if (token && !o.bare) headers.Authorization = 'Bearer ' + token;
    let data;
    if (payload !== undefined) {
      headers['Content-Type'] = 'application/json';
      data = JSON.stringify(o.bare ? payload : envelope(payload));
    }
    let res;
    const sent = Date.now();
    try {
      res = await fetch(path, { method, headers, body: data, cache: 'no-store', credentials: 'omit' });
    } catch (e) {
      return { status: 0, ok: false, payload: null, body: null, detail: 'cannot reach the orchestrator' };
    }
    const text = await res.text().catch(() => '');
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch (e) {
      json = null;
    }
    const enveloped = json && typeof json === 'object' && !Array.isArray(json) && 'payload' in json;
    if (enveloped) noteServerTime(json.timestamp, sent, Date.now());
    const answer = {
      status: res.status,
      ok: res.ok,
      body: json,
      payload: enveloped ? json.payload : json,
      detail: res.ok ? '' : detailOf(json, text, res.status),
    };
    if (res.status === 401 && !o.token && !o.bare && S.token && gen === S.gen) tokenRejected(answer.detail);
    return answer;
  }

  // ---------------------------------------------------------------- sign-in

  function showSignin(message) {
    show($('#signin'), true);
    show($('#board'), false);
    show($('#signout'), false);
    setText($('#whoami'), '');
    const err = $('#signin-error');
    setText(err, message || '');
    show(err, Boolean(message));
    show($('#mint'), CONFIG.mintOpen);
    setConn('signed-out', 'signed out');
    $('#token-input').focus();
  }

  function signinError(message) {
    showSignin(message);
    setSigninBusy(false);
    return false;
  }

  function setSigninBusy(busy) {
    for (const b of document.querySelectorAll('#signin button')) b.disabled = busy;
  }

  /** Checks a token locally, then with the server (GET /droplets), then opens the board. */
  async function signIn(raw) {
    const token = String(raw || '').trim().replace(/^Bearer\s+/i, '');
    if (!token) return signinError('Paste a token first.');
    const claims = decodeClaims(token);
    if (!claims) return signinError('That is not a token: a bearer token (JWT) has three parts separated by dots.');
    if (typeof claims.exp === 'number' && claims.exp * 1000 <= serverNow()) {
      return signinError('This token expired at ' + fmtTime(claims.exp * 1000) + '. Sign in with a new one.');
    }
    setSigninBusy(true);
    const r = await api('GET', '/droplets', undefined, { token });
    if (r.status === 401) {
      return signinError(
        'The orchestrator refused this token: “' + r.detail + '”. ' +
          'It is signed with another key, has expired, or is malformed.'
      );
    }
    if (r.status === 403) return signinError('This token may not read: ' + r.detail + '.');
    if (!r.ok) {
      return signinError('Could not sign in: ' + (r.status ? r.status + ' — ' : '') + r.detail + '.');
    }
    setSigninBusy(false);
    S.gen += 1;
    S.token = token;
    S.claims = claims;
    storage('set', token);
    $('#token-input').value = '';
    enterBoard(r.payload);
    return true;
  }

  /** POST /token (open only in development) for a token of the Dashboard droplet. */
  async function mint(permissions) {
    setSigninBusy(true);
    const r = await api(
      'POST',
      '/token',
      { droplet_id: MINT_DROPLET_ID, steward: 'dashboard', permissions, expires_in: 8 * 3600 },
      { bare: true }
    );
    if (!r.ok || !r.body || typeof r.body.access_token !== 'string') {
      if (r.status === 401 || r.status === 403) {
        return signinError('This orchestrator does not mint tokens here (it is not in development). Ask an operator for one.');
      }
      return signinError('Could not mint a token: ' + (r.status ? r.status + ' — ' : '') + r.detail + '.');
    }
    return signIn(r.body.access_token);
  }

  function tokenRejected(detail) {
    signOut('The orchestrator stopped accepting this token (“' + detail + '”): it has probably expired. Sign in again.');
  }

  function signOut(message) {
    S.gen += 1;
    S.token = null;
    S.claims = null;
    storage('del');
    for (const feed of FEEDS) {
      clearTimeout(S.retryTimers[feed]);
      const sock = S.sockets[feed];
      S.sockets[feed] = null;
      if (sock) sock.ws.close(1000, 'signed out');
    }
    for (const t of S.timers) clearInterval(t);
    S.timers = [];
    clearTimeout(S.expiryTimer);
    resetState();
    closeDetail();
    body.classList.remove('is-admin');
    showSignin(message);
  }

  function resetState() {
    S.synced = false;
    S.everLive = false;
    S.droplets.clear();
    S.dropletNotes.clear();
    S.tasks.clear();
    S.active.clear();
    S.finished.clear();
    S.types.clear();
    S.counts = { pending: 0, assigned: 0, in_progress: 0 };
    S.failures = { tasks: 0, droplets: 0 };
    S.lastEventId = { tasks: 0, droplets: 0 };
    for (const kind of Object.keys(S.rows)) {
      for (const row of S.rows[kind].values()) row.remove();
      S.rows[kind].clear();
    }
    $('#action-log').replaceChildren();
    show($('#log-empty'), true);
  }

  function enterBoard(dropletsPayload) {
    show($('#signin'), false);
    show($('#board'), true);
    show($('#signout'), true);
    body.classList.toggle('is-admin', isAdmin());
    const perms = Array.isArray(S.claims.permissions) ? S.claims.permissions.join(', ') : 'no permissions';
    const exp = typeof S.claims.exp === 'number' ? ' · expires ' + fmtTime(S.claims.exp * 1000) : '';
    setText($('#whoami'), 'droplet ' + S.claims.droplet_id + ' · ' + perms + exp);
    if (typeof S.claims.exp === 'number') {
      const left = S.claims.exp * 1000 - serverNow();
      S.expiryTimer = setTimeout(() => {
        signOut('Your token expired at ' + fmtTime(S.claims ? S.claims.exp * 1000 : Date.now()) + '. Sign in with a new one.');
      }, Math.min(Math.max(left, 0), 2147483647));
    }
    if (dropletsPayload && Array.isArray(dropletsPayload.droplets)) {
      for (const d of dropletsPayload.droplets) mergeDroplet(d);
    }
    setConn('connecting', 'connecting');
    for (const feed of FEEDS) openSocket(feed);
    // The first sync runs when the feeds open; this one covers feeds that cannot.
    const gen = S.gen;
    setTimeout(() => {
      if (gen === S.gen && !S.synced) resync();
    }, 1500);
    const refresh = Math.min(15, Math.max(5, CONFIG.heartbeatInterval / 2)) * 1000;
    S.timers.push(setInterval(tick, 1000));
    S.timers.push(setInterval(() => render(), 5000));
    S.timers.push(setInterval(() => !document.hidden && refreshDroplets(), refresh));
    S.timers.push(setInterval(() => !document.hidden && reconcileCounts(), 15000));
    S.timers.push(setInterval(() => !document.hidden && isAdmin() && loadJobs(), 20000));
    S.timers.push(setInterval(() => !document.hidden && isAdmin() && loadKeyLimits(), 10000));
    loadJobs();
    loadKeyLimits();
    render();
  }

  // ---------------------------------------------------------------- live feeds

  function setConn(state, text, title) {
    const c = $('#conn');
    if (c.dataset.state !== state) c.dataset.state = state;
    setText(c, text);
    c.title = title || 'Live updates: /ws/tasks and /ws/droplets';
  }

  function updateConn() {
    if (!S.token) return setConn('signed-out', 'signed out');
    const open = FEEDS.filter((f) => S.sockets[f] && S.sockets[f].opened);
    if (open.length === FEEDS.length) return setConn('live', 'live');
    const waiting = FEEDS.filter((f) => !open.includes(f));
    const next = Math.min(...waiting.map((f) => S.retryAt[f] || Infinity));
    const secs = Number.isFinite(next) ? Math.max(0, Math.ceil((next - Date.now()) / 1000)) : 0;
    const title = 'Not live: ' + waiting.map((f) => '/ws/' + f).join(', ');
    if (!S.everLive && Math.max(...waiting.map((f) => S.failures[f])) === 0) {
      return setConn('connecting', 'connecting', title);
    }
    const worst = Math.max(...waiting.map((f) => S.failures[f]));
    const when = secs > 0 ? ' in ' + secs + 's' : '…';
    if (worst >= 4) return setConn('offline', 'offline, retrying' + when, title);
    return setConn('reconnecting', 'reconnecting' + when, title);
  }

  function wsUrl(feed) {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    // The contract carries the token in the query for browsers (they cannot set headers
    // on a WebSocket); the server never logs query strings.
    const after = S.lastEventId[feed] > 0 ? '&after=' + S.lastEventId[feed] : '';
    return proto + '//' + location.host + '/ws/' + feed + '?token=' + encodeURIComponent(S.token) + after;
  }

  function openSocket(feed) {
    if (!S.token) return;
    let ws;
    try {
      ws = new WebSocket(wsUrl(feed));
    } catch (e) {
      S.failures[feed] += 1;
      scheduleReconnect(feed);
      return;
    }
    const sock = { ws, opened: false };
    S.sockets[feed] = sock;
    ws.onopen = () => {
      if (S.sockets[feed] !== sock) return;
      sock.opened = true;
      S.failures[feed] = 0;
      S.retryAt[feed] = 0;
      if (FEEDS.every((f) => S.sockets[f] && S.sockets[f].opened)) S.everLive = true;
      updateConn();
      // A first connection loads the state from REST; a reconnect resumes after the last
      // event seen, and the server sends what was missed (or resync_required).
      if (!S.lastEventId[feed]) resyncSoon();
    };
    ws.onmessage = (m) => {
      if (S.sockets[feed] === sock) onMessage(m.data, feed);
    };
    ws.onclose = (e) => {
      if (S.sockets[feed] !== sock) return;
      S.sockets[feed] = null;
      if (!S.token) return;
      S.failures[feed] += 1;
      // 1008: the token was refused; a socket that never opened may have been refused
      // before the upgrade (401), which a browser cannot see: ask REST which it was.
      if (e.code === 1008 || !sock.opened) checkToken();
      scheduleReconnect(feed);
    };
  }

  function scheduleReconnect(feed) {
    clearTimeout(S.retryTimers[feed]);
    const n = Math.max(1, S.failures[feed]);
    const delay = Math.min(30, 2 ** Math.min(n - 1, 5)) * (0.75 + Math.random() * 0.5) * 1000;
    S.retryAt[feed] = Date.now() + delay;
    const gen = S.gen;
    S.retryTimers[feed] = setTimeout(() => {
      if (gen === S.gen) openSocket(feed);
    }, delay);
    updateConn();
  }

  function checkToken() {
    if (Date.now() - S.lastTokenCheck < 5000) return;
    S.lastTokenCheck = Date.now();
    api('GET', '/tasks?limit=1'); // a 401 signs out with the reason
  }

  function onMessage(data, feed) {
    let env;
    try {
      env = JSON.parse(data);
    } catch (e) {
      return;
    }
    const p = env && env.payload;
    if (!p || typeof p.event !== 'string') return;
    if (p.event === 'resync_required') {
      // What was missed is no longer kept: reload the state from REST.
      resyncSoon();
      return;
    }
    if (feed && typeof p.event_id === 'number' && p.event_id > S.lastEventId[feed]) S.lastEventId[feed] = p.event_id;
    if (p.event.startsWith('task_')) onTaskEvent(p);
    else if (p.event.startsWith('droplet_')) onDropletEvent(p);
  }

  function onTaskEvent(p) {
    const t = p.task;
    if (!t || typeof t.id !== 'number') return;
    const prev = typeof p.previous_status === 'string' ? p.previous_status : null;
    if (S.synced && (prev || p.event === 'task_created')) {
      if (prev && prev in S.counts) S.counts[prev] = Math.max(0, S.counts[prev] - 1);
      if (t.status in S.counts) S.counts[t.status] += 1;
    }
    noteTask(t);
    const had = S.tasks.has(t.id);
    if (matchesFilters(t)) {
      if (!had && p.event === 'task_created') S.taskTotal += 1;
      mergeTask(t);
    } else if (had) {
      S.tasks.delete(t.id);
      S.taskTotal = Math.max(0, S.taskTotal - 1);
      topUpSoon();
    }
    if (S.detail.id === t.id) refreshDetailSoon();
    render();
  }

  /** What every task seen feeds: the droplets' load, the finished counters, the types. */
  function noteTask(t) {
    if (t.status === 'assigned' || t.status === 'in_progress') S.active.set(t.id, t.assigned_droplet_id);
    else S.active.delete(t.id);
    if ((t.status === 'completed' || t.status === 'failed') && t.completed_at) {
      const when = ms(t.completed_at);
      if (Number.isFinite(when)) S.finished.set(t.id, { status: t.status, t: when });
      if (S.finished.size > FINISHED_CAP) {
        const oldest = S.finished.keys().next().value;
        S.finished.delete(oldest);
        S.finishedPartial.completed = S.finishedPartial.failed = true;
      }
    } else {
      S.finished.delete(t.id);
    }
    if (t.task_type && S.types.size < 200) S.types.add(t.task_type);
  }

  function onDropletEvent(p) {
    const d = p.droplet;
    if (!d || typeof d !== 'object') return;
    const id = dropletId(d);
    if (!Number.isFinite(id)) return;
    if (d.status === 'active') {
      S.dropletNotes.delete(id);
    } else if (p.event !== 'droplet_registered') {
      const why = p.reason || (p.event === 'droplet_heartbeat_missed' ? 'missed its heartbeat' : '');
      const was = p.previous_status ? 'was ' + p.previous_status : '';
      S.dropletNotes.set(id, [was, why].filter(Boolean).join(': '));
    }
    mergeDroplet(d, true);
    render();
  }

  // ---------------------------------------------------------------- state from REST

  function newerOrSame(incoming, existing) {
    const a = ms(incoming && incoming.updated_at);
    const b = ms(existing && existing.updated_at);
    return !(a < b); // an unknown time counts as newer
  }

  function mergeDroplet(d, fromEvent) {
    const id = dropletId(d);
    if (!Number.isFinite(id)) return;
    const old = S.droplets.get(id);
    if (old && !fromEvent && !newerOrSame(d, old)) {
      // A snapshot older than an event already applied: keep the event's state, but a
      // later heartbeat time is still news.
      if (ms(d.last_heartbeat) > ms(old.last_heartbeat)) old.last_heartbeat = d.last_heartbeat;
      return;
    }
    const merged = Object.assign({}, old || {}, d);
    if (old && ms(old.last_heartbeat) > ms(d.last_heartbeat)) merged.last_heartbeat = old.last_heartbeat;
    S.droplets.set(id, merged);
  }

  function mergeTask(t) {
    const old = S.tasks.get(t.id);
    if (old && !newerOrSame(t, old)) return;
    S.tasks.set(t.id, t);
  }

  function matchesFilters(t) {
    const f = S.filters;
    if (f.status && t.status !== f.status) return false;
    if (f.task_type && t.task_type !== f.task_type) return false;
    if (f.droplet && String(t.assigned_droplet_id) !== f.droplet) return false;
    return true;
  }

  function taskQuery(limit) {
    const q = new URLSearchParams({ limit: String(limit) });
    if (S.filters.status) q.set('status', S.filters.status);
    if (S.filters.task_type) q.set('task_type', S.filters.task_type);
    if (S.filters.droplet) q.set('assigned_droplet_id', S.filters.droplet);
    return '/tasks?' + q.toString();
  }

  /** The tasks table from REST (newest first, with the filters). */
  async function loadTasks() {
    const seq = ++S.taskSeq;
    const gen = S.gen;
    const r = await api('GET', taskQuery(TASK_ROWS));
    if (seq !== S.taskSeq || gen !== S.gen) return;
    if (!r.ok || !r.payload || !Array.isArray(r.payload.tasks)) {
      setText($('#tasks-empty'), r.status === 422 ? 'Bad filter: ' + r.detail : 'Could not load tasks: ' + r.detail);
      S.tasks.clear();
      render();
      return;
    }
    setText($('#tasks-empty'), 'No tasks match.');
    const fresh = new Map();
    for (const t of r.payload.tasks) {
      const old = S.tasks.get(t.id);
      fresh.set(t.id, old && !newerOrSame(t, old) ? old : t);
      noteTask(t);
    }
    S.tasks = fresh;
    S.taskTotal = Number(r.payload.total) || r.payload.tasks.length;
    render();
  }

  let topUpTimer = null;
  /** After rows leave the filtered table, fetch again when older matches exist. */
  function topUpSoon() {
    if (topUpTimer || S.tasks.size >= TASK_ROWS || S.taskTotal <= S.tasks.size) return;
    topUpTimer = setTimeout(() => {
      topUpTimer = null;
      if (S.token) loadTasks();
    }, 2000);
  }

  let resyncTimer = null;
  function resyncSoon() {
    clearTimeout(resyncTimer);
    resyncTimer = setTimeout(resync, 150);
  }

  /** Everything from REST: droplets, counts, load, the hour's finished tasks, the table. */
  async function resync() {
    if (!S.token) return;
    if (S.syncing) {
      S.syncAgain = true;
      return;
    }
    S.syncing = true;
    const gen = S.gen;
    try {
      const big = '&limit=' + SNAPSHOT_LIMIT;
      const [dr, pending, assigned, running, completed, failed] = await Promise.all([
        api('GET', '/droplets'),
        api('GET', '/tasks?status=pending&limit=1'),
        api('GET', '/tasks?status=assigned' + big),
        api('GET', '/tasks?status=in_progress' + big),
        api('GET', '/tasks?status=completed' + big),
        api('GET', '/tasks?status=failed' + big),
        loadTasks(),
      ]);
      if (gen !== S.gen) return;
      const all = [dr, pending, assigned, running, completed, failed];
      const bad = all.find((r) => !r.ok);
      if (bad) {
        // Rate-limited, unreachable or failing: say so, and try again shortly.
        pageError('Could not load the state: ' + (bad.status ? bad.status + ' — ' : '') + bad.detail + '. Retrying…');
        setTimeout(() => gen === S.gen && resyncSoon(), bad.status === 429 ? 10000 : 5000);
        return;
      }
      pageError('');
      const ids = new Set();
      for (const d of dr.payload.droplets || []) {
        mergeDroplet(d);
        ids.add(dropletId(d));
      }
      for (const id of [...S.droplets.keys()]) if (!ids.has(id)) S.droplets.delete(id);
      S.counts = {
        pending: Number(pending.payload.total) || 0,
        assigned: Number(assigned.payload.total) || 0,
        in_progress: Number(running.payload.total) || 0,
      };
      S.active.clear();
      for (const t of assigned.payload.tasks.concat(running.payload.tasks)) noteTask(t);
      const hourAgo = serverNow() - HOUR;
      for (const [id, f] of [...S.finished]) if (f.t < hourAgo) S.finished.delete(id);
      for (const [kind, page] of [['completed', completed.payload], ['failed', failed.payload]]) {
        for (const t of page.tasks) noteTask(t);
        const last = page.tasks[page.tasks.length - 1];
        S.finishedPartial[kind] = Boolean(page.has_more) && Boolean(last) && ms(last.completed_at) >= hourAgo;
      }
      S.synced = true;
      render();
    } finally {
      S.syncing = false;
      if (S.syncAgain && gen === S.gen) {
        S.syncAgain = false;
        resyncSoon();
      }
    }
  }

  /** Heartbeats send no event: refresh the droplets now and then to keep "last heartbeat" true. */
  async function refreshDroplets() {
    const gen = S.gen;
    const r = await api('GET', '/droplets');
    if (gen !== S.gen || !r.ok || !r.payload) return;
    for (const d of r.payload.droplets || []) mergeDroplet(d);
    render();
  }

  /** The live counts from /state (public), in case an event was missed or counted twice. */
  async function reconcileCounts() {
    if (!S.synced || S.syncing) return;
    const gen = S.gen;
    const r = await api('GET', '/state', undefined, { bare: true });
    const c = r.ok && r.body && r.body.custom_metrics;
    if (gen !== S.gen || !c) return;
    for (const [key, field] of [['pending', 'tasks_pending'], ['assigned', 'tasks_assigned'], ['in_progress', 'tasks_in_progress']]) {
      if (typeof c[field] === 'number') S.counts[key] = c[field];
    }
    render();
  }

  // ---------------------------------------------------------------- rendering

  let renderQueued = false;
  function render() {
    if (renderQueued) return;
    renderQueued = true;
    setTimeout(() => {
      renderQueued = false;
      if (!S.token) return;
      renderCounters();
      renderChart();
      renderDroplets();
      renderTasks();
      renderFilterOptions();
    }, 30);
  }

  function renderCounters() {
    const synced = S.synced;
    for (const k of COUNTED) setText($('#count-' + k), synced ? fmtInt(S.counts[k]) : '–');
    const hourAgo = serverNow() - HOUR;
    const done = { completed: 0, failed: 0 };
    for (const [id, f] of S.finished) {
      if (f.t < hourAgo) S.finished.delete(id);
      else done[f.status] += 1;
    }
    for (const k of ['completed', 'failed']) {
      setText($('#count-' + k), synced ? fmtInt(done[k]) + (S.finishedPartial[k] ? '+' : '') : '–');
    }
    let active = 0;
    for (const d of S.droplets.values()) if (d.status === 'active') active += 1;
    setText($('#count-droplets'), synced ? active + ' / ' + S.droplets.size : '–');
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, text) {
    const n = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function niceMax(v) {
    const p = 10 ** Math.floor(Math.log10(Math.max(1, v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  /** Completed and failed per minute, the current minute last, as stacked bars. */
  function renderChart() {
    const chart = $('#chart');
    const W = 600;
    const H = 150;
    const left = 34;
    const right = 6;
    const top = 8;
    const bottom = 22;
    const n = 15;
    const now = serverNow();
    const start = Math.floor(now / MINUTE) * MINUTE - (n - 1) * MINUTE;
    const buckets = Array.from({ length: n }, () => ({ completed: 0, failed: 0 }));
    for (const f of S.finished.values()) {
      if (f.t < start) continue;
      const i = Math.min(n - 1, Math.floor((f.t - start) / MINUTE));
      buckets[i][f.status] += 1;
    }
    const peak = Math.max(...buckets.map((b) => b.completed + b.failed));
    const max = niceMax(peak);
    const plotW = W - left - right;
    const plotH = H - top - bottom;
    const slot = plotW / n;
    const y = (v) => top + plotH - (v / max) * plotH;
    const nodes = [];
    for (const v of [0, max / 2, max]) {
      nodes.push(svg('line', { class: v === 0 ? 'axis' : 'gridline', x1: left, x2: W - right, y1: y(v), y2: y(v) }));
      const label = Number.isInteger(v) ? String(v) : v.toFixed(1);
      nodes.push(svg('text', { x: left - 6, y: y(v) + 4, 'text-anchor': 'end' }, label));
    }
    buckets.forEach((b, i) => {
      const x = left + i * slot + slot * 0.15;
      const w = slot * 0.7;
      const from = new Date(start + i * MINUTE);
      const title = hhmm(from) +
        ': ' + b.completed + ' completed, ' + b.failed + ' failed';
      const g = svg('g', {});
      g.append(svg('title', {}, title));
      g.append(svg('rect', { x, y: top, width: w, height: plotH, fill: 'transparent' }));
      if (b.completed) g.append(svg('rect', { class: 'bar completed', x, y: y(b.completed), width: w, height: y(0) - y(b.completed), rx: 2 }));
      if (b.failed) {
        g.append(svg('rect', { class: 'bar failed', x, y: y(b.completed + b.failed), width: w, height: y(b.completed) - y(b.completed + b.failed), rx: 2 }));
      }
      nodes.push(g);
      if (i % 5 === 0 || i === n - 1) {
        const text = i === n - 1 ? 'now' : hhmm(from);
        nodes.push(svg('text', { x: x + w / 2, y: H - 6, 'text-anchor': 'middle' }, text));
      }
    });
    chart.replaceChildren(...nodes);
    const c = buckets.reduce((a, b) => a + b.completed, 0);
    const f = buckets.reduce((a, b) => a + b.failed, 0);
    setText($('#chart-summary'), c + ' completed, ' + f + ' failed in 15 minutes · ' + ((c + f) / 15).toFixed(1) + ' per minute');
  }

  /** Puts `rows` into `tbody` in this order, moving only what is out of place. */
  function placeRows(tbody, rows, cache, keep) {
    rows.forEach((row, i) => {
      if (tbody.children[i] !== row) tbody.insertBefore(row, tbody.children[i] || null);
    });
    for (const [key, row] of cache) {
      if (!keep.has(key)) {
        row.remove();
        cache.delete(key);
      }
    }
  }

  function flash(row) {
    row.classList.remove('flash');
    void row.offsetWidth; // restart the animation
    row.classList.add('flash');
  }

  function renderDroplets() {
    const list = [...S.droplets.values()].sort((a, b) => dropletId(a) - dropletId(b));
    const load = new Map();
    for (const d of S.active.values()) load.set(d, (load.get(d) || 0) + 1);
    const rows = [];
    const keep = new Set();
    for (const d of list) {
      const id = dropletId(d);
      keep.add(id);
      let row = S.rows.droplets.get(id);
      if (!row) {
        row = dropletRow(id);
        S.rows.droplets.set(id, row);
      }
      fillDropletRow(row, d, load.get(id) || 0);
      rows.push(row);
    }
    placeRows($('#droplets tbody'), rows, S.rows.droplets, keep);
    show($('#droplets-empty'), list.length === 0);
    setText($('#droplet-total'), list.length ? '(' + list.length + ')' : '');
  }

  function dropletRow(id) {
    const action = el('button', { type: 'button', class: 'small' });
    action.addEventListener('click', (e) => {
      e.stopPropagation();
      const d = S.droplets.get(id);
      if (d) toggleDroplet(d);
    });
    const row = el(
      'tr',
      { dataset: { dropletId: String(id) } },
      el('td', { class: 'name' }, el('strong'), el('span', { class: 'flag-note' })),
      el('td', { class: 'num' }),
      el('td', { class: 'status' }),
      el('td', { class: 'caps' }),
      el('td', { class: 'num load' }),
      el('td', { class: 'num beat' }),
      el('td', { class: 'admin-only' }, action)
    );
    row.refs = { action };
    return row;
  }

  function fillDropletRow(row, d, load) {
    const id = dropletId(d);
    const [name, idCell, status, caps, loadCell, beat] = row.children;
    setText(name.firstChild, d.name || 'droplet-' + id);
    name.title = d.endpoint ? 'endpoint: ' + d.endpoint : '';
    const flagged = d.status !== 'active';
    const held = flagged ? '' : holdNote(d);
    const note = flagged ? S.dropletNotes.get(id) || (d.admin_deactivated ? 'held by an admin until activated' : '') : held;
    setText(name.lastChild, note);
    row.classList.toggle('flagged', flagged);
    row.classList.toggle('held', Boolean(held));
    setText(idCell, id);
    if (row.dataset.status !== d.status) {
      if (row.dataset.status) flash(row);
      row.dataset.status = d.status;
      status.replaceChildren(badge(d.status));
    }
    const capsKey = JSON.stringify(d.capabilities || []);
    if (caps.dataset.key !== capsKey) {
      caps.dataset.key = capsKey;
      const list = Array.isArray(d.capabilities) ? d.capabilities : [];
      caps.replaceChildren(...(list.length ? list.map((c) => el('span', { class: 'chip', text: c })) : [el('span', { class: 'muted', text: 'any' })]));
    }
    const max = known(d.in_flight_allowance) ? d.in_flight_allowance : d.max_concurrent_tasks;
    setText(loadCell, load + ' / ' + (max === null || max === undefined ? '–' : max));
    loadCell.title = max === null || max === undefined ? 'no limit set' : max !== d.max_concurrent_tasks ? 'allowance after a push-back; max ' + (known(d.max_concurrent_tasks) ? d.max_concurrent_tasks : 'none') : '';
    if (beat.dataset.since !== (d.last_heartbeat || '')) beat.dataset.since = d.last_heartbeat || '';
    paintBeat(beat);
    const b = row.refs.action;
    const wanted = d.status === 'active' ? 'Deactivate' : 'Activate';
    setText(b, wanted);
    b.className = 'small' + (wanted === 'Deactivate' ? ' danger' : '');
  }

  function known(v) {
    return v !== null && v !== undefined;
  }

  /** Why an active droplet takes no new work, or less: an admin's drain, or its push-back
   *  (a 429/503 with Retry-After: deferred, its in-flight allowance halved). */
  function holdNote(d) {
    if (d.draining) {
      if (d.drained_at) return 'drained: no new work until it registers again';
      return 'draining: no new work' + (d.drain_deadline ? '; the rest requeued at ' + fmtWhen(d.drain_deadline) : '');
    }
    if (d.deferred_until && ms(d.deferred_until) > serverNow()) return 'pushed back: no new work until ' + fmtWhen(d.deferred_until);
    if (known(d.in_flight_allowance) && d.in_flight_allowance !== d.max_concurrent_tasks) {
      return 'pushed back lately: allowance ' + d.in_flight_allowance;
    }
    return '';
  }

  function paintBeat(cell) {
    const t = ms(cell.dataset.since);
    if (!Number.isFinite(t)) {
      setText(cell, 'never');
      return;
    }
    const secs = (serverNow() - t) / 1000;
    setText(cell, fmtAgo(secs) + ' ago');
    // Amber once a beat is overdue; whether that made the droplet inactive is its status's
    // to say (the health monitor decides, on its own schedule).
    cell.classList.toggle('late', secs > Math.min(CONFIG.heartbeatInterval * 1.5, CONFIG.heartbeatTimeout));
    cell.title = 'heartbeat every ' + CONFIG.heartbeatInterval + 's; inactive after ' + CONFIG.heartbeatTimeout + 's of silence';
  }

  function renderTasks() {
    const sorted = [...S.tasks.values()].sort((a, b) => ms(b.created_at) - ms(a.created_at) || b.id - a.id);
    for (const t of sorted.slice(TASK_ROWS)) S.tasks.delete(t.id);
    const shown = sorted.slice(0, TASK_ROWS);
    const rows = [];
    const keep = new Set();
    for (const t of shown) {
      keep.add(t.id);
      let row = S.rows.tasks.get(t.id);
      if (!row) {
        row = taskRow(t.id);
        S.rows.tasks.set(t.id, row);
      }
      fillTaskRow(row, t);
      rows.push(row);
    }
    placeRows($('#tasks tbody'), rows, S.rows.tasks, keep);
    show($('#tasks-empty'), shown.length === 0);
    const total = Math.max(S.taskTotal, shown.length);
    setText($('#task-total'), total > shown.length ? '(newest ' + shown.length + ' of ' + fmtInt(total) + ')' : '(' + shown.length + ')');
  }

  function taskRow(id) {
    const row = el(
      'tr',
      { tabindex: '0', dataset: { taskId: String(id) } },
      el('td', { class: 'num' }),
      el('td', { class: 'title' }),
      el('td', { class: 'status' }),
      el('td', { class: 'num' }),
      el('td'),
      el('td', { class: 'droplet' }),
      el('td', { class: 'num age' })
    );
    row.addEventListener('click', () => openDetail(id));
    row.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' || e.key === ' ') {
        e.preventDefault();
        openDetail(id);
      }
    });
    return row;
  }

  function dropletLabel(id, name) {
    if (id === null || id === undefined) return '—';
    const known = S.droplets.get(Number(id));
    return (name || (known && known.name) || 'droplet') + ' (#' + id + ')';
  }

  function fillTaskRow(row, t) {
    const [idCell, title, status, prio, type, droplet, age] = row.children;
    setText(idCell, '#' + t.id);
    setText(title, t.title || '');
    title.title = t.title || '';
    if (row.dataset.status !== t.status) {
      if (row.dataset.status) flash(row);
      row.dataset.status = t.status;
      status.replaceChildren(badge(t.status));
    }
    setText(prio, 'P' + t.priority);
    prio.classList.toggle('prio-urgent', Number(t.priority) <= 2);
    setText(type, t.task_type || '');
    setText(droplet, dropletLabel(t.assigned_droplet_id, t.assigned_droplet_name));
    if (age.dataset.since !== t.created_at) {
      age.dataset.since = t.created_at;
      age.title = 'created ' + fmtTime(ms(t.created_at));
    }
    setText(age, fmtAgo((serverNow() - ms(age.dataset.since)) / 1000));
    row.classList.toggle('selected', S.detail.id === t.id);
  }

  let optionsKey = '';
  function renderFilterOptions() {
    const droplets = [...S.droplets.values()].sort((a, b) => dropletId(a) - dropletId(b));
    const types = [...S.types].sort();
    const key = JSON.stringify([droplets.map((d) => [dropletId(d), d.name]), types]);
    if (key === optionsKey) return;
    optionsKey = key;
    const select = $('#filter-droplet');
    const current = select.value;
    select.replaceChildren(
      el('option', { value: '', text: 'any' }),
      ...droplets.map((d) => el('option', { value: String(dropletId(d)), text: dropletLabel(dropletId(d), d.name) }))
    );
    select.value = current;
    $('#task-types').replaceChildren(...types.map((t) => el('option', { value: t })));
  }

  /** Once a second: ages, heartbeat silences, the reconnect countdown. */
  function tick() {
    const now = serverNow();
    for (const cell of document.querySelectorAll('#tasks td.age')) {
      const t = ms(cell.dataset.since);
      if (Number.isFinite(t)) setText(cell, fmtAgo((now - t) / 1000));
    }
    for (const cell of document.querySelectorAll('#droplets td.beat')) paintBeat(cell);
    updateConn();
  }

  // ---------------------------------------------------------------- task detail

  async function openDetail(id) {
    const seq = ++S.detail.seq;
    S.detail.id = id;
    show($('#detail'), true);
    setText($('#detail-title'), 'Task #' + id);
    if (!$('#detail-body').dataset.id || $('#detail-body').dataset.id !== String(id)) {
      $('#detail-body').replaceChildren(el('p', { class: 'muted', text: 'Loading…' }));
    }
    for (const [tid, row] of S.rows.tasks) row.classList.toggle('selected', tid === id);
    const [r, why] = await Promise.all([api('GET', '/tasks/' + id), api('GET', '/tasks/' + id + '/explain')]);
    if (seq !== S.detail.seq || S.detail.id !== id) return;
    if (!r.ok || !r.payload || !r.payload.task) {
      $('#detail-body').replaceChildren(el('p', { class: 'error', text: 'Could not load task #' + id + ': ' + r.detail }));
      return;
    }
    renderDetail(r.payload.task, why.ok ? why.payload : null);
  }

  const REASONS = {
    no_capable_droplet: 'No registered droplet has the capability it needs.',
    capable_droplets_inactive: 'Every droplet with the capability is inactive.',
    capable_droplets_full: 'Every active droplet with the capability is full.',
    payload_rejected_by_contracts: "The capable droplets' contracts refuse its payload.",
    waiting_for_retry: 'It failed and waits for its retry.',
    routing_paused: 'Routing is paused.',
    emergency_stop: 'An emergency stop is in effect.',
    queued_behind: 'Queued behind other pending tasks.',
  };

  /** Why a task waits (its reason and every candidate droplet), from /tasks/{id}/explain. */
  function renderExplain(x) {
    if (!x || !x.reason) return [];
    let text = REASONS[x.reason] || x.reason;
    if (x.reason === 'queued_behind') text += ' Position: ' + x.position + '.';
    if (x.retry_at) text += ' Retry at ' + fmtWhen(x.retry_at) + '.';
    const list = el('ul', { class: 'candidates' });
    for (const c of x.candidates || []) {
      const load = c.max_concurrent_tasks ? c.load + '/' + c.max_concurrent_tasks : String(c.load);
      list.append(el('li', { text: 'droplet ' + c.droplet_id + ' · ' + c.status + ' · load ' + load + (c.why_not ? ' · ' + c.why_not : ' · can take it') }));
    }
    return [el('h3', { text: 'Why is it waiting?' }), el('p', { class: 'why-waiting', dataset: { reason: x.reason }, text: text }), list];
  }

  const STATE_ORDER = ['pending', 'assigned', 'in_progress', 'completed', 'failed', 'cancelled'];

  /** 0.3s below ten seconds, then as fmtAgo. */
  function fmtSeconds(seconds) {
    const s = Number(seconds);
    if (!Number.isFinite(s)) return '—';
    return s < 10 ? s.toFixed(1) + 's' : fmtAgo(s);
  }

  /**
   * How a task that is not waiting got where it is, from /tasks/{id}/explain: each attempt
   * (the droplet the router chose, its rule and the droplets it chose among, how it ended)
   * and the time spent in each state.
   */
  function renderAttempts(x) {
    if (!x) return [];
    const attempts = Array.isArray(x.attempts) ? x.attempts : [];
    if (x.status === 'pending' && !attempts.length) return [];
    const parts = [];
    if (attempts.length) {
      const finished = ['completed', 'failed', 'cancelled'].includes(x.status);
      const ol = el('ol', { class: 'attempts' });
      for (const a of attempts) {
        const current = a.attempt === x.attempt && !finished;
        const among = Array.isArray(a.candidates) && a.candidates.length
          ? 'among droplet' + (a.candidates.length === 1 ? ' ' : 's ') + a.candidates.map((c) => c.droplet_id).join(', ')
          : '';
        const ended = (current ? 'now ' : 'ended ') + statusWord(a.ended_as) + (a.ended_because ? ': ' + a.ended_because : '');
        ol.append(
          el(
            'li',
            { class: String(a.ended_as || '').replace(/[^a-z_]/g, ''), dataset: { attempt: String(a.attempt), chosen: a.chosen_droplet_id ?? '', ended: a.ended_as || '' } },
            el('strong', { text: 'Attempt ' + a.attempt + ' → ' + (a.chosen_droplet_id !== null && a.chosen_droplet_id !== undefined ? 'droplet ' + a.chosen_droplet_id : 'no droplet recorded') }),
            ' ',
            a.assigned_at ? el('span', { class: 'when', text: fmtWhen(a.assigned_at) }) : null,
            el('span', { class: 'why', text: [a.rule, among].filter(Boolean).join(' · ') }),
            el('span', { class: 'ended', text: ended })
          )
        );
      }
      parts.push(el('h3', { text: 'Attempts (' + attempts.length + ')' }), ol);
    }
    const spent = x.time_in_state_seconds && typeof x.time_in_state_seconds === 'object' ? x.time_in_state_seconds : {};
    const rank = (k) => (STATE_ORDER.includes(k) ? STATE_ORDER.indexOf(k) : STATE_ORDER.length);
    const states = Object.keys(spent).sort((a, b) => rank(a) - rank(b));
    if (states.length) {
      const dl = el('dl', { class: 'fields time-in-state' });
      for (const k of states) dl.append(el('dt', { text: statusWord(k) }), el('dd', { dataset: { state: k }, text: fmtSeconds(spent[k]) }));
      parts.push(el('h3', { text: 'Time in each state' }), dl);
    }
    return parts;
  }

  let detailTimer = null;
  function refreshDetailSoon() {
    clearTimeout(detailTimer);
    detailTimer = setTimeout(() => {
      if (S.detail.id !== null && S.token) openDetail(S.detail.id);
    }, 250);
  }

  function closeDetail() {
    S.detail.id = null;
    S.detail.seq += 1;
    show($('#detail'), false);
    $('#detail-body').dataset.id = '';
    for (const row of S.rows.tasks.values()) row.classList.remove('selected');
  }

  function field(list, label, value) {
    if (value === null || value === undefined || value === '') return;
    list.append(el('dt', { text: label }), el('dd', {}, value));
  }

  function renderDetail(t, why) {
    const out = $('#detail-body');
    out.dataset.id = String(t.id);
    setText($('#detail-title'), 'Task #' + t.id);
    const head = el('div', { class: 'row' }, badge(t.status), el('strong', { text: t.title || '' }));
    if (isAdmin() && CANCELLABLE.includes(t.status)) {
      head.append(
        el('span', { class: 'spacer' }),
        el('button', { type: 'button', class: 'danger', id: 'detail-cancel', text: 'Cancel task', onclick: () => cancelTask(t) })
      );
    }
    const dl = el('dl', { class: 'fields' });
    field(dl, 'Type', t.task_type);
    field(dl, 'Priority', 'P' + t.priority + (Number(t.priority) === 1 ? ' (most urgent)' : ''));
    field(dl, 'Droplet', t.assigned_droplet_id !== null && t.assigned_droplet_id !== undefined ? dropletLabel(t.assigned_droplet_id, t.assigned_droplet_name) : 'none yet');
    field(dl, 'Needs', t.required_capability || 'any droplet');
    field(dl, 'Created', fmtWhen(t.created_at));
    field(dl, 'Assigned', t.assigned_at ? fmtWhen(t.assigned_at) : null);
    field(dl, 'Started', t.started_at ? fmtWhen(t.started_at) : null);
    field(dl, 'Finished', t.completed_at ? fmtWhen(t.completed_at) : null);
    field(dl, 'Deadline', t.deadline ? fmtWhen(t.deadline) : null);
    field(dl, 'Retries', (t.retry_count || 0) + ' of ' + (t.max_retries !== undefined ? t.max_retries : '?'));
    field(dl, 'Created by', /^\d+$/.test(String(t.created_by || '')) ? 'droplet ' + t.created_by : t.created_by);
    field(dl, 'Trace id', el('code', { text: t.trace_id || '' }));
    field(dl, 'Description', t.description);
    const parts = [head, dl, ...renderExplain(why), ...renderAttempts(why), el('h3', { text: 'Payload' }), el('pre', { class: 'payload', text: pretty(t.payload || {}) })];
    if (t.result !== null && t.result !== undefined) parts.push(el('h3', { text: 'Result' }), el('pre', { class: 'result', text: pretty(t.result) }));
    if (t.error_message) parts.push(el('h3', { text: 'Error' }), el('pre', { class: 'error', text: t.error_message }));
    const history = Array.isArray(t.state_history) ? t.state_history : [];
    parts.push(el('h3', { text: 'History (' + history.length + ' change' + (history.length === 1 ? '' : 's') + ')' }));
    const ol = el('ol', { class: 'timeline' });
    for (const h of history) {
      const meta = h.metadata && typeof h.metadata === 'object' && Object.keys(h.metadata).length
        ? el('details', { class: 'meta' }, el('summary', { text: 'details' }), el('pre', { text: pretty(h.metadata) }))
        : null;
      ol.append(
        el(
          'li',
          { class: String(h.to_status || '').replace(/[^a-z_]/g, ''), dataset: { to: h.to_status || '' } },
          el('strong', { text: (h.from_status ? statusWord(h.from_status) + ' → ' : 'created → ') + statusWord(h.to_status) }),
          ' ',
          el('span', { class: 'when', text: fmtWhen(h.changed_at) }),
          el('span', { class: 'why', text: [h.reason, h.changed_by ? 'by ' + h.changed_by : ''].filter(Boolean).join(' · ') }),
          meta
        )
      );
    }
    parts.push(ol);
    out.replaceChildren(...parts);
  }

  // ---------------------------------------------------------------- operator actions

  function confirmDialog(text) {
    const dialog = $('#confirm');
    setText($('#confirm-text'), text);
    return new Promise((resolve) => {
      const done = (answer) => {
        $('#confirm-yes').onclick = null;
        $('#confirm-no').onclick = null;
        dialog.oncancel = null;
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      $('#confirm-yes').onclick = () => done(true);
      $('#confirm-no').onclick = () => done(false);
      dialog.oncancel = (e) => {
        e.preventDefault();
        done(false);
      };
      dialog.showModal();
      $('#confirm-no').focus();
    });
  }

  let toastTimer = null;
  function toast(text, bad) {
    const t = $('#toast');
    setText(t, text);
    t.classList.toggle('bad', Boolean(bad));
    show(t, true);
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => show(t, false), 6000);
  }

  /** Confirms, calls, and shows the API's answer (toast and the actions list). */
  async function act(question, label, method, path, payload) {
    if (!(await confirmDialog(question))) return null;
    const r = await api(method, path, payload);
    const line = label + ' → ' + (r.status || 'no answer') + (r.ok ? ' OK' : ': ' + r.detail);
    toast(line, !r.ok);
    const li = el(
      'li',
      { dataset: { status: String(r.status) } },
      el('span', { class: 'muted', text: fmtTime(Date.now()) + ' ' }),
      el('span', { text: method + ' ' + path + ' ' }),
      el('span', { class: 'status ' + (r.ok ? 'ok' : 'bad'), text: '→ ' + (r.status || 'no answer') + (r.ok ? '' : ' ' + r.detail) }),
      r.body !== null && r.body !== undefined ? el('pre', { text: pretty(r.ok ? r.payload : r.body) }) : null
    );
    const log = $('#action-log');
    log.prepend(li);
    while (log.children.length > 30) log.lastChild.remove();
    show($('#log-empty'), false);
    return r;
  }

  async function toggleDroplet(d) {
    const id = dropletId(d);
    const name = (d.name || 'droplet') + ' (#' + id + ')';
    const activate = d.status !== 'active';
    const question = activate
      ? 'Activate ' + name + '? It gets tasks again.'
      : 'Deactivate ' + name + '? It gets no new tasks until activated, and its tasks go back to the queue.';
    const r = await act(question, (activate ? 'Activate ' : 'Deactivate ') + name, 'POST', '/droplets/' + id + (activate ? '/activate' : '/deactivate'), {});
    if (r && r.ok) refreshDroplets();
  }

  async function cancelTask(t) {
    const me = S.claims ? 'droplet-' + S.claims.droplet_id : 'the dashboard';
    const r = await act(
      'Cancel task #' + t.id + ' (' + (t.title || t.task_type) + ')? Its droplet is told to stop.',
      'Cancel task #' + t.id,
      'DELETE',
      '/tasks/' + t.id,
      { reason: 'cancelled from the dashboard by ' + me }
    );
    if (r) refreshDetailSoon();
  }

  // ---------------------------------------------------------------- scheduled jobs

  function jobsOf(payload) {
    if (Array.isArray(payload)) return payload;
    if (payload && Array.isArray(payload.jobs)) return payload.jobs;
    if (payload && payload.jobs && typeof payload.jobs === 'object') {
      return Object.entries(payload.jobs).map(([id, j]) => Object.assign({ id }, j));
    }
    return [];
  }

  async function loadJobs() {
    const note = $('#jobs-note');
    const table = $('#jobs');
    if (!isAdmin()) {
      show(table, false);
      setText(note, 'The scheduler is shown to admin tokens.');
      show(note, true);
      return;
    }
    const gen = S.gen;
    const r = await api('GET', '/management/scheduler/jobs');
    if (gen !== S.gen) return;
    if (!r.ok) {
      show(table, false);
      setText(note, r.status === 404 ? 'This server has no scheduler endpoints.' : 'Could not load the jobs: ' + r.detail);
      show(note, true);
      return;
    }
    const jobs = jobsOf(r.payload);
    show(table, jobs.length > 0);
    setText(note, jobs.length ? '' : 'No scheduled jobs.');
    show(note, jobs.length === 0);
    const rows = [];
    const keep = new Set();
    for (const j of jobs) {
      const id = String(j.id || j.job_id || j.name || '');
      if (!id) continue;
      keep.add(id);
      let row = S.rows.jobs.get(id);
      if (!row) {
        row = jobRow(id);
        S.rows.jobs.set(id, row);
      }
      fillJobRow(row, j);
      rows.push(row);
    }
    placeRows($('#jobs tbody'), rows, S.rows.jobs, keep);
  }

  function jobPaused(j) {
    return j.paused === true || j.status === 'paused' || j.state === 'paused';
  }

  function jobRow(id) {
    const action = el('button', { type: 'button', class: 'small' });
    action.addEventListener('click', async () => {
      const paused = action.dataset.paused === 'true';
      const verb = paused ? 'resume' : 'pause';
      const question = paused ? 'Resume the job ' + id + '?' : 'Pause the job ' + id + '? It stops running until resumed.';
      const r = await act(question, (paused ? 'Resume ' : 'Pause ') + id, 'POST', '/management/scheduler/jobs/' + encodeURIComponent(id) + '/' + verb, {});
      if (r) loadJobs();
    });
    const row = el('tr', { dataset: { jobId: id } }, el('td', { text: id }), el('td', { class: 'num' }), el('td'), el('td', { class: 'num' }), el('td'), el('td', { class: 'admin-only' }, action));
    row.refs = { action };
    return row;
  }

  function fillJobRow(row, j) {
    const [, every, state, runs, last] = row.children;
    const interval = j.interval_seconds !== undefined ? j.interval_seconds : j.interval;
    setText(every, interval !== undefined && interval !== null ? interval + 's' : '—');
    const paused = jobPaused(j);
    const word = paused ? 'paused' : j.running ? 'running' : 'scheduled';
    if (row.dataset.state !== word) {
      row.dataset.state = word;
      state.replaceChildren(badge(word));
    }
    const r = j.runs !== undefined ? j.runs : j.run_count;
    const f = j.failures !== undefined ? j.failures : j.failure_count;
    setText(runs, (r !== undefined ? r : '–') + ' / ' + (f !== undefined ? f : '–'));
    const lastRun = j.last_run || j.last_run_at;
    // "ok: 0 marked inactive, 0 tasks recovered": the word in the cell, the rest on hover.
    const outcome = j.last_outcome ? ' · ' + String(j.last_outcome).split(':')[0] : '';
    setText(last, lastRun ? fmtAgo((serverNow() - ms(lastRun)) / 1000) + ' ago' + outcome : 'not yet');
    last.title = [j.last_outcome, j.last_error].filter(Boolean).join('\n');
    last.classList.toggle('error', Boolean(j.last_error) && String(j.last_outcome || '').startsWith('error'));
    const b = row.refs.action;
    b.dataset.paused = String(paused);
    setText(b, paused ? 'Resume' : 'Pause');
  }

  // ---------------------------------------------------------------- wiring

  function pageError(message) {
    const p = $('#page-error');
    setText(p, message || '');
    show(p, Boolean(message));
  }

  function applyFilters() {
    S.filters = {
      status: $('#filter-status').value,
      task_type: $('#filter-type').value.trim(),
      droplet: $('#filter-droplet').value,
    };
    S.tasks.clear();
    render();
    loadTasks();
  }

  function init() {
    window.addEventListener('error', (e) => pageError('Dashboard error: ' + (e.message || 'unknown')));
    window.addEventListener('unhandledrejection', (e) => pageError('Dashboard error: ' + ((e.reason && e.reason.message) || e.reason)));
    setText($('#version'), CONFIG.version ? 'v' + CONFIG.version : '');
    $('#signin-form').addEventListener('submit', (e) => {
      e.preventDefault();
      signIn($('#token-input').value);
    });
    $('#mint-read').addEventListener('click', () => mint(['read']));
    $('#mint-admin').addEventListener('click', () => mint(['read', 'write', 'admin']));
    $('#signout').addEventListener('click', () => signOut(''));
    $('#detail-close').addEventListener('click', closeDetail);
    document.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && !$('#detail').hidden && !$('#confirm').open) closeDetail();
    });
    let typeTimer = null;
    $('#filter-status').addEventListener('change', applyFilters);
    $('#filter-droplet').addEventListener('change', applyFilters);
    $('#filter-type').addEventListener('input', () => {
      clearTimeout(typeTimer);
      typeTimer = setTimeout(applyFilters, 350);
    });
    $('#filters').addEventListener('reset', () => setTimeout(applyFilters, 0));
    $('#filters').addEventListener('submit', (e) => e.preventDefault());
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && S.token && S.synced) resyncSoon();
    });
    const saved = storage('get');
    if (saved) {
      show($('#signin'), false);
      signIn(saved);
    } else {
      showSignin('');
    }
  }

  // ---------------------------------------------------------------- keys at their limit

  /** The keys an admin's limits hold now (GET /management/limits): at max_in_flight, at
   * max_queued (creations answered 429), or waiting for their rate's next slot. */
  async function loadKeyLimits() {
    const note = $('#key-limits-note');
    const table = $('#key-limits');
    if (!note || !table || !isAdmin()) return;
    const gen = S.gen;
    const r = await api('GET', '/management/limits');
    if (gen !== S.gen) return;
    if (!r.ok) {
      show(table, false);
      setText(note, r.status === 404 ? 'This server has no limits per key.' : 'Could not load the limits: ' + r.detail);
      show(note, true);
      return;
    }
    const now = serverNow();
    const held = ((r.payload && r.payload.limits) || []).filter((k) =>
      k.at_in_flight_limit || k.at_queued_limit || (k.next_slot && ms(k.next_slot) > now));
    const body = table.querySelector('tbody');
    body.replaceChildren(...held.map((k) => el('tr', {},
      el('td', {}, String(k.key)),
      el('td', {}, [k.at_in_flight_limit && 'max_in_flight', k.at_queued_limit && 'max_queued',
        k.next_slot && ms(k.next_slot) > now && 'max_per_second'].filter(Boolean).join(', ')),
      el('td', { class: 'num' }, fmtInt(k.in_flight) + (k.max_in_flight != null ? ' / ' + fmtInt(k.max_in_flight) : '')),
      el('td', { class: 'num' }, fmtInt(k.queued) + (k.max_queued != null ? ' / ' + fmtInt(k.max_queued) : '')),
      el('td', {}, k.next_slot ? fmtTime(ms(k.next_slot)) : ''))));
    show(table, held.length > 0);
    setText(note, held.length ? '' : 'No key is at a limit.');
    show(note, held.length === 0);
  }

  init();
})();
