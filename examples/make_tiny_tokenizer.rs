//! Makes `data/tiny-tokenizer.json`, the tokenizer of the built-in presets: a byte-level BPE
//! with 4096 entries trained on the bundled corpus. Deterministic; rerun after changing the
//! corpus:
//!
//!     cargo run --example make_tiny_tokenizer

use std::collections::HashSet;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

fn main() -> tokenizers::Result<()> {
    let corpus = "data/train_data.txt";
    let out = "data/tiny-tokenizer.json";
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(4096)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .build();
    let mut tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_model(BPE::default())
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::default()))
            .with_post_processor(Some(ByteLevel::default()))
            .build()?;
    tokenizer.train_from_files(&mut trainer, vec![corpus.to_string()])?;
    tokenizer.save(out, true)?;
    println!("wrote {out} ({} entries)", tokenizer.get_vocab_size(true));
    Ok(())
}
