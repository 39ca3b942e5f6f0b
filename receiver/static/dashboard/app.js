// The operator dashboard: what is failing, where, how often, how slowly, at what cost.
// Every panel reads one documented API route with the window and filters from the form (kept
// in the URL hash, never the token) and redraws itself every 30 seconds.

import { ApiError, Unauthorized, api, forgetToken, getToken, setToken } from "./api.js";
import { failureRateChart } from "./chart.js";
import { fill, h, ms, percent, seconds, table, val, when } from "./dom.js";

const REFRESH_MS = 30000;
const WINDOW_MS = 24 * 3600 * 1000;
const FILTERS = ["status", "failure_code", "failure_stage", "model", "target_type", "source", "client_ref", "batch_id", "org_id"];
const BUCKETS = ["minute", "hour", "day"];
const $ = (id) => document.getElementById(id);

const state = {
  selectedRun: null,
  refreshing: null,
  asking: false,
  replayNote: null,
  replayed: new Map(), // delivery id -> the replay's answer, shown until the row goes away
};

// ---- the form, the hash and the window -------------------------------------------------------

function readHash() {
  const params = new URLSearchParams(window.location.hash.slice(1));
  params.delete("token"); // never kept, even if someone typed it there
  return params;
}

function writeHash(params) {
  const text = params.toString();
  if (window.location.hash.slice(1) !== text) {
    window.history.replaceState(null, "", text ? `#${text}` : window.location.pathname + window.location.search);
  }
}

/** "2026-12-01T08:00" from a datetime-local field (read as UTC) to "2026-12-01T08:00:00Z". */
function fieldToIso(value) {
  if (!value) return "";
  return value.length === 16 ? `${value}:00Z` : `${value}Z`;
}

function isoToField(value) {
  const moment = new Date(value);
  if (!value || Number.isNaN(moment.getTime())) return "";
  return moment.toISOString().slice(0, 16);
}

function formToHash() {
  const form = $("filters");
  const params = new URLSearchParams();
  for (const name of ["created_after", "created_before"]) {
    const iso = fieldToIso(form.elements[name].value);
    if (iso) params.set(name, iso);
  }
  for (const name of FILTERS) {
    const value = form.elements[name].value.trim();
    if (value) params.set(name, value);
  }
  const bucket = currentBucket();
  if (bucket !== "hour") params.set("bucket", bucket);
  if (state.selectedRun) params.set("run", state.selectedRun);
  writeHash(params);
}

/** Change one hash value (the selected run, the bucket) and keep the applied filters as they are. */
function setHashValue(name, value) {
  const params = readHash();
  if (value) params.set(name, value);
  else params.delete(name);
  writeHash(params);
}

function hashToForm() {
  const params = readHash();
  const form = $("filters");
  for (const name of ["created_after", "created_before"]) form.elements[name].value = isoToField(params.get(name) || "");
  for (const name of FILTERS) form.elements[name].value = params.get(name) || "";
  const bucket = BUCKETS.includes(params.get("bucket")) ? params.get("bucket") : "hour";
  for (const radio of document.querySelectorAll("#bucket-switch input")) radio.checked = radio.value === bucket;
  state.selectedRun = params.get("run") || null;
}

function currentBucket() {
  const checked = document.querySelector("#bucket-switch input:checked");
  return checked ? checked.value : "hour";
}

/** The window and filters every call shares; an empty From/To means the last 24 hours. */
function query() {
  const params = readHash();
  const now = new Date();
  let before = params.get("created_before");
  let after = params.get("created_after");
  if (!before && !after) {
    before = now.toISOString();
    after = new Date(now.getTime() - WINDOW_MS).toISOString();
  }
  const shared = new URLSearchParams();
  if (after) shared.set("created_after", after);
  if (before) shared.set("created_before", before);
  for (const name of FILTERS) if (params.get(name)) shared.set(name, params.get(name));
  fill($("window"), "Window ", h("strong", {}, after ? when(after) : "…"), " → ", h("strong", {}, before ? when(before) : "now"), " UTC");
  return shared;
}

