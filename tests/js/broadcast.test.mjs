// Broadcast with the real supabase-js client: the seeds' examples and every rule.
import assert from 'node:assert/strict'
import { after, test } from 'node:test'
import WebSocket from 'ws'
import { ANON_KEY, URL, cleanup, client, collector, sleep, subscribe, token, unique, within } from './support.mjs'

const clients = []
function app(...args) {
  const c = client(...args)
  clients.push(c)
  return c
}
after(() => cleanup(...clients))

test('seed: room-1 receives the test event sent by another client', async () => {
  const room = unique('room-1')
  const [a, b] = [app(), app()]
  const got = collector()
  const channelA = a.channel(room).on('broadcast', { event: 'test' }, (payload) => got.push(payload))
  await subscribe(channelA)
  const channelB = b.channel(room)
  await subscribe(channelB)
  assert.equal(await channelB.send({ type: 'broadcast', event: 'test', payload: { message: 'hello, world' } }), 'ok')
  const [message] = await got.until(1)
  assert.deepEqual(message, { type: 'broadcast', event: 'test', payload: { message: 'hello, world' } })
})

test('seed: self true echoes to the sender, the default does not', async () => {
  const room = unique('room-2')
  const c = app()
  const mine = collector()
  const myChannel = c.channel(room, { config: { broadcast: { self: true } } })
  myChannel.on('broadcast', { event: 'test-my-messages' }, (p) => mine.push(p))
  await subscribe(myChannel)
  await myChannel.send({ type: 'broadcast', event: 'test-my-messages', payload: { message: 'talking to myself' } })
  const [echo] = await mine.until(1)
  assert.deepEqual(echo.payload, { message: 'talking to myself' })

  const other = app()
  const quiet = collector()
  const plain = other.channel(unique('room-2b')).on('broadcast', { event: '*' }, (p) => quiet.push(p))
  await subscribe(plain)
  await plain.send({ type: 'broadcast', event: 'x', payload: {} })
  await sleep(300)
  assert.equal(quiet.items.length, 0)
})

test('seed: ack true resolves send with ok from the server', async () => {
  const c = app()
  const myChannel = c.channel(unique('room-3'), { config: { broadcast: { ack: true } } })
  await subscribe(myChannel)
  const serverResponse = await myChannel.send({ type: 'broadcast', event: 'acknowledge', payload: {} })
  assert.equal(serverResponse, 'ok')
})

test('seed: REST send without subscribing returns ok and reaches subscribers', async () => {
  const topic = unique('test-channel')
  const [listener, sender] = [app(), app()]
  const got = collector()
  await subscribe(listener.channel(topic).on('broadcast', { event: 'test' }, (p) => got.push(p)))
  const channel = sender.channel(topic)
  const resp = await channel.send({ type: 'broadcast', event: 'test', payload: { message: 'Hi' } })
  assert.equal(resp, 'ok')
  const [message] = await got.until(1)
  assert.deepEqual(message.payload, { message: 'Hi' })
  await sender.removeChannel(channel)
})

test('httpSend uses the single-message endpoint', async () => {
  const topic = unique('http send')
  const [listener, sender] = [app(), app()]
  const got = collector()
  await subscribe(listener.channel(topic).on('broadcast', { event: 'ev bin' }, (p) => got.push(p)))
  assert.deepEqual(await sender.channel(topic).httpSend('ev bin', { b: 2 }), { success: true })
  const [message] = await got.until(1)
  assert.deepEqual(message.payload, { b: 2 })
})

test('event filters select by event name, * sees all', async () => {
  const room = unique('filters')
  const [a, b] = [app(), app()]
  const onlyA = collector()
  const all = collector()
  const channel = a.channel(room)
  channel.on('broadcast', { event: 'a' }, (p) => onlyA.push(p)).on('broadcast', { event: '*' }, (p) => all.push(p))
  await subscribe(channel)
  const sender = b.channel(room)
  await subscribe(sender)
  await sender.send({ type: 'broadcast', event: 'b', payload: { n: 1 } })
  await sender.send({ type: 'broadcast', event: 'a', payload: { n: 2 } })
  await all.until(2)
  await onlyA.until(1)
  await sleep(200)
  assert.deepEqual(onlyA.items.map((m) => m.payload.n), [2])
  assert.deepEqual(all.items.map((m) => m.event), ['b', 'a'])
})

test('invalid and expired keys never subscribe', async () => {
  for (const key of ['garbage', token('anon', -60)]) {
    const c = client(key)
    const statuses = []
    c.channel(unique('denied')).subscribe((status) => statuses.push(status))
    await sleep(2500)
    assert.ok(!statuses.includes('SUBSCRIBED'), `subscribed with ${key.slice(0, 12)}: ${statuses}`)
    await cleanup(c)
  }
})

