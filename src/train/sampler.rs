//! Batch samplers: the hierarchical one (groups of an anchor plus one partner per level, DESIGN §2)
//! and a plain shuffled one, both deterministic under a seed and resumable from a saved state.
//!
//! Input: the label rows of a catalogue split, `N x K` integers coarse -> fine, the last column the
//! image id (e.g. `[category..., product, variation, image]`).
//!
//! Both samplers draw anchors from the same *epoch stream*: epoch `e` is a permutation of `0..N`
//! that depends only on `(seed, e)`; the stream runs on across epoch ends, so a batch may span two
//! epochs and every sample is an anchor exactly once per epoch.
//! - `random`: a batch is the next `batch_size` anchors.
//! - `hierarchical`: a batch is filled with groups of `K + 1`: the anchor, then for
//!   `shared = K-1, ..., 1, 0` one partner that has the anchor's first `shared` label columns and
//!   differs in column `shared` (same variation other image, same product other variation, ...,
//!   and last a sample of another top-level category). The last group of a batch is truncated
//!   when `batch_size` is not a multiple of `K + 1` (its coarsest partners are dropped).
//!
//! Partners are drawn uniformly from the exact candidate set, which is precomputed: all samples
//! are sorted by their full label row once, so every label prefix owns a contiguous span of that
//! order and "same first `shared` columns, other column `shared`" is one span minus a sub-span.
//! A partner is therefore missed only when the data has none; then the slot falls back to a
//! uniformly random sample. Each draw retries at most `max_tries` times to avoid a sample already
//! in the batch, then accepts the repeat (a repeated partner is still a correct partner).
//! Partner draws use one ChaCha8 stream whose position is part of the saved state.

use std::collections::HashSet;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// How batches are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// Groups of an anchor and one partner per hierarchy level.
    #[default]
    Hierarchical,
    /// Shuffled epochs, no grouping.
    Random,
}

/// What decides the sequence of batches (besides the labels).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SamplerConfig {
    pub kind: SamplerKind,
    /// Samples per batch (each later gives two views).
    pub batch_size: usize,
    pub seed: u64,
    /// Draws per slot spent avoiding a sample already in the batch before accepting a repeat.
    pub max_tries: usize,
}

impl SamplerConfig {
    /// A configuration with the default `max_tries` (10, as the published sampler's attempts).
    pub fn new(kind: SamplerKind, batch_size: usize, seed: u64) -> Self {
        SamplerConfig { kind, batch_size, seed, max_tries: 10 }
    }
}

/// Everything needed to continue a sampler's exact sequence of batches (serialise it with the
/// checkpoint; [`Sampler::from_state`] checks that it is resumed on the same labels).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SamplerState {
    pub config: SamplerConfig,
    /// N and K of the label table, and a SHA-256 prefix of its contents.
    pub samples: usize,
    pub columns: usize,
    pub labels_digest: String,
    /// Current epoch and the position of the next anchor in its permutation.
    pub epoch: u64,
    pub cursor: usize,
    /// Word position of the partner-drawing ChaCha8 stream.
    pub rng_word_pos: u128,
}

/// Why a sample is in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRole {
    /// The next sample of the epoch stream (every sample of a `random` batch).
    Anchor,
    /// Shares the group anchor's first `shared` label columns and differs in column `shared`.
    Partner { shared: usize },
    /// The data has no such partner for this anchor: a uniformly random sample instead.
    Fallback { shared: usize },
}

/// A batch with the role of each of its samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub indices: Vec<usize>,
    pub roles: Vec<SlotRole>,
}

/// Counts since this sampler was built (not part of the saved state).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SamplerStats {
    pub batches: u64,
    pub groups: u64,
    /// Indexed by `shared` (0..K): partners found / fallbacks taken.
    pub partners: Vec<u64>,
    pub fallbacks: Vec<u64>,
    /// Random draws made for partner and fallback slots (at most `max_tries` per slot).
    pub draws: u64,
    /// Slots filled with a sample already in the batch.
    pub repeats: u64,
}

