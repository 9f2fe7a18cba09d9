// Keeps the document list's status, progress, chunk count and model current while
// documents are being ingested, by polling the admin's JSON status view; stops
// polling once every listed document is ready or failed.
(function () {
  "use strict";
  const SETTLED = new Set(["ready", "failed"]);
  const INTERVAL_MS = 1500;

  function cells(id, field) {
    return document.querySelectorAll('[data-document="' + id + '"][data-field="' + field + '"]');
  }

  function pendingIds() {
    const ids = [];
    document.querySelectorAll('[data-field="status"][data-document]').forEach(function (el) {
      const status = Array.from(el.classList).find((c) => c.startsWith("rag-status-")).slice("rag-status-".length);
      if (!SETTLED.has(status)) ids.push(el.dataset.document);
    });
    return ids;
  }

  function apply(row) {
    cells(row.pk, "status").forEach(function (el) {
      el.className = "rag-status rag-status-" + row.status;
      el.textContent = row.status_display;
    });
    cells(row.pk, "progress").forEach(function (el) {
      el.value = row.progress;
      el.hidden = SETTLED.has(row.status);
    });
    cells(row.pk, "error").forEach((el) => (el.textContent = row.error));
    cells(row.pk, "chunk_count").forEach((el) => (el.textContent = row.chunk_count));
    cells(row.pk, "embedding_model").forEach((el) => (el.textContent = row.embedding_model));
  }

  function poll() {
    const endpoint = document.getElementById("rag-status-endpoint");
    const ids = pendingIds();
    if (!endpoint || ids.length === 0) return;
    fetch(endpoint.dataset.url + "?ids=" + ids.join(","), { credentials: "same-origin" })
      .then((response) => (response.ok ? response.json() : { documents: [] }))
      .then((data) => data.documents.forEach(apply))
      .catch(() => {})
      .finally(() => setTimeout(poll, INTERVAL_MS));
  }

  document.addEventListener("DOMContentLoaded", () => setTimeout(poll, INTERVAL_MS));
})();
