//! The REST broadcast API (PROTOCOL.md §3.4, §3.5): parsing, auth, limits and delivery.
//! HTTP routing stays in the runtimes; every decision a client can observe is made here.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::auth::Claims;
use crate::broadcast::{BroadcastBody, Encoding};
use crate::room::RoomKey;
use crate::{Engine, Output, ReqId};

/// The credentials of a REST request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestAuth {
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `apikey` header.
    pub apikey: Option<String>,
}

impl RestAuth {
    /// `Authorization: Bearer <t>` when present and non-empty (scheme case-insensitive),
    /// else the `apikey` header, as upstream's `auth_tenant` plug chooses.
    pub fn token(&self) -> Option<&str> {
        let bearer = self.authorization.as_deref().and_then(|header| {
            let (scheme, token) = header.trim().split_once(' ')?;
            let token = token.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
        });
        bearer.or(self.apikey.as_deref())
    }
}

/// A REST API request, as the runtime received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestRequest {
    /// `POST /realtime/v1/api/broadcast` with `{"messages":[…]}`.
    Broadcast {
        /// Credentials.
        auth: RestAuth,
        /// The JSON body.
        body: Bytes,
    },
    /// `POST /realtime/v1/api/broadcast/<sub>/events/<event>` with the payload as body.
    BroadcastEvent {
        /// Credentials.
        auth: RestAuth,
        /// The channel name, percent-decoded.
        topic: String,
        /// The event name, percent-decoded.
        event: String,
        /// `?private=true`.
        private: bool,
        /// The `Content-Type` header.
        content_type: Option<String>,
        /// The payload: JSON text or raw bytes.
        body: Bytes,
    },
}

/// Whether a REST request was answered at once or waits for the database.
enum Sent {
    Now,
    Later,
}

/// A REST answer: status and JSON body.
type Answer = (u16, Value);

fn message(status: u16, text: &str) -> Answer {
    (status, json!({ "message": text }))
}

impl Engine {
    pub(crate) fn rest(&mut self, req: ReqId, request: RestRequest) {
        let answer = match request {
            RestRequest::Broadcast { auth, body } => self
                .authorize(&auth)
                .and_then(|claims| self.rest_batch(req, &claims, &body)),
            RestRequest::BroadcastEvent {
                auth,
                topic,
                event,
                private,
                content_type,
                body,
            } => self.authorize(&auth).and_then(|claims| {
                let message = (topic, event, private);
                self.rest_single(req, &claims, message, content_type, body)
            }),
        };
        let (status, body) = match answer {
            // Answered once the database has checked its private topics.
            Ok(Sent::Later) => return,
            Ok(Sent::Now) => (202, Bytes::new()),
            Err((status, value)) => {
                self.stats.errors += 1;
                (status, Bytes::from(value.to_string()))
            }
        };
        self.emit(Output::Reply { req, status, body });
    }

    fn authorize(&mut self, auth: &RestAuth) -> Result<Arc<Claims>, Answer> {
        let token = auth.token().ok_or_else(|| message(401, "Unauthorized"))?;
        self.verify_token(token)
            .map(|(_, claims)| claims)
            .map_err(|_| message(401, "Unauthorized"))
    }

    fn rest_batch(&mut self, req: ReqId, claims: &Claims, body: &[u8]) -> Result<Sent, Answer> {
        let body: Value =
            serde_json::from_slice(body).map_err(|_| message(400, "Malformed JSON body"))?;
        let blank = || (422, json!({ "errors": { "messages": ["can't be blank"] } }));
        let list = body
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(blank)?;
        if list.is_empty() {
            return Err(blank());
        }
        let limit = self.config.payload_bytes_max();
        let mut messages = Vec::with_capacity(list.len());
        let mut errors = Vec::with_capacity(list.len());
        for item in list {
            match batch_message(item, limit) {
                Ok(message) => {
                    messages.push(message);
                    errors.push(json!({}));
                }
                Err(e) => errors.push(Value::Object(e)),
            }
        }
        if messages.len() < list.len() {
            return Err((422, json!({ "errors": { "messages": errors } })));
        }
        self.rest_rate(messages.len() as u64)?;
        let checked = !claims.is_service_role() && messages.iter().any(|(room, _)| room.private);
        if checked && self.config.database {
            // Private topics need broadcast write permission from the project's policies.
            self.ask_rest(req, claims, messages, false);
            return Ok(Sent::Later);
        }
        for (room, body) in messages {
            // Without the project database only service_role may write to private topics.
            if room.private && !claims.is_service_role() {
                continue;
            }
            self.limits.events.charge(self.now.mono, 1);
            self.route(&room, &body, None);
        }
        Ok(Sent::Now)
    }

