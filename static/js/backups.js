// The dashboard's backups card: when a backup, restore or export event of the user's sandbox
// arrives (dashboard.js relays the progress socket's events), the card is fetched again as
// server-rendered HTML and swapped in, so new snapshots and the download link appear by
// themselves.
(function () {
  "use strict";
  const KINDS = new Set([
    "backup", "restore", "export", "backup-requested", "restore-requested", "export-requested",
  ]);
  let timer = null;

  function refresh() {
    const card = document.getElementById("backups-card");
    if (!card) return;
    fetch(card.dataset.refreshUrl, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.text() : null))
      .then((html) => {
        if (!html) return;
        const template = document.createElement("template");
        template.innerHTML = html.trim();
        const fresh = template.content.firstElementChild;
        if (fresh && fresh.id === "backups-card") card.replaceWith(fresh);
      })
      .catch(() => {}); // the next event tries again
  }

  document.addEventListener("hermit:sandbox-event", (e) => {
    const ev = e.detail;
    if (ev.id === null || ev.id === undefined || !KINDS.has(ev.kind)) return; // ticks
    clearTimeout(timer);
    timer = setTimeout(refresh, 300);
  });
})();
