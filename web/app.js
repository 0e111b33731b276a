// The speech server's page: discovers what the server offers, sends /v1/audio/speech as JSON, plays the streamed
// PCM with the Web Audio API as it arrives, and keeps the finished result in the <audio data-testid="audio">.
// Timestamps (ms since the request was sent) are exposed on the status element for tests and scripts:
// data-first-audio-ms, data-playback-start-ms, data-response-end-ms; data-state is loading|ready|streaming|done|error.
"use strict";

const $ = (id) => document.getElementById(id);
const SAMPLING = [  // [request field, integer?, step]
  ["text_temperature", false, "0.05"], ["text_top_p", false, "0.01"], ["text_top_k", true, "1"],
  ["audio_temperature", false, "0.05"], ["audio_top_p", false, "0.01"], ["audio_top_k", true, "1"],
  ["audio_repetition_penalty", false, "0.05"], ["max_new_frames", true, "1"], ["seed", true, "1"],
];
// The request fields of a server whose /openapi.json does not document the request body.
const UNDOCUMENTED_FIELDS = ["model", "input", "voice", "response_format", "speed", "stream", "mode", "prompt_text",
  "ref_audio", "seed", "max_new_frames", "do_sample", ...SAMPLING.map(([name]) => name)];
const UNDOCUMENTED_FORMATS = ["wav", "pcm", "flac"];
const LIVE_FORMATS = ["wav", "pcm"];  // played as they stream (requested as pcm; wav is built here)
const MAX_RECORD_SECONDS = 20;

const server = { fields: new Set(UNDOCUMENTED_FIELDS), formats: UNDOCUMENTED_FORMATS, speed: null };
const ui = { reference: null, referenceUrl: null, recorder: null, abort: null, player: null, urls: [] };

// ------------------------------------------------------------------------------------------------ discovery

async function getJson(url, headers = {}) {
  try {
    const response = await fetch(url, { headers });
    return response.ok ? await response.json() : null;
  } catch (error) {
    return null;
  }
}

