// Broadcast with the real supabase-js client: the seeds' examples (room-1, room-2, room-3,
// test-channel) and the rules of PROTOCOL.md §3 that an app can observe, plus the frames that
// went over the wire where the protocol fixes them (binary kinds 3/4 on vsn 2.0.0, replies).
import assert from 'node:assert/strict'
import { test } from 'node:test'
import {
  ANON_KEY,
  app,
  collector,
  decode,
  dump,
  rawSocket,
  sign,
  sleep,
  subscribe,
  token,
  tryUpgrade,
  unique,
  waitFor,
  within,
} from './support.mjs'

/** Decoded binary frames a client sent (`out`) or received (`in`). */
const binary = (c, dir) => c.frames.filter((f) => f.dir === dir && f.binary).map(decode)
/** Parsed text frames a client sent or received (v2 arrays or v1 objects). */
const text = (c, dir) => c.frames.filter((f) => f.dir === dir && !f.binary).map(decode)
/** v2 text frames `[join_ref, ref, topic, event, payload]` received with `event`. */
const received = (c, event) => text(c, 'in').filter((m) => Array.isArray(m) && m[3] === event)
/** Replies (v2) a client received for push `ref`. */
const repliesTo = (c, ref) => received(c, 'phx_reply').filter((m) => m[1] === ref)
const bytesOf = (payload) => new Uint8Array(payload)

test('seed: room-1 receives the test event sent by another client, as binary frames on vsn 2.0.0', async (t) => {
  const room = unique('room-1')
  const [clientA, clientB] = [app(t), app(t)]
  const got = collector()
  // Join a room/topic. Can be anything except for 'realtime'.
  const channelA = clientA.channel(room)
  channelA.on('broadcast', { event: 'test' }, (payload) => got.push(payload))
  await subscribe(channelA)

  const channelB = clientB.channel(room)
  const sent = new Promise((resolve) => {
    channelB.subscribe((status) => {
      if (status !== 'SUBSCRIBED') return null
      resolve(channelB.send({ type: 'broadcast', event: 'test', payload: { message: 'hello, world' } }))
    })
  })
  assert.equal(await within(10000, 'channelB subscribed and sent', sent), 'ok')
  const [message] = await got.until(1)
  assert.deepEqual(message, { type: 'broadcast', event: 'test', payload: { message: 'hello, world' } })

  // realtime-js pushed a binary user_broadcast_push (kind 3, JSON encoding) ...
  const pushes = binary(clientB, 'out')
  assert.equal(pushes.length, 1, dump(clientB))
  assert.equal(pushes[0].kind, 3)
  assert.equal(pushes[0].topic, `realtime:${room}`)
  assert.equal(pushes[0].event, 'test')
  assert.equal(pushes[0].encoding, 1)
  // ... and the other member got a user_broadcast (kind 4), the only binary kind it decodes,
  // with the same event and payload bytes and no metadata (§1.4.3, §3.2).
  const deliveries = binary(clientA, 'in')
  assert.deepEqual(
    deliveries.map((d) => d.kind),
    [4],
    `receiver frames:\n${dump(clientA)}`,
  )
  assert.equal(deliveries[0].topic, `realtime:${room}`)
  assert.equal(deliveries[0].event, 'test')
  assert.equal(deliveries[0].meta, null)
  assert.equal(deliveries[0].payload, pushes[0].payload)
})

test('seed: room-2 with self true echoes my own messages exactly once', async (t) => {
  const room = unique('room-2')
  const [supabase, peer] = [app(t), app(t)]
  const mine = collector()
  const theirs = collector()
  await subscribe(peer.channel(room).on('broadcast', { event: 'test-my-messages' }, (p) => theirs.push(p)))
  const myChannel = supabase.channel(room, { config: { broadcast: { self: true } } })
  myChannel.on('broadcast', { event: 'test-my-messages' }, (payload) => mine.push(payload))
  await subscribe(myChannel)
  await myChannel.send({ type: 'broadcast', event: 'test-my-messages', payload: { message: 'talking to myself' } })
  const [echo] = await mine.until(1)
  assert.deepEqual(echo, { type: 'broadcast', event: 'test-my-messages', payload: { message: 'talking to myself' } })
  await theirs.until(1)
  await sleep(300)
  assert.equal(mine.items.length, 1, 'self: true delivers once')
  assert.equal(theirs.items.length, 1)
})

