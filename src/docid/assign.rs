//! Unique DocIDs. The quantizer gives each document a code per level; documents that end up
//! with the same full code ("collide") are re-assigned, within their prefix (all levels but the
//! last), to the last-level codes still free there, by entropic optimal transport
//! (Sinkhorn–Knopp, as MERGE does) over the documents' last-level costs, rounded greedily to a
//! one-to-one assignment. When a prefix holds more documents than the codebook has codes, the
//! documents that do not fit move up a level (see [`resolve_collisions`]), so the result is
//! always a bijection as long as the whole code space is large enough.

use std::collections::{BTreeMap, BTreeSet};

/// The shape of the DocID space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CodeSpace {
    /// Codes per DocID (RQ levels), 1..=8.
    pub levels: usize,
    /// Values per code, 2..=256 (codes are stored as one byte each).
    pub codebook_size: usize,
}

impl CodeSpace {
    /// MERGE's default: 4 levels of 256 codes.
    pub const DEFAULT: CodeSpace = CodeSpace { levels: 4, codebook_size: 256 };

    /// How many distinct DocIDs exist.
    pub fn capacity(&self) -> u128 {
        (self.codebook_size as u128).pow(self.levels as u32)
    }

    fn validate(&self) -> Result<(), AssignmentError> {
        if !(1..=8).contains(&self.levels) || !(2..=256).contains(&self.codebook_size) {
            return Err(AssignmentError::InvalidCodeSpace(*self));
        }
        Ok(())
    }
}

/// A DocID: one code per level, each below the codebook size.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct DocId(pub Vec<u8>);

impl DocId {
    /// The codes as stored (one byte per level); also the `docid_reverse` key.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// All codes but the last.
    pub fn prefix(&self) -> &[u8] {
        &self.0[..self.0.len() - 1]
    }
}

impl std::fmt::Display for DocId {
    /// The paper's token form, e.g. `<a_1><b_0><c_2><d_7>`.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (level, code) in self.0.iter().enumerate() {
            write!(formatter, "<{}_{code}>", (b'a' + level as u8) as char)?;
        }
        Ok(())
    }
}

/// One document as the quantizer left it.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentCodes {
    /// The quantizer's code per level.
    pub codes: Vec<u8>,
    /// Cost of each last-level code for this document (the squared distance of its last residual
    /// to each last-level codeword): `codebook_size` values, lower is better.
    pub last_level_costs: Vec<f32>,
}

/// Sinkhorn settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkhornConfig {
    /// Entropic regularisation ε, relative to the spread of each problem's costs.
    pub epsilon: f64,
    /// Row/column normalisation rounds.
    pub iterations: usize,
}

impl Default for SinkhornConfig {
    fn default() -> Self {
        Self { epsilon: 0.05, iterations: 100 }
    }
}

/// What the resolution did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct AssignmentReport {
    /// Documents.
    pub documents: usize,
    /// Documents whose quantizer code was shared with another document.
    pub collisions_before: usize,
    /// Documents sharing a DocID after resolution (0 unless the result is broken).
    pub collisions_after: usize,
    /// Documents moved to another last-level code of their prefix.
    pub reassigned_in_prefix: usize,
    /// Documents moved to another prefix because theirs was full.
    pub moved_up: usize,
}

/// Why DocIDs could not be assigned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AssignmentError {
    /// Levels or codebook size out of range.
    #[error("invalid code space {0:?}: 1..=8 levels of 2..=256 codes")]
    InvalidCodeSpace(CodeSpace),
    /// A document's codes or costs do not fit the code space.
    #[error("document {index}: {detail}")]
    InvalidDocument {
        /// Position in the input.
        index: usize,
        /// What is wrong.
        detail: String,
    },
    /// More documents than DocIDs.
    #[error("{documents} documents do not fit {capacity} DocIDs")]
    CapacityExceeded {
        /// Documents to place.
        documents: usize,
        /// Distinct DocIDs.
        capacity: u128,
    },
}

