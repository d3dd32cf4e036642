// Postgres Changes with the real supabase-js client against a real Postgres.
// The harness (tests/it/supabase_js.rs) creates the schema below before starting the server
// and passes DATABASE_URL:
//   public.todos(id bigserial pk, owner uuid, task text, done bool, n int) in the publication
//   public.notes(id bigserial pk, owner uuid, body text) in the publication, RLS: owner = auth.uid()
//   public.hidden(id bigserial pk) not in the publication
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import pg from 'pg'
import { cleanup, client, collector, sleep, subscribe, token, unique, within } from './support.mjs'

const db = new pg.Client({ connectionString: process.env.DATABASE_URL })
before(() => db.connect())
const clients = []
after(async () => {
  await cleanup(...clients)
  await db.end()
})

const ANN = '11111111-1111-1111-1111-111111111111'
const BOB = '22222222-2222-2222-2222-222222222222'
const userToken = (sub) => token('authenticated', 3600, { sub })

/** A client whose channel token is `key`, subscribed to `bindings`, live in Postgres. */
async function watch(bindings, key) {
  const c = key ? client(key) : client()
  clients.push(c)
  const got = collector()
  const system = collector()
  let channel = c.channel(unique('changes'))
  for (const binding of bindings) channel = channel.on('postgres_changes', binding, (p) => got.push(p))
  channel.on('system', {}, (p) => system.push(p))
  await subscribe(channel)
  const [status] = await system.until(1)
  return { channel, got, status }
}

async function live(bindings, key) {
  const w = await watch(bindings, key)
  assert.equal(w.status.message, 'Subscribed to PostgreSQL', JSON.stringify(w.status))
  return w
}

test('INSERT, UPDATE and DELETE arrive with the upstream payload', async () => {
  const { got } = await live([{ event: '*', schema: 'public', table: 'todos' }])
  const { rows } = await db.query(`insert into todos(owner, task, n) values ($1, 'milk', 1) returning id`, [ANN])
  const id = Number(rows[0].id)
  await db.query('update todos set done = true where id = $1', [id])
  await db.query('delete from todos where id = $1', [id])
  const [ins, upd, del] = await got.until(3)
  assert.equal(ins.eventType, 'INSERT')
  assert.equal(ins.schema, 'public')
  assert.equal(ins.table, 'todos')
  assert.match(ins.commit_timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
  assert.deepEqual(ins.new, { id, owner: ANN, task: 'milk', done: false, n: 1 })
  assert.deepEqual(ins.old, {})
  assert.equal(ins.errors, null)
  assert.equal(upd.eventType, 'UPDATE')
  assert.equal(upd.new.done, true)
  assert.equal(del.eventType, 'DELETE')
  assert.deepEqual(del.old, { id })
})

test('event filters and schema-wide subscriptions', async () => {
  const inserts = await live([{ event: 'INSERT', schema: 'public', table: 'todos' }])
  const schema = await live([{ event: '*', schema: 'public' }])
  const { rows } = await db.query(`insert into todos(owner, task) values ($1, 'x') returning id`, [BOB])
  await db.query('delete from todos where id = $1', [rows[0].id])
  await schema.got.until(2)
  await sleep(300)
  assert.deepEqual(inserts.got.items.map((p) => p.eventType), ['INSERT'])
  assert.deepEqual(schema.got.items.map((p) => p.eventType), ['INSERT', 'DELETE'])
})

test('each filter operator selects what Postgres would', async () => {
  const marker = Math.floor(Math.random() * 1e6)
  const filters = {
    eq: `n=eq.${marker + 2}`,
    neq: `n=neq.${marker + 2}`,
    lt: `n=lt.${marker + 2}`,
    lte: `n=lte.${marker + 2}`,
    gt: `n=gt.${marker + 2}`,
    gte: `n=gte.${marker + 2}`,
    in: `n=in.(${marker + 1},${marker + 3})`,
  }
  const watchers = {}
  for (const [op, filter] of Object.entries(filters)) {
    watchers[op] = await live([{ event: 'INSERT', schema: 'public', table: 'todos', filter }])
  }
  for (const n of [marker + 1, marker + 2, marker + 3]) {
    await db.query(`insert into todos(owner, task, n) values ($1, 'f', $2)`, [ANN, n])
  }
  const expected = { eq: [2], neq: [1, 3], lt: [1], lte: [1, 2], gt: [3], gte: [2, 3], in: [1, 3] }
  for (const [op, want] of Object.entries(expected)) {
    await watchers[op].got.until(want.length)
  }
  await sleep(300)
  for (const [op, want] of Object.entries(expected)) {
    // neq also sees rows of other tests: keep only this test's.
    const seen = watchers[op].got.items.map((p) => p.new.n - marker).filter((k) => k >= 1 && k <= 3)
    assert.deepEqual(seen, want, `filter ${op}`)
  }
})

test('a table outside the publication gets the upstream error', async () => {
  const w = await watch([{ event: '*', schema: 'public', table: 'hidden' }])
  assert.equal(w.status.status, 'error')
  assert.match(w.status.message, /^Unable to subscribe to changes with given parameters\./)
})

test('RLS: users see their own rows, anon sees none, service_role sees all', async () => {
  const binding = [{ event: '*', schema: 'public', table: 'notes' }]
  const ann = await live(binding, userToken(ANN))
  const bob = await live(binding, userToken(BOB))
  const anon = await live(binding)
  const service = await live(binding, token('service_role', 3600))
  await db.query(`insert into notes(owner, body) values ($1, 'ann 1'), ($2, 'bob 1'), ($1, 'ann 2')`, [ANN, BOB])
  await service.got.until(3)
  await ann.got.until(2)
  await bob.got.until(1)
  await sleep(500)
  assert.deepEqual(ann.got.items.map((p) => p.new.body), ['ann 1', 'ann 2'])
  assert.deepEqual(bob.got.items.map((p) => p.new.body), ['bob 1'])
  assert.equal(anon.got.items.length, 0)
  assert.deepEqual(service.got.items.map((p) => p.new.body), ['ann 1', 'bob 1', 'ann 2'])
})

test('1,000 inserts arrive in order', async () => {
  const marker = (1 + Math.floor(Math.random() * 1e5)) * 10000
  const { got } = await live([{ event: 'INSERT', schema: 'public', table: 'todos', filter: `n=gte.${marker}` }])
  for (let i = 0; i < 1000; i += 100) {
    const values = Array.from({ length: 100 }, (_, k) => `('${ANN}', 'bulk', ${marker + i + k})`).join(',')
    await db.query(`insert into todos(owner, task, n) values ${values}`)
  }
  await within(60000, '1000 changes', got.until(1000, 60000))
  assert.deepEqual(got.items.map((p) => p.new.n - marker), Array.from({ length: 1000 }, (_, i) => i))
})
