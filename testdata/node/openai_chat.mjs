// The official openai package, unchanged but for its base URL and key, against a gateway:
// chat streaming and not, a stream the upstream breaks off, the model list, and the SDK's
// error classes for the gateway's 401 and 429. It prints what it saw as one JSON object, for
// the Go test that runs it (openai_chat_test.go) to check.
import OpenAI, { AuthenticationError, RateLimitError } from 'openai';

const baseURL = process.env.VG_BASE_URL;
const model = process.env.VG_MODEL;
const client = new OpenAI({ baseURL, apiKey: process.env.VG_TOKEN, maxRetries: 0 });
const conversation = [
  { role: 'system', content: 'be brief' },
  { role: 'user', content: 'hello' },
  { role: 'assistant', content: [{ type: 'text', text: 'hi, how can I help?' }] },
  { role: 'user', content: 'tell me more' },
];
const out = {};

const stream = await client.chat.completions.create({
  model, messages: conversation, stream: true, stream_options: { include_usage: true },
});
let text = '';
let usage = null;
let finish = null;
let role = null;
let chunks = 0;
for await (const chunk of stream) {
  chunks++;
  const choice = chunk.choices[0];
  if (choice) {
    role ??= choice.delta.role ?? null;
    text += choice.delta.content ?? '';
    finish = choice.finish_reason ?? finish;
  }
  if (chunk.usage) usage = chunk.usage;
}
out.stream = { text, usage, finish, role, chunks };

const c = await client.chat.completions.create({ model, messages: conversation, max_completion_tokens: 50 });
out.completion = { id: c.id, object: c.object, text: c.choices[0].message.content, finish: c.choices[0].finish_reason, usage: c.usage };

try {
  let partial = '';
  for await (const chunk of await client.chat.completions.create({
    model, messages: [{ role: 'user', content: 'break-off' }], stream: true,
  })) {
    partial += chunk.choices[0]?.delta.content ?? '';
  }
  out.breakOff = { raised: false, partial };
} catch (e) {
  out.breakOff = { raised: true, name: e.constructor.name, code: e.code ?? null, message: e.message };
}

try {
  await client.chat.completions.create({ model, messages: conversation, tools: [{ type: 'function', function: { name: 'f' } }] });
  out.unsupported = { raised: false };
} catch (e) {
  out.unsupported = { raised: true, name: e.constructor.name, status: e.status, param: e.param ?? null, code: e.code ?? null };
}

const models = [];
for await (const m of client.models.list()) models.push(m.id);
out.models = models;

try {
  await new OpenAI({ baseURL, apiKey: 'not-a-token', maxRetries: 0 }).models.list();
  out.auth = { raised: false };
} catch (e) {
  out.auth = { raised: true, isAuthenticationError: e instanceof AuthenticationError, status: e.status, code: e.code ?? null };
}

const limited = new OpenAI({ baseURL, apiKey: process.env.VG_LIMITED_TOKEN, maxRetries: 0 });
out.rate = { raised: false };
for (let i = 0; i < 20 && !out.rate.raised; i++) {
  try {
    await limited.chat.completions.create({ model, messages: [{ role: 'user', content: 'hi' }] });
  } catch (e) {
    out.rate = {
      raised: true, after: i, isRateLimitError: e instanceof RateLimitError, status: e.status,
      code: e.code ?? null, retryAfter: e.headers?.get('retry-after') ?? null,
    };
  }
}

console.log(JSON.stringify(out));
