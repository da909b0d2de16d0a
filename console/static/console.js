// voicegate console: chat through fetch() with a streamed body (EventSource can neither POST
// nor send Authorization), voice through a WebSocket with the token as a "bearer.<token>"
// subprotocol. The page's own counters live in window.voicegate, where anyone (and the
// browser tests) can read what was sent, received and played. Each log has one short line per
// event or message (its time, name and id); its JSON shows when the line is clicked.
import { WebMOpus } from "/console/webm.js";

const $ = (id) => document.getElementById(id);

// The token may come in the fragment (#token=..., what -demo prints). Once read, it leaves the
// URL: the entry is replaced, so neither the address bar nor the history keeps it.
const fragment = new URLSearchParams(location.hash.slice(1));
const fragmentToken = fragment.get("token");
if (location.hash) history.replaceState(history.state, "", location.pathname + location.search);

// The gateway: this page's own origin, or one that ?gateway= names and the operator listed
// (CONSOLE_GATEWAYS, rendered into the page by the gateway that serves it). A page that was
// pointed anywhere else talks to nobody: gateway stays null and nothing is ever sent. The
// Content-Security-Policy allows connections to the same origins only.
const allowedGateways = new Set([location.origin, ...(document.documentElement.dataset.gateways || "").split(" ").filter(Boolean)]);
const gateway = chooseGateway(new URLSearchParams(location.search).get("gateway"));

function chooseGateway(asked) {
  if (asked === null) return new URL(location.origin);
  let origin = "";
  try {
    origin = new URL(asked).origin;
  } catch {
    // not a URL: refused below
  }
  return allowedGateways.has(origin) ? new URL(origin) : null;
}

// What the page has done, for people and tests alike.
const state = {
  demo: document.documentElement.dataset.demo === "true", // the gateway runs with -demo (it says so)
  refused: "", // why the page talks to no gateway, when it was pointed at one it may not use
  chat: { events: [], answer: "", requestId: "", running: false, outcome: "", error: "" },
  voice: {
    sessionId: "", framesSent: 0, bytesSent: 0, ttsFrames: 0, ttsSamples: 0,
    buffersScheduled: 0, buffersPlayed: 0, playedMs: 0, messages: [], closes: [],
    lastError: null, open: false, resumes: 0,
    level: 0, // the microphone's level while talking, 0 (-60 dBFS or less) to 1 (full scale)
    // Barge-in: interrupts sent (by the button or the voice-activity detection), the gateway's
    // tts_flushed answers, TTS frames dropped while waiting for one, and what the speaker
    // plays now (the output's RMS, sampled every animation frame) with when it last played.
    interrupts: [], flushed: [], droppedFrames: 0, outputLevel: 0, lastSound: 0,
    format: "", // the session's audio format, as format/sample_rate/channels
    audioMs: 0, // the audio sent, by the page's own count
    talkMs: [], // how long each stretch of talking lasted, by the clock
  },
};
window.voicegate = state;

// What each close code means to the person at the microphone.
const closeMeanings = {
  1000: "normal end of the session",
  1001: "the other side went away",
  1005: "closed without a code",
  1006: "the connection dropped without a close: the gateway is down or unreachable, or something in between cut it",
  1007: "a text message that was not UTF-8",
  1008: "closed by policy (an administrator ended the session)",
  1009: "a message over 1 MiB",
  1011: "the algorithm service failed or went away",
  1012: "the gateway or the algorithm service is restarting: reconnect",
  1013: "a side could not keep up, or the algorithm service is overloaded: try again later",
  4400: "refused before the session: the request was invalid",
  4401: "the token is missing, invalid, expired or was revoked",
  4403: "refused: the token lacks voice:write, or this page's origin is not allowed (CORS_ORIGINS)",
  4404: "refused: no such route",
  4429: "refused: rate limit, quota or concurrent-session cap reached; try again later",
  4500: "refused: the gateway failed",
  4502: "refused: the algorithm service is unavailable",
  4503: "refused: the gateway could not check the token (its revocation store is unreachable)",
  4504: "refused: the algorithm service did not answer in time",
};

function meaning(code) {
  if (closeMeanings[code]) return closeMeanings[code];
  if (code >= 4400 && code < 4600) return `refused before the session with HTTP status ${code - 4000}`;
  return "no meaning known to this console";
}

// token is what the token field holds, without the "Bearer " a paste from a header brings.
function token() {
  return $("token").value.trim().replace(/^Bearer\s+/i, "");
}

