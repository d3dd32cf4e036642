// Helpers for the supabase-js compatibility tests.
//
// The Rust integration test (tests/it/supabase_js.rs) starts the real switchboard binary
// and runs `node --test` here with:
//   SWITCHBOARD_URL           http://127.0.0.1:PORT (what an app gives createClient)
//   SWITCHBOARD_ANON_KEY      an anon JWT signed with the server's secret
//   SWITCHBOARD_SERVICE_KEY   a service_role JWT
//   SWITCHBOARD_JWT_SECRET    the HS256 secret, to sign more tokens
//   SWITCHBOARD_HEARTBEAT_TIMEOUT_MS  the server's idle timeout
// Run by hand: start `switchboard serve`, export those, `node --test --test-concurrency=1`.
import { createHmac, randomUUID } from 'node:crypto'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'

function required(name) {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set: these tests run against a switchboard server`)
  return value
}

export const URL = required('SWITCHBOARD_URL')
export const ANON_KEY = required('SWITCHBOARD_ANON_KEY')
export const SERVICE_KEY = required('SWITCHBOARD_SERVICE_KEY')
export const SECRET = required('SWITCHBOARD_JWT_SECRET')
export const HEARTBEAT_TIMEOUT_MS = Number(process.env.SWITCHBOARD_HEARTBEAT_TIMEOUT_MS ?? 60000)

const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url')

/** An HS256 JWT for `claims`, signed with the server's secret (or `secret`). */
export function sign(claims, secret = SECRET) {
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`
}

/** A token for `role` expiring `secs` from now. */
export function token(role, secs, extra = {}) {
  return sign({ role, exp: Math.floor(Date.now() / 1000) + secs, ...extra })
}

/** Heartbeats well inside the server's idle timeout, which tests may shorten. */
const heartbeatIntervalMs = Math.min(25000, Math.floor(HEARTBEAT_TIMEOUT_MS / 3))

/** A supabase-js client as an app would create it (node 20 needs `ws`). */
export function client(key = ANON_KEY, realtime = {}) {
  return createClient(URL, key, {
    realtime: { transport: WebSocket, heartbeatIntervalMs, ...realtime },
    auth: { persistSession: false, autoRefreshToken: false },
  })
}

export const unique = (prefix) => `${prefix}-${randomUUID().slice(0, 8)}`
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Resolves when `promise` does, rejects after `ms` with `what`. */
export function within(ms, what, promise) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

/** Subscribes and resolves on SUBSCRIBED; rejects on any other final status. */
export function subscribe(channel, ms = 10000) {
  return within(
    ms,
    `subscribe ${channel.topic}`,
    new Promise((resolve, reject) => {
      channel.subscribe((status, error) => {
        if (status === 'SUBSCRIBED') resolve(channel)
        else if (status !== 'CLOSED') reject(new Error(`${status}: ${error?.message ?? ''}`))
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
      return within(ms, `${n} items (have ${items.length})`, new Promise((resolve) => waiters.push({ n, resolve })))
    },
  }
}

/** Removes every channel and closes the socket of each client. */
export async function cleanup(...clients) {
  for (const c of clients) {
    await c.removeAllChannels()
    c.realtime.disconnect()
  }
}
