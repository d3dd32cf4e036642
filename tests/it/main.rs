//! Integration tests: the real `switchboard` binary on real sockets, driven by plain
//! WebSocket clients and by the real supabase-js client under node.

mod bad_input;
mod check;
mod cli;
mod cluster;
mod inspector;
mod jwks;
mod metrics;
mod migrate;
mod nats;
mod pg;
mod rls;
mod rls_changes;
mod server;
mod shards;
mod startup;
mod supabase_js;
mod support;
mod wal;
