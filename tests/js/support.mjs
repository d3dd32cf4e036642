// Helpers for the supabase-js compatibility tests (issues 4 and 5): the real, unmodified
// @supabase/supabase-js client (exact version pinned in package.json) against switchboard.
//
// How they run
// ------------
// The Rust integration test tests/it/supabase_js.rs starts the real `switchboard serve` binary
// on a free port and runs node's built-in test runner here, passing:
//
//   SWITCHBOARD_URL                   http://127.0.0.1:PORT (what an app gives createClient)
//   SWITCHBOARD_ANON_KEY              an anon JWT signed with the server's secret
//   SWITCHBOARD_SERVICE_KEY           a service_role JWT
//   SWITCHBOARD_JWT_SECRET            the HS256 secret, so tests can sign more tokens
//   SWITCHBOARD_HEARTBEAT_TIMEOUT_MS  the server's idle timeout (default 60000); presence.test.mjs
//                                     waits that long (+5 s) for a frozen client to be dropped
//   DATABASE_URL                      only for changes.test.mjs (postgres_changes)
//
// By hand, from the repository root:
//
//   (cd tests/js && npm ci)
//   cargo run --release -- serve --bind 127.0.0.1:0 --jwt-secret S \
//       --join-error-backoff-ms 0 --connect-error-backoff-ms 0 --heartbeat-timeout-ms 5000
//   export SWITCHBOARD_URL=http://127.0.0.1:PORT SWITCHBOARD_JWT_SECRET=S \
//          SWITCHBOARD_ANON_KEY=<anon JWT> SWITCHBOARD_SERVICE_KEY=<service_role JWT> \
//          SWITCHBOARD_HEARTBEAT_TIMEOUT_MS=5000
//   node --test tests/js/                      # every file (changes.test.mjs needs DATABASE_URL)
//   node --test tests/js/broadcast.test.mjs tests/js/presence.test.mjs
//
// `node -e` with sign() below makes the keys. Without SWITCHBOARD_URL (or any of the other three
// required variables) every file fails at import: these tests never skip silently.
// SWITCHBOARD_JS_DEBUG=1 prints every WebSocket frame the clients send and receive.
//
// Every client is created the way an app creates it, `createClient(url, key, { realtime: {
// transport: WebSocket } })` with `ws` (node 20 has no global WebSocket), except that the
// transport is a thin subclass of `ws` that records frames so tests can also assert what went
// over the wire (binary kind 3/4 frames on vsn 2.0.0, no reply to ack-less pushes, ...).
import { createHmac, randomUUID } from 'node:crypto'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'

function required(name) {
  const value = process.env[name]
  if (!value) {
    throw new Error(`${name} is not set: these tests run against a switchboard server (see tests/js/support.mjs)`)
  }
  return value
}

export const URL = required('SWITCHBOARD_URL').replace(/\/+$/, '')
export const ANON_KEY = required('SWITCHBOARD_ANON_KEY')
export const SERVICE_KEY = required('SWITCHBOARD_SERVICE_KEY')
export const SECRET = required('SWITCHBOARD_JWT_SECRET')
export const HEARTBEAT_TIMEOUT_MS = Number(process.env.SWITCHBOARD_HEARTBEAT_TIMEOUT_MS ?? 60000)
const DEBUG = !!process.env.SWITCHBOARD_JS_DEBUG

const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url')

