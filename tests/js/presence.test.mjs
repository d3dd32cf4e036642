// Presence with the real supabase-js client (PROTOCOL.md §4): track/untrack, sync/join/leave,
// presenceState keyed by presence key, late joiners, custom keys, updates, shared keys, and
// removal after a graceful leave, an abrupt disconnect (SIGKILL) and a frozen client (SIGSTOP).
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { test } from 'node:test'
import { ANON_KEY, HEARTBEAT_TIMEOUT_MS, app, collector, dump, subscribe, sleep, unique, waitFor, within } from './support.mjs'

const TRACKER = fileURLToPath(new URL('./fixtures/tracker.mjs', import.meta.url))

/** A channel with presence listeners feeding collectors (`sync` gets a state snapshot). */
function watched(c, room, key = '') {
  const events = { sync: collector(), join: collector(), leave: collector() }
  const channel = c.channel(room, { config: { presence: { key } } })
  channel
    .on('presence', { event: 'sync' }, () => events.sync.push(channel.presenceState()))
    .on('presence', { event: 'join' }, (e) => events.join.push(e))
    .on('presence', { event: 'leave' }, (e) => events.leave.push(e))
  return { channel, events, client: c }
}

/** The presence state without the server-chosen refs: `{key: [payload, ...]}`. */
function plain(state) {
  return Object.fromEntries(
    Object.entries(state).map(([key, metas]) => [key, metas.map(({ presence_ref, ...rest }) => rest)]),
  )
}

/** Waits until `w`'s presence state (refs stripped) equals `expected`. */
function stateBecomes(w, expected, ms = 10000) {
  return waitFor(
    () => `presence state ${JSON.stringify(expected)}, have ${JSON.stringify(plain(w.channel.presenceState()))}\n${dump(w.client)}`,
    () => JSON.stringify(sorted(plain(w.channel.presenceState()))) === JSON.stringify(sorted(expected)),
    ms,
  )
}
/** JSON with object keys sorted (key order carries no meaning). */
const canonical = (value) =>
  JSON.stringify(value, (_, v) => (v && typeof v === 'object' && !Array.isArray(v) ? Object.fromEntries(Object.entries(v).sort(([a], [b]) => (a < b ? -1 : 1))) : v))
/** A state in a comparable form: keys sorted, metas in any order. */
const sorted = (state) => Object.fromEntries(Object.keys(state).sort().map((k) => [k, state[k].map(canonical).sort()]))

/** Starts fixtures/tracker.mjs: another process that joins `room` as `key` and tracks itself. */
async function trackerProcess(t, room, key) {
  const child = spawn(process.execPath, [TRACKER, room, key], { stdio: ['ignore', 'pipe', 'inherit'], env: process.env })
  t.after(() => child.kill('SIGKILL'))
  let output = ''
  await within(15000, () => `tracker child ready (output: ${output})`, new Promise((resolve, reject) => {
    child.stdout.on('data', (d) => {
      output += d
      if (output.includes('tracked')) resolve()
      if (output.includes('failed')) reject(new Error(output))
    })
    child.on('exit', (code, signal) => reject(new Error(`tracker exited ${code ?? signal}: ${output}`)))
  }))
  return child
}

test('track resolves ok; another client sees join and sync, keyed by a generated presence key', async (t) => {
  const room = unique('presence')
  const tracker = watched(app(t), room)
  const observer = watched(app(t), room)
  await subscribe(tracker.channel)
  await subscribe(observer.channel)
  // Both joined with presence enabled: each got an initial (empty) state, i.e. a sync.
  await observer.events.sync.until(1)
  assert.deepEqual(observer.events.sync.items[0], {})

  assert.equal(await tracker.channel.track({ user: 'ann', status: 'online' }), 'ok')
  const [joined] = await observer.events.join.until(1)
  assert.match(joined.key, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/, 'a generated UUID key')
  assert.deepEqual(joined.currentPresences, [])
  assert.equal(joined.newPresences.length, 1)
  const [meta] = joined.newPresences
  assert.equal(meta.user, 'ann')
  assert.equal(meta.status, 'online')
  assert.equal(typeof meta.presence_ref, 'string')
  assert.ok(meta.presence_ref.length > 0)

  await stateBecomes(observer, { [joined.key]: [{ user: 'ann', status: 'online' }] })
  const state = observer.channel.presenceState()
  assert.equal(state[joined.key][0].presence_ref, meta.presence_ref)
  // A sync follows the join.
  await waitFor('a sync with the tracked state', () => observer.events.sync.items.some((s) => s[joined.key]))
  // There is no self exclusion for presence: the tracker sees itself under the same key.
  await stateBecomes(tracker, { [joined.key]: [{ user: 'ann', status: 'online' }] })
  // Every join without a key gets its own.
  assert.equal(await observer.channel.track({ user: 'obs' }), 'ok')
  await waitFor('two keys', () => Object.keys(tracker.channel.presenceState()).length === 2)
  const keys = Object.keys(tracker.channel.presenceState())
  assert.notEqual(keys[0], keys[1])
})

