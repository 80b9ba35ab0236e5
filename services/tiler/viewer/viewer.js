// tilefm viewer: a job list, and for one job (the newest finished one where none is named) its
// input scene (true colour) under its output (class map or embedding), point values on click and,
// for embeddings, a similarity layer. At /viewer/files (`tilefm view`): every file the server was
// started with, as layers in the order they were named (the first on top), no input scenes.
// Plain ES module; MapLibre GL comes from /viewer/vendor/maplibre-gl.js (global `maplibregl`).
// Everything is fetched from this origin: no basemap, no CDN.

const API = '/v1';
const KEY_STORAGE = 'tilefm.apiKey';
const BACKGROUND = '#1d2126';
const $ = (id) => document.getElementById(id);

// ---- test / debugging hook -------------------------------------------------------------------
let resolveReady;
let rejectReady;
const ready = new Promise((resolve, reject) => { resolveReady = resolve; rejectReady = reject; });
ready.catch(() => {}); // a failed load is shown in the banner; don't also log an unhandled rejection

const hook = {
  map: null,
  ready, //        resolves at the map's first 'idle' after the layers were added
  state: 'loading', // then 'ready' or 'failed' (for polling)
  info: null, //   the job's /info JSON (`tilefm view`: the selected file's)
  files: [], //     `tilefm view`: every file's /info JSON, in the order named
  lastPoint: null, // the last /point JSON shown
  pending: Promise.resolve(), // the last click: resolves once its panel (and similarity layer) are done
  tileErrors: [], // every map 'error' event (tile and TileJSON loads), as {source, tile, status, message}
  errors: [], //    every error shown in the banner
  extraFrames: 0, // frames whenIdle had to ask for again
  whenIdle,
};
window.tilefmViewer = hook;

// ---- API -------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message, field = null) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

function apiKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ''; } catch { return ''; }
}

// a key given in the page's address (/viewer?api_key=KEY) is kept like a typed one, and taken
// out of the address so that it is not bookmarked or shared with the link
(() => {
  const params = new URLSearchParams(location.search);
  const key = params.get('api_key');
  if (key === null) return;
  try { localStorage.setItem(KEY_STORAGE, key.trim()); } catch { /* private mode */ }
  params.delete('api_key');
  const query = params.toString();
  history.replaceState(null, '', location.pathname + (query ? `?${query}` : '') + location.hash);
})();

/** Whether `url` (absolute, or relative to this page) is on this page's origin. */
function sameOrigin(url) {
  try { return new URL(url, location.href).origin === location.origin; } catch { return false; }
}

function authHeaders() {
  const key = apiKey();
  return key ? { 'X-API-Key': key } : {};
}

async function api(path) {
  let response;
  try {
    response = await fetch(path, { headers: { Accept: 'application/json', ...authHeaders() } });
  } catch (err) {
    throw new ApiError(0, `cannot reach the server (${err.message})`);
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!response.ok) {
    const e = body && body.error;
    if (e && e.message) throw new ApiError(e.status || response.status, e.message, e.field || null);
    throw new ApiError(response.status, text.slice(0, 200) || response.statusText || 'request failed');
  }
  if (body === null) throw new ApiError(response.status, `${path}: the answer is not JSON`);
  return body;
}

// ---- banner ----------------------------------------------------------------------------------
function showError(err, context = '') {
  const status = err && err.status ? `${err.status} ` : '';
  const field = err && err.field ? `${err.field}: ` : '';
  const message = (err && err.message) || String(err);
  const text = `${context ? context + ': ' : ''}${status}${field}${message}`;
  hook.errors.push(text);
  $('banner-text').textContent = text;
  $('key-form').hidden = !(err && err.status === 401);
  $('banner').hidden = false;
  console.error(text);
}

$('banner-close').addEventListener('click', () => { $('banner').hidden = true; });
$('key-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  try { localStorage.setItem(KEY_STORAGE, $('key-input').value.trim()); } catch { /* private mode */ }
  location.reload();
});

// ---- map -------------------------------------------------------------------------------------
const jobMatch = location.pathname.match(/^\/viewer\/jobs\/([^/]+)\/?$/);
let jobId = jobMatch ? decodeURIComponent(jobMatch[1]) : null;
/** `tilefm view`: the files named on its command line, all at once */
const FILES = /^\/viewer\/files\/?$/.test(location.pathname);