function withParams(shared, extra) {
  const params = new URLSearchParams(shared);
  for (const [name, value] of Object.entries(extra)) params.set(name, value);
  return params;
}

// ---- panels --------------------------------------------------------------------------------

function showError(el, error) {
  if (error instanceof Unauthorized) throw error;
  const text = error instanceof ApiError ? `${error.status || ""} ${error.code}: ${error.message}` : String(error);
  fill(el, h("p", { class: "error" }, "Could not load: ", text.trim()));
}

async function panel(id, load) {
  const el = $(id);
  el.setAttribute("aria-busy", "true");
  try {
    await load(el);
    el.dataset.loaded = "true";
  } catch (error) {
    showError(el, error);
    throw error;
  } finally {
    el.removeAttribute("aria-busy");
  }
}

const tiles = {};

function tile(key, label, value, level, detail) {
  const size = String(value).length > 8 ? "long" : null;
  tiles[key] = h("div", { class: ["tile", level], dataset: { tile: key } }, h("span", { class: "tile-label" }, label), h("span", { class: ["tile-value", size] }, value), detail ? h("span", { class: "tile-detail" }, detail) : null);
  fill($("tiles"), ...["runs", "failed", "top", "rejected", "alerts"].map((k) => tiles[k]).filter(Boolean));
}

async function loadFailures(shared) {
  await panel("failures", async (el) => {
    const data = await api("/analytics/failures", { params: withParams(shared, { group_by: "failure_code,failure_stage" }) });
    const share = data.total_runs ? data.failed_runs / data.total_runs : null;
    tile("runs", "Runs in window", data.total_runs, "plain");
    tile("failed", "Failed runs", data.failed_runs, data.failed_runs ? "bad" : "good", data.total_runs ? `${percent(share)} of runs` : null);
    const top = data.groups[0];
    tile("top", "Top failure", top ? top.failure_code ?? "(no code)" : "none", top ? "bad" : "good", top ? `${top.failure_stage ?? "(no stage)"} · ${top.count} runs` : null);
    fill(
      el,
      h("p", { class: "summary" }, `${data.failed_runs} failed of ${data.total_runs} runs in the window.`),
      table(
        [{ label: "Failure code" }, { label: "Stage" }, { label: "Runs", class: "num" }, { label: "Share of failures", class: "share" }],
        data.groups.map((g) => [
          h("code", {}, val(g.failure_code)),
          val(g.failure_stage),
          String(g.count),
          h("span", { class: "share-cell" }, h("span", { class: "share-bar", style: { width: `${Math.round(g.share * 100)}%` } }), h("span", { class: "share-text" }, percent(g.share))),
        ]),
        {
          empty: "No failed runs in this window.",
          rowProps: (i) => ({ class: "failure-row", dataset: { code: data.groups[i].failure_code ?? "", stage: data.groups[i].failure_stage ?? "", count: data.groups[i].count } }),
        },
      ),
    );
  });
}

async function loadTimeseries(shared) {
  await panel("timeseries", async (el) => {
    const bucket = currentBucket();
    const data = await api("/analytics/timeseries", { params: withParams(shared, { bucket }) });
    const points = data.series.length ? data.series[0].points : [];
    const sum = (key) => points.reduce((total, p) => total + p[key], 0);
    const terminal = sum("succeeded") + sum("failed") + sum("cancelled") + sum("partial_succeeded");
    fill(
      el,
      h("p", { class: "summary" }, `${points.length} ${bucket} buckets · ${sum("total")} runs · ${sum("failed")} failed · failure rate ${terminal ? percent(sum("failed") / terminal) : "n/a"} of terminal runs`),
      failureRateChart(points),
    );
  });
}