test('without self the sender does not receive its own broadcast, the others do', async (t) => {
  const room = unique('no-echo')
  const [sender, peer] = [app(t), app(t)]
  const own = collector()
  const theirs = collector()
  const channel = sender.channel(room).on('broadcast', { event: '*' }, (p) => own.push(p))
  await subscribe(channel)
  await subscribe(peer.channel(room).on('broadcast', { event: '*' }, (p) => theirs.push(p)))
  await channel.send({ type: 'broadcast', event: 'x', payload: { n: 1 } })
  await theirs.until(1)
  await sleep(300)
  assert.equal(own.items.length, 0, `no echo expected:\n${dump(sender)}`)
})

test('seed: room-3 with ack true resolves send with the server response ok', async (t) => {
  const clientD = app(t)
  const room = unique('room-3')
  const myChannel = clientD.channel(room, { config: { broadcast: { ack: true } } })
  const response = new Promise((resolve) => {
    myChannel.subscribe(async (status) => {
      if (status !== 'SUBSCRIBED') return
      const serverResponse = await myChannel.send({ type: 'broadcast', event: 'acknowledge', payload: {} })
      console.log('serverResponse', serverResponse)
      resolve(serverResponse)
    })
  })
  assert.equal(await within(12000, 'ack', response), 'ok')
  const [push] = binary(clientD, 'out')
  assert.deepEqual(
    repliesTo(clientD, push.ref),
    [[push.join_ref, push.ref, `realtime:${room}`, 'phx_reply', { status: 'ok', response: {} }]],
    dump(clientD),
  )
})

test('ack false: send resolves ok at once and the server never replies to the push', async (t) => {
  const room = unique('no-ack')
  const [sender, peer] = [app(t), app(t)]
  const got = collector()
  await subscribe(peer.channel(room).on('broadcast', { event: '*' }, (p) => got.push(p)))
  const channel = sender.channel(room)
  await subscribe(channel)
  for (let i = 0; i < 3; i++) assert.equal(await channel.send({ type: 'broadcast', event: 'e', payload: { i } }), 'ok')
  await got.until(3)
  await sleep(300)
  for (const push of binary(sender, 'out')) {
    assert.deepEqual(repliesTo(sender, push.ref), [], `no reply expected to ref ${push.ref}:\n${dump(sender)}`)
  }
})

test('seed: REST send to test-channel without subscribing returns ok and reaches subscribers', async (t) => {
  const topic = unique('test-channel')
  const [listener, client] = [app(t), app(t)]
  const got = collector()
  await subscribe(listener.channel(topic).on('broadcast', { event: 'test' }, (p) => got.push(p)))

  const channel = client.channel(topic)
  // No need to subscribe to channel
  const resp = await channel.send({ type: 'broadcast', event: 'test', payload: { message: 'Hi' } })
  console.log(resp)
  assert.equal(resp, 'ok')
  const [message] = await got.until(1)
  assert.deepEqual(message, { type: 'broadcast', event: 'test', payload: { message: 'Hi' } })
  // It really went over HTTP: the sending client never opened a socket.
  assert.equal(client.frames.length, 0, dump(client))
  // Remember to clean up the channel
  assert.equal(await client.removeChannel(channel), 'ok')
})

test('httpSend (single-message endpoint): JSON to every member, binary only to v2 members', async (t) => {
  const topic = unique('http send')
  const [v2, v1, sender] = [app(t), app(t, ANON_KEY, { vsn: '1.0.0' }), app(t)]
  const got = { v2: collector(), v1: collector() }
  await subscribe(v2.channel(topic).on('broadcast', { event: '*' }, (p) => got.v2.push(p)))
  await subscribe(v1.channel(topic).on('broadcast', { event: '*' }, (p) => got.v1.push(p)))
  const channel = sender.channel(topic)
  assert.equal(typeof channel.httpSend, 'function', 'supabase-js 2.119 has httpSend')
  assert.deepEqual(await channel.httpSend('ev json', { b: 2 }), { success: true })
  const bytes = new Uint8Array([0, 1, 2, 127, 128, 253, 254, 255])
  assert.deepEqual(await channel.httpSend('ev bin', bytes.buffer), { success: true })
  const [json, bin] = await got.v2.until(2)
  assert.deepEqual(json, { type: 'broadcast', event: 'ev json', payload: { b: 2 } })
  assert.equal(bin.event, 'ev bin')
  assert.ok(bin.payload instanceof ArrayBuffer, `binary payload arrives as ArrayBuffer, got ${typeof bin.payload}`)
  assert.deepEqual(bytesOf(bin.payload), bytes)
  const [v1json] = await got.v1.until(1)
  assert.deepEqual(v1json, { type: 'broadcast', event: 'ev json', payload: { b: 2 } })
  await sleep(300)
  assert.equal(got.v1.items.length, 1, `the binary payload is not delivered to v1:\n${dump(v1)}`)
  assert.equal(sender.frames.length, 0)
})