const map = new maplibregl.Map({
  container: 'map',
  style: {
    version: 8,
    sources: {},
    layers: [{ id: 'background', type: 'background', paint: { 'background-color': BACKGROUND } }],
  },
  center: [0, 20],
  zoom: 1.5,
  attributionControl: false,
  transformRequest: (url) => {
    // the API key (if one was entered) goes to this origin only, as a header (never in a URL):
    // TileJSON and tile URLs from the tiler are absolute or root-relative
    if (!sameOrigin(url)) return { url };
    const absolute = new URL(url, location.href).href;
    const key = apiKey();
    return key ? { url: absolute, headers: { 'X-API-Key': key } } : { url: absolute };
  },
});
hook.map = map;
map.addControl(new maplibregl.NavigationControl({ showCompass: false }), 'top-right');
map.addControl(new maplibregl.ScaleControl(), 'bottom-right');

map.on('error', (ev) => {
  const error = ev.error || {};
  if (error.name === 'AbortError') return;
  const t = ev.tile && ev.tile.tileID && ev.tile.tileID.canonical;
  const entry = {
    source: ev.sourceId || (ev.source && ev.source.id) || null,
    tile: t ? `${t.z}/${t.x}/${t.y}` : null,
    status: error.status || null,
    message: error.message || String(error),
  };
  hook.tileErrors.push(entry);
  const n = hook.tileErrors.length;
  showError({ status: entry.status, message: entry.message },
    `${n} tile${n === 1 ? '' : 's'} failed to load${entry.source ? ` (layer ${layerTitle(entry.source)})` : ''}`);
});

/** Resolves at the next 'idle' (all sources and tiles loaded, nothing moving). MapLibre fires
 * 'idle' only at the end of a frame it draws, and a frame can be dropped (with software WebGL it
 * sometimes is), so a frame is asked for again every 250 ms until 'idle' comes. */
function whenIdle() {
  return new Promise((resolve) => {
    const timer = setInterval(() => { hook.extraFrames += 1; map.triggerRepaint(); }, 250);
    map.once('idle', () => { clearInterval(timer); resolve(); });
    map.triggerRepaint();
  });
}

const mapLoaded = new Promise((resolve) => map.once('load', resolve));

// ---- layers ----------------------------------------------------------------------------------
// bottom to top; each {id, title, url, opacity, visible}
const layers = [];

function layerTitle(id) {
  const layer = layers.find((l) => l.id === id);
  return layer ? layer.title : id;
}

/** Adds (or replaces) a raster layer from a TileJSON URL, keeping the stacking order of `layers`. */
function putRasterLayer(spec) {
  const index = layers.findIndex((l) => l.id === spec.id);
  const layer = index >= 0 ? Object.assign(layers[index], { url: spec.url, title: spec.title, resampling: spec.resampling }) : { opacity: 1, visible: true, ...spec };
  if (index < 0) layers.push(layer);
  if (map.getLayer(layer.id)) map.removeLayer(layer.id);
  if (map.getSource(layer.id)) map.removeSource(layer.id);
  map.addSource(layer.id, { type: 'raster', url: layer.url, tileSize: 256 });
  const above = layers.slice(layers.indexOf(layer) + 1).find((l) => map.getLayer(l.id));
  map.addLayer({
    id: layer.id,
    type: 'raster',
    source: layer.id,
    layout: { visibility: layer.visible ? 'visible' : 'none' },
    paint: { 'raster-opacity': layer.opacity, 'raster-fade-duration': 0, 'raster-resampling': layer.resampling || 'linear' },
  }, above ? above.id : undefined);
  renderLayerList();
  return layer;
}

