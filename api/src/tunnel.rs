//! The tunnel header codec: a 4-byte big-endian length, then a protobuf message.
//!
//! Every header crossing the tunnel is bounded ([`MAX_HEADER_LEN`]) and decoded into a typed
//! message; a malformed one is an error for that stream only.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Headers are small (names, a trace context); anything larger is an attack or a bug.
pub const MAX_HEADER_LEN: usize = 16 * 1024;

/// Tunnel response statuses, HTTP-like so operators read them at a glance.
pub mod status {
    pub const OK: u32 = 200;
    pub const BAD_REQUEST: u32 = 400;
    pub const FORBIDDEN: u32 = 403;
    pub const UNKNOWN_SERVICE: u32 = 404;
    pub const NO_ENDPOINT: u32 = 503;
    pub const DEADLINE_EXCEEDED: u32 = 504;
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("tunnel header: {0}")]
    Io(#[from] std::io::Error),
    #[error("tunnel header of {0} bytes exceeds the limit of {MAX_HEADER_LEN}")]
    TooLong(usize),
    #[error("tunnel header is not a valid protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
}

pub async fn write_header<W: AsyncWrite + Unpin, M: prost::Message>(w: &mut W, msg: &M) -> Result<(), HeaderError> {
    let len = msg.encoded_len();
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong(len));
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// The length of the message a header's 4-byte prefix announces, within [`MAX_HEADER_LEN`].
pub fn header_len(prefix: [u8; 4]) -> Result<usize, HeaderError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong(len));
    }
    Ok(len)
}

pub async fn read_header<R: AsyncRead + Unpin, M: prost::Message + Default>(r: &mut R) -> Result<M, HeaderError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let len = header_len(prefix)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(M::decode(buf.as_slice())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::TunnelRequest;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let req = TunnelRequest {
            service: "echo".into(),
            namespace: "demo".into(),
            port: 80,
            ..Default::default()
        };
        let mut buf = Vec::new();
        write_header(&mut buf, &req).await.unwrap();
        let back: TunnelRequest = read_header(&mut buf.as_slice()).await.unwrap();
        assert_eq!(back, req);

        let huge = (MAX_HEADER_LEN as u32 + 1).to_be_bytes();
        let err = read_header::<_, TunnelRequest>(&mut huge.as_slice()).await.unwrap_err();
        assert!(matches!(err, HeaderError::TooLong(_)));

        let garbage = [0u8, 0, 0, 3, 0xff, 0xff, 0xff];
        let err = read_header::<_, TunnelRequest>(&mut garbage.as_slice())
            .await
            .unwrap_err();
        assert!(matches!(err, HeaderError::Decode(_)));
    }
}