function resolveRef(doc, schema) {
  for (let depth = 0; schema && schema.$ref && depth < 16; depth++) {
    schema = schema.$ref.replace(/^#\//, "").split("/").reduce((node, key) => node && node[key], doc);
  }
  return schema || null;
}

function findInSchema(doc, schema, pick) {  // the first value pick() finds in the schema or its alternatives
  schema = resolveRef(doc, schema);
  if (!schema) return null;
  const found = pick(schema);
  if (found != null) return found;
  for (const alternative of [...(schema.anyOf || []), ...(schema.oneOf || []), ...(schema.allOf || [])]) {
    const inner = findInSchema(doc, alternative, pick);
    if (inner != null) return inner;
  }
  return null;
}

function applySchema(doc) {  // the request fields, formats and speed range the server documents
  const content = doc?.paths?.["/v1/audio/speech"]?.post?.requestBody?.content || {};
  const body = resolveRef(doc, (content["application/json"] || {}).schema);
  const properties = body && body.properties;
  Object.assign(server, { fields: new Set(UNDOCUMENTED_FIELDS), formats: UNDOCUMENTED_FORMATS, speed: null });
  if (!properties) return;  // undocumented: the fields and formats of the plain server
  server.fields = new Set(Object.keys(properties));
  server.formats = findInSchema(doc, properties.response_format, (s) => s.enum) || UNDOCUMENTED_FORMATS;
  if (properties.speed) {
    const low = findInSchema(doc, properties.speed, (s) => s.minimum ?? s.exclusiveMinimum);
    const high = findInSchema(doc, properties.speed, (s) => s.maximum ?? s.exclusiveMaximum);
    if (low != null && high != null && high > low) server.speed = { low, high };
  }
}

function buildSampling(defaults) {  // once: an input per sampling field, its placeholder the server's default
  const grid = $("sampling");
  for (const [name, , step] of SAMPLING) {
    const field = document.createElement("div");
    field.className = "field";
    field.innerHTML = `<label for="${name}">${name}</label><input id="${name}" data-param="${name}" type="number"
      step="${step}"><p class="error" data-error-for="${name}"></p>`;
    const value = defaults[name];
    field.querySelector("input").placeholder = value == null ? "default" : String(value);
    grid.appendChild(field);
  }
  if (defaults.do_sample != null) $("do_sample").options[0].text = `default (${defaults.do_sample})`;
}

function showOffered() {  // the controls of what the server offers (again after a key opens its schema)
  for (const [name] of SAMPLING) $(name).closest(".field").hidden = !server.fields.has(name);
  const format = $("format"), previous = format.value || "wav";
  format.replaceChildren(...server.formats.map((name) => new Option(name, name)));
  format.value = server.formats.includes(previous) ? previous : server.formats[0];
  $("speed-field").hidden = !server.speed;
  if (server.speed) Object.assign($("speed"), { min: server.speed.low, max: server.speed.high });
}

async function discover() {
  applySchema(await getJson("openapi.json", authHeaders()));
  showOffered();
}

async function loadVoices() {
  const response = await fetch("v1/audio/voices", { headers: authHeaders() }).catch(() => null);
  if (!response) return setStatus("error", "cannot reach the server");
  if (response.status === 401) {
    $("key-field").hidden = false;
    return showApiError(response, "api_key");
  }
  if (!response.ok) return showApiError(response);
  clearErrors();
  const select = $("voice"), previous = select.value;
  select.replaceChildren();
  for (const voice of (await response.json()).voices || []) {
    const detail = voice.seconds ? `${voice.mode}, ${voice.seconds} s` : voice.mode;
    select.add(new Option(detail ? `${voice.name} (${detail})` : voice.name, voice.name));
  }
  if ([...select.options].some((option) => option.value === previous)) select.value = previous;
  $("speak").disabled = false;
  setStatus("ready", "Ready.");
}

// ------------------------------------------------------------------------------------------------ request

function authHeaders() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function requestBody(format, live) {
  const body = { input: $("text").value, response_format: live ? "pcm" : format };
  if (ui.reference) body.ref_audio = ui.reference.dataUrl;
  else if ($("voice").value) body.voice = $("voice").value;
  if ($("prompt_text").value.trim()) body.prompt_text = $("prompt_text").value.trim();
  if ($("do_sample").value) body.do_sample = $("do_sample").value === "true";
  for (const [name] of SAMPLING) {
    const input = $(name);
    if (input && input.value !== "") body[name] = Number(input.value);
  }
  if (server.speed && Number($("speed").value) !== 1) body.speed = Number($("speed").value);
  if (body.response_format === "pcm") body.stream = true;  // others: the server's default (FLAC cannot stream)
  return Object.fromEntries(Object.entries(body).filter(([name]) => server.fields.has(name)));
}

async function speak(event) {
  event.preventDefault();
  if (ui.abort) return;
  clearErrors();
  resetResult();
  const format = $("format").value;
  const live = LIVE_FORMATS.includes(format) && server.formats.includes("pcm");
  ui.player = live ? new PcmPlayer() : null;  // made inside the click, so the browser lets it play
  ui.abort = new AbortController();
  setBusy(true);
  const started = performance.now();
  const status = $("status");
  setStatus("streaming", "Generating…");
  try {
    const response = await fetch("v1/audio/speech", { method: "POST", signal: ui.abort.signal,
      headers: { "Content-Type": "application/json", ...authHeaders() }, body: JSON.stringify(requestBody(format, live)) });
    if (!response.ok) {
      if (ui.player) ui.player.stop();
      ui.player = null;
      return await showApiError(response);
    }
    const rate = Number(response.headers.get("X-Sample-Rate")) || 24000;  // OpenAI's pcm when the header is absent
    const channels = Number(response.headers.get("X-Channels")) || 1;
    const chunks = [];
    let bytes = 0;
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (!chunks.length) {
        status.dataset.firstAudioMs = (performance.now() - started).toFixed(1);
        showMetric("first-audio", `${(Number(status.dataset.firstAudioMs) / 1000).toFixed(2)} s`);
      }
      chunks.push(value);
      bytes += value.length;
      if (ui.player) {
        ui.player.push(value, rate, channels, () => {
          status.dataset.playbackStartMs = (performance.now() - started).toFixed(1);
        });
        showMetric("audio-seconds", `${(bytes / (2 * channels * rate)).toFixed(2)} s`);
      }
    }
    const wall = performance.now() - started;
    status.dataset.responseEndMs = wall.toFixed(1);
    const type = live ? null : response.headers.get("Content-Type") || "application/octet-stream";
    await finish(chunks, { format, type, rate, channels, wall, seconds: live ? bytes / (2 * channels * rate) : null });
  } catch (error) {
    if (error.name === "AbortError") {
      if (ui.player) ui.player.stop();
      ui.player = null;
      setStatus("error", "Stopped.");
    } else {
      setStatus("error", `The audio stream broke off: ${error.message}`);
    }
  } finally {
    ui.abort = null;
    setBusy(false);
  }
}

