//! Integration tests: the real app over HTTP and WebSocket, a fresh PostgreSQL database each.

mod helpers;

mod smoke;
