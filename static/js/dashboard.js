// Live sandbox progress on the dashboard: listens to the progress WebSocket and updates the
// state badge, progress bar and event list without a page reload. Reconnects with backoff.
(function () {
  "use strict";
  const badge = document.getElementById("sandbox-state");
  const bar = document.getElementById("progress-bar");
  const wrap = document.getElementById("progress-wrap");
  const msg = document.getElementById("progress-message");
  const list = document.getElementById("events");
  if (!badge) return;
  let delay = 1000;
  const seen = new Set();
  let current = document.getElementById("sandbox-card").dataset.state;

  function onEvent(ev) {
    // Other parts of the page (the backups card) follow the same events.
    document.dispatchEvent(new CustomEvent("hermit:sandbox-event", { detail: ev }));
    if (ev.progress !== null && ev.progress !== undefined) {
      wrap.hidden = false;
      bar.style.width = ev.progress + "%";
      // A finished backup of a settled sandbox: its bar goes away again.
      if (ev.progress >= 100 && ["running", "dozing", "sleeping", "stopped"].includes(current)) {
        setTimeout(() => { wrap.hidden = true; }, 1500);
      }
    }
    if (ev.message) msg.textContent = ev.message;
    if (ev.id === null || ev.id === undefined || seen.has(ev.id)) return; // a tick, or a repeat
    seen.add(ev.id);
    const li = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = new Date(ev.created_at).toLocaleTimeString();
    const span = document.createElement("span");
    span.textContent = ev.message;
    li.append(time, span);
    list.prepend(li);
    if (ev.state && ev.state !== current) {
      const settled = ["running", "dozing", "sleeping", "stopped", "failed"].includes(ev.state);
      current = ev.state;
      badge.textContent = ev.state.charAt(0).toUpperCase() + ev.state.slice(1);
      badge.className = "badge " + ev.state;
      // Settled states change which buttons apply: re-render the page once.
      if (settled) setTimeout(() => window.location.reload(), 400);
    }
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(scheme + "://" + location.host + "/ws/sandbox/progress/");
    ws.onopen = () => { delay = 1000; };
    ws.onmessage = (m) => onEvent(JSON.parse(m.data));
    ws.onclose = (e) => {
      if (e.code === 4404) return;
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 15000);
    };
  }
  connect();
})();