// needToken says, without asking the gateway, that there is no token to send; it reports
// whether there is one.
function needToken(statusEl) {
  if (token()) return true;
  setStatus(statusEl, "Paste a token into the Token field first: nothing was sent.", "bad");
  $("token").setAttribute("aria-invalid", "true");
  $("token").focus();
  return false;
}

// appendFollowing adds li to a log and keeps the log scrolled to its end, unless the reader
// scrolled up to look at something.
function appendFollowing(list, li) {
  const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 24;
  list.append(li);
  if (atEnd) list.scrollTop = list.scrollHeight;
}

// logEntry adds one line to a log: the time, the name (and id), a few words; with json, a click
// on the line shows it.
function logEntry(list, { t, name, id, info, json, bad }) {
  const li = document.createElement("li");
  li.className = "event" + (bad ? " bad" : "");
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  const time = document.createElement("time");
  time.textContent = `${t} ms`;
  const b = document.createElement("b");
  b.textContent = name;
  summary.append(time, b);
  if (id) {
    const span = document.createElement("span");
    span.className = "id";
    span.textContent = ` #${id}`;
    summary.append(span);
  }
  if (info) {
    const span = document.createElement("span");
    span.className = "info";
    span.textContent = ` ${clip(info, 120)}`;
    summary.append(span);
  }
  details.append(summary);
  if (json !== undefined) {
    const pre = document.createElement("pre");
    // Written when first opened: a long stream costs no pretty-printing nobody reads.
    details.addEventListener("toggle", () => {
      if (!details.open) return;
      if (!pre.textContent) pre.textContent = typeof json === "string" ? json : JSON.stringify(json, null, 2);
      // Bring the JSON into the log's view, its beginning first when it is taller than the log.
      const list = li.parentElement;
      const lr = list.getBoundingClientRect();
      const dr = details.getBoundingClientRect();
      if (dr.bottom > lr.bottom) list.scrollTop += Math.min(dr.bottom - lr.bottom, dr.top - lr.top);
    });
    details.append(pre);
  }
  li.append(details);
  appendFollowing(list, li);
}

// logNote adds a line of the page's own (a reconnect, a resume, a close) to a log; t may be
// null.
function logNote(list, t, text, bad) {
  const li = document.createElement("li");
  li.className = "note" + (bad ? " bad" : "");
  const time = document.createElement("time");
  time.textContent = t === null ? "" : `${t} ms`;
  li.append(time, document.createTextNode(text));
  appendFollowing(list, li);
}

// setStatus shows a status in words and, by its state, in colour: idle, busy, ok, warn or bad.
function setStatus(el, text, state = "idle") {
  el.textContent = text;
  el.dataset.state = state;
}

function clip(s, n = 240) {
  return s.length > n ? s.slice(0, n) + "…" : s;
}

// refusedGateway says why a page pointed at another gateway does nothing.
function refusedGateway() {
  const asked = new URLSearchParams(location.search).get("gateway");
  const listed = [...allowedGateways].filter((o) => o !== location.origin);
  return `Refused: ?gateway=${clip(asked, 120)} is not this page's origin (${location.origin})` +
    (listed.length ? ` nor one of the gateways it may use (${listed.join(", ")})` : "") +
    `. Nothing was sent. The gateway serving this page lists the others in CONSOLE_GATEWAYS.`;
}

// crossOriginHint explains a request that failed without an answer the page could read.
function crossOriginHint() {
  if (gateway.origin === location.origin) return "the gateway did not answer (is it running?)";
  return `no readable answer: the gateway is down, or this page's origin ${location.origin} is not in its ` +
    `CORS_ORIGINS (origins match exactly: scheme, host and port; localhost is not 127.0.0.1)`;
}

// ---- chat ----------------------------------------------------------------------------------

let chatAbort = null;

// readEvents parses a text/event-stream body as it arrives and calls onEvent for each event
// ({event, data, id}) and onComment for each comment (": ping"). It returns the last retry:
// value seen, or 0.
async function readEvents(body, onEvent, onComment) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let ev = { event: "message", data: [], id: null };
  let retry = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return retry;
    buf += value;
    let nl;
    while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + (buf.startsWith("\r\n", nl) ? 2 : 1));
      if (line === "") {
        if (ev.data.length > 0) onEvent({ event: ev.event, data: ev.data.join("\n"), id: ev.id });
        ev = { event: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) {
        onComment(line.slice(1).trim());
        continue;
      }
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let v = colon < 0 ? "" : line.slice(colon + 1);
      if (v.startsWith(" ")) v = v.slice(1);
      if (field === "event") ev.event = v;
      else if (field === "data") ev.data.push(v);
      else if (field === "id") ev.id = v;
      else if (field === "retry" && /^\d+$/.test(v)) retry = Number(v);
    }
  }
}

