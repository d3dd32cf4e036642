// The server killed with SIGKILL while rows are sent from SQL, with the real supabase-js
// reconnecting by itself. The harness (tests/it/supabase_js.rs) passes:
//   SWITCHBOARD_PID      the running server, which this test kills
//   SWITCHBOARD_RESTART  JSON argv that starts it again on the same address
//   DATABASE_URL         its database
// Every message committed while a subscriber was joined (and the stream live for it) reaches
// it, within each connection once and in order; the messages a restart sends again are
// counted and reported.
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import net from 'node:net'
import { after, before, test } from 'node:test'
import pg from 'pg'
import { SERVICE_KEY, URL, app, decode, sleep, subscribe, unique, waitFor } from './support.mjs'

const db = new pg.Client({ connectionString: process.env.DATABASE_URL })
let restarted
before(() => db.connect())
after(async () => {
  restarted?.kill('SIGKILL')
  await db.end()
})

/** Resolves once the server accepts TCP connections again. */
async function listening() {
  const { hostname, port } = new globalThis.URL(URL)
  let up = false
  for (let i = 0; i < 200 && !up; i++) {
    up = await new Promise((resolve) => {
      const socket = net.connect(Number(port), hostname, () => (socket.destroy(), resolve(true)))
      socket.on('error', () => resolve(false))
    })
    if (!up) await sleep(100)
  }
  assert.ok(up, 'the server came back')
}

/**
 * What a client saw, by connection: for each, when the change stream was live for its channel
 * (the `Replication connection established` message) and the `n` of every message, in order.
 */
function lives(c, topic) {
  const out = []
  for (const frame of c.frames) {
    if (frame.dir === 'open') out.push({ live: null, seen: [] })
    if (frame.dir !== 'in' || frame.binary) continue
    const [, , t, event, payload] = decode(frame)
    if (t !== `realtime:${topic}`) continue
    if (event === 'system' && payload.message === 'Replication connection established') out.at(-1).live = frame.at
    if (event === 'broadcast' && payload.event === 'row') out.at(-1).seen.push(payload.payload.n)
  }
  return out
}

test('a server killed with SIGKILL loses no committed message and sends none twice on a connection', async (t) => {
  const topic = unique('restart')
  const subscribers = [
    { name: 'public', c: app(t), private: false },
    { name: 'private', c: app(t, SERVICE_KEY), private: true },
  ]
  for (const s of subscribers) {
    // Stamp every frame with its arrival time, to place messages in a connection's life.
    const frames = s.c.frames
    const push = frames.push.bind(frames)
    frames.push = (frame) => push({ ...frame, at: Date.now() })
    const config = { private: s.private, broadcast: { replication_ready: true } }
    s.channel = s.c.channel(topic, { config })
    s.channel.on('broadcast', { event: '*' }, () => {}).on('system', {}, () => {})
    await subscribe(s.channel)
  }
  await waitFor('both live', () => subscribers.every((s) => lives(s.c, topic)[0]?.live))

  // Rows for both rooms every 20 ms; the server dies after a second and is back half a
  // second later; rows go on until every subscriber is live again, and a second more.
  const committed = [] // { n, private, at }
  let n = 0
  let writing = true
  const writer = (async () => {
    while (writing) {
      n += 1
      for (const isPrivate of [false, true]) {
        await db.query(`select realtime.send(jsonb_build_object('n', $1::int), 'row', $2, $3)`, [n, topic, isPrivate])
        committed.push({ n, private: isPrivate, at: Date.now() })
      }
      await sleep(20)
    }
  })()
  await sleep(1000)
  const killedAt = Date.now()
  process.kill(Number(process.env.SWITCHBOARD_PID), 'SIGKILL')
  await sleep(500)
  const [program, ...args] = JSON.parse(process.env.SWITCHBOARD_RESTART)
  restarted = spawn(program, args, { stdio: 'ignore' })
  await listening()
  await waitFor(
    'both subscribers live again',
    () => subscribers.every((s) => lives(s.c, topic).length >= 2 && lives(s.c, topic).at(-1).live),
    30000,
  )
  await sleep(1000)
  writing = false
  await writer

  const report = []
  for (const s of subscribers) {
    const mine = committed.filter((r) => r.private === s.private)
    // Owed: committed while a connection was live for it, away from the crash (a message
    // handed to a socket that died with the process is gone with it).
    const owed = (lifeOf) =>
      mine.filter((r) => lifeOf.some((l) => l.live && r.at > l.live && (l.end === undefined || r.at < l.end)))
    await waitFor(
      `${s.name}: every owed message`,
      () => {
        const ls = lives(s.c, topic)
        ls[0].end = killedAt - 300
        const got = new Set(ls.flatMap((l) => l.seen))
        return owed(ls).every((r) => got.has(r.n))
      },
      20000,
    )
    await sleep(300)
    const ls = lives(s.c, topic)
    ls[0].end = killedAt - 300
    for (const [i, l] of ls.entries()) {
      const sorted = l.seen.every((v, k) => k === 0 || l.seen[k - 1] < v)
      assert.ok(sorted, `${s.name}, connection ${i + 1}: out of order or twice: ${l.seen}`)
    }
    const all = ls.flatMap((l) => l.seen)
    const again = all.length - new Set(all).size
    report.push(`${s.name}: ${mine.length} committed, ${owed(ls).length} owed, ${all.length} delivered over ${ls.length} connections, ${again} again after the restart`)
  }
  console.log(report.join('\n'))
})
