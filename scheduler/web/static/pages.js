// stuck-runs pages: refresh the page's content while it is visible, and send the action buttons'
// POSTs to the JSON API from this origin with the session cookie. No inline script, no framework;
// text from the server is put in with textContent or as parsed HTML of our own pages, never as code.
"use strict";

(function () {
  const live = () => document.getElementById("live");
  let timer = null;
  let busy = false;

  function period() {
    const seconds = Number(live() && live().dataset.refresh);
    return seconds > 0 ? seconds * 1000 : null;
  }

  function say(text, problem) {
    const flash = document.getElementById("flash");
    flash.textContent = text;
    flash.classList.toggle("problem", Boolean(problem));
    flash.hidden = !text;
  }

  function note(text) {
    const state = document.getElementById("refresh-state");
    if (state) state.textContent = text;
  }

  // Fetch this same page and put its fresh content in place of ours, keeping open <details> open.
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const answer = await fetch(window.location.href, { credentials: "same-origin", cache: "no-store" });
      if (new URL(answer.url).pathname === "/login") {
        window.location.assign("/login");
        return;
      }
      const fresh = new DOMParser().parseFromString(await answer.text(), "text/html").getElementById("live");
      if (!fresh) throw new Error("HTTP " + answer.status);
      const opened = Array.from(live().querySelectorAll("details[open][id]"), (d) => d.id);
      live().replaceWith(document.adoptNode(fresh));
      opened.forEach((id) => { const d = document.getElementById(id); if (d) d.open = true; });
      note(answer.ok ? "updated " + utcTime(new Date()) : "refresh: HTTP " + answer.status);
    } catch (error) {
      note("refresh failed: " + error.message);
    } finally {
      busy = false;
    }
  }

  // Times as every page shows them: UTC, never the browser's zone.
  function utcTime(date) {
    return date.toISOString().slice(11, 19) + " UTC";
  }

  function schedule() {
    clearTimeout(timer);
    timer = null;
    const every = period();
    if (every && document.visibilityState === "visible") {
      timer = setTimeout(async () => { await refresh(); schedule(); }, every);
    }
  }

  document.addEventListener("visibilitychange", async () => {
    if (document.visibilityState === "visible" && period()) await refresh();
    schedule();
  });

  // An action: POST to the API path the button names; say what the API answered; show the result.
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-post]");
    if (!button) return;
    button.disabled = true;
    let target = button.dataset.post;
    const source = button.dataset.from && document.getElementById(button.dataset.from);
    if (source && source.value.trim()) {  // e.g. Pause for 4h: /api/pause?for=4h
      target += "?" + new URLSearchParams([[button.dataset.param, source.value.trim()]]).toString();
    }
    try {
      const answer = await fetch(target, {
        method: "POST",
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      const body = await answer.json().catch(() => ({}));
      const reason = body.details && body.details.reason ? ": " + body.details.reason : "";
      say(body.success ? body.message || "Done" : (body.error || "HTTP " + answer.status) + reason, !body.success);
    } catch (error) {
      say("The request failed: " + error.message, true);
    }
    await refresh();
    schedule();
  });

  schedule();
})();
