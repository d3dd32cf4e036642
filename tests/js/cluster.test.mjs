// Two switchboard nodes in one cluster (through NATS), supabase-js clients spread across
// them: broadcast with ack and self, binary and JSON, REST on either node, and presence sync.
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { ANON_KEY, SERVICE_KEY, URL, app, collector, dump, sleep, subscribe, unique, waitFor, within } from './support.mjs'

const URL_2 = process.env.SWITCHBOARD_URL_2
assert.ok(URL_2, 'SWITCHBOARD_URL_2: the second node')

/** A client on the first node and one on the second. */
const pair = (t) => [app(t, ANON_KEY, {}, URL), app(t, ANON_KEY, {}, URL_2)]

test('broadcast with ack and self reaches the member on the other node once', async (t) => {
  const room = unique('cluster-room')
  const [a, b] = pair(t)
  const [gotA, gotB] = [collector(), collector()]
  const config = { config: { broadcast: { self: true, ack: true } } }
  const channelA = a.channel(room, config).on('broadcast', { event: 'msg' }, (m) => gotA.push(m.payload))
  const channelB = b.channel(room, config).on('broadcast', { event: 'msg' }, (m) => gotB.push(m.payload))
  await subscribe(channelA)
  await subscribe(channelB)

  assert.equal(await channelA.send({ type: 'broadcast', event: 'msg', payload: { from: 'a' } }), 'ok')
  assert.equal(await channelB.send({ type: 'broadcast', event: 'msg', payload: { from: 'b' } }), 'ok')
  await gotA.until(2)
  await gotB.until(2)
  await sleep(300)
  const froms = (got) => got.items.map((p) => p.from).sort()
  assert.deepEqual(froms(gotA), ['a', 'b'], dump(a))
  assert.deepEqual(froms(gotB), ['a', 'b'], dump(b))
})

test('REST broadcast on one node reaches subscribers on the other', async (t) => {
  const room = unique('cluster-rest')
  const [, b] = pair(t)
  const got = collector()
  await subscribe(b.channel(room).on('broadcast', { event: 'news' }, (m) => got.push(m.payload)))
  const response = await fetch(`${URL}/realtime/v1/api/broadcast`, {
    method: 'POST',
    headers: { apikey: SERVICE_KEY, 'content-type': 'application/json' },
    body: JSON.stringify({ messages: [{ topic: room, event: 'news', payload: { n: 1 } }] }),
  })
  assert.equal(response.status, 202)
  assert.deepEqual((await got.until(1))[0], { n: 1 })
})

test('presence syncs across nodes: join, state, leave', async (t) => {
  const room = unique('cluster-presence')
  const [a, b] = pair(t)
  const channelA = a.channel(room, { config: { presence: { key: 'alice' } } })
  const channelB = b.channel(room, { config: { presence: { key: 'bob' } } })
  const leaves = collector()
  channelA.on('presence', { event: 'sync' }, () => {}).on('presence', { event: 'leave' }, (e) => leaves.push(e.key))
  channelB.on('presence', { event: 'sync' }, () => {})
  await subscribe(channelA)
  await subscribe(channelB)
  assert.equal(await channelA.track({ online: 'a' }), 'ok')
  assert.equal(await channelB.track({ online: 'b' }), 'ok')
  const keys = (c) => Object.keys(c.presenceState()).sort().join(',')
  await waitFor(() => `both keys on node 1, have ${keys(channelA)}`, () => keys(channelA) === 'alice,bob')
  await waitFor(() => `both keys on node 2, have ${keys(channelB)}`, () => keys(channelB) === 'alice,bob')
  assert.equal(channelA.presenceState().bob[0].online, 'b')

  assert.equal(await channelB.untrack(), 'ok')
  assert.deepEqual(await leaves.until(1), ['bob'])
  await waitFor(() => `only alice on node 1, have ${keys(channelA)}`, () => keys(channelA) === 'alice')
})

// Last: it kills the second node.
test('a node killed with SIGKILL: its presence leaves the other node, and its client reconnects through the balancer and rejoins', async (t) => {
  const balanced = process.env.SWITCHBOARD_URL_BALANCED
  const pid = Number(process.env.SWITCHBOARD_PID_2)
  assert.ok(balanced && pid, 'SWITCHBOARD_URL_BALANCED and SWITCHBOARD_PID_2')
  const room = unique('cluster-failover')
  const watcher = app(t, ANON_KEY, {}, URL)
  const roamer = app(t, ANON_KEY, {}, balanced)
  const w = watcher.channel(room, { config: { presence: { key: 'watcher' } } })
  const [joins, leaves] = [collector(), collector()]
  w.on('presence', { event: 'join' }, (e) => joins.push(e.key)).on('presence', { event: 'leave' }, (e) => leaves.push(e.key))
  await subscribe(w)

  const r = roamer.channel(room, { config: { presence: { key: 'roamer' } } })
  r.on('presence', { event: 'sync' }, () => {})
  const statuses = []
  let resubscribed
  const again = new Promise((resolve) => (resubscribed = resolve))
  r.subscribe((status) => {
    statuses.push(status)
    if (statuses.filter((s) => s === 'SUBSCRIBED').length === 2) resubscribed()
  })
  await waitFor(() => `roamer subscribed (${statuses})`, () => statuses.includes('SUBSCRIBED'))
  assert.equal(await r.track({ at: 'second' }), 'ok')
  await waitFor(() => `the watcher sees the roamer (${joins.items})`, () => joins.items.includes('roamer'))

  process.kill(pid, 'SIGKILL')
  await waitFor(() => `the roamer leaves the watcher's view (${leaves.items})\n${dump(watcher)}`, () => leaves.items.includes('roamer'), 15000)
  await within(30000, () => `the roamer rejoins (${statuses})`, again)
  assert.equal(await r.track({ at: 'first' }), 'ok')
  await waitFor(
    () => `the roamer is back in the watcher's view: ${JSON.stringify(w.presenceState())}`,
    () => w.presenceState().roamer?.length === 1 && w.presenceState().roamer[0].at === 'first',
  )
})