function renderLayerList() {
  const list = $('layers');
  list.replaceChildren();
  for (const layer of [...layers].reverse()) { // top layer first
    const li = document.createElement('li');
    li.dataset.layer = layer.id;
    const toggle = document.createElement('input');
    toggle.type = 'checkbox';
    toggle.checked = layer.visible;
    toggle.title = 'show / hide';
    toggle.addEventListener('change', () => {
      layer.visible = toggle.checked;
      map.setLayoutProperty(layer.id, 'visibility', layer.visible ? 'visible' : 'none');
    });
    const name = document.createElement('span');
    name.className = 'layer-name';
    name.textContent = layer.title;
    name.title = layer.title;
    const opacity = document.createElement('input');
    opacity.type = 'range';
    opacity.min = '0';
    opacity.max = '100';
    opacity.value = String(Math.round(layer.opacity * 100));
    opacity.title = 'opacity';
    opacity.setAttribute('aria-label', `${layer.title} opacity`);
    const pct = document.createElement('span');
    pct.className = 'pct';
    pct.textContent = `${opacity.value}%`;
    opacity.addEventListener('input', () => {
      layer.opacity = Number(opacity.value) / 100;
      pct.textContent = `${opacity.value}%`;
      map.setPaintProperty(layer.id, 'raster-opacity', layer.opacity);
    });
    const label = document.createElement('label');
    label.append(toggle, name);
    li.append(label, opacity, pct);
    list.append(li);
  }
}

// ---- job list --------------------------------------------------------------------------------
async function loadJobs() {
  const list = $('jobs');
  try {
    const body = await api(`${API}/jobs?state=succeeded`);
    const jobs = body.jobs || [];
    list.replaceChildren();
    if (!jobs.length) {
      list.innerHTML = '<li class="muted">no finished jobs yet</li>';
      return [];
    }
    for (const job of jobs) {
      const li = document.createElement('li');
      const a = document.createElement('a');
      a.href = `/viewer/jobs/${encodeURIComponent(job.id)}`;
      a.dataset.job = job.id;
      if (job.id === jobId) a.className = 'current';
      const model = job.model || (job.spec && job.spec.model) || '?';
      const created = job.created || (job.timings && job.timings.created) || '';
      const title = document.createElement('span');
      title.className = 'job-model';
      title.textContent = model;
      const meta = document.createElement('span');
      meta.className = 'muted small';
      // ids start with their creation time: the end tells jobs apart
      meta.textContent = [created && created.slice(0, 16).replace('T', ' '), `…${job.id.slice(-6)}`]
        .filter(Boolean).join(' · ');
      a.title = job.id;
      a.append(title, meta);
      li.append(a);
      list.append(li);
    }
    return jobs;
  } catch (err) {
    list.replaceChildren(el('li', 'muted small', err.status === 404 ? err.message : 'could not list the jobs'));
    if (err.status !== 404) showError(err, 'job list'); // 404: listing is switched off on this server
    return [];
  }
}

// ---- outputs (one job's, or the files of `tilefm view`) ----------------------------------------
const pathOf = (id) => `${API}/jobs/${encodeURIComponent(id)}`;

// each {info, layerId, name, opacity, render, bands, legend, seq}, in the order listed (top first)
const outputs = [];
let selected = null; // the output a click's similarity and the render controls are for

function newOutput(info, layerId, name = null, opacity = 0.8) {
  const entry = { info, layerId, name, opacity, render: info.default_render, bands: [1, 2, 3].map((b) => Math.min(b, info.count)), legend: null, seq: 0 };
  outputs.push(entry);
  return entry;
}

function outputUrl(entry) {
  let url = `${pathOf(entry.info.id)}/tilejson.json?render=${encodeURIComponent(entry.render)}`;
  if (entry.render === 'rgb') url += `&bands=${entry.bands.join(',')}`;
  return url;
}

function outputTitle(entry) {
  const info = entry.info;
  const title = info.kind === 'classes' ? info.model : `${info.model} · ${entry.render}`;
  return entry.name ? `${entry.name} · ${title}` : title;
}

/** Installs the render controls' listeners (once): they drive the selected output. */
function setupRenderControls() {
  const select = $('render');
  const bands = ['band-r', 'band-g', 'band-b'];
  const redraw = () => showOutput(selected).catch((err) => showError(err, 'render'));
  bands.forEach((id, k) => {
    $(id).addEventListener('change', () => {
      selected.bands[k] = Number($(id).value);
      redraw();
    });
  });
  select.addEventListener('change', () => {
    selected.render = select.value;
    selected.bands = bands.map((id) => Number($(id).value));
    $('rgb-bands').hidden = select.value !== 'rgb';
    redraw();
  });
}

