// Hermit webchat. Talks the JSON protocol documented in sandboxes/consumers/chat.py.
// Reconnects by itself; messages not yet acknowledged are resent with the same id after a
// reconnect (the id is the gateway's idempotency key, so nothing is delivered twice).
(function () {
  "use strict";
  const root = document.getElementById("chat");
  if (!root) return;
  const log = document.getElementById("chat-log");
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  const stopButton = document.getElementById("chat-stop");
  const statusBadge = document.getElementById("chat-status");
  const notice = document.getElementById("chat-notice");
  const progress = document.getElementById("chat-progress");

  const pending = new Map(); // message id -> {text, el}; sent but not acknowledged
  const runs = new Map(); // runId -> assistant bubble element
  let socket = null;
  let ready = false;
  let retryDelay = 500;
  let closedForGood = false;

  function newId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return "m" + Date.now().toString(36) + Math.random().toString(36).slice(2, 12);
  }

  function scrollDown() { log.scrollTop = log.scrollHeight; }

  function bubble(role, text, extraClass) {
    for (const placeholder of log.querySelectorAll(".chat-empty")) placeholder.remove();
    const li = document.createElement("li");
    li.className = "msg " + role + (extraClass ? " " + extraClass : "");
    li.dataset.role = role;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    li.appendChild(body);
    log.appendChild(li);
    scrollDown();
    return li;
  }

  function setText(el, text) { el.querySelector(".text").textContent = text; scrollDown(); }
  function appendText(el, text) { el.querySelector(".text").textContent += text; scrollDown(); }

  function setMeta(el, text) {
    let meta = el.querySelector(".meta");
    if (!meta) { meta = document.createElement("span"); meta.className = "meta"; el.appendChild(meta); }
    meta.textContent = text;
  }

  function showNotice(text, isError) {
    notice.textContent = text;
    notice.classList.toggle("error", !!isError);
    notice.hidden = !text;
  }

  function setStatus(state, message, pct) {
    statusBadge.className = "badge " + state;
    statusBadge.textContent = {
      waking: "Waking", connecting: "Connecting…", ready: "Online",
      reconnecting: "Reconnecting…", failed: "Unavailable", offline: "Offline",
    }[state] || state;
    statusBadge.title = message || "";
    root.dataset.status = state;
    const bar = progress.firstElementChild;
    if (state === "waking" && typeof pct === "number") {
      progress.hidden = false; bar.style.width = pct + "%";
    } else { progress.hidden = true; }
    if (state === "ready") showNotice("");
    else if (state === "failed") showNotice(message || "Your agent is unavailable.", true);
    else if (message && state !== "connecting") showNotice(message);
  }

  function updateStop() { stopButton.hidden = runs.size === 0; }

  function runBubble(runId) {
    let el = runs.get(runId);
    if (!el) {
      el = bubble("assistant", "", "streaming");
      el.dataset.runId = runId;
      runs.set(runId, el);
      updateStop();
    }
    return el;
  }

  function endRun(runId) { runs.delete(runId); updateStop(); }

  function send(frame) {
    if (socket && socket.readyState === WebSocket.OPEN) { socket.send(JSON.stringify(frame)); return true; }
    return false;
  }

  function renderHistory(messages) {
    log.textContent = "";
    runs.clear();
    for (const m of messages) bubble(m.role, m.text);
    for (const [id, item] of pending) { item.el = bubble("user", item.text, "pending"); item.el.dataset.id = id; }
    if (!messages.length && !pending.size) {
      const li = document.createElement("li");
      li.className = "chat-empty muted"; li.textContent = "Say hello to your agent.";
      log.appendChild(li);
    }
    updateStop();
    scrollDown();
  }

  const handlers = {
    status(f) {
      ready = f.state === "ready";
      setStatus(f.state, f.message, f.progress);
      if (ready) for (const [id, item] of pending) send({ type: "send", id: id, text: item.text });
    },
    history(f) { renderHistory(f.messages || []); },
    ack(f) {
      const item = pending.get(f.id);
      if (item) { item.el.classList.remove("pending"); pending.delete(f.id); }
    },
    phase(f) { if (f.runId && !runs.has(f.runId)) setMeta(runBubble(f.runId), "thinking…"); },
    delta(f) {
      const el = runBubble(f.runId);
      const meta = el.querySelector(".meta"); if (meta) meta.remove();
      appendText(el, f.delta || "");
    },
    final(f) {
      const streamed = runs.get(f.runId);
      if (!f.text && (!streamed || !streamed.querySelector(".text").textContent)) {
        // folded into a run that was already answering: its reply arrives under that run
        if (streamed) streamed.remove();
        endRun(f.runId);
        return;
      }
      const el = runBubble(f.runId);
      el.classList.remove("streaming");
      const meta = el.querySelector(".meta"); if (meta) meta.remove();
      setText(el, f.text || "");
      endRun(f.runId);
    },
    aborted(f) {
      const el = runBubble(f.runId);
      el.classList.remove("streaming"); el.classList.add("aborted");
      if (f.text) setText(el, f.text);
      setMeta(el, "stopped");
      endRun(f.runId);
    },
    run_error(f) {
      const el = runBubble(f.runId);
      el.classList.remove("streaming"); el.classList.add("failed");
      setMeta(el, f.message || "The reply failed.");
      endRun(f.runId);
    },
    error(f) {
      if (f.id && pending.has(f.id)) {
        const item = pending.get(f.id);
        item.el.classList.remove("pending"); item.el.classList.add("failed");
        setMeta(item.el, f.message);
        pending.delete(f.id);
      }
      showNotice(f.message, true);
    },
    pong() {},
  };

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + root.dataset.wsPath);
    socket.onopen = function () { retryDelay = 500; setStatus("connecting", ""); };
    socket.onmessage = function (event) {
      let frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      const handler = handlers[frame.type];
      if (handler) handler(frame);
    };
    socket.onclose = function (event) {
      ready = false;
      if (event.code === 4401) { location.href = "/accounts/login/?next=" + encodeURIComponent(location.pathname); return; }
      if (event.code === 4403 || event.code === 4404) {
        closedForGood = true;
        setStatus("failed", event.code === 4404 ? "You have no agent yet." : "This page may not open a chat.");
        return;
      }
      setStatus("offline", "Connection lost; reconnecting…");
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 8000);
    };
  }

  function submit() {
    const text = input.value.trim();
    if (!text || closedForGood) return;
    const id = newId();
    const el = bubble("user", text, "pending");
    el.dataset.id = id;
    pending.set(id, { text: text, el: el });
    input.value = "";
    if (ready) send({ type: "send", id: id, text: text });
    else showNotice("Your message will be sent when your agent is connected.");
  }

  form.addEventListener("submit", function (e) { e.preventDefault(); submit(); });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
  });
  stopButton.addEventListener("click", function () {
    const last = Array.from(runs.keys()).pop();
    send(last ? { type: "abort", runId: last } : { type: "abort" });
  });
  setInterval(function () { send({ type: "ping" }); }, 25000);
  connect();
})();
