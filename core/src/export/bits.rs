//! The two ways the formats put b-bit codes into 32-bit words.
//!
//! * GPTQ treats a run of codes as one little-endian **bit stream**: code k occupies bits k·b … k·b+b−1 of the
//!   stream, and word w holds stream bits 32w … 32w+31. For b = 2, 4, 8 this is 32/b codes per word; for b = 3
//!   a code can straddle two words (codes 10 and 21 of every 32).
//! * compressed-tensors packs **whole codes per word**: 32 // b codes, code k of a word at bits k·b, and the
//!   leftover high bits unused (b = 3: 10 codes and 2 spare bits per word).
//!
//! For b dividing 32 both layouts coincide; they differ exactly where the formats differ, so each packer here is
//! written once and tested by hand-computed words in the format modules.

/// Codes per whole cycle of the GPTQ bit stream, and the words that cycle fills: the stream only ends on a word
/// boundary after a multiple of this many codes (b = 3: 32 codes in 3 words; b = 4: 8 codes in 1 word).
pub(crate) fn stream_cycle(bits: u32) -> (usize, usize) {
    let g = gcd(bits as usize, 32);
    (32 / g, bits as usize / g)
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `n` codes padded up to a whole stream cycle.
pub(crate) fn stream_padded_len(n: usize, bits: u32) -> usize {
    let (codes, _) = stream_cycle(bits);
    n.div_ceil(codes) * codes
}

/// Words a GPTQ stream of `n` codes takes once padded to a whole cycle.
pub(crate) fn stream_words(n: usize, bits: u32) -> usize {
    stream_padded_len(n, bits) * bits as usize / 32
}

/// Packs `codes` (each < 2^bits) as one little-endian bit stream into `out` (zeroed, long enough).
pub(crate) fn pack_stream(codes: impl Iterator<Item = u32>, bits: u32, out: &mut [u32]) {
    for (k, code) in codes.enumerate() {
        let bit = k * bits as usize;
        let (w, off) = (bit / 32, (bit % 32) as u32);
        out[w] |= code << off;
        // The part that did not fit goes to the low bits of the next word.
        if off + bits > 32 {
            out[w + 1] |= code >> (32 - off);
        }
    }
}

/// Reads code `k` of a little-endian bit stream; `None` if the stream is too short.
pub(crate) fn stream_code(words: &[u32], bits: u32, k: usize) -> Option<u32> {
    let bit = k * bits as usize;
    let (w, off) = (bit / 32, (bit % 32) as u32);
    let mask = (1u32 << bits) - 1;
    let mut v = words.get(w)? >> off;
    if off + bits > 32 {
        v |= words.get(w + 1)? << (32 - off);
    }
    Some(v & mask)
}

/// compressed-tensors: codes per word.
pub(crate) fn per_word(bits: u32) -> usize {
    (32 / bits) as usize
}

/// compressed-tensors: code `k` of a run packed whole-codes-per-word goes to (word, bit offset).
pub(crate) fn word_slot(k: usize, bits: u32) -> (usize, u32) {
    let pf = per_word(bits);
    (k / pf, (k % pf) as u32 * bits)
}