/// Assigns every document a distinct DocID.
///
/// 1. A document whose quantizer code no other document has keeps it.
/// 2. Per prefix (all levels but the last), the documents of colliding groups share the
///    last-level codes that no keeper uses. Sinkhorn–Knopp on `exp(-cost / ε)` with one unit per
///    document and the free codes' capacity spread evenly gives a transport plan; it is rounded
///    to a one-to-one assignment greedily, largest mass first (ties: lower document index, then
///    lower code), so the result is deterministic.
/// 3. Documents left without a code because their prefix has fewer free codes than colliders
///    ("overflow") move up a level: each is placed in the sibling prefix — same codes above the
///    level being changed — with the most free last-level codes (ties: the smallest code), at its
///    cheapest free last-level code there; if no sibling has room, the next level up is searched
///    the same way, up to the first level. Overflow is taken in order of document index.
///
/// Fails only if the documents outnumber the code space, or on malformed input. Returns the
/// DocIDs in input order and a report.
pub fn resolve_collisions(documents: &[DocumentCodes], space: CodeSpace, sinkhorn: SinkhornConfig) -> Result<(Vec<DocId>, AssignmentReport), AssignmentError> {
    space.validate()?;
    if documents.len() as u128 > space.capacity() {
        return Err(AssignmentError::CapacityExceeded { documents: documents.len(), capacity: space.capacity() });
    }
    for (index, document) in documents.iter().enumerate() {
        if document.codes.len() != space.levels || document.codes.iter().any(|code| *code as usize >= space.codebook_size) {
            return Err(AssignmentError::InvalidDocument { index, detail: format!("codes {:?} do not fit {space:?}", document.codes) });
        }
        if document.last_level_costs.len() != space.codebook_size || document.last_level_costs.iter().any(|cost| !cost.is_finite()) {
            return Err(AssignmentError::InvalidDocument {
                index,
                detail: format!("{} last-level costs (finite values expected, {} of them)", document.last_level_costs.len(), space.codebook_size),
            });
        }
    }
    let mut report = AssignmentReport { documents: documents.len(), ..Default::default() };
    let mut groups: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
    for (index, document) in documents.iter().enumerate() {
        groups.entry(document.codes.as_slice()).or_default().push(index);
    }
    let mut assigned: Vec<Option<DocId>> = vec![None; documents.len()];
    let mut occupied: BTreeSet<Vec<u8>> = BTreeSet::new();
    // Colliding documents per prefix.
    let mut colliders: BTreeMap<Vec<u8>, Vec<usize>> = BTreeMap::new();
    for (codes, members) in &groups {
        if members.len() == 1 {
            assigned[members[0]] = Some(DocId(codes.to_vec()));
            occupied.insert(codes.to_vec());
        } else {
            report.collisions_before += members.len();
            colliders.entry(codes[..codes.len() - 1].to_vec()).or_default().extend(members);
        }
    }
    let mut overflow: Vec<usize> = Vec::new();
    for (prefix, members) in &colliders {
        let free = free_last_codes(prefix, space, &|docid: &[u8]| occupied.contains(docid));
        let placed = sinkhorn_assignment(documents, members, &free, sinkhorn);
        for (&document, code) in members.iter().zip(placed) {
            match code {
                Some(code) => {
                    let docid = with_last(prefix, code);
                    if docid != documents[document].codes {
                        report.reassigned_in_prefix += 1;
                    }
                    occupied.insert(docid.clone());
                    assigned[document] = Some(DocId(docid));
                }
                None => overflow.push(document),
            }
        }
    }
    overflow.sort_unstable();
    for document in overflow {
        let docid = move_up(&documents[document], space, &|docid: &[u8]| occupied.contains(docid)).expect("capacity was checked, so a free DocID exists");
        occupied.insert(docid.clone());
        assigned[document] = Some(DocId(docid));
        report.moved_up += 1;
    }
    let docids: Vec<DocId> = assigned.into_iter().map(|docid| docid.expect("every document is placed")).collect();
    report.collisions_after = docids.len() - docids.iter().collect::<BTreeSet<_>>().len();
    debug_assert_eq!(report.collisions_after, 0, "resolution yields a bijection");
    Ok((docids, report))
}

fn with_last(prefix: &[u8], code: u8) -> Vec<u8> {
    let mut docid = Vec::with_capacity(prefix.len() + 1);
    docid.extend_from_slice(prefix);
    docid.push(code);
    docid
}

