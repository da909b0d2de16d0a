// The official openai package's realtime WebSocket client (OpenAIRealtimeWS, on the ws
// package), unchanged but for its base URL and key, against a gateway over wss://: it updates
// the session's audio format, appends 200 ms of audio, commits it, asks for a response, and
// collects what comes back until response.done (with VG_MODE=quota, until the gateway ends the
// session). It prints what it saw as one JSON object for the Go test
// (openai_realtime_test.go); NODE_EXTRA_CA_CERTS makes node trust the test's certificate.
import OpenAI from 'openai';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';

const client = new OpenAI({ baseURL: process.env.VG_BASE_URL, apiKey: process.env.VG_TOKEN });
const rt = new OpenAIRealtimeWS({ model: process.env.VG_MODEL }, client);
const mode = process.env.VG_MODE ?? 'turn';
const out = {
  types: [], errors: [], audioDeltas: 0, audioBytes: 0, transcript: '', inputTranscript: '',
  inputDeltas: '', usage: null, status: null, session: null, closeCode: null, protocol: null,
};
const fmt = process.env.VG_FORMAT ?? 'audio/pcm';
const frameBytes = fmt === 'audio/pcm' ? 9600 : 1600; // 200 ms
const silence = Buffer.alloc(frameBytes, fmt === 'audio/pcm' ? 0 : 0xff).toString('base64');

const done = new Promise((resolve) => {
  rt.socket.on('open', () => { out.protocol = rt.socket.protocol; });
  rt.socket.on('close', (code) => { out.closeCode = code; resolve(); });
  rt.on('error', (err) => { out.errors.push(err.error?.code ?? err.message); });
  rt.on('event', (ev) => { out.types.push(ev.type); });
  rt.on('session.created', () => {
    rt.send({ type: 'session.update', session: { type: 'realtime', instructions: 'be brief',
      audio: { input: { format: fmt === 'audio/pcm' ? { type: fmt, rate: 24000 } : { type: fmt } } } } });
  });
  rt.on('session.updated', (ev) => {
    out.session = ev.session.audio.input.format;
    if (out.session.type !== fmt) return;
    rt.send({ type: 'input_audio_buffer.append', audio: silence });
    rt.send({ type: 'input_audio_buffer.commit' });
    rt.send({ type: 'response.create' });
  });
  rt.on('conversation.item.input_audio_transcription.delta', (ev) => { out.inputDeltas += ev.delta; });
  rt.on('conversation.item.input_audio_transcription.completed', (ev) => { out.inputTranscript = ev.transcript; });
  rt.on('response.output_audio.delta', (ev) => {
    out.audioDeltas++;
    out.audioBytes += Buffer.from(ev.delta, 'base64').length;
  });
  rt.on('response.output_audio_transcript.delta', (ev) => { out.transcript += ev.delta; });
  rt.on('response.done', (ev) => {
    out.usage = ev.response.usage;
    out.status = ev.response.status;
    if (mode === 'turn') rt.close({ code: 1000, reason: 'done' });
  });
});
const timeout = setTimeout(() => { out.timedOut = true; rt.close({ code: 1000, reason: 'timeout' }); }, 20000);
await done;
clearTimeout(timeout);
console.log(JSON.stringify(out));
