// The Inspector page (GET /) in a real browser: Debian's chromium, headless, driven by
// playwright-core. tests/it/inspector.rs starts switchboard in development mode (no
// --jwt-secret) with a throwaway Postgres whose public.todos is published, and passes
// SWITCHBOARD_URL and DATABASE_URL. Screenshots go to tests/js/results/.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdirSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { chromium } from 'playwright-core'
import pg from 'pg'

function required(name) {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set: tests/it/inspector.rs runs this file`)
  return value
}

const BASE = required('SWITCHBOARD_URL').replace(/\/+$/, '')
const DATABASE_URL = required('DATABASE_URL')
const RESULTS = fileURLToPath(new URL('./results/', import.meta.url))
const RUN = `${process.env.SWITCHBOARD_TEST_RUNTIME ?? 'tokio'}-${process.env.SWITCHBOARD_TEST_SHARDS ?? '1'}`

const text = (page, id) => page.locator(`#${id}`).textContent()
const claims = (token) => JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString())

test('two pages share a channel: broadcasts, presence, postgres changes and server figures', async (t) => {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: ['--no-sandbox'] })
  t.after(() => browser.close())
  const errors = []
  const open = async () => {
    const page = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage()
    page.setDefaultTimeout(15_000)
    page.on('pageerror', (e) => errors.push(e.message))
    await page.goto(`${BASE}/`)
    assert.equal(await page.title(), 'switchboard inspector')
    return page
  }
  const alice = await open()
  const bob = await open()

  // Development mode: the anon key is filled in; bob mints a user's token instead.
  await alice.waitForFunction(() => document.getElementById('key').value.startsWith('ey'))
  assert.equal(claims(await alice.inputValue('#key')).role, 'anon')
  await bob.waitForFunction(() => document.getElementById('key').value.startsWith('ey'))
  await bob.selectOption('#role', 'authenticated')
  await bob.fill('#sub', 'user-bob')
  await bob.click('#mint')
  await bob.waitForFunction(() => document.getElementById('status').textContent.startsWith('minted'))
  const minted = claims(await bob.inputValue('#key'))
  assert.equal(minted.role, 'authenticated')
  assert.equal(minted.sub, 'user-bob')

  for (const [page, name] of [[alice, 'alice'], [bob, 'bob']]) {
    await page.fill('#topic', 'inspector-room')
    await page.fill('#presence-key', name)
    await page.check('#pg-on')
    await page.fill('#pg-table', 'todos')
    await page.selectOption('#pg-event', 'INSERT')
    await page.click('#join')
    await page.waitForFunction(() => document.getElementById('status').textContent === 'joined realtime:inspector-room')
    await page.fill('#track-state', JSON.stringify({ name }))
    await page.click('#track')
  }

  // Each sees both in the presence list.
  for (const page of [alice, bob]) {
    for (const name of ['alice', 'bob']) {
      await page.locator('#presence li', { hasText: `"name":"${name}"` }).waitFor()
    }
  }

  // Alice sends; bob's page shows it, and alice's too (`self` is on by default).
  await alice.fill('#event', 'greeting')
  await alice.fill('#payload', '{"text": "hello from alice"}')
  await alice.click('#send')
  for (const page of [bob, alice]) {
    const received = page.locator('#log li.broadcast', { hasText: 'hello from alice' })
    await received.waitFor()
    assert.match(await received.locator('time').textContent(), /^\d\d:\d\d:\d\d\.\d{3}$/)
    assert.match(await received.textContent(), /greeting/)
  }

  // A row inserted by the test reaches both pages.
  const db = new pg.Client({ connectionString: DATABASE_URL })
  await db.connect()
  t.after(() => db.end())
  await db.query("insert into public.todos (task) values ('inserted by the test')")
  for (const page of [alice, bob]) {
    const change = page.locator('#log li.postgres_changes', { hasText: 'inserted by the test' })
    await change.waitFor()
    assert.match(await change.textContent(), /INSERT public\.todos/)
  }

  // The server's figures: two sockets in one channel each, and the change stream's lag.
  await alice.waitForFunction(() => document.getElementById('stat-connections').textContent === '2')
  assert.equal(await text(alice, 'stat-channels'), '2')
  await alice.waitForFunction(() => /^\d+$/.test(document.getElementById('stat-out').textContent))
  await alice.waitForFunction(() => / B/.test(document.getElementById('stat-lag').textContent))

  mkdirSync(RESULTS, { recursive: true })
  await alice.screenshot({ path: `${RESULTS}inspector-${RUN}-alice.png`, fullPage: true })
  await bob.screenshot({ path: `${RESULTS}inspector-${RUN}-bob.png`, fullPage: true })

  // Bob leaves: he goes from alice's list.
  await bob.click('#leave')
  await alice.waitForFunction(() => !document.getElementById('presence').textContent.includes('"bob"'))
  assert.match(await text(alice, 'presence'), /"name":"alice"/)

  // A private channel: no policy on realtime.messages lets bob in; service_role may.
  await bob.fill('#topic', 'private-room')
  await bob.check('#private')
  await bob.uncheck('#pg-on')
  await bob.click('#join')
  await bob.waitForFunction(() => document.getElementById('status').textContent.startsWith('join refused'))
  assert.match(await text(bob, 'log'), /join refused/)
  await alice.selectOption('#role', 'service_role')
  await alice.click('#mint')
  await alice.waitForFunction(() => document.getElementById('status').textContent.startsWith('minted a service_role'))
  await alice.fill('#topic', 'private-room')
  await alice.check('#private')
  await alice.uncheck('#pg-on')
  await alice.click('#join')
  await alice.waitForFunction(() => document.getElementById('status').textContent === 'joined realtime:private-room')
  await alice.click('#send')
  await alice.locator('#log li.broadcast', { hasText: 'hello from alice' }).nth(1).waitFor()
  assert.deepEqual(errors, [])
})
