// Calls to the receiver's API with the operator's bearer token. The token lives in this tab's
// sessionStorage only: never in localStorage, never in a URL, gone when the tab closes.

const TOKEN_KEY = "runflow-receiver.token";
const TIMEOUT_MS = 20000;

export class Unauthorized extends Error {}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function getToken() {
  return window.sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  window.sessionStorage.setItem(TOKEN_KEY, token);
}

export function forgetToken() {
  window.sessionStorage.removeItem(TOKEN_KEY);
}

/** GET (or another method) a JSON route; params is an object or URLSearchParams. */
export async function api(path, { params, method = "GET" } = {}) {
  const token = getToken();
  if (!token) throw new Unauthorized("no token");
  const url = new URL(path, window.location.origin);
  for (const [name, value] of new URLSearchParams(params || {})) url.searchParams.append(name, value);
  const abort = new AbortController();
  const timer = window.setTimeout(() => abort.abort(), TIMEOUT_MS);
  let response;
  try {
    response = await fetch(url, {
      method,
      headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
      cache: "no-store",
      signal: abort.signal,
    });
  } catch (error) {
    throw new ApiError(0, "unreachable", abort.signal.aborted ? "timed out" : `receiver unreachable (${error.message})`);
  } finally {
    window.clearTimeout(timer);
  }
  if (response.status === 401) throw new Unauthorized("token refused");
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error ? body.error : {};
    throw new ApiError(response.status, error.code || "http_error", error.message || `HTTP ${response.status}`);
  }
  return body;
}