/// Rounds a Sinkhorn plan to a one-to-one assignment of `members` to `free` codes; members
/// beyond the free codes get `None` (overflow).
///
/// The transport problem is made balanced with one dummy side: when codes outnumber documents a
/// dummy document takes the spare capacity (same cost everywhere, so it prefers no code); when
/// documents outnumber codes a dummy code takes the excess documents (at the largest real cost,
/// so the documents whose free codes are all expensive are the ones that overflow). Every real
/// document has mass 1 and every real code capacity 1.
fn sinkhorn_assignment(documents: &[DocumentCodes], members: &[usize], free: &[u8], config: SinkhornConfig) -> Vec<Option<u8>> {
    if free.is_empty() {
        return vec![None; members.len()];
    }
    let mut costs: Vec<Vec<f64>> = members
        .iter()
        .map(|&document| free.iter().map(|&code| f64::from(documents[document].last_level_costs[code as usize])).collect())
        .collect();
    let highest = costs.iter().flatten().copied().fold(f64::MIN, f64::max);
    let mut row_mass = vec![1.0; members.len()];
    let mut column_mass = vec![1.0; free.len()];
    if free.len() > members.len() {
        costs.push(vec![highest; free.len()]);
        row_mass.push((free.len() - members.len()) as f64);
    } else if members.len() > free.len() {
        for row in &mut costs {
            row.push(highest);
        }
        column_mass.push((members.len() - free.len()) as f64);
    }
    let plan = sinkhorn_plan(&costs, &row_mass, &column_mass, config);
    let mut entries: Vec<(f64, usize, usize)> = Vec::with_capacity(members.len() * free.len());
    for (row, masses) in plan.iter().enumerate().take(members.len()) {
        for (column, mass) in masses.iter().enumerate().take(free.len()) {
            entries.push((*mass, row, column));
        }
    }
    entries.sort_by(|left, right| right.0.total_cmp(&left.0).then(left.1.cmp(&right.1)).then(left.2.cmp(&right.2)));
    let mut placed: Vec<Option<u8>> = vec![None; members.len()];
    let mut taken = vec![false; free.len()];
    let mut remaining = members.len().min(free.len());
    for (_, row, column) in entries {
        if remaining == 0 {
            break;
        }
        if placed[row].is_none() && !taken[column] {
            placed[row] = Some(free[column]);
            taken[column] = true;
            remaining -= 1;
        }
    }
    placed
}

/// Sinkhorn–Knopp: the entropic transport plan for `costs[row][column]` between `row_mass` and
/// `column_mass` (equal totals), computed in the log domain for stability. ε is relative: it is
/// scaled by the spread of the costs, so one setting suits any cost scale.
pub fn sinkhorn_plan(costs: &[Vec<f64>], row_mass: &[f64], column_mass: &[f64], config: SinkhornConfig) -> Vec<Vec<f64>> {
    let rows = costs.len();
    let columns = costs.first().map_or(0, Vec::len);
    debug_assert_eq!(row_mass.len(), rows);
    debug_assert_eq!(column_mass.len(), columns);
    debug_assert!((row_mass.iter().sum::<f64>() - column_mass.iter().sum::<f64>()).abs() < 1e-6 * rows.max(1) as f64);
    if rows == 0 || columns == 0 {
        return vec![Vec::new(); rows];
    }
    let (minimum, maximum) = costs.iter().flatten().fold((f64::MAX, f64::MIN), |(low, high), cost| (low.min(*cost), high.max(*cost)));
    let epsilon = config.epsilon.max(1e-6) * (maximum - minimum).max(1e-9);
    let log_kernel: Vec<Vec<f64>> = costs.iter().map(|row| row.iter().map(|cost| -(cost - minimum) / epsilon).collect()).collect();
    let log_row_mass: Vec<f64> = row_mass.iter().map(|mass| mass.ln()).collect();
    let log_column_mass: Vec<f64> = column_mass.iter().map(|mass| mass.ln()).collect();
    let mut log_u = vec![0.0_f64; rows];
    let mut log_v = vec![0.0_f64; columns];
    let log_sum_exp = |values: &[f64]| -> f64 {
        let peak = values.iter().copied().fold(f64::MIN, f64::max);
        peak + values.iter().map(|value| (value - peak).exp()).sum::<f64>().ln()
    };
    let mut scratch_row = vec![0.0_f64; columns];
    let mut scratch_column = vec![0.0_f64; rows];
    for _ in 0..config.iterations.max(1) {
        for row in 0..rows {
            for column in 0..columns {
                scratch_row[column] = log_kernel[row][column] + log_v[column];
            }
            log_u[row] = log_row_mass[row] - log_sum_exp(&scratch_row);
        }
        for column in 0..columns {
            for row in 0..rows {
                scratch_column[row] = log_kernel[row][column] + log_u[row];
            }
            log_v[column] = log_column_mass[column] - log_sum_exp(&scratch_column);
        }
    }
    (0..rows).map(|row| (0..columns).map(|column| (log_kernel[row][column] + log_u[row] + log_v[column]).exp()).collect()).collect()
}