async function errorText(res) {
  try {
    const e = await res.json();
    return `${res.status} ${e.code}: ${e.error}` + (res.headers.get("Retry-After") ? ` (retry after ${res.headers.get("Retry-After")} s)` : "");
  } catch {
    return `${res.status} ${res.statusText}`;
  }
}

async function sendChat(question) {
  const c = state.chat;
  if (!gateway) return;
  c.events = [];
  c.answer = "";
  c.requestId = "";
  c.outcome = "";
  c.error = "";
  if (!needToken($("chat-status"))) {
    c.error = $("chat-status").textContent;
    return;
  }
  c.running = true;
  $("answer").textContent = "";
  $("chat-log").replaceChildren();
  $("chat-count").textContent = "";
  $("send").disabled = true;
  $("cancel").disabled = false;
  setStatus($("chat-status"), "sending…", "busy");
  const started = performance.now();
  let lastId = null;
  let retry = 0;

  const onEvent = (e) => {
    const t = Math.round(performance.now() - started);
    let data;
    try {
      data = JSON.parse(e.data);
    } catch {
      data = e.data;
    }
    c.events.push({ name: e.event, t, id: e.id });
    if (e.id !== null) lastId = e.id;
    const info = e.event === "error" ? `${data.code || ""}${data.fatal === false ? " (skipped, the stream goes on)" : ""}` : "";
    logEntry($("chat-log"), { t, name: e.event, id: e.id, info, json: data, bad: e.event === "error" });
    $("chat-count").textContent = `(${c.events.length})`;
    switch (e.event) {
      case "stream_start":
        c.requestId = data.request_id;
        setStatus($("chat-status"), `streaming (request ${c.requestId})`, "busy");
        break;
      case "generation_chunk": {
        const text = typeof data.content === "string" ? data.content : JSON.stringify(data.content);
        c.answer += text;
        $("answer").textContent = c.answer;
        break;
      }
      case "stream_cancelled":
        c.outcome = "cancelled";
        break;
      case "error":
        // A skipped line (fatal: false) is only logged; the stream goes on.
        if (data.fatal === false) break;
        c.error = `${data.code}: ${data.message || ""}`;
        setStatus($("chat-status"), `error in the stream: ${c.error}`, "bad");
        break;
      case "stream_end":
        c.outcome = c.outcome || data.outcome || "completed";
        break;
    }
  };
  const onComment = (text) => {
    const li = document.createElement("li");
    li.className = "comment";
    const time = document.createElement("time");
    time.textContent = `${Math.round(performance.now() - started)} ms`;
    li.append(time, document.createTextNode(`: ${text}`));
    appendFollowing($("chat-log"), li);
  };

  try {
    for (let attempt = 0; ; attempt++) {
      chatAbort = new AbortController();
      const headers = { Authorization: "Bearer " + token(), Accept: "text/event-stream" };
      let req;
      if (attempt === 0) {
        headers["Content-Type"] = "application/json";
        req = fetch(new URL("/api/v2/chat/stream", gateway), {
          method: "POST", headers, body: JSON.stringify({ message: question }), signal: chatAbort.signal,
        });
      } else {
        // Resuming: the events after the last one seen, then the live tail, from any instance.
        headers["Last-Event-ID"] = lastId || "0";
        req = fetch(new URL(`/api/v2/chat/stream/${encodeURIComponent(c.requestId)}`, gateway), {
          headers, signal: chatAbort.signal,
        });
      }
      let res;
      try {
        res = await req;
      } catch (err) {
        if (err.name === "AbortError") throw err;
        throw new Error(crossOriginHint());
      }
      if (!res.ok) throw new Error(await errorText(res));
      try {
        retry = (await readEvents(res.body, onEvent, onComment)) || retry;
      } catch (err) {
        if (err.name === "AbortError") throw err;
      }
      if (c.outcome) break;
      // The connection broke before the last event. A gateway that keeps streams resumable
      // says so with a retry: field; without one the stream is gone with the connection.
      if (retry > 0 && c.requestId && attempt < 3) {
        logNote($("chat-log"), Math.round(performance.now() - started), `connection lost; resuming after event ${lastId} in ${retry} ms`, true);
        setStatus($("chat-status"), `connection lost; resuming in ${retry} ms`, "warn");
        await new Promise((r) => setTimeout(r, retry));
        continue;
      }
      throw new Error("the connection broke before the stream ended");
    }
    if (c.outcome === "cancelled") setStatus($("chat-status"), "cancelled", "warn");
    else if (!c.error) setStatus($("chat-status"), `done: ${c.outcome} (${c.events.length} events)`, c.outcome === "completed" ? "ok" : "warn");
  } catch (err) {
    c.error = c.error || err.message;
    if (err.name === "AbortError") setStatus($("chat-status"), "stopped reading", "warn");
    else setStatus($("chat-status"), err.message, "bad");
  } finally {
    c.running = false;
    chatAbort = null;
    $("send").disabled = false;
    $("cancel").disabled = true;
  }
}

