//! A simulated client speaking the real wire protocol (vsn 1.0.0 or 2.0.0 with binary
//! broadcast frames) over turmoil's TCP: joins and leaves rooms, broadcasts with and without
//! acks, tracks presence, refreshes tokens, sends malformed frames, and keeps a presence view
//! the way the Phoenix JS client does.
//!
//! Like realtime-js it reconnects: when its process is killed and restarts, when the server
//! closes or breaks its socket, and when a heartbeat goes unanswered until the next one is
//! due. A new connection (a new [`Who`]) rejoins the rooms the client was in and tracks its
//! last presence again, as applications do on `SUBSCRIBED`. It can also stall: read and
//! send nothing for a while, as a frozen tab does, which makes it a slow consumer.

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

use crate::oracle::{Ending, Event, Ms, Oracle, Who};

/// Rooms clients use: two public ones and the private one.
pub const ROOMS: [&str; 3] = ["room0", "room1", crate::db::PRIVATE_ROOM];

/// How often a client sends a heartbeat; one unanswered until the next is a timeout
/// (realtime-js's rule, on a shorter period to fit the simulation).
pub const HEARTBEAT_MS: Ms = 1_500;

/// A connection attempt (TCP and upgrade) gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1_000);

/// No connection is started this close to the end: a late joiner would race the final
/// presence reports.
const CONNECT_CUTOFF_MS: Ms = 4_000;

