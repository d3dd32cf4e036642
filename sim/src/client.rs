//! A simulated client speaking the real wire protocol (vsn 1.0.0 or 2.0.0 with binary
//! broadcast frames) over turmoil's TCP: joins and leaves rooms, broadcasts with acks,
//! tracks presence, sends malformed frames, and keeps a presence view the way the
//! Phoenix JS client does.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde_json::{json, Value};
use switchboard_engine::protocol::{
    decode_user_broadcast, encode_user_broadcast_push, UserBroadcastPush,
};
use switchboard_engine::Encoding;
use tokio_tungstenite::tungstenite::Message;

use crate::oracle::{Event, Ms, Oracle};

/// Rooms clients use.
pub const ROOMS: [&str; 2] = ["room0", "room1"];

/// What one client does, drawn from the seed.
#[derive(Clone, Debug)]
pub struct Plan {
    pub index: usize,
    pub node: String,
    pub v2: bool,
    pub seed: u64,
    /// When actions stop (simulated ms).
    pub chaos_ms: Ms,
    /// When the client reports its final views and stops.
    pub end_ms: Ms,
    /// If set, the client crashes (drops its socket without a word) at this time.
    pub crash_at: Option<Ms>,
    pub key: String,
    /// The channel token for postgres_changes in room0: `sub` is `c<index>`.
    pub channel_token: String,
    /// Whether that token is service_role (bypasses RLS).
    pub service: bool,
    /// The binding's filter: `owner=eq.<this>`, if any.
    pub filter_owner: Option<String>,
}

fn now() -> Ms {
    turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64)
}

struct Channel {
    join_ref: String,
    joined: bool,
    /// Presence view: key → metas (phx_ref, tracked value).
    view: BTreeMap<String, Vec<(String, u64)>>,
    /// Diffs that arrived before the state, applied after it (as presence.js buffers).
    pending: Vec<Value>,
    have_state: bool,
    /// A leave was sent and its `phx_close` has not arrived.
    leaving: bool,
}

struct Client {
    plan: Plan,
    oracle: Oracle,
    rng: ChaCha8Rng,
    next_ref: u64,
    seq: u64,
    channels: BTreeMap<String, Channel>,
    /// Push refs awaiting an ack: ref → (room, seq).
    awaiting: BTreeMap<String, (String, u64)>,
    /// Join refs awaiting a reply: ref → (room, self).
    joining: BTreeMap<String, (String, bool)>,
    /// Pending track/untrack refs: ref → (room, value).
    tracking: BTreeMap<String, (String, Option<u64>)>,
}

type Ws = tokio_tungstenite::WebSocketStream<turmoil::net::TcpStream>;

/// Runs a client to the end of the simulation.
pub async fn run(plan: Plan, oracle: Oracle) -> turmoil::Result {
    let mut client = Client {
        rng: ChaCha8Rng::seed_from_u64(plan.seed),
        plan,
        oracle,
        next_ref: 0,
        seq: 0,
        channels: BTreeMap::new(),
        awaiting: BTreeMap::new(),
        joining: BTreeMap::new(),
        tracking: BTreeMap::new(),
    };
    let Some(mut ws) = client.connect().await else {
        client.oracle.record(Event::Disconnected {
            client: client.plan.index,
            at: now(),
        });
        return Ok(());
    };
    let mut next_action = now() + 50;
    let mut next_heartbeat = now() + 10_000;
    loop {
        let t = now();
        if client.plan.crash_at.is_some_and(|c| t >= c) {
            // Abrupt: no leave, no close frame.
            client.oracle.record(Event::Disconnected {
                client: client.plan.index,
                at: t,
            });
            return Ok(());
        }
        if t >= client.plan.end_ms {
            client.report();
            // Stay connected a little: every client reports at the same instant, before
            // anyone's departure changes what the others see.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = ws.close(None).await;
            return Ok(());
        }
        if t >= next_heartbeat {
            client
                .send(&mut ws, None, "phoenix", "heartbeat", json!({}))
                .await;
            next_heartbeat = t + 10_000;
        }
        if t >= next_action && t < client.plan.chaos_ms {
            client.act(&mut ws).await;
            next_action = t + 20 + client.rng.next_u64() % 300;
        }
        let wait = Duration::from_millis(20);
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(Some(Ok(msg))) => client.receive(msg),
            Ok(Some(Err(_)) | None) => {
                client.oracle.record(Event::Disconnected {
                    client: client.plan.index,
                    at: now(),
                });
                return Ok(());
            }
            Err(_) => {}
        }
    }
}