// cancelChat asks the gateway to end the stream (it ends with stream_cancelled, on whichever
// instance runs it); if that cannot be asked, it stops reading.
async function cancelChat() {
  const id = state.chat.requestId;
  if (!gateway) return;
  if (!id) {
    if (chatAbort) chatAbort.abort();
    return;
  }
  try {
    const res = await fetch(new URL("/api/v2/chat/cancel", gateway), {
      method: "POST",
      headers: { Authorization: "Bearer " + token(), "Content-Type": "application/json" },
      body: JSON.stringify({ request_id: id }),
    });
    if (!res.ok) {
      logNote($("chat-log"), null, "cancel refused: " + (await errorText(res)), true);
      if (chatAbort) chatAbort.abort();
    }
  } catch {
    if (chatAbort) chatAbort.abort();
  }
}

// ---- voice ---------------------------------------------------------------------------------

const voice = {
  ws: null,
  ctx: null, // the AudioContext: capture and playback
  stream: null, // the microphone
  node: null, // the capture worklet
  talking: false,
  rate: 16000, // the session's audio rate, from session_initialized
  ttsRate: 16000,
  playAt: 0, // when the next TTS buffer starts, on the context's clock
  sources: new Set(), // TTS buffers scheduled and not yet ended: what an interrupt stops
  muted: false, // an interrupt was sent and its tts_flushed has not come: TTS frames are dropped
  out: null, // the analyser every TTS buffer plays through
  loud: 0, // microphone frames in a row above the voice-activity threshold
  attempts: 0,
  hungUp: false,
  // Resuming (docs/voice.md#resuming): the session's single-use token, and how many numbered
  // messages arrived (every message after session_initialized or session_resumed, text or
  // binary, but a RESUME_GAP error and a refusal).
  resume: null,
  seq: 0,
  t0: performance.now(), // when the session (or its last attempt) started: the log's times count from it
};

function renderCounters() {
  const v = state.voice;
  $("frames-sent").textContent = String(v.framesSent);
  $("audio-sent").textContent = `${Math.round(v.audioMs)} ms`;
  $("tts-frames").textContent = String(v.ttsFrames);
  $("tts-played").textContent = `${Math.round(v.playedMs)} ms`;
}

// voiceLog records one line of the session: a message m (its JSON shows when the line is
// clicked), or without m a note of the page's own. text is the line as state.voice.messages
// keeps it; the log shows m's type and a few words: info, or what text says after the type.
function voiceLog(text, bad, m, info) {
  const v = state.voice;
  v.messages.push(text);
  const t = Math.round(performance.now() - voice.t0);
  if (m) {
    if (info === undefined) info = text.startsWith(m.type) ? text.slice(m.type.length).replace(/^:?\s*/, "") : text;
    logEntry($("voice-log"), { t, name: String(m.type), info, json: m, bad });
  } else {
    logNote($("voice-log"), t, text, bad);
  }
  $("voice-count").textContent = `(${v.messages.length})`;
}

async function audioContext() {
  if (!voice.ctx) {
    voice.ctx = new AudioContext();
    await voice.ctx.audioWorklet.addModule("/console/mic-worklet.js");
  }
  if (voice.ctx.state === "suspended") await voice.ctx.resume();
  return voice.ctx;
}