/// What one client does, drawn from the seed.
#[derive(Clone, Debug)]
pub struct Plan {
    pub index: usize,
    /// Nodes of the cluster: the client may land on any after a reconnect.
    pub nodes: usize,
    /// The node of its first connection.
    pub home: usize,
    pub v2: bool,
    pub seed: u64,
    /// When actions stop (simulated ms).
    pub chaos_ms: Ms,
    /// When the client reports its final views and stops.
    pub end_ms: Ms,
    /// The client's process is killed at this time (its socket drops without a close
    /// frame) and restarts after the given delay, or never.
    pub kill: Option<(Ms, Option<Ms>)>,
    /// Stalls: from, for how long. The client reads and sends nothing meanwhile.
    pub stalls: Vec<(Ms, Ms)>,
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

/// A room the client means to be in, kept across reconnects.
#[derive(Clone, Copy)]
struct Wanted {
    self_broadcast: bool,
    /// `broadcast.ack`: only acknowledged broadcasts are owed to every member.
    ack: bool,
    /// The value last tracked, tracked again after a rejoin.
    track: Option<u64>,
}

struct Channel {
    join_ref: String,
    ack: bool,
    joined: bool,
    /// Presence view: key → metas (phx_ref, tracked value).
    view: BTreeMap<String, Vec<(String, u64)>>,
    /// Diffs that arrived before the state, applied after it (as presence.js buffers).
    pending: Vec<Value>,
    have_state: bool,
    /// A leave was sent and its `phx_close` has not arrived.
    leaving: bool,
}

/// What one connection knows; a reconnect starts a fresh one.
#[derive(Default)]
struct Session {
    channels: BTreeMap<String, Channel>,
    /// Push refs awaiting an ack: ref → (room, seq).
    awaiting: BTreeMap<String, (String, u64)>,
    /// Join refs awaiting a reply: ref → (room, self).
    joining: BTreeMap<String, (String, bool)>,
    /// Pending track/untrack refs: ref → (room, value).
    tracking: BTreeMap<String, (String, Option<u64>)>,
    /// The unanswered heartbeat's ref.
    heartbeat: Option<String>,
}

struct Client {
    plan: Plan,
    oracle: Oracle,
    rng: ChaCha8Rng,
    next_ref: u64,
    /// Broadcasts sent over all lives: a broadcast is `(client, seq)` everywhere.
    seq: u64,
    who: Who,
    node: usize,
    wanted: BTreeMap<String, Wanted>,
    session: Session,
}

type Ws = tokio_tungstenite::WebSocketStream<turmoil::net::TcpStream>;

/// How a connection ended, for the client's next move.
enum Next {
    /// Connect again after a short backoff.
    Reconnect,
    /// The process restarts at this time.
    Restart(Ms),
    /// Nothing more: the run ended or the process is gone for good.
    Stop,
}

/// Runs a client to the end of the simulation.
pub async fn run(plan: Plan, oracle: Oracle) -> turmoil::Result {
    oracle.record(Event::Identity {
        client: plan.index,
        service: plan.service,
    });
    let mut client = Client {
        rng: ChaCha8Rng::seed_from_u64(plan.seed),
        who: Who {
            client: plan.index,
            life: 0,
        },
        node: plan.home,
        plan,
        oracle,
        next_ref: 0,
        seq: 0,
        wanted: BTreeMap::new(),
        session: Session::default(),
    };
    while let Some(ws) = client.connect().await {
        match client.session(ws).await {
            Next::Reconnect => {
                let backoff = 100 + client.rng.next_u64() % 400;
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
            Next::Restart(at) => client.restart(at).await,
            Next::Stop => break,
        }
    }
    Ok(())
}

impl Client {
    /// Connects to a node, retrying until the cutoff; lands on the home node or, after a
    /// reconnect, wherever the seed says (a load balancer's choice).
    async fn connect(&mut self) -> Option<Ws> {
        let vsn = if self.plan.v2 { "2.0.0" } else { "1.0.0" };
        while now() + CONNECT_CUTOFF_MS < self.plan.end_ms {
            match self.kill_due(now()) {
                None => {}
                Some(None) => return None,
                Some(Some(at)) => {
                    self.restart(at).await;
                    continue;
                }
            }
            if self.who.life > 0 && self.pick(2) == 0 {
                self.node = self.pick(self.plan.nodes);
            }
            let host = format!("node{}", self.node);
            let url = format!(
                "ws://{host}:4000/realtime/v1/websocket?apikey={}&vsn={vsn}",
                self.plan.key
            );
            let attempt = async {
                let stream = turmoil::net::TcpStream::connect((host.as_str(), 4000))
                    .await
                    .ok()?;
                let (ws, _) = tokio_tungstenite::client_async(url.as_str(), stream)
                    .await
                    .ok()?;
                Some(ws)
            };
            if let Ok(Some(ws)) = tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                self.who.life += 1;
                self.session = Session::default();
                self.oracle.record(Event::Connected {
                    who: self.who,
                    node: self.node,
                    at: now(),
                });
                return Some(ws);
            }
            let backoff = 200 + self.rng.next_u64() % 800;
            tokio::time::sleep(Duration::from_millis(backoff)).await;
        }
        None
    }

    /// The killed process starts again at `at`, remembering nothing, as realtime-js would.
    async fn restart(&mut self, at: Ms) {
        self.wanted.clear();
        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now()))).await;
    }

    /// One connection, from its rejoins to its end.
    async fn session(&mut self, mut ws: Ws) -> Next {
        let rooms: Vec<(String, Wanted)> =
            self.wanted.iter().map(|(r, w)| (r.clone(), *w)).collect();
        for (room, wanted) in rooms {
            self.join(&mut ws, room, wanted.self_broadcast, wanted.ack)
                .await;
        }
        let mut next_action = now() + 50;
        let mut next_heartbeat = now() + HEARTBEAT_MS;
        loop {
            let t = now();
            if let Some(restart) = self.kill_due(t) {
                // Abrupt: no leave, no close frame; the socket just drops.
                self.end(Ending::Killed);
                return restart.map_or(Next::Stop, Next::Restart);
            }
            if t >= self.plan.end_ms {
                self.report();
                // Stay connected a little: every client reports at the same instant, before
                // anyone's departure changes what the others see.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let _ = ws.close(None).await;
                self.end(Ending::Finished);
                return Next::Stop;
            }
            if let Some(stall) = self.stall_at(t) {
                // Frozen: nothing read, nothing sent. Timers fire late, as in a frozen tab.
                tokio::time::sleep(Duration::from_millis(stall)).await;
                next_heartbeat = now() + HEARTBEAT_MS;
                continue;
            }
            if t >= next_heartbeat {
                if self.session.heartbeat.is_some() {
                    self.end(Ending::HeartbeatTimeout);
                    return Next::Reconnect;
                }
                let ref_ = self
                    .send(&mut ws, None, "phoenix", "heartbeat", json!({}))
                    .await;
                self.session.heartbeat = Some(ref_);
                next_heartbeat = t + HEARTBEAT_MS;
            }
            if t >= next_action && t < self.plan.chaos_ms {
                self.act(&mut ws).await;
                next_action = t + 20 + self.rng.next_u64() % 300;
            }
            let wait = Duration::from_millis(20);
            match tokio::time::timeout(wait, ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    self.end(Ending::ServerClosed(code));
                    return Next::Reconnect;
                }
                Ok(Some(Ok(msg))) => self.receive(&mut ws, msg).await,
                Ok(Some(Err(_)) | None) => {
                    self.end(Ending::Broken);
                    return Next::Reconnect;
                }
                Err(_) => {}
            }
        }
    }

    /// If the process is killed by now: when it restarts, if ever. Happens once.
    fn kill_due(&mut self, t: Ms) -> Option<Option<Ms>> {
        let (at, restart) = self.plan.kill.filter(|(at, _)| t >= *at)?;
        self.plan.kill = None;
        Some(restart.map(|after| at + after))
    }

    /// The stall starting now, if any: how long it lasts.
    fn stall_at(&mut self, t: Ms) -> Option<u64> {
        let index = self.plan.stalls.iter().position(|(from, _)| t >= *from)?;
        let (from, length) = self.plan.stalls.remove(index);
        (t < from + length).then(|| from + length - t)
    }

    fn end(&mut self, why: Ending) {
        self.oracle.record(Event::Disconnected {
            who: self.who,
            at: now(),
            why,
        });
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

    /// Joins `room`; its postgres_changes binding and token come with room0, and the
    /// private room is joined with the same token.
    async fn join(&mut self, ws: &mut Ws, room: String, self_broadcast: bool, ack: bool) {
        let topic = format!("realtime:{room}");
        let mut config = json!({"config": {"broadcast": {"ack": ack, "self": self_broadcast},
            "presence": {"enabled": true, "key": format!("c{}", self.plan.index)}}});
        if room == "room0" {
            let mut binding = json!({"event": "*", "schema": "public", "table": "todos"});
            if let Some(owner) = &self.plan.filter_owner {
                binding["filter"] = json!(format!("owner=eq.{owner}"));
            }
            config["config"]["postgres_changes"] = json!([binding]);
            config["access_token"] = json!(self.plan.channel_token);
        }
        if room == crate::db::PRIVATE_ROOM {
            config["config"]["private"] = json!(true);
            config["access_token"] = json!(self.plan.channel_token);
        }
        // A join's ref is its join_ref: the ref `send` is about to use.
        let join_ref = (self.next_ref + 1).to_string();
        let sent = self
            .send(ws, Some(&join_ref), &topic, "phx_join", config)
            .await;
        debug_assert_eq!(sent, join_ref);
        self.session
            .joining
            .insert(join_ref.clone(), (room.clone(), self_broadcast));
        self.session.channels.insert(
            room,
            Channel {
                join_ref,
                ack,
                joined: false,
                view: BTreeMap::new(),
                pending: Vec::new(),
                have_state: false,
                leaving: false,
            },
        );
    }

    async fn track(&mut self, ws: &mut Ws, room: &str, join_ref: &str, value: Option<u64>) {
        let topic = format!("realtime:{room}");
        let payload = match value {
            Some(v) => json!({"type": "presence", "event": "track", "payload": {"v": v}}),
            None => json!({"type": "presence", "event": "untrack"}),
        };
        let ref_ = self
            .send(ws, Some(join_ref), &topic, "presence", payload)
            .await;
        self.session.tracking.insert(ref_, (room.to_owned(), value));
        if let Some(wanted) = self.wanted.get_mut(room) {
            wanted.track = value;
        }
    }

    async fn act(&mut self, ws: &mut Ws) {
        let room = ROOMS[self.pick(ROOMS.len())].to_owned();
        let topic = format!("realtime:{room}");
        let joined = self
            .session
            .channels
            .get(&room)
            .filter(|c| c.joined)
            .map(|c| (c.join_ref.clone(), c.ack));
        let Some((join_ref, ack)) = joined else {
            // Like realtime-js, a channel is joined again only after its leave completes.
            let busy = self.session.channels.contains_key(&room);
            if !busy {
                let (self_broadcast, ack) = (self.pick(4) == 0, self.pick(4) != 0);
                self.wanted.insert(
                    room.clone(),
                    Wanted {
                        self_broadcast,
                        ack,
                        track: None,
                    },
                );
                self.join(ws, room, self_broadcast, ack).await;
            }
            return;
        };
        match self.pick(20) {
            0..=11 => {
                self.seq += 1;
                let seq = self.seq;
                let body = json!({"from": self.who.client, "life": self.who.life, "seq": seq});
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
                    who: self.who,
                    room: room.clone(),
                    seq,
                    at: now(),
                });
                if ack {
                    self.session.awaiting.insert(ref_, (room, seq));
                }
            }
            12..=14 => {
                let value = self.rng.next_u64() % 1000;
                self.track(ws, &room, &join_ref, Some(value)).await;
            }
            15 => self.track(ws, &room, &join_ref, None).await,
            16 => {
                self.send(ws, Some(&join_ref), &topic, "phx_leave", json!({}))
                    .await;
                self.wanted.remove(&room);
                // Leaving: like realtime-js, push nothing more on this channel.
                if let Some(channel) = self.session.channels.get_mut(&room) {
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

    async fn receive(&mut self, ws: &mut Ws, msg: Message) {
        let who = self.who;
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
                        who,
                        what: format!("undecodable binary frame: {e}"),
                    });
                    return;
                }
            },
            Message::Text(text) => {
                let Ok(value) = serde_json::from_str::<Value>(&text) else {
                    self.oracle.record(Event::Broken {
                        who,
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
            "phx_reply" => {
                self.reply(ws, &room, ref_.unwrap_or_default(), &payload)
                    .await
            }
            "broadcast" => {
                let body = &payload["payload"];
                if let Some(id) = body["sql"].as_u64() {
                    let at = now();
                    self.oracle.record(Event::SqlSeen { who, room, id, at });
                    return;
                }
                let (Some(from), Some(life), Some(seq)) = (
                    body["from"].as_u64(),
                    body["life"].as_u64(),
                    body["seq"].as_u64(),
                ) else {
                    self.oracle.record(Event::Broken {
                        who,
                        what: format!("unexpected broadcast {payload}"),
                    });
                    return;
                };
                let from = Who {
                    client: from as usize,
                    life: life as u32,
                };
                self.oracle.record(Event::Delivered {
                    who,
                    room,
                    from,
                    seq,
                    at: now(),
                });
            }
            "phx_close" => {
                let current = self.session.channels.get(&room).map(|c| c.join_ref.clone());
                // v1 carries the join_ref in `ref`.
                let closing = join_ref.or(ref_);
                if current.is_some() && closing == current {
                    self.session.channels.remove(&room);
                    self.oracle.record(Event::Left {
                        who,
                        room,
                        at: now(),
                    });
                }
            }
            "presence_state" => {
                if let Some(channel) = self.session.channels.get_mut(&room) {
                    channel.view = parse_metas(&payload);
                    channel.have_state = true;
                    for diff in std::mem::take(&mut channel.pending) {
                        apply_diff(&mut channel.view, &diff);
                    }
                }
            }
            "presence_diff" => {
                if let Some(channel) = self.session.channels.get_mut(&room) {
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
                    Some(id) => self.oracle.record(Event::ChangeSeen { who, room, id }),
                    None => self.oracle.record(Event::Broken {
                        who,
                        what: format!("change without id {payload}"),
                    }),
                }
            }
            "system" if payload["status"] == "ok" && payload["extension"] == "postgres_changes" => {
                self.oracle.record(Event::Subscribed {
                    who,
                    room,
                    at: now(),
                    service: self.plan.service,
                    filter_owner: self.plan.filter_owner.clone(),
                });
            }
            "system" => {
                // A private channel whose token could not be checked again (the database
                // failed) is closed; the client joins it again later.
                let unchecked = room == crate::db::PRIVATE_ROOM
                    && payload["message"]
                        == "Realtime was unable to connect to the project database";
                if payload["status"] == "error" && !unchecked {
                    self.oracle.record(Event::Broken {
                        who,
                        what: format!("system error {payload}"),
                    });
                }
            }
            other => self.oracle.record(Event::Broken {
                who,
                what: format!("unexpected event {other}"),
            }),
        }
    }

    async fn reply(&mut self, ws: &mut Ws, room: &str, ref_: String, payload: &Value) {
        let who = self.who;
        let ok = payload["status"] == "ok";
        if self.session.heartbeat.as_ref() == Some(&ref_) {
            self.session.heartbeat = None;
        } else if let Some((room, self_broadcast)) = self.session.joining.remove(&ref_) {
            let Some(channel) = self.session.channels.get_mut(&room) else {
                return;
            };
            if !ok {
                self.session.channels.remove(&room);
                return;
            }
            channel.joined = true;
            let join_ref = channel.join_ref.clone();
            self.oracle.record(Event::Joined {
                who,
                room: room.clone(),
                self_broadcast,
                at: now(),
            });
            if let Some(value) = self.wanted.get(&room).and_then(|w| w.track) {
                self.track(ws, &room, &join_ref, Some(value)).await;
            }
        } else if let Some((room, seq)) = self.session.awaiting.remove(&ref_) {
            if ok {
                self.oracle.record(Event::Acked {
                    who,
                    room,
                    seq,
                    at: now(),
                });
            }
        } else if let Some((room, value)) = self.session.tracking.remove(&ref_) {
            if ok {
                self.oracle.record(Event::Tracking { who, room, value });
            }
        } else if !ok
            && payload["response"]["reason"] == "unmatched topic"
            && !self.session.channels.contains_key(room)
        {
            // A push that crossed the server's close of its channel (a refresh the
            // database could not check, say): the close arrived first, so this is expected.
        } else if !ok && room != "phoenix" {
            self.oracle.record(Event::Broken {
                who,
                what: format!("error reply {payload} in {room}"),
            });
        }
    }

    fn report(&self) {
        for (room, channel) in &self.session.channels {
            if channel.joined {
                let view = channel
                    .view
                    .iter()
                    .map(|(key, metas)| {
                        let mut values: Vec<u64> = metas.iter().map(|(_, v)| *v).collect();
                        values.sort_unstable();
                        (key.clone(), values)
                    })
                    .collect();
                self.oracle.record(Event::View {
                    who: self.who,
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
