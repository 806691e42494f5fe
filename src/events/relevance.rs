//! Graded relevance (MERGE's E/S/C/I levels), implicit interaction actions, and the configurable
//! mapping from an interaction to the level it is evidence of.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Graded relevance of a product to a query, ordered `Irrelevant < Complement < Substitute < Exact`
/// (the ESCI scale MERGE trains on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RelevanceLevel {
    /// `I`: the product does not satisfy the query.
    #[serde(rename = "I")]
    Irrelevant = 0,
    /// `C`: the product complements what the query asks for.
    #[serde(rename = "C")]
    Complement = 1,
    /// `S`: the product could substitute for what the query asks for.
    #[serde(rename = "S")]
    Substitute = 2,
    /// `E`: the product is exactly what the query asks for.
    #[serde(rename = "E")]
    Exact = 3,
}

impl RelevanceLevel {
    /// All levels, lowest first; the index of a level in this array is its `u8` value.
    pub const ALL: [RelevanceLevel; 4] = [
        RelevanceLevel::Irrelevant,
        RelevanceLevel::Complement,
        RelevanceLevel::Substitute,
        RelevanceLevel::Exact,
    ];

    /// Parses the one-letter ESCI label (`E`, `S`, `C`, `I`), case-sensitive.
    pub fn from_label(label: &str) -> Option<Self> {
        match label {
            "E" => Some(Self::Exact),
            "S" => Some(Self::Substitute),
            "C" => Some(Self::Complement),
            "I" => Some(Self::Irrelevant),
            _ => None,
        }
    }

    /// The one-letter ESCI label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Exact => "E",
            Self::Substitute => "S",
            Self::Complement => "C",
            Self::Irrelevant => "I",
        }
    }

    /// The level's position in [`RelevanceLevel::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RelevanceLevel {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.label())
    }
}

/// An implicit interaction logged by the search front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InteractionAction {
    /// The product was shown for the query.
    Impression,
    /// The product was clicked in the results of the query.
    Click,
    /// The product was added to the cart after the query.
    AddToCart,
    /// The product was bought after the query.
    Purchase,
}

impl InteractionAction {
    /// All actions, in funnel order; the index of an action here is its counter slot in state.
    pub const ALL: [InteractionAction; 4] = [
        InteractionAction::Impression,
        InteractionAction::Click,
        InteractionAction::AddToCart,
        InteractionAction::Purchase,
    ];

    /// Parses the wire name (`impression`, `click`, `add_to_cart`, `purchase`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "impression" => Some(Self::Impression),
            "click" => Some(Self::Click),
            "add_to_cart" => Some(Self::AddToCart),
            "purchase" => Some(Self::Purchase),
            _ => None,
        }
    }

    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Impression => "impression",
            Self::Click => "click",
            Self::AddToCart => "add_to_cart",
            Self::Purchase => "purchase",
        }
    }

    /// The action's position in [`InteractionAction::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::Impression => 0,
            Self::Click => 1,
            Self::AddToCart => 2,
            Self::Purchase => 3,
        }
    }
}

/// The relevance level an implicit action counts as; `None` means "count it, grade nothing".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionGrade {
    /// The action is counted but contributes no relevance level.
    #[serde(rename = "none")]
    Ungraded,
    /// The action counts as this level.
    #[serde(untagged)]
    Level(RelevanceLevel),
}

/// How implicit actions map to relevance levels (config section `[relevance]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelevanceMapping {
    /// Level of an `impression` (default `none`: being shown says nothing about relevance).
    pub impression: ActionGrade,
    /// Level of a `click` (default `C`: weak evidence of relevance).
    pub click: ActionGrade,
    /// Level of an `add_to_cart` (default `S`).
    pub add_to_cart: ActionGrade,
    /// Level of a `purchase` (default `E`: the strongest behavioural evidence).
    pub purchase: ActionGrade,
}

impl Default for RelevanceMapping {
    fn default() -> Self {
        Self {
            impression: ActionGrade::Ungraded,
            click: ActionGrade::Level(RelevanceLevel::Complement),
            add_to_cart: ActionGrade::Level(RelevanceLevel::Substitute),
            purchase: ActionGrade::Level(RelevanceLevel::Exact),
        }
    }
}

impl RelevanceMapping {
    /// The level `action` counts as, or `None` where the action is configured as ungraded.
    pub fn level_of(&self, action: InteractionAction) -> Option<RelevanceLevel> {
        let grade = match action {
            InteractionAction::Impression => self.impression,
            InteractionAction::Click => self.click,
            InteractionAction::AddToCart => self.add_to_cart,
            InteractionAction::Purchase => self.purchase,
        };
        match grade {
            ActionGrade::Ungraded => None,
            ActionGrade::Level(level) => Some(level),
        }
    }
}