impl Client {
    async fn connect(&mut self) -> Option<Ws> {
        let vsn = if self.plan.v2 { "2.0.0" } else { "1.0.0" };
        let url = format!(
            "ws://{}:4000/realtime/v1/websocket?apikey={}&vsn={vsn}",
            self.plan.node, self.plan.key
        );
        for _ in 0..50 {
            if let Ok(stream) =
                turmoil::net::TcpStream::connect((self.plan.node.as_str(), 4000)).await
            {
                if let Ok((ws, _)) = tokio_tungstenite::client_async(url.as_str(), stream).await {
                    return Some(ws);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    async fn send(
        &mut self,
        ws: &mut Ws,
        join_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> String {
        let ref_ = self.next_ref();
        let text = if self.plan.v2 {
            json!([join_ref, ref_, topic, event, payload]).to_string()
        } else {
            json!({"topic": topic, "event": event, "payload": payload, "ref": ref_, "join_ref": join_ref}).to_string()
        };
        let _ = ws.send(Message::Text(text.into())).await;
        ref_
    }

    fn pick(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n as u64) as usize
    }

    async fn act(&mut self, ws: &mut Ws) {
        let room = ROOMS[self.pick(ROOMS.len())].to_owned();
        let topic = format!("realtime:{room}");
        let joined = self
            .channels
            .get(&room)
            .filter(|c| c.joined)
            .map(|c| c.join_ref.clone());
        let Some(join_ref) = joined else {
            // Like realtime-js, a channel is joined again only after its leave completes.
            let leaving = self.channels.get(&room).is_some_and(|c| c.leaving);
            if !leaving && !self.joining.values().any(|(r, _)| *r == room) {
                let self_broadcast = self.pick(4) == 0;
                let mut config = json!({"config": {"broadcast": {"ack": true, "self": self_broadcast},
                    "presence": {"enabled": true, "key": format!("c{}", self.plan.index)}}});
                if room == "room0" {
                    let mut binding = json!({"event": "*", "schema": "public", "table": "todos"});
                    if let Some(owner) = &self.plan.filter_owner {
                        binding["filter"] = json!(format!("owner=eq.{owner}"));
                    }
                    config["config"]["postgres_changes"] = json!([binding]);
                    config["access_token"] = json!(self.plan.channel_token);
                }
                // A join's ref is its join_ref: the ref `send` is about to use.
                let join_ref = (self.next_ref + 1).to_string();
                let sent = self
                    .send(ws, Some(&join_ref), &topic, "phx_join", config)
                    .await;
                debug_assert_eq!(sent, join_ref);
                self.joining
                    .insert(join_ref.clone(), (room.clone(), self_broadcast));
                self.channels.insert(
                    room,
                    Channel {
                        join_ref,
                        joined: false,
                        view: BTreeMap::new(),
                        pending: Vec::new(),
                        have_state: false,
                        leaving: false,
                    },
                );
            }
            return;
        };
        match self.pick(20) {
            0..=11 => {
                self.seq += 1;
                let seq = self.seq;
                let body = json!({"from": self.plan.index, "seq": seq});
                let ref_ = if self.plan.v2 && self.pick(2) == 0 {
                    let ref_ = self.next_ref();
                    let push = UserBroadcastPush {
                        event: "m".into(),
                        metadata: None,
                        encoding: Encoding::Json,
                        payload: Bytes::from(body.to_string()),
                    };
                    let frame =
                        encode_user_broadcast_push(Some(&join_ref), Some(&ref_), &topic, &push)
                            .expect("short");
                    let _ = ws.send(Message::Binary(frame)).await;
                    ref_
                } else {
                    self.send(
                        ws,
                        Some(&join_ref),
                        &topic,
                        "broadcast",
                        json!({"type": "broadcast", "event": "m", "payload": body}),
                    )
                    .await
                };
                self.oracle.record(Event::Sent {
                    client: self.plan.index,
                    room: room.clone(),
                    seq,
                    at: now(),
                });
                self.awaiting.insert(ref_, (room, seq));
            }
            12..=14 => {
                let value = self.rng.next_u64() % 1000;
                let ref_ = self
                    .send(
                        ws,
                        Some(&join_ref),
                        &topic,
                        "presence",
                        json!({"type": "presence", "event": "track", "payload": {"v": value}}),
                    )
                    .await;
                self.tracking.insert(ref_, (room, Some(value)));
            }
            15 => {
                let ref_ = self
                    .send(
                        ws,
                        Some(&join_ref),
                        &topic,
                        "presence",
                        json!({"type": "presence", "event": "untrack"}),
                    )
                    .await;
                self.tracking.insert(ref_, (room, None));
            }
            16 => {
                self.send(ws, Some(&join_ref), &topic, "phx_leave", json!({}))
                    .await;
                // Leaving: like realtime-js, push nothing more on this channel.
                if let Some(channel) = self.channels.get_mut(&room) {
                    channel.joined = false;
                    channel.leaving = true;
                }
            }
            17 if self.pick(2) == 0 => {
                // Token refresh: the same claims, a later expiry. Channels with postgres
                // bindings resubscribe and say so again.
                let exp = 4_000_000_000u64 + self.rng.next_u64() % 1_000_000;
                let role = if self.plan.service {
                    "service_role"
                } else {
                    "authenticated"
                };
                let claims =
                    json!({"role": role, "sub": format!("c{}", self.plan.index), "exp": exp});
                let token = switchboard_engine::auth::sign(crate::SECRET, &claims);
                self.send(
                    ws,
                    Some(&join_ref),
                    &topic,
                    "access_token",
                    json!({"access_token": token}),
                )
                .await;
            }
            17 => {
                let garbage = match self.pick(3) {
                    0 => Message::Text("{not json".into()),
                    1 => Message::Binary(Bytes::from_static(&[3, 200, 1, 2])),
                    _ => Message::Text(r#"[null,"x","realtime:room0","phx_join"]"#.into()),
                };
                let _ = ws.send(garbage).await;
            }
            _ => {
                self.send(ws, None, "phoenix", "heartbeat", json!({})).await;
            }
        }
    }

    fn receive(&mut self, msg: Message) {
        let index = self.plan.index;
        let (topic, event, payload, ref_, join_ref) = match msg {
            Message::Binary(data) => match decode_user_broadcast(&data) {
                Ok(ub) => {
                    let payload = serde_json::from_slice(&ub.payload).unwrap_or(Value::Null);
                    (
                        ub.topic,
                        "broadcast".to_owned(),
                        json!({"payload": payload}),
                        None,
                        None,
                    )
                }
                Err(e) => {
                    self.oracle.record(Event::Broken {
                        client: index,
                        what: format!("undecodable binary frame: {e}"),
                    });
                    return;
                }
            },
            Message::Text(text) => {
                let Ok(value) = serde_json::from_str::<Value>(&text) else {
                    self.oracle.record(Event::Broken {
                        client: index,
                        what: format!("non-JSON frame {text}"),
                    });
                    return;
                };
                let s = |v: &Value| v.as_str().map(str::to_owned);
                if self.plan.v2 {
                    (
                        s(&value[2]).unwrap_or_default(),
                        s(&value[3]).unwrap_or_default(),
                        value[4].clone(),
                        s(&value[1]),
                        s(&value[0]),
                    )
                } else {
                    (
                        s(&value["topic"]).unwrap_or_default(),
                        s(&value["event"]).unwrap_or_default(),
                        value["payload"].clone(),
                        s(&value["ref"]),
                        None,
                    )
                }
            }
            _ => return,
        };
        let room = topic.strip_prefix("realtime:").unwrap_or(&topic).to_owned();
        match event.as_str() {
            "phx_reply" => self.reply(&room, ref_.unwrap_or_default(), &payload),
            "broadcast" => {
                let body = &payload["payload"];
                let (Some(from), Some(seq)) = (body["from"].as_u64(), body["seq"].as_u64()) else {
                    self.oracle.record(Event::Broken {
                        client: index,
                        what: format!("unexpected broadcast {payload}"),
                    });
                    return;
                };
                self.oracle.record(Event::Delivered {
                    client: index,
                    room,
                    from: from as usize,
                    seq,
                    at: now(),
                });
            }
            "phx_close" => {
                let current = self.channels.get(&room).map(|c| c.join_ref.clone());
                // v1 carries the join_ref in `ref`.
                let closing = join_ref.or(ref_);
                if current.is_some() && closing == current {
                    self.channels.remove(&room);
                    self.oracle.record(Event::Left {
                        client: index,
                        room,
                        at: now(),
                    });
                }
            }
            "presence_state" => {
                if let Some(channel) = self.channels.get_mut(&room) {
                    channel.view = parse_metas(&payload);
                    channel.have_state = true;
                    for diff in std::mem::take(&mut channel.pending) {
                        apply_diff(&mut channel.view, &diff);
                    }
                }
            }
            "presence_diff" => {
                if let Some(channel) = self.channels.get_mut(&room) {
                    if channel.have_state {
                        apply_diff(&mut channel.view, &payload);
                    } else {
                        channel.pending.push(payload);
                    }
                }
            }
            "postgres_changes" => {
                let data = &payload["data"];
                let id = data["record"]["id"]
                    .as_u64()
                    .or_else(|| data["old_record"]["id"].as_u64());
                match id {
                    Some(id) => self.oracle.record(Event::ChangeSeen {
                        client: index,
                        room,
                        id,
                    }),
                    None => self.oracle.record(Event::Broken {
                        client: index,
                        what: format!("change without id {payload}"),
                    }),
                }
            }
            "system" if payload["status"] == "ok" && payload["extension"] == "postgres_changes" => {
                self.oracle.record(Event::Subscribed {
                    client: index,
                    room,
                    at: now(),
                    service: self.plan.service,
                    filter_owner: self.plan.filter_owner.clone(),
                });
            }
            "system" => {
                if payload["status"] == "error" {
                    self.oracle.record(Event::Broken {
                        client: index,
                        what: format!("system error {payload}"),
                    });
                }
            }
            other => self.oracle.record(Event::Broken {
                client: index,
                what: format!("unexpected event {other}"),
            }),
        }
    }

    fn reply(&mut self, room: &str, ref_: String, payload: &Value) {
        let index = self.plan.index;
        let ok = payload["status"] == "ok";
        if let Some((room, self_broadcast)) = self.joining.remove(&ref_) {
            if ok {
                if let Some(channel) = self.channels.get_mut(&room) {
                    channel.joined = true;
                }
                self.oracle.record(Event::Joined {
                    client: index,
                    room,
                    self_broadcast,
                    at: now(),
                });
            } else {
                self.channels.remove(&room);
            }
        } else if let Some((room, seq)) = self.awaiting.remove(&ref_) {
            if ok {
                self.oracle.record(Event::Acked {
                    client: index,
                    room,
                    seq,
                });
            }
        } else if let Some((room, value)) = self.tracking.remove(&ref_) {
            if ok {
                self.oracle.record(Event::Tracking {
                    client: index,
                    room,
                    value,
                });
            }
        } else if !ok && room != "phoenix" {
            self.oracle.record(Event::Broken {
                client: index,
                what: format!("error reply {payload} in {room}"),
            });
        }
    }

    fn report(&self) {
        for (room, channel) in &self.channels {
            if channel.joined {
                let view = channel
                    .view
                    .iter()
                    .map(|(key, metas)| (key.clone(), metas.iter().map(|(_, v)| *v).collect()))
                    .collect();
                self.oracle.record(Event::View {
                    client: self.plan.index,
                    room: room.clone(),
                    view,
                });
            }
        }
    }
}

fn parse_metas(object: &Value) -> BTreeMap<String, Vec<(String, u64)>> {
    let mut out = BTreeMap::new();
    for (key, value) in object.as_object().into_iter().flatten() {
        let metas = value["metas"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["phx_ref"].as_str().unwrap_or_default().to_owned(),
                    m["v"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect();
        out.insert(key.clone(), metas);
    }
    out
}

/// presence.js `syncDiff`: joins replace metas with the same ref, leaves remove by ref.
fn apply_diff(view: &mut BTreeMap<String, Vec<(String, u64)>>, diff: &Value) {
    for (key, joined) in parse_metas(&diff["joins"]) {
        let metas = view.entry(key).or_default();
        let refs: Vec<&String> = joined.iter().map(|(r, _)| r).collect();
        metas.retain(|(r, _)| !refs.contains(&r));
        metas.extend(joined);
    }
    for (key, left) in parse_metas(&diff["leaves"]) {
        if let Some(metas) = view.get_mut(&key) {
            metas.retain(|(r, _)| !left.iter().any(|(l, _)| l == r));
            if metas.is_empty() {
                view.remove(&key);
            }
        }
    }
}