/// The last-level codes under `prefix` that `is_occupied` says are free, ascending.
pub fn free_last_codes(prefix: &[u8], space: CodeSpace, is_occupied: &dyn Fn(&[u8]) -> bool) -> Vec<u8> {
    (0..space.codebook_size as u16).map(|code| code as u8).filter(|code| !is_occupied(&with_last(prefix, *code))).collect()
}

/// The cheapest free DocID for `document` under its own prefix, else by the overflow rule of
/// [`resolve_collisions`]: the sibling prefix with the most free codes, one level up at a time.
/// `None` only when the whole space is full.
pub fn place_one(document: &DocumentCodes, space: CodeSpace, is_occupied: &dyn Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    if !is_occupied(&document.codes) {
        return Some(document.codes.clone());
    }
    let prefix = &document.codes[..space.levels - 1];
    if let Some(code) = cheapest(document, &free_last_codes(prefix, space, is_occupied)) {
        return Some(with_last(prefix, code));
    }
    move_up(document, space, is_occupied)
}

fn cheapest(document: &DocumentCodes, free: &[u8]) -> Option<u8> {
    free.iter()
        .copied()
        .min_by(|left, right| document.last_level_costs[*left as usize].total_cmp(&document.last_level_costs[*right as usize]).then(left.cmp(right)))
}

/// The overflow rule: a free DocID in the sibling prefix with the most room, one level up at a
/// time (see [`resolve_collisions`]).
fn move_up(document: &DocumentCodes, space: CodeSpace, is_occupied: &dyn Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let last = space.levels - 1;
    if last == 0 {
        return cheapest(document, &free_last_codes(&[], space, is_occupied)).map(|code| vec![code]);
    }
    // Change the code at `level` (last - 1 down to 0); search every prefix under the kept codes.
    for level in (0..last).rev() {
        let kept = &document.codes[..level];
        let mut best: Option<(usize, Vec<u8>, Vec<u8>)> = None; // (free count, prefix, free codes)
        for_each_prefix(kept, last, space.codebook_size, &mut |prefix: &[u8]| {
            let free = free_last_codes(prefix, space, is_occupied);
            // Strictly more room wins; prefixes are visited in ascending order, so ties keep the smallest.
            if !free.is_empty() && best.as_ref().is_none_or(|(count, _, _)| free.len() > *count) {
                best = Some((free.len(), prefix.to_vec(), free));
            }
        });
        if let Some((_, prefix, free)) = best {
            return cheapest(document, &free).map(|code| with_last(&prefix, code));
        }
    }
    None
}

