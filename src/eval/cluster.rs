//! Seeded k-means (k-means++ seeding, Lloyd iterations) and normalised mutual information.

use std::collections::BTreeMap;

use ndarray::ArrayView2;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// k-means settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KMeansConfig {
    pub k: usize,
    pub seed: u64,
    /// Lloyd iterations at most (it stops earlier when no assignment changes).
    pub max_iter: usize,
}

/// A clustering: each point's cluster, the centroids and the sum of squared distances.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    pub assignment: Vec<usize>,
    /// `k × dim`, row-major.
    pub centroids: Vec<f64>,
    pub inertia: f64,
    pub iterations: usize,
}

fn sq_dist(a: &[f32], c: &[f64]) -> f64 {
    a.iter().zip(c).map(|(&x, &y)| (x as f64 - y) * (x as f64 - y)).sum()
}

/// The nearest centroid of `p` and its squared distance (ties: the lower index).
fn nearest(p: &[f32], centroids: &[f64], dim: usize) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (j, c) in centroids.chunks_exact(dim).enumerate() {
        let d = sq_dist(p, c);
        if d < best.1 {
            best = (j, d);
        }
    }
    best
}

/// k-means++ seeding: the first centre uniform, each next one drawn with probability
/// proportional to the squared distance to the nearest centre chosen so far.
fn seed_centroids(points: ArrayView2<f32>, k: usize, rng: &mut impl Rng) -> Vec<f64> {
    let (n, dim) = points.dim();
    let row = |i: usize| points.row(i).iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let mut centroids = row(rng.random_range(0..n));
    let mut d2: Vec<f64> = (0..n).map(|i| sq_dist(points.row(i).as_slice().unwrap(), &centroids)).collect();
    for _ in 1..k {
        let total: f64 = d2.iter().sum();
        let pick = if total > 0.0 {
            let mut r = rng.random::<f64>() * total;
            let mut chosen = n - 1;
            for (i, &d) in d2.iter().enumerate() {
                if r < d {
                    chosen = i;
                    break;
                }
                r -= d;
            }
            chosen
        } else {
            rng.random_range(0..n) // every point already is a centre
        };
        let c = row(pick);
        for (i, d) in d2.iter_mut().enumerate() {
            *d = d.min(sq_dist(points.row(i).as_slice().unwrap(), &c));
        }
        centroids.extend(c);
    }
    debug_assert_eq!(centroids.len(), k * dim);
    centroids
}

