// Presence with the real supabase-js client: track, sync/join/leave, late joiners,
// custom keys and removal after an abrupt disconnect.
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { after, test } from 'node:test'
import { HEARTBEAT_TIMEOUT_MS, cleanup, client, collector, sleep, subscribe, unique, within } from './support.mjs'

const clients = []
function app() {
  const c = client()
  clients.push(c)
  return c
}
after(() => cleanup(...clients))

/** A channel with presence listeners feeding collectors. */
function watched(c, room, key = '') {
  const events = { sync: collector(), join: collector(), leave: collector() }
  const channel = c.channel(room, { config: { presence: { key } } })
  channel
    .on('presence', { event: 'sync' }, () => events.sync.push(channel.presenceState()))
    .on('presence', { event: 'join' }, (e) => events.join.push(e))
    .on('presence', { event: 'leave' }, (e) => events.leave.push(e))
  return { channel, events }
}

async function until(what, condition, ms = 10000) {
  await within(ms, what, (async () => { while (!condition()) await sleep(20) })())
}

test('track is seen by another client as join and sync, keyed by presence key', async () => {
  const room = unique('presence')
  const [a, b] = [app(), app()]
  const tracker = watched(a, room)
  const observer = watched(b, room)
  await subscribe(tracker.channel)
  await subscribe(observer.channel)
  assert.equal(await tracker.channel.track({ user: 'ann', status: 'online' }), 'ok')
  const [joined] = await observer.events.join.until(1)
  assert.deepEqual(joined.newPresences.map((p) => p.user), ['ann'])
  await until('observer sync', () => Object.keys(observer.channel.presenceState()).length === 1)
  const state = observer.channel.presenceState()
  const [key] = Object.keys(state)
  assert.match(key, /^[0-9a-f-]{36}$/, 'a generated key')
  assert.equal(state[key][0].status, 'online')
  assert.ok(state[key][0].presence_ref, 'metas carry presence_ref')
  // The tracker sees itself too.
  await until('tracker sync', () => Object.keys(tracker.channel.presenceState()).length === 1)
})

test('a late joiner receives the full state at once', async () => {
  const room = unique('late')
  const [a, b, late] = [app(), app(), app()]
  for (const [c, name] of [[a, 'ann'], [b, 'bob']]) {
    const { channel } = watched(c, room, name)
    await subscribe(channel)
    await channel.track({ name })
  }
  const joiner = watched(late, room, 'late')
  await subscribe(joiner.channel)
  await joiner.events.sync.until(1)
  await until('full state', () => Object.keys(joiner.channel.presenceState()).length === 2)
  assert.deepEqual(Object.keys(joiner.channel.presenceState()).sort(), ['ann', 'bob'])
})

test('untrack is seen as a leave', async () => {
  const room = unique('untrack')
  const [a, b] = [app(), app()]
  const tracker = watched(a, room, 'alice')
  const observer = watched(b, room, 'watcher')
  await subscribe(tracker.channel)
  await subscribe(observer.channel)
  await tracker.channel.track({ here: true })
  await observer.events.join.until(1)
  assert.equal(await tracker.channel.untrack(), 'ok')
  const [left] = await observer.events.leave.until(1)
  assert.equal(left.key, 'alice')
  await until('state empty', () => Object.keys(observer.channel.presenceState()).length === 0)
})

test('a custom presence key is used verbatim', async () => {
  const room = unique('custom')
  const [a, b] = [app(), app()]
  const tracker = watched(a, room, 'alice')
  const observer = watched(b, room, 'watcher')
  await subscribe(tracker.channel)
  await subscribe(observer.channel)
  await tracker.channel.track({ role: 'admin' })
  const [joined] = await observer.events.join.until(1)
  assert.equal(joined.key, 'alice')
  assert.equal(observer.channel.presenceState().alice[0].role, 'admin')
})

test('an abruptly killed client leaves within the heartbeat timeout', async () => {
  const room = unique('crash')
  const observer = watched(app(), room, 'watcher')
  await subscribe(observer.channel)
  const child = spawn(process.execPath, ['fixtures/tracker.mjs', room, 'doomed'], { stdio: ['ignore', 'pipe', 'inherit'], env: process.env })
  await within(15000, 'tracker child ready', new Promise((resolve, reject) => {
    child.stdout.on('data', (d) => (d.toString().includes('tracked') ? resolve() : reject(new Error(d.toString()))))
  }))
  await until('child visible', () => observer.channel.presenceState().doomed !== undefined)
  child.kill('SIGKILL')
  const [left] = await observer.events.leave.until(1, HEARTBEAT_TIMEOUT_MS + 5000)
  assert.equal(left.key, 'doomed')
  assert.equal(observer.channel.presenceState().doomed, undefined)
})

test('a frozen client (socket still open) leaves when the server idle timeout fires', async () => {
  const room = unique('frozen')
  const observer = watched(app(), room, 'watcher')
  await subscribe(observer.channel)
  const child = spawn(process.execPath, ['fixtures/tracker.mjs', room, 'frozen'], { stdio: ['ignore', 'pipe', 'inherit'], env: process.env })
  try {
    await within(15000, 'tracker child ready', new Promise((resolve) => child.stdout.on('data', (d) => d.toString().includes('tracked') && resolve())))
    await until('child visible', () => observer.channel.presenceState().frozen !== undefined)
    // Stopped, the process neither heartbeats nor closes its socket.
    child.kill('SIGSTOP')
    const started = Date.now()
    const [left] = await observer.events.leave.until(1, HEARTBEAT_TIMEOUT_MS + 5000)
    assert.equal(left.key, 'frozen')
    // Not a TCP close: the server waited for its idle timeout.
    assert.ok(Date.now() - started >= HEARTBEAT_TIMEOUT_MS / 2, `left after ${Date.now() - started} ms`)
  } finally {
    child.kill('SIGKILL')
  }
})