/// Calls `visit` with every prefix of length `length` that starts with `kept`.
fn for_each_prefix(kept: &[u8], length: usize, codebook_size: usize, visit: &mut dyn FnMut(&[u8])) {
    let mut prefix = kept.to_vec();
    fn recurse(prefix: &mut Vec<u8>, length: usize, codebook_size: usize, visit: &mut dyn FnMut(&[u8])) {
        if prefix.len() == length {
            visit(prefix);
            return;
        }
        for code in 0..codebook_size as u16 {
            prefix.push(code as u8);
            recurse(prefix, length, codebook_size, visit);
            prefix.pop();
        }
    }
    recurse(&mut prefix, length, codebook_size, visit);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn document(codes: &[u8], costs: &[f32]) -> DocumentCodes {
        DocumentCodes { codes: codes.to_vec(), last_level_costs: costs.to_vec() }
    }

    #[test]
    fn unique_codes_are_kept_and_colliders_take_their_cheapest_free_codes() {
        let space = CodeSpace { levels: 2, codebook_size: 4 };
        let documents = vec![
            document(&[0, 0], &[0.0, 1.0, 5.0, 9.0]),
            document(&[0, 0], &[0.1, 9.0, 0.2, 9.0]),
            document(&[1, 3], &[9.0, 9.0, 9.0, 0.0]),
        ];
        let (docids, report) = resolve_collisions(&documents, space, SinkhornConfig::default()).unwrap();
        assert_eq!(docids[2], DocId(vec![1, 3]), "a unique code is kept");
        // Two colliders, four free codes: document 0 prefers code 0 (then 1), document 1 prefers 0
        // (then 2). The optimal assignment is 0 → code 0, 1 → code 2, total cost 0.2.
        assert_eq!(docids[0], DocId(vec![0, 0]));
        assert_eq!(docids[1], DocId(vec![0, 2]));
        assert_eq!(report.collisions_before, 2);
        assert_eq!(report.collisions_after, 0);
        assert_eq!(docids[0].to_string(), format!("<a_0><b_{}>", docids[0].0[1]));
    }

    #[test]
    fn a_full_prefix_sends_the_overflow_to_the_roomiest_sibling() {
        let space = CodeSpace { levels: 2, codebook_size: 2 };
        // Three documents want prefix 0 (2 slots); prefix 1 has both slots free.
        let documents = vec![document(&[0, 0], &[0.0, 1.0]), document(&[0, 0], &[0.0, 1.0]), document(&[0, 1], &[1.0, 0.0])];
        let (docids, report) = resolve_collisions(&documents, space, SinkhornConfig::default()).unwrap();
        assert_eq!(docids[2], DocId(vec![0, 1]));
        let unique: BTreeSet<&DocId> = docids.iter().collect();
        assert_eq!(unique.len(), 3);
        assert_eq!(report.moved_up, 1);
        assert!(docids.iter().filter(|docid| docid.0[0] == 1).count() == 1, "the overflow went to prefix 1: {docids:?}");
    }

    #[test]
    fn too_many_documents_and_bad_input_are_errors() {
        let space = CodeSpace { levels: 1, codebook_size: 2 };
        let three = vec![document(&[0], &[0.0, 0.0]); 3];
        assert!(matches!(resolve_collisions(&three, space, SinkhornConfig::default()), Err(AssignmentError::CapacityExceeded { .. })));
        let bad = vec![document(&[5], &[0.0, 0.0])];
        assert!(matches!(resolve_collisions(&bad, space, SinkhornConfig::default()), Err(AssignmentError::InvalidDocument { .. })));
        let two = vec![document(&[0], &[0.0, 1.0]); 2];
        let (docids, _) = resolve_collisions(&two, space, SinkhornConfig::default()).unwrap();
        assert_ne!(docids[0], docids[1]);
    }

    #[test]
    fn sinkhorn_plan_has_the_requested_marginals() {
        let costs = vec![vec![0.0, 1.0, 2.0], vec![2.0, 0.0, 1.0]];
        let plan = sinkhorn_plan(&costs, &[1.0, 1.0], &[2.0 / 3.0; 3], SinkhornConfig { epsilon: 0.1, iterations: 500 });
        for row in &plan {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        }
        for column in 0..3 {
            let mass: f64 = plan.iter().map(|row| row[column]).sum();
            assert!((mass - 2.0 / 3.0).abs() < 1e-3, "column {column}: {mass}");
        }
        assert!(plan[0][0] > plan[0][2] && plan[1][1] > plan[1][0], "mass follows low cost");
    }

    /// Property: for random corpora with heavy duplication — including prefixes holding more
    /// documents than the codebook and corpora filling the whole space — the result is always a
    /// bijection onto valid DocIDs, unique codes are kept, and the report adds up.
    #[test]
    fn resolution_is_always_a_bijection() {
        for seed in 0..300_u64 {
            let mut random = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let levels = random.random_range(1..=4);
            let codebook_size = random.random_range(2..=6);
            let space = CodeSpace { levels, codebook_size };
            let capacity = space.capacity() as usize;
            let documents_count = random.random_range(1..=capacity.min(300));
            // Codes drawn from a few hot values per level: heavy duplication.
            let hot = random.random_range(1..=codebook_size);
            let documents: Vec<DocumentCodes> = (0..documents_count)
                .map(|_| DocumentCodes {
                    codes: (0..levels).map(|_| random.random_range(0..hot) as u8).collect(),
                    last_level_costs: (0..codebook_size).map(|_| random.random_range(0.0..4.0)).collect(),
                })
                .collect();
            let (docids, report) = resolve_collisions(&documents, space, SinkhornConfig::default()).unwrap_or_else(|error| panic!("seed {seed}: {error}"));
            assert_eq!(docids.len(), documents.len());
            let unique: BTreeSet<&DocId> = docids.iter().collect();
            assert_eq!(unique.len(), docids.len(), "seed {seed}: not a bijection");
            assert!(docids.iter().all(|docid| docid.0.len() == levels && docid.0.iter().all(|code| (*code as usize) < codebook_size)), "seed {seed}");
            let mut counts: BTreeMap<&[u8], usize> = BTreeMap::new();
            for document in &documents {
                *counts.entry(document.codes.as_slice()).or_default() += 1;
            }
            for (document, docid) in documents.iter().zip(&docids) {
                if counts[document.codes.as_slice()] == 1 {
                    assert_eq!(docid.0, document.codes, "seed {seed}: a unique code was changed");
                }
            }
            assert_eq!(report.collisions_before, counts.values().filter(|count| **count > 1).sum::<usize>(), "seed {seed}");
            assert_eq!(report.collisions_after, 0);
        }
    }
}