async function finish(chunks, { format, type, rate, channels, wall, seconds }) {
  const blob = type ? new Blob(chunks, { type })
    : format === "wav" ? new Blob([wavHeader(chunks, rate, channels), ...chunks], { type: "audio/wav" })
    : new Blob(chunks, { type: "application/octet-stream" });
  const audio = $("audio");
  // raw pcm cannot play in <audio>: it gets the same samples as a WAV, the download keeps the pcm
  const playable = format === "pcm" ? new Blob([wavHeader(chunks, rate, channels), ...chunks], { type: "audio/wav" })
    : blob;
  audio.src = remember(URL.createObjectURL(playable));
  const download = $("download");
  download.href = remember(URL.createObjectURL(blob));
  download.download = `speech.${format}`;
  download.textContent = `Download ${format} (${(blob.size / 1024).toFixed(0)} KiB)`;
  download.hidden = false;
  if (seconds == null) seconds = await durationOf(audio);
  const status = $("status");
  status.dataset.audioSeconds = seconds.toFixed(3);
  status.dataset.rtf = seconds > 0 ? (wall / 1000 / seconds).toFixed(3) : "";
  showMetric("first-audio", `${(Number(status.dataset.firstAudioMs) / 1000).toFixed(2)} s`);
  showMetric("audio-seconds", `${seconds.toFixed(2)} s`);
  showMetric("rtf", seconds > 0 ? (wall / 1000 / seconds).toFixed(2) : "–");
  setStatus("done", `Done: ${seconds.toFixed(2)} s of audio in ${(wall / 1000).toFixed(2)} s.`);
}

function durationOf(audio) {
  return new Promise((resolve) => {
    const done = () => resolve(Number.isFinite(audio.duration) ? audio.duration : 0);
    if (audio.readyState >= 1) return done();
    audio.addEventListener("loadedmetadata", done, { once: true });
    audio.addEventListener("error", done, { once: true });
  });
}

function wavHeader(chunks, rate, channels) {
  const length = chunks.reduce((sum, chunk) => sum + chunk.length, 0);
  const view = new DataView(new ArrayBuffer(44));
  const text = (offset, value) => [...value].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + length, true); text(8, "WAVE"); text(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, channels, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * channels * 2, true);
  view.setUint16(32, channels * 2, true); view.setUint16(34, 16, true); text(36, "data");
  view.setUint32(40, length, true);
  return view.buffer;
}

// ------------------------------------------------------------------------------------------------ playback

class PcmPlayer {  // 16-bit little-endian interleaved PCM, scheduled back to back on one AudioContext
  constructor() {
    this.context = new AudioContext();
    this.context.resume();
    this.next = 0;
    this.rest = new Uint8Array(0);  // an odd byte or partial frame carried to the next chunk
    this.sources = [];
  }

  push(bytes, rate, channels, onStart) {
    const joined = new Uint8Array(this.rest.length + bytes.length);
    joined.set(this.rest);
    joined.set(bytes, this.rest.length);
    const frameBytes = 2 * channels, frames = Math.floor(joined.length / frameBytes);
    this.rest = joined.slice(frames * frameBytes);
    if (!frames) return;
    const samples = new DataView(joined.buffer, 0, frames * frameBytes);
    const buffer = this.context.createBuffer(channels, frames, rate);
    for (let c = 0; c < channels; c++) {
      const out = buffer.getChannelData(c);
      for (let i = 0; i < frames; i++) out[i] = samples.getInt16((i * channels + c) * 2, true) / 32768;
    }
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    const when = Math.max(this.next, this.context.currentTime + 0.05);
    source.start(when);
    this.sources.push(source);
    if (this.next === 0) this.watchStart(when, onStart);
    this.next = when + buffer.duration;
  }

  watchStart(when, onStart) {  // the moment the audio clock passes the first buffer's start
    const check = () => (this.context.currentTime >= when ? onStart() : setTimeout(check, 5));
    check();
  }

  stop() {
    for (const source of this.sources) source.stop();
    this.sources = [];
    if (this.context.state !== "closed") this.context.close();
  }
}

// ------------------------------------------------------------------------------------------------ reference

function useReference(dataUrl, label, previewBlob) {
  ui.reference = dataUrl ? { dataUrl, label } : null;
  $("reference-info").textContent = dataUrl ? label : "";
  $("clear-reference").hidden = !dataUrl;
  $("voice").disabled = Boolean(dataUrl);
  const preview = $("reference-preview");
  if (ui.referenceUrl) URL.revokeObjectURL(ui.referenceUrl);  // (kept apart from the result's URLs)
  ui.referenceUrl = previewBlob ? URL.createObjectURL(previewBlob) : null;
  preview.hidden = !previewBlob;
  if (previewBlob) preview.src = ui.referenceUrl;
  else preview.removeAttribute("src");
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function onReferenceFile() {
  const file = $("reference").files[0];
  if (!file) return useReference(null);
  useReference(await readAsDataUrl(file), `${file.name} (${(file.size / 1024).toFixed(0)} KiB)`, file);
}

async function toggleRecording() {
  if (ui.recorder) return ui.recorder.stop();
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    return showFieldError("ref_audio", `microphone unavailable: ${error.message}`);
  }
  const recorder = new MediaRecorder(stream), pieces = [], began = performance.now();
  ui.recorder = recorder;
  recorder.ondataavailable = (event) => pieces.push(event.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((track) => track.stop());
    clearInterval(timer);
    ui.recorder = null;
    $("record").textContent = "Record";
    $("record").dataset.recording = "false";
    try {
      const wav = await recordingToWav(new Blob(pieces, { type: recorder.mimeType }));
      const seconds = ((performance.now() - began) / 1000).toFixed(1);
      $("reference").value = "";
      useReference(await readAsDataUrl(wav), `recording (${seconds} s)`, wav);
    } catch (error) {
      showFieldError("ref_audio", `cannot read the recording: ${error.message}`);
    }
  };
  const timer = setInterval(() => {
    const seconds = (performance.now() - began) / 1000;
    $("record").textContent = `Stop recording (${seconds.toFixed(0)} s)`;
    if (seconds >= MAX_RECORD_SECONDS) recorder.stop();
  }, 250);
  recorder.start();
  $("record").textContent = "Stop recording";
  $("record").dataset.recording = "true";
}

