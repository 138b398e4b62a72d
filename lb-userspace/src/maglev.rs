//! Maglev consistent hashing: filling one lookup table of a frontend.
//!
//! Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, section 3.4. Every backend walks its own permutation
//! of the table's slots; in turns, each backend takes the next slot of its
//! permutation that is still free, until every slot is taken. Hence each
//! backend owns `size / n` slots rounded down or up, and removing a backend
//! moves few slots other than the ones it owned, so most established flows
//! keep their backend even on another node or after an agent restart.
//!
//! The permutations come from hashes of the backend's identity that must not
//! change between processes, machines or Rust releases: two agents (or one
//! agent before and after an upgrade) must build the same table from the same
//! backends. `std`'s `DefaultHasher` gives no such guarantee, hence the small
//! hand-written FNV-1a below.

/// Fills a Maglev table of `size` slots and returns, for every slot, the index
/// into `backends` of the backend that owns it.
///
/// `backends` holds the stable identity of every backend as bytes (for
/// example its address and port). The result depends on the order of
/// `backends` as well as on the set (the turn order breaks ties), so callers
/// sort them: then the table depends only on the set of backends.
///
/// `size` should be prime (see [`lb_common::MAGLEV_TABLE_SIZE`]) for the
/// permutations to be as the paper describes; any other size still yields a
/// full table. Returns an empty table when there is no backend or `size` is 0.
pub fn populate(backends: &[&[u8]], size: u32) -> Vec<u32> {
    if backends.is_empty() || size == 0 {
        return Vec::new();
    }
    let size_wide = u64::from(size);
    let permutations: Vec<Permutation> = backends
        .iter()
        .map(|identity| Permutation::new(identity, size))
        .collect();
    // Where each backend is along its permutation: slot(k) for its next k,
    // kept as `offset + k * skip mod size` by adding `skip` each step (both
    // are below `size`, so one subtraction wraps it). The same slots as
    // `Permutation::slot`, without a 128-bit division per candidate (which
    // was most of the 23 us a table of 1021 slots took).
    let mut position: Vec<u64> = permutations.iter().map(|p| p.offset).collect();
    const FREE: u32 = u32::MAX;
    let mut table: Vec<u32> = vec![FREE; size as usize];
    let mut filled = 0u64;
    // Each turn fills exactly one slot, and every permutation visits every
    // slot (skip is coprime with size), so the loop ends after `size` turns.
    'turns: loop {
        for (index, permutation) in permutations.iter().enumerate() {
            let slot = loop {
                let candidate = position[index];
                position[index] += permutation.skip;
                if position[index] >= size_wide {
                    position[index] -= size_wide;
                }
                if table[candidate as usize] == FREE {
                    break candidate as usize;
                }
            };
            // Backend counts beyond u32 cannot occur: the caller's table
            // holds u32 indices and is far smaller.
            table[slot] = index as u32;
            filled += 1;
            if filled == size_wide {
                break 'turns;
            }
        }
    }
    table
}

/// The order in which one backend visits the slots: `offset`, then
/// `offset + skip`, `offset + 2 * skip`, ... modulo the table size.
struct Permutation {
    offset: u64,
    skip: u64,
}

impl Permutation {
    fn new(identity: &[u8], size: u32) -> Self {
        let size = u64::from(size);
        // Two hashes of the same bytes, kept independent by hashing under a
        // different prefix (domain separation).
        let offset = stable_hash(b"xlb-maglev-offset\0", identity) % size;
        let mut skip = if size > 1 {
            stable_hash(b"xlb-maglev-skip\0", identity) % (size - 1) + 1
        } else {
            1
        };
        // With a prime size every skip in [1, size-1] is coprime with it. For
        // any other size, step to the next coprime skip so the permutation
        // still visits every slot (skip 1 always is, so this ends).
        while greatest_common_divisor(skip, size) != 1 {
            skip = if skip + 1 >= size { 1 } else { skip + 1 };
        }
        Permutation { offset, skip }
    }

