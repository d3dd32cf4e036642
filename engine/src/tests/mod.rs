//! Scenario tests on virtual time: several simulated connections driven through
//! `handle`/`poll_output`, with every output decoded as a client would see it.

mod authz;
mod broadcast;
mod changes;
mod channels;
mod limits;
mod presence;
mod robustness;

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::protocol::{decode_user_broadcast, UserBroadcast, Vsn};
use crate::{
    auth, Config, ConnId, ConnectParams, Engine, Input, Instant, NodeId, Now, Output, ReqId,
    RestRequest, WsMessage,
};

pub(crate) const SECRET: &str = "test-secret-test-secret-test-secret";
/// 2023-11-14T22:13:20Z: tokens are minted relative to this wall clock.
pub(crate) const EPOCH_MS: u64 = 1_700_000_000_000;

/// A frame as a client decodes it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Received {
    Text {
        join_ref: Option<String>,
        ref_: Option<String>,
        topic: String,
        event: String,
        payload: Value,
    },
    Binary(UserBroadcast),
}

impl Received {
    pub(crate) fn event(&self) -> &str {
        match self {
            Received::Text { event, .. } => event,
            Received::Binary(_) => "broadcast",
        }
    }

    pub(crate) fn payload(&self) -> &Value {
        match self {
            Received::Text { payload, .. } => payload,
            Received::Binary(_) => panic!("binary frame has no JSON envelope"),
        }
    }
}

pub(crate) struct TestEngine {
    pub(crate) engine: Engine,
    pub(crate) now: Now,
    next_conn: u64,
    next_ref: u64,
    vsn: BTreeMap<ConnId, Vsn>,
    inbox: BTreeMap<ConnId, Vec<Received>>,
    pub(crate) closed: BTreeMap<ConnId, (u16, &'static str)>,
    pub(crate) rejected: BTreeMap<ConnId, (u16, Value)>,
    pub(crate) replies: BTreeMap<ReqId, (u16, Bytes)>,
    /// Every Send output, for tests about encoding and sharing.
    pub(crate) sends: Vec<(crate::To, WsMessage)>,
    /// Visibility queries asked, in order.
    pub(crate) visibility: Vec<crate::changes::VisibilityQuery>,
    /// WAL progress reported, in order.
    pub(crate) progress: Vec<u64>,
    /// Authorization questions asked and not yet answered by [`TestEngine::authorize`].
    pub(crate) authz: Vec<crate::authz::AuthzQuery>,
    /// Publication re-reads asked for.
    pub(crate) refreshes: usize,
    /// JWKS fetches asked for.
    pub(crate) jwks_refreshes: usize,
    /// Rooms gaining their first or losing their last member ([`Output::Interest`]).
    pub(crate) interest: Vec<(crate::RoomKey, bool)>,
    /// Messages for peer replicas, in order.
    pub(crate) to_peers: Vec<(Option<NodeId>, crate::PeerMsg)>,
    /// Join refs of each connection's channels, by topic.
    join_refs: BTreeMap<(ConnId, String), String>,
}

impl TestEngine {
    pub(crate) fn new() -> Self {
        Self::with_config(test_config())
    }

    pub(crate) fn with_config(config: Config) -> Self {
        Self::node(config, NodeId(1))
    }

    /// An engine as replica `node`, for multi-replica scenarios.
    pub(crate) fn node(config: Config, node: NodeId) -> Self {
        let now = Now {
            mono: Instant(1_000),
            unix_ms: EPOCH_MS,
        };
        TestEngine {
            engine: Engine::new(config, node, 42 + node.0),
            now,
            next_conn: 0,
            next_ref: 0,
            vsn: BTreeMap::new(),
            inbox: BTreeMap::new(),
            closed: BTreeMap::new(),
            rejected: BTreeMap::new(),
            replies: BTreeMap::new(),
            sends: Vec::new(),
            to_peers: Vec::new(),
            visibility: Vec::new(),
            progress: Vec::new(),
            authz: Vec::new(),
            refreshes: 0,
            jwks_refreshes: 0,
            interest: Vec::new(),
            join_refs: BTreeMap::new(),
        }
    }

    /// A token for `role` expiring `secs` from now.
    pub(crate) fn token(&self, role: &str, secs: i64) -> String {
        let exp = (self.now.unix_ms / 1000) as i64 + secs;
        auth::sign(SECRET, &json!({ "role": role, "exp": exp, "sub": role }))
    }

    /// Joins refused so far, by reason label, the reasons with none left out.
    pub(crate) fn refused(&self) -> Vec<(&'static str, u64)> {
        let counts = self.engine.stats().joins_refused;
        crate::JoinRefusal::ALL
            .iter()
            .filter(|why| counts[**why as usize] > 0)
            .map(|why| (why.label(), counts[*why as usize]))
            .collect()
    }

    pub(crate) fn handle(&mut self, input: Input) {
        self.engine.handle(self.now, input);
        self.drain();
    }