test('event filters select by event name, * sees all', async (t) => {
  const room = unique('filters')
  const [a, b] = [app(t), app(t)]
  const onlyA = collector()
  const all = collector()
  const channel = a.channel(room)
  channel.on('broadcast', { event: 'a' }, (p) => onlyA.push(p)).on('broadcast', { event: '*' }, (p) => all.push(p))
  await subscribe(channel)
  const sender = b.channel(room)
  await subscribe(sender)
  await sender.send({ type: 'broadcast', event: 'b', payload: { n: 1 } })
  await sender.send({ type: 'broadcast', event: 'a', payload: { n: 2 } })
  await sender.send({ type: 'broadcast', event: 'c', payload: { n: 3 } })
  await all.until(3)
  await onlyA.until(1)
  await sleep(200)
  assert.deepEqual(onlyA.items.map((m) => m.payload.n), [2])
  assert.deepEqual(all.items.map((m) => m.event), ['b', 'a', 'c'])
})

test('invalid, expired and wrongly signed keys are refused: never SUBSCRIBED', async (t) => {
  const keys = {
    garbage: ['garbage', 'The token provided is not a valid JWT'],
    expired: [token('anon', -60), 'Token has expired'],
    'wrong secret': [sign({ role: 'anon', exp: Math.floor(Date.now() / 1000) + 3600 }, 'not-the-secret'), 'Failed to validate JWT signature'],
  }
  // The real client keeps reconnecting (1 s, 2 s, 5 s back-off); give it 3 s for each key, in
  // parallel, then make sure nothing ever subscribed and the server never spoke WebSocket.
  const runs = Object.entries(keys).map(async ([name, [key]]) => {
    const c = app(t, key)
    const statuses = []
    c.channel(unique('denied')).subscribe((status) => statuses.push(status))
    await sleep(3000)
    return { name, c, statuses }
  })
  for (const { name, c, statuses } of await Promise.all(runs)) {
    assert.ok(!statuses.includes('SUBSCRIBED'), `${name}: subscribed: ${statuses}`)
    assert.equal(c.frames.filter((f) => f.dir === 'in').length, 0, `${name}: the server accepted the socket:\n${dump(c)}`)
    assert.equal(c.realtime.isConnected(), false, name)
  }
  // What the refused upgrade looks like (§1.3): 401 with a JSON error.
  for (const [name, [key, error]] of Object.entries(keys)) {
    const { status, body } = await tryUpgrade({ apikey: key })
    assert.equal(status, 401, `${name}: ${body}`)
    assert.deepEqual(JSON.parse(body), { error }, name)
  }
  // REST with a bad key: send() reports 'error', httpSend() rejects.
  const rest = app(t, 'garbage')
  const channel = rest.channel(unique('denied-rest'))
  assert.equal(await channel.send({ type: 'broadcast', event: 'e', payload: {} }), 'error')
  await assert.rejects(channel.httpSend('e', {}), /Unauthorized/)
})