/// Clusters the rows of `points` (standard layout) into `cfg.k` clusters. An emptied cluster is
/// re-seeded with the point farthest from its centroid. `k` is clamped to `1..=n`.
pub fn kmeans(points: ArrayView2<f32>, cfg: &KMeansConfig) -> KMeans {
    let points = points.as_standard_layout();
    let points = points.view();
    let (n, dim) = points.dim();
    if n == 0 {
        return KMeans { assignment: Vec::new(), centroids: Vec::new(), inertia: 0.0, iterations: 0 };
    }
    let k = cfg.k.clamp(1, n);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut centroids = seed_centroids(points, k, &mut rng);
    let row = |i: usize| points.row(i).to_slice().expect("standard layout");
    let mut assignment = vec![usize::MAX; n];
    let mut iterations = 0;
    loop {
        let nearest_all: Vec<(usize, f64)> = (0..n).into_par_iter().map(|i| nearest(row(i), &centroids, dim)).collect();
        let changed = nearest_all.iter().zip(&assignment).filter(|(a, b)| a.0 != **b).count();
        for (a, (j, _)) in assignment.iter_mut().zip(&nearest_all) {
            *a = *j;
        }
        if changed == 0 || iterations >= cfg.max_iter {
            let inertia = nearest_all.iter().map(|p| p.1).sum();
            return KMeans { assignment, centroids, inertia, iterations };
        }
        iterations += 1;
        // Update step.
        let mut sums = vec![0.0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (i, &j) in assignment.iter().enumerate() {
            counts[j] += 1;
            for (s, &v) in sums[j * dim..(j + 1) * dim].iter_mut().zip(row(i)) {
                *s += v as f64;
            }
        }
        let mut far: Vec<(usize, f64)> = nearest_all.iter().copied().enumerate().map(|(i, (_, d))| (i, d)).collect();
        far.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut far = far.into_iter().map(|p| p.0);
        for j in 0..k {
            let c = &mut centroids[j * dim..(j + 1) * dim];
            if counts[j] == 0 {
                if let Some(i) = far.next() {
                    for (c, &v) in c.iter_mut().zip(row(i)) {
                        *c = v as f64;
                    }
                }
            } else {
                for (c, s) in c.iter_mut().zip(&sums[j * dim..(j + 1) * dim]) {
                    *c = s / counts[j] as f64;
                }
            }
        }
    }
}

fn entropy(counts: impl Iterator<Item = usize>, n: f64) -> f64 {
    counts.filter(|&c| c > 0).map(|c| c as f64 / n).map(|p| -p * p.ln()).sum()
}

/// Normalised mutual information with the arithmetic-mean normaliser,
/// `MI(U, V) / ((H(U) + H(V)) / 2)` — scikit-learn's `normalized_mutual_info_score` default,
/// including its limit cases: 1 when both labelings have one class (or none), 0 when the mutual
/// information is 0.
pub fn nmi(a: &[usize], b: &[usize]) -> f64 {
    assert_eq!(a.len(), b.len(), "labelings of different lengths");
    let n = a.len() as f64;
    // Ordered maps: the sums below run in a fixed order, so equal inputs give bit-equal results.
    let mut ca: BTreeMap<usize, usize> = BTreeMap::new();
    let mut cb: BTreeMap<usize, usize> = BTreeMap::new();
    let mut joint: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for (&x, &y) in a.iter().zip(b) {
        *ca.entry(x).or_default() += 1;
        *cb.entry(y).or_default() += 1;
        *joint.entry((x, y)).or_default() += 1;
    }
    if ca.len() == cb.len() && ca.len() <= 1 {
        return 1.0;
    }
    let mi: f64 = joint
        .iter()
        .map(|(&(x, y), &c)| {
            let pxy = c as f64 / n;
            pxy * (c as f64 * n / (ca[&x] as f64 * cb[&y] as f64)).ln()
        })
        .sum();
    // Rounding can leave a tiny negative value for independent labelings.
    let mi = mi.max(0.0);
    if mi == 0.0 {
        return 0.0;
    }
    let (ha, hb) = (entropy(ca.values().copied(), n), entropy(cb.values().copied(), n));
    mi / ((ha + hb) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use std::process::Command;

    /// `normalized_mutual_info_score` of scikit-learn, run in the test venv.
    fn sklearn_nmi(cases: &[(Vec<usize>, Vec<usize>)]) -> Vec<f64> {
        let json = serde_json::to_string(cases).unwrap();
        let out = Command::new(crate::graph::testutil::python())
            .args([
                "-c",
                "import json, sys\nfrom sklearn.metrics import normalized_mutual_info_score as nmi\n\
                 print(json.dumps([nmi(a, b) for a, b in json.loads(sys.stdin.readline())]))",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all((json + "\n").as_bytes())?;
                child.wait_with_output()
            })
            .expect("the test venv's Python runs (make pyenv)");
        assert!(out.status.success(), "scikit-learn failed:\n{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn labels(rng: &mut rand_chacha::ChaCha8Rng, n: usize, k: usize) -> Vec<usize> {
        (0..n).map(|_| rng.random_range(0..k)).collect()
    }

    #[test]
    fn nmi_matches_scikit_learn() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let truth = labels(&mut rng, 300, 6);
        // A noisy copy (80% kept), an independent labeling, a relabelled copy with ids far apart.
        let noisy: Vec<usize> =
            truth.iter().map(|&t| if rng.random::<f64>() < 0.8 { t } else { rng.random_range(0..9) }).collect();
        let independent = labels(&mut rng, 300, 4);
        let relabelled: Vec<usize> = truth.iter().map(|&t| 1000 - 7 * t).collect();
        let cases = vec![
            (truth.clone(), noisy),
            (truth.clone(), independent),
            (truth.clone(), relabelled),
            (vec![0, 0, 1, 1, 2, 2], vec![0, 0, 1, 2, 2, 2]),
            (vec![3; 10], vec![5; 10]),           // one class each: 1
            (vec![0, 0, 1, 1], vec![0, 0, 0, 0]), // one side constant: 0
            (vec![0, 1, 2, 3], vec![0, 1, 2, 3]), // all singletons
            (vec![0, 0, 1, 1], vec![0, 1, 0, 1]), // independent: 0
        ];
        let want = sklearn_nmi(&cases);
        for ((a, b), w) in cases.iter().zip(want) {
            let got = nmi(a, b);
            assert!((got - w).abs() < 1e-12, "nmi({a:?}, {b:?}) = {got}, scikit-learn {w}");
        }
    }

    /// `per` points around each of `centres` (spread `sigma`), rows in cluster order.
    fn blobs(centres: &[[f32; 3]], per: usize, sigma: f32, seed: u64) -> (Array2<f32>, Vec<usize>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut data = Vec::new();
        let mut truth = Vec::new();
        for (j, c) in centres.iter().enumerate() {
            for _ in 0..per {
                data.extend(c.iter().map(|&v| v + rng.random_range(-sigma..sigma)));
                truth.push(j);
            }
        }
        (Array2::from_shape_vec((truth.len(), 3), data).unwrap(), truth)
    }

    #[test]
    fn kmeans_finds_well_separated_blobs() {
        let centres = [[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [10.0, 10.0, 10.0]];
        let (x, truth) = blobs(&centres, 30, 1.0, 3);
        for seed in 0..5 {
            let km = kmeans(x.view(), &KMeansConfig { k: 5, seed, max_iter: 100 });
            assert!((nmi(&truth, &km.assignment) - 1.0).abs() < 1e-12, "seed {seed}");
        }
        // Deterministic under the seed.
        let a = kmeans(x.view(), &KMeansConfig { k: 5, seed: 9, max_iter: 100 });
        assert_eq!(a, kmeans(x.view(), &KMeansConfig { k: 5, seed: 9, max_iter: 100 }));
    }

    #[test]
    fn kmeans_result_is_a_lloyd_fixed_point() {
        // Overlapping blobs, so the answer is not obvious: check the two Lloyd conditions in f64.
        let (x, _) = blobs(&[[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [2.0, 0.0, 1.0]], 40, 1.5, 5);
        let km = kmeans(x.view(), &KMeansConfig { k: 4, seed: 1, max_iter: 300 });
        assert!(km.iterations < 300);
        let dim = 3;
        let mut inertia = 0.0;
        for (i, row) in x.rows().into_iter().enumerate() {
            let d: Vec<f64> = km
                .centroids
                .chunks(dim)
                .map(|c| row.iter().zip(c).map(|(&a, &b)| (a as f64 - b).powi(2)).sum())
                .collect();
            let best = d.iter().cloned().fold(f64::INFINITY, f64::min);
            assert!(d[km.assignment[i]] <= best + 1e-9, "point {i} is not at its nearest centroid");
            inertia += d[km.assignment[i]];
        }
        assert!((inertia - km.inertia).abs() < 1e-6 * inertia);
        for j in 0..4 {
            let members: Vec<usize> = (0..x.nrows()).filter(|&i| km.assignment[i] == j).collect();
            assert!(!members.is_empty(), "cluster {j} is empty");
            for c in 0..dim {
                let mean = members.iter().map(|&i| x[[i, c]] as f64).sum::<f64>() / members.len() as f64;
                assert!((mean - km.centroids[j * dim + c]).abs() < 1e-9, "centroid {j} is not its members' mean");
            }
        }
    }

    #[test]
    fn kmeans_edge_cases() {
        let x = Array2::from_shape_vec((3, 2), vec![0.0f32, 0.0, 0.0, 0.0, 1.0, 1.0]).unwrap();
        // More clusters than points: clamped; duplicate points cannot make a cluster empty forever.
        let km = kmeans(x.view(), &KMeansConfig { k: 5, seed: 0, max_iter: 10 });
        assert_eq!(km.centroids.len(), 3 * 2);
        assert_eq!(km.assignment[0], km.assignment[1]);
        assert_ne!(km.assignment[0], km.assignment[2]);
        assert!(km.inertia.abs() < 1e-12);
        let empty = Array2::<f32>::zeros((0, 4));
        assert!(kmeans(empty.view(), &KMeansConfig { k: 2, seed: 0, max_iter: 10 }).assignment.is_empty());
    }
}