/// A deterministic, resumable batch sampler (one type for both kinds: they share the epoch
/// stream and the state, and differ only in how a batch is filled).
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    columns: usize,
    labels_digest: String,
    index: PrefixIndex,
    epoch: u64,
    order: Vec<usize>,
    cursor: usize,
    rng: ChaCha8Rng,
    stats: SamplerStats,
}

impl Sampler {
    /// A sampler at the start of epoch 0. `labels` is `N x k` row-major.
    pub fn new(labels: &[i64], k: usize, config: SamplerConfig) -> Result<Self> {
        let n = check_labels(labels, k)?;
        if config.batch_size == 0 || config.max_tries == 0 {
            return Err(Error::SamplerConfig {
                reason: format!(
                    "batch size ({}) and max tries ({}) must be at least 1",
                    config.batch_size, config.max_tries
                ),
            });
        }
        let index = PrefixIndex::new(labels, n, k);
        for shared in 0..k {
            let missing = (0..n).filter(|&s| index.candidates(s, shared) == 0).count();
            if missing > 0 && config.kind == SamplerKind::Hierarchical {
                tracing::debug!(shared, missing, "samples without a partner at this level; those slots fall back");
            }
        }
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        let order = epoch_order(config.seed, 0, n);
        Ok(Sampler {
            config,
            columns: k,
            labels_digest: labels_digest(labels, k),
            index,
            epoch: 0,
            order,
            cursor: 0,
            rng,
            stats: SamplerStats { partners: vec![0; k], fallbacks: vec![0; k], ..SamplerStats::default() },
        })
    }

    /// Continues exactly where the sampler that produced `state` was, on the same labels.
    pub fn from_state(labels: &[i64], k: usize, state: &SamplerState) -> Result<Self> {
        let n = check_labels(labels, k)?;
        let mismatch = |reason: String| Err(Error::SamplerState { reason });
        if state.samples != n || state.columns != k {
            return mismatch(format!(
                "it was saved for {} x {} labels, these are {n} x {k}",
                state.samples, state.columns
            ));
        }
        if state.labels_digest != labels_digest(labels, k) {
            return mismatch("the labels differ from those it was saved with".to_string());
        }
        if state.cursor > n {
            return mismatch(format!("cursor {} is past the {n} samples of an epoch", state.cursor));
        }
        let mut sampler = Sampler::new(labels, k, state.config.clone())?;
        sampler.epoch = state.epoch;
        sampler.order = epoch_order(state.config.seed, state.epoch, n);
        sampler.cursor = state.cursor;
        sampler.rng.set_word_pos(state.rng_word_pos);
        Ok(sampler)
    }

    /// The state to save so that [`Sampler::from_state`] continues the same sequence.
    pub fn state(&self) -> SamplerState {
        SamplerState {
            config: self.config.clone(),
            samples: self.order.len(),
            columns: self.columns,
            labels_digest: self.labels_digest.clone(),
            epoch: self.epoch,
            cursor: self.cursor,
            rng_word_pos: self.rng.get_word_pos(),
        }
    }

    /// The next batch's sample indices.
    pub fn next_batch(&mut self) -> Vec<usize> {
        self.next_batch_with_roles().indices
    }

    /// The next batch with the role of each sample.
    pub fn next_batch_with_roles(&mut self) -> Batch {
        let size = self.config.batch_size;
        let mut batch = Batch { indices: Vec::with_capacity(size), roles: Vec::with_capacity(size) };
        let mut in_batch = HashSet::with_capacity(size);
        while batch.indices.len() < size {
            let anchor = self.next_anchor();
            self.push(&mut batch, &mut in_batch, anchor, SlotRole::Anchor);
            if self.config.kind == SamplerKind::Random {
                continue;
            }
            self.stats.groups += 1;
            for shared in (0..self.columns).rev() {
                if batch.indices.len() == size {
                    break;
                }
                let (sample, role) = self.draw_partner(anchor, shared, &in_batch);
                self.push(&mut batch, &mut in_batch, sample, role);
            }
        }
        self.stats.batches += 1;
        batch
    }