test('setAuth: a fresh token keeps the channel working, an expired one closes it', async (t) => {
  const room = unique('auth')
  const [a, b] = [app(t), app(t)]
  const got = collector()
  const system = collector()
  const channel = a.channel(room).on('broadcast', { event: '*' }, (p) => got.push(p)).on('system', {}, (p) => system.push(p))
  await subscribe(channel)
  const sender = b.channel(room)
  await subscribe(sender)

  const fresh = token('authenticated', 3600, { sub: 'user-1' })
  await a.realtime.setAuth(fresh)
  const refresh = text(a, 'out').find((m) => m[3] === 'access_token')
  assert.deepEqual(refresh?.[4], { access_token: fresh }, dump(a))
  await sender.send({ type: 'broadcast', event: 'e', payload: { after: 'refresh' } })
  const [afterRefresh] = await got.until(1)
  assert.deepEqual(afterRefresh.payload, { after: 'refresh' })
  assert.deepEqual(repliesTo(a, refresh[1]), [], 'access_token gets no reply')
  assert.deepEqual(system.items, [], 'a valid token produces no system message')

  await a.realtime.setAuth(token('authenticated', -5, { sub: 'user-1' }))
  const [closed] = await system.until(1)
  assert.equal(closed.extension, 'system')
  assert.equal(closed.status, 'error')
  assert.equal(closed.channel, room)
  assert.match(closed.message, /^Token has expired \d+ seconds ago$/)
  await waitFor(() => `CLOSED status (have ${channel.statuses})`, () => channel.statuses.includes('CLOSED'), 5000)
  assert.equal(channel.state, 'closed')
  const joinRef = channel.joinPush.ref
  assert.deepEqual(received(a, 'phx_close').filter((m) => m[2] === `realtime:${room}`), [[joinRef, joinRef, `realtime:${room}`, 'phx_close', {}]])

  // phx_close (not phx_error): the client does not rejoin; the socket stays open and usable.
  await sleep(1500)
  assert.equal(text(a, 'out').filter((m) => m[3] === 'phx_join' && m[2] === `realtime:${room}`).length, 1, dump(a))
  assert.ok(a.realtime.isConnected(), 'the socket stays open')
  await sender.send({ type: 'broadcast', event: 'e', payload: { after: 'close' } })
  await a.realtime.setAuth(token('authenticated', 3600, { sub: 'user-1' }))
  const again = a.channel(unique('auth-again'), { config: { broadcast: { self: true, ack: true } } })
  const echo = collector()
  again.on('broadcast', { event: '*' }, (p) => echo.push(p))
  await subscribe(again)
  assert.equal(await again.send({ type: 'broadcast', event: 'e', payload: { on: 'same socket' } }), 'ok')
  await echo.until(1)
  assert.equal(got.items.length, 1, 'nothing delivered to the closed channel')
})

test('a channel whose token expires while joined is closed by the server', async (t) => {
  // The key itself expires in 3 s: supabase-js uses it as the socket token and as every
  // channel's access_token (its accessToken callback falls back to the key).
  const a = app(t, token('anon', 3))
  const system = collector()
  const channel = a.channel(unique('expiring')).on('system', {}, (p) => system.push(p))
  await subscribe(channel)
  const [closed] = await system.until(1, 3000 + 2000 + 1000)
  assert.equal(closed.status, 'error')
  assert.match(closed.message, /^Token has expired \d+ seconds ago$/)
  await waitFor(() => `CLOSED status (have ${channel.statuses})`, () => channel.statuses.includes('CLOSED'), 5000)
  assert.ok(a.realtime.isConnected(), 'the socket stays open')
})

test('removeChannel stops delivery', async (t) => {
  const room = unique('remove')
  const [a, b] = [app(t), app(t)]
  const got = collector()
  const channel = a.channel(room).on('broadcast', { event: '*' }, (p) => got.push(p))
  await subscribe(channel)
  const sender = b.channel(room)
  await subscribe(sender)
  await sender.send({ type: 'broadcast', event: 'e', payload: { n: 1 } })
  await got.until(1)
  assert.equal(await a.removeChannel(channel), 'ok')
  await sender.send({ type: 'broadcast', event: 'e', payload: { n: 2 } })
  await sleep(400)
  assert.equal(got.items.length, 1)
  // Nothing for that topic reached the socket after the leave was acknowledged.
  const frames = a.frames.filter((f) => f.dir === 'in')
  const close = frames.findIndex((f) => !f.binary && decode(f)[3] === 'phx_close')
  assert.ok(close >= 0, `phx_close after the leave:\n${dump(a)}`)
  const afterLeave = frames.slice(close + 1)
  assert.deepEqual(afterLeave.filter((f) => f.binary), [], dump(a))
})