/** An HS256 JWT for `claims`, signed with the server's secret (or `secret`). */
export function sign(claims, secret = SECRET) {
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`
}

/** A token for `role` expiring `secs` from now (negative: already expired). */
export function token(role, secs, extra = {}) {
  return sign({ role, exp: Math.floor(Date.now() / 1000) + secs, ...extra })
}

/** Heartbeats well inside the server's idle timeout, which tests may shorten. */
const heartbeatIntervalMs = Math.min(25000, Math.floor(HEARTBEAT_TIMEOUT_MS / 3))

/**
 * Decodes one recorded frame: text frames as parsed JSON (v2 arrays, v1 objects), binary frames
 * of kind 3 (user_broadcast_push) and 4 (user_broadcast) into their fields.
 */
export function decode(frame) {
  if (!frame.binary) {
    try {
      return JSON.parse(frame.data)
    } catch {
      return { unparsable: frame.data }
    }
  }
  const b = frame.data
  const kind = b[0]
  let o
  const take = (len) => b.subarray(o, (o += len))
  const text = (len) => take(len).toString('utf8')
  const rest = (out, m, enc) => {
    const meta = m ? text(m) : null
    try {
      out.meta = meta && JSON.parse(meta)
    } catch {
      out.meta = meta
    }
    out.encoding = enc
    out.payload = enc === 1 ? b.subarray(o).toString('utf8') : b.subarray(o)
    return out
  }
  if (kind === 3 && b.length >= 7) {
    const [j, r, t, e, m, enc] = b.subarray(1, 7)
    o = 7
    return rest({ kind, join_ref: text(j), ref: text(r), topic: text(t), event: text(e) }, m, enc)
  }
  if (kind === 4 && b.length >= 5) {
    const [t, e, m, enc] = b.subarray(1, 5)
    o = 5
    return rest({ kind, topic: text(t), event: text(e) }, m, enc)
  }
  return { kind, bytes: b }
}

/** A readable line for a recorded frame, for assertion messages and SWITCHBOARD_JS_DEBUG. */
export function show(frame) {
  if (frame.dir === 'open') return '-- connection opened --'
  const d = decode(frame)
  const arrow = frame.dir === 'out' ? 'C→' : 'S→'
  if (!frame.binary) return `${arrow} ${frame.data}`
  const payload = Buffer.isBuffer(d.payload) ? `<${d.payload.length} bytes>` : d.payload
  return `${arrow} (binary kind ${d.kind}) ${JSON.stringify({ ...d, payload, bytes: undefined })}`
}

/** The frames a client recorded, one per line. */
export const dump = (c) => c.frames.map(show).join('\n')

/** A `ws` WebSocket that records every frame into `frames`. */
function recordingTransport(frames, label) {
  const record = (frame) => {
    frames.push(frame)
    if (DEBUG) process.stderr.write(`[${label}] ${show(frame)}\n`)
  }
  return class RecordingWebSocket extends WebSocket {
    constructor(...args) {
      super(...args)
      // Each connection starts with a marker, so frames can be told apart by connection.
      record({ dir: 'open', binary: false, data: '' })
      this.on('message', (data, isBinary) => {
        const bytes = Buffer.isBuffer(data) ? Buffer.from(data) : Array.isArray(data) ? Buffer.concat(data) : Buffer.from(new Uint8Array(data))
        record({ dir: 'in', binary: isBinary, data: isBinary ? bytes : bytes.toString('utf8') })
      })
      this.on('close', (code, reason) => {
        const waited = this.closeCalledAt ? Date.now() - this.closeCalledAt : null
        if (DEBUG || waited > 2000) {
          process.stderr.write(`[${label}] socket closed code ${code} ${reason} ${waited === null ? 'by the server' : `${waited} ms after close()`}\n`)
        }
      })
    }

    close(...args) {
      if (!this.closeCalledAt) this.closeCalledAt = Date.now()
      return super.close(...args)
    }

    send(data, ...rest) {
      const binary = typeof data !== 'string'
      const bytes = binary ? Buffer.from(ArrayBuffer.isView(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : new Uint8Array(data)) : null
      record({ dir: 'out', binary, data: binary ? bytes : data })
      return super.send(data, ...rest)
    }
  }
}

let clientCount = 0

/**
 * A supabase-js client as an app creates it (node 20 needs `ws` as the transport). `realtime`
 * options are merged in (e.g. `{ vsn: '1.0.0' }`); `url` is another server's (a cluster node's). The client gets a `frames` array with every
 * WebSocket frame it sent (`dir: 'out'`) and received (`dir: 'in'`).
 */
export function client(key = ANON_KEY, realtime = {}, url = URL) {
  const frames = []
  const label = `client ${++clientCount}${realtime.vsn ? ` vsn ${realtime.vsn}` : ''}`
  const c = createClient(url, key, {
    realtime: { transport: recordingTransport(frames, label), heartbeatIntervalMs, ...realtime },
    auth: { persistSession: false, autoRefreshToken: false },
  })
  c.frames = frames
  return c
}

/**
 * A client that `t` cleans up when the test ends (channels removed, socket closed), so that
 * node exits and nothing leaks into the next test.
 */
export function app(t, key = ANON_KEY, realtime = {}, url = URL) {
  const c = client(key, realtime, url)
  t.after(() => cleanup(c))
  return c
}

export const unique = (prefix) => `${prefix}-${randomUUID().slice(0, 8)}`
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Resolves when `promise` does, rejects after `ms` with `what`. */
export function within(ms, what, promise) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${typeof what === 'function' ? what() : what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

/** Polls `condition` every 20 ms; rejects after `ms` (and stops polling). */
export function waitFor(what, condition, ms = 10000) {
  let gaveUp = false
  const poll = (async () => {
    while (!gaveUp && !condition()) await sleep(20)
  })()
  return within(ms, what, poll).finally(() => (gaveUp = true))
}

/**
 * Subscribes and resolves on SUBSCRIBED; rejects on CHANNEL_ERROR / TIMED_OUT or after `ms`.
 * Every status the callback ever receives is kept in `channel.statuses` (later ones too, e.g.
 * CLOSED after a server-side close).
 */
export function subscribe(channel, ms = 10000) {
  channel.statuses = []
  return within(
    ms,
    () => `subscribe ${channel.topic} (statuses so far: ${channel.statuses.join(', ') || 'none'})`,
    new Promise((resolve, reject) => {
      channel.subscribe((status, error) => {
        channel.statuses.push(status)
        if (status === 'SUBSCRIBED') resolve(channel)
        else if (status !== 'CLOSED') reject(new Error(`${channel.topic}: ${status}: ${error?.message ?? ''}`))
      })
    }),
  )
}

/** Collects what a callback receives; `until(n)` waits for at least n items. */
export function collector() {
  const items = []
  let waiters = []
  return {
    items,
    push(item) {
      items.push(item)
      waiters = waiters.filter((w) => (items.length >= w.n ? (w.resolve(items), false) : true))
    },
    until(n, ms = 10000) {
      if (items.length >= n) return Promise.resolve(items)
      return within(ms, () => `${n} items (have ${items.length}: ${JSON.stringify(items).slice(0, 500)})`, new Promise((resolve) => waiters.push({ n, resolve })))
    },
  }
}

/** Removes every channel and closes the socket of each client. */
export async function cleanup(...clients) {
  for (const c of clients) {
    await within(15000, 'removeAllChannels', c.removeAllChannels()).catch(() => {})
    await c.realtime.disconnect()
  }
}

/** The WebSocket URL realtime-js builds, with `params` as query parameters. */
export function socketURL(params = {}) {
  const query = new URLSearchParams({ apikey: ANON_KEY, vsn: '2.0.0', ...params })
  return `${URL.replace(/^http/, 'ws')}/realtime/v1/websocket?${query}`
}

/**
 * A plain `ws` socket (no supabase-js) for raw frames. Resolves once open; `messages` collects
 * text frames (as strings) and binary frames (as Buffers); `closed` flips on close.
 */
export async function rawSocket(params = {}) {
  const ws = new WebSocket(socketURL(params))
  const messages = collector()
  const state = { ws, messages, closed: false }
  ws.on('message', (data, isBinary) => messages.push(isBinary ? Buffer.from(data) : data.toString()))
  ws.on('close', () => (state.closed = true))
  await within(10000, 'raw socket open', new Promise((resolve, reject) => {
    ws.once('open', resolve)
    ws.once('error', reject)
  }))
  return state
}

/**
 * Tries a WebSocket upgrade and resolves `{ status, body }` of the HTTP response when the
 * server refuses it, or `{ status: 101 }` when it upgrades (the socket is then closed).
 */
export function tryUpgrade(params) {
  return within(10000, 'upgrade attempt', new Promise((resolve) => {
    const ws = new WebSocket(socketURL(params))
    ws.on('unexpected-response', (req, res) => {
      // ws leaves the refused request to whoever listens for this event: close its connection
      // ourselves, or node's keep-alive agent holds it open and node does not exit.
      const socket = res.socket
      let body = ''
      res.on('data', (d) => (body += d))
      res.on('end', () => {
        socket.destroy()
        req.destroy()
        resolve({ status: res.statusCode, body })
      })
    })
    ws.on('open', () => {
      ws.close()
      resolve({ status: 101 })
    })
    ws.on('error', () => {})
  }))
}
