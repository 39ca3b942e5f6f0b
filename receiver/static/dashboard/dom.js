// Building DOM without markup: every piece of data becomes a text node or an attribute value,
// never HTML, so run ids, failure codes and messages from the outside cannot inject anything.

const SVG_NS = "http://www.w3.org/2000/svg";

function append(parent, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else if (child instanceof Node) parent.append(child);
    else parent.append(document.createTextNode(String(child)));
  }
}

function apply(el, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key === "text") el.textContent = String(value);
    else if (key === "on") for (const [event, fn] of Object.entries(value)) el.addEventListener(event, fn);
    else if (key === "dataset") for (const [name, v] of Object.entries(value)) el.dataset[name] = v === null ? "" : String(v);
    else if (key === "style") for (const [name, v] of Object.entries(value)) el.style.setProperty(name, v);
    else if (key.startsWith("on")) throw new Error(`use {on: {...}} for ${key}`);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  return el;
}

/** An HTML element: h("td", {class: "num"}, "12"). */
export function h(tag, props, ...children) {
  const el = apply(document.createElement(tag), props);
  append(el, children);
  return el;
}

/** An SVG element, same calling convention as h(). */
export function s(tag, props, ...children) {
  const el = apply(document.createElementNS(SVG_NS, tag), props);
  append(el, children);
  return el;
}

/** Replace everything inside el. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A value for display: null and empty as a muted "(none)". */
export function val(value) {
  if (value === null || value === undefined || value === "") return h("span", { class: "none" }, "(none)");
  return String(value);
}

/** "2026-12-01 08:00:12" in UTC, from an ISO string (anything else is shown as it came). */
export function when(iso) {
  if (!iso) return val(null);
  const moment = new Date(iso);
  if (Number.isNaN(moment.getTime())) return String(iso);
  return moment.toISOString().slice(0, 19).replace("T", " ");
}

/** A duration in ms as "850 ms", "12.4 s", "3.2 min". */
export function ms(value) {
  if (value === null || value === undefined) return val(null);
  if (value < 1000) return `${value} ms`;
  if (value < 60000) return `${(value / 1000).toFixed(1)} s`;
  return `${(value / 60000).toFixed(1)} min`;
}

/** A whole number of seconds as "90 s", "5 min", "1 h", "2 d". */
export function seconds(value) {
  if (value === null || value === undefined) return val(null);
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60]]) {
    if (value >= size && value % size === 0) return `${value / size} ${unit}`;
  }
  return `${value} s`;
}

export function percent(fraction, digits = 1) {
  if (fraction === null || fraction === undefined) return val(null);
  return `${(fraction * 100).toFixed(digits)}%`;
}

/** A table: columns [{label, class}], rows of cells (each a node, string or array). */
export function table(columns, rows, { empty = "Nothing here.", rowProps } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.class, scope: "col" }, c.label)))),
    h(
      "tbody",
      {},
      rows.map((cells, i) =>
        h("tr", rowProps ? rowProps(i) : {}, cells.map((cell, j) => h("td", { class: columns[j].class }, cell))),
      ),
    ),
  );
}