test('vsn 1.0.0 and 2.0.0 clients exchange broadcasts; binary payloads reach only v2', async (t) => {
  const room = unique('versions')
  const v1 = app(t, ANON_KEY, { vsn: '1.0.0' })
  const [v2a, v2b] = [app(t), app(t)]
  assert.equal(v1.realtime.vsn, '1.0.0')
  assert.equal(v2a.realtime.vsn, '2.0.0')
  const seen = { v1: collector(), a: collector(), b: collector() }
  const c1 = v1.channel(room).on('broadcast', { event: '*' }, (p) => seen.v1.push(p))
  const ca = v2a.channel(room).on('broadcast', { event: '*' }, (p) => seen.a.push(p))
  const cb = v2b.channel(room).on('broadcast', { event: '*' }, (p) => seen.b.push(p))
  await Promise.all([subscribe(c1), subscribe(ca), subscribe(cb)])

  // Different sockets have no common order: let each message land before the next.
  await ca.send({ type: 'broadcast', event: 'from-v2', payload: { x: 1, y: 'é' } })
  await seen.b.until(1)
  await c1.send({ type: 'broadcast', event: 'from-v1', payload: { z: [1, 2] } })
  await seen.b.until(2)
  const bytes = new Uint8Array([0, 1, 2, 250, 255])
  await ca.send({ type: 'broadcast', event: 'bin', payload: bytes.buffer })

  const [fromV2] = await seen.v1.until(1)
  assert.deepEqual(fromV2, { type: 'broadcast', event: 'from-v2', payload: { x: 1, y: 'é' } })
  const got = await seen.b.until(3)
  assert.deepEqual(got[0], { type: 'broadcast', event: 'from-v2', payload: { x: 1, y: 'é' } })
  assert.deepEqual(got[1], { type: 'broadcast', event: 'from-v1', payload: { z: [1, 2] } })
  assert.equal(got[2].event, 'bin')
  assert.deepEqual(bytesOf(got[2].payload), bytes, 'byte-identical')
  const [fromV1] = await seen.a.until(1)
  assert.deepEqual(fromV1, { type: 'broadcast', event: 'from-v1', payload: { z: [1, 2] } })
  await sleep(300)
  assert.equal(seen.v1.items.length, 1, `the binary payload is not delivered to v1:\n${dump(v1)}`)

  // On the wire: v1 speaks JSON objects only, and the server never sends it a join_ref (§1.4.1).
  assert.equal(v1.frames.filter((f) => f.binary).length, 0, dump(v1))
  const v1push = text(v1, 'out').find((m) => m.event === 'broadcast')
  assert.deepEqual(v1push?.payload, { type: 'broadcast', event: 'from-v1', payload: { z: [1, 2] } })
  for (const m of text(v1, 'in')) {
    assert.ok(m && typeof m === 'object' && !Array.isArray(m), `v1 frame is an object: ${JSON.stringify(m)}`)
    assert.ok(!('join_ref' in m), `v1 frame without join_ref: ${JSON.stringify(m)}`)
  }
  const v1broadcast = text(v1, 'in').find((m) => m.event === 'broadcast')
  assert.deepEqual(v1broadcast, {
    topic: `realtime:${room}`,
    event: 'broadcast',
    payload: { type: 'broadcast', event: 'from-v2', payload: { x: 1, y: 'é' } },
    ref: null,
  })
  // The binary push was kind 3 with encoding 0 and arrived at the other v2 client unchanged.
  const binPush = binary(v2a, 'out').find((f) => f.event === 'bin')
  assert.equal(binPush.encoding, 0)
  const binDelivery = binary(v2b, 'in').find((f) => f.event === 'bin')
  assert.equal(binDelivery?.kind, 4, dump(v2b))
  assert.equal(binDelivery.encoding, 0)
})

test('200 messages sent in a row arrive in order', async (t) => {
  const room = unique('order')
  const [a, b] = [app(t), app(t)]
  const got = collector()
  await subscribe(a.channel(room).on('broadcast', { event: 'n' }, (p) => got.push(p.payload.i)))
  const sender = b.channel(room)
  await subscribe(sender)
  for (let i = 0; i < 200; i++) sender.send({ type: 'broadcast', event: 'n', payload: { i } })
  await got.until(200, 15000)
  assert.deepEqual(got.items, Array.from({ length: 200 }, (_, i) => i))
})