async function loadDurations(shared) {
  await panel("durations", async (el) => {
    const data = await api("/analytics/durations", { params: withParams(shared, { group_by: "model" }) });
    fill(
      el,
      table(
        ["Model", "Runs", "p50", "p90", "p95", "p99", "max"].map((label, i) => ({ label, class: i ? "num" : null })),
        data.groups.map((g) => [val(g.model), String(g.count), ms(g.p50_ms), ms(g.p90_ms), ms(g.p95_ms), ms(g.p99_ms), ms(g.max_ms)]),
        { empty: "No finished runs with a duration in this window." },
      ),
    );
  });
}

async function loadCosts(shared) {
  await panel("costs", async (el) => {
    const data = await api("/analytics/costs", { params: withParams(shared, { group_by: "model" }) });
    fill(
      el,
      h("p", { class: "summary" }, "Total ", h("strong", {}, data.total)),
      table(
        [{ label: "Model" }, { label: "Runs", class: "num" }, { label: "Cost", class: "num" }],
        data.groups.map((g) => [val(g.model), String(g.runs), g.cost]),
        { empty: "No runs in this window." },
      ),
    );
  });
}

function runLink(id) {
  return h("button", { type: "button", class: "link run-link", dataset: { run: id }, on: { click: () => selectRun(id) } }, id);
}

async function loadRuns(shared) {
  const status = shared.get("status");
  fill($("runs-title"), status ? `Recent runs with status ${status}` : "Recent failed runs");
  await panel("runs", async (el) => {
    const params = withParams(shared, { limit: "25" });
    if (!status) params.set("status", "failed");
    const data = await api("/runs", { params });
    fill(
      el,
      table(
        [{ label: "Created (UTC)" }, { label: "Run" }, { label: "Model" }, { label: "Failure code" }, { label: "Stage" }, { label: "Message", class: "message" }],
        data.items.map((run) => [when(run.created_at), runLink(run.id), val(run.model), h("code", {}, val(run.failure_code)), val(run.failure_stage), h("span", { title: run.failure_message || "" }, val(run.failure_message))]),
        { empty: "No such runs in this window.", rowProps: (i) => ({ class: ["run-row", data.items[i].id === state.selectedRun ? "selected" : null] }) },
      ),
      data.next_cursor ? h("p", { class: "hint" }, "Showing the newest 25; narrow the filters or use GET /runs for more.") : null,
    );
  });
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([label, value]) => [h("dt", {}, label), h("dd", {}, value)]));
}

async function loadRun() {
  const id = state.selectedRun;
  const section = $("panel-run");
  if (!id) {
    section.hidden = true;
    return;
  }
  section.hidden = false;
  fill($("run-title"), "Run ", h("code", {}, id));
  await panel("run", async (el) => {
    const path = `/runs/${encodeURIComponent(id)}`;
    const [run, deliveries] = await Promise.all([api(path), api(`${path}/deliveries`, { params: { limit: "500" } })]);
    if (state.selectedRun !== id) return;
    fill(
      el,
      facts([
        ["Status", h("span", { class: ["badge", run.status] }, val(run.status))],
        ["Failure", [h("code", {}, val(run.failure_code)), " at ", val(run.failure_stage)]],
        ["Message", val(run.failure_message)],
        ["Model", val(run.model)],
        ["Target · source", [val(run.target_type), " · ", val(run.source)]],
        ["Client ref", val(run.client_ref)],
        ["Batch · org", [val(run.batch_id), " · ", val(run.org_id)]],
        ["Created · completed", [when(run.created_at), " · ", when(run.completed_at)]],
        ["Duration · cost", [ms(run.duration_ms), " · ", val(run.cost)]],
        ["Deliveries", String(run.delivery_count)],
        ["Enrichment", run.enrichment_error ? h("span", { class: "error" }, run.enrichment_error) : run.enriched_at ? when(run.enriched_at) : val(null)],
      ]),
      h("h3", {}, `Node runs (${run.node_runs.length})`),
      table(
        [{ label: "Node run" }, { label: "Node" }, { label: "Type" }, { label: "Status" }, { label: "Failure code" }, { label: "Message", class: "message" }, { label: "Duration", class: "num" }],
        run.node_runs.map((n) => [h("code", {}, n.id), val(n.node_id), val(n.node_type), h("span", { class: ["badge", n.status] }, val(n.status)), h("code", {}, val(n.failure_code)), val(n.failure_message), ms(n.duration_ms)]),
        { empty: "No node runs recorded.", rowProps: () => ({ class: "node-row" }) },
      ),
      h("h3", {}, `Deliveries (${deliveries.items.length}${deliveries.next_cursor ? "+, the oldest shown" : ""})`),
      table(
        [{ label: "Delivery", class: "num" }, { label: "Received (UTC)" }, { label: "Outcome" }, { label: "Kind" }, { label: "Cause" }, { label: "Bytes", class: "num" }, { label: "Replays", class: "num" }],
        deliveries.items.map((d) => [String(d.id), when(d.received_at), h("span", { class: ["badge", d.outcome] }, d.outcome), val(d.kind), val(d.cause), val(d.body_size), String(d.replay_count)]),
        { empty: "No deliveries.", rowProps: () => ({ class: "delivery-row" }) },
      ),
      h("details", {}, h("summary", {}, "Output"), h("pre", {}, JSON.stringify(run.output, null, 2) ?? "null")),
    );
  });
}

