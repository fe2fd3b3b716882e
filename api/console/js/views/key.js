// The key prompt: the key is tried once against the API and then kept in this tab's sessionStorage only.

import { apiFetch, forgetKey, setKey } from "../api.js";
import { h, replace } from "../dom.js";
import { errorNote } from "./common.js";

export function keyView(root, { message, onAccepted }) {
  const input = h("input", {
    type: "password", id: "api-key", name: "api-key", autocomplete: "off", spellcheck: "false", required: true,
    placeholder: "fd2_…",
  });
  const note = h("div", { class: "note" }, message ? errorNote({ message }) : null);
  const form = h("form", { id: "key-form", class: "key-form" },
    h("label", { for: "api-key" }, "API key"),
    input,
    h("button", { type: "submit" }, "Open console"),
    note);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    setKey(key);
    try {
      await apiFetch("/v1/jobs?limit=1");
      onAccepted();
    } catch (error) {
      if (error.status === 401) return; // the app shows this prompt again with the reason
      forgetKey();
      replace(note, errorNote(error));
    }
  });
  replace(root,
    h("section", { class: "key" },
      h("h1", {}, "Sign in with an API key"),
      h("p", {}, "The console calls the REST API with your key. The key stays in this browser tab's session "
        + "storage (gone when the tab closes, or at once with \"Forget key\") and is sent only as the "
        + "Authorization header."),
      form));
  input.focus();
}