    /// Moves both clocks forward, in steps no larger than the next deadline, firing every
    /// timer on the way. Bounded: a livelock fails instead of hanging.
    pub(crate) fn advance(&mut self, ms: u64) {
        let target = self.now.mono.plus_ms(ms);
        for _ in 0..100_000 {
            let next = self
                .engine
                .poll_timeout()
                .filter(|t| *t <= target)
                .unwrap_or(target);
            let step = next.since(self.now.mono);
            self.now.mono = next.max(self.now.mono);
            self.now.unix_ms += step;
            self.handle(Input::Tick);
            if self.now.mono >= target && self.engine.poll_timeout().is_none_or(|t| t > target) {
                return;
            }
        }
        panic!("timers did not settle within 100000 steps");
    }

    pub(crate) fn try_connect(&mut self, vsn: Option<&str>, token: Option<String>) -> ConnId {
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        let params = ConnectParams {
            vsn: vsn.map(str::to_owned),
            apikey: token,
            x_api_key: None,
        };
        if let Some(v) = Vsn::parse(vsn) {
            self.vsn.insert(conn, v);
        }
        self.handle(Input::Connect { conn, params });
        conn
    }

    pub(crate) fn connect(&mut self, vsn: Vsn) -> ConnId {
        let token = self.token("anon", 3600);
        let conn = self.try_connect(Some(vsn_str(vsn)), Some(token));
        assert!(
            !self.rejected.contains_key(&conn),
            "connect refused: {:?}",
            self.rejected[&conn]
        );
        conn
    }

    pub(crate) fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    /// Sends a text frame in the connection's serializer.
    pub(crate) fn send(
        &mut self,
        conn: ConnId,
        join_ref: Option<&str>,
        ref_: &str,
        topic: &str,
        event: &str,
        payload: Value,
    ) {
        let text = match self.vsn[&conn] {
            Vsn::V1 => {
                json!({"topic": topic, "event": event, "payload": payload, "ref": ref_, "join_ref": join_ref})
            }
            Vsn::V2 => json!([join_ref, ref_, topic, event, payload]),
        };
        self.raw(conn, WsMessage::Text(Bytes::from(text.to_string())));
    }

    pub(crate) fn raw(&mut self, conn: ConnId, msg: WsMessage) {
        self.handle(Input::Frame { conn, msg });
    }

    /// Joins `realtime:<sub>` with `config`; returns the reply payload.
    pub(crate) fn join_with(&mut self, conn: ConnId, sub: &str, payload: Value) -> Value {
        let ref_ = self.next_ref();
        let topic = format!("realtime:{sub}");
        self.send(conn, Some(&ref_), &ref_, &topic, "phx_join", payload);
        self.join_refs.insert((conn, topic.clone()), ref_.clone());
        let is_reply = |r: &Received| matches!(r, Received::Text { event, ref_: Some(r), .. } if event == "phx_reply" && *r == ref_);
        let inbox = self.inbox.entry(conn).or_default();
        let index = inbox
            .iter()
            .position(is_reply)
            .unwrap_or_else(|| panic!("no join reply for {topic}"));
        // Frames before the reply (a duplicate join's phx_close) are the test's to see.
        let reply = inbox.remove(index);
        reply.payload().clone()
    }

    /// Records the join ref of a join sent by hand, for later pushes.
    pub(crate) fn remember_join(&mut self, conn: ConnId, topic: &str, ref_: &str) {
        self.join_refs
            .insert((conn, topic.to_owned()), ref_.to_owned());
    }

    pub(crate) fn join(&mut self, conn: ConnId, sub: &str, config: Value) -> Value {
        let reply = self.join_with(conn, sub, json!({ "config": config }));
        assert_eq!(reply["status"], "ok", "join {sub}: {reply}");
        reply
    }

    pub(crate) fn join_ref(&self, conn: ConnId, sub: &str) -> String {
        self.join_refs[&(conn, format!("realtime:{sub}"))].clone()
    }

    /// Pushes `event` on a joined channel; returns the ref used.
    pub(crate) fn push(&mut self, conn: ConnId, sub: &str, event: &str, payload: Value) -> String {
        let ref_ = self.next_ref();
        let join_ref = self.join_ref(conn, sub);
        self.send(
            conn,
            Some(&join_ref),
            &ref_,
            &format!("realtime:{sub}"),
            event,
            payload,
        );
        ref_
    }

    /// A realtime-js style broadcast: `channel.send({type:'broadcast', event, payload})`.
    pub(crate) fn broadcast(
        &mut self,
        conn: ConnId,
        sub: &str,
        event: &str,
        payload: Value,
    ) -> String {
        self.push(
            conn,
            sub,
            "broadcast",
            json!({"type": "broadcast", "event": event, "payload": payload}),
        )
    }

    pub(crate) fn rest(&mut self, request: RestRequest) -> (u16, Bytes) {
        let req = self.rest_later(request);
        self.replies[&req].clone()
    }

    /// Sends a REST request that may be answered later; its id.
    pub(crate) fn rest_later(&mut self, request: RestRequest) -> ReqId {
        let req = ReqId(self.replies.len() as u64 + 1000);
        self.handle(Input::Rest { req, request });
        req
    }