function selectRun(id) {
  state.selectedRun = id;
  setHashValue("run", id);
  for (const row of document.querySelectorAll(".run-row")) row.classList.toggle("selected", row.querySelector(".run-link")?.dataset.run === id);
  guard(loadRun()).then(() => $("panel-run").scrollIntoView({ behavior: "smooth", block: "start" }));
}

function causeText(d) {
  const detail = d.cause_detail;
  if (detail && typeof detail === "object" && typeof detail.message === "string") return detail.message;
  return detail ? JSON.stringify(detail) : "";
}

function outcomeCell(d) {
  const result = state.replayed.get(d.id);
  if (!result) return h("span", { class: "badge rejected outcome" }, d.outcome);
  const target = result.run_id ? ` → run ${result.run_id}` : result.batch_id ? ` → batch ${result.batch_id}` : "";
  return h("span", { class: ["badge", "outcome", result.status] }, `${result.status}${target}`);
}

async function replay(id, button) {
  button.disabled = true;
  button.textContent = "Replaying…";
  try {
    const result = await api(`/deliveries/${encodeURIComponent(id)}/replay`, { method: "POST" });
    state.replayed.set(id, result);
    state.replayNote = h("p", { class: ["note", result.status === "rejected" ? "bad" : "good"] }, `Delivery ${id} replayed: ${result.status}`, result.run_id ? ` (run ${result.run_id})` : "", result.cause ? ` — ${result.cause}` : "");
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
    state.replayNote = h("p", { class: "note bad" }, `Delivery ${id} could not be replayed: ${error.message}`);
  }
  const row = button.closest("tr");
  if (row) {
    const cell = row.querySelector(".outcome");
    if (cell && state.replayed.has(id)) cell.replaceWith(outcomeCell({ id, outcome: "rejected" }));
    row.dataset.outcome = state.replayed.get(id)?.status || "rejected";
  }
  const note = $("rejected").querySelector(".note");
  if (note) note.replaceWith(state.replayNote);
  else $("rejected").prepend(state.replayNote);
  button.textContent = "Replay";
  button.disabled = false;
}