/** Shows the render controls of `entry` (embeddings with a choice of renderings). */
function syncRenderControls(entry) {
  const info = entry.info;
  const choices = (info.renders || []).filter((r) => r !== 'similarity');
  const select = $('render');
  select.replaceChildren(...choices.map((r) => new Option(r === 'pca' ? 'PCA (3 components)' : r === 'rgb' ? 'RGB of 3 bands' : r, r)));
  if (!choices.includes(entry.render)) entry.render = choices.includes(info.default_render) ? info.default_render : choices[0];
  select.value = entry.render;
  $('render-controls').hidden = info.kind !== 'embedding' || choices.length < 2;
  const names = info.band_names && info.band_names.length ? info.band_names : Array.from({ length: info.count }, (_, i) => `band ${i + 1}`);
  ['band-r', 'band-g', 'band-b'].forEach((id, k) => {
    const s = $(id);
    s.replaceChildren(...names.map((n, i) => new Option(`${'RGB'[k]} ${i + 1} · ${n}`, String(i + 1))));
    s.value = String(entry.bands[k]);
  });
  $('rgb-bands').hidden = select.value !== 'rgb';
}

async function showOutput(entry) {
  const seq = ++entry.seq;
  const url = outputUrl(entry);
  const tj = await api(url); // fetched here first so an API error reaches the banner
  if (seq !== entry.seq) return;
  putRasterLayer({ id: entry.layerId, title: outputTitle(entry), url, opacity: entry.opacity,
    resampling: entry.info.kind === 'classes' ? 'nearest' : 'linear' });
  entry.legend = tj.legend || entry.info.classes || null;
  renderLegend();
}

/** The legends of every class map shown, each under its layer's name where there are several. */
function renderLegend() {
  const list = $('legend');
  list.replaceChildren();
  const groups = outputs.filter((e) => e.legend && e.legend.length);
  $('legend-section').hidden = !groups.length;
  for (const entry of groups) {
    if (groups.length > 1) list.append(el('li', 'legend-title', entry.name || entry.info.model));
    for (const e of entry.legend) {
      const li = document.createElement('li');
      const sw = document.createElement('span');
      sw.className = 'swatch';
      sw.style.background = e.color;
      const name = document.createElement('span');
      name.textContent = e.name;
      const value = document.createElement('span');
      value.className = 'muted small';
      value.textContent = String(e.value);
      li.append(sw, name, value);
      list.append(li);
    }
  }
}

/** Fits the map to the union of the outputs' bounds. */
function fitTo(infos) {
  const w = Math.min(...infos.map((i) => i.bounds[0]));
  const s = Math.min(...infos.map((i) => i.bounds[1]));
  const e = Math.max(...infos.map((i) => i.bounds[2]));
  const n = Math.max(...infos.map((i) => i.bounds[3]));
  map.fitBounds([[w, s], [e, n]], { padding: 30, animate: false });
  // raster sources draw nothing below their minzoom: never open on an empty map
  const minzoom = Math.max(...infos.map((i) => i.minzoom).filter(Number.isFinite));
  if (Number.isFinite(minzoom) && map.getZoom() < minzoom) {
    map.jumpTo({ center: [(w + e) / 2, (s + n) / 2], zoom: minzoom });
  }
}

// ---- point values ----------------------------------------------------------------------------
const marker = new maplibregl.Marker({ color: '#ff4081', scale: 0.7 });
let pointSeq = 0;

