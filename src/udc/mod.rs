//! The HTTP edge of the UDC protocol: the request scope (trace id, caller), the request
//! extractors (envelope or bare body, query, path) and the response wrapper. The protocol
//! itself (version, envelope builder, times) is in `crate::protocol`, free of HTTP.

mod body;
mod params;
mod response;
mod scope;

pub use body::*;
pub use params::*;
pub use response::*;
pub use scope::*;

pub use crate::protocol::{iso, now_iso, parse_time, ts, ts_opt, MessageType, UDC_VERSION};
pub use crate::validation::Validate;
