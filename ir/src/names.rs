//! Graph names shared across herd's crates: the decoder's inputs and outputs, the KV cache of each
//! layer, and the nodes passes single out. The runtime reads them from the manifest, never from here.

/// Token ids, i64 [batch, seq].
pub const INPUT_IDS: &str = "input_ids";
/// Absolute positions, i64 [batch, seq].
pub const POSITION_IDS: &str = "position_ids";
/// The decoder's output: f32 logits of the picked rows.
pub const LOGITS: &str = "logits";
/// The output projection, which quantization and calibration treat apart.
pub const LM_HEAD: &str = "lm_head";

/// Which of a layer's four cache tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    PastKey,
    PastValue,
    PresentKey,
    PresentValue,
}

impl Cache {
    const ALL: [Cache; 4] = [
        Cache::PastKey,
        Cache::PastValue,
        Cache::PresentKey,
        Cache::PresentValue,
    ];

    fn prefix(self) -> &'static str {
        match self {
            Cache::PastKey => "past_key.",
            Cache::PastValue => "past_value.",
            Cache::PresentKey => "present_key.",
            Cache::PresentValue => "present_value.",
        }
    }

    /// The name of this cache tensor of decoder layer `layer`: `past_key.{layer}` and so on.
    pub fn name(self, layer: usize) -> String {
        format!("{}{layer}", self.prefix())
    }

    /// The cache tensor and layer `name` names, if it names one.
    pub fn parse(name: &str) -> Option<(Cache, usize)> {
        Cache::ALL
            .into_iter()
            .find_map(|c| Some((c, name.strip_prefix(c.prefix())?.parse().ok()?)))
    }

    /// The `present_*` output a `past_*` input is written to (and a present output itself).
    pub fn present(self) -> Cache {
        match self {
            Cache::PastKey | Cache::PresentKey => Cache::PresentKey,
            Cache::PastValue | Cache::PresentValue => Cache::PresentValue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cache;

    #[test]
    fn cache_names_round_trip() {
        for c in Cache::ALL {
            assert_eq!(Cache::parse(&c.name(17)), Some((c, 17)));
        }
        assert_eq!(Cache::parse("past_key.x"), None);
        assert_eq!(Cache::parse("logits"), None);
    }
}
