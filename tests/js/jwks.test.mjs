// Asymmetric tokens with the real supabase-js: the harness (tests/it/supabase_js.rs) starts the
// server with its keys in a JWKS file or at a JWKS URL it serves, and passes tokens signed
// with the private halves:
//   SWITCHBOARD_ES256_TOKEN, SWITCHBOARD_RS256_TOKEN   role authenticated, a kid the JWKS names
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { app, collector, subscribe, unique } from './support.mjs'

for (const alg of ['ES256', 'RS256']) {
  test(`an ${alg} token from the JWKS connects, joins, broadcasts and tracks`, async (t) => {
    const key = process.env[`SWITCHBOARD_${alg}_TOKEN`]
    assert.ok(key, `SWITCHBOARD_${alg}_TOKEN is set`)
    const c = app(t, key)
    const got = collector()
    const channel = c
      .channel(unique(alg.toLowerCase()), { config: { broadcast: { self: true, ack: true }, presence: { key: alg } } })
      .on('broadcast', { event: '*' }, (p) => got.push(p))
      .on('presence', { event: 'sync' }, () => {})
    await subscribe(channel)
    assert.equal(await channel.send({ type: 'broadcast', event: 'signed', payload: { alg } }), 'ok')
    const [message] = await got.until(1)
    assert.deepEqual(message.payload, { alg })
    assert.equal(await channel.track({ alg }), 'ok')
  })
}