test('a late joiner receives the full state in its first sync', async (t) => {
  const room = unique('late')
  for (const name of ['ann', 'bob']) {
    const { channel } = watched(app(t), room, name)
    await subscribe(channel)
    assert.equal(await channel.track({ name }), 'ok')
  }
  const joiner = watched(app(t), room, 'late')
  await subscribe(joiner.channel)
  const [first] = await joiner.events.sync.until(1)
  assert.deepEqual(plain(first), { ann: [{ name: 'ann' }], bob: [{ name: 'bob' }] }, dump(joiner.client))
  // The initial state arrives as joins too.
  await joiner.events.join.until(2)
  assert.deepEqual(joiner.events.join.items.map((j) => j.key).sort(), ['ann', 'bob'])
})

test('untrack resolves ok and is seen as a leave', async (t) => {
  const room = unique('untrack')
  const tracker = watched(app(t), room, 'alice')
  const observer = watched(app(t), room, 'watcher')
  await subscribe(tracker.channel)
  await subscribe(observer.channel)
  await tracker.channel.track({ here: true })
  const [joined] = await observer.events.join.until(1)
  assert.equal(await tracker.channel.untrack(), 'ok')
  const [left] = await observer.events.leave.until(1)
  assert.equal(left.key, 'alice')
  assert.deepEqual(left.currentPresences, [])
  assert.deepEqual(left.leftPresences.map((p) => [p.here, p.presence_ref]), [[true, joined.newPresences[0].presence_ref]])
  await stateBecomes(observer, {})
  // The channel stays joined and can track again.
  assert.equal(await tracker.channel.track({ here: 'again' }), 'ok')
  await stateBecomes(observer, { alice: [{ here: 'again' }] })
})

test('a custom presence key is used verbatim', async (t) => {
  const room = unique('custom')
  const tracker = watched(app(t), room, 'alice')
  const observer = watched(app(t), room, 'watcher')
  await subscribe(tracker.channel)
  await subscribe(observer.channel)
  await tracker.channel.track({ role: 'admin' })
  const [joined] = await observer.events.join.until(1)
  assert.equal(joined.key, 'alice')
  assert.equal(observer.channel.presenceState().alice[0].role, 'admin')
})

test('tracking again replaces the meta: one entry, new payload, new ref', async (t) => {
  const room = unique('update')
  const tracker = watched(app(t), room, 'alice')
  const observer = watched(app(t), room, 'watcher')
  await subscribe(tracker.channel)
  await subscribe(observer.channel)
  await tracker.channel.track({ status: 'online' })
  await stateBecomes(observer, { alice: [{ status: 'online' }] })
  const firstRef = observer.channel.presenceState().alice[0].presence_ref
  assert.equal(await tracker.channel.track({ status: 'away' }), 'ok')
  await stateBecomes(observer, { alice: [{ status: 'away' }] })
  assert.notEqual(observer.channel.presenceState().alice[0].presence_ref, firstRef)
  const [left] = await observer.events.leave.until(1)
  assert.deepEqual(left.leftPresences.map((p) => p.presence_ref), [firstRef])
})

