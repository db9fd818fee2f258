//! Loss options shared by the plain-Rust reference and the ONNX graph version of the losses.
//!
//! Defaults are those of the authors' published code (DESIGN §2): T = 0.1, T0 = 0.07,
//! `lambda_l = exp(1/l)`, official dedup, total divided by K.

use crate::{Error, Result};

/// Which loss to train with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// HiMulCon: `sum_l lambda_l * L_l`.
    Hmc,
    /// HiConE: `sum_l max(L_l, M_{l-1})`.
    Hce,
    /// HiMulConE: `sum_l lambda_l * max(L_l, M_{l-1})` (the paper's best).
    #[default]
    Hmce,
    /// Plain SupCon at one level (`supcon_level` leading label columns).
    Supcon,
    /// SimCLR: the anchor's other view is its only positive.
    Simclr,
    /// Softmax cross-entropy on one level (`ce_level`) through a linear classifier.
    Ce,
}

impl LossKind {
    /// The name used on the command line and in error messages.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Hmc => "hmc",
            LossKind::Hce => "hce",
            LossKind::Hmce => "hmce",
            LossKind::Supcon => "supcon",
            LossKind::Simclr => "simclr",
            LossKind::Ce => "ce",
        }
    }

    /// Whether this is one of the hierarchical losses (sum over levels l = 1..K-1).
    pub fn is_hierarchical(self) -> bool {
        matches!(self, LossKind::Hmc | LossKind::Hce | LossKind::Hmce)
    }
}

/// The per-level weight `lambda_l` of `hmc` and `hmce` (level 1 = finest weighs most).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Penalty {
    /// `lambda_l = exp(1/l)` (the published training script's choice).
    #[default]
    Exp,
    /// `lambda_l = 2^(1/l)` (the published `HMLC` class's own default).
    Pow2,
}

impl Penalty {
    /// `lambda_l` for level `l >= 1`.
    pub fn lambda(self, level: usize) -> f64 {
        let x = 1.0 / level as f64;
        match self {
            Penalty::Exp => x.exp(),
            Penalty::Pow2 => 2f64.powf(x),
        }
    }
}

/// Whether coarser levels see one representative per finer group (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dedup {
    /// After level l keep, in sorted key order, the first sample of each distinct level-l key
    /// (the published code's `unique(dim=0)`).
    #[default]
    Official,
    /// Every sample at every level (the paper's equations).
    None,
}

/// What the hierarchical total is divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// By K, the number of label columns (the published code).
    #[default]
    Columns,
    /// By K-1, the number of levels.
    Levels,
}

/// Everything that decides a loss value, given features and labels.
///
/// `supcon_level` and `ce_level` count *leading label columns*: a value `c` means "two samples
/// are of the same class when their first `c` label columns are equal". `None` means the
/// product level, `K - 2` columns, i.e. every column but the last two for labels laid out as
/// `[taxonomy..., product, variation, image]`. [`LossOptions::supcon_columns`] and
/// [`LossOptions::ce_columns`] resolve and check them against a label table's K.
#[derive(Debug, Clone, PartialEq, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct LossOptions {
    /// The loss.
    #[arg(long = "loss", value_enum, default_value_t = LossKind::Hmce)]
    pub kind: LossKind,
    /// Temperature T.
    #[arg(long, default_value_t = 0.1)]
    pub temperature: f64,
    /// Base temperature T0 (the loss is scaled by T/T0).
    #[arg(long, default_value_t = 0.07)]
    pub base_temperature: f64,
    /// Per-level weight of hmc / hmce: exp(1/l) or 2^(1/l).
    #[arg(long, value_enum, default_value_t = Penalty::Exp)]
    pub penalty: Penalty,
    /// Dedup between levels: official (published code) or none (paper's equations).
    #[arg(long, value_enum, default_value_t = Dedup::Official)]
    pub dedup: Dedup,
    /// Divide the hierarchical total by K (columns) or K-1 (levels).
    #[arg(long, value_enum, default_value_t = Normalize::Columns)]
    pub normalize: Normalize,
    /// SupCon baseline: how many leading label columns define a class (default: K-2, product).
    #[arg(long)]
    pub supcon_level: Option<usize>,
    /// CE baseline: how many leading label columns define a class (default: K-2, product).
    #[arg(long)]
    pub ce_level: Option<usize>,
    /// hmc / hce / hmce: add this weight times the SupCon loss at --supcon-level (default the
    /// product) to the total; 0 = the hierarchical loss alone.
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub supcon_mix: f64,
}

impl Default for LossOptions {
    fn default() -> Self {
        LossOptions {
            kind: LossKind::default(),
            temperature: 0.1,
            base_temperature: 0.07,
            penalty: Penalty::default(),
            dedup: Dedup::default(),
            normalize: Normalize::default(),
            supcon_level: None,
            ce_level: None,
            supcon_mix: 0.0,
        }
    }
}

impl LossOptions {
    /// Checks the temperatures (finite, positive) and the SupCon mix (finite, >= 0, only with a
    /// hierarchical loss).
    pub fn validate(&self) -> Result<()> {
        if !(self.supcon_mix.is_finite() && self.supcon_mix >= 0.0) {
            return Err(self.config_error(format!("--supcon-mix must be finite and >= 0, got {}", self.supcon_mix)));
        }
        if self.supcon_mix != 0.0 && !self.kind.is_hierarchical() {
            return Err(self.config_error("--supcon-mix adds SupCon to a hierarchical loss (hmc, hce, hmce)".into()));
        }
        for (name, t) in [("temperature", self.temperature), ("base temperature", self.base_temperature)] {
            if !(t.is_finite() && t > 0.0) {
                return Err(self.config_error(format!("{name} must be finite and positive, got {t}")));
            }
        }
        Ok(())
    }

    /// Leading label columns the SupCon baseline compares, for a label table of `k` columns.
    pub fn supcon_columns(&self, k: usize) -> Result<usize> {
        self.resolve_columns("supcon_level", self.supcon_level, k)
    }

    /// Leading label columns whose distinct values are the CE baseline's classes.
    pub fn ce_columns(&self, k: usize) -> Result<usize> {
        self.resolve_columns("ce_level", self.ce_level, k)
    }

    /// The divisor of the hierarchical total for `k` label columns.
    pub fn divisor(&self, k: usize) -> f64 {
        match self.normalize {
            Normalize::Columns => k as f64,
            Normalize::Levels => (k - 1) as f64,
        }
    }

    fn resolve_columns(&self, name: &str, level: Option<usize>, k: usize) -> Result<usize> {
        let columns = match level {
            Some(c) => c,
            None if k >= 3 => k - 2,
            None => {
                return Err(self.config_error(format!(
                    "{name} defaults to the product level (K-2 columns), which needs K >= 3 label columns, got K = {k}"
                )));
            }
        };
        if columns == 0 || columns > k {
            return Err(self.config_error(format!("{name} = {columns} must be in 1..={k} (label columns)")));
        }
        Ok(columns)
    }

    pub(crate) fn config_error(&self, reason: String) -> Error {
        Error::LossConfig { loss: self.kind.name(), reason }
    }
}
