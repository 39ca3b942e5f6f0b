// The failure-rate chart, hand-written SVG: the failure rate per bucket as a line with a point
// per bucket that had terminal runs, and below it the runs per bucket (failed in red).

import { s, when, percent } from "./dom.js";

const WIDTH = 960;
const RATE_TOP = 12;
const RATE_HEIGHT = 150;
const BARS_TOP = RATE_TOP + RATE_HEIGHT + 26;
const BARS_HEIGHT = 60;
const HEIGHT = BARS_TOP + BARS_HEIGHT + 22;
const LEFT = 48;
const RIGHT = 12;
const MAX_POINTS_DRAWN = 300;

function niceCeiling(rate) {
  const steps = [0.05, 0.1, 0.2, 0.25, 0.5, 0.75, 1];
  return steps.find((step) => rate <= step) || 1;
}

/** An <svg> for one series' points: [{ts, total, succeeded, failed, ..., failure_rate}]. */
export function failureRateChart(points) {
  const plotWidth = WIDTH - LEFT - RIGHT;
  const n = points.length;
  const step = n > 0 ? plotWidth / n : plotWidth;
  const x = (i) => LEFT + step * (i + 0.5);
  const maxRate = niceCeiling(Math.max(0, ...points.map((p) => p.failure_rate || 0)));
  const yRate = (rate) => RATE_TOP + RATE_HEIGHT - (rate / maxRate) * RATE_HEIGHT;
  const maxRuns = Math.max(1, ...points.map((p) => p.total));
  const barHeight = (count) => (count / maxRuns) * BARS_HEIGHT;

  const svg = s("svg", {
    class: "chart",
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": "failure rate and runs per bucket",
    "data-points": n,
  });

  // Grid and rate axis.
  for (const fraction of [0, 0.5, 1]) {
    const y = yRate(maxRate * fraction);
    svg.append(
      s("line", { class: "gridline", x1: LEFT, x2: WIDTH - RIGHT, y1: y, y2: y }),
      s("text", { class: "axis", x: LEFT - 6, y: y + 4, "text-anchor": "end" }, percent(maxRate * fraction, 0)),
    );
  }
  svg.append(
    s("text", { class: "axis label", x: LEFT, y: BARS_TOP - 8 }, `runs per bucket (max ${maxRuns})`),
    s("line", { class: "gridline", x1: LEFT, x2: WIDTH - RIGHT, y1: BARS_TOP + BARS_HEIGHT, y2: BARS_TOP + BARS_HEIGHT }),
  );

  // Runs per bucket: the whole bar is terminal + other runs, the red part the failed ones.
  const barWidth = Math.max(1, step * 0.8);
  points.forEach((p, i) => {
    if (!p.total) return;
    const total = barHeight(p.total);
    const failed = barHeight(p.failed);
    const left = x(i) - barWidth / 2;
    svg.append(
      s("rect", { class: "bar", x: left, width: barWidth, y: BARS_TOP + BARS_HEIGHT - total, height: total },
        s("title", {}, `${when(p.ts)} UTC: ${p.total} runs, ${p.failed} failed`)),
    );
    if (failed > 0) {
      svg.append(s("rect", { class: "bar failed", x: left, width: barWidth, y: BARS_TOP + BARS_HEIGHT - failed, height: failed }));
    }
  });

  // The rate line, broken where a bucket had no terminal runs (rate null).
  let path = "";
  let pen = false;
  points.forEach((p, i) => {
    if (p.failure_rate === null || p.failure_rate === undefined) {
      pen = false;
      return;
    }
    path += `${pen ? "L" : "M"}${x(i).toFixed(1)},${yRate(p.failure_rate).toFixed(1)}`;
    pen = true;
  });
  if (path) svg.append(s("path", { class: "rate", d: path }));
  const rated = points.filter((p) => p.failure_rate !== null && p.failure_rate !== undefined);
  points.forEach((p, i) => {
    if (p.failure_rate === null || p.failure_rate === undefined) return;
    if (rated.length > MAX_POINTS_DRAWN && !p.failed) return;
    svg.append(
      s(
        "circle",
        {
          class: ["point", p.failed ? "failing" : null],
          cx: x(i),
          cy: yRate(p.failure_rate),
          r: rated.length > 100 ? 2 : 3.5,
          "data-ts": p.ts,
          "data-failed": p.failed,
          "data-total": p.total,
        },
        s("title", {}, `${when(p.ts)} UTC: ${percent(p.failure_rate)} failed (${p.failed} of ${p.total})`),
      ),
    );
  });

  // Time axis: first, middle and last bucket.
  const marks = n > 2 ? [0, Math.floor(n / 2), n - 1] : [...Array(n).keys()];
  for (const i of marks) {
    const anchor = i === 0 && n > 1 ? "start" : i === n - 1 && n > 1 ? "end" : "middle";
    svg.append(s("text", { class: "axis", x: i === 0 ? LEFT : i === n - 1 ? WIDTH - RIGHT : x(i), y: HEIGHT - 4, "text-anchor": anchor }, `${when(points[i].ts)}`));
  }
  if (!n) svg.append(s("text", { class: "axis", x: WIDTH / 2, y: HEIGHT / 2, "text-anchor": "middle" }, "no buckets"));
  return svg;
}