test('two channels under the same key are two metas; one leaving removes only its own', async (t) => {
  const room = unique('shared-key')
  const first = watched(app(t), room, 'ann')
  const secondClient = app(t)
  const second = watched(secondClient, room, 'ann')
  const observer = watched(app(t), room, 'watcher')
  for (const w of [first, second, observer]) await subscribe(w.channel)
  await first.channel.track({ device: 'phone' })
  await second.channel.track({ device: 'laptop' })
  await stateBecomes(observer, { ann: [{ device: 'phone' }, { device: 'laptop' }] })
  assert.equal(await secondClient.removeChannel(second.channel), 'ok')
  await stateBecomes(observer, { ann: [{ device: 'phone' }] })
  const [left] = await observer.events.leave.until(1)
  assert.equal(left.key, 'ann')
  assert.deepEqual(left.leftPresences.map((p) => p.device), ['laptop'])
})

test('removeChannel and disconnect remove the client from presence', async (t) => {
  const room = unique('graceful')
  const leaverClient = app(t)
  const leaver = watched(leaverClient, room, 'leaver')
  const quitterClient = app(t)
  const quitter = watched(quitterClient, room, 'quitter')
  const observer = watched(app(t), room, 'watcher')
  for (const w of [leaver, quitter, observer]) await subscribe(w.channel)
  await leaver.channel.track({ n: 1 })
  await quitter.channel.track({ n: 2 })
  await stateBecomes(observer, { leaver: [{ n: 1 }], quitter: [{ n: 2 }] })
  await leaverClient.removeChannel(leaver.channel)
  await stateBecomes(observer, { quitter: [{ n: 2 }] })
  await quitterClient.realtime.disconnect()
  await stateBecomes(observer, {})
  assert.deepEqual(observer.events.leave.items.map((l) => l.key), ['leaver', 'quitter'])
  // A later joiner does not see them either.
  const late = watched(app(t), room, 'late')
  await subscribe(late.channel)
  const [first] = await late.events.sync.until(1)
  assert.deepEqual(first, {})
})

test('vsn 1.0.0 and 2.0.0 clients see each other in presence', async (t) => {
  const room = unique('presence-versions')
  const v1 = watched(app(t, ANON_KEY, { vsn: '1.0.0' }), room, 'v1')
  const v2 = watched(app(t), room, 'v2')
  await subscribe(v1.channel)
  await subscribe(v2.channel)
  assert.equal(await v1.channel.track({ from: 'v1' }), 'ok')
  assert.equal(await v2.channel.track({ from: 'v2' }), 'ok')
  const both = { v1: [{ from: 'v1' }], v2: [{ from: 'v2' }] }
  await stateBecomes(v1, both)
  await stateBecomes(v2, both)
})

test('an abruptly killed client (SIGKILL) leaves within the heartbeat timeout', async (t) => {
  const room = unique('crash')
  const observer = watched(app(t), room, 'watcher')
  await subscribe(observer.channel)
  const child = await trackerProcess(t, room, 'doomed')
  await waitFor('child visible', () => observer.channel.presenceState().doomed !== undefined)
  child.kill('SIGKILL')
  const [left] = await observer.events.leave.until(1, HEARTBEAT_TIMEOUT_MS + 5000)
  assert.equal(left.key, 'doomed')
  assert.equal(left.leftPresences[0].user, 'doomed')
  assert.equal(observer.channel.presenceState().doomed, undefined)
})

test('a frozen client (socket open, silent) leaves when the server idle timeout fires', async (t) => {
  const room = unique('frozen')
  const observer = watched(app(t), room, 'watcher')
  await subscribe(observer.channel)
  const child = await trackerProcess(t, room, 'frozen')
  await waitFor('child visible', () => observer.channel.presenceState().frozen !== undefined)
  // Stopped, the process neither heartbeats nor closes its socket.
  child.kill('SIGSTOP')
  const started = Date.now()
  const [left] = await observer.events.leave.until(1, HEARTBEAT_TIMEOUT_MS + 5000)
  const waited = Date.now() - started
  assert.equal(left.key, 'frozen')
  // Not a TCP close: the server waited for (most of) its idle timeout.
  assert.ok(waited >= HEARTBEAT_TIMEOUT_MS / 2, `left after ${waited} ms`)
})
