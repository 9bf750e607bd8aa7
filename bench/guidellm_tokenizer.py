"""Write an offline word-level tokenizer for guidellm's synthetic data against qtrap-sim.

    /path/to/guidellm-venv/bin/python bench/guidellm_tokenizer.py OUT_DIR

guidellm needs a Hugging Face tokenizer to build its synthetic prompts (``--tokenizer
kind=huggingface_auto,model=PATH``); without one it downloads the served model's from the Hub. This
writes one that needs no download: a WordLevel tokenizer whose vocabulary is every word guidellm's
synthetic text can contain (Faker's English lorem word list, lower case and capitalised, with and
without a full stop), split on whitespace. One token is one whitespace-separated word, which is also how
qtrap-sim counts tokens, so the prompt lengths guidellm asks for are the ones the simulator sees.

Run it with guidellm's own environment (it needs faker, tokenizers and transformers, all guidellm's
dependencies). Against a real model, give guidellm that model's tokenizer instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def vocabulary() -> list[str]:
    from faker.providers.lorem.en_US import Provider

    words: list[str] = list(SPECIALS)
    seen = set(words)
    for w in Provider.word_list:
        for form in (w, w.capitalize(), w + ".", w.capitalize() + "."):
            if form not in seen:
                seen.add(form)
                words.append(form)
    return words


def write(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = "{% for m in messages %}<|im_start|> {{ m['content'] }} <|im_end|> {% endfor %}"
    fast.save_pretrained(out)
    return len(words)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory to write the tokenizer to (created)")
    args = ap.parse_args()
    try:
        n = write(args.out)
    except ImportError as e:
        print(
            f"guidellm_tokenizer: {e}: run it with guidellm's Python (faker, tokenizers, transformers)",
            file=sys.stderr,
        )
        return 2
    except OSError as e:
        print(f"guidellm_tokenizer: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    print(f"wrote a {n}-word tokenizer to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