async function queryPoint(lngLat) {
  const seq = ++pointSeq;
  const lon = Number(lngLat.lng.toFixed(6));
  const lat = Number(lngLat.lat.toFixed(6));
  marker.setLngLat([lon, lat]).addTo(map);
  $('point-section').hidden = false;
  $('hint').hidden = true;
  $('point').innerHTML = '<p class="muted">reading…</p>';
  // every output's values there (`tilefm view`: each file's; outside a file's bounds it has none)
  const reads = await Promise.all(outputs.map((entry) => api(`${pathOf(entry.info.id)}/point/${lon},${lat}`)
    .then((point) => ({ entry, point }), (err) => ({ entry, err }))));
  if (seq !== pointSeq) return;
  const read = reads.filter((r) => r.point);
  if (!read.length) {
    $('point').innerHTML = '<p class="muted">no value here</p>';
    showError(reads[0].err, 'point');
    return;
  }
  for (const r of reads) if (r.err && r.err.status !== 404) showError(r.err, `point (${r.entry.name || r.entry.info.model})`);
  renderPoints(reads);
  const mine = read.find((r) => r.entry === selected) || read[0];
  hook.lastPoint = mine.point;
  if (mine.entry === selected && (selected.info.renders || []).includes('similarity')) {
    try {
      const url = `${pathOf(selected.info.id)}/tilejson.json?render=similarity&lon=${lon}&lat=${lat}`;
      await api(url);
      if (seq !== pointSeq) return;
      const of = selected.name ? ` (${selected.name})` : '';
      const layer = putRasterLayer({ id: 'similarity', title: `similarity${of} to ${lon.toFixed(4)}, ${lat.toFixed(4)}`, url, opacity: 0.75 });
      layer.lon = lon;
      layer.lat = lat;
    } catch (err) {
      showError(err, 'similarity');
    }
  }
  await whenIdle();
}

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : v.toFixed(4).replace(/\.?0+$/, '') || '0';
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function sparkline(values) {
  const NS = 'http://www.w3.org/2000/svg';
  const W = 268;
  const H = 56;
  const finite = values.filter((v) => v !== null && Number.isFinite(v));
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  const span = hi - lo || 1;
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('class', 'spark');
  const x = (i) => (values.length > 1 ? (i / (values.length - 1)) * (W - 2) + 1 : W / 2);
  const y = (v) => H - 2 - ((v - lo) / span) * (H - 4);
  if (lo < 0 && hi > 0) {
    const zero = document.createElementNS(NS, 'line');
    zero.setAttribute('x1', '0');
    zero.setAttribute('x2', String(W));
    zero.setAttribute('y1', String(y(0)));
    zero.setAttribute('y2', String(y(0)));
    zero.setAttribute('class', 'zero');
    svg.append(zero);
  }
  let run = [];
  const flush = () => {
    if (run.length) {
      const line = document.createElementNS(NS, 'polyline');
      line.setAttribute('points', run.join(' '));
      svg.append(line);
    }
    run = [];
  };
  values.forEach((v, i) => {
    if (v === null || !Number.isFinite(v)) flush();
    else run.push(`${x(i).toFixed(1)},${y(v).toFixed(1)}`);
  });
  flush();
  return svg;
}

/** The values each output has at the clicked point, under the output's name where there are several. */
function renderPoints(reads) {
  const box = $('point');
  box.replaceChildren();
  const first = reads.find((r) => r.point).point;
  const [lon, lat] = first.coordinates || [NaN, NaN];
  box.append(el('p', 'coords', `${lon.toFixed(5)}, ${lat.toFixed(5)}`));
  for (const { entry, point } of reads) {
    if (reads.length > 1) box.append(el('h3', 'point-file', entry.name || entry.info.model));
    if (point) renderPoint(box, point, entry.info);
    else box.append(el('p', 'muted small', 'no value here'));
  }
}

function renderPoint(box, point, info) {
  const values = point.values || [];
  const names = point.band_names || [];
  const finite = values.filter((v) => v !== null && Number.isFinite(v));

  const isClasses = info.kind === 'classes' || 'class' in point;
  if (isClasses && point.class) {
    const legend = (info.classes || []).find((c) => c.value === point.class.value);
    const p = el('p', 'class-value');
    const sw = el('span', 'swatch');
    sw.style.background = point.class.color || (legend && legend.color) || 'transparent';
    p.append(sw, el('strong', null, point.class.name), el('span', 'muted small', ` (value ${point.class.value})`));
    box.append(p);
  } else if (!finite.length) {
    box.append(el('p', 'muted', 'no data at this point'));
  }

  if (!isClasses && values.length > 8 && finite.length) {
    const mean = finite.reduce((a, b) => a + b, 0) / finite.length;
    box.append(el('p', 'small', `${values.length} values · min ${fmt(Math.min(...finite))} · max ${fmt(Math.max(...finite))} · mean ${fmt(mean)}`));
    box.append(sparkline(values));
  }
  if (!isClasses || values.length > 1) {
    const details = el('details');
    details.open = values.length <= 8;
    details.append(el('summary', 'small', values.length <= 8 ? 'values' : `all ${values.length} values`));
    const grid = el('div', 'values');
    values.forEach((v, i) => {
      grid.append(el('span', 'muted', names[i] || `b${i + 1}`), el('span', null, fmt(v)));
    });
    details.append(grid);
    box.append(details);
  }
}

