//! Arbitrary frames from one client, through the whole engine: the decoders of vsn 1.0.0
//! and 2.0.0 text frames and of binary broadcast frames, and every handler behind them.
//! Another member of the same channel must still get a broadcast afterwards.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchboard_engine::{
    auth, Config, ConnId, ConnectParams, Engine, Input, Instant, NodeId, Now, Output, WsMessage,
};

const SECRET: &str = "fuzz-secret-fuzz-secret-fuzz-secret-000";

fn connect(engine: &mut Engine, now: Now, conn: u64, vsn: &str) {
    let key = auth::sign(SECRET, &serde_json::json!({"role": "anon", "exp": 4_000_000_000u64}));
    engine.handle(
        now,
        Input::Connect {
            conn: ConnId(conn),
            params: ConnectParams {
                vsn: Some(vsn.into()),
                apikey: Some(key),
                x_api_key: None,
            },
        },
    );
}

fn text(engine: &mut Engine, now: Now, conn: u64, frame: &str) {
    let msg = WsMessage::Text(Bytes::copy_from_slice(frame.as_bytes()));
    engine.handle(now, Input::Frame { conn: ConnId(conn), msg });
}

fuzz_target!(|data: &[u8]| {
    let config = Config {
        jwt_secret: SECRET.into(),
        events_per_sec_max: 0,
        joins_per_sec_max: 0,
        ..Config::default()
    };
    let mut engine = Engine::new(config, NodeId(1), 7);
    let mut now = Now { mono: Instant(0), unix_ms: 1_700_000_000_000 };
    let attacker_v1 = data.first().is_some_and(|b| b & 1 == 1);
    connect(&mut engine, now, 1, if attacker_v1 { "1.0.0" } else { "2.0.0" });
    connect(&mut engine, now, 2, "2.0.0");
    text(&mut engine, now, 2, r#"["1","1","realtime:r","phx_join",{"config":{}}]"#);
    let join = if attacker_v1 {
        r#"{"topic":"realtime:r","event":"phx_join","payload":{"config":{"broadcast":{"self":true}}},"ref":"1"}"#
    } else {
        r#"["1","1","realtime:r","phx_join",{"config":{"broadcast":{"self":true}}}]"#
    };
    text(&mut engine, now, 1, join);
    // Frames are separated by 0xFF; a frame's first byte says text (even) or binary (odd).
    for frame in data.get(1..).unwrap_or_default().split(|&b| b == 0xFF) {
        let Some((&kind, body)) = frame.split_first() else {
            continue;
        };
        let body = Bytes::copy_from_slice(body);
        let msg = if kind % 2 == 0 {
            WsMessage::Text(body)
        } else {
            WsMessage::Binary(body)
        };
        engine.handle(now, Input::Frame { conn: ConnId(1), msg });
        now.mono = now.mono.plus_ms(u64::from(kind) * 7);
        now.unix_ms += u64::from(kind) * 7;
        engine.handle(now, Input::Tick);
        while engine.poll_output().is_some() {}
    }
    // The other member is undisturbed: its broadcast still goes out.
    text(
        &mut engine,
        now,
        2,
        r#"["1","2","realtime:r","broadcast",{"type":"broadcast","event":"e","payload":{}}]"#,
    );
    let mut replied = false;
    while let Some(output) = engine.poll_output() {
        replied |= matches!(output, Output::Send { .. });
    }
    assert!(replied, "a member's broadcast still gets its reply or delivery");
});
