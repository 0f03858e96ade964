// A small time-series line chart on <canvas>: the last few minutes of
// per-second samples. Written here rather than vendored: the dashboard needs
// only this one chart type, and a chart library is many times this file's size.

const PAD = { left: 44, right: 8, top: 8, bottom: 20 };
// The x axis starts at one minute and widens with the data up to the full
// window, so a freshly opened page shows its first seconds legibly.
const MIN_SPAN_S = 60;

// The smallest "nice" value (1, 2, 2.5, 5 times a power of ten) >= v: the
// step between the four grid lines, so the y axis reads in round numbers.
function niceCeil(v) {
  if (v <= 0) return 0.25;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) {
    if (v <= m * p) return m * p;
  }
  return 10 * p;
}

function shortNumber(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(v % 1e6 ? 1 : 0) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(v % 1e3 ? 1 : 0) + "k";
  return String(Math.round(v * 100) / 100);
}

export class TimeChart {
  // series: [{label, color}] where color is a CSS custom property name.
  constructor(canvas, series, windowS = 300) {
    this.canvas = canvas;
    this.series = series;
    this.windowS = windowS;
    this.samples = []; // [t seconds, [values...]]
    this.pending = false;
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  // Adds one sample (t in seconds) and redraws on the next animation frame,
  // so a burst of events costs one paint.
  push(t, values) {
    this.samples.push([t, values]);
    const oldest = t - this.windowS;
    while (this.samples.length && this.samples[0][0] < oldest) this.samples.shift();
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const style = getComputedStyle(canvas);
    const grid = style.getPropertyValue("--chart-grid").trim() || "#ddd";
    const text = style.getPropertyValue("--chart-text").trim() || "#666";
    ctx.font = "11px system-ui, sans-serif";

    const plotW = width - PAD.left - PAD.right, plotH = height - PAD.top - PAD.bottom;
    const now = this.samples.length ? this.samples[this.samples.length - 1][0] : 0;
    const oldest = this.samples.length ? this.samples[0][0] : now;
    const span = Math.min(this.windowS, Math.max(MIN_SPAN_S, Math.ceil((now - oldest) / 60) * 60));
    let max = 0;
    for (const [, values] of this.samples) for (const v of values) max = Math.max(max, v);
    const top = 4 * niceCeil(max / 4);
    const x = (t) => PAD.left + plotW * (1 - (now - t) / span);
    const y = (v) => PAD.top + plotH * (1 - v / top);

    // Grid: four horizontal lines labelled on the left; x ticks every 15 s
    // on a one-minute axis, every minute beyond.
    ctx.strokeStyle = grid;
    ctx.fillStyle = text;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = (top * i) / 4, py = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(PAD.left, py);
      ctx.lineTo(width - PAD.right, py);
      ctx.stroke();
      ctx.fillText(shortNumber(v), PAD.left - 6, py);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const step = span <= MIN_SPAN_S ? 15 : 60;
    for (let k = 0; k * step <= span; k++) {
      const px = Math.round(x(now - k * step)) + 0.5;
      const label = k === 0 ? "now" : step === 60 ? `-${k}m` : `-${k * step}s`;
      ctx.fillText(label, Math.min(Math.max(px, PAD.left + 10), width - PAD.right - 10), height - PAD.bottom + 5);
    }

    this.series.forEach((s, i) => {
      ctx.strokeStyle = style.getPropertyValue(s.color).trim() || "#36c";
      ctx.lineWidth = 1.75;
      ctx.lineJoin = "round";
      ctx.beginPath();
      let started = false;
      for (const [t, values] of this.samples) {
        const px = x(t), py = y(values[i]);
        if (started) ctx.lineTo(px, py);
        else { ctx.moveTo(px, py); started = true; }
      }
      ctx.stroke();
    });
  }
}