// connect opens a session; it resolves once session_initialized has arrived.
function connect() {
  state.voice.lastError = null;
  return new Promise((resolve, reject) => {
    if (!gateway) {
      reject(new Error(refusedGateway()));
      return;
    }
    const u = new URL("/api/v2/voice/stream", gateway);
    u.protocol = gateway.protocol === "https:" ? "wss:" : "ws:";
    const resuming = voice.resume !== null;
    if (resuming) {
      // The session's format stays what session_initialized agreed (voice.format).
      u.searchParams.set("resume_token", voice.resume);
      u.searchParams.set("last_seq", String(voice.seq));
      voice.resume = null; // single use: session_resumed brings the next
    } else {
      u.searchParams.set("language", navigator.language || "en-US");
      // Opus where the browser records it (a tenth of PCM's bytes); else 16 kHz PCM from the
      // worklet.
      if ($("opus").checked && opusRecording()) u.searchParams.set("format", "opus");
    }
    voice.t0 = performance.now();
    setStatus($("voice-status"), "connecting…", "busy");
    let ws;
    try {
      ws = new WebSocket(u, ["voice-protocol-v2", "bearer." + token()]);
    } catch (err) {
      reject(err);
      return;
    }
    ws.binaryType = "arraybuffer";
    voice.ws = ws;
    let initialized = false;
    ws.onmessage = (e) => {
      if (typeof e.data !== "string") {
        voice.seq++;
        playTTS(e.data);
        return;
      }
      let m;
      try {
        m = JSON.parse(e.data);
      } catch {
        voice.seq++;
        voiceLog("a message that is not JSON: " + clip(e.data), true);
        return;
      }
      if (m.type === "session_initialized" || m.type === "session_resumed") {
        voice.seq = m.last_seq || 0;
        voice.resume = m.resume ? m.resume.token : null;
      } else if (!(m.type === "error" && (m.code === "RESUME_GAP" || m.status))) {
        voice.seq++;
      }
      onVoiceMessage(m);
      if ((m.type === "session_initialized" || m.type === "session_resumed") && !initialized) {
        initialized = true;
        voice.attempts = 0;
        resolve();
      }
    };
    ws.onclose = (e) => {
      onVoiceClose(e);
      if (!initialized) reject(new Error(`closed ${e.code} before the session started: ${meaning(e.code)}`));
    };
  });
}

function onVoiceMessage(m) {
  const v = state.voice;
  switch (m.type) {
    case "session_initialized":
      v.sessionId = m.session_id;
      v.open = true;
      voice.rate = (m.config && m.config.sample_rate) || 16000;
      voice.format = (m.config && m.config.format) || "pcm";
      v.format = `${voice.format}/${voice.rate}/${(m.config && m.config.channels) || 1}`;
      voice.ttsRate = voice.format === "pcm" ? voice.rate : 16000;
      voiceLog(`session_initialized ${m.session_id}: ${voice.rate} Hz, ${m.config && m.config.language}`, false, m);
      setStatus($("voice-status"), `connected: session ${m.session_id}`, "ok");
      break;
    case "session_resumed":
      v.sessionId = m.session_id;
      v.open = true;
      v.resumes++;
      voiceLog(`session_resumed ${m.session_id}: ${m.replayed} missed messages follow`, false, m);
      setStatus($("voice-status"), `resumed: session ${m.session_id}`, "ok");
      break;
    case "asr_partial":
      $("transcript").textContent = m.text + " …";
      voiceLog(`asr_partial (recognition so far): ${m.text}`, false, m);
      break;
    case "asr_final":
      $("transcript").textContent = m.text;
      $("voice-answer").textContent = "";
      voiceLog(`asr_final (what you said): ${m.text}`, false, m);
      break;
    case "llm_response_chunk":
      $("voice-answer").textContent += m.content;
      voiceLog(`llm_response_chunk (answer): ${m.content}`, false, m);
      break;
    case "tts_start":
      if (m.sample_rate) voice.ttsRate = m.sample_rate;
      voiceLog(`tts_start (speech follows): ${voice.ttsRate} Hz`, false, m);
      break;
    case "tts_format":
      // The service's TTS format: the page plays PCM; it asks for nothing else.
      if (m.format === "pcm" && m.sample_rate) voice.ttsRate = m.sample_rate;
      voiceLog(`tts_format (speech format): ${m.format}/${m.sample_rate}/${m.channels}`, m.format !== "pcm", m);
      break;
    case "tts_flushed":
      // The gateway dropped what it held of the answer; what comes after is a new answer.
      voice.muted = false;
      v.flushed.push({ at: performance.now(), played_ms: m.played_ms, dropped_ms: m.dropped_ms, buffered_ms: m.buffered_ms });
      voiceLog(`tts_flushed (interrupted): ${m.played_ms} ms heard, ${m.dropped_ms} ms dropped`, false, m);
      break;
    case "tts_complete":
      voiceLog(`tts_complete (speech sent): ${m.audio_ms ?? "?"} ms`, false, m);
      if (v.open && !voice.talking) setStatus($("voice-status"), `connected: session ${v.sessionId}`, "ok");
      break;
    case "error": {
      v.lastError = m;
      const refused = m.status ? ` (refused with HTTP ${m.status}${m.retry_after ? `, retry after ${m.retry_after} s` : ""})` : "";
      voiceLog(`error ${m.code}: ${m.message}${refused}`, true, m);
      setStatus($("voice-status"), `${m.code}: ${m.message}${refused}`, "bad");
      break;
    }
    default:
      voiceLog(`${m.type}: ${clip(JSON.stringify(m), 160)}`, false, m, "");
  }
}

