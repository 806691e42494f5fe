//! Encoder input text: a product rendered the way MERGE's reference prepares documents
//! (`title: … description: … bullets: … brand: … color: …`), with HTML cleaned up; queries are
//! encoded as plain text.

use crate::events::ProductContent;

/// How product text is cut before encoding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProductTextConfig {
    /// Each field (title, description, each bullet, brand, colour) is cut to at most this many
    /// characters after cleaning, at a character boundary.
    pub max_field_chars: usize,
    /// Bullets beyond this many are skipped.
    pub max_bullets: usize,
}

impl Default for ProductTextConfig {
    fn default() -> Self {
        Self { max_field_chars: 1_000, max_bullets: 8 }
    }
}

/// Renders a product as encoder input:
/// `title: T description: D bullets: B1 B2 brand: R color: C`. Fields that are absent or empty
/// after cleaning are skipped, with their label.
pub fn product_text(content: &ProductContent, config: &ProductTextConfig) -> String {
    let mut rendered = String::with_capacity(256);
    let mut push_field = |label: &str, value: &str| {
        let cleaned = clean_field(value, config.max_field_chars);
        if cleaned.is_empty() {
            return;
        }
        if !rendered.is_empty() {
            rendered.push(' ');
        }
        rendered.push_str(label);
        rendered.push_str(": ");
        rendered.push_str(&cleaned);
    };
    push_field("title", &content.title);
    if let Some(description) = &content.description {
        push_field("description", description);
    }
    let bullets: Vec<String> = content
        .bullet_points
        .iter()
        .take(config.max_bullets)
        .map(|bullet| clean_field(bullet, config.max_field_chars))
        .filter(|bullet| !bullet.is_empty())
        .collect();
    if !bullets.is_empty() {
        push_field("bullets", &bullets.join(" "));
    }
    if let Some(brand) = &content.brand {
        push_field("brand", brand);
    }
    if let Some(color) = &content.color {
        push_field("color", color);
    }
    rendered
}

/// Cleans one field: HTML entities unescaped, tags removed (a tag becomes a space; a `<` not
/// followed by a letter, `/` or `!` is text, as in "size < 5 cm"), newlines and
/// runs of whitespace collapsed to one space, trimmed, then cut to `max_chars` characters.
pub fn clean_field(raw: &str, max_chars: usize) -> String {
    let unescaped = html_escape::decode_html_entities(raw);
    let mut without_tags = String::with_capacity(unescaped.len());
    let mut characters = unescaped.chars().peekable();
    while let Some(character) = characters.next() {
        let opens_tag = character == '<' && characters.peek().is_some_and(|next| next.is_ascii_alphabetic() || matches!(next, '/' | '!'));
        if !opens_tag {
            without_tags.push(character);
            continue;
        }
        // Skip to the closing `>`; an unclosed tag swallows the rest, as a browser would.
        for inside in characters.by_ref() {
            if inside == '>' {
                break;
            }
        }
        without_tags.push(' ');
    }
    let mut cleaned = String::with_capacity(without_tags.len());
    for word in without_tags.split_whitespace() {
        if !cleaned.is_empty() {
            cleaned.push(' ');
        }
        cleaned.push_str(word);
    }
    match cleaned.char_indices().nth(max_chars) {
        Some((cut, _)) => cleaned[..cut].trim_end().to_owned(),
        None => cleaned,
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fields_in_reference_order_and_skips_missing_ones() {
        let mut content = ProductContent::with_title("Steel Pan &amp; Lid");
        content.description = Some("<p>Heavy<br/>gauge\nsteel</p>".into());
        content.bullet_points = vec!["Oven safe".into(), "  ".into(), "Dishwasher safe".into()];
        content.color = Some("Silver".into());
        let text = product_text(&content, &ProductTextConfig::default());
        assert_eq!(text, "title: Steel Pan & Lid description: Heavy gauge steel bullets: Oven safe Dishwasher safe color: Silver");
    }

    #[test]
    fn cuts_each_field_at_a_character_boundary() {
        assert_eq!(clean_field("ééééé", 3), "ééé");
        assert_eq!(clean_field("a b c d", 4), "a b");
        let mut content = ProductContent::with_title("x".repeat(50));
        content.brand = Some("y".repeat(50));
        let config = ProductTextConfig { max_field_chars: 10, max_bullets: 8 };
        assert_eq!(product_text(&content, &config), format!("title: {} brand: {}", "x".repeat(10), "y".repeat(10)));
    }

    #[test]
    fn keeps_a_lone_less_than_sign() {
        assert_eq!(clean_field("size < 5 cm", 100), "size < 5 cm");
        assert_eq!(clean_field("a <b>bold</b> move", 100), "a bold move");
    }
}
