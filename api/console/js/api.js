// Every call goes to the REST API of this origin with the key as a Bearer header. The key lives only in this
// tab's sessionStorage: it is never put in a URL, a cookie or the page, and "Forget key" removes it.

const KEY_ITEM = "fd2.apiKey";
export const UNAUTHORIZED_EVENT = "fd2:unauthorized";

export function getKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

/** An API answer that was not a success, with the service's error code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  get notFound() {
    return this.status === 404;
  }
}

async function errorOf(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message);
}

/** fetch() with the key; resolves to the response, throws ApiError for any non-2xx answer. */
export async function apiFetch(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = getKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers, cache: "no-store", credentials: "omit" });
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401) window.dispatchEvent(new CustomEvent(UNAUTHORIZED_EVENT, { detail: error }));
    throw error;
  }
  return response;
}

export async function getJSON(path, options) {
  return (await apiFetch(path, options)).json();
}

/** A path segment from an id or name the API gave us (never trusted to be URL-safe). */
export function seg(value) {
  return encodeURIComponent(String(value));
}

export function artifactPath(jobId, name) {
  return `/v1/jobs/${seg(jobId)}/artifacts/${seg(name)}`;
}

/** A file as a blob: URL (the key cannot ride on <img src> or <a href>). Revoke it when done. */
export async function blobURL(path, options) {
  const blob = await (await apiFetch(path, options)).blob();
  return URL.createObjectURL(blob);
}

/** fetch → blob → object URL → a.download click. */
export async function download(path, fileName) {
  const url = await blobURL(path);
  const link = document.createElement("a");
  link.href = url;
  link.download = fileName;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
