//! Bytes in, bytes out.
//!
//! Writers encode MessagePack with field names ([`encode`]); readers accept MessagePack or JSON,
//! chosen by the `Content-Type` header ([`ContentType::from_header`]), with MessagePack when the
//! header is absent. Errors say which format and what failed, so that a dead letter's reason
//! tells the publisher what to fix.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The two encodings NovaCron reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentType {
    /// `application/msgpack` (the default).
    MsgPack,
    /// `application/json`.
    Json,
}

impl ContentType {
    /// The header value of this encoding.
    #[must_use]
    pub fn header_value(self) -> &'static str {
        match self {
            ContentType::MsgPack => "application/msgpack",
            ContentType::Json => "application/json",
        }
    }

    /// Reads a `Content-Type` header value; `None` (no header) means MessagePack.
    ///
    /// # Errors
    /// An unknown content type, named in the error.
    pub fn from_header(value: Option<&str>) -> Result<ContentType, DecodeError> {
        match value.map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase()) {
            None => Ok(ContentType::MsgPack),
            Some(v) if v.is_empty() => Ok(ContentType::MsgPack),
            Some(v) if v == "application/msgpack" || v == "application/x-msgpack" => Ok(ContentType::MsgPack),
            Some(v) if v == "application/json" => Ok(ContentType::Json),
            Some(v) => Err(DecodeError::UnsupportedContentType(v)),
        }
    }
}

/// Why bytes did not decode into a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The `Content-Type` header names an encoding NovaCron does not read.
    #[error("unsupported content type {0:?}; use application/msgpack or application/json")]
    UnsupportedContentType(String),
    /// Not valid MessagePack for this message type.
    #[error("malformed MessagePack: {0}")]
    MsgPack(#[source] rmp_serde::decode::Error),
    /// Not valid JSON for this message type.
    #[error("malformed JSON: {0}")]
    Json(#[source] serde_json::Error),
}

/// Encodes a message as MessagePack with field names.
///
/// # Panics
/// Never for NovaCron's own types (they encode infallibly: string keys, no foreign
/// serializers); a failure would be a programming error and is reported as such.
#[must_use]
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    #[allow(clippy::expect_used)]
    rmp_serde::to_vec_named(msg).expect("NovaCron types always encode to MessagePack")
}

/// Decodes a message in the given encoding.
///
/// # Errors
/// The format's own error, wrapped so its origin is clear.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], ct: ContentType) -> Result<T, DecodeError> {
    match ct {
        ContentType::MsgPack => rmp_serde::from_slice(bytes).map_err(DecodeError::MsgPack),
        ContentType::Json => serde_json::from_slice(bytes).map_err(DecodeError::Json),
    }
}