    /// The current epoch (0-based); it advances when the first anchor of the next one is drawn.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Samples per hierarchical group: the anchor and one partner per label column.
    pub fn group_size(&self) -> usize {
        self.columns + 1
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    pub fn stats(&self) -> &SamplerStats {
        &self.stats
    }

    fn push(&mut self, batch: &mut Batch, in_batch: &mut HashSet<usize>, sample: usize, role: SlotRole) {
        if !in_batch.insert(sample) {
            self.stats.repeats += 1;
        }
        batch.indices.push(sample);
        batch.roles.push(role);
    }

    fn next_anchor(&mut self) -> usize {
        if self.cursor == self.order.len() {
            self.epoch += 1;
            self.order = epoch_order(self.config.seed, self.epoch, self.order.len());
            self.cursor = 0;
            tracing::debug!(epoch = self.epoch, "sampler starts a new epoch");
        }
        self.cursor += 1;
        self.order[self.cursor - 1]
    }

    /// A partner of `anchor` at `shared` columns, or a random fallback when there is none.
    fn draw_partner(&mut self, anchor: usize, shared: usize, in_batch: &HashSet<usize>) -> (usize, SlotRole) {
        let candidates = self.index.candidates(anchor, shared);
        let role = if candidates > 0 {
            self.stats.partners[shared] += 1;
            SlotRole::Partner { shared }
        } else {
            self.stats.fallbacks[shared] += 1;
            SlotRole::Fallback { shared }
        };
        let mut tries = 0;
        loop {
            let sample = if candidates > 0 {
                self.index.candidate(anchor, shared, self.rng.random_range(0..candidates))
            } else {
                self.rng.random_range(0..self.order.len())
            };
            tries += 1;
            if !in_batch.contains(&sample) || tries == self.config.max_tries {
                self.stats.draws += tries as u64;
                return (sample, role);
            }
        }
    }
}

/// Every label prefix as a contiguous span of one sorted order of the samples.
#[derive(Debug, Clone)]
struct PrefixIndex {
    /// Sample indices sorted by their full label row (ties by index).
    sorted: Vec<usize>,
    /// `spans[m][s]`: the span of `sorted` holding the samples whose first `m` label columns
    /// equal sample `s`'s, for `m = 0..=K`.
    spans: Vec<Vec<Span>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    fn len(self) -> usize {
        self.end - self.start
    }
}

impl PrefixIndex {
    fn new(labels: &[i64], n: usize, k: usize) -> Self {
        let row = |s: usize| &labels[s * k..(s + 1) * k];
        let mut sorted: Vec<usize> = (0..n).collect();
        sorted.sort_by(|&a, &b| row(a).cmp(row(b)).then(a.cmp(&b)));
        let mut spans = vec![vec![Span { start: 0, end: 0 }; n]; k + 1];
        for (m, spans_m) in spans.iter_mut().enumerate() {
            // Walk runs of equal first-m columns in the sorted order.
            let mut start = 0;
            while start < n {
                let key = &row(sorted[start])[..m];
                let mut end = start + 1;
                while end < n && &row(sorted[end])[..m] == key {
                    end += 1;
                }
                for &s in &sorted[start..end] {
                    spans_m[s] = Span { start, end };
                }
                start = end;
            }
        }
        PrefixIndex { sorted, spans }
    }

    /// How many samples share `s`'s first `shared` columns and differ from it in column `shared`.
    fn candidates(&self, s: usize, shared: usize) -> usize {
        self.spans[shared][s].len() - self.spans[shared + 1][s].len()
    }

    /// The `r`-th of those candidates (`r < candidates(s, shared)`): the group's span with the
    /// anchor's own sub-span cut out.
    fn candidate(&self, s: usize, shared: usize, r: usize) -> usize {
        let group = self.spans[shared][s];
        let own = self.spans[shared + 1][s];
        let mut position = group.start + r;
        if position >= own.start {
            position += own.len();
        }
        self.sorted[position]
    }
}

/// The anchor order of `epoch`: a permutation of `0..n` that depends only on `(seed, epoch)`
/// (ChaCha8 stream `epoch + 1`; stream 0 draws partners).
fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch.wrapping_add(1));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