async function loadRejected() {
  await panel("rejected", async (el) => {
    const data = await api("/deliveries", { params: { outcome: "rejected", limit: "25" } });
    const count = data.next_cursor ? `${data.items.length}+` : String(data.items.length);
    tile("rejected", "Rejected deliveries", count, data.items.length ? "warn" : "good", data.items.length ? "kept, replayable" : null);
    fill(
      el,
      state.replayNote,
      table(
        [{ label: "Delivery", class: "num" }, { label: "Received (UTC)" }, { label: "Cause" }, { label: "Detail", class: "message" }, { label: "Bytes", class: "num" }, { label: "Replays", class: "num" }, { label: "Outcome" }, { label: "" }],
        data.items.map((d) => [
          String(d.id),
          when(d.received_at),
          h("code", {}, val(d.cause)),
          h("span", { title: causeText(d) }, val(causeText(d))),
          val(d.body_size),
          String(d.replay_count),
          outcomeCell(d),
          h("button", { type: "button", class: "replay", dataset: { delivery: d.id }, on: { click: (event) => guard(replay(d.id, event.currentTarget)) } }, "Replay"),
        ]),
        { empty: "No rejected deliveries.", rowProps: (i) => ({ class: "rejected-row", dataset: { delivery: data.items[i].id, outcome: state.replayed.get(data.items[i].id)?.status || "rejected" } }) },
      ),
    );
  });
}

function groupLabel(group) {
  const parts = Object.entries(group || {}).map(([k, v]) => `${k}=${v ?? "(none)"}`);
  return parts.length ? parts.join(", ") : "all runs";
}

async function loadAlerts() {
  await panel("alerts", async (el) => {
    const [rules, events] = await Promise.all([api("/alerts/rules"), api("/alerts/events", { params: { limit: "10" } })]);
    const firing = rules.items.flatMap((r) => r.states.filter((st) => st.state === "firing").map((st) => ({ rule: r.rule.name, ...st })));
    tile("alerts", "Alerts firing", String(firing.length), firing.length ? "bad" : "good", firing.length ? firing.map((f) => f.rule).join(", ") : `${rules.items.length} rules`);
    fill(
      el,
      table(
        [{ label: "Rule" }, { label: "Metric" }, { label: "Threshold", class: "num" }, { label: "Window" }, { label: "States" }],
        rules.items.map((r) => [
          h("strong", {}, r.rule.name),
          r.rule.metric,
          String(r.rule.threshold),
          seconds(r.rule.window),
          r.states.length
            ? r.states.map((st) => h("span", { class: ["badge", st.state], title: `${groupLabel(st.group)}: value ${st.value ?? "n/a"} (since ${when(st.updated_at)} UTC)` }, `${st.state}${Object.keys(st.group || {}).length ? ` · ${groupLabel(st.group)}` : ""}`))
            : h("span", { class: "none" }, r.rule.enabled === false ? "disabled" : "not evaluated yet"),
        ]),
        { empty: "No alert rules configured.", rowProps: () => ({ class: "alert-row" }) },
      ),
      h("h3", {}, "Recent alert events"),
      table(
        [{ label: "At (UTC)" }, { label: "Rule" }, { label: "Group" }, { label: "Change" }, { label: "Value", class: "num" }, { label: "Notified" }],
        events.items.map((e) => [when(e.at), e.rule, groupLabel(e.group), [h("span", { class: ["badge", e.from_state] }, e.from_state), " → ", h("span", { class: ["badge", e.to_state] }, e.to_state)], val(e.value), e.notified ? "yes" : e.notifications.map((n) => `${n.state} (${n.attempts})`).join(", ") || "no"]),
        { empty: "No alert events yet." },
      ),
    );
  });
}

async function loadEnrichment() {
  await panel("enrichment", async (el) => {
    const data = await api("/enrichment/status");
    fill(
      el,
      facts([
        ["Enabled", data.enabled ? "yes" : h("span", { class: "none" }, "no (RECEIVER_RUNFLOW_API_KEY not set)")],
        ["Pending", h("span", { class: data.pending ? "warn-text" : null }, String(data.pending))],
        ["Oldest pending", data.oldest_pending_seconds === null ? val(null) : ms(Math.round(data.oldest_pending_seconds * 1000))],
        ["Done", String(data.done)],
        ["Failed", h("span", { class: data.failed ? "bad-text" : null }, String(data.failed))],
      ]),
    );
  });
}