    /// Answers every authorization question asked so far with `policy` (`None` as if the
    /// database were down), until no more are asked.
    pub(crate) fn authorize(
        &mut self,
        policy: impl Fn(&crate::authz::AuthzQuery) -> Option<crate::authz::AuthzAnswer>,
    ) {
        while !self.authz.is_empty() {
            for query in std::mem::take(&mut self.authz) {
                let answer = policy(&query);
                self.handle(Input::Authorized {
                    id: query.id,
                    answer,
                });
            }
        }
    }

    /// Puts a frame back at the end of `conn`'s inbox.
    pub(crate) fn requeue(&mut self, conn: ConnId, frame: Received) {
        self.inbox.entry(conn).or_default().push(frame);
    }

    /// Everything `conn` received since the last call.
    pub(crate) fn take(&mut self, conn: ConnId) -> Vec<Received> {
        self.inbox.remove(&conn).unwrap_or_default()
    }

    /// Broadcast events received by `conn`, as `(user event, user payload)`.
    pub(crate) fn broadcasts(&mut self, conn: ConnId) -> Vec<(String, Value)> {
        self.take(conn)
            .into_iter()
            .filter_map(|r| match r {
                Received::Binary(b) => Some((
                    b.event,
                    serde_json::from_slice(&b.payload).unwrap_or(Value::Null),
                )),
                Received::Text { event, payload, .. } if event == "broadcast" => Some((
                    payload["event"].as_str().unwrap_or_default().to_owned(),
                    payload["payload"].clone(),
                )),
                _ => None,
            })
            .collect()
    }

    fn drain(&mut self) {
        while let Some(output) = self.engine.poll_output() {
            match output {
                Output::Send { to, msg } => {
                    for conn in to.iter() {
                        let decoded = decode_server_frame(self.vsn[&conn], &msg);
                        self.inbox.entry(conn).or_default().push(decoded);
                    }
                    self.sends.push((to, msg));
                }
                Output::Close { conn, code, reason } => {
                    self.closed.insert(conn, (code, reason));
                }
                Output::Reject { conn, status, body } => {
                    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    self.rejected.insert(conn, (status, body));
                }
                Output::Reply { req, status, body } => {
                    self.replies.insert(req, (status, body));
                }
                Output::ToPeers(msg) => self.to_peers.push((None, msg)),
                Output::ToPeer { to, msg } => self.to_peers.push((Some(to), msg)),
                Output::Visibility(query) => self.visibility.push(query),
                Output::Authorize(query) => self.authz.push(query),
                Output::RefreshJwks => self.jwks_refreshes += 1,
                Output::WalProgress { lsn, .. } => self.progress.push(lsn),
                Output::RefreshPublication => self.refreshes += 1,
                Output::Interest { room, members } => self.interest.push((room, members)),
                Output::Accept { .. } => {}
            }
        }
    }
}

pub(crate) fn vsn_str(vsn: Vsn) -> &'static str {
    match vsn {
        Vsn::V1 => "1.0.0",
        Vsn::V2 => "2.0.0",
    }
}

/// Limits that do not get in the way of scenarios; backoffs off.
pub(crate) fn test_config() -> Config {
    Config {
        jwt_secret: SECRET.to_owned(),
        join_error_backoff_ms: 0,
        connect_error_backoff_ms: 0,
        events_per_sec_max: 100_000,
        joins_per_sec_max: 10_000,
        concurrent_users_max: 100_000,
        ..Config::default()
    }
}

/// Decodes a server frame as a client with serializer `vsn` would.
pub(crate) fn decode_server_frame(vsn: Vsn, msg: &WsMessage) -> Received {
    match msg {
        WsMessage::Binary(data) => {
            assert_eq!(vsn, Vsn::V2, "binary frame sent to a v1 socket");
            Received::Binary(decode_user_broadcast(data).expect("server sends only kind 4"))
        }
        WsMessage::Text(text) => {
            let value: Value = serde_json::from_slice(text).expect("server frames are JSON");
            let s = |v: &Value| v.as_str().map(str::to_owned);
            match vsn {
                Vsn::V1 => {
                    let object = value.as_object().expect("v1 frames are objects");
                    assert!(
                        !object.contains_key("join_ref"),
                        "v1 frames never carry join_ref"
                    );
                    assert_eq!(
                        object.len(),
                        4,
                        "v1 frames have topic, event, payload, ref: {value}"
                    );
                    Received::Text {
                        join_ref: None,
                        ref_: s(&value["ref"]),
                        topic: s(&value["topic"]).unwrap(),
                        event: s(&value["event"]).unwrap(),
                        payload: value["payload"].clone(),
                    }
                }
                Vsn::V2 => {
                    let array = value.as_array().expect("v2 text frames are arrays");
                    assert_eq!(array.len(), 5, "v2 frames have five elements");
                    Received::Text {
                        join_ref: s(&array[0]),
                        ref_: s(&array[1]),
                        topic: s(&array[2]).unwrap(),
                        event: s(&array[3]).unwrap(),
                        payload: array[4].clone(),
                    }
                }
            }
        }
    }
}