// ---- start -----------------------------------------------------------------------------------
function select(entry) {
  selected = entry;
  hook.info = entry.info;
  syncRenderControls(entry);
  for (const a of document.querySelectorAll('#jobs a[data-file]')) {
    a.className = a.dataset.file === entry.info.id ? 'current' : '';
  }
}

function listenForClicks() {
  map.on('click', (ev) => { hook.pending = queryPoint(ev.lngLat); });
  map.getCanvas().style.cursor = 'crosshair';
}

async function openJob() {
  const [info] = await Promise.all([api(`${pathOf(jobId)}/info`), mapLoaded]);
  $('job-title').textContent = `${info.model} · ${info.kind}`;
  document.title = `${info.model} · tilefm viewer`;
  $('layers-section').hidden = false;
  $('hint').hidden = false;
  setupRenderControls();
  select(newOutput(info, 'output'));

  const sceneUrl = `${pathOf(jobId)}/scene/tilejson.json`;
  await api(sceneUrl);
  putRasterLayer({ id: 'scene', title: 'scene (true colour)', url: sceneUrl, opacity: 1 });
  await showOutput(selected);
  fitTo([info]);
  listenForClicks();
  await whenIdle();
}

/** `tilefm view`: every file as a layer, the first named on top; the first embedding selected. */
async function openFiles() {
  $('jobs-title').textContent = 'Files';
  const [body] = await Promise.all([api(`${API}/files`), mapLoaded]);
  const files = body.files || [];
  const infos = await Promise.all(files.map((f) => api(`${pathOf(f.id)}/info`)));
  hook.files = infos;
  files.forEach((f, i) => newOutput(infos[i], `file-${i}`, f.name, i === files.length - 1 ? 1 : 0.8));

  const list = $('jobs');
  list.replaceChildren();
  for (const entry of outputs) {
    const a = document.createElement('a');
    a.href = '#';
    a.dataset.file = entry.info.id;
    a.title = `${entry.info.output}: click to select (render controls, similarity) and zoom to it`;
    a.append(el('span', 'job-model', entry.name), el('span', 'muted small', `${entry.info.model} · ${entry.info.kind}`));
    a.addEventListener('click', (ev) => {
      ev.preventDefault();
      select(entry);
      fitTo([entry.info]);
    });
    const li = document.createElement('li');
    li.append(a);
    list.append(li);
  }
  $('job-title').textContent = `${files.length} file${files.length === 1 ? '' : 's'}`;
  document.title = `${files.map((f) => f.name).join(', ')} · tilefm view`;
  if (!outputs.length) return;
  $('layers-section').hidden = false;
  $('hint').hidden = false;
  setupRenderControls();
  select(outputs.find((e) => e.info.kind === 'embedding') || outputs[0]);
  for (const entry of [...outputs].reverse()) await showOutput(entry); // bottom layer first
  fitTo(infos);
  listenForClicks();
  await whenIdle();
}

async function start() {
  try {
    if (FILES) {
      await openFiles();
    } else {
      const jobs = loadJobs();
      if (!jobId) {
        // no job named: the one that finished last, if there is one
        const newest = (await jobs).reduce((a, b) => (!a || (b.finished || '') > (a.finished || '') ? b : a), null);
        if (newest) jobId = newest.id;
        const link = newest && document.querySelector(`#jobs a[data-job="${CSS.escape(newest.id)}"]`);
        if (link) link.className = 'current';
      }
      if (jobId) {
        await openJob();
        await jobs;
      } else {
        await Promise.all([jobs, mapLoaded]);
        await whenIdle();
      }
    }
    hook.state = 'ready';
    resolveReady(true);
  } catch (err) {
    showError(err, FILES ? 'files' : jobId ? 'job' : '');
    hook.state = 'failed';
    rejectReady(err);
  }
}

start();
