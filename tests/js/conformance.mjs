// The official JavaScript clients (npm `ollama`, `openai`) against a gateway.
// Run by tests/test_js_clients.py: node conformance.mjs URL CHAT_MODEL EMBED_MODEL
// Prints one JSON line per check: {"name": ..., "ok": true|false, "detail": ...}.
import { Ollama } from 'ollama'
import OpenAI from 'openai'

const [url, model, embedModel] = process.argv.slice(2)
const messages = [{ role: 'user', content: 'hi' }]
const tools = [{ type: 'function', function: { name: 'get_weather', description: 'weather',
  parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } }]
const schema = { type: 'object', properties: { name: { type: 'string' }, age: { type: 'integer' } },
  required: ['name', 'age'], additionalProperties: false }

async function check (name, fn) {
  let ok = false, detail
  try { [ok, detail] = await fn() } catch (e) { detail = `${e.constructor.name}: ${e.message}` }
  console.log(JSON.stringify({ name, ok: !!ok, detail: String(detail).slice(0, 300) }))
}

const o = new Ollama({ host: url, headers: { 'X-User-ID': 'js-conformance' } })
await check('ollama list', async () => { const r = await o.list(); return [r.models.some(m => m.model.startsWith(model.split(':')[0])), r.models.length] })
await check('ollama show', async () => { const r = await o.show({ model }); return [r.capabilities.includes('completion'), r.capabilities] })
await check('ollama chat', async () => { const r = await o.chat({ model, messages }); return [r.done && r.message.content, r.done_reason] })
await check('ollama chat stream', async () => {
  const parts = []; for await (const p of await o.chat({ model, messages, stream: true })) parts.push(p)
  return [parts.at(-1).done && parts.slice(0, -1).every(p => !p.done), parts.length]
})
await check('ollama generate stream', async () => {
  let text = ''; for await (const p of await o.generate({ model, prompt: 'hi', stream: true })) text += p.response
  return [text.length > 0, text]
})
await check('ollama abort', async () => {
  const it = await o.chat({ model, messages, stream: true, options: { num_predict: 50 } })
  let n = 0
  try { for await (const p of it) { if (++n === 2) o.abort() } } catch (e) { return [e.name === 'AbortError', e.name] }
  return [false, `no abort after ${n}`]
})
await check('ollama after abort', async () => { const r = await o.chat({ model, messages }); return [r.done, r.done_reason] })
await check('ollama tools', async () => {
  const r = await o.chat({ model, messages: [{ role: 'user', content: 'get_weather please' }], tools })
  return [r.message.tool_calls?.[0]?.function?.name === 'get_weather', JSON.stringify(r.message.tool_calls)]
})
await check('ollama format schema', async () => {
  const r = await o.chat({ model, messages, format: schema }); const v = JSON.parse(r.message.content)
  return [typeof v.name === 'string' && Number.isInteger(v.age), r.message.content]
})
await check('ollama image', async () => {
  const r = await o.chat({ model, messages: [{ role: 'user', content: 'what?', images: [new Uint8Array([0x89, 0x50, 0x4e, 0x47, 1, 2, 3])] }] })
  return [r.done, r.message.content]
})
await check('ollama embed', async () => { const r = await o.embed({ model: embedModel, input: ['a', 'b'] }); return [r.embeddings.length === 2 && r.embeddings[0].length > 0, r.embeddings[0].length] })
await check('ollama bad model', async () => {
  try { await o.chat({ model: 'no-such-model', messages }) } catch (e) { return [e.name === 'ResponseError' && e.status_code === 404 && e.error.includes('no-such-model'), e.error] }
  return [false, 'no error']
})

const ai = new OpenAI({ baseURL: url + '/v1', apiKey: 'test', maxRetries: 0, defaultHeaders: { 'X-User-ID': 'js-conformance' } })
await check('openai models list and retrieve', async () => {
  const ids = (await ai.models.list()).data.map(m => m.id)
  for (const id of ids) { const m = await ai.models.retrieve(id); if (m.id !== id) return [false, id] }
  return [ids.length > 0, ids.join(',')]
})
await check('openai chat', async () => { const r = await ai.chat.completions.create({ model, messages }); return [r.choices[0].message.content && r.usage.completion_tokens > 0, r.choices[0].finish_reason] })
await check('openai chat stream usage', async () => {
  let text = '', usage = null
  for await (const c of await ai.chat.completions.create({ model, messages, stream: true, stream_options: { include_usage: true } })) {
    text += c.choices[0]?.delta?.content ?? ''; if (c.usage) usage = c.usage
  }
  return [text && usage?.completion_tokens > 0, JSON.stringify(usage)]
})
await check('openai chat stream without usage', async () => {
  let empty = 0; for await (const c of await ai.chat.completions.create({ model, messages, stream: true })) if (!c.choices.length) empty++
  return [empty === 0, empty]
})
await check('openai abort', async () => {
  const ac = new AbortController(); let n = 0
  const s = await ai.chat.completions.create({ model, messages, stream: true, max_tokens: 50 }, { signal: ac.signal })
  for await (const c of s) { if (++n === 2) ac.abort() }
  return [n < 10, n]  // chunks already read may still come out after abort()
})
await check('openai tools stream helper', async () => {
  const f = await ai.chat.completions.stream({ model, messages: [{ role: 'user', content: 'get_weather please' }], tools }).finalChatCompletion()
  return [f.choices[0].finish_reason === 'tool_calls' && f.choices[0].message.tool_calls[0].function.name === 'get_weather', JSON.stringify(f.choices[0].message)]
})
await check('openai json_schema parse', async () => {
  const r = await ai.chat.completions.parse({ model, messages, response_format: { type: 'json_schema', json_schema: { name: 'p', strict: true, schema } } })
  return [Number.isInteger(r.choices[0].message.parsed?.age), JSON.stringify(r.choices[0].message.parsed)]
})
await check('openai completions', async () => { const r = await ai.completions.create({ model, prompt: 'Say hi', max_tokens: 4 }); return [r.choices[0].text, r.choices[0].finish_reason] })
await check('openai embeddings (base64 by default)', async () => {
  const r = await ai.embeddings.create({ model: embedModel, input: ['a', 'b'] })
  const f = await ai.embeddings.create({ model: embedModel, input: ['a', 'b'], encoding_format: 'float' })
  const same = r.data[0].embedding.every((x, i) => Math.abs(x - f.data[0].embedding[i]) < 1e-5)
  return [r.data.length === 2 && r.data[0].embedding.length > 0 && same, r.data[0].embedding.length]
})
await check('openai bad model', async () => {
  try { await ai.chat.completions.create({ model: 'no-such-model', messages }) } catch (e) { return [e.status === 404 && e.constructor.name === 'NotFoundError' && e.message.includes('no-such-model'), e.message] }
  return [false, 'no error']
})