function show(value) {
  if (value === null || value === undefined) return val(null);
  if (typeof value === "object") return h("code", {}, JSON.stringify(value));
  return String(value);
}

async function loadReconciliation() {
  await panel("reconciliation", async (el) => {
    try {
      const data = await api("/reconciliation/status");
      fill(el, facts(Object.entries(data || {}).map(([k, v]) => [k.replaceAll("_", " "), show(v)])));
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) fill(el, h("p", { class: "none", dataset: { state: "not-available" } }, "not available"));
      else throw error;
    }
  });
}

// ---- refreshing, the token ------------------------------------------------------------------

function stamp(text, level) {
  const el = $("updated");
  el.textContent = text;
  el.className = `updated ${level}`;
}

async function guard(promise) {
  try {
    return await promise;
  } catch (error) {
    if (error instanceof Unauthorized) askToken(getToken() ? "That token was refused (401). Enter a valid one." : null);
    return undefined;
  }
}

async function refreshAll() {
  if (!getToken()) {
    askToken(null);
    return;
  }
  const shared = query();
  stamp("updating…", "busy");
  const results = await Promise.allSettled([
    loadFailures(shared),
    loadTimeseries(shared),
    loadRuns(shared),
    loadRun(),
    loadRejected(),
    loadDurations(shared),
    loadCosts(shared),
    loadAlerts(),
    loadEnrichment(),
    loadReconciliation(),
  ]);
  if (results.some((r) => r.status === "rejected" && r.reason instanceof Unauthorized)) {
    stamp("token needed", "error");
    askToken(getToken() ? "That token was refused (401). Enter a valid one." : null);
    return;
  }
  const failed = results.filter((r) => r.status === "rejected").length;
  const at = new Date().toISOString().slice(11, 19);
  if (failed) stamp(`updated at ${at} UTC — ${failed} panel${failed > 1 ? "s" : ""} failed`, "error");
  else stamp(`updated at ${at} UTC`, "ok");
  document.body.dataset.updatedAt = new Date().toISOString();
}

function refresh() {
  // One refresh at a time: a slow database must not pile requests up.
  if (!state.refreshing) state.refreshing = refreshAll().finally(() => (state.refreshing = null));
  return state.refreshing;
}

function askToken(reason) {
  if (reason) forgetToken();
  $("token-reason").textContent = reason || "The dashboard reads the receiver's API, which needs a bearer token.";
  $("token-reason").className = reason ? "error" : "";
  const dialog = $("token-dialog");
  if (!dialog.open) dialog.showModal();
  $("token-input").focus();
}

function start() {
  hashToForm();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) return;
    setToken(token);
    $("token-input").value = "";
    $("token-dialog").close();
    refresh();
  });
  $("token-dialog").addEventListener("cancel", (event) => event.preventDefault());
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    formToHash();
    refresh();
  });
  $("reset-filters").addEventListener("click", () => {
    $("filters").reset();
    formToHash();
    refresh();
  });
  for (const radio of document.querySelectorAll("#bucket-switch input")) {
    radio.addEventListener("change", () => {
      setHashValue("bucket", currentBucket() === "hour" ? null : currentBucket());
      guard(loadTimeseries(query()));
    });
  }
  $("refresh").addEventListener("click", () => refresh());
  $("forget-token").addEventListener("click", () => {
    forgetToken();
    askToken(null);
  });
  $("close-run").addEventListener("click", () => {
    state.selectedRun = null;
    setHashValue("run", null);
    $("panel-run").hidden = true;
    for (const row of document.querySelectorAll(".run-row.selected")) row.classList.remove("selected");
  });
  window.addEventListener("hashchange", () => {
    hashToForm();
    refresh();
  });
  window.setInterval(() => {
    if ($("auto-refresh").checked && !$("token-dialog").open && document.visibilityState !== "hidden") refresh();
  }, REFRESH_MS);
  refresh();
}

start();