test('200 acknowledged messages sent in a row: every send resolves ok, order kept', async (t) => {
  const room = unique('order-ack')
  const [a, b] = [app(t), app(t)]
  const got = collector()
  await subscribe(a.channel(room).on('broadcast', { event: 'n' }, (p) => got.push(p.payload.i)))
  const sender = b.channel(room, { config: { broadcast: { ack: true } } })
  await subscribe(sender)
  const sends = Array.from({ length: 200 }, (_, i) => sender.send({ type: 'broadcast', event: 'n', payload: { i } }))
  const responses = await within(15000, '200 acks', Promise.all(sends))
  assert.deepEqual([...new Set(responses)], ['ok'])
  await got.until(200, 15000)
  assert.deepEqual(got.items, Array.from({ length: 200 }, (_, i) => i))
})

test('malformed raw frames disturb nobody; the raw socket still gets heartbeat replies', async (t) => {
  const room = unique('malformed')
  const [a, b] = [app(t), app(t)]
  const got = collector()
  await subscribe(a.channel(room).on('broadcast', { event: '*' }, (p) => got.push(p)))
  const sender = b.channel(room)
  await subscribe(sender)

  const raw = await rawSocket()
  t.after(() => raw.ws.close())
  raw.ws.send('{not json')
  raw.ws.send('[null,"1","phoenix","heartbeat"]') // four elements
  raw.ws.send('"a string"')
  raw.ws.send('{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"x"}') // v1 form on v2
  raw.ws.send(Buffer.from([3, 9, 9, 9])) // truncated user_broadcast_push
  raw.ws.send(Buffer.from([42, 0, 0])) // unknown kind
  raw.ws.send(Buffer.from([0, 200, 1, 1, 1, 65])) // push with lengths past the end
  raw.ws.send(JSON.stringify([null, '2', 'phoenix', 'heartbeat', {}]))
  const [reply] = await raw.messages.until(1)
  assert.deepEqual(JSON.parse(reply), [null, '2', 'phoenix', 'phx_reply', { status: 'ok', response: {} }])

  // The supabase-js pair is undisturbed ...
  await sender.send({ type: 'broadcast', event: 'still', payload: { ok: true } })
  const [message] = await got.until(1)
  assert.deepEqual(message.payload, { ok: true })
  // ... and the raw socket still works: a push to a topic it has not joined is answered
  // "unmatched topic" (§1.5), a join works, and it receives the room's broadcasts.
  raw.ws.send(JSON.stringify([null, '3', 'realtime:not-joined', 'broadcast', { type: 'broadcast', event: 'e', payload: {} }]))
  const topic = `realtime:${room}`
  const config = { broadcast: { ack: false, self: false }, presence: { key: '', enabled: false }, postgres_changes: [], private: false }
  raw.ws.send(JSON.stringify(['4', '4', topic, 'phx_join', { config }]))
  await raw.messages.until(3)
  assert.deepEqual(JSON.parse(raw.messages.items[1]), [null, '3', 'realtime:not-joined', 'phx_reply', { status: 'error', response: { reason: 'unmatched topic' } }])
  assert.deepEqual(JSON.parse(raw.messages.items[2]), ['4', '4', topic, 'phx_reply', { status: 'ok', response: { postgres_changes: [] } }])
  await sender.send({ type: 'broadcast', event: 'raw', payload: { to: 'raw' } })
  const [, , , delivery] = await raw.messages.until(4)
  assert.ok(Buffer.isBuffer(delivery), `a binary delivery: ${delivery}`)
  const decoded = decode({ binary: true, data: delivery })
  assert.deepEqual([decoded.kind, decoded.topic, decoded.event, JSON.parse(decoded.payload)], [4, topic, 'raw', { to: 'raw' }])
  assert.equal(raw.closed, false)

  // A v1 socket shrugs off non-object frames too and answers heartbeats without join_ref.
  const rawV1 = await rawSocket({ vsn: '1.0.0' })
  t.after(() => rawV1.ws.close())
  rawV1.ws.send('[null,"1","phoenix","heartbeat",{}]')
  rawV1.ws.send('17')
  rawV1.ws.send('{"topic":"phoenix"')
  rawV1.ws.send(Buffer.from([4, 1, 2, 3]))
  rawV1.ws.send(JSON.stringify({ topic: 'phoenix', event: 'heartbeat', payload: {}, ref: '9' }))
  const [v1reply] = await rawV1.messages.until(1)
  assert.deepEqual(JSON.parse(v1reply), { topic: 'phoenix', event: 'phx_reply', payload: { status: 'ok', response: {} }, ref: '9' })
  assert.equal(rawV1.closed, false)
})
