"""Data for zerotrain's language models: the bundled corpus, tokenizer, token files, evaluation."""
from .cloze import (ClozePassage, build_cloze, cloze_accuracy, evaluate_lm, lm_metrics,
                    unigram_cloze_baseline, unigram_perplexity)
from .corpus import (DEFAULT_HELDOUT_BOOKS, Book, Corpus, default_corpus_path, load_corpus,
                     parse_corpus, split, split_books)
from .dataset import (TokenDataset, batches, build_token_file, eval_windows, num_eval_windows,
                      token_dtype)
from .tokenizer import EOT, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "Book", "ClozePassage", "Corpus", "DEFAULT_HELDOUT_BOOKS", "EOT", "TokenDataset", "Tokenizer",
    "batches", "build_cloze", "build_token_file", "cloze_accuracy", "default_corpus_path",
    "eval_windows", "evaluate_lm", "lm_metrics", "load_corpus", "load_tokenizer", "num_eval_windows",
    "parse_corpus", "split", "split_books", "token_dtype", "train_tokenizer",
    "unigram_cloze_baseline", "unigram_perplexity",
]