async function recordingToWav(blob) {  // MediaRecorder gives webm/ogg; the server reads WAV
  const context = new AudioContext();
  try {
    const audio = await context.decodeAudioData(await blob.arrayBuffer());
    const channels = audio.numberOfChannels, frames = audio.length;
    const pcm = new DataView(new ArrayBuffer(frames * channels * 2));
    for (let c = 0; c < channels; c++) {
      const data = audio.getChannelData(c);
      for (let i = 0; i < frames; i++) {
        pcm.setInt16((i * channels + c) * 2, Math.round(Math.max(-1, Math.min(1, data[i])) * 32767), true);
      }
    }
    const body = new Uint8Array(pcm.buffer);
    return new Blob([wavHeader([body], audio.sampleRate, channels), body], { type: "audio/wav" });
  } finally {
    context.close();
  }
}

// ------------------------------------------------------------------------------------------------ status

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

function showMetric(id, text) {
  $(id).textContent = text;
}

async function showApiError(response, fallbackParam = null) {
  let message = `HTTP ${response.status}`, param = null;
  try {
    const error = (await response.json()).error || {};
    message = error.message || message;
    param = error.param || null;
  } catch (error) { /* not OpenAI's error JSON: the status line says enough */ }
  if (response.status === 401) {
    $("key-field").hidden = false;
    param = "api_key";
  }
  param = param || fallbackParam;
  setStatus("error", message);
  $("status").dataset.errorParam = param || "";
  if (param) showFieldError(param, message);
}

function showFieldError(param, message) {
  const slot = document.querySelector(`[data-error-for="${CSS.escape(param)}"]`);
  const input = document.querySelector(`[data-param="${CSS.escape(param)}"]`);
  if (slot) slot.textContent = message;
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.closest("details")?.setAttribute("open", "");
  }
}

function clearErrors() {
  document.querySelectorAll("[data-error-for]").forEach((slot) => { slot.textContent = ""; });
  document.querySelectorAll("[aria-invalid]").forEach((input) => input.removeAttribute("aria-invalid"));
  delete $("status").dataset.errorParam;
}

function resetResult() {
  if (ui.player) ui.player.stop();
  ui.player = null;
  const status = $("status");
  for (const key of ["firstAudioMs", "playbackStartMs", "responseEndMs", "audioSeconds", "rtf"]) {
    delete status.dataset[key];
  }
  ["first-audio", "audio-seconds", "rtf"].forEach((id) => showMetric(id, "–"));
  $("audio").removeAttribute("src");
  $("audio").load();  // forget the previous result's duration
  $("download").hidden = true;
  ui.urls.splice(0).forEach((url) => URL.revokeObjectURL(url));
}

function remember(url) {
  ui.urls.push(url);
  return url;
}

function setBusy(busy) {
  $("speak").disabled = busy;
  $("stop").disabled = !busy;
}

async function init() {
  const config = await getJson("web/config.json");
  $("demo-note").hidden = !(config && config.demo);
  buildSampling((config && config.defaults) || {});
  await discover();
  $("form").addEventListener("submit", speak);
  $("stop").addEventListener("click", () => ui.abort && ui.abort.abort());
  $("key").addEventListener("change", async () => { await discover(); await loadVoices(); });
  $("speed").addEventListener("input", () => { $("speed-value").textContent = Number($("speed").value).toFixed(2); });
  $("reference").addEventListener("change", onReferenceFile);
  $("clear-reference").addEventListener("click", () => { $("reference").value = ""; useReference(null); });
  const canRecord = Boolean(navigator.mediaDevices && window.MediaRecorder);
  $("record").disabled = !canRecord;
  if (!canRecord) $("record").title = "recording needs a secure page (https or localhost) and MediaRecorder";
  $("record").addEventListener("click", toggleRecording);
  await loadVoices();
}

init();