    /// The definition `populate` follows incrementally; the tests check
    /// that they agree.
    #[cfg(test)]
    fn slot(&self, step: u64, size: u64) -> usize {
        // step < size * (backends + 1) in practice; u128 rules out overflow
        // without reasoning about it.
        let position =
            (u128::from(self.offset) + u128::from(step) * u128::from(self.skip)) % u128::from(size);
        position as usize
    }
}

fn greatest_common_divisor(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// FNV-1a 64 (Fowler, Noll, Vo) over `prefix` then `bytes`, followed by the
/// MurmurHash3 64-bit finaliser: FNV alone mixes the last bytes poorly into
/// the high bits, and the table size is small, so the finaliser spreads every
/// input bit over the whole word before the modulo.
fn stable_hash(prefix: &[u8], bytes: &[u8]) -> u64 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET_BASIS;
    for &byte in prefix.iter().chain(bytes) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::MAGLEV_TABLE_SIZE;

    /// Backend identities shaped like the agent's: "address:port".
    fn identities(count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250 + 1).into_bytes())
            .collect()
    }

    fn as_slices(identities: &[Vec<u8>]) -> Vec<&[u8]> {
        identities.iter().map(Vec::as_slice).collect()
    }

    fn slots_per_backend(table: &[u32], backends: usize) -> Vec<usize> {
        let mut counts = vec![0; backends];
        for &owner in table {
            counts[owner as usize] += 1;
        }
        counts
    }

    /// The table as first written: every candidate slot from
    /// `Permutation::slot`. `populate` must give the same tables, since
    /// agents of both versions share the pinned slots.
    fn populate_reference(backends: &[&[u8]], size: u32) -> Vec<u32> {
        if backends.is_empty() || size == 0 {
            return Vec::new();
        }
        let size_wide = u64::from(size);
        let permutations: Vec<Permutation> = backends
            .iter()
            .map(|identity| Permutation::new(identity, size))
            .collect();
        let mut next = vec![0u64; backends.len()];
        let mut table: Vec<Option<u32>> = vec![None; size as usize];
        let mut filled = 0u64;
        'turns: loop {
            for (index, permutation) in permutations.iter().enumerate() {
                let slot = loop {
                    let candidate = permutation.slot(next[index], size_wide);
                    next[index] += 1;
                    if table[candidate].is_none() {
                        break candidate;
                    }
                };
                table[slot] = Some(index as u32);
                filled += 1;
                if filled == size_wide {
                    break 'turns;
                }
            }
        }
        table.into_iter().map(Option::unwrap).collect()
    }

    #[test]
    fn incremental_positions_give_the_reference_tables() {
        for count in [1, 2, 3, 4, 7, 10, 33, 100] {
            let backends = identities(count);
            for size in [1, 2, 13, 1020, 1024, MAGLEV_TABLE_SIZE] {
                assert_eq!(
                    populate(&as_slices(&backends), size),
                    populate_reference(&as_slices(&backends), size),
                    "{count} backends, {size} slots"
                );
            }
        }
    }

    #[test]
    fn no_backend_gives_empty_table() {
        assert!(populate(&[], MAGLEV_TABLE_SIZE).is_empty());
    }

    #[test]
    fn zero_size_gives_empty_table() {
        assert!(populate(&[b"10.0.0.1:80"], 0).is_empty());
    }

    #[test]
    fn every_slot_is_owned_by_a_listed_backend() {
        let backends = identities(7);
        let table = populate(&as_slices(&backends), MAGLEV_TABLE_SIZE);
        assert_eq!(table.len(), MAGLEV_TABLE_SIZE as usize);
        assert!(table.iter().all(|&owner| (owner as usize) < backends.len()));
    }

    #[test]
    fn each_backend_owns_its_share_rounded_down_or_up() {
        let size = MAGLEV_TABLE_SIZE as usize;
        for count in [1, 2, 3, 7, 100] {
            let backends = identities(count);
            let table = populate(&as_slices(&backends), MAGLEV_TABLE_SIZE);
            let low = size / count;
            let high = size.div_ceil(count);
            for (backend, owned) in slots_per_backend(&table, count).into_iter().enumerate() {
                assert!(
                    (low..=high).contains(&owned),
                    "{count} backends: backend {backend} owns {owned} slots, expected {low}..={high}"
                );
            }
        }
    }

    #[test]
    fn more_backends_than_slots_still_fills_the_table() {
        let backends = identities(20);
        let table = populate(&as_slices(&backends), 13);
        assert_eq!(table.len(), 13);
        let counts = slots_per_backend(&table, 20);
        assert!(counts.iter().all(|&owned| owned <= 1));
        assert_eq!(counts.iter().sum::<usize>(), 13);
    }

    #[test]
    fn non_prime_size_still_fills_the_table_evenly() {
        let backends = identities(3);
        let table = populate(&as_slices(&backends), 1024);
        assert_eq!(table.len(), 1024);
        for owned in slots_per_backend(&table, 3) {
            assert!((341..=342).contains(&owned));
        }
    }

    #[test]
    fn table_of_one_slot() {
        assert_eq!(populate(&[b"a", b"b"], 1), vec![0]);
    }

    #[test]
    fn same_backends_give_same_table() {
        let backends = identities(10);
        let first = populate(&as_slices(&backends), MAGLEV_TABLE_SIZE);
        let second = populate(&as_slices(&backends.clone()), MAGLEV_TABLE_SIZE);
        assert_eq!(first, second);
    }

    /// Pins the hash: a change here would make agents of different versions
    /// build different tables for the same backends.
    #[test]
    fn hash_is_stable_across_releases() {
        assert_eq!(stable_hash(b"", b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(stable_hash(b"", b"10.0.0.1:80"), 0x5ed8_f827_5e47_a14a);
        assert_ne!(
            stable_hash(b"xlb-maglev-offset\0", b"10.0.0.1:80"),
            stable_hash(b"xlb-maglev-skip\0", b"10.0.0.1:80")
        );
    }

    /// Pins the whole algorithm, not only the hash.
    #[test]
    fn table_is_stable_across_releases() {
        let table = populate(
            &[b"10.0.0.1:80", b"10.0.0.2:80", b"10.0.0.3:80"],
            MAGLEV_TABLE_SIZE,
        );
        assert_eq!(
            table[..24],
            [
                0, 1, 2, 1, 2, 0, 1, 0, 1, 0, 1, 1, 1, 2, 2, 2, 0, 1, 0, 1, 2, 1, 1, 0
            ]
        );
    }

    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        let size = MAGLEV_TABLE_SIZE as usize;
        let count = 10;
        let backends = identities(count);
        let before = populate(&as_slices(&backends), MAGLEV_TABLE_SIZE);
        for removed in 0..count {
            let remaining: Vec<Vec<u8>> = backends
                .iter()
                .enumerate()
                .filter(|&(index, _)| index != removed)
                .map(|(_, identity)| identity.clone())
                .collect();
            let after = populate(&as_slices(&remaining), MAGLEV_TABLE_SIZE);
            // Map indices of the smaller list back to the original ones.
            let original_index = |index: u32| {
                let index = index as usize;
                if index >= removed { index + 1 } else { index }
            };
            let mut moved_elsewhere = 0;
            for slot in 0..size {
                let old = before[slot] as usize;
                let new = original_index(after[slot]);
                assert_ne!(new, removed);
                if old != removed && old != new {
                    moved_elsewhere += 1;
                }
            }
            // Maglev is not minimally disruptive, but close (paper, 5.3).
            // Measured with these identities: 34 to 74 slots of 1021, against
            // the 102 a backend owns.
            assert!(
                moved_elsewhere < size / count,
                "removing backend {removed} moved {moved_elsewhere} slots of other backends"
            );
        }
    }
}
