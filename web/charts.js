// charts.js owns the web client's charts: small SVG renderers for a time series (bars per
// bucket with an optional line over them) and for a ratio against a healthy band. They are
// drawn locally from plain numbers, with no chart library and nothing fetched from a CDN.
// They know nothing of the protocol or of rooms: callers pass arrays of numbers and labels.

const NS = 'http://www.w3.org/2000/svg';

function svgEl(tag, attrs = {}, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

/// A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten, at least `max`.
export function niceMax(max) {
  if (!(max > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(max)));
  for (const m of [1, 2, 5, 10]) if (m * p >= max) return m * p;
  return 10 * p;
}

/// A bar chart of one or more series per bucket, with an optional line series drawn over it.
/// `labels`: one string per bucket; `bars`: [{name, values, cls}]; `line`: {name, values, cls}.
/// Returns an <svg> element with a <title> per bar so the numbers are readable on hover.
export function seriesChart({ labels, bars, line, width = 640, height = 220, label = 'chart' }) {
  const pad = { l: 34, r: 8, t: 10, b: 28 };
  const w = width - pad.l - pad.r;
  const h = height - pad.t - pad.b;
  const n = Math.max(labels.length, 1);
  const all = bars.flatMap((b) => b.values).concat(line ? line.values : []);
  const top = niceMax(Math.max(0, ...all));
  const y = (v) => pad.t + h - (v / top) * h;
  const svg = svgEl('svg', {
    viewBox: `0 0 ${width} ${height}`, class: 'chart', role: 'img', 'aria-label': label,
    preserveAspectRatio: 'xMidYMid meet',
  });
  // Grid lines and the y axis labels: 0, half, top.
  for (const v of [0, top / 2, top]) {
    svg.append(svgEl('line', { x1: pad.l, x2: pad.l + w, y1: y(v), y2: y(v), class: 'grid' }));
    svg.append(svgEl('text', { x: pad.l - 4, y: y(v) + 4, 'text-anchor': 'end', class: 'axis' },
      Number.isInteger(v) ? String(v) : v.toFixed(1)));
  }
  const slot = w / n;
  const bw = Math.max(1, (slot * 0.8) / Math.max(bars.length, 1));
  labels.forEach((lab, i) => {
    bars.forEach((b, j) => {
      const v = b.values[i] || 0;
      const x = pad.l + i * slot + slot * 0.1 + j * bw;
      const r = svgEl('rect', {
        x: x.toFixed(1), y: y(v).toFixed(1), width: bw.toFixed(1), height: Math.max(0, pad.t + h - y(v)).toFixed(1),
        class: 'bar ' + (b.cls || ''), 'data-value': v,
      });
      r.append(svgEl('title', {}, `${lab}: ${v} ${b.name}`));
      svg.append(r);
    });
    // At most ~8 x labels, so a 90-day series stays readable.
    const every = Math.ceil(n / 8);
    if (i % every === 0) {
      svg.append(svgEl('text', { x: pad.l + i * slot + slot / 2, y: height - 8, 'text-anchor': 'middle', class: 'axis' }, lab));
    }
  });
  if (line && line.values.length) {
    const pts = line.values.map((v, i) => `${(pad.l + i * slot + slot / 2).toFixed(1)},${y(v || 0).toFixed(1)}`);
    svg.append(svgEl('polyline', { points: pts.join(' '), class: 'line ' + (line.cls || ''), fill: 'none' }));
    line.values.forEach((v, i) => {
      const c = svgEl('circle', { cx: pad.l + i * slot + slot / 2, cy: y(v || 0), r: 2.5, class: 'point ' + (line.cls || '') });
      c.append(svgEl('title', {}, `${labels[i]}: ${v} ${line.name}`));
      svg.append(c);
    });
  }
  return svg;
}

/// A horizontal gauge of `ratio` (0..1) with the healthy band [low, high] shaded and the
/// ratio's marker coloured by where it falls.
export function bandChart({ ratio, low, high, width = 640, height = 64, label = 'ratio' }) {
  const pad = { l: 8, r: 8, t: 10, b: 22 };
  const w = width - pad.l - pad.r;
  // The scale runs to at least twice the band's top so the band sits mid-gauge.
  const top = Math.min(1, Math.max(high * 2, ratio * 1.1, 0.1));
  const x = (v) => pad.l + (Math.min(v, top) / top) * w;
  const svg = svgEl('svg', { viewBox: `0 0 ${width} ${height}`, class: 'chart band', role: 'img', 'aria-label': label });
  const barH = height - pad.t - pad.b;
  svg.append(svgEl('rect', { x: pad.l, y: pad.t, width: w, height: barH, class: 'track' }));
  svg.append(svgEl('rect', { x: x(low), y: pad.t, width: Math.max(1, x(high) - x(low)), height: barH, class: 'healthy' }));
  const state = ratio < low ? 'low' : ratio > high ? 'high' : 'healthy';
  const m = svgEl('rect', { x: x(ratio) - 2, y: pad.t - 4, width: 4, height: barH + 8, class: 'marker ' + state, 'data-ratio': ratio });
  m.append(svgEl('title', {}, `${(ratio * 100).toFixed(1)} % (${state})`));
  svg.append(m);
  for (const v of [0, low, high, top]) {
    const anchor = v === 0 ? 'start' : v === top ? 'end' : 'middle';
    svg.append(svgEl('text', { x: x(v), y: height - 6, 'text-anchor': anchor, class: 'axis' }, Math.round(v * 100) + '%'));
  }
  return svg;
}
