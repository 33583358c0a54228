//! Integration tests: the real server on 127.0.0.1:0 with real WebSocket clients, the binary
//! spawned as a child for crash tests, and the store conformance suite on SQLite and
//! PostgreSQL. One test binary so the suite links once.

mod api;
mod authz;
mod boards;
mod breakouts;
mod calls;
mod chat;
mod class;
mod classlife;
mod cli;
mod cluster;
mod common;
mod config;
mod durability;
mod engagement;
mod faults;
mod hardening;
mod limits;
mod moderation;
mod polls;
mod qa;
mod quiz;
mod rights;
mod store_conformance;
mod webhooks;