test('setAuth with a valid token keeps the channel, with an expired one closes it', async () => {
  const room = unique('auth')
  const [a, b] = [app(), app()]
  const got = collector()
  const system = collector()
  const channel = a.channel(room).on('broadcast', { event: '*' }, (p) => got.push(p)).on('system', {}, (p) => system.push(p))
  await subscribe(channel)
  await a.realtime.setAuth(token('authenticated', 3600, { sub: 'user-1' }))
  const sender = b.channel(room)
  await subscribe(sender)
  await sender.send({ type: 'broadcast', event: 'e', payload: { after: 'refresh' } })
  await got.until(1)
  await a.realtime.setAuth(token('authenticated', -5, { sub: 'user-1' }))
  const [closed] = await system.until(1)
  assert.equal(closed.status, 'error')
  assert.match(closed.message, /^Token has expired \d+ seconds ago$/)
  await within(5000, 'channel closed', (async () => { while (channel.state !== 'closed') await sleep(50) })())
})

test('removeChannel stops delivery', async () => {
  const room = unique('remove')
  const [a, b] = [app(), app()]
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
})

test('vsn 1.0.0 and 2.0.0 clients exchange broadcasts; binary payloads reach only v2', async () => {
  const room = unique('versions')
  const v1 = app(ANON_KEY, { vsn: '1.0.0' })
  const [v2a, v2b] = [app(), app()]
  assert.equal(v1.realtime.vsn, '1.0.0')
  assert.equal(v2a.realtime.vsn, '2.0.0')
  const seen = { v1: collector(), a: collector(), b: collector() }
  const c1 = v1.channel(room).on('broadcast', { event: '*' }, (p) => seen.v1.push(p))
  const ca = v2a.channel(room).on('broadcast', { event: '*' }, (p) => seen.a.push(p))
  const cb = v2b.channel(room).on('broadcast', { event: '*' }, (p) => seen.b.push(p))
  await Promise.all([subscribe(c1), subscribe(ca), subscribe(cb)])
  await ca.send({ type: 'broadcast', event: 'from-v2', payload: { x: 1, y: 'é' } })
  await c1.send({ type: 'broadcast', event: 'from-v1', payload: { z: [1, 2] } })
  // Different sockets have no common order: let the v1 message land before the next.
  await seen.b.until(2)
  const bytes = new Uint8Array([0, 1, 2, 250, 255])
  await ca.send({ type: 'broadcast', event: 'bin', payload: bytes.buffer })
  const [fromV2] = await seen.v1.until(1)
  assert.deepEqual(fromV2.payload, { x: 1, y: 'é' })
  const got = await seen.b.until(3)
  assert.deepEqual(got[0].payload, { x: 1, y: 'é' })
  assert.deepEqual(got[1].payload, { z: [1, 2] })
  assert.equal(got[2].event, 'bin')
  assert.deepEqual(new Uint8Array(got[2].payload), bytes)
  const [fromV1] = await seen.a.until(1)
  assert.deepEqual(fromV1.payload, { z: [1, 2] })
  await sleep(300)
  assert.equal(seen.v1.items.length, 1, 'the binary payload is not delivered to v1')
})

test('200 messages arrive in order', async () => {
  const room = unique('order')
  const [a, b] = [app(), app()]
  const got = collector()
  await subscribe(a.channel(room).on('broadcast', { event: 'n' }, (p) => got.push(p.payload.i)))
  const sender = b.channel(room)
  await subscribe(sender)
  for (let i = 0; i < 200; i++) sender.send({ type: 'broadcast', event: 'n', payload: { i } })
  await got.until(200, 15000)
  assert.deepEqual(got.items, Array.from({ length: 200 }, (_, i) => i))
})

test('malformed raw frames do not disturb anyone', async () => {
  const room = unique('malformed')
  const [a, b] = [app(), app()]
  const got = collector()
  await subscribe(a.channel(room).on('broadcast', { event: '*' }, (p) => got.push(p)))
  const sender = b.channel(room)
  await subscribe(sender)
  const raw = new WebSocket(`${URL.replace('http', 'ws')}/realtime/v1/websocket?apikey=${ANON_KEY}&vsn=2.0.0`)
  await new Promise((resolve, reject) => { raw.once('open', resolve); raw.once('error', reject) })
  const replies = collector()
  raw.on('message', (data) => replies.push(data.toString()))
  raw.send('{not json')
  raw.send('[null,"1","phoenix","heartbeat"]')
  raw.send(Buffer.from([3, 9, 9, 9]))
  raw.send(Buffer.from([42, 0, 0]))
  raw.send(JSON.stringify([null, '2', 'phoenix', 'heartbeat', {}]))
  const [reply] = await replies.until(1)
  assert.deepEqual(JSON.parse(reply), [null, '2', 'phoenix', 'phx_reply', { status: 'ok', response: {} }])
  await sender.send({ type: 'broadcast', event: 'still', payload: { ok: true } })
  const [message] = await got.until(1)
  assert.deepEqual(message.payload, { ok: true })
  raw.close()
})