    fn rest_single(
        &mut self,
        req: ReqId,
        claims: &Claims,
        (topic, event, private): (String, String, bool),
        content_type: Option<String>,
        body: Bytes,
    ) -> Result<Sent, Answer> {
        let media = content_type.as_deref().map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
        let encoding = match media.as_deref() {
            None | Some("application/json") => Encoding::Json,
            Some("application/octet-stream") => Encoding::Binary,
            Some(_) => {
                let text =
                    "Unsupported Media Type. Use application/json or application/octet-stream";
                return Err((415, json!({ "error": text })));
            }
        };
        let payload_error = |text: &str| (422, json!({ "errors": { "payload": [text] } }));
        if body.is_empty() {
            return Err(payload_error("can't be blank"));
        }
        if encoding == Encoding::Json
            && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err()
        {
            return Err(payload_error("is invalid"));
        }
        if body.len() > self.config.payload_bytes_max() {
            return Err(payload_error("Payload size exceeds tenant limit"));
        }
        if self.limits.events.tripped(self.now.mono) {
            return Err(message(429, "You have exceeded your rate limit"));
        }
        let room = RoomKey {
            private,
            sub: topic.into(),
        };
        let body = BroadcastBody::User {
            event,
            encoding,
            payload: body,
        };
        if private && !claims.is_service_role() {
            if !self.config.database {
                return Err(message(403, "Unauthorized"));
            }
            self.ask_rest(req, claims, vec![(room, body)], true);
            return Ok(Sent::Later);
        }
        self.limits.events.charge(self.now.mono, 1);
        self.route(&room, &body, None);
        Ok(Sent::Now)
    }

    fn rest_rate(&mut self, count: u64) -> Result<(), Answer> {
        if self.limits.events.tripped(self.now.mono) {
            return Err(message(429, "You have exceeded your rate limit"));
        }
        if !self.limits.events.has(self.now.mono, count) {
            return Err(message(
                429,
                "Too many messages to broadcast, please reduce the batch size",
            ));
        }
        Ok(())
    }
}

/// One message of a batch, or its Ecto-style field errors.
fn batch_message(
    item: &Value,
    limit: usize,
) -> Result<(RoomKey, BroadcastBody), Map<String, Value>> {
    let mut errors = Map::new();
    let mut require = |key: &str, ok: bool, blank: bool| {
        if !ok {
            let text = if blank {
                "can't be blank"
            } else {
                "is invalid"
            };
            errors.insert(key.to_owned(), json!([text]));
        }
    };
    let field = |key: &str| item.get(key).filter(|v| !v.is_null());
    let topic = field("topic").and_then(Value::as_str);
    let event = field("event").and_then(Value::as_str);
    let payload = field("payload");
    require("topic", topic.is_some(), field("topic").is_none());
    require("event", event.is_some(), field("event").is_none());
    require(
        "payload",
        payload.is_some_and(Value::is_object),
        payload.is_none(),
    );
    let private = match field("private") {
        None => Some(false),
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Some(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Some(false),
        Some(_) => None,
    };
    require("private", private.is_some(), false);
    let (Some(topic), Some(event), Some(payload), Some(private)) = (topic, event, payload, private)
    else {
        return Err(errors);
    };
    if !payload.is_object() {
        return Err(errors);
    }
    let mut object = json!({ "payload": payload, "event": event, "type": "broadcast" });
    if let Some(id) = field("id") {
        object["meta"] = json!({ "id": id });
    }
    let text = object.to_string();
    if payload.to_string().len() > limit {
        errors.insert(
            "payload".to_owned(),
            json!(["Payload size exceeds tenant limit"]),
        );
        return Err(errors);
    }
    Ok((
        RoomKey {
            private,
            sub: topic.into(),
        },
        BroadcastBody::Json(Bytes::from(text)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_wins_over_apikey_unless_empty() {
        let auth = |authorization: Option<&str>| RestAuth {
            authorization: authorization.map(str::to_owned),
            apikey: Some("key".to_owned()),
        };
        assert_eq!(auth(Some("Bearer tok")).token(), Some("tok"));
        assert_eq!(auth(Some("bearer  tok ")).token(), Some("tok"));
        assert_eq!(auth(Some("Bearer ")).token(), Some("key"));
        assert_eq!(auth(Some("Basic abc")).token(), Some("key"));
        assert_eq!(auth(None).token(), Some("key"));
    }

    #[test]
    fn batch_message_reports_each_missing_field() {
        let errors = batch_message(&json!({"topic": "r"}), 100).unwrap_err();
        assert_eq!(
            Value::Object(errors),
            json!({"event": ["can't be blank"], "payload": ["can't be blank"]})
        );
        let errors =
            batch_message(&json!({"topic": "r", "event": "e", "payload": 1}), 100).unwrap_err();
        assert_eq!(Value::Object(errors), json!({"payload": ["is invalid"]}));
    }

    #[test]
    fn batch_message_carries_its_id_as_meta() {
        let (room, body) = batch_message(
            &json!({"topic": "r", "event": "e", "payload": {"a": 1}, "id": "x"}),
            100,
        )
        .unwrap();
        assert_eq!(
            room,
            RoomKey {
                private: false,
                sub: "r".into()
            }
        );
        let BroadcastBody::Json(text) = body else {
            panic!("REST batch bodies are JSON")
        };
        let value: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(
            value,
            json!({"payload": {"a": 1}, "event": "e", "type": "broadcast", "meta": {"id": "x"}})
        );
    }
}