function onVoiceClose(e) {
  const v = state.voice;
  v.open = false;
  v.closes.push({ code: e.code, reason: e.reason });
  const text = `closed ${e.code}${e.reason ? " " + e.reason : ""}: ${meaning(e.code)}`;
  voiceLog(text, e.code !== 1000);
  const why = v.lastError && v.lastError.status ? `${v.lastError.code}: ${v.lastError.message} — ` : "";
  setStatus($("voice-status"), why + text, e.code === 1000 ? "idle" : "bad");
  voice.ws = null;
  const wasTalking = voice.talking;
  stopCapture();
  $("hangup").disabled = true;
  // A lost connection (1006), or a drain that says so (SERVER_SHUTDOWN with "resume": true, then
  // 1012): the same session resumes, on whichever instance answers, with what was missed.
  const drained = e.code === 1012 && v.lastError && v.lastError.resume;
  if (voice.resume && !voice.hungUp && (e.code === 1006 || drained) && voice.attempts < 10) {
    voice.attempts++;
    const wait = 100 * voice.attempts;
    voiceLog(`resuming in ${wait} ms (attempt ${voice.attempts})`);
    setStatus($("voice-status"), `${text}; resuming in ${wait} ms`, "warn");
    setTimeout(() => resumeTalking(wasTalking), wait);
    return;
  }
  voice.resume = null; // not resumed: the session is over, and the next one starts anew
  // The gateway or the service restarting (1012) and overload (1013) ask for another try;
  // a dropped connection (1006) after a session had opened is worth one too.
  const again = { 1012: 1000, 1013: 5000, 1006: 2000, 1001: 1000 }[e.code];
  if (again && !voice.hungUp && $("reconnect").checked && v.sessionId && voice.attempts < 5) {
    voice.attempts++;
    const wait = again * voice.attempts;
    voiceLog(`reconnecting in ${wait} ms (attempt ${voice.attempts})`);
    setStatus($("voice-status"), `${why}${text}; reconnecting in ${wait} ms`, "warn");
    setTimeout(() => startTalking().catch(() => {}), wait);
  }
}

function playTTS(buf) {
  const v = state.voice;
  const ctx = voice.ctx;
  v.ttsFrames++;
  if (voice.muted) {
    v.droppedFrames++; // sent before the gateway heard the interrupt
    return;
  }
  if (!ctx || buf.byteLength < 2) return;
  const pcm = new Int16Array(buf, 0, buf.byteLength >> 1);
  v.ttsSamples += pcm.length;
  const audio = ctx.createBuffer(1, pcm.length, voice.ttsRate);
  const ch = audio.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 0x8000;
  const src = ctx.createBufferSource();
  src.buffer = audio;
  src.connect(speaker(ctx));
  // Frames play back to back as they arrive; a gap in arrival restarts the clock.
  voice.playAt = Math.max(voice.playAt, ctx.currentTime + 0.02);
  src.start(voice.playAt);
  voice.playAt += audio.duration;
  v.buffersScheduled++;
  voice.sources.add(src);
  src.onended = () => {
    voice.sources.delete(src);
    if (src.stopped) return;
    v.buffersPlayed++;
    v.playedMs += audio.duration * 1000;
    renderCounters();
  };
  renderCounters();
}

// speaker is where TTS plays: through an analyser, so the page knows (and shows the tests)
// whether the speaker is silent.
function speaker(ctx) {
  if (!voice.out) {
    voice.out = ctx.createAnalyser();
    voice.out.fftSize = 512;
    voice.out.connect(ctx.destination);
    const buf = new Float32Array(voice.out.fftSize);
    const sample = () => {
      voice.out.getFloatTimeDomainData(buf);
      let sum = 0;
      for (const x of buf) sum += x * x;
      const v = state.voice;
      v.outputLevel = Math.sqrt(sum / buf.length);
      if (v.outputLevel > 1e-4) v.lastSound = performance.now();
      requestAnimationFrame(sample);
    };
    requestAnimationFrame(sample);
  }
  return voice.out;
}

