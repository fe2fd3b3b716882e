// Server-sent events over fetch(): EventSource cannot send an Authorization header, so the stream is read with
// a streaming reader and parsed here (the text/event-stream rules: fields, blank-line dispatch, comments).

import { apiFetch } from "./api.js";

const RETRY_MS = 2000;

/** Yields {id, event, data} for each event of a text/event-stream response body. */
export async function* parseEventStream(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { id: null, event: "message", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (event.data.length) yield { id: event.id, event: event.event, data: event.data.join("\n") };
        event = { id: null, event: "message", data: [] };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? "" : line.slice(colon + 1);
      if (text.startsWith(" ")) text = text.slice(1);
      if (field === "data") event.data.push(text);
      else if (field === "event") event.event = text;
      else if (field === "id") event.id = text;
    }
  }
}

/**
 * Follow a job's events until the stream's `end` event (or `signal` aborts). Reconnects after a dropped
 * connection with Last-Event-ID, so no event is seen twice. `onEvent(event)` gets each parsed job event,
 * `onEnd({job_id, status})` the end; API errors (404, 401) go to `onError` and stop following.
 */
export async function followJobEvents(jobId, { signal, onEvent, onEnd, onError }) {
  let lastId = null;
  while (!signal.aborted) {
    const headers = { Accept: "text/event-stream" };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    try {
      const response = await apiFetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
      for await (const message of parseEventStream(response.body)) {
        if (message.event === "end") {
          onEnd(JSON.parse(message.data));
          return;
        }
        if (message.id !== null) lastId = message.id;
        onEvent(JSON.parse(message.data));
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error.status) {
        onError(error);
        return;
      }
    }
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}
