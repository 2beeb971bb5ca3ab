// dgserve playground: plain OpenAI API calls plus token drafts ("diffusion": {"stream_drafts": "tokens"}).
// Everything the model or the user wrote is set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "dgserve-api-key";
const COMPLETION_MAX_TOKENS = 256; // /v1/completions defaults to 16 tokens: too few to watch a canvas
let apiKey = sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
let model = null;
let streamPrefixDefault = false; // the server's default for diffusion.stream_prefix (/v1/models)
let history = []; // chat messages so far: {role, content}
let controller = null; // aborts the reply in flight

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function connect() {
  // Ask the open config first: a server that wants a key gets none of our requests until there is one (no 401).
  const { auth_required: needsKey } = await (await fetch("/playground/config.json")).json();
  if (needsKey && !apiKey) {
    $("key-panel").hidden = false;
    $("api-key").focus();
    return;
  }
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("key-panel").hidden = false;
    $("key-error").textContent = apiKey ? "That key was refused." : "";
    $("api-key").focus();
    return;
  }
  $("key-panel").hidden = true;
  const card = (await response.json()).data[0];
  model = card.id;
  $("model").textContent = `${card.id} · canvas ${card.canvas_length} · context ${card.max_model_len}`;
  const d = card.diffusion || {};
  $("steps").placeholder = d.steps;
  $("entropy_bound").placeholder = d.entropy_bound;
  streamPrefixDefault = Boolean(d.stream_prefix);
  $("stream_prefix").checked = streamPrefixDefault;
  setMode();
}

function takeKey() {
  apiKey = $("api-key").value.trim();
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
  ($("remember-key").checked ? localStorage : sessionStorage).setItem(KEY, apiKey);
}