fn check_labels(labels: &[i64], k: usize) -> Result<usize> {
    if k == 0 || labels.is_empty() || !labels.len().is_multiple_of(k) {
        return Err(Error::SamplerConfig {
            reason: format!("labels must be a non-empty N x K table, got {} values for K = {k}", labels.len()),
        });
    }
    Ok(labels.len() / k)
}

/// The first 16 hex digits of SHA-256 over K and the labels (little-endian).
fn labels_digest(labels: &[i64], k: usize) -> String {
    let mut hasher = Sha256::new();
    hasher.update((k as u64).to_le_bytes());
    for v in labels {
        hasher.update(v.to_le_bytes());
    }
    hex::encode(&hasher.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[category, product, variation, image]` rows for a full tree with the given fan-outs,
    /// ids globally unique per level, rows shuffled so the index carries no structure.
    fn tree(categories: usize, products: usize, variations: usize, images: usize, seed: u64) -> Vec<i64> {
        let mut rows = Vec::new();
        for c in 0..categories {
            for p in 0..products {
                for v in 0..variations {
                    for i in 0..images {
                        let product = c * products + p;
                        let variation = product * variations + v;
                        let image = variation * images + i;
                        rows.push([c as i64, product as i64, variation as i64, image as i64]);
                    }
                }
            }
        }
        rows.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        rows.concat()
    }

    fn hierarchical(batch_size: usize, seed: u64) -> SamplerConfig {
        SamplerConfig::new(SamplerKind::Hierarchical, batch_size, seed)
    }

    /// Splits a batch into groups (each starts at an anchor).
    fn groups(batch: &Batch) -> Vec<Vec<(usize, SlotRole)>> {
        let mut out: Vec<Vec<(usize, SlotRole)>> = Vec::new();
        for (&s, &role) in batch.indices.iter().zip(&batch.roles) {
            if role == SlotRole::Anchor {
                out.push(Vec::new());
            }
            out.last_mut().expect("a batch starts with an anchor").push((s, role));
        }
        out
    }

    /// Whether `a` and `b` share the first `shared` columns and differ in column `shared`.
    fn is_partner(labels: &[i64], k: usize, a: usize, b: usize, shared: usize) -> bool {
        let (ra, rb) = (&labels[a * k..(a + 1) * k], &labels[b * k..(b + 1) * k]);
        ra[..shared] == rb[..shared] && ra[shared] != rb[shared]
    }

    /// Brute force: does any sample partner `a` at `shared` columns?
    fn partner_exists(labels: &[i64], k: usize, a: usize, shared: usize) -> bool {
        (0..labels.len() / k).any(|b| is_partner(labels, k, a, b, shared))
    }

    /// Checks every group of `batches` against the labels: the slot order, each partner's
    /// relation to its anchor, and that a fallback happens exactly when no partner exists.
    fn check_groups(labels: &[i64], k: usize, batches: &[Batch], batch_size: usize) -> (usize, usize) {
        let (mut partners, mut fallbacks) = (0, 0);
        for batch in batches {
            assert_eq!(batch.indices.len(), batch_size);
            let groups = groups(batch);
            for (g, group) in groups.iter().enumerate() {
                let full = g + 1 < groups.len();
                assert!(group.len() == k + 1 || (!full && group.len() < k + 1), "only the last group is truncated");
                let anchor = group[0].0;
                for (slot, &(s, role)) in group.iter().enumerate().skip(1) {
                    let shared = k - slot; // K-1 first, 0 last
                    match role {
                        SlotRole::Partner { shared: got } => {
                            assert_eq!(got, shared);
                            assert!(
                                is_partner(labels, k, anchor, s, shared),
                                "{s} is no partner of {anchor} at {shared}"
                            );
                            partners += 1;
                        }
                        SlotRole::Fallback { shared: got } => {
                            assert_eq!(got, shared);
                            assert!(!partner_exists(labels, k, anchor, shared), "fell back although a partner exists");
                            fallbacks += 1;
                        }
                        SlotRole::Anchor => panic!("an anchor inside a group"),
                    }
                }
            }
        }
        (partners, fallbacks)
    }

    #[test]
    fn every_group_has_its_partners_when_the_data_allows() {
        let labels = tree(3, 2, 2, 2, 1); // 24 samples, every level has partners
        let k = 4;
        for batch_size in [10, 12, 3] {
            let mut sampler = Sampler::new(&labels, k, hierarchical(batch_size, 42)).unwrap();
            let batches: Vec<Batch> = (0..30).map(|_| sampler.next_batch_with_roles()).collect();
            let (partners, fallbacks) = check_groups(&labels, k, &batches, batch_size);
            assert_eq!(fallbacks, 0);
            assert!(partners > 0);
            assert_eq!(sampler.stats().fallbacks, vec![0; k]);
            if batch_size == 12 {
                // 5 + 5 + a truncated group of anchor and same-variation partner.
                assert!(batches.iter().all(|b| groups(b).iter().map(Vec::len).collect::<Vec<_>>() == [5, 5, 2]));
            }
        }
    }

    #[test]
    fn missing_levels_fall_back_within_the_try_bound() {
        // One image per variation (no same-variation partner anywhere) and category 2 with a
        // single product (no same-category partner for its samples).
        let mut labels = tree(2, 2, 3, 1, 2);
        labels.extend([2, 100, 1000, 5000, 2, 100, 1001, 5001]);
        let (k, n) = (4, labels.len() / 4);
        let batch_size = 15;
        let mut sampler = Sampler::new(&labels, k, hierarchical(batch_size, 3)).unwrap();
        let batches: Vec<Batch> = (0..40).map(|_| sampler.next_batch_with_roles()).collect();
        let (_, fallbacks) = check_groups(&labels, k, &batches, batch_size);
        let stats = sampler.stats().clone();
        assert_eq!(stats.fallbacks[3], stats.groups, "every group lacks a same-variation partner");
        assert_eq!(stats.partners[3], 0);
        assert!(stats.fallbacks[1] > 0 && stats.partners[1] > 0, "only category 2 lacks product partners");
        assert_eq!(stats.fallbacks[0] + stats.fallbacks[2], 0);
        assert_eq!(fallbacks as u64, stats.fallbacks.iter().sum::<u64>());
        let slots = stats.groups * k as u64;
        assert!(stats.draws <= slots * sampler.config().max_tries as u64);
        assert!(batches.iter().flat_map(|b| &b.indices).all(|&s| s < n));

        // A single category and product: only the same-variation partner exists; with one
        // sample in the whole table, nothing does and every slot repeats it after max_tries.
        let one_product = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2];
        let mut sampler = Sampler::new(&one_product, 4, hierarchical(5, 0)).unwrap();
        check_groups(&one_product, 4, &[sampler.next_batch_with_roles()], 5);
        let mut alone = Sampler::new(&[7, 7, 7, 7], 4, hierarchical(5, 0)).unwrap();
        assert_eq!(alone.next_batch(), vec![0; 5]);
        assert_eq!(alone.stats().draws, 4 * 10);
        assert_eq!(alone.stats().repeats, 4);
    }

    #[test]
    fn partners_and_fallbacks_match_brute_force_on_ragged_labels() {
        // Ids local to their parent (product 0 exists in several categories) and ragged sizes.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let labels: Vec<i64> =
            (0..60).flat_map(|i| [rng.random_range(0..3), rng.random_range(0..3), rng.random_range(0..2), i]).collect();
        for batch_size in [7, 25] {
            let mut sampler = Sampler::new(&labels, 4, hierarchical(batch_size, 5)).unwrap();
            let batches: Vec<Batch> = (0..20).map(|_| sampler.next_batch_with_roles()).collect();
            check_groups(&labels, 4, &batches, batch_size);
        }
    }

    #[test]
    fn partners_are_drawn_from_the_whole_candidate_set() {
        let labels = tree(2, 3, 2, 2, 4);
        let index = PrefixIndex::new(&labels, 24, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for anchor in [0, 5, 17] {
            for shared in 0..4 {
                let expected: HashSet<usize> = (0..24).filter(|&b| is_partner(&labels, 4, anchor, b, shared)).collect();
                assert_eq!(index.candidates(anchor, shared), expected.len());
                let drawn: HashSet<usize> =
                    (0..400).map(|_| index.candidate(anchor, shared, rng.random_range(0..expected.len()))).collect();
                assert_eq!(drawn, expected, "anchor {anchor}, shared {shared}");
            }
        }
    }

    #[test]
    fn same_seed_same_batches_other_seed_other_batches() {
        let labels = tree(3, 2, 2, 2, 1);
        for kind in [SamplerKind::Hierarchical, SamplerKind::Random] {
            let run = |seed| {
                let mut s = Sampler::new(&labels, 4, SamplerConfig::new(kind, 8, seed)).unwrap();
                (0..20).map(|_| s.next_batch()).collect::<Vec<_>>()
            };
            assert_eq!(run(1), run(1), "{kind:?}");
            assert_ne!(run(1), run(2), "{kind:?}");
        }
    }

    #[test]
    fn a_saved_state_resumes_the_same_sequence() {
        let labels = tree(3, 2, 2, 2, 1);
        for kind in [SamplerKind::Hierarchical, SamplerKind::Random] {
            let mut original = Sampler::new(&labels, 4, SamplerConfig::new(kind, 7, 9)).unwrap();
            for _ in 0..5 {
                original.next_batch(); // 35 anchors (random) / 10 (hierarchical) drawn
            }
            let json = serde_json::to_string(&original.state()).unwrap();
            let state: SamplerState = serde_json::from_str(&json).unwrap();
            assert_eq!(state, original.state());
            let mut resumed = Sampler::from_state(&labels, 4, &state).unwrap();
            for _ in 0..20 {
                assert_eq!(resumed.next_batch(), original.next_batch(), "{kind:?}");
            }
            assert!(original.epoch() >= 2, "the comparison crossed epoch ends");
            assert_eq!(resumed.state(), original.state());

            let mut other = labels.clone();
            other[3] = 999;
            assert!(matches!(Sampler::from_state(&other, 4, &state), Err(Error::SamplerState { .. })));
            assert!(Sampler::from_state(&labels[..40], 4, &state).is_err());
        }
    }

    #[test]
    fn every_sample_is_an_anchor_once_per_epoch() {
        let labels = tree(3, 2, 2, 2, 1);
        let n = 24;
        for (kind, batch_size) in
            [(SamplerKind::Hierarchical, 7), (SamplerKind::Hierarchical, 5), (SamplerKind::Random, 5)]
        {
            let mut sampler = Sampler::new(&labels, 4, SamplerConfig::new(kind, batch_size, 6)).unwrap();
            let mut anchors = Vec::new();
            while anchors.len() < 3 * n {
                let batch = sampler.next_batch_with_roles();
                anchors.extend(
                    batch.indices.iter().zip(&batch.roles).filter(|(_, r)| **r == SlotRole::Anchor).map(|(s, _)| *s),
                );
            }
            let epochs: Vec<Vec<usize>> = anchors.chunks(n).take(3).map(<[usize]>::to_vec).collect();
            for epoch in &epochs {
                let mut sorted = epoch.clone();
                sorted.sort();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "{kind:?}");
            }
            assert_ne!(epochs[0], epochs[1], "each epoch is shuffled anew");
            assert_ne!(epochs[0], (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn bad_configurations_are_errors() {
        let labels = tree(1, 1, 1, 2, 0);
        assert!(Sampler::new(&labels, 3, hierarchical(4, 0)).is_err(), "8 values are not N x 3");
        assert!(Sampler::new(&[], 4, hierarchical(4, 0)).is_err());
        assert!(Sampler::new(&labels, 4, hierarchical(0, 0)).is_err());
        let no_tries = SamplerConfig { max_tries: 0, ..hierarchical(4, 0) };
        assert!(matches!(Sampler::new(&labels, 4, no_tries), Err(Error::SamplerConfig { .. })));
    }
}