// interrupt silences the answer now and asks the gateway to drop what it holds of it; the
// gateway answers tts_flushed and tells the service how much was heard. by says what asked.
function interrupt(by) {
  const v = state.voice;
  for (const src of voice.sources) {
    src.stopped = true;
    src.stop();
  }
  voice.sources.clear();
  if (voice.ctx) voice.playAt = voice.ctx.currentTime;
  if (!voice.ws || voice.ws.readyState !== WebSocket.OPEN) return;
  voice.muted = true;
  voice.ws.send(JSON.stringify({ type: "interrupt" }));
  v.interrupts.push({ at: performance.now(), by });
  voiceLog(`interrupt sent (${by}): the answer stops`);
}

// speaking is whether the answer is audible now, or scheduled to be.
function speaking() {
  return voice.sources.size > 0;
}

async function startCapture() {
  const ctx = await audioContext();
  voice.stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  const source = ctx.createMediaStreamSource(voice.stream);
  voice.node = new AudioWorkletNode(ctx, "pcm16-capture", {
    processorOptions: { targetRate: voice.rate, frameMs: 20 },
  });
  voice.node.port.onmessage = (e) => {
    if (!voice.talking) return;
    const level = micLevel(new Int16Array(e.data));
    showLevel(level);
    // Voice-activity detection: 100 ms of the user's voice (the meter above -39 dBFS) while
    // the answer plays is a barge-in. The meter's level, which falls slowly, bridges a frame
    // that the capture dropped.
    voice.loud = state.voice.level > 0.35 ? voice.loud + 1 : 0;
    if (voice.loud >= 5 && speaking()) interrupt("voice activity");
    if (voice.format === "pcm") sendAudio(e.data, (e.data.byteLength / 2 / voice.rate) * 1000);
  };
  if (voice.format === "opus") {
    // MediaRecorder encodes; its WebM is unpacked into the raw packets the gateway takes, sent
    // in order as each piece of the recording is read.
    const demux = new WebMOpus();
    let chain = Promise.resolve();
    voice.recorder = new MediaRecorder(voice.stream, { mimeType: OPUS_WEBM, audioBitsPerSecond: 24000 });
    voice.recorder.ondataavailable = (e) => {
      chain = chain.then(async () => {
        for (const packet of demux.push(new Uint8Array(await e.data.arrayBuffer()))) {
          if (voice.talking) sendAudio(packet.buffer, opusMs(packet));
        }
      });
    };
    voice.recorder.start(20);
  }
  // A worklet runs only while it is pulled: through a muted gain to the speakers.
  const mute = ctx.createGain();
  mute.gain.value = 0;
  source.connect(voice.node).connect(mute).connect(ctx.destination);
}

const OPUS_WEBM = "audio/webm;codecs=opus";

// opusRecording is whether this browser records Opus in WebM (Chromium and Firefox do).
function opusRecording() {
  return typeof MediaRecorder !== "undefined" && MediaRecorder.isTypeSupported(OPUS_WEBM);
}

// opusMs is how long an Opus packet plays: its TOC byte's frame size times its frame count
// (RFC 6716, section 3.1), what the gateway meters it by.
function opusMs(p) {
  const config = p[0] >> 3;
  const frame = config < 12 ? [10, 20, 40, 60][config % 4] : config < 16 ? [10, 20][config % 2] : [2.5, 5, 10, 20][config % 4];
  const code = p[0] & 3;
  const count = code === 0 ? 1 : code === 3 ? p[1] & 0x3f : 2;
  return frame * count;
}

// sendAudio sends one binary frame of the session's format, of ms milliseconds.
function sendAudio(buf, ms) {
  const ws = voice.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(buf);
  const v = state.voice;
  v.framesSent++;
  v.bytesSent += buf.byteLength;
  v.audioMs += ms;
  if (v.framesSent % 10 === 0) renderCounters();
}

// micLevel is how loud a frame of PCM16 is, on a meter of the 60 dB below full scale: 0 at
// -60 dBFS (RMS) or quieter, 1 at full scale.
function micLevel(pcm) {
  let sum = 0;
  for (let i = 0; i < pcm.length; i++) sum += pcm[i] * pcm[i];
  const rms = Math.sqrt(sum / Math.max(pcm.length, 1)) / 0x8000;
  return Math.min(1, Math.max(0, 1 + (20 * Math.log10(Math.max(rms, 1e-9))) / 60));
}