function saveKey() {
  takeKey();
  connect().catch(showError);
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function setMode() {
  $("chat-options").hidden = mode() !== "chat";
  $("max_tokens").placeholder = mode() === "chat" ? "to the end of the reply" : String(COMPLETION_MAX_TOKENS);
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function requestBody(text) {
  const diffusion = {
    stream_drafts: "tokens",
    steps: number("steps"),
    entropy_bound: number("entropy_bound"),
    // Sent only when it differs from the server's default, as empty fields leave the defaults.
    stream_prefix: $("stream_prefix").checked === streamPrefixDefault ? undefined : $("stream_prefix").checked,
  };
  const body = {
    model,
    stream: true,
    stream_options: { include_usage: true },
    diffusion,
    temperature: number("temperature"),
    seed: number("seed"),
    max_tokens: number("max_tokens"),
  };
  if (mode() === "completion") {
    return ["/v1/completions", { ...body, prompt: text, max_tokens: body.max_tokens ?? COMPLETION_MAX_TOKENS }];
  }
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history, { role: "user", content: text }];
  return ["/v1/chat/completions", { ...body, messages, chat_template_kwargs: { enable_thinking: $("thinking").checked } }];
}

// One reply in the transcript: its text grows as blocks commit.
function addTurn(role, text) {
  const turn = el("div", `turn ${role}`);
  turn.append(el("div", "role", role === "user" ? "you" : role === "assistant" ? "model" : "error"));
  const thought = el("details", "thought");
  thought.append(el("summary", "", "thinking"), el("div", "thought-text"));
  thought.hidden = true;
  const body = el("div", "text", text);
  const stats = el("div", "stats");
  turn.append(thought, body, stats);
  $("output").append(turn);
  turn.scrollIntoView({ block: "end" });
  return { turn, thought, body, stats };
}

function drawCanvas(draft, frames) {
  const canvas = $("canvas");
  const spans = canvas.children;
  while (spans.length > draft.tokens.length) canvas.lastChild.remove();
  while (spans.length < draft.tokens.length) canvas.append(el("span"));
  draft.tokens.forEach((piece, i) => {
    spans[i].textContent = piece === "" ? "·" : piece.replace(/\n/g, "↵\n"); // "": a special token (padding)
    spans[i].className = `tok ${draft.states[i]}${piece === "" ? " sp" : ""}`;
  });
  canvas.classList.remove("done");
  canvas.dataset.frames = String(frames);
  $("canvas-step").textContent = `step ${draft.step}`;
}

// Server-sent events from a fetch body: yields {event, data} per event.
async function* sse(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const raw = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of raw.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

function figures(f, now) {
  const parts = [];
  if (f.firstToken !== null) parts.push(`first token ${((f.firstToken - f.start) / 1000).toFixed(2)} s`);
  const seconds = (now - f.start) / 1000;
  if (f.tokens && seconds > 0) parts.push(`${(f.tokens / seconds).toFixed(1)} tok/s`);
  if (f.firstToken !== null) parts.push(`${(f.steps / f.canvases).toFixed(1)} steps/canvas`);
  if (f.tokens && f.steps) parts.push(`${(f.tokens / f.steps).toFixed(2)} tok/forward`);
  return parts.join(" · ");
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  const typed = $("api-key").value.trim();
  if (typed && typed !== apiKey) takeKey(); // Send uses the key in the field, "Use key" clicked or not
  if (!model) await connect().catch(showError);
  if (!model) return; // still no accepted key: the key panel says so
  const [url, body] = requestBody(text);
  addTurn("user", text);
  $("prompt").value = "";
  const reply = addTurn("assistant", "");
  reply.turn.classList.add("live");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const f = { start: performance.now(), firstToken: null, tokens: 0, steps: 0, canvases: 0, frames: 0 };
  let content = "";
  let finished = false;
  try {
    const response = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      if (response.status === 401) $("key-panel").hidden = false;
      throw new Error(error.error ? error.error.message : `HTTP ${response.status}`);
    }
    for await (const { event: name, data } of sse(response)) {
      if (data === "[DONE]") break;
      const message = JSON.parse(data);
      if (name === "draft") {
        if (message.step === 1) f.canvases += 1;
        f.steps += 1;
        f.frames += 1;
        drawCanvas(message, f.frames);
      } else if (message.error) {
        throw new Error(message.error.message);
      } else {
        if (message.usage) f.tokens = message.usage.completion_tokens;
        for (const choice of message.choices) {
          const piece = choice.text ?? choice.delta.content ?? "";
          const thought = choice.delta ? choice.delta.reasoning_content : null;
          if (piece || thought) f.firstToken ??= performance.now();
          if (thought) {
            reply.thought.hidden = false;
            reply.thought.lastChild.textContent += thought;
          }
          content += piece;
          reply.body.textContent = content;
          if (choice.finish_reason) finished = true;
        }
      }
      reply.stats.textContent = figures(f, performance.now());
      $("output").scrollTop = $("output").scrollHeight;
    }
    if (url === "/v1/chat/completions") {
      history.push({ role: "user", content: text }, { role: "assistant", content });
    }
  } catch (error) {
    if (error.name === "AbortError") reply.stats.textContent = `${figures(f, performance.now())} · stopped`;
    else reply.turn.append(el("div", "error", String(error.message || error)));
  } finally {
    reply.turn.classList.remove("live");
    if (finished && f.tokens) reply.stats.textContent = figures(f, performance.now());
    $("canvas").classList.add("done");
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function showError(error) {
  addTurn("error", String(error.message || error));
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.shiftKey) return;
    event.preventDefault();
    $("composer").requestSubmit();
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("save-key").addEventListener("click", saveKey);
  $("api-key").addEventListener("keydown", (event) => event.key === "Enter" && saveKey());
  $("clear").addEventListener("click", () => {
    history = [];
    $("output").replaceChildren();
    $("canvas").replaceChildren();
    $("canvas-step").textContent = "";
  });
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", setMode);
  $("remember-key").checked = Boolean(localStorage.getItem(KEY));
  connect().catch(showError);
});
