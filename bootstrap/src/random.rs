//! The agent's one random source, the kernel's CSPRNG: secret bytes for the node key and the
//! enrollment nonce (no fallback), and a u64 for backoff jitter and splay (a fallback is fine).

use crate::error::AgentError;
use idhal_manifest::time::now;
use std::io::Read;

const URANDOM: &str = "/dev/urandom";

/// Fills `buf` from the kernel's CSPRNG (keys and nonces: failure is an error, never a fallback).
pub fn fill_random(buf: &mut [u8]) -> Result<(), AgentError> {
    std::fs::File::open(URANDOM)
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| AgentError::state(URANDOM, e))
}

/// A random u64 for jitter and splay (not security-relevant). Without `/dev/urandom` (no `/dev`
/// yet in an early initramfs) the clock stands in, mixed with where ASLR put this stack: it
/// differs per process, so nodes that boot in the same second still spread out.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    match fill_random(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => {
            let aslr = std::ptr::addr_of!(b) as u64;
            // The multiply carries every input bit up into the bits the callers' `%` keeps.
            (now() ^ aslr).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_and_varies() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0; 32]);
        let samples: std::collections::HashSet<u64> = (0..8).map(|_| random_u64()).collect();
        assert_eq!(samples.len(), 8);
    }
}
