// The chat page's few behaviours that htmx does not cover. No build step.
(function () {
  "use strict";

  // Enter sends, Shift+Enter adds a line (and IME composition is left alone).
  document.addEventListener("keydown", function (event) {
    const box = event.target;
    if (box.id !== "question" || event.key !== "Enter" || event.shiftKey || event.isComposing) return;
    event.preventDefault();
    if (box.value.trim()) box.form.requestSubmit();
  });

  // Clear the box once the question is accepted (not when it was refused).
  document.addEventListener("htmx:afterRequest", function (event) {
    const form = event.detail.elt;
    if (form.id === "ask-form" && event.detail.successful) {
      form.querySelector("#question").value = "";
    }
  });

  // A question the server did not take: say so where a refused one is explained (a 422 or
  // a 503 puts its own words there), and leave the question in the box to send again.
  function notTaken(event, why) {
    const form = event.detail.elt;
    if (form.id !== "ask-form") return;
    form.querySelector("#form-error").textContent = why + " Your question is still in the box: send it again.";
  }
  document.addEventListener("htmx:responseError", function (event) {
    const status = event.detail.xhr.status;
    if (status !== 422 && status !== 503) notTaken(event, "The server failed to take your question (HTTP " + status + ").");
  });
  document.addEventListener("htmx:sendError", function (event) {
    notTaken(event, "The server could not be reached.");
  });

  // When the browser gives up on an answer's stream (its reconnect got an error: a server
  // restarting, say), htmx's SSE extension opens a new EventSource on the sse-connect URL,
  // without the Last-Event-ID header the browser's own reconnects send: the answer would
  // start over, each token twice on the page. So that URL says where the page is.
  document.addEventListener("htmx:sseMessage", function (event) {
    const id = event.detail.lastEventId;
    const answer = event.detail.elt && event.detail.elt.closest("[sse-connect]");
    if (!id || !answer) return;
    const url = answer.getAttribute("sse-connect").split("?")[0];
    answer.setAttribute("sse-connect", url + "?last_event_id=" + encodeURIComponent(id));
  });

  // Copy the answer as text.
  document.addEventListener("click", function (event) {
    const button = event.target.closest("button[data-copy]");
    if (!button) return;
    const source = document.querySelector(button.dataset.copy);
    if (!source || !navigator.clipboard) return;
    navigator.clipboard.writeText(source.innerText).then(function () {
      const label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    });
  });

  // Follow the growing answer, unless the reader scrolled up to read something else.
  let following = true;
  window.addEventListener("scroll", function () {
    following = window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80;
  }, { passive: true });
  function follow() {
    if (following) window.scrollTo(0, document.documentElement.scrollHeight);
  }
  document.addEventListener("htmx:sseMessage", follow);
  document.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail.target && event.detail.target.id === "thread") { following = true; follow(); }
  });
})();