// showLevel moves the meter: up at once, down over a few frames, as level meters do, so that
// the gaps between syllables do not make it flicker.
function showLevel(level) {
  const v = state.voice;
  v.level = level >= v.level ? level : v.level + (level - v.level) * 0.3;
  $("mic-level").value = v.level;
  $("mic-meter").hidden = false;
}

function stopCapture() {
  if (voice.talking) state.voice.talkMs.push(performance.now() - voice.talkStart);
  voice.talking = false;
  if (voice.recorder) {
    voice.recorder.ondataavailable = null;
    if (voice.recorder.state !== "inactive") voice.recorder.stop();
    voice.recorder = null;
  }
  state.voice.level = 0;
  $("mic-level").value = 0;
  $("mic-meter").hidden = true;
  if (voice.node) {
    voice.node.port.postMessage("stop");
    voice.node.disconnect();
    voice.node = null;
  }
  if (voice.stream) {
    for (const t of voice.stream.getTracks()) t.stop();
    voice.stream = null;
  }
  $("mic").textContent = "Start talking";
  renderCounters();
}

async function startTalking() {
  if (!needToken($("voice-status"))) return;
  voice.hungUp = false;
  $("mic").disabled = true;
  try {
    await audioContext(); // within the click: browsers start audio only on a gesture
    if (!voice.ws) await connect();
    voice.ws.send(JSON.stringify({ type: "start" }));
    await startCapture();
    if (!voice.ws) {
      // The session closed while the microphone was starting: its close said why.
      stopCapture();
      return;
    }
    voice.talking = true;
    voice.talkStart = performance.now();
    $("mic").textContent = "Stop talking";
    $("hangup").disabled = false;
    setStatus($("voice-status"), `talking: session ${state.voice.sessionId}`, "ok");
  } catch (err) {
    stopCapture();
    if (!state.voice.lastError) setStatus($("voice-status"), err.message, "bad");
  } finally {
    $("mic").disabled = false;
  }
}

// resumeTalking resumes the session after a lost connection, and the microphone if it was on.
async function resumeTalking(wasTalking) {
  try {
    await connect();
  } catch {
    // Refused (the window passed, or the session ended meanwhile): the close said why; a new
    // session starts if reconnecting is on.
    voice.resume = null;
    if (!voice.hungUp && $("reconnect").checked && !voice.ws) startTalking().catch(() => {});
    return;
  }
  state.voice.lastError = null;
  $("hangup").disabled = false;
  if (!wasTalking) return;
  try {
    await startCapture();
    voice.talking = true;
    $("mic").textContent = "Stop talking";
  } catch (err) {
    stopCapture();
  }
}

function stopTalking() {
  stopCapture();
  if (voice.ws && voice.ws.readyState === WebSocket.OPEN) {
    voice.ws.send(JSON.stringify({ type: "stop" }));
    voiceLog("stop sent: waiting for the answer");
    setStatus($("voice-status"), `waiting for the answer: session ${state.voice.sessionId}`, "busy");
  }
}

function hangUp() {
  voice.hungUp = true;
  stopCapture();
  if (voice.ws) voice.ws.close(1000, "hung up");
}

// ---- wiring --------------------------------------------------------------------------------

if (fragmentToken) $("token").value = fragmentToken;
if (!gateway) {
  state.refused = refusedGateway();
  $("gateway").textContent = "none";
  $("origin-note").textContent = state.refused;
  $("origin-note").className = "note bad";
  for (const id of ["send", "cancel", "mic", "hangup", "interrupt"]) $(id).disabled = true;
  setStatus($("chat-status"), "refused: no gateway", "bad");
  setStatus($("voice-status"), "refused: no gateway", "bad");
} else {
  $("gateway").textContent = gateway.origin;
  $("openapi").href = new URL("/openapi.json", gateway).href;
  if (gateway.origin !== location.origin) {
    $("origin-note").textContent = `This page (${location.origin}) talks to another origin: the gateway must list ` +
      `${location.origin} in CORS_ORIGINS.`;
  }
}
$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("question").value.trim();
  if (q && !state.chat.running) sendChat(q);
});
$("token").addEventListener("input", () => $("token").removeAttribute("aria-invalid"));
$("cancel").addEventListener("click", cancelChat);
$("mic").addEventListener("click", () => (voice.talking ? stopTalking() : startTalking()));
$("hangup").addEventListener("click", hangUp);
$("interrupt").addEventListener("click", () => interrupt("button"));
if (!opusRecording()) {
  $("opus").checked = false;
  $("opus").disabled = true;
}
renderCounters();
document.body.dataset.ready = "true";
